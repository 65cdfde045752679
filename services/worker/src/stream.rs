//! The shape both worker streams share: requests in, exactly one answer out per request, in order. A
//! stream ends when the client ends or cancels it, when the client stops reading, or after an error
//! answer; whatever the handler holds for the sequence is then dropped, which frees it.

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// One worker stream as its handler sees it.
pub struct Duplex<Req, Resp> {
    inbound: Streaming<Req>,
    out: mpsc::Sender<Result<Resp, Status>>,
}

impl<Req, Resp> Duplex<Req, Resp> {
    pub fn new(inbound: Streaming<Req>, out: mpsc::Sender<Result<Resp, Status>>) -> Self {
        Self { inbound, out }
    }

    /// The next request; `None` once the client ended, cancelled or walked away from the stream.
    pub async fn next(&mut self) -> Option<Req> {
        tokio::select! {
            m = self.inbound.message() => m.ok().flatten(),
            _ = self.out.closed() => None,
        }
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
