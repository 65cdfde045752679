//! Adaptive speculation length: how many tokens to draft per step (the cost model of OSD /
//! "optimal speculation length" analyses).
//!
//! Owns [`CostModel`] (measured draft and verify latencies on one device, with interpolation to
//! unmeasured draft counts) and [`SpecLenController`] (per-sequence acceptance-rate estimate and
//! the choice of `k` maximizing expected tokens per millisecond). It does not time anything
//! itself: callers measure and report milliseconds. It does not verify tokens ([`crate::verify`]).

/// Weight of a new measurement in the cost model's exponential moving averages.
pub const COST_EMA_WEIGHT: f64 = 0.2;
/// Slope prior when only one verify bucket is measured: each extra draft token costs this
/// fraction of the plain decode step.
pub const PRIOR_VERIFY_SLOPE: f64 = 0.3;
/// Half-life, in recorded speculation steps, of the acceptance statistics.
pub const ALPHA_HALF_LIFE_STEPS: f64 = 16.0;
/// Prior acceptance rate before any step is recorded.
pub const PRIOR_ALPHA: f64 = 0.6;
/// Weight of the prior, in steps.
pub const PRIOR_STEPS: f64 = 2.0;
/// While the best choice stays 0, a probe step drafts a few tokens anyway, first after this many steps,
/// then after twice as many each time a probe did not bring k back (a probe of a model drafter costs
/// a catch-up forward over every token since the last one).
pub const PROBE_EVERY: usize = 16;
/// Longest interval between probes.
pub const MAX_PROBE_EVERY: usize = 256;
/// A draft length must promise this much more than plain decoding's tokens per ms to be chosen: the
/// acceptance estimate trails the text (a smoothed average), so a length that barely pays by it tends to
/// lose once the predictable stretch that raised it has ended (measured on prose with the Qwen 0.5B
/// drafter: 0.87x of plain decoding without a margin).
pub const DRAFT_MARGIN: f64 = 0.10;
/// Draft count of a probe step (clamped to `max_k`).
pub const PROBE_K: usize = 2;
/// Draft count used while costs are not yet measured (clamped to `max_k`).
pub const EXPLORE_K: usize = 4;

fn ema(old: Option<f64>, new: f64) -> f64 {
    match old {
        None => new,
        Some(o) => o + COST_EMA_WEIGHT * (new - o),
    }
}

/// Measured costs on one device: exponential moving averages of draft time per drafted token
/// (ms) and of verify time per step as a function of the number of drafts `k` (0 = plain decode
/// step).
///
/// Unmeasured `k` are estimated by a least-squares line through the measured buckets `(k, ms)`
/// (slope clamped to `>= 0`, estimates floored at a quarter of the smallest measurement); with a
/// single measured bucket, by a line of slope `0.3 * t(0)` through it; with none, unknown.
#[derive(Clone, Debug)]
pub struct CostModel {
    draft_ms_per_token: Option<f64>,
    verify_ms: Vec<Option<f64>>,
}

impl CostModel {
    /// An empty model with buckets for `k` in `0..=max_k` (larger `k` are accepted too).
    pub fn new(max_k: usize) -> Self {
        Self {
            draft_ms_per_token: None,
            verify_ms: vec![None; max_k + 1],
        }
    }

    /// Records that drafting `tokens` tokens took `ms` (ignored if `tokens == 0` or `ms` is not a
    /// finite non-negative number).
    pub fn record_draft(&mut self, tokens: usize, ms: f64) {
        if tokens == 0 || !(ms.is_finite() && ms >= 0.0) {
            return;
        }
        let per = ms / tokens as f64;
        self.draft_ms_per_token = Some(ema(self.draft_ms_per_token, per));
    }

    /// Records that a verify step with `k` drafts took `ms` (ignored if `ms` is not a finite
    /// non-negative number).
    pub fn record_verify(&mut self, k: usize, ms: f64) {
        if !(ms.is_finite() && ms >= 0.0) {
            return;
        }
        if k >= self.verify_ms.len() {
            self.verify_ms.resize(k + 1, None);
        }
        self.verify_ms[k] = Some(ema(self.verify_ms[k], ms));
    }

    /// Average draft time per drafted token, if measured.
    pub fn draft_ms_per_token(&self) -> Option<f64> {
        self.draft_ms_per_token
    }

    /// Verify time of a step with `k` drafts: measured, or estimated from the measured buckets;
    /// `None` when nothing is measured.
    pub fn verify_ms(&self, k: usize) -> Option<f64> {
        if let Some(&Some(v)) = self.verify_ms.get(k) {
            return Some(v);
        }
        let pts: Vec<(f64, f64)> = self
            .verify_ms
            .iter()
            .enumerate()
            .filter_map(|(k, v)| v.map(|v| (k as f64, v)))
            .collect();
        let x = k as f64;
        match pts.as_slice() {
            [] => None,
            &[(k0, v0)] => {
                let t0 = v0 / (1.0 + PRIOR_VERIFY_SLOPE * k0);
                Some(t0 * (1.0 + PRIOR_VERIFY_SLOPE * x))
            }
            _ => {
                let n = pts.len() as f64;
                let mk = pts.iter().map(|p| p.0).sum::<f64>() / n;
                let mv = pts.iter().map(|p| p.1).sum::<f64>() / n;
                let sxx: f64 = pts.iter().map(|p| (p.0 - mk) * (p.0 - mk)).sum();
                let sxy: f64 = pts.iter().map(|p| (p.0 - mk) * (p.1 - mv)).sum();
                // sxx > 0: at least two distinct k.
                let slope = (sxy / sxx).max(0.0);
                let intercept = mv - slope * mk;
                let floor = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) * 0.25;
                Some((intercept + slope * x).max(floor))
            }
        }
    }

    /// Costs used when timings must not steer decisions (seeded requests must be reproducible): a draft
    /// token costs a quarter of a decode step, each verified position 0.3 of one.
    pub fn nominal(max_k: usize) -> Self {
        let mut c = CostModel::new(max_k);
        c.record_draft(1, 0.25);
        c.record_verify(0, 1.0);
        c.record_verify(4, 2.2);
        c
    }

    /// Verify cost of `k = 0..=max_k` drafts as multiples of a plain decode step (entry 0 is 1), from
    /// the measurements, plus `overhead_ms` per drafting step (a drafter's network hop); a line of
    /// slope 0.3 where nothing is measured yet.
    pub fn relative_verify_costs(&self, max_k: usize, overhead_ms: f64) -> Vec<f64> {
        let base = self.verify_ms(0).filter(|t| *t > 0.0);
        (0..=max_k)
            .map(|k| match (base, self.verify_ms(k)) {
                (Some(_), _) if k == 0 => 1.0,
                (Some(t0), Some(tk)) => ((tk + overhead_ms) / t0).max(1.0),
                _ => 1.0 + 0.3 * k as f64,
            })
            .collect()
    }

    /// Cost in ms of a step drafting `k` tokens: `k * draft_ms_per_token + verify_ms(k)`
    /// (`k == 0` needs no draft measurement).
    pub fn step_ms(&self, k: usize) -> Option<f64> {
        let v = self.verify_ms(k)?;
        if k == 0 {
            return Some(v);
        }
        Some(k as f64 * self.draft_ms_per_token? + v)
    }
}

/// A batched forward's time as a line in the rows it feeds, `t = a + b * rows`, fitted online with
/// exponential forgetting: what a target knows about its own cost at the batch sizes it runs.
///
/// Its use is [`RowCostModel::draft_row_cost`]: in a batch of `n` decoding sequences, one more verified row
/// costs `b` while a sequence's share of a plain step is `a / n + b`, so a draft row is worth its
/// price only if it is accepted with at least that ratio. Alone (`n = 1`) that is the familiar "an extra
/// row costs 0.3 of a step"; on a busy target it approaches 1 and speculation backs off by itself.
#[derive(Clone, Debug, Default)]
pub struct RowCostModel {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

/// Weight kept per new observation (a half-life of about 35 forwards).
const ROW_COST_DECAY: f64 = 0.98;

impl RowCostModel {
    /// Records that a forward feeding `rows` new rows took `ms`.
    pub fn record(&mut self, rows: usize, ms: f64) {
        if rows == 0 || !(ms.is_finite() && ms >= 0.0) {
            return;
        }
        let x = rows as f64;
        self.w = self.w * ROW_COST_DECAY + 1.0;
        self.sx = self.sx * ROW_COST_DECAY + x;
        self.sy = self.sy * ROW_COST_DECAY + ms;
        self.sxx = self.sxx * ROW_COST_DECAY + x * x;
        self.sxy = self.sxy * ROW_COST_DECAY + x * ms;
    }

    /// The fitted `(a, b)` in ms; `None` before any record. Without enough spread in the row counts the
    /// slope is the prior `PRIOR_VERIFY_SLOPE` of a one-row forward.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.w <= 0.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let var = self.sxx / self.w - mx * mx;
        let b = if var > 0.25 {
            ((self.sxy / self.w - mx * my) / var).max(0.0)
        } else {
            // t(mx) = my with t(r) = t1 * (1 - s + s * r).
            let t1 = my / (1.0 - PRIOR_VERIFY_SLOPE + PRIOR_VERIFY_SLOPE * mx);
            PRIOR_VERIFY_SLOPE * t1
        };
        let a = (my - b * mx).max(0.0);
        Some((a, b))
    }

    /// The cost of one more verified row relative to one sequence's share of a plain step, in a batch of
    /// `n` decoding sequences (see the type's docs); `None` before any record.
    pub fn draft_row_cost(&self, n: usize) -> Option<f64> {
        let (a, b) = self.fit()?;
        let share = a / n.max(1) as f64 + b;
        (share > 0.0).then(|| (b / share).clamp(0.0, 1.0))
    }
}

/// Expected tokens emitted by a step with `k` drafts when each draft is accepted independently
/// with probability `a`: `(1 - a^(k+1)) / (1 - a)` (`k + 1` when `a == 1`).
pub fn expected_tokens(a: f64, k: usize) -> f64 {
    let a = a.clamp(0.0, 1.0);
    if a >= 1.0 {
        return (k + 1) as f64;
    }
    (1.0 - a.powi(k as i32 + 1)) / (1.0 - a)
}

/// Per-sequence acceptance statistics and the choice of the number of drafts `k`.
#[derive(Clone, Debug)]
pub struct SpecLenController {
    max_k: usize,
    fixed: Option<usize>,
    /// Decayed count of accepted draft tokens.
    accepted: f64,
    /// Decayed count of rejection events.
    rejections: f64,
    /// Consecutive `choose` calls whose best choice was 0.
    zero_streak: usize,
    /// Current interval between probes.
    probe_every: usize,
}

impl SpecLenController {
    /// `fixed: Some(k)` pins `k` (clamped to `max_k`); `None` adapts.
    pub fn new(max_k: usize, fixed: Option<usize>) -> Self {
        Self {
            max_k,
            fixed,
            accepted: 0.0,
            rejections: 0.0,
            zero_streak: 0,
            probe_every: PROBE_EVERY,
        }
    }

    /// The controller for a new weights version of the same drafter: the acceptance statistics carry
    /// over (the new version is trained from this one), and the next choice of 0 is a probe, so a
    /// drafter that had been switched off is measured again at once instead of after up to
    /// `MAX_PROBE_EVERY` steps.
    pub fn for_new_version(&self) -> Self {
        Self {
            zero_streak: PROBE_EVERY.saturating_sub(1),
            probe_every: PROBE_EVERY,
            ..self.clone()
        }
    }

    /// Largest `k` this controller returns.
    pub fn max_k(&self) -> usize {
        self.max_k
    }

    /// Acceptance-rate estimate: the geometric MLE `accepted / (accepted + rejections)` over
    /// recorded steps, exponentially decayed (half-life 16 steps), with a prior of 0.6 weighing
    /// as much as 2 steps (3 accepted tokens and 2 rejections).
    pub fn alpha(&self) -> f64 {
        let prior_acc = PRIOR_STEPS * PRIOR_ALPHA / (1.0 - PRIOR_ALPHA);
        let prior_rej = PRIOR_STEPS;
        (self.accepted + prior_acc) / (self.accepted + self.rejections + prior_acc + prior_rej)
    }

    /// Records one step: `drafted` tokens, `accepted` of them (clamped to `drafted`).
    /// `accepted < drafted` is one rejection event. Steps with no drafts carry no information and
    /// are ignored (they do not decay the statistics either).
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        let accepted = accepted.min(drafted);
        let decay = 0.5f64.powf(1.0 / ALPHA_HALF_LIFE_STEPS);
        self.accepted = self.accepted * decay + accepted as f64;
        self.rejections = self.rejections * decay + if accepted < drafted { 1.0 } else { 0.0 };
    }

    /// The `k` in `0..=max_k` maximizing expected tokens per ms,
    /// `expected_tokens(alpha, k) / (k * draft_ms_per_token + verify_ms(k))` (ties: smaller `k`), or 0
    /// when the best does not beat plain decoding by [`DRAFT_MARGIN`].
    ///
    /// Returns `min(max_k, 4)` while costs are unmeasured. While the best choice stays 0, every
    /// 16th consecutive call returns a probe `min(2, max_k)` so acceptance keeps being measured.
    /// A pinned `k` is returned as is (clamped).
    pub fn choose(&mut self, costs: &CostModel) -> usize {
        if let Some(k) = self.fixed {
            return k.min(self.max_k);
        }
        if costs.draft_ms_per_token().is_none() || costs.verify_ms(0).is_none() {
            return EXPLORE_K.min(self.max_k);
        }
        let a = self.alpha();
        let mut best = 0usize;
        let mut best_rate = f64::NEG_INFINITY;
        let mut plain_rate = None;
        for k in 0..=self.max_k {
            let Some(cost) = costs.step_ms(k) else {
                continue;
            };
            let rate = expected_tokens(a, k) / cost.max(1e-9);
            if k == 0 {
                plain_rate = Some(rate);
            }
            if rate > best_rate {
                best = k;
                best_rate = rate;
            }
        }
        if plain_rate.is_some_and(|p| best_rate < p * (1.0 + DRAFT_MARGIN)) {
            best = 0;
        }
        if best == 0 {
            self.zero_streak += 1;
            if self.zero_streak >= self.probe_every {
                self.zero_streak = 0;
                self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
                return PROBE_K.min(self.max_k);
            }
        } else {
            self.zero_streak = 0;
            self.probe_every = PROBE_EVERY;
        }
        best
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn a_new_version_keeps_the_estimate_and_probes_at_once() {
        let mut costs = CostModel::new(8);
        for _ in 0..20 {
            costs.record_draft(1, 30.0);
            costs.record_verify(1, 10.0);
            costs.record_verify(2, 11.0);
        }
        let mut c = SpecLenController::new(8, None);
        for _ in 0..40 {
            c.record(2, 0);
        }
        // Switched off, and probing ever more rarely.
        for _ in 0..100 {
            c.choose(&costs);
        }
        let fresh = c.for_new_version();
        assert_eq!(fresh.alpha(), c.alpha());
        let mut fresh = fresh;
        assert_eq!(
            fresh.choose(&costs),
            PROBE_K.min(8),
            "the first zero choice is a probe"
        );
    }
    use crate::sampling::Sampler;
    use proptest::prelude::*;

    fn costs(draft_per_token: f64, verify0: f64, verify_slope: f64, max_k: usize) -> CostModel {
        let mut c = CostModel::new(max_k);
        c.record_draft(4, 4.0 * draft_per_token);
        for k in [0, max_k] {
            c.record_verify(k, verify0 + verify_slope * k as f64);
        }
        c
    }

    /// Accepted count of a step drafting `k` tokens with per-token acceptance `a`.
    fn simulate(s: &mut Sampler, a: f64, k: usize) -> usize {
        (0..k).take_while(|_| s.uniform() < a).count()
    }

    #[test]
    fn row_cost_model_fits_and_backs_off_with_batch_size() {
        let mut m = RowCostModel::default();
        assert!(m.draft_row_cost(1).is_none());
        // t = 20 + 10 * rows.
        for rows in [1, 2, 5, 9, 3, 1, 4] {
            m.record(rows, 20.0 + 10.0 * rows as f64);
        }
        let (a, b) = m.fit().unwrap();
        assert!(
            (a - 20.0).abs() < 1e-6 && (b - 10.0).abs() < 1e-6,
            "{a} {b}"
        );
        let alone = m.draft_row_cost(1).unwrap();
        let busy = m.draft_row_cost(8).unwrap();
        assert!((alone - 10.0 / 30.0).abs() < 1e-9);
        assert!((busy - 10.0 / 12.5).abs() < 1e-9);
        // One row count only: the prior slope.
        let mut flat = RowCostModel::default();
        flat.record(1, 30.0);
        flat.record(1, 30.0);
        let (a, b) = flat.fit().unwrap();
        assert!(
            (a + b - 30.0).abs() < 1e-9 && (b - 9.0).abs() < 1e-9,
            "{a} {b}"
        );
    }

    #[test]
    fn cost_model_interpolates() {
        let mut c = CostModel::new(8);
        assert_eq!(c.verify_ms(0), None);
        assert_eq!(c.draft_ms_per_token(), None);
        assert_eq!(c.step_ms(0), None);
        // One bucket at k = 2: t(0) = 16 / 1.6 = 10, slope 3 ms per token.
        c.record_verify(2, 16.0);
        assert!((c.verify_ms(0).unwrap() - 10.0).abs() < 1e-9);
        assert!((c.verify_ms(2).unwrap() - 16.0).abs() < 1e-9);
        assert!((c.verify_ms(5).unwrap() - 25.0).abs() < 1e-9);
        // Two buckets: the line through them.
        let mut c = CostModel::new(8);
        c.record_verify(0, 20.0);
        c.record_verify(4, 24.0);
        assert!((c.verify_ms(2).unwrap() - 22.0).abs() < 1e-9);
        assert!((c.verify_ms(8).unwrap() - 28.0).abs() < 1e-9);
        assert!((c.verify_ms(12).unwrap() - 32.0).abs() < 1e-9);
        assert_eq!(c.verify_ms(0), Some(20.0));
        // Three points: least squares, measured buckets returned as measured.
        let mut c3 = CostModel::new(8);
        c3.record_verify(0, 20.0);
        c3.record_verify(4, 24.0);
        c3.record_verify(8, 29.0);
        let slope = 36.0 / 32.0;
        let want6 = 24.0 + 1.0 / 3.0 + slope * 2.0;
        assert!((c3.verify_ms(6).unwrap() - want6).abs() < 1e-9);
        assert_eq!(c3.verify_ms(8), Some(29.0));
        // Step cost adds drafting.
        c3.record_draft(3, 6.0);
        assert_eq!(c3.draft_ms_per_token(), Some(2.0));
        assert!((c3.step_ms(4).unwrap() - (8.0 + 24.0)).abs() < 1e-9);
        assert_eq!(c3.step_ms(0), Some(20.0));
    }

    #[test]
    fn cost_model_ema_and_guards() {
        let mut c = CostModel::new(2);
        c.record_verify(0, 10.0);
        c.record_verify(0, 20.0);
        assert!((c.verify_ms(0).unwrap() - 12.0).abs() < 1e-9);
        c.record_verify(0, f64::NAN);
        c.record_verify(0, -1.0);
        assert!((c.verify_ms(0).unwrap() - 12.0).abs() < 1e-9);
        c.record_draft(0, 5.0);
        assert_eq!(c.draft_ms_per_token(), None);
        c.record_draft(2, 4.0);
        c.record_draft(1, 12.0);
        assert!((c.draft_ms_per_token().unwrap() - 4.0).abs() < 1e-9);
        // Buckets beyond max_k grow the model.
        c.record_verify(5, 30.0);
        assert_eq!(c.verify_ms(5), Some(30.0));
        // A negative fitted slope is clamped to flat.
        let mut c = CostModel::new(4);
        c.record_verify(0, 20.0);
        c.record_verify(4, 10.0);
        assert_eq!(c.verify_ms(2), Some(15.0));
        assert_eq!(c.verify_ms(100), Some(15.0));
        // Steep extrapolation downward is floored.
        let mut c = CostModel::new(8);
        c.record_verify(6, 10.0);
        c.record_verify(8, 30.0);
        assert_eq!(c.verify_ms(0), Some(2.5));
    }

    #[test]
    fn a_length_must_beat_plain_decoding_by_the_margin() {
        // Free drafts, one draft at most: rate(1) / rate(0) = (1 + alpha) / (1 + slope / 10).
        let controller = || {
            let mut c = SpecLenController::new(1, None);
            for _ in 0..64 {
                c.record(1, 1);
                c.record(1, 0);
            }
            c
        };
        let a = controller().alpha();
        assert!(a > 0.2 && a < 0.8, "{a}");
        let slope_for = |gain: f64| 10.0 * ((1.0 + a) / gain - 1.0);
        let pays = costs(0.0, 10.0, slope_for(1.0 + 1.5 * DRAFT_MARGIN), 1);
        assert_eq!(controller().choose(&pays), 1);
        let marginal = costs(0.0, 10.0, slope_for(1.0 + 0.5 * DRAFT_MARGIN), 1);
        assert_eq!(controller().choose(&marginal), 0);
    }

    #[test]
    fn alpha_tracks_acceptance() {
        let mut c = SpecLenController::new(8, None);
        assert!((c.alpha() - PRIOR_ALPHA).abs() < 1e-12);
        c.record(0, 0);
        assert!((c.alpha() - PRIOR_ALPHA).abs() < 1e-12);
        let mut s = Sampler::new(Some(1));
        for _ in 0..300 {
            let acc = simulate(&mut s, 0.9, 6);
            c.record(6, acc);
        }
        assert!((c.alpha() - 0.9).abs() < 0.06, "{}", c.alpha());
        for _ in 0..300 {
            let acc = simulate(&mut s, 0.3, 6);
            c.record(6, acc);
        }
        assert!((c.alpha() - 0.3).abs() < 0.12, "{}", c.alpha());
        // All-accepted steps push alpha towards 1; over-reported accepts are clamped.
        for _ in 0..200 {
            c.record(4, 9);
        }
        assert!(c.alpha() > 0.95 && c.alpha() < 1.0);
    }

    #[test]
    fn expected_tokens_formula() {
        assert_eq!(expected_tokens(0.0, 5), 1.0);
        assert_eq!(expected_tokens(1.0, 5), 6.0);
        assert!((expected_tokens(0.5, 2) - 1.75).abs() < 1e-12);
        assert_eq!(expected_tokens(0.7, 0), 1.0);
    }

    #[test]
    fn unknown_costs_explore_and_fixed_pins() {
        let mut c = SpecLenController::new(8, None);
        assert_eq!(c.choose(&CostModel::new(8)), 4);
        let mut c = SpecLenController::new(2, None);
        assert_eq!(c.choose(&CostModel::new(2)), 2);
        // Verify measured but drafting not: still exploring.
        let mut m = CostModel::new(8);
        m.record_verify(0, 20.0);
        let mut c = SpecLenController::new(8, None);
        assert_eq!(c.choose(&m), 4);
        let mut c = SpecLenController::new(5, Some(3));
        assert_eq!(c.choose(&costs(100.0, 20.0, 1.0, 5)), 3);
        let mut c = SpecLenController::new(5, Some(9));
        assert_eq!(c.choose(&costs(0.1, 20.0, 1.0, 5)), 5);
    }

    #[test]
    fn high_acceptance_and_cheap_drafts_pick_large_k() {
        let m = costs(0.5, 20.0, 0.5, 8);
        let mut c = SpecLenController::new(8, None);
        let mut s = Sampler::new(Some(2));
        for _ in 0..100 {
            let k = c.choose(&m);
            let acc = simulate(&mut s, 0.9, k);
            c.record(k, acc);
        }
        assert!(c.alpha() > 0.8, "{}", c.alpha());
        assert!(c.choose(&m) >= 6, "{}", c.choose(&m));
        // Moderate draft cost: still well above 0.
        let m = costs(4.0, 20.0, 1.0, 8);
        assert!(c.choose(&m) >= 4);
    }

    #[test]
    fn low_acceptance_or_expensive_drafts_pick_zero() {
        let m = costs(4.0, 20.0, 1.0, 8);
        let mut c = SpecLenController::new(8, None);
        let mut s = Sampler::new(Some(3));
        for _ in 0..100 {
            let k = c.choose(&m).max(1);
            let acc = simulate(&mut s, 0.1, k);
            c.record(k, acc);
        }
        assert!(c.alpha() < 0.25, "{}", c.alpha());
        assert_eq!(c.choose(&m), 0);
        // Even at high acceptance, a draft as slow as the target step is not worth it.
        let slow = costs(30.0, 20.0, 1.0, 8);
        let mut c = SpecLenController::new(8, None);
        for _ in 0..100 {
            c.record(4, simulate(&mut s, 0.9, 4));
        }
        assert!(c.alpha() > 0.8);
        assert_eq!(c.choose(&slow), 0);
    }

    #[test]
    fn probes_at_zero_and_recovers() {
        let m = costs(4.0, 20.0, 1.0, 8);
        let mut c = SpecLenController::new(8, None);
        let mut s = Sampler::new(Some(4));
        // Bad phase: acceptance 0.1 drives k to 0.
        let mut ks = Vec::new();
        for _ in 0..200 {
            let k = c.choose(&m);
            c.record(k, simulate(&mut s, 0.1, k));
            ks.push(k);
        }
        // Few probes, of size PROBE_K, ever rarer: the first interval is PROBE_EVERY, later ones double.
        let tail = &ks[100..];
        let probes = tail.iter().filter(|&&k| k == PROBE_K).count();
        assert!(
            (1..=3).contains(&probes),
            "{probes} probes in 100 steps: {tail:?}"
        );
        let drafted: usize = tail.iter().sum();
        assert!(
            drafted <= 12,
            "drafted {drafted} in the bad phase: {tail:?}"
        );
        // Good phase: acceptance 0.95; probes measure it and k comes back up.
        let mut back_at = None;
        for step in 0..200 {
            let k = c.choose(&m);
            c.record(k, simulate(&mut s, 0.95, k));
            if k >= 4 && back_at.is_none() {
                back_at = Some(step);
            }
        }
        let back_at = back_at.expect("k never came back up");
        assert!(back_at < 100, "took {back_at} steps");
        assert!(c.choose(&m) >= 4);
        assert!(c.alpha() > 0.85);
    }

    #[test]
    fn probe_respects_max_k() {
        let m = costs(100.0, 20.0, 1.0, 1);
        let mut c = SpecLenController::new(1, None);
        // Probes after 16, then 32 more steps.
        let ks: Vec<usize> = (0..48).map(|_| c.choose(&m)).collect();
        assert_eq!(ks.iter().filter(|&&k| k == 1).count(), 2, "{ks:?}");
        assert!(ks.iter().all(|&k| k <= 1));
        let mut c = SpecLenController::new(0, None);
        assert!((0..40).all(|_| c.choose(&m) == 0));
    }

    proptest! {
        #[test]
        fn prop_alpha_in_unit_interval_and_k_in_range(
            steps in prop::collection::vec((0usize..10, 0usize..12), 0..60),
            max_k in 0usize..10,
            d in 0.0f64..50.0,
            v0 in 1.0f64..50.0,
            slope in 0.0f64..5.0,
        ) {
            let m = costs(d, v0, slope, max_k.max(1));
            let mut c = SpecLenController::new(max_k, None);
            for (drafted, accepted) in steps {
                c.record(drafted, accepted);
                let a = c.alpha();
                prop_assert!((0.0..=1.0).contains(&a));
                prop_assert!(c.choose(&m) <= max_k);
            }
        }

        #[test]
        fn prop_verify_estimates_positive_and_exact_on_measured(
            pts in prop::collection::vec((0usize..12, 0.5f64..100.0), 1..6),
            k in 0usize..20,
        ) {
            let mut c = CostModel::new(8);
            for &(kk, ms) in &pts {
                c.record_verify(kk, ms);
            }
            let v = c.verify_ms(k).unwrap();
            prop_assert!(v.is_finite() && v > 0.0);
        }
    }
}
