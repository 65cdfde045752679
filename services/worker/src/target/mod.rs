//! The target worker: the target model behind the `Target.Verify` stream, with verification batched
//! across sequences.
//!
//! Stream handlers (async tasks, one per sequence) hold a slot, send the engine thread ([`engine`])
//! commands and relay its answers; the engine batches every sequence's work into one forward. This
//! module owns the gRPC side: admission (slots and the KV budget), the stream protocol, prefill
//! progress reports, and freeing a sequence however its stream ends.

mod engine;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use specd_engine::Model;
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::target_server::Target;
use specd_service::Drain;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::convert;
use crate::samples::SampleSink;
use crate::slots::{Slot, Slots};
use crate::stream::Duplex;
use crate::WorkerIdentity;
pub use engine::{BatchLimits, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_PREFILL_CHUNK};
use engine::{Cmd, Engine, EngineCounters, Reply};

/// The `Target` gRPC service.
#[derive(Clone)]
pub struct TargetService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: std_mpsc::Sender<Cmd>,
    identity: WorkerIdentity,
    slots: Slots,
    next_seq: AtomicU64,
    counters: EngineCounters,
    stream_idle: Duration,
}

/// Least time between two progress reports of one prefill.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Frees a sequence on the engine thread when its stream ends, however it ends.
struct SeqGuard {
    inner: Arc<Inner>,
    seq: u64,
    _slot: Slot,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        let _ = self.inner.engine.send(Cmd::Close { seq: self.seq });
    }
}

impl TargetService {
    /// Starts the engine thread over `model`.
    pub fn start(
        model: Model,
        identity: WorkerIdentity,
        capacity: u32,
        limits: BatchLimits,
        samples: Option<SampleSink>,
        drain: Drain,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let counters = EngineCounters::default();
        let engine = Engine::new(model, limits, counters.clone(), samples, drain.clone());
        let stop = drain.clone();
        std::thread::Builder::new()
            .name("specd-target-engine".into())
            .spawn(move || {
                // A panic here is a bug; the sequences' state cannot be trusted after it. Leave
                // placement (the worker drains and exits, its routers re-prefill elsewhere) rather
                // than stay registered answering UNAVAILABLE.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(rx)));
                if run.is_err() {
                    tracing::error!("target engine thread panicked; shutting the worker down");
                    stop.fail();
                }
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine: tx,
                identity,
                slots: match limits.kv_tokens {
                    Some(kv) => Slots::with_kv_budget("target", capacity, kv, drain),
                    None => Slots::new("target", capacity, drain),
                },
                next_seq: AtomicU64::new(1),
                counters,
                stream_idle: limits.stream_idle,
            }),
        })
    }

    /// Sequences open right now.
    pub fn active(&self) -> u32 {
        self.inner.slots.active()
    }

    /// The load to publish for placement: the open sequences, or the share of the KV budget reserved
    /// (as that many sequences of the capacity) when it is the tighter limit, so routers prefer a
    /// target with room for the cache as well as a free slot.
    pub fn load(&self) -> u32 {
        let slots = &self.inner.slots;
        let by_kv = slots.kv().map_or(0, |(reserved, budget)| {
            (reserved.saturating_mul(u64::from(slots.capacity()))).div_ceil(budget.max(1)) as u32
        });
        slots.active().max(by_kv)
    }

    /// KV tokens reserved by the open sequences and the budget (`None`: no budget).
    pub fn kv(&self) -> Option<(u64, u64)> {
        self.inner.slots.kv()
    }

    /// KV tokens a sequence with this prompt and `max_new_tokens` (0: unbounded) reserves.
    fn kv_need(&self, prompt: usize, max_new: u32) -> u64 {
        let context = self.inner.identity.context.max(1) as u64;
        if max_new == 0 {
            return context;
        }
        (prompt as u64 + u64::from(max_new) + u64::from(crate::drafter::MAX_DRAFT_LEN) + 1)
            .min(context)
    }

    /// Prompt tokens the engine has prefilled since it started.
    pub fn prefilled_tokens(&self) -> u64 {
        self.inner.counters.prefilled.load(Ordering::Relaxed)
    }

    /// Sequences whose KV cache the engine holds (trails [`Self::active`] by the engine's next batch).
    pub fn held(&self) -> u32 {
        self.inner.counters.held.load(Ordering::Relaxed) as u32
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .engine
            .send(make(tx))
            .map_err(|_| Status::unavailable("target engine stopped"))?;
        rx.await
            .map_err(|_| Status::unavailable("target engine stopped"))?
    }

    /// Serves one Verify stream to its end.
    async fn serve_stream(self, mut io: Duplex<pb::VerifyRequest, pb::VerifyResponse>) {
        use pb::verify_request::Msg;
        use pb::verify_response::Msg as Out;
        let wrap = |msg| pb::VerifyResponse { msg: Some(msg) };
        let Some(open) = io
            .first("Verify", |r| match r.msg {
                Some(Msg::Open(open)) => Some(open),
                _ => None,
            })
            .await
        else {
            return;
        };
        let need = self.kv_need(open.prompt_ids.len(), open.max_new_tokens);
        let admitted = convert::sampling(open.sampling.as_ref())
            .and_then(|p| Ok((p, self.inner.slots.admit_kv(need)?)));
        let (params, slot) = match admitted {
            Ok(a) => a,
            Err(s) => {
                io.answer(Err(s)).await;
                return;
            }
        };
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        // Frees the sequence on the engine thread however the stream ends.
        let _guard = SeqGuard {
            inner: Arc::clone(&self.inner),
            seq,
            _slot: slot,
        };
        let prompt = open.prompt_ids;
        let total = prompt.len() as u32;
        let (progress, mut progressed) = watch::channel(0u32);
        let opened = self.call(|reply| Cmd::Open {
            seq,
            prompt,
            params,
            progress,
            allow_samples: open.emit_samples,
            reply,
        });
        tokio::pin!(opened);
        let mut reported = Instant::now();
        // Wait for the prefill, reporting progress if asked, and give it up (the guard's Close drops it
        // on the engine thread between chunks) as soon as the router is gone.
        let opened = loop {
            tokio::select! {
                r = &mut opened => break r,
                changed = progressed.changed(), if open.report_progress => {
                    if changed.is_err() || reported.elapsed() < PROGRESS_EVERY {
                        continue;
                    }
                    reported = Instant::now();
                    let p = pb::verify_response::Prefilling {
                        prefilled: *progressed.borrow_and_update(),
                        total,
                    };
                    if !io.answer(Ok(wrap(Out::Prefilling(p)))).await {
                        return;
                    }
                }
                _ = io.until_gone() => return,
            }
        };
        if !io.answer(opened.map(|o| wrap(Out::Opened(o)))).await {
            return;
        }
        while let Some(request) = io.next().await {
            let reply = match request.msg {
                Some(Msg::Step(step)) => self
                    .call(|reply| Cmd::Step { seq, step, reply })
                    .await
                    .map(|r| wrap(Out::StepResult(r))),
                Some(Msg::Close(_)) => {
                    io.answer(Ok(wrap(Out::Closed(pb::verify_response::Closed {}))))
                        .await;
                    return;
                }
                _ => Err(Status::invalid_argument(
                    "expected Step or Close on an open Verify stream",
                )),
            };
            if !io.answer(reply).await {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Target for TargetService {
    type VerifyStream = ReceiverStream<Result<pb::VerifyResponse, Status>>;

    async fn verify(
        &self,
        request: Request<Streaming<pb::VerifyRequest>>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let span = tracing::info_span!("target.verify");
        specd_service::telemetry::extract(request.metadata(), &span);
        let (tx, rx) = mpsc::channel(2);
        let io = Duplex::new(request.into_inner(), tx, self.inner.stream_idle);
        tokio::spawn(self.clone().serve_stream(io).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let slots = &self.inner.slots;
        let mut info = self.inner.identity.info(
            specd_coord::Role::Target,
            slots.capacity(),
            slots.active(),
            self.held(),
            Vec::new(),
        );
        if let Some((reserved, budget)) = slots.kv() {
            info.kv_budget_tokens = budget;
            info.kv_reserved_tokens = reserved;
        }
        Ok(Response::new(info))
    }
}
