//! Distillation math for online speculative decoding: how far a drafter's next-token distribution is
//! from the target's, the gradient of that distance with respect to the drafter's logits, and the
//! expected acceptance the evaluation gate compares.
//!
//! Owns [`TopTarget`] (what a target worker captures at a verified position: its top-w probabilities and
//! the tail mass beyond them), [`Loss`] (forward KL, reverse KL, JSD with mixture weight beta, total
//! variation), [`loss_and_grad`] and [`expected_acceptance`]. It runs no model: the trainer turns a
//! gradient with respect to logits into parameter gradients through its autograd (the surrogate
//! `sum(logits * grad)` with `grad` held constant has exactly that gradient).
//!
//! **The tail.** The target sends only its top w tokens, so the distributions are compared on the
//! partition {each of the w ids, everything else}: the drafter's mass outside the w ids is one bucket,
//! set against the target's tail mass `1 - sum(top)`. Every loss here is then exact for that coarser
//! pair of distributions, and by the data-processing inequality a lower bound of the full one; with
//! w = 32 on a chat model the tail holds little mass. Where the target's bucket is zero (a tail of 0),
//! `EPS` stands in for it so that reverse KL and the gradients stay finite.

/// Stand-in for a zero probability in logarithms and ratios.
pub const EPS: f64 = 1e-9;

/// Differences below this count as equal in total variation's subgradient.
const TV_TIE: f64 = 1e-6;

/// Largest tolerated excess of the top probabilities over 1 (float rounding on the sender's side).
const SUM_SLACK: f64 = 1e-3;

/// A bad captured distribution.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DistillError {
    #[error(
        "a target distribution needs as many ids ({ids}) as probabilities ({probs}), at least one"
    )]
    Shape { ids: usize, probs: usize },
    #[error("target probability {p} of token {id} is not in [0, 1]")]
    BadProb { id: u32, p: f32 },
    #[error("target probabilities sum to {0}, more than 1")]
    Mass(f64),
    #[error("token id {id} is outside the student's vocabulary of {vocab}")]
    BadId { id: u32, vocab: usize },
    #[error("token id {0} appears twice in a target distribution")]
    Duplicate(u32),
    #[error("JSD mixture weight beta must be in (0, 1), got {0}")]
    Beta(f64),
    #[error("student logits contain NaN or are all -inf")]
    Logits,
}

/// The target's distribution at one position as captured: its most likely tokens with their
/// probabilities (not renormalized) and, implicitly, the tail mass `1 - sum(probs)`.
#[derive(Clone, Debug, PartialEq)]
pub struct TopTarget {
    ids: Vec<u32>,
    probs: Vec<f32>,
    tail: f64,
}

impl TopTarget {
    /// Checks and builds: as many ids as probabilities (at least one), each probability in [0, 1],
    /// no id twice, a total of at most 1 (a little float slack is clamped away).
    pub fn new(ids: Vec<u32>, probs: Vec<f32>) -> Result<Self, DistillError> {
        if ids.is_empty() || ids.len() != probs.len() {
            return Err(DistillError::Shape {
                ids: ids.len(),
                probs: probs.len(),
            });
        }
        if let Some((&id, &p)) = ids
            .iter()
            .zip(&probs)
            .find(|(_, &p)| !(p.is_finite() && (0.0..=1.0).contains(&p)))
        {
            return Err(DistillError::BadProb { id, p });
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(DistillError::Duplicate(w[0]));
        }
        let sum: f64 = probs.iter().map(|&p| f64::from(p)).sum();
        if sum > 1.0 + SUM_SLACK {
            return Err(DistillError::Mass(sum));
        }
        Ok(Self {
            ids,
            probs,
            tail: (1.0 - sum).max(0.0),
        })
    }

    /// The top `w` of the softmax of `logits` (temperature 1), best first (ties: lower id first): what a
    /// target worker captures at a verified position, on its engine thread. One pass keeps the `w` best
    /// logits (no sort of the vocabulary) and one pass sums the softmax's normalizer (`exp` in f32,
    /// summed in f64): about a third of the cost of a full softmax and a selection.
    pub fn from_logits(logits: &[f32], w: usize) -> Result<Self, DistillError> {
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(DistillError::Logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(DistillError::Logits);
        }
        let w = w.clamp(1, logits.len());
        // Better: a higher logit, or the same logit and a lower id.
        let better = |a: (f32, u32), b: (f32, u32)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
        let mut top: Vec<(f32, u32)> = Vec::with_capacity(w + 1);
        let mut sum = 0.0f64;
        for (i, &z) in logits.iter().enumerate() {
            sum += f64::from((z - max).exp());
            let e = (z, i as u32);
            if top.len() < w || better(e, top[top.len() - 1]) {
                let at = top.partition_point(|&t| better(t, e));
                top.insert(at, e);
                top.truncate(w);
            }
        }
        let (ids, probs) = top
            .into_iter()
            .map(|(z, i)| (i, (f64::from((z - max).exp()) / sum) as f32))
            .unzip();
        Self::new(ids, probs)
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The ids, the probabilities and the tail mass, by value.
    pub fn into_parts(self) -> (Vec<u32>, Vec<f32>, f64) {
        (self.ids, self.probs, self.tail)
    }

    pub fn probs(&self) -> &[f32] {
        &self.probs
    }

    /// Mass beyond the captured ids.
    pub fn tail(&self) -> f64 {
        self.tail
    }
}

/// A distance between the target's distribution P and the drafter's Q at one position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// KL(P || Q): mass-covering; OSD's default (its soft cross-entropy, less P's constant entropy).
    ForwardKl,
    /// KL(Q || P): mode-seeking.
    ReverseKl,
    /// Generalized Jensen-Shannon: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.
    Jsd { beta: f64 },
    /// Total variation, 0.5 sum |P - Q| = 1 - sum min(P, Q): one minus the acceptance rate itself.
    TotalVariation,
}

impl Loss {
    /// Parses `fkl`, `rkl`, `tv`, `jsd` (beta 0.5) or `jsd:BETA`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let loss = match s {
            "fkl" | "forward-kl" => Loss::ForwardKl,
            "rkl" | "reverse-kl" => Loss::ReverseKl,
            "tv" | "total-variation" => Loss::TotalVariation,
            "jsd" => Loss::Jsd { beta: 0.5 },
            other => match other.strip_prefix("jsd:").map(str::parse::<f64>) {
                Some(Ok(beta)) => Loss::Jsd { beta },
                _ => {
                    return Err(format!(
                        "unknown loss {other:?} (fkl, rkl, jsd, jsd:BETA, tv)"
                    ))
                }
            },
        };
        loss.check().map_err(|e| e.to_string())?;
        Ok(loss)
    }

    fn check(self) -> Result<(), DistillError> {
        match self {
            Loss::Jsd { beta } if !(beta > 0.0 && beta < 1.0) => Err(DistillError::Beta(beta)),
            _ => Ok(()),
        }
    }
}

/// Softmax in f64 (max-subtracted).
fn softmax(logits: &[f32]) -> Result<Vec<f64>, DistillError> {
    if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
        return Err(DistillError::Logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(DistillError::Logits);
    }
    let mut q: Vec<f64> = logits
        .iter()
        .map(|&z| (f64::from(z) - f64::from(max)).exp())
        .collect();
    let sum: f64 = q.iter().sum();
    for v in &mut q {
        *v /= sum;
    }
    Ok(q)
}

/// The bucketed pair: P and Q over {each target id, the rest}; the last entry is the rest.
fn buckets(target: &TopTarget, q: &[f64]) -> Result<(Vec<f64>, Vec<f64>), DistillError> {
    let mut p = Vec::with_capacity(target.ids.len() + 1);
    let mut qb = Vec::with_capacity(target.ids.len() + 1);
    let mut inside = 0.0;
    for (&id, &pi) in target.ids.iter().zip(&target.probs) {
        let qi = *q
            .get(id as usize)
            .ok_or(DistillError::BadId { id, vocab: q.len() })?;
        inside += qi;
        p.push(f64::from(pi));
        qb.push(qi);
    }
    p.push(target.tail);
    qb.push((1.0 - inside).max(0.0));
    Ok((p, qb))
}

/// The loss at one position and its gradient with respect to the drafter's logits (same length as
/// `logits`).
///
/// With Q_b the drafter's mass in bucket b and g_b = dL/dQ_b, the softmax gives
/// dL/dz_k = q_k (g_{b(k)} - sum_b g_b Q_b): O(vocab), no Jacobian.
pub fn loss_and_grad(
    loss: Loss,
    target: &TopTarget,
    logits: &[f32],
) -> Result<(f64, Vec<f32>), DistillError> {
    loss.check()?;
    let q = softmax(logits)?;
    let (p, qb) = buckets(target, &q)?;
    let (value, g) = bucket_loss(loss, &p, &qb);
    let mean: f64 = g.iter().zip(&qb).map(|(g, q)| g * q).sum();
    let rest = g[g.len() - 1];
    let mut grad: Vec<f32> = q.iter().map(|&qk| (qk * (rest - mean)) as f32).collect();
    for (i, &id) in target.ids.iter().enumerate() {
        grad[id as usize] = (q[id as usize] * (g[i] - mean)) as f32;
    }
    Ok((value, grad))
}

/// The loss over bucketed P and Q and its gradient with respect to each Q_b.
fn bucket_loss(loss: Loss, p: &[f64], q: &[f64]) -> (f64, Vec<f64>) {
    let pairs = p.iter().zip(q).map(|(&p, &q)| (p, q.max(EPS)));
    match loss {
        Loss::ForwardKl => {
            let mut v = 0.0;
            let g = pairs
                .map(|(p, q)| {
                    if p > 0.0 {
                        v += p * (p / q).ln();
                    }
                    -p / q
                })
                .collect();
            (v, g)
        }
        Loss::ReverseKl => {
            let mut v = 0.0;
            let g = pairs
                .map(|(p, q)| {
                    let p = p.max(EPS);
                    v += q * (q / p).ln();
                    (q / p).ln() + 1.0
                })
                .collect();
            (v, g)
        }
        Loss::Jsd { beta } => {
            let mut v = 0.0;
            let g = pairs
                .map(|(p, q)| {
                    let m = beta * p + (1.0 - beta) * q;
                    if p > 0.0 {
                        v += beta * p * (p / m).ln();
                    }
                    v += (1.0 - beta) * q * (q / m).ln();
                    (1.0 - beta) * (q / m).ln()
                })
                .collect();
            (v, g)
        }
        Loss::TotalVariation => {
            let mut v = 0.0;
            let g = p
                .iter()
                .zip(q)
                .map(|(&p, &q)| {
                    v += 0.5 * (p - q).abs();
                    // A subgradient; 0 where the two agree to within float rounding.
                    if (q - p).abs() < TV_TIE {
                        0.0
                    } else {
                        0.5 * (q - p).signum()
                    }
                })
                .collect();
            (v, g)
        }
    }
}

/// Expected acceptance of the drafter at this position, sum over the target's ids of min(p, q): the
/// rate at which a draft sampled from Q passes the rejection rule, counting only the captured ids
/// (a lower bound, exact when the tail is 0). The gate compares drafters on it.
pub fn expected_acceptance(target: &TopTarget, logits: &[f32]) -> Result<f64, DistillError> {
    let q = softmax(logits)?;
    let (p, qb) = buckets(target, &q)?;
    Ok(p[..p.len() - 1]
        .iter()
        .zip(&qb)
        .map(|(&p, &q)| p.min(q))
        .sum())
}

/// Which verified positions of a sequence to learn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionMask {
    /// Only where the drafter did not supply the target's token: its draft was rejected (OSD's default:
    /// where the drafter was wrong), or it drafted nothing there (a step the adaptive length left
    /// undrafted, or the bonus position after a fully accepted draft).
    Rejected,
    /// Every verified position.
    All,
}

impl PositionMask {
    /// Whether a position is learned from, given whether the drafter's token there was accepted.
    pub fn keeps(self, accepted: bool) -> bool {
        match self {
            PositionMask::Rejected => !accepted,
            PositionMask::All => true,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target(ids: &[u32], probs: &[f32]) -> TopTarget {
        TopTarget::new(ids.to_vec(), probs.to_vec()).unwrap()
    }

    /// Logits whose softmax is exactly `q` (q sums to 1, all > 0).
    fn logits_of(q: &[f64]) -> Vec<f32> {
        q.iter().map(|&v| v.ln() as f32).collect()
    }

    const ALL: [Loss; 5] = [
        Loss::ForwardKl,
        Loss::ReverseKl,
        Loss::Jsd { beta: 0.5 },
        Loss::Jsd { beta: 0.1 },
        Loss::TotalVariation,
    ];

    #[test]
    fn values_match_hand_computed_references() {
        // Vocabulary of 4; the target captured ids 0 and 2 (0.5, 0.3), tail 0.2.
        // The drafter: q = (0.4, 0.1, 0.4, 0.1), so buckets Q = (0.4, 0.4, rest 0.2), P = (0.5, 0.3, 0.2).
        let t = target(&[0, 2], &[0.5, 0.3]);
        let z = logits_of(&[0.4, 0.1, 0.4, 0.1]);
        let (p, q) = ([0.5f64, 0.3, 0.2], [0.4f64, 0.4, 0.2]);
        let fkl: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        let rkl: f64 = p.iter().zip(&q).map(|(p, q)| q * (q / p).ln()).sum();
        let m: Vec<f64> = p.iter().zip(&q).map(|(p, q)| 0.5 * p + 0.5 * q).collect();
        let jsd: f64 = (0..3)
            .map(|i| 0.5 * p[i] * (p[i] / m[i]).ln() + 0.5 * q[i] * (q[i] / m[i]).ln())
            .sum();
        // Written out: fkl = 0.5 ln 1.25 + 0.3 ln 0.75.
        assert!((fkl - (0.5 * 1.25f64.ln() + 0.3 * 0.75f64.ln())).abs() < 1e-12);
        for (loss, want) in [
            (Loss::ForwardKl, fkl),
            (Loss::ReverseKl, rkl),
            (Loss::Jsd { beta: 0.5 }, jsd),
            (Loss::TotalVariation, 0.1),
        ] {
            let (v, _) = loss_and_grad(loss, &t, &z).unwrap();
            assert!((v - want).abs() < 1e-6, "{loss:?}: {v} vs {want}");
        }
        let acc = expected_acceptance(&t, &z).unwrap();
        assert!((acc - (0.4 + 0.3)).abs() < 1e-6, "{acc}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let t = target(&[3, 0, 5], &[0.45, 0.2, 0.15]);
        let z: Vec<f32> = vec![0.3, -1.2, 0.8, 1.5, -0.4, 0.1, 0.0, -2.0];
        for loss in ALL {
            let (_, g) = loss_and_grad(loss, &t, &z).unwrap();
            for k in 0..z.len() {
                let h = 1e-3f32;
                let mut up = z.clone();
                up[k] += h;
                let mut down = z.clone();
                down[k] -= h;
                let fd = (loss_and_grad(loss, &t, &up).unwrap().0
                    - loss_and_grad(loss, &t, &down).unwrap().0)
                    / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(g[k])).abs() < 2e-4,
                    "{loss:?} d/dz{k}: analytic {} finite {fd}",
                    g[k]
                );
            }
            // The logits' shift invariance: gradients sum to zero.
            assert!(g.iter().map(|&v| f64::from(v)).sum::<f64>().abs() < 1e-6);
        }
    }

    #[test]
    fn descending_the_gradient_lowers_every_loss_and_raises_acceptance() {
        let t = target(&[1, 4], &[0.6, 0.3]);
        for loss in ALL {
            let mut z: Vec<f32> = vec![1.0, -0.5, 0.7, 0.2, -1.0, 0.4];
            let (start, _) = loss_and_grad(loss, &t, &z).unwrap();
            let acc0 = expected_acceptance(&t, &z).unwrap();
            for _ in 0..200 {
                let (_, g) = loss_and_grad(loss, &t, &z).unwrap();
                for (zi, gi) in z.iter_mut().zip(&g) {
                    *zi -= 0.5 * gi;
                }
            }
            let (end, _) = loss_and_grad(loss, &t, &z).unwrap();
            let acc1 = expected_acceptance(&t, &z).unwrap();
            assert!(end < start * 0.5, "{loss:?}: {start} -> {end}");
            assert!(acc1 > acc0 + 0.1, "{loss:?}: acceptance {acc0} -> {acc1}");
        }
    }

    #[test]
    fn a_perfect_drafter_has_zero_loss_and_full_acceptance() {
        let q = [0.5, 0.25, 0.125, 0.125];
        let t = target(&[0, 1, 2, 3], &[0.5, 0.25, 0.125, 0.125]);
        for loss in ALL {
            let (v, g) = loss_and_grad(loss, &t, &logits_of(&q)).unwrap();
            assert!(v.abs() < 1e-6, "{loss:?}: {v}");
            assert!(g.iter().all(|g| g.abs() < 1e-5), "{loss:?}: {g:?}");
        }
        assert!((expected_acceptance(&t, &logits_of(&q)).unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn captured_top_w_and_bad_input() {
        let t = TopTarget::from_logits(&[0.0, 2.0, 1.0, -1.0], 2).unwrap();
        assert_eq!(t.ids(), &[1, 2]);
        assert!(t.tail() > 0.0 && t.tail() < 0.2);
        assert!(matches!(
            TopTarget::new(vec![1], vec![0.5, 0.2]),
            Err(DistillError::Shape { .. })
        ));
        assert!(matches!(
            TopTarget::new(vec![1, 2], vec![0.7, 0.6]),
            Err(DistillError::Mass(_))
        ));
        assert!(matches!(
            TopTarget::new(vec![1, 1], vec![0.2, 0.2]),
            Err(DistillError::Duplicate(1))
        ));
        assert!(matches!(
            TopTarget::new(vec![1], vec![f32::NAN]),
            Err(DistillError::BadProb { .. })
        ));
        let t = target(&[9], &[0.5]);
        assert!(matches!(
            loss_and_grad(Loss::ForwardKl, &t, &[0.0; 4]),
            Err(DistillError::BadId { id: 9, vocab: 4 })
        ));
        assert!(loss_and_grad(Loss::Jsd { beta: 1.0 }, &target(&[0], &[1.0]), &[0.0]).is_err());
        assert!(loss_and_grad(Loss::ForwardKl, &target(&[0], &[1.0]), &[f32::NAN]).is_err());
        assert_eq!(Loss::parse("jsd:0.3"), Ok(Loss::Jsd { beta: 0.3 }));
        assert!(Loss::parse("jsd:2").is_err() && Loss::parse("l2").is_err());
        assert!(PositionMask::Rejected.keeps(false) && !PositionMask::Rejected.keeps(true));
        assert!(PositionMask::All.keeps(false));
    }
}
