//! The drafter worker: the engine's drafters behind the `Drafter.Draft` stream.
//!
//! Each stream owns one drafter instance for its sequence (a draft model or self-drafter with its own KV
//! cache over shared weights, or an n-gram drafter that learns into the worker-wide recycling table) and
//! its token sequence. Proposals run on tokio's blocking pool, since a model drafter runs k forwards.
//! Drafter samples are drawn from their own random stream, derived from the request seed. A model
//! drafter samples from its top `DRAFT_SUPPORT` tokens, so every q it sends is small by construction.

use std::sync::Arc;
use std::time::Instant;

use specd_core::{Sampler, SamplingParams};
use specd_engine::drafter::{
    Drafter, DrafterKind, Feedback, ModelDrafter, NgramConfig, SharedNgram,
};
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::drafter_server;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::convert;
use crate::slots::Slots;
use crate::stream::Duplex;
use crate::swap::LiveDrafter;
use crate::WorkerIdentity;

/// Most tokens one Propose may ask for.
pub const MAX_DRAFT_LEN: u32 = 32;

/// Mixed into a request's seed for the drafter's own random stream, so it never replays the target's.
const DRAFT_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// What a drafter worker can draft with.
#[derive(Clone)]
pub struct DrafterModels {
    /// A separate draft model, for kind `model`, with its live trained (LoRA) version.
    pub draft: Option<LiveDrafter>,
    /// The self-drafter (the target's first layers), for kind `self`, with its live trained version.
    pub self_drafter: Option<LiveDrafter>,
    /// Whether the model-free kinds (`ngram`, `auto`) are offered.
    pub ngram: bool,
    /// Context length sequences are limited to (the target's).
    pub context: usize,
    /// Vocabulary size (the target's).
    pub vocab: usize,
}

impl DrafterModels {
    /// The kinds offered, as named on the wire.
    pub fn kinds(&self) -> Vec<String> {
        let mut k = Vec::new();
        if self.draft.is_some() {
            k.push("model".to_string());
        }
        if self.self_drafter.is_some() {
            k.push("self".to_string());
        }
        if self.ngram {
            k.push("ngram".to_string());
            k.push("auto".to_string());
        }
        k
    }
}

/// The `Drafter` gRPC service.
#[derive(Clone)]
pub struct DrafterService {
    inner: Arc<Inner>,
}

struct Inner {
    models: DrafterModels,
    shared_ngram: SharedNgram,
    identity: WorkerIdentity,
    slots: Slots,
    stream_idle: std::time::Duration,
}

/// One stream's sequence.
struct SeqState {
    drafter: Box<dyn Drafter>,
    /// Version of the drafter's weights, reported in `Opened`.
    version: String,
    tokens: Vec<u32>,
    params: SamplingParams,
    sampler: Sampler,
}

impl DrafterService {
    pub fn new(
        models: DrafterModels,
        identity: WorkerIdentity,
        capacity: u32,
        stream_idle: std::time::Duration,
        drain: specd_service::Drain,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                models,
                shared_ngram: SharedNgram::default(),
                identity,
                slots: Slots::new("drafter", capacity, drain),
                stream_idle,
            }),
        }
    }

    pub fn kinds(&self) -> Vec<String> {
        self.inner.models.kinds()
    }

    pub fn active(&self) -> u32 {
        self.inner.slots.active()
    }

    /// A drafter of `kind` for one sequence, and the version of its weights. A seeded request gets an
    /// n-gram drafter with its own fresh state instead of the worker-wide one: its proposals, and so its
    /// random draws, must not depend on what other requests taught the shared table (same seed, same
    /// output). A trained drafter (draft model or self-drafter) is the version live when the sequence opens,
    /// to its end.
    fn build(&self, kind: &str, seeded: bool) -> Result<(Box<dyn Drafter>, String), Status> {
        let m = &self.inner.models;
        let kind: DrafterKind = kind
            .parse()
            .map_err(|e: specd_engine::EngineError| Status::invalid_argument(e.to_string()))?;
        let unavailable = || {
            Status::invalid_argument(format!(
                "this drafter worker has no {:?} drafter (it offers {:?})",
                kind.name(),
                m.kinds()
            ))
        };
        let version = self.inner.identity.weights_version.clone();
        Ok(match kind {
            DrafterKind::Model => {
                let (model, v) = m.draft.as_ref().ok_or_else(unavailable)?.current();
                (
                    Box::new(ModelDrafter::new(DrafterKind::Model, model)),
                    v.to_string(),
                )
            }
            DrafterKind::SelfLayers => {
                let (model, v) = m.self_drafter.as_ref().ok_or_else(unavailable)?.current();
                (
                    Box::new(ModelDrafter::new(DrafterKind::SelfLayers, model)),
                    v.to_string(),
                )
            }
            DrafterKind::Ngram | DrafterKind::Auto if m.ngram => {
                let learned = if seeded {
                    SharedNgram::default()
                } else {
                    self.inner.shared_ngram.clone()
                };
                let mut d = specd_engine::drafter::NgramDrafter::with_shared(
                    NgramConfig::default(),
                    learned,
                );
                d.set_kind(kind);
                (Box::new(d), version)
            }
            _ => return Err(unavailable()),
        })
    }

    async fn open(&self, open: pb::draft_request::Open) -> Result<SeqState, Status> {
        let m = &self.inner.models;
        if open.prompt_ids.is_empty() {
            return Err(Status::invalid_argument("open: prompt_ids is empty"));
        }
        if open.prompt_ids.len() >= m.context {
            return Err(Status::invalid_argument(format!(
                "open: prompt of {} tokens leaves no room in the context of {}",
                open.prompt_ids.len(),
                m.context
            )));
        }
        convert::check_tokens("open: prompt_ids", &open.prompt_ids, m.vocab)?;
        let params = convert::sampling(open.sampling.as_ref())?;
        let (mut drafter, version) = self.build(&open.drafter_kind, params.seed.is_some())?;
        let prompt = open.prompt_ids;
        let sampler = Sampler::new(params.seed.map(|s| s ^ DRAFT_SEED_SALT));
        let (drafter, prompt) =
            tokio::task::spawn_blocking(move || drafter.begin(&prompt).map(|()| (drafter, prompt)))
                .await
                .map_err(|e| Status::internal(format!("drafter prefill panicked: {e}")))?
                .map_err(convert::status)?;
        Ok(SeqState {
            drafter,
            version,
            tokens: prompt,
            params,
            sampler,
        })
    }

    async fn serve_stream(self, mut io: Duplex<pb::DraftRequest, pb::DraftResponse>) {
        use pb::draft_request::Msg;
        use pb::draft_response::Msg as Out;
        let wrap = |msg| pb::DraftResponse { msg: Some(msg) };
        let Some(open) = io
            .first("Draft", |r| match r.msg {
                Some(Msg::Open(open)) => Some(open),
                _ => None,
            })
            .await
        else {
            return;
        };
        let _slot = match self.inner.slots.admit() {
            Ok(s) => s,
            Err(s) => {
                io.answer(Err(s)).await;
                return;
            }
        };
        let mut state = match self.open(open).await {
            Ok(s) => s,
            Err(s) => {
                io.answer(Err(s)).await;
                return;
            }
        };
        let opened = pb::draft_response::Opened {
            context_len: state.tokens.len() as u32,
            drafter_version: state.version.clone(),
            feedback_width: state.drafter.feedback_width() as u32,
        };
        if !io.answer(Ok(wrap(Out::Opened(opened)))).await {
            return;
        }
        while let Some(request) = io.next().await {
            let reply = match request.msg {
                Some(Msg::Propose(p)) => {
                    let (s, r) = self.propose(state, p).await;
                    let r = r.map(|p| wrap(Out::Proposal(p)));
                    let Some(s) = s else {
                        // The drafter was lost: report and end the stream.
                        io.answer(r).await;
                        return;
                    };
                    state = s;
                    r
                }
                Some(Msg::Close(_)) => {
                    io.answer(Ok(wrap(Out::Closed(pb::draft_response::Closed {}))))
                        .await;
                    return;
                }
                _ => Err(Status::invalid_argument(
                    "expected Propose or Close on an open Draft stream",
                )),
            };
            if !io.answer(reply).await {
                return;
            }
        }
    }

    /// Runs one Propose; gives the state back unless the drafter was lost (a panic).
    async fn propose(
        &self,
        mut state: SeqState,
        p: pb::draft_request::Propose,
    ) -> (
        Option<SeqState>,
        Result<pb::draft_response::Proposal, Status>,
    ) {
        let m = &self.inner.models;
        let keep = p.keep_len as usize;
        let check = (|| {
            if keep > state.tokens.len() {
                return Err(Status::invalid_argument(format!(
                    "propose: keep_len {keep} exceeds the sequence length {}",
                    state.tokens.len()
                )));
            }
            if p.k == 0 || p.k > MAX_DRAFT_LEN {
                return Err(Status::invalid_argument(format!(
                    "propose: k must be in 1..={MAX_DRAFT_LEN}, got {}",
                    p.k
                )));
            }
            convert::check_tokens("propose: append_ids", &p.append_ids, m.vocab)?;
            if keep + p.append_ids.len() == 0 {
                return Err(Status::invalid_argument(
                    "propose: the context would be empty",
                ));
            }
            if keep + p.append_ids.len() >= m.context {
                return Err(Status::invalid_argument("propose: the context is full"));
            }
            if let Some(f) = &p.feedback {
                if f.target_top.len() != f.inputs.len() * f.width as usize {
                    return Err(Status::invalid_argument(
                        "propose: feedback needs width candidates per input",
                    ));
                }
            }
            Ok(())
        })();
        if let Err(s) = check {
            return (Some(state), Err(s));
        }
        state.tokens.truncate(keep);
        state.tokens.extend_from_slice(&p.append_ids);
        let k = (p.k as usize).min(m.context - state.tokens.len());
        let t0 = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            if let Some(f) = &p.feedback {
                let w = f.width as usize;
                let top: Vec<Vec<u32>> = if w == 0 {
                    Vec::new()
                } else {
                    f.target_top.chunks(w).map(<[u32]>::to_vec).collect()
                };
                if !top.is_empty() {
                    state.drafter.observe(&Feedback {
                        inputs: &f.inputs,
                        target_top: &top,
                    });
                }
            }
            if !p.step_costs.is_empty() {
                let costs: Vec<f64> = p.step_costs.iter().map(|&c| f64::from(c)).collect();
                state.drafter.set_step_costs(&costs);
            }
            let tc = Instant::now();
            let caught = state.drafter.catch_up(&state.tokens);
            let catch_up_ms = tc.elapsed().as_secs_f64() * 1000.0;
            let r = caught.and_then(|()| {
                state
                    .drafter
                    .propose(&state.tokens, k, &state.params, &mut state.sampler)
            });
            (state, r, catch_up_ms)
        })
        .await;
        let (mut state, r, catch_up_ms) = match joined {
            Ok(x) => x,
            Err(e) => {
                return (
                    None,
                    Err(Status::internal(format!("drafter panicked: {e}"))),
                )
            }
        };
        let draft_ms = t0.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("specd_worker_step_seconds", "role" => "drafter")
            .record(draft_ms / 1000.0);
        match r {
            Ok(mut proposal) => {
                proposal.tokens.truncate(k);
                proposal.q.truncate(proposal.tokens.len());
                state.tokens.extend_from_slice(&proposal.tokens);
                let q = proposal.q.iter().map(convert::dist_to_wire).collect();
                (
                    Some(state),
                    Ok(pb::draft_response::Proposal {
                        tokens: proposal.tokens,
                        q,
                        draft_ms,
                        catch_up_ms,
                    }),
                )
            }
            Err(e) => (Some(state), Err(convert::status(e))),
        }
    }
}

#[tonic::async_trait]
impl drafter_server::Drafter for DrafterService {
    type DraftStream = ReceiverStream<Result<pb::DraftResponse, Status>>;

    async fn draft(
        &self,
        request: Request<Streaming<pb::DraftRequest>>,
    ) -> Result<Response<Self::DraftStream>, Status> {
        let span = tracing::info_span!("drafter.draft");
        specd_service::telemetry::extract(request.metadata(), &span);
        let (tx, rx) = mpsc::channel(2);
        let io = Duplex::new(request.into_inner(), tx, self.inner.stream_idle);
        tokio::spawn(self.clone().serve_stream(io).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let slots = &self.inner.slots;
        Ok(Response::new(self.inner.identity.info(
            specd_coord::Role::Drafter,
            slots.capacity(),
            slots.active(),
            // A sequence's drafter state lives in its stream task and goes with it.
            slots.active(),
            self.kinds(),
        )))
    }
}
