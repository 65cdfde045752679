//! Sparse next-token probability distributions and their construction from logits.
//!
//! Owns [`SparseDist`] (ids strictly ascending, probabilities `> 0` summing to 1) and the exact
//! transformation logits -> distribution the sampler draws from: greedy one-hot, temperature
//! softmax, top-k, top-p, renormalization. It also provides a NaN-safe [`argmax`] over raw logits.
//! It does not draw random numbers ([`crate::sampling::Sampler`] does) and does not compare draft
//! and target distributions ([`crate::verify`] does).
//!
//! Both the draft and the target side must build their distributions with
//! [`SparseDist::from_logits`] and the same [`SamplingParams`]: speculative sampling is lossless
//! with respect to exactly these distributions.
//!
//! The hot path runs on ~150k-entry logits several times per generated token, so it is written
//! as a few branch-light linear passes the compiler can vectorize: no full sort of the
//! vocabulary in any mode (top-k keeps a small candidate buffer; top-p buckets weights by their
//! float exponent and sorts only the bucket holding the cut).

use std::cmp::Ordering;

use crate::sampling::{ParamError, SamplingParams};

/// Why a distribution could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DistError {
    /// `logits` was empty.
    #[error("logits are empty (vocabulary size 0)")]
    EmptyLogits,
    /// More logits than `u32` token ids can address.
    #[error("vocabulary of {0} logits does not fit in u32 token ids")]
    VocabTooLarge(usize),
    /// A logit is NaN.
    #[error("logit at token id {index} is NaN")]
    NanLogit {
        /// Token id (index into the logits) of the first NaN.
        index: usize,
    },
    /// Every logit is `-inf`, so no token has probability mass.
    #[error("all {vocab} logits are -inf: no token has probability mass")]
    NoMass {
        /// Number of logits.
        vocab: usize,
    },
    /// A weight passed to [`SparseDist::from_weights`] is negative or not finite.
    #[error("weight of token id {id} is {weight}; weights must be finite and >= 0")]
    BadWeight {
        /// Token id the weight belongs to.
        id: u32,
        /// The offending weight.
        weight: f32,
    },
    /// The weights passed to [`SparseDist::from_weights`] sum to 0 or overflow.
    #[error("total weight is {0}; it must be finite and > 0")]
    BadTotal(f64),
    /// [`SparseDist::map_ids`] met an id its table does not cover.
    #[error("id {id} has no entry in an id table of {len}")]
    UnmappedId {
        /// The id without an entry.
        id: u32,
        /// The table's length.
        len: usize,
    },
    /// The sampling parameters are out of range.
    #[error(transparent)]
    Params(#[from] ParamError),
}

/// A probability distribution over token ids, stored sparsely: ids strictly ascending,
/// probs `> 0`, sum 1 (up to `f32` rounding). Never empty.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDist {
    ids: Vec<u32>,
    probs: Vec<f32>,
}

/// Orders `(weight, id)` by weight descending, then id ascending (the "probability-sorted" order).
fn by_weight_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    // Weights and logits reaching this are never NaN (checked on entry), so `Equal` is never a
    // stand-in for an incomparable pair.
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Lanes of the vectorizable reductions.
const LANES: usize = 16;

/// Largest non-NaN value of `xs` (`-inf` if none) and whether any NaN was seen. One pass with
/// independent lanes so it compiles to packed max/compare instructions.
fn max_and_nan(xs: &[f32]) -> (f32, bool) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let v = c[j];
            // `v > m` is false for NaN, so NaN never enters the maximum.
            mx[j] = if v > mx[j] { v } else { mx[j] };
            nan[j] |= v.is_nan();
        }
    }
    let mut m = mx
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    let mut any_nan = nan.iter().any(|&b| b);
    for &v in rem {
        if v > m {
            m = v;
        }
        any_nan |= v.is_nan();
    }
    (m, any_nan)
}

/// Index and value of the maximum of `logits` (lowest index on ties), or the index of the first
/// NaN as the error. Not for empty input (returns index 0, `-inf`).
fn scan_max(logits: &[f32]) -> Result<(usize, f32), usize> {
    let (max, nan) = max_and_nan(logits);
    if nan {
        return Err(logits.iter().position(|v| v.is_nan()).unwrap_or(0));
    }
    Ok((logits.iter().position(|&v| v == max).unwrap_or(0), max))
}

/// Sum in `f64` with independent lanes (vectorizable). Every sum of weights in this module goes
/// through here, so equal inputs give bit-identical sums.
pub(crate) fn sum_f64(ws: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = ws.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f64::from(c[j]);
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &w in rem {
        s += f64::from(w);
    }
    s
}

/// Below this argument [`exp_nonpos`] returns 0 (so `-inf` logits get exactly no mass). The true
/// value there is under `1.7e-38`, i.e. under `1.7e-38` of the most likely token's mass.
const EXP_CUTOFF: f32 = -87.0;

/// `e^x` for `x <= 0` (Cephes `expf` polynomial, within ~2 ulp), 0 for `x < -87` and `-inf`,
/// exactly 1 at 0. Branch-free so the softmax loop vectorizes; `f32::exp` is a libm call that
/// does not.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    let xc = if x > EXP_CUTOFF { x } else { EXP_CUTOFF };
    // Round x*log2(e) to an integer n by adding 1.5*2^23: n lands in the low mantissa bits
    // (no `floor` libcall, no saturating float->int cast; both would block vectorization).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // n is in [-126, 0]: the biased exponent n + 127 is a valid normal exponent.
    let n_int = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < EXP_CUTOFF {
        0.0
    } else {
        y * scale
    }
}

/// How logits become unnormalized weights in `[0, 1]` (the maximum maps to exactly 1).
#[derive(Clone, Copy)]
enum Weigher {
    /// `exp((l - max) / t)`.
    Soft { max: f32, inv_t: f32 },
    /// The limit for `+inf` logits or a temperature so small that `1/t` overflows: 1 on the
    /// tokens equal to the maximum, 0 elsewhere.
    Hard { max: f32 },
}

impl Weigher {
    #[inline(always)]
    fn weight(self, l: f32) -> f32 {
        match self {
            Weigher::Soft { max, inv_t } => exp_nonpos((l - max) * inv_t),
            Weigher::Hard { max } => {
                if l == max {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// Weights of all of `logits`, dense.
    fn weights(self, logits: &[f32]) -> Vec<f32> {
        match self {
            // Separate monomorphic loops so each vectorizes.
            Weigher::Soft { max, inv_t } => logits
                .iter()
                .map(|&l| exp_nonpos((l - max) * inv_t))
                .collect(),
            Weigher::Hard { max } => logits
                .iter()
                .map(|&l| if l == max { 1.0 } else { 0.0 })
                .collect(),
        }
    }
}

/// Candidate tokens with unnormalized weights `>= 0`, ids ascending.
struct Cands {
    /// `None`: dense, the id of entry `i` is `i`.
    ids: Option<Vec<u32>>,
    ws: Vec<f32>,
}

impl Cands {
    #[inline(always)]
    fn id(&self, i: usize) -> u32 {
        match &self.ids {
            Some(ids) => ids[i],
            None => i as u32,
        }
    }

    /// Normalizes by `sum` and drops zero entries.
    fn into_dist(self, sum: f64) -> Result<SparseDist, DistError> {
        if !(sum.is_finite() && sum > 0.0) {
            return Err(DistError::BadTotal(sum));
        }
        let Cands { ids, mut ws } = self;
        let inv = 1.0 / sum;
        for w in ws.iter_mut() {
            *w = (f64::from(*w) * inv) as f32;
        }
        let zeros = ws.iter().filter(|&&p| p == 0.0).count();
        let mut ids = match ids {
            Some(ids) => ids,
            None => (0..ws.len() as u32).collect(),
        };
        if zeros > 0 {
            // Branch-free in-place compaction (`keep <= i`, so nothing unread is overwritten).
            let mut keep = 0;
            for i in 0..ws.len() {
                let (id, p) = (ids[i], ws[i]);
                ids[keep] = id;
                ws[keep] = p;
                keep += usize::from(p > 0.0);
            }
            ids.truncate(keep);
            ws.truncate(keep);
        }
        if ids.is_empty() {
            return Err(DistError::BadTotal(sum));
        }
        Ok(SparseDist { ids, probs: ws })
    }
}

/// The `k` largest logits as `(logit, id)` (ties: lower id), in no particular order; `-inf`
/// logits are never included (they carry no mass), so there may be fewer than `k`.
///
/// One pass keeping a buffer of at most `2k` candidates above a rising threshold; when the buffer
/// fills it is cut back to its `k` best with `select_nth_unstable_by`, and the k-th best becomes
/// the threshold. Ids arrive ascending, so a later logit equal to the threshold loses the tie to
/// all `k` buffered ones and can be skipped (`>`, not `>=`).
fn top_k_candidates(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    let cap = (2 * k).max(64);
    let mut buf: Vec<(f32, u32)> = Vec::with_capacity(cap);
    let mut thr = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > thr {
            buf.push((l, i as u32));
            if buf.len() == cap {
                buf.select_nth_unstable_by(k - 1, by_weight_desc);
                buf.truncate(k);
                thr = buf[k - 1].0;
            }
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, by_weight_desc);
        buf.truncate(k);
    }
    buf
}

/// Candidate counts up to which top-p simply sorts everything.
const TOP_P_SORT_ALL: usize = 2048;
/// Weights are bucketed by their top bits (sign 0, 8 exponent bits, 3 mantissa bits): positive
/// floats order like their bit patterns, so every weight in a higher bucket is strictly larger.
const BUCKET_SHIFT: u32 = 20;
const BUCKETS: usize = 1 << (32 - BUCKET_SHIFT - 1);

#[inline(always)]
fn bucket(w: f32) -> usize {
    (w.to_bits() >> BUCKET_SHIFT) as usize
}

/// Top-p over `c` (weights summing to `sum`): keeps the smallest prefix of the weight-sorted
/// list (ties: lower id) whose weight reaches `top_p * sum`, at least one entry, in id order.
fn top_p_filter(c: Cands, sum: f64, top_p: f64) -> Cands {
    let target = top_p * sum;
    let n = c.ws.len();
    // The last (smallest) kept entry in weight-sorted order: entry (w, id) is kept iff it sorts
    // before or at it, i.e. `w > w_last || (w == w_last && id <= id_last)`.
    let last: Option<(f32, u32)> = if n <= TOP_P_SORT_ALL {
        sorted_prefix_end(&c, 0.0, 0.0, target)
    } else {
        // Peaked distributions (the usual case): the entries with probability >= 1e-4 (at most
        // 10^4 of them) are a prefix of the sorted list; if they hold enough mass, sort only them.
        let thr = (TOP_P_FAST_LEVEL * sum) as f32;
        let fast = if mass_at_least(&c.ws, thr) >= target {
            sorted_prefix_end(&c, thr, 0.0, target)
        } else {
            None
        };
        fast.or_else(|| bucket_prefix_end(&c, target))
    };
    // `None`: rounding kept the total just below the target; keep everything.
    match last {
        Some(last) => keep_through(c, last),
        None => c,
    }
}

/// The entries of `c` sorting (weight descending, id ascending) at or before `last`, in id order.
fn keep_through(c: Cands, (w_last, id_last): (f32, u32)) -> Cands {
    // Branch-free compaction: about half the entries may be kept in a flat distribution, where
    // a data-dependent branch would mispredict constantly. A counting pass first sizes the output
    // exactly (+1 for the store of the last, possibly rejected, entry).
    // Non-short-circuit `|` / `&`: `||` compiles to a branch that mispredicts on flat inputs.
    let kept = |w: f32, id: u32| (w > w_last) | ((w == w_last) & (id <= id_last));
    let (mut ids, mut ws, keep) = match &c.ids {
        None => {
            let count: usize =
                c.ws.iter()
                    .zip(0u32..)
                    .map(|(&w, id)| usize::from(kept(w, id)))
                    .sum();
            let mut ids = vec![0u32; count + 1];
            let mut ws = vec![0.0f32; count + 1];
            let mut keep = 0;
            for (&w, id) in c.ws.iter().zip(0u32..) {
                ids[keep] = id;
                ws[keep] = w;
                keep += usize::from(kept(w, id));
            }
            (ids, ws, keep)
        }
        Some(src) => {
            let mut ids = Vec::new();
            let mut ws = Vec::new();
            for (&w, &id) in c.ws.iter().zip(src) {
                if kept(w, id) {
                    ids.push(id);
                    ws.push(w);
                }
            }
            let keep = ids.len();
            (ids, ws, keep)
        }
    };
    ids.truncate(keep);
    ws.truncate(keep);
    Cands { ids: Some(ids), ws }
}

/// Probability from which the top-p fast path gathers candidates.
const TOP_P_FAST_LEVEL: f64 = 1e-4;

/// Total weight of the entries `>= thr` (vectorizable).
fn mass_at_least(ws: &[f32], thr: f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = ws.chunks_exact(LANES);
    let rem = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            let w = ch[j];
            acc[j] += if w >= thr { f64::from(w) } else { 0.0 };
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &w in rem {
        if w >= thr {
            s += f64::from(w);
        }
    }
    s
}

/// Sorts the entries of `c` with weight `>= thr` (and `> 0`) and walks them from `start`.
fn sorted_prefix_end(c: &Cands, thr: f32, start: f64, target: f64) -> Option<(f32, u32)> {
    let mut v: Vec<(f32, u32)> = (0..c.ws.len())
        .filter(|&i| c.ws[i] >= thr && c.ws[i] > 0.0)
        .map(|i| (c.ws[i], c.id(i)))
        .collect();
    v.sort_unstable_by(by_weight_desc);
    prefix_end(&v, start, target)
}

/// Exact cut for any shape: mass per exponent bucket, then from the top down the bucket where
/// the cut falls, then a sort of just that bucket.
fn bucket_prefix_end(c: &Cands, target: f64) -> Option<(f32, u32)> {
    // Four interleaved histograms break the store-to-load dependency between consecutive
    // entries landing in the same bucket.
    let mut mass = vec![[0.0f64; 4]; BUCKETS];
    let chunks = c.ws.chunks_exact(4);
    let rem = chunks.remainder();
    for ch in chunks {
        for j in 0..4 {
            mass[bucket(ch[j])][j] += f64::from(ch[j]);
        }
    }
    for &w in rem {
        mass[bucket(w)][0] += f64::from(w);
    }
    let mut above = 0.0f64;
    let mut cut = None;
    for b in (0..BUCKETS).rev() {
        let m: f64 = mass[b].iter().sum();
        if above + m >= target {
            cut = Some(b);
            break;
        }
        above += m;
    }
    let b = cut?;
    let mut inb: Vec<(f32, u32)> = (0..c.ws.len())
        .filter(|&i| bucket(c.ws[i]) == b && c.ws[i] > 0.0)
        .map(|i| (c.ws[i], c.id(i)))
        .collect();
    inb.sort_unstable_by(by_weight_desc);
    // Rounding between bucket sums and the element-wise walk: take the whole bucket.
    prefix_end(&inb, above, target).or_else(|| inb.last().copied())
}

/// Walks `sorted` (weight-descending) accumulating onto `start`; the first entry at which the
/// total reaches `target`.
fn prefix_end(sorted: &[(f32, u32)], start: f64, target: f64) -> Option<(f32, u32)> {
    let mut cum = start;
    for &e in sorted {
        cum += f64::from(e.0);
        if cum >= target {
            return Some(e);
        }
    }
    None
}

impl SparseDist {
    /// All mass on `id`.
    pub fn one_hot(id: u32) -> Self {
        Self {
            ids: vec![id],
            probs: vec![1.0],
        }
    }

    /// Builds from `(id, weight)` pairs (any order, weights `>= 0`, duplicates summed),
    /// normalizing. Zero weights are dropped. Errors if a weight is negative or not finite, or if
    /// the total is 0 or not finite.
    pub fn from_weights(pairs: impl IntoIterator<Item = (u32, f32)>) -> Result<Self, DistError> {
        let mut v: Vec<(u32, f32)> = Vec::new();
        for (id, weight) in pairs {
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(DistError::BadWeight { id, weight });
            }
            if weight > 0.0 {
                v.push((id, weight));
            }
        }
        v.sort_unstable_by_key(|e| e.0);
        let mut ids: Vec<u32> = Vec::with_capacity(v.len());
        let mut ws: Vec<f64> = Vec::with_capacity(v.len());
        for (id, w) in v {
            match (ids.last(), ws.last_mut()) {
                (Some(&last), Some(acc)) if last == id => *acc += f64::from(w),
                _ => {
                    ids.push(id);
                    ws.push(f64::from(w));
                }
            }
        }
        let total: f64 = ws.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return Err(DistError::BadTotal(total));
        }
        let mut probs = Vec::with_capacity(ws.len());
        let mut keep = 0;
        for i in 0..ids.len() {
            let p = (ws[i] / total) as f32;
            if p > 0.0 {
                ids[keep] = ids[i];
                probs.push(p);
                keep += 1;
            }
        }
        ids.truncate(keep);
        Ok(Self { ids, probs })
    }

    /// The distribution the sampler draws from for `logits` under `params`.
    ///
    /// - greedy (`temperature == 0`): `one_hot(argmax)`, ties to the lowest id; O(vocab), no
    ///   allocation beyond the result.
    /// - otherwise `softmax(logits / temperature)` (max-subtracted, `exp` in `f32` to ~2 ulp,
    ///   weights below `e^-87` of the maximum dropped, sums in `f64`), then top-k (the k
    ///   largest, ties to the lower id), then top-p (the smallest prefix of the
    ///   probability-sorted list, ties to the lower id, whose mass reaches `top_p` of the top-k
    ///   mass; at least one token), renormalized.
    ///
    /// `+inf` logits are handled as the limit: the mass is shared equally by the `+inf` tokens.
    /// Errors on empty logits, any NaN, all `-inf`, or invalid params.
    pub fn from_logits(logits: &[f32], params: &SamplingParams) -> Result<Self, DistError> {
        params.validate()?;
        if logits.is_empty() {
            return Err(DistError::EmptyLogits);
        }
        let n = logits.len();
        if u32::try_from(n).is_err() {
            return Err(DistError::VocabTooLarge(n));
        }
        let (best, max) = scan_max(logits).map_err(|index| DistError::NanLogit { index })?;
        if max == f32::NEG_INFINITY {
            return Err(DistError::NoMass { vocab: n });
        }
        if params.is_greedy() {
            return Ok(Self::one_hot(best as u32));
        }
        let inv_t = 1.0 / params.temperature;
        let weigher = if max == f32::INFINITY || !inv_t.is_finite() {
            Weigher::Hard { max }
        } else {
            Weigher::Soft { max, inv_t }
        };

        let cands = if params.top_k > 0 && params.top_k < n {
            let mut top = top_k_candidates(logits, params.top_k);
            top.sort_unstable_by_key(|e| e.1);
            Cands {
                ws: top.iter().map(|&(l, _)| weigher.weight(l)).collect(),
                ids: Some(top.into_iter().map(|e| e.1).collect()),
            }
        } else {
            Cands {
                ids: None,
                ws: weigher.weights(logits),
            }
        };
        let sum = sum_f64(&cands.ws);
        if params.top_p < 1.0 {
            let kept = top_p_filter(cands, sum, f64::from(params.top_p));
            let kept_sum = sum_f64(&kept.ws);
            kept.into_dist(kept_sum)
        } else {
            cands.into_dist(sum)
        }
    }

    /// Renames every id `i` to `table[i]`: a distribution over the columns of a vocabulary subset (a
    /// drafter's trimmed LM head) becomes one over token ids. `table` must be strictly ascending, so the
    /// ids stay strictly ascending; errors if an id has no entry.
    pub fn map_ids(mut self, table: &[u32]) -> Result<Self, DistError> {
        debug_assert!(table.windows(2).all(|w| w[0] < w[1]), "table not ascending");
        for id in &mut self.ids {
            *id = *table.get(*id as usize).ok_or(DistError::UnmappedId {
                id: *id,
                len: table.len(),
            })?;
        }
        Ok(self)
    }

    /// Probability of `id` (0 if absent). O(log len).
    pub fn prob(&self, id: u32) -> f32 {
        match self.ids.binary_search(&id) {
            Ok(i) => self.probs[i],
            Err(_) => 0.0,
        }
    }

    /// Token ids with nonzero probability, strictly ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Probabilities aligned with [`Self::ids`].
    pub fn probs(&self) -> &[f32] {
        &self.probs
    }

    /// `(id, prob)` pairs in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids.iter().copied().zip(self.probs.iter().copied())
    }

    /// Size of the support.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: a `SparseDist` has at least one token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Most likely token, lowest id on ties.
    pub fn argmax(&self) -> u32 {
        let (max, _) = max_and_nan(&self.probs);
        let i = self.probs.iter().position(|&p| p == max).unwrap_or(0);
        self.ids.get(i).copied().unwrap_or(0)
    }

    /// The `n` most likely entries, by probability descending (ties: lower id first).
    pub fn top(&self, n: usize) -> Vec<(u32, f32)> {
        if n == 0 {
            return Vec::new();
        }
        let mut v: Vec<(f32, u32)> = self
            .probs
            .iter()
            .copied()
            .zip(self.ids.iter().copied())
            .collect();
        if n < v.len() {
            v.select_nth_unstable_by(n - 1, by_weight_desc);
            v.truncate(n);
        }
        v.sort_unstable_by(by_weight_desc);
        v.into_iter().map(|(p, id)| (id, p)).collect()
    }
}

/// Index of the largest logit; lowest index on ties; NaN never wins (returns 0 for an empty or
/// all-NaN slice). O(len), no allocation.
pub fn argmax(logits: &[f32]) -> u32 {
    let (max, _) = max_and_nan(logits);
    // `max` is `-inf` when there is no non-NaN value above it; `position` then finds the first
    // `-inf`, or nothing (all NaN / empty).
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: None,
        }
    }

    fn assert_valid(d: &SparseDist) {
        assert!(!d.is_empty());
        assert_eq!(d.ids().len(), d.probs().len());
        assert!(d.ids().windows(2).all(|w| w[0] < w[1]), "ids not ascending");
        assert!(d.probs().iter().all(|&p| p > 0.0 && p.is_finite()));
        let s: f64 = d.probs().iter().map(|&p| f64::from(p)).sum();
        assert!((s - 1.0).abs() < 1e-5, "sum {s}");
    }

    #[test]
    fn map_ids_renames_through_an_ascending_table() {
        let d = SparseDist::from_logits(&[0.0, 1.0, 2.0], &params(1.0, 0, 1.0)).unwrap();
        let m = d.clone().map_ids(&[5, 40, 41]).unwrap();
        assert_valid(&m);
        assert_eq!(m.ids(), &[5, 40, 41]);
        assert_eq!(m.probs(), d.probs());
        assert_eq!(
            d.map_ids(&[5, 40]),
            Err(DistError::UnmappedId { id: 2, len: 2 })
        );
    }

    /// Straightforward reference: full softmax, full sorts, prefix.
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        if p.is_greedy() {
            return vec![(argmax(logits), 1.0)];
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        // Same weights and summation as the implementation: this checks selection, not `exp`.
        let w: Vec<f32> = logits
            .iter()
            .map(|&l| exp_nonpos((l - max) * inv_t))
            .collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let total = if p.top_k > 0 && p.top_k < logits.len() {
            order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
            order.truncate(p.top_k);
            order.retain(|&i| logits[i] > f32::NEG_INFINITY);
            order.sort_unstable();
            sum_f64(&order.iter().map(|&i| w[i]).collect::<Vec<_>>())
        } else {
            sum_f64(&w)
        };
        order.retain(|&i| w[i] > 0.0);
        if p.top_p < 1.0 {
            order.sort_by(|&a, &b| w[b].partial_cmp(&w[a]).unwrap().then(a.cmp(&b)));
            let target = f64::from(p.top_p) * total;
            let mut cum = 0.0;
            let mut keep = order.len();
            for (j, &i) in order.iter().enumerate() {
                cum += f64::from(w[i]);
                if cum >= target {
                    keep = j + 1;
                    break;
                }
            }
            order.truncate(keep);
        }
        let s: f64 = order.iter().map(|&i| f64::from(w[i])).sum();
        let mut out: Vec<(u32, f64)> = order
            .iter()
            .map(|&i| (i as u32, f64::from(w[i]) / s))
            .collect();
        out.sort_by_key(|e| e.0);
        out
    }

    #[test]
    fn one_hot_and_accessors() {
        let d = SparseDist::one_hot(7);
        assert_valid(&d);
        assert_eq!(d.ids(), &[7]);
        assert_eq!(d.prob(7), 1.0);
        assert_eq!(d.prob(6), 0.0);
        assert_eq!(d.argmax(), 7);
        assert_eq!(d.len(), 1);
        assert_eq!(d.top(3), vec![(7, 1.0)]);
    }

    #[test]
    fn from_weights_merges_sorts_and_normalizes() {
        let d = SparseDist::from_weights([(5, 1.0), (2, 1.0), (5, 2.0), (9, 0.0)]).unwrap();
        assert_valid(&d);
        assert_eq!(d.ids(), &[2, 5]);
        assert!((d.prob(5) - 0.75).abs() < 1e-7);
        assert_eq!(d.prob(9), 0.0);
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![(2, 0.25), (5, 0.75)]);
    }

    #[test]
    fn from_weights_errors() {
        assert!(matches!(
            SparseDist::from_weights([(1, 0.0), (2, 0.0)]),
            Err(DistError::BadTotal(_))
        ));
        assert!(matches!(
            SparseDist::from_weights(std::iter::empty()),
            Err(DistError::BadTotal(_))
        ));
        let e = SparseDist::from_weights([(1, 1.0), (3, -1.0)]).unwrap_err();
        assert_eq!(
            e,
            DistError::BadWeight {
                id: 3,
                weight: -1.0
            }
        );
        assert!(e.to_string().contains("token id 3"), "{e}");
        assert!(SparseDist::from_weights([(1, f32::NAN)]).is_err());
        assert!(SparseDist::from_weights([(1, f32::INFINITY)]).is_err());
        // Finite weights that overflow f32 when summed still work (summed in f64).
        let d = SparseDist::from_weights([(1, f32::MAX), (1, f32::MAX), (2, f32::MAX)]).unwrap();
        assert!((d.prob(1) - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn greedy_ties_break_to_lowest_id() {
        let logits = [1.0, 3.0, -2.0, 3.0, 3.0];
        let d = SparseDist::from_logits(&logits, &SamplingParams::greedy()).unwrap();
        assert_eq!(d, SparseDist::one_hot(1));
        assert_eq!(argmax(&logits), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 5.0, 5.0]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[]), 0);
        // Greedy ignores top-k/top-p.
        let p = params(0.0, 1, 0.1);
        assert_eq!(
            SparseDist::from_logits(&logits, &p).unwrap(),
            SparseDist::one_hot(1)
        );
    }

    #[test]
    fn temperature_scales_softmax() {
        let logits = [0.0, 1.0_f32.ln(), 2.0_f32.ln(), 4.0_f32.ln()];
        let d = SparseDist::from_logits(&logits, &params(1.0, 0, 1.0)).unwrap();
        assert_valid(&d);
        for (id, want) in [
            (0, 1.0 / 8.0),
            (1, 1.0 / 8.0),
            (2, 2.0 / 8.0),
            (3, 4.0 / 8.0),
        ] {
            assert!((d.prob(id) - want).abs() < 1e-6, "{id}: {}", d.prob(id));
        }
        // T = 2 takes square roots of the odds: weights 1, 1, sqrt2, 2.
        let d = SparseDist::from_logits(&logits, &params(2.0, 0, 1.0)).unwrap();
        let z = 1.0 + 1.0 + 2f32.sqrt() + 2.0;
        assert!((d.prob(3) - 2.0 / z).abs() < 1e-6);
        assert!((d.prob(2) - 2f32.sqrt() / z).abs() < 1e-6);
        // T = 0.5 squares them: 1, 1, 4, 16.
        let d = SparseDist::from_logits(&logits, &params(0.5, 0, 1.0)).unwrap();
        assert!((d.prob(3) - 16.0 / 22.0).abs() < 1e-6);
        // Large logits do not overflow (max-subtracted).
        let d = SparseDist::from_logits(&[1000.0, 1000.0, 999.0], &params(1.0, 0, 1.0)).unwrap();
        assert_valid(&d);
        assert!((d.prob(0) - d.prob(1)).abs() < 1e-7);
        // Very high temperature is close to uniform.
        let d = SparseDist::from_logits(&[0.0, 1.0, 2.0], &params(100.0, 0, 1.0)).unwrap();
        assert!(d.probs().iter().all(|&p| (p - 1.0 / 3.0).abs() < 0.01));
    }

    #[test]
    fn tiny_temperature_and_infinities_take_the_limit() {
        let logits = [1.0, 5.0, 5.0, 2.0];
        let d = SparseDist::from_logits(&logits, &params(1e-30, 0, 1.0)).unwrap();
        assert_eq!(d.ids(), &[1, 2]);
        assert!((d.prob(1) - 0.5).abs() < 1e-7);
        let d = SparseDist::from_logits(&logits, &params(f32::MIN_POSITIVE / 4.0, 0, 1.0)).unwrap();
        assert_eq!(d.ids(), &[1, 2]);
        let logits = [f32::INFINITY, 0.0, f32::NEG_INFINITY, f32::INFINITY];
        let d = SparseDist::from_logits(&logits, &params(1.0, 0, 1.0)).unwrap();
        assert_eq!(d.ids(), &[0, 3]);
        let d = SparseDist::from_logits(&logits, &params(1.0, 1, 1.0)).unwrap();
        assert_eq!(d, SparseDist::one_hot(0));
        // -inf logits get no mass.
        let d =
            SparseDist::from_logits(&[0.0, f32::NEG_INFINITY, 0.0], &params(1.0, 0, 1.0)).unwrap();
        assert_eq!(d.ids(), &[0, 2]);
    }

    #[test]
    fn top_k_keeps_the_largest_with_low_id_ties() {
        let logits = [0.5, 2.0, 1.0, 2.0, 1.0, -1.0];
        let d = SparseDist::from_logits(&logits, &params(1.0, 3, 1.0)).unwrap();
        assert_valid(&d);
        assert_eq!(d.ids(), &[1, 2, 3]);
        let e2 = 2f32.exp();
        let e1 = 1f32.exp();
        assert!((d.prob(2) - e1 / (2.0 * e2 + e1)).abs() < 1e-6);
        let d = SparseDist::from_logits(&logits, &params(1.0, 1, 1.0)).unwrap();
        assert_eq!(d, SparseDist::one_hot(1));
        // k >= vocab means no truncation.
        let full = SparseDist::from_logits(&logits, &params(1.0, 0, 1.0)).unwrap();
        assert_eq!(
            SparseDist::from_logits(&logits, &params(1.0, 6, 1.0)).unwrap(),
            full
        );
        assert_eq!(
            SparseDist::from_logits(&logits, &params(1.0, 100, 1.0)).unwrap(),
            full
        );
        assert_eq!(full.len(), 6);
        // top-k never selects -inf tokens.
        let d = SparseDist::from_logits(
            &[0.0, f32::NEG_INFINITY, f32::NEG_INFINITY],
            &params(1.0, 2, 1.0),
        )
        .unwrap();
        assert_eq!(d, SparseDist::one_hot(0));
    }

    #[test]
    fn top_p_edge_cases() {
        // probs ~0.5, 0.25, 0.125, 0.125
        let logits = [4.0f32.ln(), 2.0f32.ln(), 0.0, 0.0];
        let p = |top_p| SparseDist::from_logits(&logits, &params(1.0, 0, top_p)).unwrap();
        // Tiny top_p keeps exactly the argmax.
        assert_eq!(p(1e-6), SparseDist::one_hot(0));
        assert_eq!(p(0.49), SparseDist::one_hot(0));
        // Just above the first token's mass: the second is needed.
        let d = p(0.51);
        assert_eq!(d.ids(), &[0, 1]);
        assert!((d.prob(0) - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(p(0.74).ids(), &[0, 1]);
        // Ties at the boundary: the lower id is taken first.
        assert_eq!(p(0.76).ids(), &[0, 1, 2]);
        // Close to 1 keeps all.
        assert_eq!(p(0.999).ids(), &[0, 1, 2, 3]);
        assert_eq!(p(1.0).ids(), &[0, 1, 2, 3]);
        // top-p applies to the top-k renormalized mass: top-2 gives 2/3, 1/3.
        let d = SparseDist::from_logits(&logits, &params(1.0, 2, 0.6)).unwrap();
        assert_eq!(d, SparseDist::one_hot(0));
        let d = SparseDist::from_logits(&logits, &params(1.0, 2, 0.7)).unwrap();
        assert_eq!(d.ids(), &[0, 1]);
        // All-equal logits: exact weights. A prefix reaching top_p exactly stops there
        // ("mass >= top_p"), and ties go to the lower ids.
        let flat = [0.0f32; 4];
        let d = SparseDist::from_logits(&flat, &params(1.0, 0, 0.5)).unwrap();
        assert_eq!(d.ids(), &[0, 1]);
        assert_eq!(d.probs(), &[0.5, 0.5]);
        let d = SparseDist::from_logits(&flat, &params(1.0, 0, 0.25)).unwrap();
        assert_eq!(d, SparseDist::one_hot(0));
        let d = SparseDist::from_logits(&flat, &params(1.0, 0, 0.2500001)).unwrap();
        assert_eq!(d.ids(), &[0, 1]);
    }

    #[test]
    fn top_p_on_large_flat_and_peaky_vocabularies() {
        // Flat: the threshold levels do not hold enough mass; falls through to the full sort.
        let n = 5000;
        let flat: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        let p = params(1.0, 0, 0.9);
        let d = SparseDist::from_logits(&flat, &p).unwrap();
        assert_valid(&d);
        let r = reference(&flat, &p);
        assert_eq!(
            d.ids(),
            r.iter().map(|e| e.0).collect::<Vec<_>>().as_slice()
        );
        // Peaky: a few tokens hold the mass.
        let peaky: Vec<f32> = (0..n)
            .map(|i| {
                if i % 1000 == 3 {
                    10.0
                } else {
                    -(i as f32) * 1e-3
                }
            })
            .collect();
        let d = SparseDist::from_logits(&peaky, &p).unwrap();
        assert_eq!(d.ids(), &[3, 1003, 2003, 3003, 4003]);
    }

    #[test]
    fn nan_and_degenerate_logits_error() {
        let e = SparseDist::from_logits(&[0.0, f32::NAN, 1.0], &params(1.0, 0, 1.0)).unwrap_err();
        assert_eq!(e, DistError::NanLogit { index: 1 });
        assert!(e.to_string().contains("NaN"));
        // Greedy also rejects NaN.
        assert!(SparseDist::from_logits(&[f32::NAN], &SamplingParams::greedy()).is_err());
        assert_eq!(
            SparseDist::from_logits(&[], &SamplingParams::greedy()).unwrap_err(),
            DistError::EmptyLogits
        );
        assert!(matches!(
            SparseDist::from_logits(&[f32::NEG_INFINITY; 3], &params(1.0, 0, 1.0)),
            Err(DistError::NoMass { vocab: 3 })
        ));
        let e = SparseDist::from_logits(&[0.0], &params(-1.0, 0, 1.0)).unwrap_err();
        assert!(matches!(e, DistError::Params(ParamError::Temperature(_))));
        assert!(e.to_string().contains("temperature"));
    }

    #[test]
    fn top_returns_sorted_prefix() {
        let d =
            SparseDist::from_weights([(0, 1.0), (1, 3.0), (2, 3.0), (3, 2.0), (4, 0.5)]).unwrap();
        let t = d.top(3);
        assert_eq!(t.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(t.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(d.top(0), vec![]);
        assert_eq!(d.top(10).len(), 5);
        assert_eq!(d.argmax(), 1);
    }

    /// Timing of the hot path at a Qwen-sized vocabulary. Run with
    /// `cargo test -p specd-core --release -- --ignored --nocapture perf_`.
    #[test]
    #[ignore = "timing report, not a check"]
    fn perf_from_logits_vocab_151936() {
        use crate::sampling::Sampler;
        let mut s = Sampler::new(Some(0));
        // Roughly LLM-shaped: Gaussian bulk (sd 2.5) plus a handful of strong candidates.
        let mut logits: Vec<f32> = (0..151_936)
            .map(|_| {
                let (u1, u2) = (s.uniform().max(1e-12), s.uniform());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 2.5) as f32
            })
            .collect();
        for (i, id) in [17usize, 900, 4242, 150_000].iter().enumerate() {
            logits[*id] = 14.0 - i as f32;
        }
        let cases = [
            ("greedy", params(0.0, 0, 1.0)),
            ("t=0.8 full", params(0.8, 0, 1.0)),
            ("t=0.8 top_k=50", params(0.8, 50, 1.0)),
            ("t=0.8 top_p=0.95", params(0.8, 0, 0.95)),
            ("t=1.5 top_p=0.95", params(1.5, 0, 0.95)),
            ("t=0.8 k=50 p=0.9", params(0.8, 50, 0.9)),
        ];
        for (name, p) in cases {
            let mut len = 0;
            let mut best = f64::INFINITY;
            for _ in 0..50 {
                let t0 = std::time::Instant::now();
                len = SparseDist::from_logits(std::hint::black_box(&logits), &p)
                    .unwrap()
                    .len();
                best = best.min(t0.elapsed().as_secs_f64() * 1e3);
            }
            println!("{name:>20}: {best:.3} ms/call (min of 50), support {len}");
        }
    }

    #[test]
    fn exp_nonpos_is_accurate() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-87.5), 0.0);
        assert!(exp_nonpos(-87.0) > 0.0);
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpos(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
    }

    #[test]
    fn top_k_buffer_handles_adversarial_orders() {
        // Ascending logits force a buffer cut every k entries; descending never pushes after the
        // first cut; many ties exercise the id tie-break across cuts.
        let n = 3000;
        let asc: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let desc: Vec<f32> = asc.iter().rev().copied().collect();
        let ties: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
        for logits in [asc, desc, ties] {
            for k in [1, 2, 7, 63, 64, 65, 200, 2999] {
                let p = params(1.0, k, 1.0);
                let d = SparseDist::from_logits(&logits, &p).unwrap();
                let want: Vec<u32> = reference(&logits, &p).iter().map(|e| e.0).collect();
                assert_eq!(d.ids(), want.as_slice(), "k {k}");
            }
        }
    }

    /// Logits drawn from a small set of values so ties are common.
    fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![
                (-8i32..8).prop_map(|x| x as f32 * 0.5),
                (-20.0f32..20.0),
                Just(f32::NEG_INFINITY),
            ],
            1..60,
        )
        .prop_filter("needs a finite logit", |v| v.iter().any(|x| x.is_finite()))
    }

    proptest! {
        #[test]
        fn prop_from_weights_is_a_distribution(
            pairs in prop::collection::vec((0u32..50, 0.0f32..10.0), 1..40)
        ) {
            prop_assume!(pairs.iter().any(|p| p.1 > 0.0));
            let d = SparseDist::from_weights(pairs.clone()).unwrap();
            assert_valid(&d);
            let total: f64 = pairs.iter().map(|p| f64::from(p.1)).sum();
            for id in 0..50u32 {
                let w: f64 = pairs.iter().filter(|p| p.0 == id).map(|p| f64::from(p.1)).sum();
                prop_assert!((f64::from(d.prob(id)) - w / total).abs() < 1e-5);
            }
        }

        #[test]
        fn prop_from_logits_matches_reference(
            logits in logits_strategy(),
            temperature in prop_oneof![Just(0.0f32), 0.05f32..5.0],
            top_k in prop_oneof![Just(0usize), 1usize..70],
            top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
        ) {
            let p = params(temperature, top_k, top_p);
            let d = SparseDist::from_logits(&logits, &p).unwrap();
            assert_valid(&d);
            if top_k > 0 {
                prop_assert!(d.len() <= top_k);
            }
            if p.is_greedy() {
                prop_assert_eq!(d.clone(), SparseDist::one_hot(argmax(&logits)));
            }
            let r = reference(&logits, &p);
            let want_ids: Vec<u32> = r.iter().map(|e| e.0).collect();
            prop_assert_eq!(d.ids(), want_ids.as_slice());
            for (id, want) in r {
                prop_assert!((f64::from(d.prob(id)) - want).abs() < 1e-5);
            }
        }

        #[test]
        fn prop_argmax_is_max(logits in prop::collection::vec(-1e6f32..1e6, 1..100)) {
            let a = argmax(&logits) as usize;
            prop_assert!(logits.iter().all(|&l| l <= logits[a]));
            prop_assert!(logits[..a].iter().all(|&l| l < logits[a]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn prop_large_vocab_matches_reference(
            logits in prop::collection::vec(
                prop_oneof![(-6i32..6).prop_map(|x| x as f32), -12.0f32..12.0],
                2049..4000,
            ),
            temperature in 0.3f32..3.0,
            top_k in prop_oneof![Just(0usize), 1usize..300],
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
        ) {
            let p = params(temperature, top_k, top_p);
            let d = SparseDist::from_logits(&logits, &p).unwrap();
            assert_valid(&d);
            let want: Vec<u32> = reference(&logits, &p).iter().map(|e| e.0).collect();
            prop_assert_eq!(d.ids(), want.as_slice());
        }
    }
}
