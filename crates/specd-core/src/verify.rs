//! The lossless speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023).
//!
//! Owns the decision, given draft tokens, the draft distributions they were sampled from and the
//! target distributions at the same positions, of how many drafts to accept and which token to
//! emit after them, such that the emitted tokens are distributed exactly as if sampled from the
//! target alone. Also the greedy (argmax prefix match) special case. It does not build the
//! distributions ([`crate::dist`]), run any model, or decide how many tokens to draft
//! ([`crate::spec_len`]).

use crate::dist::SparseDist;
use crate::sampling::Sampler;

/// Inputs to [`verify`] / [`verify_greedy`] that break the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `q.len()` must equal `drafts.len()` and `p.len()` must be `drafts.len() + 1`.
    #[error(
        "length mismatch: {drafts} drafts need {drafts} draft distributions q and {} target \
         distributions p, got q.len() = {q}, p.len() = {p}",
        drafts + 1
    )]
    LengthMismatch {
        /// `drafts.len()`
        drafts: usize,
        /// `q.len()`
        q: usize,
        /// `p.len()`
        p: usize,
    },
    /// A draft token has zero probability under the draft distribution it was supposedly
    /// sampled from.
    #[error("draft token {token} at position {index} has zero probability under q[{index}]")]
    DraftNotInQ {
        /// Position in `drafts`.
        index: usize,
        /// The draft token.
        token: u32,
    },
    /// `target_argmax.len()` must be `drafts.len() + 1`.
    #[error(
        "length mismatch: {drafts} drafts need {} target argmaxes, got target_argmax.len() = {target}",
        drafts + 1
    )]
    GreedyLengthMismatch {
        /// `drafts.len()`
        drafts: usize,
        /// `target_argmax.len()`
        target: usize,
    },
}

/// Outcome of verifying one speculation step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Number of draft tokens accepted, `0..=drafts.len()`.
    pub accepted: usize,
    /// The correction token sampled at the first rejection, or the bonus token if all drafts
    /// were accepted. Always emitted after the accepted drafts.
    pub next_token: u32,
}

impl Verdict {
    /// Number of tokens this step emits: the accepted drafts plus `next_token`.
    pub fn num_emitted(&self) -> usize {
        self.accepted + 1
    }

    /// The tokens this step emits: `drafts[..accepted]` followed by `next_token`.
    pub fn emitted(&self, drafts: &[u32]) -> Vec<u32> {
        let n = self.accepted.min(drafts.len());
        let mut v = Vec::with_capacity(n + 1);
        v.extend_from_slice(&drafts[..n]);
        v.push(self.next_token);
        v
    }
}

/// Deliberate deviations from the rule, only ever set by tests (negative controls proving the
/// statistical tests can fail).
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Sample the correction token from `p_i` instead of the residual `norm(max(0, p_i - q_i))`.
    correction_from_p: bool,
    /// Accept every draft token.
    always_accept: bool,
}

/// Speculative sampling: decides how many of `drafts` to accept and samples the next token.
///
/// `drafts.len() == q.len() == p.len() - 1`. `p[i]` is the target distribution at the position
/// of `drafts[i]` (`p[drafts.len()]` is for the bonus position); `q[i]` is the draft distribution
/// `drafts[i]` was sampled from (it must give `drafts[i]` probability > 0).
///
/// For `i` in order, `drafts[i]` is accepted with probability `min(1, p_i(x) / q_i(x))` (one
/// `sampler.uniform()` per examined draft); on the first rejection the next token is sampled from
/// `norm(max(0, p_i - q_i))` (from `p_i` if rounding left that residual without mass); if all are
/// accepted, the next token is sampled from `p[k]`. The emitted tokens are then distributed
/// exactly as under the target distributions.
pub fn verify(
    drafts: &[u32],
    q: &[SparseDist],
    p: &[SparseDist],
    sampler: &mut Sampler,
) -> Result<Verdict, VerifyError> {
    verify_impl(drafts, q, p, sampler, Faults::default())
}

fn verify_impl(
    drafts: &[u32],
    q: &[SparseDist],
    p: &[SparseDist],
    sampler: &mut Sampler,
    faults: Faults,
) -> Result<Verdict, VerifyError> {
    let k = drafts.len();
    if q.len() != k || p.len() != k + 1 {
        return Err(VerifyError::LengthMismatch {
            drafts: k,
            q: q.len(),
            p: p.len(),
        });
    }
    // Validate everything before drawing any randomness.
    for (index, (&token, qi)) in drafts.iter().zip(q).enumerate() {
        if qi.prob(token) <= 0.0 {
            return Err(VerifyError::DraftNotInQ { index, token });
        }
    }
    for (i, &x) in drafts.iter().enumerate() {
        let qx = f64::from(q[i].prob(x));
        let px = f64::from(p[i].prob(x));
        let u = sampler.uniform();
        // u < px / qx, without the division; px == 0 always rejects (u >= 0).
        if u * qx < px || faults.always_accept {
            continue;
        }
        let next_token = if faults.correction_from_p {
            sampler.sample(&p[i])
        } else {
            sample_residual(&p[i], &q[i], sampler)
        };
        return Ok(Verdict {
            accepted: i,
            next_token,
        });
    }
    Ok(Verdict {
        accepted: k,
        next_token: sampler.sample(&p[k]),
    })
}

/// `(id, max(0, p(id) - q(id)))` over `p`'s support (the residual is 0 outside it), in id order.
fn residual<'a>(p: &'a SparseDist, q: &'a SparseDist) -> impl Iterator<Item = (u32, f64)> + 'a {
    let q_ids = q.ids();
    let q_probs = q.probs();
    let mut j = 0usize;
    p.iter().map(move |(id, pp)| {
        while j < q_ids.len() && q_ids[j] < id {
            j += 1;
        }
        let qq = if j < q_ids.len() && q_ids[j] == id {
            q_probs[j]
        } else {
            0.0
        };
        (id, (f64::from(pp) - f64::from(qq)).max(0.0))
    })
}

/// Samples from `norm(max(0, p - q))`, or from `p` when that has no mass. Result is in `p`'s
/// support. Two merge passes, no allocation.
fn sample_residual(p: &SparseDist, q: &SparseDist, sampler: &mut Sampler) -> u32 {
    let total: f64 = residual(p, q).map(|(_, r)| r).sum();
    if total.is_nan() || total <= 0.0 {
        return sampler.sample(p);
    }
    let u = sampler.uniform() * total;
    let mut cum = 0.0;
    let mut last_positive = None;
    for (id, r) in residual(p, q) {
        if r > 0.0 {
            cum += r;
            last_positive = Some(id);
            if u < cum {
                return id;
            }
        }
    }
    // Rounding left `u` just above the accumulated mass: the last positive entry is the answer.
    // `total > 0` guarantees one exists; `argmax` is a panic-free fallback.
    last_positive.unwrap_or_else(|| p.argmax())
}

/// Greedy verification: accepts the longest prefix of `drafts` matching the target argmaxes;
/// `next_token` is the target argmax right after it. `target_argmax.len() == drafts.len() + 1`.
/// No randomness.
pub fn verify_greedy(drafts: &[u32], target_argmax: &[u32]) -> Result<Verdict, VerifyError> {
    if target_argmax.len() != drafts.len() + 1 {
        return Err(VerifyError::GreedyLengthMismatch {
            drafts: drafts.len(),
            target: target_argmax.len(),
        });
    }
    let accepted = drafts
        .iter()
        .zip(target_argmax)
        .take_while(|(d, t)| d == t)
        .count();
    Ok(Verdict {
        accepted,
        next_token: target_argmax[accepted],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::stats::{chi_square_test, ChiSquare};
    use proptest::prelude::*;

    /// Pass threshold of the chi-square tests (strict: a correct implementation fails a given
    /// seed with probability 1e-4; the seeds are fixed, so the outcome is deterministic).
    const ALPHA: f64 = 1e-4;
    const TRIALS: usize = 20_000;

    fn random_dist(s: &mut Sampler, vocab: u32, min_w: f64) -> SparseDist {
        SparseDist::from_weights((0..vocab).map(|id| (id, (min_w + s.uniform()) as f32))).unwrap()
    }

    fn dense(d: &SparseDist, vocab: u32) -> Vec<f64> {
        (0..vocab).map(|id| f64::from(d.prob(id))).collect()
    }

    /// Histogram of the first emitted token of `TRIALS` k=1 steps with draft ~ q.
    fn first_token_histogram(
        p: &SparseDist,
        q: &SparseDist,
        bonus: &SparseDist,
        vocab: u32,
        seed: u64,
        faults: Faults,
    ) -> Vec<u64> {
        let mut s = Sampler::new(Some(seed));
        let mut hist = vec![0u64; vocab as usize];
        let qs = [q.clone()];
        let ps = [p.clone(), bonus.clone()];
        for _ in 0..TRIALS {
            let x = s.sample(q);
            let v = verify_impl(&[x], &qs, &ps, &mut s, faults).unwrap();
            assert!(v.accepted <= 1);
            let first = if v.accepted == 1 { x } else { v.next_token };
            hist[first as usize] += 1;
        }
        hist
    }

    fn check_k1(p: &SparseDist, q: &SparseDist, vocab: u32, seed: u64, what: &str) -> ChiSquare {
        let bonus = SparseDist::one_hot(0);
        let hist = first_token_histogram(p, q, &bonus, vocab, seed, Faults::default());
        let r = chi_square_test(&hist, &dense(p, vocab));
        assert!(
            r.p_value > ALPHA,
            "{what} (seed {seed}): first emitted token does not follow p: {r:?}\nhist {hist:?}\np {:?}",
            dense(p, vocab)
        );
        r
    }

    #[test]
    fn losslessness_k1_chi_square() {
        const V: u32 = 8;
        for seed in 0..3u64 {
            let mut s = Sampler::new(Some(1000 + seed));
            let p = random_dist(&mut s, V, 0.05);
            let q = random_dist(&mut s, V, 0.05);
            check_k1(&p, &q, V, seed, "random p, random q");
            check_k1(&p, &p, V, seed, "q == p");
            // q concentrated on one token inside p's support.
            let t = (s.uniform() * f64::from(V)) as u32;
            check_k1(&p, &SparseDist::one_hot(t), V, seed, "one-hot q");
            // q sharper than p (temperature-like skew) so acceptance is often partial.
            let sharp = SparseDist::from_weights(p.iter().map(|(id, w)| (id, w * w * w))).unwrap();
            check_k1(&p, &sharp, V, seed, "sharpened q");
            check_k1(&sharp, &p, V, seed, "sharpened p");
        }
        // p on tokens 0..4, q on 4..8: every draft is rejected, the residual is p itself.
        let mut s = Sampler::new(Some(7));
        let p = SparseDist::from_weights((0..4).map(|id| (id, 0.2 + s.uniform() as f32))).unwrap();
        let q = SparseDist::from_weights((4..8).map(|id| (id, 0.2 + s.uniform() as f32))).unwrap();
        check_k1(&p, &q, 8, 11, "disjoint supports");
        // Partially overlapping supports.
        let p = SparseDist::from_weights((0..5).map(|id| (id, 0.2 + s.uniform() as f32))).unwrap();
        let q = SparseDist::from_weights((3..8).map(|id| (id, 0.2 + s.uniform() as f32))).unwrap();
        check_k1(&p, &q, 8, 12, "overlapping supports");
        // one-hot q outside p's support; one-hot p with random q.
        check_k1(&p, &SparseDist::one_hot(7), 8, 13, "one-hot q outside p");
        let q = random_dist(&mut s, 8, 0.05);
        check_k1(&SparseDist::one_hot(2), &q, 8, 14, "one-hot p");
    }

    #[test]
    fn negative_control_skipping_the_residual_is_detected() {
        let p = SparseDist::from_weights([(0, 0.5), (1, 0.3), (2, 0.2)]).unwrap();
        let q = SparseDist::from_weights([(0, 0.2), (1, 0.3), (2, 0.5)]).unwrap();
        let bonus = SparseDist::one_hot(0);
        // The correct rule passes on this case...
        let ok = first_token_histogram(&p, &q, &bonus, 3, 5, Faults::default());
        assert!(chi_square_test(&ok, &dense(&p, 3)).p_value > ALPHA);
        // ...sampling the correction from p instead of the residual is detected...
        let faults = Faults {
            correction_from_p: true,
            ..Faults::default()
        };
        let bad = first_token_histogram(&p, &q, &bonus, 3, 5, faults);
        let r = chi_square_test(&bad, &dense(&p, 3));
        assert!(r.p_value < ALPHA, "residual skip not detected: {r:?}");
        // ...and so is accepting every draft (the output then follows q).
        let faults = Faults {
            always_accept: true,
            ..Faults::default()
        };
        let bad = first_token_histogram(&p, &q, &bonus, 3, 5, faults);
        let r = chi_square_test(&bad, &dense(&p, 3));
        assert!(r.p_value < ALPHA, "always-accept not detected: {r:?}");
    }

    /// A Markov "language model": `dists[pos][prev]` is the next-token distribution at position
    /// `pos` after token `prev` (position 0 follows a start token 0).
    type Chain = Vec<Vec<SparseDist>>;

    /// Runs speculative steps with `k` drafts from `q` verified against `p` until at least two
    /// tokens are emitted; returns the first two.
    fn generate_two(p: &Chain, q: &Chain, k: usize, s: &mut Sampler, faults: Faults) -> (u32, u32) {
        let mut out: Vec<u32> = Vec::new();
        let mut prev = 0u32;
        while out.len() < 2 {
            let pos = out.len();
            let mut drafts = Vec::with_capacity(k);
            let mut qs = Vec::with_capacity(k);
            let mut ps = Vec::with_capacity(k + 1);
            let mut ctx = prev;
            for j in 0..k {
                let qd = &q[pos + j][ctx as usize];
                let x = s.sample(qd);
                qs.push(qd.clone());
                ps.push(p[pos + j][ctx as usize].clone());
                drafts.push(x);
                ctx = x;
            }
            ps.push(p[pos + k][ctx as usize].clone());
            let v = verify_impl(&drafts, &qs, &ps, s, faults).unwrap();
            assert!(v.accepted <= k);
            out.extend(v.emitted(&drafts));
            prev = out[out.len() - 1];
        }
        (out[0], out[1])
    }

    fn random_chain(s: &mut Sampler, positions: usize, vocab: u32, draft: Option<&Chain>) -> Chain {
        (0..positions)
            .map(|pos| {
                (0..vocab)
                    .map(|prev| match draft {
                        None => random_dist(s, vocab, 0.2),
                        Some(p) => match (pos + prev as usize) % 4 {
                            0 => p[pos][prev as usize].clone(),
                            1 => SparseDist::one_hot((s.uniform() * f64::from(vocab)) as u32),
                            _ => random_dist(s, vocab, 0.0),
                        },
                    })
                    .collect()
            })
            .collect()
    }

    /// Joint and marginal histograms of the first two emitted tokens with k drafts per step.
    fn two_token_test(seed: u64, faults: Faults) -> (ChiSquare, ChiSquare) {
        const V: u32 = 5;
        const K: usize = 3;
        let mut s = Sampler::new(Some(seed));
        let p = random_chain(&mut s, 2 + K, V, None);
        let q = random_chain(&mut s, 2 + K, V, Some(&p));
        let mut joint = vec![0u64; (V * V) as usize];
        let mut second = vec![0u64; V as usize];
        for _ in 0..TRIALS {
            let (a, b) = generate_two(&p, &q, K, &mut s, faults);
            joint[(a * V + b) as usize] += 1;
            second[b as usize] += 1;
        }
        let mut want_joint = vec![0f64; (V * V) as usize];
        let mut want_second = vec![0f64; V as usize];
        for a in 0..V {
            for b in 0..V {
                let pr = f64::from(p[0][0].prob(a)) * f64::from(p[1][a as usize].prob(b));
                want_joint[(a * V + b) as usize] = pr;
                want_second[b as usize] += pr;
            }
        }
        (
            chi_square_test(&joint, &want_joint),
            chi_square_test(&second, &want_second),
        )
    }

    #[test]
    fn losslessness_k3_second_token_chi_square() {
        for seed in [21u64, 22] {
            let (joint, second) = two_token_test(seed, Faults::default());
            assert!(
                second.p_value > ALPHA,
                "seed {seed}: second-token marginal: {second:?}"
            );
            assert!(
                joint.p_value > ALPHA,
                "seed {seed}: joint of first two: {joint:?}"
            );
            assert_eq!(joint.df, 24);
        }
        // The same routine catches the residual skip in the multi-token setting.
        let faults = Faults {
            correction_from_p: true,
            ..Faults::default()
        };
        let (joint, _) = two_token_test(21, faults);
        assert!(
            joint.p_value < ALPHA,
            "residual skip not detected with k=3: {joint:?}"
        );
    }

    #[test]
    fn verify_on_one_hot_p_agrees_with_greedy() {
        let mut s = Sampler::new(Some(3));
        for _ in 0..500 {
            let k = (s.uniform() * 5.0) as usize;
            let q: Vec<SparseDist> = (0..k).map(|_| random_dist(&mut s, 6, 0.0)).collect();
            let drafts: Vec<u32> = q.iter().map(|d| s.sample(d)).collect();
            // Targets agree with the drafts for a random prefix, then are random.
            let agree = (s.uniform() * (k + 1) as f64) as usize;
            let targets: Vec<u32> = (0..=k)
                .map(|i| {
                    if i < agree {
                        drafts[i]
                    } else {
                        (s.uniform() * 6.0) as u32
                    }
                })
                .collect();
            let p: Vec<SparseDist> = targets.iter().map(|&t| SparseDist::one_hot(t)).collect();
            let g = verify_greedy(&drafts, &targets).unwrap();
            let v = verify(&drafts, &q, &p, &mut s).unwrap();
            assert_eq!(v, g, "drafts {drafts:?} targets {targets:?}");
            assert!(g.accepted >= agree);
        }
    }

    #[test]
    fn verify_greedy_cases() {
        let v = verify_greedy(&[1, 2, 3], &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 3,
                next_token: 4
            }
        );
        assert_eq!(v.emitted(&[1, 2, 3]), vec![1, 2, 3, 4]);
        assert_eq!(v.num_emitted(), 4);
        let v = verify_greedy(&[1, 9, 3], &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 1,
                next_token: 2
            }
        );
        assert_eq!(v.emitted(&[1, 9, 3]), vec![1, 2]);
        let v = verify_greedy(&[5], &[1, 2]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 1
            }
        );
        let v = verify_greedy(&[], &[7]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 7
            }
        );
        let e = verify_greedy(&[1, 2], &[1, 2]).unwrap_err();
        assert_eq!(
            e,
            VerifyError::GreedyLengthMismatch {
                drafts: 2,
                target: 2
            }
        );
        assert!(e.to_string().contains("3 target argmaxes"), "{e}");
    }

    #[test]
    fn verify_rejects_bad_inputs() {
        let mut s = Sampler::new(Some(0));
        let d = SparseDist::one_hot(1);
        let one = std::slice::from_ref(&d);
        let e = verify(&[1], one, one, &mut s).unwrap_err();
        assert_eq!(
            e,
            VerifyError::LengthMismatch {
                drafts: 1,
                q: 1,
                p: 1
            }
        );
        assert!(e.to_string().contains("p.len() = 1"), "{e}");
        let e = verify(&[1], &[], &[d.clone(), d.clone()], &mut s).unwrap_err();
        assert!(matches!(e, VerifyError::LengthMismatch { q: 0, .. }));
        let e = verify(&[2], one, &[d.clone(), d.clone()], &mut s).unwrap_err();
        assert_eq!(e, VerifyError::DraftNotInQ { index: 0, token: 2 });
        assert!(e.to_string().contains("token 2"), "{e}");
        // No drafts: plain sampling from p[0].
        let v = verify(&[], &[], &[SparseDist::one_hot(9)], &mut s).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 9
            }
        );
    }

    #[test]
    fn zero_mass_residual_falls_back_to_p() {
        // p and q share a draft token x with p(x) < q(x) but p's remaining mass is on tokens where
        // q is (after f32 rounding) at least as large: the residual is 0 everywhere.
        let p = SparseDist::from_weights([(0, 1.0), (1, 1.0)]).unwrap();
        let q = SparseDist::from_weights([(0, 1.0), (1, 1.0)]).unwrap();
        let mut s = Sampler::new(Some(0));
        for _ in 0..100 {
            let t = sample_residual(&p, &q, &mut s);
            assert!(t == 0 || t == 1);
        }
        // The residual of p - q is p where q is 0.
        let q = SparseDist::one_hot(0);
        assert!((0..100).all(|_| sample_residual(&p, &q, &mut s) == 1));
    }

    fn dist_strategy(vocab: u32) -> impl Strategy<Value = SparseDist> {
        prop::collection::vec(prop_oneof![Just(0.0f32), 0.01f32..1.0], vocab as usize)
            .prop_filter("nonzero", |w| w.iter().any(|&x| x > 0.0))
            .prop_map(|w| SparseDist::from_weights((0..).zip(w)).unwrap())
    }

    proptest! {
        #[test]
        fn prop_verify_invariants(
            (k, q, p) in (0usize..5).prop_flat_map(|k| (
                Just(k),
                prop::collection::vec(dist_strategy(6), k),
                prop::collection::vec(dist_strategy(6), k + 1),
            )),
            seed in any::<u64>(),
        ) {
            let mut s = Sampler::new(Some(seed));
            let drafts: Vec<u32> = q.iter().map(|d| s.sample(d)).collect();
            let mut s2 = s.clone();
            let v = verify(&drafts, &q, &p, &mut s).unwrap();
            prop_assert!(v.accepted <= k);
            // Whether a correction or the bonus, the next token is in p[accepted]'s support.
            prop_assert!(p[v.accepted].prob(v.next_token) > 0.0);
            // Accepted drafts were possible under the target.
            for i in 0..v.accepted {
                prop_assert!(p[i].prob(drafts[i]) > 0.0);
            }
            // Deterministic given the sampler state.
            prop_assert_eq!(verify(&drafts, &q, &p, &mut s2).unwrap(), v);
        }

        #[test]
        fn prop_identical_dists_accept_everything(
            (k, p) in (0usize..5).prop_flat_map(|k| (
                Just(k),
                prop::collection::vec(dist_strategy(6), k + 1),
            )),
            seed in any::<u64>(),
        ) {
            let mut s = Sampler::new(Some(seed));
            let drafts: Vec<u32> = p[..k].iter().map(|d| s.sample(d)).collect();
            let v = verify(&drafts, &p[..k], &p, &mut s).unwrap();
            prop_assert_eq!(v.accepted, k);
        }

        #[test]
        fn prop_greedy_prefix(drafts in prop::collection::vec(0u32..4, 0..6), tail in prop::collection::vec(0u32..4, 7)) {
            let targets: Vec<u32> = tail[..=drafts.len()].to_vec();
            let v = verify_greedy(&drafts, &targets).unwrap();
            prop_assert!(v.accepted <= drafts.len());
            prop_assert_eq!(&drafts[..v.accepted], &targets[..v.accepted]);
            prop_assert_eq!(v.next_token, targets[v.accepted]);
            if v.accepted < drafts.len() {
                prop_assert_ne!(drafts[v.accepted], targets[v.accepted]);
            }
        }
    }
}
