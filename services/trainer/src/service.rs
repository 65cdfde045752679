//! The `Trainer` gRPC service and the trainer's leadership.
//!
//! `FetchWeights` streams a published version's file from the weight store (the live one when no version
//! is named). `SubmitSamples` validates each sample and files it in the replay buffer; what it cannot take (not
//! the leader, malformed, another model) is dropped and counted, both in the ack and in
//! `specd_trainer_samples_total{outcome, reason}`: a sender never waits on the trainer's judgement.
//! The buffer sits behind a `std::sync::Mutex`: it is touched for microseconds per sample and never
//! across an `.await`.
//!
//! [`lead`] campaigns for the trainer election key of the model (`/specd/v1/election/trainer/{model}`)
//! with a lease of its own and the trainer's address as the value; target workers send to whoever holds
//! it. When the lease or the key is lost, it campaigns again; a standby waiting in `campaign` takes over
//! as soon as the leader's key is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use specd_coord::{keys, Store};
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::trainer_server::Trainer;
use specd_service::Shutdown;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::buffer::{validate, BufferConfig, ReplayBuffer};
use crate::publish::LiveCounts;
use crate::weights::WeightStore;

/// What the training loop last reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingStatus {
    pub steps: u64,
    pub last_loss: f64,
    /// Held-out expected acceptance of the live version, at the latest evaluation.
    pub acceptance_live: f64,
    /// Held-out expected acceptance of the adapter being trained.
    pub acceptance_candidate: f64,
    /// Steps skipped because the cluster was busy.
    pub yielded: u64,
    /// The version live now (0: the drafter as loaded).
    pub live_version: u64,
    pub publishes: u64,
    pub rollbacks: u64,
    /// Positions trained on (new and replayed) and the seconds the optimizer steps took.
    pub trained_positions: u64,
    pub trained_seconds: f64,
}

/// What the trainer trains for.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// The target model's id (as its workers register it).
    pub model: String,
    /// The target's vocabulary size, to check token ids.
    pub vocab: usize,
    pub buffer: BufferConfig,
    /// Where published weight files are kept and served from.
    pub weights: WeightStore,
}

/// The `Trainer` gRPC service.
#[derive(Clone)]
pub struct TrainerService {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: TrainerConfig,
    buffer: Arc<Mutex<ReplayBuffer>>,
    /// What the training loop reports (steps, loss, gate figures).
    training: Arc<Mutex<TrainingStatus>>,
    leader: Arc<AtomicBool>,
    live: LiveCounts,
    accepted: AtomicU64,
    dropped: AtomicU64,
}

impl TrainerService {
    pub fn new(cfg: TrainerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                buffer: Arc::new(Mutex::new(ReplayBuffer::new(cfg.buffer))),
                training: Arc::default(),
                cfg,
                leader: Arc::new(AtomicBool::new(false)),
                live: LiveCounts::default(),
                accepted: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// The flag [`lead`] sets while this trainer leads.
    pub fn leader_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.inner.leader)
    }

    fn buffer(&self) -> MutexGuard<'_, ReplayBuffer> {
        self.inner.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replay buffer, shared with the training loop.
    pub fn buffer_handle(&self) -> Arc<Mutex<ReplayBuffer>> {
        Arc::clone(&self.inner.buffer)
    }

    /// Where the training loop reports, shared with `Status`.
    pub fn training_handle(&self) -> Arc<Mutex<TrainingStatus>> {
        Arc::clone(&self.inner.training)
    }

    /// Drafted and accepted tokens per drafter version, from the samples received.
    pub fn live_counts(&self) -> LiveCounts {
        self.inner.live.clone()
    }

    /// Files a sample as if it had arrived over `SubmitSamples`; whether it was kept.
    pub fn submit(&self, s: pb::DistillSample) -> bool {
        self.take(s)
    }

    /// Positions in the replay buffer.
    pub fn buffered_positions(&self) -> usize {
        self.buffer().positions()
    }

    /// Files one wire sample; whether it was kept.
    fn take(&self, s: pb::DistillSample) -> bool {
        let outcome = if !self.inner.leader.load(Ordering::Relaxed) {
            Err("not_leader")
        } else {
            let kind = s.drafter_kind.clone();
            match validate(s, &self.inner.cfg.model, self.inner.cfg.vocab) {
                Ok(sample) => {
                    let drafted = sample.positions.iter().filter(|p| p.draft.is_some());
                    let (d, a) =
                        drafted.fold((0, 0), |(d, a), p| (d + 1, a + u64::from(!p.rejected)));
                    self.inner.live.record(&sample.drafter_version, d, a);
                    let mut b = self.buffer();
                    b.add(&kind, sample);
                    metrics::gauge!("specd_trainer_buffer_positions").set(b.positions() as f64);
                    Ok(())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "sample refused");
                    Err(e.reason())
                }
            }
        };
        match outcome {
            Ok(()) => {
                self.inner.accepted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("specd_trainer_samples_total", "outcome" => "accepted", "reason" => "")
                    .increment(1);
                true
            }
            Err(reason) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("specd_trainer_samples_total", "outcome" => "dropped", "reason" => reason)
                    .increment(1);
                false
            }
        }
    }
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    async fn submit_samples(
        &self,
        request: Request<Streaming<pb::DistillSample>>,
    ) -> Result<Response<pb::SubmitAck>, Status> {
        let mut stream = request.into_inner();
        let (mut accepted, mut dropped) = (0u64, 0u64);
        while let Some(s) = stream.message().await? {
            if self.take(s) {
                accepted += 1;
            } else {
                dropped += 1;
            }
        }
        Ok(Response::new(pb::SubmitAck { accepted, dropped }))
    }

    type FetchWeightsStream = ReceiverStream<Result<pb::WeightChunk, Status>>;

    async fn fetch_weights(
        &self,
        request: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let r = request.into_inner();
        let cfg = &self.inner.cfg;
        if r.model != cfg.model {
            return Err(Status::not_found(format!(
                "this trainer trains drafters of {:?}, not {:?}",
                cfg.model, r.model
            )));
        }
        let version: u64 = if r.version.is_empty() {
            self.inner
                .training
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .live_version
        } else {
            r.version.parse().map_err(|_| {
                Status::invalid_argument(format!("version {:?} is not a number", r.version))
            })?
        };
        let chunks = cfg.weights.chunks(&r.model, &r.drafter_kind, version)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for c in chunks {
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
            }
        });
        metrics::counter!("specd_trainer_weight_fetches_total").increment(1);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _: Request<pb::TrainerStatusRequest>,
    ) -> Result<Response<pb::TrainerStatus>, Status> {
        let t = self
            .inner
            .training
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Response::new(pb::TrainerStatus {
            leader: self.inner.leader.load(Ordering::Relaxed),
            live_version: t.live_version.to_string(),
            buffered_samples: self.buffer().samples() as u64,
            steps: t.steps,
            last_loss: t.last_loss,
            gate_acceptance_live: t.acceptance_live,
            gate_acceptance_candidate: t.acceptance_candidate,
        }))
    }
}

/// Leads the trainer election of `model` whenever it can, with `address` as the key's value, until
/// `stop`; `leader` is true exactly while it leads.
pub async fn lead(
    store: Store,
    model: String,
    address: String,
    ttl: Duration,
    leader: Arc<AtomicBool>,
    stop: Shutdown,
) {
    let key = keys::trainer_election(&model);
    let retry = Duration::from_millis(500);
    loop {
        let lease = tokio::select! {
            l = store.grant_lease(ttl) => l,
            _ = stop.wait() => return,
        };
        let lease = match lease {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "granting the election lease failed; retrying");
                tokio::select! { _ = tokio::time::sleep(retry) => continue, _ = stop.wait() => return }
            }
        };
        let keep = match store.keep_alive(lease).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the election lease alive failed; retrying");
                continue;
            }
        };
        let won = tokio::select! {
            w = store.campaign(&key, address.clone(), lease) => w,
            _ = keep.lost() => continue,
            _ = stop.wait() => {
                let _ = store.revoke(lease).await;
                return;
            }
        };
        let leadership = match won {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::select! { _ = tokio::time::sleep(retry) => continue, _ = stop.wait() => return }
            }
        };
        leader.store(true, Ordering::Relaxed);
        metrics::gauge!("specd_trainer_leader").set(1.0);
        tracing::info!(model = %model, "leading the trainer election");
        let stopping = tokio::select! {
            _ = leadership.lost() => false,
            _ = keep.lost() => false,
            _ = stop.wait() => true,
        };
        leader.store(false, Ordering::Relaxed);
        metrics::gauge!("specd_trainer_leader").set(0.0);
        if stopping {
            let _ = leadership.resign().await;
            let _ = store.revoke(lease).await;
            return;
        }
        tracing::warn!(model = %model, "trainer leadership lost; campaigning again");
    }
}
