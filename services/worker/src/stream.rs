//! The shape both worker streams share: requests in, exactly one answer out per request, in order (a
//! target may precede its answer to Open with progress reports). A stream ends when the client ends or
//! cancels it, when the client stops reading, when it sends nothing for the idle timeout, or after an
//! error answer; whatever the handler holds for the sequence is then dropped, which frees it.
//!
//! The idle timeout is the last line against leaked sequences: HTTP/2 keepalive on the server closes the
//! connection of a client whose host froze or vanished, and this ends a stream whose client is alive but
//! has stopped driving it.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// How long a worker stream may go without a request before it is ended (the router drives every
/// open sequence at least once per step; its longest legitimate pause is a drafter's open timeout).
pub const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(300);

/// One worker stream as its handler sees it.
pub struct Duplex<Req, Resp> {
    inbound: Streaming<Req>,
    out: mpsc::Sender<Result<Resp, Status>>,
    idle: Duration,
    /// A request read while waiting for the client to go away (see [`Duplex::until_gone`]).
    pending: Option<Req>,
}

impl<Req, Resp> Duplex<Req, Resp> {
    pub fn new(
        inbound: Streaming<Req>,
        out: mpsc::Sender<Result<Resp, Status>>,
        idle: Duration,
    ) -> Self {
        Self {
            inbound,
            out,
            idle,
            pending: None,
        }
    }

    /// The next request; `None` once the client ended, cancelled or walked away from the stream, or
    /// sent nothing for the idle timeout.
    pub async fn next(&mut self) -> Option<Req> {
        if let Some(r) = self.pending.take() {
            return Some(r);
        }
        tokio::select! {
            m = tokio::time::timeout(self.idle, self.inbound.message()) => match m {
                Ok(m) => m.ok().flatten(),
                Err(_) => {
                    tracing::warn!(idle_secs = self.idle.as_secs(), "stream idle too long; ending it");
                    metrics::counter!("specd_worker_idle_streams_closed_total").increment(1);
                    None
                }
            },
            _ = self.out.closed() => None,
        }
    }

    /// Resolves when the client is gone (it cancelled, reset or ended the stream, or stopped reading
    /// answers), for a handler waiting on long work (a prefill) to give it up. A request that arrives
    /// meanwhile is kept for the next [`Duplex::next`].
    pub async fn until_gone(&mut self) {
        if self.pending.is_none() {
            tokio::select! {
                m = self.inbound.message() => match m {
                    Ok(Some(r)) => self.pending = Some(r),
                    _ => return,
                },
                _ = self.out.closed() => return,
            }
        }
        self.out.closed().await;
    }

    /// Sends an answer; false when the stream is over (the client is gone, or this was an error).
    pub async fn answer(&self, r: Result<Resp, Status>) -> bool {
        let failed = r.is_err();
        self.out.send(r).await.is_ok() && !failed
    }

    /// The first request, which `open` must recognise as an Open; anything else is answered
    /// INVALID_ARGUMENT and ends the stream.
    pub async fn first<T>(
        &mut self,
        service: &str,
        open: impl FnOnce(Req) -> Option<T>,
    ) -> Option<T> {
        let first = self.next().await?;
        match open(first) {
            Some(o) => Some(o),
            None => {
                self.answer(Err(Status::invalid_argument(format!(
                    "the first message on a {service} stream must be Open"
                ))))
                .await;
                None
            }
        }
    }
}
