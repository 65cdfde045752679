//! Distillation sample capture on a target worker, and the sender that streams samples to a trainer.
//!
//! For a `--sample-rate` fraction of the sequences whose Open allows it, the engine thread records at
//! every verified position it used (each accepted draft, then the rejected or bonus position) the
//! target's top-w distribution at temperature 1 with its tail mass, the drafted token, whether it was
//! rejected, and the drafter's kind and version. With `prompt_positions` above 0 it also records the
//! target's distribution at the last that many prompt positions, read off the prefill (teacher forcing
//! on the request's own text: undrafted positions, which teach every drafter kind the traffic's
//! domain); they wait for the sequence's first step, which names its drafter. Positions are batched
//! per sequence into one `DistillSample` (flushed every `flush_positions` positions and when the
//! sequence ends).
//!
//! Serving never waits on training: the engine hands samples over with `try_send` on a bounded queue,
//! and the sender forwards them with `try_send` on a bounded stream to the trainer that leads the
//! model's trainer election in the coordination store. A full queue, a slow trainer or no trainer at all drops the sample and counts it
//! (`specd_distill_samples_total{outcome="dropped", reason}`). This module does not train, buffer for
//! replay or pick a leader: that is the trainer's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use specd_coord::{keys, Store};
use specd_core::TopTarget;
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::trainer_client::TrainerClient;
use specd_service::grpc::{Keepalive, MAX_MESSAGE_BYTES};
use specd_service::Shutdown;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How sample capture is configured on a target worker.
#[derive(Clone, Copy, Debug)]
pub struct SampleConfig {
    /// Fraction of the sequences (that allow it) whose positions are captured; 0 turns capture off.
    pub rate: f64,
    /// Target tokens kept per position (top-w).
    pub width: usize,
    /// Samples waiting for the sender, at most.
    pub queue: usize,
    /// Positions per sample before a sequence's buffer is flushed.
    pub flush_positions: usize,
    /// Prompt positions captured per sampled sequence, the last ones of its prompt (0: none).
    pub prompt_positions: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            rate: 0.1,
            width: 32,
            queue: 256,
            flush_positions: 64,
            prompt_positions: 0,
        }
    }
}

/// Counts of what became of captured samples (also exported as metrics).
#[derive(Debug, Default)]
pub struct SampleStats {
    pub captured: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    /// Whether the sender has a trainer to send to: with none, no sequence is captured (the engine
    /// would only compute distributions for the bin).
    pub trainer: AtomicBool,
}

impl SampleStats {
    fn drop_one(&self, reason: &'static str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("specd_distill_samples_total", "outcome" => "dropped", "reason" => reason)
            .increment(1);
    }
}

/// The engine's end of the sample queue.
#[derive(Clone)]
pub struct SampleSink {
    cfg: SampleConfig,
    model: String,
    tx: mpsc::Sender<pb::DistillSample>,
    stats: Arc<SampleStats>,
}

impl SampleSink {
    /// A sink and the receiving end for [`run_sender`].
    pub fn new(
        cfg: SampleConfig,
        model: String,
    ) -> (Self, mpsc::Receiver<pb::DistillSample>, Arc<SampleStats>) {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(SampleStats::default());
        let sink = Self {
            cfg,
            model,
            tx,
            stats: Arc::clone(&stats),
        };
        (sink, rx, stats)
    }

    /// Whether a new sequence is captured.
    pub fn choose(&self, allowed: bool) -> Option<Capture> {
        let on = allowed && self.cfg.rate > 0.0 && self.stats.trainer.load(Ordering::Relaxed);
        (on && rand::random::<f64>() < self.cfg.rate).then(Capture::default)
    }

    /// How many of the last rows of a prefill chunk feeding `tokens[from..from + n]` of a `prompt_len`
    /// token prompt are captured prompt positions (row j predicts the token after `from + j + 1`).
    pub fn prompt_rows(&self, prompt_len: usize, from: usize, n: usize) -> usize {
        // Prefixes 1..=prompt_len - 1 are prompt positions (the last prompt token is fed by the first
        // step, whose first row is the first generated position); the window is their last ones.
        let window = prompt_len.saturating_sub(self.cfg.prompt_positions).max(1);
        (from + n + 1).saturating_sub(window.max(from + 1)).min(n)
    }

    /// Records prompt positions read off a prefill chunk: `rows[j]` holds the target's logits after
    /// the first `first + j` tokens of `prompt`. Nothing is flushed: the sequence's drafter is not known
    /// until its first step.
    pub fn prompt(&self, cap: &mut Capture, prompt: &[u32], first: usize, rows: &[&[f32]]) {
        let t0 = Instant::now();
        // A chunk's rows at once on the pool (idle between two forwards): each is a pass over the
        // whole vocabulary.
        let tops: Vec<_> = rows
            .par_iter()
            .map(|row| TopTarget::from_logits(row, self.cfg.width))
            .collect();
        for (j, top) in tops.into_iter().enumerate() {
            let prefix = first + j;
            if prefix == 0 || prefix >= prompt.len() {
                continue;
            }
            let Ok(t) = top else {
                self.stats.drop_one("bad_logits");
                continue;
            };
            cap.push(prefix, t, None, false);
        }
        metrics::histogram!("specd_distill_capture_seconds").record(t0.elapsed().as_secs_f64());
    }

    /// Records the positions one verify step used and flushes when due. `tokens` is the sequence with
    /// this step's drafts appended after its first `context_len` tokens; `rows[j]` holds the target's
    /// logits after `context_len + j` tokens, for j up to `accepted` (the last is the rejected or
    /// bonus position).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        cap: &mut Capture,
        tokens: &[u32],
        context_len: usize,
        drafts: &[u32],
        accepted: usize,
        rows: &[&[f32]],
        drafter: (&str, &str),
    ) {
        let t0 = Instant::now();
        let (kind, version) = drafter;
        if cap.named && !cap.positions.is_empty() && (cap.kind != kind || cap.version != version) {
            // One sample, one drafter: a drafter change mid-sequence starts a new sample (prompt
            // positions, captured before any step, go with the first drafter).
            self.flush(cap, &tokens[..context_len]);
        }
        cap.named = true;
        for (j, row) in rows.iter().enumerate().take(accepted + 1) {
            let Ok(t) = TopTarget::from_logits(row, self.cfg.width) else {
                self.stats.drop_one("bad_logits");
                continue;
            };
            let draft = drafts.get(j).copied();
            cap.push(context_len + j, t, draft, draft.is_some() && j == accepted);
        }
        if cap.kind != kind || cap.version != version {
            cap.kind = kind.to_string();
            cap.version = version.to_string();
        }
        if cap.positions.len() >= self.cfg.flush_positions.max(1) {
            self.flush(cap, tokens);
        }
        // The capture's cost on the engine thread, per step of a captured sequence.
        metrics::histogram!("specd_distill_capture_seconds").record(t0.elapsed().as_secs_f64());
    }

    /// Hands what `cap` holds over to the sender as one sample over `tokens` (the sequence's tokens,
    /// at least as long as the last position), never waiting.
    pub fn flush(&self, cap: &mut Capture, tokens: &[u32]) {
        // Positions are recorded in ascending order: the last is the longest prefix.
        let Some(&last) = cap.positions.last() else {
            return;
        };
        let max = last as usize;
        let sample = pb::DistillSample {
            model: self.model.clone(),
            drafter_kind: std::mem::take(&mut cap.kind),
            context_ids: tokens[..max.min(tokens.len())].to_vec(),
            positions: std::mem::take(&mut cap.positions),
            target: std::mem::take(&mut cap.target),
            rejected: std::mem::take(&mut cap.rejected),
            drafted: std::mem::take(&mut cap.drafted),
            draft_ids: std::mem::take(&mut cap.draft_ids),
            drafter_version: std::mem::take(&mut cap.version),
            tail_mass: std::mem::take(&mut cap.tail),
        };
        self.stats.captured.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(sample) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.stats.drop_one("queue_full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.stats.drop_one("no_sender"),
        }
    }
}

/// One sequence's positions not yet sent.
#[derive(Debug, Default)]
pub struct Capture {
    positions: Vec<u32>,
    target: Vec<pb::SparseDist>,
    tail: Vec<f32>,
    rejected: Vec<bool>,
    drafted: Vec<bool>,
    draft_ids: Vec<u32>,
    kind: String,
    version: String,
    /// Whether a step has named the sequence's drafter (`kind`, `version`).
    named: bool,
}

impl Capture {
    /// One position: the target's distribution after `prefix` tokens, the token drafted there if any,
    /// and whether the target rejected it.
    fn push(&mut self, prefix: usize, t: TopTarget, draft: Option<u32>, rejected: bool) {
        let (ids, probs, tail) = t.into_parts();
        self.positions.push(prefix as u32);
        self.tail.push(tail as f32);
        self.target.push(pb::SparseDist { ids, probs });
        self.drafted.push(draft.is_some());
        self.draft_ids.push(draft.unwrap_or(0));
        self.rejected.push(rejected);
    }
}

/// How often the sender looks up trainers when it has none.
const LOOKUP_EVERY: Duration = Duration::from_secs(2);
/// Samples in flight to the trainer, at most.
const STREAM_DEPTH: usize = 64;

/// Forwards samples to the trainer leading `model`'s trainer election (its key holds the leader's
/// address) until `stop` fires: one `SubmitSamples` stream at a time, reopened (to whoever leads then)
/// when it ends or fails.
pub async fn run_sender(
    mut rx: mpsc::Receiver<pb::DistillSample>,
    model: String,
    store: Store,
    keepalive: Keepalive,
    stats: Arc<SampleStats>,
    stop: Shutdown,
) {
    let mut stream: Option<mpsc::Sender<pb::DistillSample>> = None;
    let mut looked: Option<Instant> = None;
    let mut tick = tokio::time::interval(LOOKUP_EVERY);
    loop {
        let sample = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => Some(s),
                None => return,
            },
            _ = tick.tick() => None,
            _ = stop.wait() => return,
        };
        if stream.as_ref().is_some_and(|s| s.is_closed()) {
            stream = None;
        }
        if stream.is_none() && looked.is_none_or(|t| t.elapsed() >= LOOKUP_EVERY) {
            looked = Some(Instant::now());
            stream = open_stream(&store, &model, keepalive).await;
        }
        stats.trainer.store(stream.is_some(), Ordering::Relaxed);
        let Some(sample) = sample else { continue };
        let Some(tx) = &stream else {
            stats.drop_one("no_trainer");
            continue;
        };
        match tx.try_send(sample) {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("specd_distill_samples_total", "outcome" => "sent", "reason" => "")
                    .increment(1);
            }
            Err(mpsc::error::TrySendError::Full(_)) => stats.drop_one("trainer_slow"),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                stats.drop_one("trainer_gone");
                stream = None;
            }
        }
    }
}

/// Opens a `SubmitSamples` stream to the leading trainer of `model`; `None` when none leads or its
/// address is unusable.
async fn open_stream(
    store: &Store,
    model: &str,
    keepalive: Keepalive,
) -> Option<mpsc::Sender<pb::DistillSample>> {
    let address = match store.leader(&keys::trainer_election(model)).await {
        Ok(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "looking up the trainer leader failed");
            return None;
        }
    };
    let endpoint = match specd_service::grpc::endpoint(&address, keepalive) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(trainer = %address, error = %e, "unusable trainer address");
            return None;
        }
    };
    let mut client = TrainerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    let id = address.clone();
    tokio::spawn(async move {
        match client.submit_samples(ReceiverStream::new(rx)).await {
            Ok(ack) => {
                let ack = ack.into_inner();
                tracing::info!(trainer = %id, accepted = ack.accepted, dropped = ack.dropped, "sample stream ended");
            }
            Err(e) => {
                tracing::warn!(trainer = %id, error = %e, "sample stream to the trainer failed")
            }
        }
    });
    tracing::info!(trainer = %address, "streaming distillation samples");
    Some(tx)
}
