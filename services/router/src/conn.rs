//! One sequence's streams to its workers: open a `Target.Verify` or `Drafter.Draft` stream on a placed
//! worker (prefilling the router's tokens so far), then one request and one response per step.
//!
//! Each connection tracks `valid`, the length of the prefix of the router's token history that the
//! worker's sequence agrees with, so every step carries exactly the rollback (`keep_len = valid`) and
//! the tokens the worker lacks (`append_ids = history[valid..]`). Dropping a connection ends its
//! stream, and the worker frees the sequence.

use std::time::Duration;

use specd_core::SamplingParams;
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::drafter_client::DrafterClient;
use specd_proto::internal::v1::target_client::TargetClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::pool::Lease;

/// A failed worker call, classified for the fallback policy.
#[derive(Debug)]
pub enum ConnError {
    /// The worker refused the request as invalid: a bug or a bad request, not a worker failure.
    Invalid(Status),
    /// The worker is full or draining: try another, without ejecting it.
    Busy(Status),
    /// The worker failed, vanished or stalled: eject it and go on elsewhere.
    Failed(String),
}

impl ConnError {
    fn from_status(s: Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => ConnError::Invalid(s),
            tonic::Code::ResourceExhausted => ConnError::Busy(s),
            tonic::Code::Unavailable if s.message().contains("draining") => ConnError::Busy(s),
            _ => ConnError::Failed(format!("{}: {}", s.code(), s.message())),
        }
    }

    pub fn message(&self) -> String {
        match self {
            ConnError::Invalid(s) | ConnError::Busy(s) => s.message().to_string(),
            ConnError::Failed(m) => m.clone(),
        }
    }
}

/// A bidirectional stream: requests out, responses in, each exchange under a timeout.
struct Duplex<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
    timeout: Duration,
}

impl<Req, Resp> Duplex<Req, Resp> {
    async fn exchange(&mut self, req: Req) -> Result<Resp, ConnError> {
        if self.tx.send(req).await.is_err() {
            return Err(ConnError::Failed("stream closed".into()));
        }
        match tokio::time::timeout(self.timeout, self.rx.message()).await {
            Err(_) => Err(ConnError::Failed(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
            Ok(Err(s)) => Err(ConnError::from_status(s)),
            Ok(Ok(None)) => Err(ConnError::Failed("stream ended".into())),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }
}

fn request<Req>(
    rx: mpsc::Receiver<Req>,
    deadline: Option<tokio::time::Instant>,
) -> tonic::Request<ReceiverStream<Req>> {
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    specd_service::telemetry::inject(req.metadata_mut());
    if let Some(d) = deadline {
        req.set_timeout(d.saturating_duration_since(tokio::time::Instant::now()));
    }
    req
}

/// An open `Target.Verify` stream.
pub struct TargetConn {
    pub lease: Lease,
    duplex: Duplex<pb::VerifyRequest, pb::VerifyResponse>,
    /// Prefix of the router's history the target's sequence agrees with.
    pub valid: usize,
}

impl TargetConn {
    pub async fn open(
        lease: Lease,
        sequence_id: &str,
        history: &[u32],
        params: &SamplingParams,
        timeout: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Self, ConnError> {
        let (tx, rx) = mpsc::channel(2);
        let open = pb::VerifyRequest {
            msg: Some(pb::verify_request::Msg::Open(pb::verify_request::Open {
                sequence_id: sequence_id.to_string(),
                prompt_ids: history.to_vec(),
                sampling: Some(wire_params(params)),
                emit_samples: false,
            })),
        };
        let mut client = TargetClient::new(lease.worker.channel.clone());
        let rx = tokio::time::timeout(timeout, client.verify(request(rx, deadline)))
            .await
            .map_err(|_| ConnError::Failed("no answer to the stream call".into()))?
            .map_err(ConnError::from_status)?
            .into_inner();
        let mut duplex = Duplex { tx, rx, timeout };
        match duplex.exchange(open).await?.msg {
            Some(pb::verify_response::Msg::Opened(_)) => Ok(Self {
                lease,
                duplex,
                valid: history.len(),
            }),
            _ => Err(ConnError::Failed(
                "target answered Open with something else".into(),
            )),
        }
    }

    /// One verify step over `drafts` on top of `history`.
    pub async fn step(
        &mut self,
        history: &[u32],
        drafts: &[u32],
        q: &[pb::SparseDist],
        feedback_width: u32,
    ) -> Result<pb::verify_response::StepResult, ConnError> {
        let req = pb::VerifyRequest {
            msg: Some(pb::verify_request::Msg::Step(pb::verify_request::Step {
                drafts: drafts.to_vec(),
                q: q.to_vec(),
                keep_len: self.valid as u32,
                append_ids: history[self.valid..].to_vec(),
                feedback_width,
            })),
        };
        match self.duplex.exchange(req).await?.msg {
            Some(pb::verify_response::Msg::StepResult(r)) => {
                if r.accepted as usize > drafts.len() {
                    return Err(ConnError::Failed(format!(
                        "target accepted {} of {} drafts",
                        r.accepted,
                        drafts.len()
                    )));
                }
                self.valid = history.len() + r.accepted as usize;
                Ok(r)
            }
            _ => Err(ConnError::Failed(
                "target answered Step with something else".into(),
            )),
        }
    }
}

/// An open `Drafter.Draft` stream.
pub struct DrafterConn {
    pub lease: Lease,
    pub kind: String,
    duplex: Duplex<pb::DraftRequest, pb::DraftResponse>,
    pub valid: usize,
    pub feedback_width: u32,
}

impl DrafterConn {
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        lease: Lease,
        kind: &str,
        sequence_id: &str,
        history: &[u32],
        params: &SamplingParams,
        timeout: Duration,
        open_timeout: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Self, ConnError> {
        let (tx, rx) = mpsc::channel(2);
        let open = pb::DraftRequest {
            msg: Some(pb::draft_request::Msg::Open(pb::draft_request::Open {
                sequence_id: sequence_id.to_string(),
                drafter_kind: kind.to_string(),
                prompt_ids: history.to_vec(),
                sampling: Some(wire_params(params)),
            })),
        };
        let mut client = DrafterClient::new(lease.worker.channel.clone());
        let rx = tokio::time::timeout(open_timeout, client.draft(request(rx, deadline)))
            .await
            .map_err(|_| ConnError::Failed("no answer to the stream call".into()))?
            .map_err(ConnError::from_status)?
            .into_inner();
        // Opening prefills a model drafter: give it the open timeout, then the per-step one.
        let mut duplex = Duplex {
            tx,
            rx,
            timeout: open_timeout,
        };
        let opened = match duplex.exchange(open).await?.msg {
            Some(pb::draft_response::Msg::Opened(o)) => o,
            _ => {
                return Err(ConnError::Failed(
                    "drafter answered Open with something else".into(),
                ))
            }
        };
        duplex.timeout = timeout;
        Ok(Self {
            lease,
            kind: kind.to_string(),
            duplex,
            valid: history.len(),
            feedback_width: opened.feedback_width,
        })
    }

    /// Asks for up to `k` drafts continuing `history`.
    pub async fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        step_costs: Vec<f32>,
        feedback: Option<pb::StepFeedback>,
    ) -> Result<pb::draft_response::Proposal, ConnError> {
        let req = pb::DraftRequest {
            msg: Some(pb::draft_request::Msg::Propose(
                pb::draft_request::Propose {
                    k: k as u32,
                    append_ids: history[self.valid..].to_vec(),
                    keep_len: self.valid as u32,
                    step_costs,
                    feedback,
                },
            )),
        };
        match self.duplex.exchange(req).await?.msg {
            Some(pb::draft_response::Msg::Proposal(p)) => {
                if p.tokens.len() > k || p.q.len() != p.tokens.len() {
                    return Err(ConnError::Failed(format!(
                        "drafter sent {} tokens and {} distributions for k = {k}",
                        p.tokens.len(),
                        p.q.len()
                    )));
                }
                self.valid = history.len();
                Ok(p)
            }
            _ => Err(ConnError::Failed(
                "drafter answered Propose with something else".into(),
            )),
        }
    }

    /// After a verify step that accepted `accepted` of this drafter's tokens on top of `history_len`.
    pub fn accepted(&mut self, history_len: usize, accepted: usize) {
        self.valid = history_len + accepted;
    }
}

fn wire_params(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        seed: p.seed,
    }
}
