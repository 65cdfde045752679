//! The distributed speculation loop: one request, driven by the router over its worker streams.
//!
//! Each step: choose k (the OSD cost model over costs the router measures itself, so the network hop
//! is counted; a model-free drafter gets the cost curve and sizes its own proposals), ask the drafter
//! for up to k tokens, send them to the target, which runs one forward over k + 1 positions and applies
//! the rejection rule, then commit the emitted tokens and stream them out.
//!
//! Failures never cost the request: a drafter that errors or stalls is dropped (another one is tried,
//! else decoding goes on target-only); a target that fails is replaced by another target, re-prefilled
//! from every token so far, and the step is retried; with no target left the request ends UNAVAILABLE.
//! Greedy output is unchanged by any of this, because the target's logits are batch-invariant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use specd_coord::Role;
use specd_core::{CostModel, SamplingParams, SpecLenController};
use specd_proto::internal::v1 as pb;
use tonic::Status;

use crate::conn::{ConnError, DrafterConn, TargetConn};
use crate::pool::{Lease, Placed, Pool, Want};

/// Knobs of the loop.
#[derive(Clone, Debug)]
pub struct SpecConfig {
    /// Longest draft the adaptive controller picks.
    pub max_draft_len: usize,
    /// A drafter that does not answer a Propose within this is dropped for the request.
    pub drafter_timeout: Duration,
    /// Time a drafter gets to open a sequence (a model drafter prefills).
    pub drafter_open_timeout: Duration,
    /// A target that does not answer an Open or Step within this is treated as failed.
    pub target_timeout: Duration,
    /// Targets tried per request before giving up with UNAVAILABLE.
    pub max_target_attempts: usize,
    /// How long an admitted request waits for a free target slot when every target is full (within
    /// its deadline) before RESOURCE_EXHAUSTED.
    pub placement_wait: Duration,
    /// Drafters tried per request before going on target-only.
    pub max_drafter_attempts: usize,
    /// Kind used for `drafter: auto`.
    pub auto_kind: String,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            max_draft_len: 8,
            drafter_timeout: Duration::from_secs(2),
            drafter_open_timeout: Duration::from_secs(60),
            target_timeout: Duration::from_secs(120),
            max_target_attempts: 3,
            placement_wait: Duration::from_secs(60),
            max_drafter_attempts: 2,
            auto_kind: "auto".into(),
        }
    }
}

/// Drafter kinds that cost next to nothing and limit their own proposals from the cost curve.
pub fn is_free(kind: &str) -> bool {
    matches!(kind, "ngram" | "auto")
}

/// A validated request, ready to run.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    /// `none`, or a drafter kind (`auto` already resolved by the caller or here).
    pub drafter: String,
    pub draft_len: Option<usize>,
    pub session: Option<String>,
    /// Tokens that end generation (not emitted).
    pub stop_ids: Vec<u32>,
    pub deadline: Option<tokio::time::Instant>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

/// What a request did.
#[derive(Clone, Debug, Default)]
pub struct SpecStats {
    pub drafted: u64,
    pub accepted: u64,
    pub steps: u64,
    pub accepted_per_position: Vec<u32>,
    /// The drafter kind used last, or `none`.
    pub drafter: String,
    /// Router time per step outside the workers (network, serialization, router work), in ms.
    pub overhead_ms: Vec<f64>,
    pub target_failovers: u32,
    pub drafter_failovers: u32,
}

/// What a [`Sink`] made of a batch of emitted tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Leading tokens of the batch that belong to the output: all of them, or those up to and
    /// including the one that completed a stop string. The rest are dropped, so the output (and its
    /// usage count) is the same whatever number of tokens a step happened to accept.
    pub taken: usize,
    /// False to end generation (stop string hit, client gone, output error).
    pub go_on: bool,
}

/// Receives emitted tokens.
pub trait Sink: Send {
    fn push(&mut self, tokens: &[u32]) -> Pushed;
}

/// Costs measured at the router for one drafter kind (what one step really costs from here).
#[derive(Clone, Debug)]
struct KindCosts {
    costs: CostModel,
    /// Round trip of a Propose, ms (EMA).
    propose_ms: Option<f64>,
}

/// Adaptive-k state is kept per (drafter kind, weights version, max k, pinned k): a newly swapped-in
/// version starts from the state of the version it replaced with a probe due at once, so a drafter the
/// controller had switched off is measured again as soon as it has been retrained.
type ControllerKey = (String, String, usize, Option<usize>);

/// What the router learns across requests: costs per drafter kind and the adaptive-k state.
#[derive(Debug, Default)]
pub struct Learned {
    costs: Mutex<HashMap<String, KindCosts>>,
    controllers: Mutex<HashMap<ControllerKey, SpecLenController>>,
}

impl Learned {
    /// The adaptive-k state a request with controller key `key` starts from: a seeded request drafts
    /// from a fresh state (same seed, same output) and leaves what was learned in place for the
    /// others (it does not write back either); any other takes the learned state, or a fresh one.
    fn controller_for(&self, key: &ControllerKey, seeded: bool) -> SpecLenController {
        let (_, _, max_k, pinned) = key;
        let learned = if seeded {
            None
        } else {
            self.take_controller(key)
        };
        learned.unwrap_or_else(|| SpecLenController::new(*max_k, *pinned))
    }

    /// Takes the adaptive-k state of `key`; for a weights version not seen yet, the state of the
    /// version it replaced (same kind and lengths), with a probe due at once.
    fn take_controller(&self, key: &ControllerKey) -> Option<SpecLenController> {
        let mut all = lock(&self.controllers);
        if let Some(c) = all.remove(key) {
            return Some(c);
        }
        let (kind, version, max_k, pinned) = key;
        let older = all
            .keys()
            .find(|(k, v, m, p)| k == kind && v != version && m == max_k && p == pinned)
            .cloned()?;
        all.remove(&older).map(|c| c.for_new_version())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A seed for the n-th (re)opening of a sequence: the request's seed first, then fresh derived ones, so
/// a re-prefilled sequence does not replay random draws that produced its own prefix.
fn attempt_seed(params: &SamplingParams, attempt: u64) -> SamplingParams {
    let mut p = params.clone();
    if attempt > 0 {
        p.seed = p
            .seed
            .map(|s| s ^ attempt.wrapping_mul(0xd6e8_feb8_6659_fd93).rotate_left(17));
    }
    p
}

/// Runs one request to its end.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    pool: &Pool,
    fingerprint: &str,
    context: usize,
    cfg: &SpecConfig,
    learned: &Learned,
    req: &GenRequest,
    sink: &mut (dyn Sink + Send),
) -> Result<(Vec<u32>, Finish, SpecStats), Status> {
    let mut history = req.prompt_ids.clone();
    let mut out: Vec<u32> = Vec::new();
    let mut stats = SpecStats {
        drafter: "none".into(),
        ..SpecStats::default()
    };
    let mut targets = Attempts::new(Role::Target, cfg.max_target_attempts);
    let mut target = open_target(pool, fingerprint, cfg, req, &history, &mut targets).await?;

    let kind = req.drafter.clone();
    let mut drafters = Attempts::new(Role::Drafter, cfg.max_drafter_attempts);
    let mut drafter = if kind == "none" {
        None
    } else {
        open_drafter(pool, fingerprint, cfg, req, &kind, &history, &mut drafters).await
    };
    if drafter.is_some() {
        stats.drafter = kind.clone();
    }
    let max_k = req.draft_len.unwrap_or(cfg.max_draft_len).max(1);
    let seeded = req.params.seed.is_some();
    let nominal = CostModel::nominal(max_k);
    let mut kc = lock(&learned.costs)
        .get(&kind)
        .cloned()
        .unwrap_or(KindCosts {
            costs: CostModel::new(max_k),
            propose_ms: None,
        });
    let version = drafter
        .as_ref()
        .map(|d| d.version.clone())
        .unwrap_or_default();
    let ckey = (kind.clone(), version, max_k, req.draft_len);
    let mut controller = learned.controller_for(&ckey, seeded);
    let mut feedback: Option<pb::StepFeedback> = None;
    // The target's cost of one more verified row at its batch size, from its latest answer (`None`
    // while this sequence has the target to itself: its own round trips measure that curve).
    let mut row_cost: Option<f64> = None;

    let finish = loop {
        if out.len() >= req.max_new_tokens || history.len() >= context {
            break Finish::Length;
        }
        let step_start = Instant::now();
        let room = (req.max_new_tokens - out.len() - 1).min(context - history.len() - 1);
        let costs = if seeded { &nominal } else { &kc.costs };
        let want = match &drafter {
            Some(d) if is_free(&d.kind) => req.draft_len.unwrap_or(max_k).min(room),
            Some(_) => controller.choose(costs).min(room),
            None => 0,
        };
        // Draft.
        let mut drafts: Vec<u32> = Vec::new();
        let mut q: Vec<pb::SparseDist> = Vec::new();
        let mut worker_ms = 0.0;
        let mut drafted_by_drafter = false;
        if let (Some(d), true) = (drafter.as_mut(), want > 0) {
            let step_costs: Vec<f32> = match (is_free(&d.kind), row_cost) {
                (false, _) => Vec::new(),
                // The target's own figure for a draft row at its current batch size, plus the
                // propose round trip as a fraction of a plain step's.
                (true, Some(rc)) if !seeded => {
                    let hop = match (kc.propose_ms, kc.costs.verify_ms(0)) {
                        (Some(p), Some(t0)) if t0 > 0.0 => p / t0,
                        _ => 0.0,
                    };
                    (0..=max_k)
                        .map(|j| {
                            let extra = if j == 0 { 0.0 } else { hop };
                            (1.0 + j as f64 * rc + extra) as f32
                        })
                        .collect()
                }
                (true, _) => {
                    let hop = if seeded {
                        0.0
                    } else {
                        kc.propose_ms.unwrap_or(0.0)
                    };
                    costs
                        .relative_verify_costs(max_k, hop)
                        .into_iter()
                        .map(|c| c as f32)
                        .collect()
                }
            };
            let t = Instant::now();
            match d.propose(&history, want, step_costs, feedback.take()).await {
                Ok(p) => {
                    let rtt = t.elapsed().as_secs_f64() * 1000.0;
                    worker_ms += p.draft_ms;
                    kc.propose_ms = Some(kc.propose_ms.map_or(rtt, |m| 0.8 * m + 0.2 * rtt));
                    if !p.tokens.is_empty() {
                        // A catch-up over tokens the drafter missed is not a per-token cost.
                        kc.costs
                            .record_draft(p.tokens.len(), (rtt - p.catch_up_ms).max(0.0));
                    }
                    drafts = p.tokens;
                    q = p.q;
                    drafted_by_drafter = true;
                }
                Err(e) => {
                    let id = d.lease.worker.id().to_string();
                    drafters.failed(pool, req, id, &e, "drafter failed; going on without it");
                    stats.drafter_failovers += 1;
                    drafter =
                        open_drafter(pool, fingerprint, cfg, req, &kind, &history, &mut drafters)
                            .await;
                    if drafter.is_none() {
                        stats.drafter = "none".into();
                    }
                }
            }
        }
        let k = drafts.len();
        let width = drafter.as_ref().map_or(0, |d| d.feedback_width);
        // Verify, failing over to another target if this one dies.
        let t = Instant::now();
        let result = loop {
            // The sequence's drafter, even on a step it drafted nothing for: what the target captures
            // there still teaches that drafter.
            let by = drafter
                .as_ref()
                .map(|d| (d.kind.as_str(), d.version.as_str()));
            match target.step(&history, &drafts, &q, width, by).await {
                Ok(r) => break r,
                Err(ConnError::Invalid(s)) => return Err(s),
                Err(e) => {
                    let id = target.lease.worker.id().to_string();
                    targets.failed(pool, req, id, &e, "target failed; re-prefilling on another");
                    stats.target_failovers += 1;
                    target =
                        open_target(pool, fingerprint, cfg, req, &history, &mut targets).await?;
                }
            }
        };
        let verify_rtt = t.elapsed().as_secs_f64() * 1000.0;
        worker_ms += result.verify_ms;
        // Round trips measure this sequence's own cost curve only while it has the target to itself;
        // in a shared batch they time everyone's rows, and the target reports the row cost instead.
        if result.draft_row_cost == 0.0 {
            kc.costs.record_verify(k, verify_rtt);
        }
        let accepted = result.accepted as usize;
        if let Some(d) = drafter.as_mut() {
            if drafted_by_drafter {
                d.accepted(history.len(), accepted);
            }
        }
        feedback = result.feedback;
        row_cost = (result.draft_row_cost > 0.0).then(|| f64::from(result.draft_row_cost));
        if k > 0 {
            controller.record(k, accepted);
            stats.drafted += k as u64;
            stats.accepted += accepted as u64;
            if stats.accepted_per_position.len() < k {
                stats.accepted_per_position.resize(k, 0);
            }
            for slot in &mut stats.accepted_per_position[..accepted] {
                *slot += 1;
            }
        }
        stats.steps += 1;
        record_step(drafter.as_ref(), k, accepted);
        let mut emitted = drafts[..accepted].to_vec();
        emitted.push(result.next_token);
        emitted.truncate(req.max_new_tokens - out.len());
        let stop_at = emitted.iter().position(|t| req.stop_ids.contains(t));
        if let Some(i) = stop_at {
            emitted.truncate(i);
        }
        let pushed = if emitted.is_empty() {
            Pushed {
                taken: 0,
                go_on: true,
            }
        } else {
            sink.push(&emitted)
        };
        emitted.truncate(pushed.taken);
        history.extend_from_slice(&emitted);
        out.extend_from_slice(&emitted);
        let overhead = (step_start.elapsed().as_secs_f64() * 1000.0 - worker_ms).max(0.0);
        stats.overhead_ms.push(overhead);
        metrics::histogram!("specd_router_step_overhead_seconds").record(overhead / 1000.0);
        if stop_at.is_some() {
            break Finish::Stop;
        }
        if !pushed.go_on {
            break Finish::Cancelled;
        }
    };
    if !seeded {
        lock(&learned.controllers).insert(ckey, controller);
        lock(&learned.costs).insert(kind, kc);
    }
    Ok((out, finish, stats))
}

/// A step's speculation counters, by the sequence's drafter kind and weights version (`none` and empty
/// without a drafter): a swapped-in version's acceptance reads apart from its parent's, and summed over
/// the labels they are the cluster's. Recorded per step, so a request that fails midway still counts
/// what it drafted.
fn record_step(drafter: Option<&DrafterConn>, k: usize, accepted: usize) {
    let (kind, version) = drafter.map_or(("none".to_string(), String::new()), |d| {
        (d.kind.clone(), d.version.clone())
    });
    metrics::counter!("specd_spec_decode_steps_total", "drafter" => kind.clone(), "version" => version.clone())
        .increment(1);
    // Also when nothing was drafted, so the series exist from a sequence's first step.
    metrics::counter!("specd_spec_decode_num_draft_tokens_total", "drafter" => kind.clone(), "version" => version.clone())
        .increment(k as u64);
    metrics::counter!("specd_spec_decode_num_accepted_tokens_total", "drafter" => kind.clone(), "version" => version.clone())
        .increment(accepted as u64);
    for pos in 0..accepted {
        metrics::counter!(
            "specd_spec_decode_num_accepted_tokens_per_pos_total",
            "drafter" => kind.clone(),
            "version" => version.clone(),
            "position" => pos.to_string()
        )
        .increment(1);
    }
}

/// The workers of one role a request has tried: the ones that failed (not tried again) and how many
/// sequences were opened (each gets its own derived seed).
struct Attempts {
    role: Role,
    failed: Vec<String>,
    opens: u64,
    max: usize,
}

impl Attempts {
    fn new(role: Role, max: usize) -> Self {
        Self {
            role,
            failed: Vec::new(),
            opens: 0,
            max,
        }
    }

    /// Records a failed worker: logged, ejected from placement if it failed (not if it was busy),
    /// counted, never tried again by this request.
    fn failed(&mut self, pool: &Pool, req: &GenRequest, id: String, e: &ConnError, what: &str) {
        tracing::warn!(request_id = %req.request_id, role = %self.role, worker = %id, error = %e.message(), "{what}");
        if matches!(e, ConnError::Failed(_)) {
            pool.eject(&id);
        }
        metrics::counter!("specd_fallbacks_total", "role" => self.role.as_str()).increment(1);
        self.failed.push(id);
    }

    /// Opens a sequence on the best worker that matches, trying the next one when it fails; `None`
    /// when no worker is left (or the attempts are used up), an error when the request itself is
    /// invalid. With `wait`, a request that finds every matching worker full waits that long for a
    /// slot (freed slots go to waiters as they come) and is RESOURCE_EXHAUSTED after it; without, it
    /// goes on without one.
    #[allow(clippy::too_many_arguments)]
    async fn open<C, F, Fut>(
        &mut self,
        pool: &Pool,
        req: &GenRequest,
        fingerprint: &str,
        kind: Option<&str>,
        wait: Option<Duration>,
        mut open: F,
    ) -> Result<Option<C>, Status>
    where
        F: FnMut(Lease, SamplingParams) -> Fut,
        Fut: std::future::Future<Output = Result<C, ConnError>>,
    {
        let wait_end = wait.map(|w| Instant::now() + w);
        let mut busy_nap = Duration::from_millis(20);
        while self.failed.len() < self.max {
            let want = Want {
                fingerprint,
                kind,
                session: req.session.as_deref(),
                exclude: &self.failed,
            };
            let lease = match wait {
                None => pool.place(self.role, &want),
                Some(wait) => {
                    let t0 = Instant::now();
                    let left = wait_end.map_or(wait, |e| e.saturating_duration_since(t0));
                    let placed = pool.place_wait(self.role, &want, left).await;
                    metrics::histogram!("specd_placement_wait_seconds", "role" => self.role.as_str())
                        .record(t0.elapsed().as_secs_f64());
                    match placed {
                        Placed::Placed(l) => Some(l),
                        Placed::NoWorker => None,
                        Placed::Full => {
                            return Err(Status::resource_exhausted(format!(
                                "every {} worker stayed full for {wait:?}; retry later",
                                self.role
                            )))
                        }
                    }
                }
            };
            let Some(lease) = lease else {
                return Ok(None);
            };
            let id = lease.worker.id().to_string();
            let params = attempt_seed(&req.params, self.opens);
            self.opens += 1;
            match open(lease, params).await {
                Ok(c) => return Ok(Some(c)),
                Err(ConnError::Invalid(s)) => return Err(s),
                // Full by its own count while this router saw a free slot (its slot frees when the
                // previous stream has closed, or another router holds slots): place again shortly,
                // without holding it against the worker.
                Err(ConnError::Busy(s))
                    if s.code() == tonic::Code::ResourceExhausted
                        && wait_end.is_some_and(|e| Instant::now() < e) =>
                {
                    tokio::time::sleep(busy_nap).await;
                    busy_nap = (busy_nap * 2).min(Duration::from_millis(500));
                }
                Err(e) => self.failed(pool, req, id, &e, "worker refused or failed to open"),
            }
        }
        Ok(None)
    }
}

async fn open_target(
    pool: &Pool,
    fingerprint: &str,
    cfg: &SpecConfig,
    req: &GenRequest,
    history: &[u32],
    attempts: &mut Attempts,
) -> Result<TargetConn, Status> {
    // What is left to generate (a re-prefill after a failover carries the tokens generated so far),
    // at least one: the target reserves its KV room by it.
    let generated = history.len().saturating_sub(req.prompt_ids.len());
    let max_new = req.max_new_tokens.saturating_sub(generated).max(1) as u32;
    let opened = attempts
        .open(
            pool,
            req,
            fingerprint,
            None,
            Some(cfg.placement_wait),
            |lease, params| async move {
                TargetConn::open(
                    lease,
                    &req.request_id,
                    history,
                    max_new,
                    &params,
                    cfg.target_timeout,
                    req.deadline,
                )
                .await
            },
        )
        .await?;
    opened.ok_or_else(|| {
        Status::unavailable(if attempts.failed.is_empty() {
            "no target worker is available for this model".to_string()
        } else {
            format!(
                "no target worker left after failures of {}",
                attempts.failed.join(", ")
            )
        })
    })
}

async fn open_drafter(
    pool: &Pool,
    fingerprint: &str,
    cfg: &SpecConfig,
    req: &GenRequest,
    kind: &str,
    history: &[u32],
    attempts: &mut Attempts,
) -> Option<DrafterConn> {
    let opened = attempts
        .open(
            pool,
            req,
            fingerprint,
            Some(kind),
            None,
            |lease, params| async move {
                DrafterConn::open(
                    lease,
                    kind,
                    &req.request_id,
                    history,
                    &params,
                    cfg.drafter_timeout,
                    cfg.drafter_open_timeout,
                    req.deadline,
                )
                .await
            },
        )
        .await;
    // A drafter is an optimisation: whatever went wrong, decoding goes on without one.
    opened.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_request_starts_fresh_and_leaves_the_learned_state_to_the_others() {
        let learned = Learned::default();
        let key: ControllerKey = ("self".into(), "0".into(), 4, None);
        let mut c = SpecLenController::new(4, None);
        for _ in 0..50 {
            c.record(4, 0);
        }
        let alpha = c.alpha();
        let fresh_alpha = SpecLenController::new(4, None).alpha();
        assert!(alpha < fresh_alpha, "{alpha} vs {fresh_alpha}");
        lock(&learned.controllers).insert(key.clone(), c);
        // Seeded: a fresh state, and the learned one stays.
        assert_eq!(learned.controller_for(&key, true).alpha(), fresh_alpha);
        assert!(lock(&learned.controllers).contains_key(&key));
        // Unseeded: the learned state, taken while the request runs.
        assert_eq!(learned.controller_for(&key, false).alpha(), alpha);
        assert!(!lock(&learned.controllers).contains_key(&key));
        assert_eq!(learned.controller_for(&key, false).alpha(), fresh_alpha);
    }
}
