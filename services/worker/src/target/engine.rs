//! The target worker's engine thread: it owns the model and every sequence's KV cache, takes what the
//! stream handlers sent, runs ONE `forward_batch` over all the sequences' new tokens (prefill chunks and
//! verify steps together), applies the rejection rule per sequence with that sequence's own sampler,
//! captures distillation samples of the sampled sequences, and answers each handler. The forward pass is
//! batch-invariant, so a sequence's logits (and so its greedy output) do not depend on what it was
//! batched with.
//!
//! Sequence bookkeeping follows `proto/specd/internal/v1/worker.proto`: the KV cache holds every context
//! token but the last; a step truncates to `keep_len`, appends `append_ids`, then feeds the tokens the
//! cache lacks plus the drafts and reads logits at the last `drafts + 1` positions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use specd_core::{verify, verify_greedy, RowCostModel, Sampler, SamplingParams, SparseDist};
use specd_engine::speculate::top_ids;
use specd_engine::{KvCache, LogitsWanted, Model, SeqInput};
use specd_proto::internal::v1 as pb;
use specd_service::Drain;
use tokio::sync::{oneshot, watch};
use tonic::Status;

use crate::convert::{self, MAX_FEEDBACK_WIDTH};
use crate::samples::{Capture, SampleSink};
use crate::stream::DEFAULT_STREAM_IDLE;

/// Most new tokens one batched forward takes; further commands wait for the next batch.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// Most prompt tokens of one sequence's prefill per batched forward: a long prompt is prefilled in
/// chunks, between which the other sequences' verify steps run, so it delays them by one chunk's
/// worth of compute rather than by the whole prompt's.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;
/// Most captured prompt rows (distillation samples' prompt positions) one batched forward returns
/// logits for, over all its prefill chunks.
const MAX_PROMPT_ROWS_PER_FORWARD: usize = 256;

pub(super) type Reply<T> = oneshot::Sender<Result<T, Status>>;

pub(super) enum Cmd {
    Open {
        seq: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        /// Prompt tokens prefilled so far, updated after every chunk.
        progress: watch::Sender<u32>,
        /// Whether the router allows distillation samples of this sequence.
        allow_samples: bool,
        reply: Reply<pb::verify_response::Opened>,
    },
    Step {
        seq: u64,
        step: pb::verify_request::Step,
        reply: Reply<pb::verify_response::StepResult>,
    },
    Close {
        seq: u64,
    },
}

struct Seq {
    /// The proto's sequence: committed context, then the last step's drafts.
    tokens: Vec<u32>,
    cache: KvCache,
    params: SamplingParams,
    sampler: Sampler,
    /// Distillation positions not yet sent, for a captured sequence.
    capture: Option<Capture>,
}

/// How much work one batched forward takes, how much KV room sequences may reserve, and how long a
/// stream may idle.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most new tokens per forward.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one prefill per forward.
    pub prefill_chunk: usize,
    /// A Verify stream with no request for this long is ended and its sequence freed.
    pub stream_idle: Duration,
    /// KV tokens the open sequences may reserve together (`None`: sequences are bounded by the
    /// capacity alone). Each reserves its prompt, its `max_new_tokens` and one longest draft, capped at
    /// the model's context.
    pub kv_tokens: Option<u64>,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            stream_idle: DEFAULT_STREAM_IDLE,
            kv_tokens: None,
        }
    }
}

/// A sequence whose prompt is being prefilled, chunk by chunk.
struct Prefill {
    id: u64,
    seq: Seq,
    progress: watch::Sender<u32>,
    reply: Reply<pb::verify_response::Opened>,
}

impl Prefill {
    /// Prompt tokens still to feed (the last prompt token is fed by the first step).
    fn remaining(&self) -> usize {
        self.seq.tokens.len() - 1 - self.seq.cache.len()
    }
}

/// A unit of the next batched forward.
struct Work {
    id: u64,
    seq: Seq,
    feed: Vec<u32>,
    job: Job,
}

enum Job {
    Prefill(watch::Sender<u32>, Reply<pb::verify_response::Opened>),
    Step {
        drafts: Vec<u32>,
        q: Vec<SparseDist>,
        width: usize,
        /// Kind and version of the drafter that drafted, for samples.
        drafter: (String, String),
        reply: Reply<pb::verify_response::StepResult>,
    },
}

/// What the engine thread counts for the service to read.
#[derive(Clone, Default)]
pub(super) struct EngineCounters {
    /// Prompt tokens prefilled since start.
    pub(super) prefilled: Arc<AtomicU64>,
    /// Sequences whose cache the engine holds (open or being prefilled), updated after every batch.
    pub(super) held: Arc<AtomicU64>,
}

/// Owns the model and the sequences; runs on its own thread.
pub(super) struct Engine {
    model: Model,
    seqs: HashMap<u64, Seq>,
    max_batch_tokens: usize,
    prefill_chunk: usize,
    /// Prefills in progress, oldest first.
    prefilling: VecDeque<Prefill>,
    /// Forward time against rows fed, for the cost of a draft row at the current batch size.
    row_costs: RowCostModel,
    counters: EngineCounters,
    /// Where captured distillation samples go; `None`: capture off.
    samples: Option<SampleSink>,
    /// Failed when the model cannot compute any more (a tensor-parallel group lost a rank).
    drain: Drain,
}

impl Engine {
    pub(super) fn new(
        model: Model,
        limits: BatchLimits,
        counters: EngineCounters,
        samples: Option<SampleSink>,
        drain: Drain,
    ) -> Self {
        Self {
            drain,
            samples,
            counters,
            model,
            seqs: HashMap::new(),
            max_batch_tokens: limits.max_batch_tokens.max(1),
            prefill_chunk: limits.prefill_chunk.max(1),
            prefilling: VecDeque::new(),
            row_costs: RowCostModel::default(),
        }
    }

    pub(super) fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        let mut carry: Option<Cmd> = None;
        loop {
            let mut cmds = Vec::new();
            if let Some(c) = carry.take() {
                cmds.push(c);
            } else if self.prefilling.is_empty() {
                // Idle: wait for work. With prefills in progress, take what is there and go on.
                match rx.recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => return,
                }
            }
            let mut tokens: usize = cmds.iter().map(cmd_tokens).sum();
            while let Ok(c) = rx.try_recv() {
                let t = cmd_tokens(&c);
                if tokens + t > self.max_batch_tokens && tokens > 0 {
                    carry = Some(c);
                    break;
                }
                tokens += t;
                cmds.push(c);
            }
            self.batch(cmds);
            self.counters.held.store(
                (self.seqs.len() + self.prefilling.len()) as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// Schedules the next chunk of the waiting prefills into `work`, within `budget` tokens (at least
    /// one token of the oldest, so prefills always progress).
    fn schedule_prefills(&mut self, work: &mut Vec<Work>, mut budget: usize) {
        budget = budget.max(1);
        let mut later = VecDeque::new();
        while let Some(p) = self.prefilling.pop_front() {
            if budget == 0 {
                later.push_back(p);
                continue;
            }
            let n = p.remaining().min(self.prefill_chunk).min(budget);
            budget -= n;
            let from = p.seq.cache.len();
            let feed = p.seq.tokens[from..from + n].to_vec();
            work.push(Work {
                id: p.id,
                seq: p.seq,
                feed,
                job: Job::Prefill(p.progress, p.reply),
            });
        }
        self.prefilling = later;
    }

    fn batch(&mut self, cmds: Vec<Cmd>) {
        let t0 = Instant::now();
        let cfg = self.model.config().clone();
        let mut work = Vec::new();
        let mut closes = Vec::new();
        for cmd in cmds {
            match cmd {
                Cmd::Close { seq } => closes.push(seq),
                Cmd::Open {
                    seq,
                    prompt,
                    params,
                    progress,
                    allow_samples,
                    reply,
                } => {
                    if let Err(s) = check_open(&prompt, cfg.vocab, cfg.context) {
                        let _ = reply.send(Err(s));
                        continue;
                    }
                    let sampler = Sampler::new(params.seed);
                    self.prefilling.push_back(Prefill {
                        id: seq,
                        seq: Seq {
                            tokens: prompt,
                            cache: self.model.new_cache(),
                            params,
                            sampler,
                            capture: self.samples.as_ref().and_then(|s| s.choose(allow_samples)),
                        },
                        progress,
                        reply,
                    });
                }
                Cmd::Step {
                    seq,
                    mut step,
                    reply,
                } => {
                    let Some(mut s) = self.seqs.remove(&seq) else {
                        let _ = reply.send(Err(Status::failed_precondition(
                            "step on a sequence that is not open",
                        )));
                        continue;
                    };
                    let drafter = (
                        std::mem::take(&mut step.drafter_kind),
                        std::mem::take(&mut step.drafter_version),
                    );
                    match prepare_step(&mut s, step, cfg.vocab, cfg.context) {
                        Ok((feed, drafts, q, width)) => work.push(Work {
                            id: seq,
                            seq: s,
                            feed,
                            job: Job::Step {
                                drafts,
                                q,
                                width,
                                drafter,
                                reply,
                            },
                        }),
                        Err(status) => {
                            self.seqs.insert(seq, s);
                            let _ = reply.send(Err(status));
                        }
                    }
                }
            }
        }
        // Closes first: a prefill whose stream is gone is not worth a chunk.
        for seq in closes {
            if let (Some(mut s), Some(sink)) = (self.seqs.remove(&seq), &self.samples) {
                if let Some(cap) = s.capture.as_mut() {
                    sink.flush(cap, &s.tokens);
                }
            }
            let before = self.prefilling.len();
            self.prefilling.retain(|p| p.id != seq);
            if self.prefilling.len() < before {
                tracing::info!(seq, "prefill abandoned by its stream; dropped");
                metrics::counter!("specd_prefills_cancelled_total").increment(1);
            }
        }
        // A one-token prompt has nothing to prefill.
        let (ready, waiting): (VecDeque<_>, _) =
            self.prefilling.drain(..).partition(|p| p.remaining() == 0);
        self.prefilling = waiting;
        for p in ready {
            self.finish_prefill(p.id, p.seq, p.reply);
        }
        let used: usize = work.iter().map(|w| w.feed.len()).sum();
        if !self.prefilling.is_empty() {
            self.schedule_prefills(&mut work, self.max_batch_tokens.saturating_sub(used));
        }
        if !work.is_empty() {
            self.forward(work, t0);
        }
    }

    fn finish_prefill(&mut self, id: u64, seq: Seq, reply: Reply<pb::verify_response::Opened>) {
        let opened = pb::verify_response::Opened {
            context_len: seq.tokens.len() as u32,
        };
        if reply.send(Ok(opened)).is_ok() {
            self.seqs.insert(id, seq);
        }
    }

    fn forward(&mut self, mut work: Vec<Work>, t0: Instant) {
        let samples = &self.samples;
        // Captured prompt rows this forward may still return: each is a full vocabulary of logits
        // (0.6 MB for a 152K vocabulary), so a batch of long captured prefills is bounded here; rows
        // past it are not captured (their chunks' earlier rows, where the window reaches them).
        let mut prompt_budget = MAX_PROMPT_ROWS_PER_FORWARD;
        let result = {
            let mut inputs: Vec<SeqInput<'_>> = work
                .iter_mut()
                .map(|w| {
                    let wanted = match (&w.job, samples, &w.seq.capture) {
                        (Job::Step { drafts, .. }, ..) => LogitsWanted::Tail(drafts.len() + 1),
                        // A captured sequence's prompt positions, where the chunk reaches them.
                        (Job::Prefill(..), Some(sink), Some(_)) => {
                            let (len, from) = (w.seq.tokens.len(), w.seq.cache.len());
                            let k = sink.prompt_rows(len, from, w.feed.len()).min(prompt_budget);
                            prompt_budget -= k;
                            if k == 0 {
                                LogitsWanted::None
                            } else {
                                LogitsWanted::Tail(k)
                            }
                        }
                        (Job::Prefill(..), ..) => LogitsWanted::None,
                    };
                    SeqInput {
                        cache: &mut w.seq.cache,
                        tokens: &w.feed,
                        wanted,
                    }
                })
                .collect();
            self.model.forward_batch(&mut inputs)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A tensor-parallel group that lost a rank cannot compute again: leave placement
                // (the worker drains and exits; its routers re-prefill elsewhere).
                if matches!(e, specd_engine::EngineError::Collective(_)) {
                    tracing::error!(error = %e, "tensor-parallel group failed; shutting the worker down");
                    self.drain.fail();
                }
                // Inputs were validated, so this is an engine fault: fail these steps, keep the
                // sequences (their caches are untouched by a refused forward).
                let status = convert::status(e);
                tracing::error!(error = %status.message(), "batched forward failed");
                for w in work {
                    match w.job {
                        Job::Prefill(_, reply) => {
                            let _ = reply.send(Err(status.clone()));
                        }
                        Job::Step { reply, .. } => {
                            let _ = reply.send(Err(status.clone()));
                            self.seqs.insert(w.id, w.seq);
                        }
                    }
                }
                return;
            }
        };
        let vocab = self.model.config().vocab;
        let batch_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let fed: usize = work.iter().map(|w| w.feed.len()).sum();
        self.row_costs.record(fed, batch_ms);
        let decoding = work
            .iter()
            .filter(|w| matches!(w.job, Job::Step { .. }))
            .count();
        // Alone in its batch, a sequence's own round trips give the router the exact (convex) cost
        // curve; the fitted line is for sharing a batch, where round trips cannot tell its rows apart.
        let row_cost = if decoding > 1 {
            self.row_costs.draft_row_cost(decoding).unwrap_or(0.0) as f32
        } else {
            0.0
        };
        let mut unfinished = Vec::new();
        metrics::histogram!("specd_worker_step_seconds", "role" => "target")
            .record(batch_ms / 1000.0);
        for (w, logits) in work.into_iter().zip(logits) {
            let Work {
                id,
                mut seq,
                job,
                feed,
            } = w;
            match job {
                Job::Prefill(progress, reply) => {
                    if let (Some(sink), Some(cap)) = (&self.samples, seq.capture.as_mut()) {
                        let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
                        // The chunk ends at prefix `cache.len()`; its captured rows are the last.
                        let first = seq.cache.len() + 1 - rows.len();
                        sink.prompt(cap, &seq.tokens, first, &rows);
                    }
                    self.counters
                        .prefilled
                        .fetch_add(feed.len() as u64, Ordering::Relaxed);
                    metrics::counter!("specd_prefill_tokens_total").increment(feed.len() as u64);
                    progress.send_replace(seq.cache.len() as u32);
                    let p = Prefill {
                        id,
                        seq,
                        progress,
                        reply,
                    };
                    if p.remaining() == 0 {
                        self.finish_prefill(p.id, p.seq, p.reply);
                    } else {
                        unfinished.push(p);
                    }
                }
                Job::Step {
                    drafts,
                    q,
                    width,
                    drafter,
                    reply,
                } => {
                    let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
                    let r = decide(&mut seq, &drafts, &q, &rows, width, batch_ms, row_cost);
                    let context_len = seq.tokens.len();
                    seq.tokens.extend_from_slice(&drafts);
                    if let (Ok(r), Some(sink), Some(cap)) =
                        (&r, &self.samples, seq.capture.as_mut())
                    {
                        let accepted = r.accepted as usize;
                        let d = (drafter.0.as_str(), drafter.1.as_str());
                        sink.step(cap, &seq.tokens, context_len, &drafts, accepted, &rows, d);
                    }
                    let _ = reply.send(r);
                    self.seqs.insert(id, seq);
                }
            }
        }
        // Started prefills keep their place ahead of those not started yet, oldest first.
        for p in unfinished.into_iter().rev() {
            self.prefilling.push_front(p);
        }
    }
}

fn cmd_tokens(c: &Cmd) -> usize {
    match c {
        // Prefills are scheduled in chunks against what is left of the budget.
        Cmd::Open { .. } => 0,
        Cmd::Step { step, .. } => step.drafts.len() + step.append_ids.len() + 1,
        Cmd::Close { .. } => 0,
    }
}

fn check_open(prompt: &[u32], vocab: usize, context: usize) -> Result<(), Status> {
    if prompt.is_empty() {
        return Err(Status::invalid_argument("open: prompt_ids is empty"));
    }
    if prompt.len() >= context {
        return Err(Status::invalid_argument(format!(
            "open: prompt of {} tokens leaves no room in the context of {context}",
            prompt.len()
        )));
    }
    convert::check_tokens("open: prompt_ids", prompt, vocab)
}

type Prepared = (Vec<u32>, Vec<u32>, Vec<SparseDist>, usize);

/// Validates a step, applies its rollback and append to `s`, and returns what to feed.
fn prepare_step(
    s: &mut Seq,
    step: pb::verify_request::Step,
    vocab: usize,
    context: usize,
) -> Result<Prepared, Status> {
    let keep = step.keep_len as usize;
    if keep > s.tokens.len() {
        return Err(Status::invalid_argument(format!(
            "step: keep_len {keep} exceeds the sequence length {}",
            s.tokens.len()
        )));
    }
    convert::check_tokens("step: append_ids", &step.append_ids, vocab)?;
    convert::check_tokens("step: drafts", &step.drafts, vocab)?;
    let new_len = keep + step.append_ids.len();
    if new_len == 0 {
        return Err(Status::invalid_argument("step: the context would be empty"));
    }
    if new_len + step.drafts.len() > context {
        return Err(Status::invalid_argument(format!(
            "step: {new_len} context tokens plus {} drafts exceed the context of {context}",
            step.drafts.len()
        )));
    }
    let width = step.feedback_width as usize;
    if width > MAX_FEEDBACK_WIDTH {
        return Err(Status::invalid_argument(format!(
            "step: feedback_width {width} exceeds {MAX_FEEDBACK_WIDTH}"
        )));
    }
    let q = if s.params.is_greedy() && step.q.is_empty() {
        Vec::new()
    } else {
        if step.q.len() != step.drafts.len() {
            return Err(Status::invalid_argument(format!(
                "step: {} drafts but {} draft distributions",
                step.drafts.len(),
                step.q.len()
            )));
        }
        step.q
            .iter()
            .zip(&step.drafts)
            .map(|(d, &t)| convert::dist(d, t, vocab))
            .collect::<Result<Vec<_>, _>>()?
    };
    s.tokens.truncate(keep);
    s.tokens.extend_from_slice(&step.append_ids);
    // The cache holds every context token but the last: a rollback to `keep` (or below what is
    // cached) re-feeds the last kept token, whose logits verify the first draft.
    let fed = s.cache.len().min(keep).min(new_len - 1);
    s.cache.truncate(fed);
    let mut feed = s.tokens[fed..].to_vec();
    feed.extend_from_slice(&step.drafts);
    Ok((feed, step.drafts, q, width))
}

/// The rejection rule over one step's logits rows (`drafts.len() + 1` of them).
fn decide(
    seq: &mut Seq,
    drafts: &[u32],
    q: &[SparseDist],
    rows: &[&[f32]],
    width: usize,
    batch_ms: f64,
    draft_row_cost: f32,
) -> Result<pb::verify_response::StepResult, Status> {
    let verdict = if seq.params.is_greedy() {
        let argmax: Vec<u32> = rows.iter().map(|r| specd_core::argmax(r)).collect();
        verify_greedy(drafts, &argmax)
    } else {
        let p = rows
            .iter()
            .map(|r| SparseDist::from_logits(r, &seq.params))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(format!("target distribution: {e}")))?;
        verify(drafts, q, &p, &mut seq.sampler)
    }
    .map_err(|e| Status::internal(format!("verify: {e}")))?;
    let used = verdict.accepted + 1;
    let feedback = (width > 0).then(|| {
        // The context's last token, then the accepted drafts: the inputs at the positions used.
        let context_last = seq.tokens[seq.tokens.len() - 1];
        let mut inputs = vec![context_last];
        inputs.extend_from_slice(&drafts[..verdict.accepted]);
        let target_top = rows[..used]
            .iter()
            .flat_map(|r| top_ids(r, width))
            .collect();
        pb::StepFeedback {
            inputs,
            width: width as u32,
            target_top,
        }
    });
    Ok(pb::verify_response::StepResult {
        accepted: verdict.accepted as u32,
        next_token: verdict.next_token,
        emitted: verdict.emitted(drafts),
        verify_ms: batch_ms,
        feedback,
        draft_row_cost,
    })
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use specd_engine::testing::{write_tiny_model, TinySpec};
    use specd_engine::{load_gguf, Family};
    use tokio::sync::mpsc;

    fn greedy_step(keep: usize, append: Vec<u32>) -> pb::verify_request::Step {
        pb::verify_request::Step {
            drafts: Vec::new(),
            q: Vec::new(),
            keep_len: keep as u32,
            append_ids: append,
            feedback_width: 0,
            ..Default::default()
        }
    }

    /// Plain greedy decoding of `n` tokens, for reference.
    fn reference(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut cache = model.new_cache();
        let mut logits = model
            .forward(&mut cache, prompt, LogitsWanted::Last)
            .expect("forward");
        let mut out = Vec::new();
        for _ in 0..n {
            let t = specd_core::argmax(&logits);
            out.push(t);
            logits = model
                .forward(&mut cache, &[t], LogitsWanted::Last)
                .expect("forward");
        }
        out
    }

    #[test]
    fn long_prefills_run_in_chunks_between_other_sequences_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        let mut spec = TinySpec::new(Family::Qwen2, 5);
        spec.layers = 8;
        write_tiny_model(&path, &spec).expect("write");
        let model = load_gguf(&path).expect("load").model;
        let (tx, rx) = std_mpsc::channel();
        let engine = Engine::new(
            model.clone(),
            BatchLimits {
                max_batch_tokens: 64,
                prefill_chunk: 2,
                ..BatchLimits::default()
            },
            EngineCounters::default(),
            None,
            Drain::new(),
        );
        let thread = std::thread::spawn(move || engine.run(rx));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let shorts: Vec<Vec<u32>> = (0..6u32)
            .map(|s| (0..5).map(|i| 3 + i * 7 + s).collect())
            .collect();
        let long: Vec<u32> = (0..480u32).map(|i| (i * 13 + 1) % 250).collect();
        rt.block_on(async {
            let open = |seq, prompt: Vec<u32>| {
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::Open {
                    seq,
                    prompt,
                    params: SamplingParams::greedy(),
                    progress: watch::channel(0).0,
                    allow_samples: false,
                    reply,
                })
                .expect("send");
                rx
            };
            let step = |seq, keep| {
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::Step {
                    seq,
                    step: greedy_step(keep, Vec::new()),
                    reply,
                })
                .expect("send");
                rx
            };
            for (i, p) in shorts.iter().enumerate() {
                open(10 + i as u64, p.clone())
                    .await
                    .expect("reply")
                    .expect("short opened");
            }
            // The long prompt needs 240 chunks. Once the engine has run a batch after taking it (the
            // first short step answered), steps sent next must not wait for the rest of its chunks.
            let (events, mut order) = mpsc::unbounded_channel();
            let long_opened = open(1, long.clone());
            let ev = events.clone();
            tokio::spawn(async move {
                let r = long_opened.await.expect("reply").expect("long opened");
                let _ = ev.send(("opened".to_string(), r.context_len));
            });
            let first = step(10, shorts[0].len())
                .await
                .expect("reply")
                .expect("step");
            assert_eq!(first.next_token, reference(&model, &shorts[0], 1)[0]);
            for (i, p) in shorts.iter().enumerate().skip(1) {
                let r = step(10 + i as u64, p.len());
                let ev = events.clone();
                tokio::spawn(async move {
                    let r = r.await.expect("reply").expect("step");
                    let _ = ev.send((format!("step{i}"), r.next_token));
                });
            }
            drop(events);
            let mut seen = Vec::new();
            while let Some(e) = order.recv().await {
                seen.push(e);
            }
            assert_eq!(seen.len(), shorts.len());
            assert_eq!(
                seen.last().map(|e| e.0.as_str()),
                Some("opened"),
                "steps sent during the long prefill finished before it did: {seen:?}"
            );
            for (i, p) in shorts.iter().enumerate().skip(1) {
                let got = seen
                    .iter()
                    .find(|e| e.0 == format!("step{i}"))
                    .expect("step");
                assert_eq!(got.1, reference(&model, p, 1)[0], "short sequence {i}");
            }
            let r = step(1, long.len()).await.expect("reply").expect("step");
            assert_eq!(
                vec![r.next_token],
                reference(&model, &long, 1),
                "a chunked prefill gives the same logits as a whole one"
            );
        });
        drop(tx);
        thread.join().expect("engine thread");
    }
}
