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
use specd_service::grpc::MAX_MESSAGE_BYTES;

/// A failed worker call, classified for the fallback policy.
#[derive(Debug)]
pub enum ConnError {
    /// The worker refused the request as invalid: a bug or a bad request, not a worker failure.
    Invalid(Status),
    /// The worker is full or draining: try another, without ejecting it.
    Busy(Status),
    /// This request cannot go on with this worker, through no fault of the worker (a message over the
    /// size limit, a drafter prefill of a long prompt that outlasted its timeout): go on without it
    /// for this request, but leave it in placement for every other request.
    Refused(String),
    /// The worker failed, vanished or stalled: eject it and go on elsewhere.
    Failed(String),
}

impl ConnError {
    pub(crate) fn from_status(s: Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => ConnError::Invalid(s),
            tonic::Code::ResourceExhausted => ConnError::Busy(s),
            tonic::Code::Unavailable if s.message().contains("draining") => ConnError::Busy(s),
            // tonic's answer to a message over the encode or decode limit, on either side: a property
            // of this request's message, not of the worker.
            tonic::Code::OutOfRange => ConnError::Refused(format!("{}: {}", s.code(), s.message())),
            _ => ConnError::Failed(format!("{}: {}", s.code(), s.message())),
        }
    }

    pub fn message(&self) -> String {
        match self {
            ConnError::Invalid(s) | ConnError::Busy(s) => s.message().to_string(),
            ConnError::Refused(m) | ConnError::Failed(m) => m.clone(),
        }
    }
}

/// Extra time a drafter gets to open a sequence per prompt token, on top of its open timeout: a model
/// drafter prefills the whole prompt, and a long one legitimately takes a while on a CPU.
pub const DRAFTER_OPEN_PER_TOKEN: Duration = Duration::from_millis(10);

fn target_client(lease: &Lease) -> TargetClient<tonic::transport::Channel> {
    TargetClient::new(lease.worker.channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn drafter_client(lease: &Lease) -> DrafterClient<tonic::transport::Channel> {
    DrafterClient::new(lease.worker.channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
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
        self.receive().await
    }

    /// The next message, under the timeout.
    async fn receive(&mut self) -> Result<Resp, ConnError> {
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
    /// Opens the sequence and waits for its prefill. The target reports progress while it prefills,
    /// and `timeout` bounds the wait for each report, not the whole prefill: a long prompt gets as long
    /// as it keeps progressing, and a target that stops making progress is a failed one.
    pub async fn open(
        lease: Lease,
        sequence_id: &str,
        history: &[u32],
        max_new: u32,
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
                // The router allows it; the target samples a fraction of sequences, and only while
                // a trainer is registered.
                emit_samples: true,
                report_progress: true,
                max_new_tokens: max_new,
            })),
        };
        let mut client = target_client(&lease);
        let rx = tokio::time::timeout(timeout, client.verify(request(rx, deadline)))
            .await
            .map_err(|_| ConnError::Failed("no answer to the stream call".into()))?
            .map_err(ConnError::from_status)?
            .into_inner();
        let mut duplex = Duplex { tx, rx, timeout };
        let mut answer = duplex.exchange(open).await?;
        loop {
            match answer.msg {
                Some(pb::verify_response::Msg::Opened(_)) => {
                    return Ok(Self {
                        lease,
                        duplex,
                        valid: history.len(),
                    })
                }
                Some(pb::verify_response::Msg::Prefilling(_)) => answer = duplex.receive().await?,
                _ => {
                    return Err(ConnError::Failed(
                        "target answered Open with something else".into(),
                    ))
                }
            }
        }
    }

    /// One verify step over `drafts` on top of `history`, drafted by `drafter` (kind, version).
    pub async fn step(
        &mut self,
        history: &[u32],
        drafts: &[u32],
        q: &[pb::SparseDist],
        feedback_width: u32,
        drafter: Option<(&str, &str)>,
    ) -> Result<pb::verify_response::StepResult, ConnError> {
        let (drafter_kind, drafter_version) = drafter.unwrap_or_default();
        let req = pb::VerifyRequest {
            msg: Some(pb::verify_request::Msg::Step(pb::verify_request::Step {
                drafts: drafts.to_vec(),
                q: q.to_vec(),
                keep_len: self.valid as u32,
                append_ids: history[self.valid..].to_vec(),
                feedback_width,
                drafter_kind: drafter_kind.to_string(),
                drafter_version: drafter_version.to_string(),
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
    /// Weights version of the drafter serving this sequence, as it reported at Open.
    pub version: String,
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
        let mut client = drafter_client(&lease);
        let rx = tokio::time::timeout(open_timeout, client.draft(request(rx, deadline)))
            .await
            .map_err(|_| ConnError::Failed("no answer to the stream call".into()))?
            .map_err(ConnError::from_status)?
            .into_inner();
        // Opening prefills a model drafter: give it the open timeout, longer for a longer prompt, then
        // the per-step one. A prefill that outlasts it is this prompt's problem, not the drafter's.
        let prefill_timeout = open_timeout + DRAFTER_OPEN_PER_TOKEN * history.len() as u32;
        let mut duplex = Duplex {
            tx,
            rx,
            timeout: prefill_timeout,
        };
        let answer = match duplex.exchange(open).await {
            Err(ConnError::Failed(m)) if m.starts_with("no answer within") => {
                return Err(ConnError::Refused(format!(
                    "prefill of {} tokens: {m}",
                    history.len()
                )))
            }
            r => r?,
        };
        let opened = match answer.msg {
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
            version: opened.drafter_version,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_message_is_refused_not_a_worker_failure() {
        // What tonic answers when a message exceeds the decode limit (client or server side).
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 6815744 bytes, the limit is: 4194304 bytes",
        );
        assert!(matches!(ConnError::from_status(s), ConnError::Refused(_)));
        assert!(matches!(
            ConnError::from_status(Status::resource_exhausted("full")),
            ConnError::Busy(_)
        ));
        assert!(matches!(
            ConnError::from_status(Status::internal("boom")),
            ConnError::Failed(_)
        ));
        assert!(matches!(
            ConnError::from_status(Status::invalid_argument("bad")),
            ConnError::Invalid(_)
        ));
    }
}
