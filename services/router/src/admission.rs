//! Admission control: at most `max_concurrent` requests generate at once, at most `max_queue` wait for
//! a slot; anything beyond is refused at once with RESOURCE_EXHAUSTED (HTTP 429), never queued without
//! bound. A waiting request gives up at its deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

#[derive(Clone, Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_concurrent: usize,
    max_queue: usize,
}

/// A generation slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_concurrent,
            max_queue,
        }
    }

    /// Requests generating now.
    pub fn running(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Takes a slot, waiting in the bounded queue if needed.
    pub async fn admit(&self, deadline: Option<tokio::time::Instant>) -> Result<Admitted, Status> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(Admitted { _permit: p });
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "overloaded: {} requests running and {} waiting (limits {} and {})",
                self.running(),
                self.waiting(),
                self.max_concurrent,
                self.max_queue
            )));
        }
        let _waiting = Waiting(&self.waiting);
        let acquire = Arc::clone(&self.slots).acquire_owned();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquire)
                .await
                .map_err(|_| Status::deadline_exceeded("deadline passed while queued"))?,
            None => acquire.await,
        };
        permit
            .map(|p| Admitted { _permit: p })
            .map_err(|_| Status::unavailable("router is shutting down"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded() {
        let a = Admission::new(1, 1);
        let first = a.admit(None).await.expect("slot");
        let a2 = a.clone();
        let queued = tokio::spawn(async move { a2.admit(None).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(a.waiting(), 1);
        let err = a.admit(None).await.expect_err("queue full");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        drop(first);
        queued
            .await
            .expect("join")
            .expect("admitted after the slot freed");
        assert_eq!(a.waiting(), 0);
    }

    #[tokio::test]
    async fn queued_request_gives_up_at_its_deadline() {
        let a = Admission::new(1, 4);
        let _first = a.admit(None).await.expect("slot");
        let d = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        let err = a.admit(Some(d)).await.expect_err("deadline");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(a.waiting(), 0);
    }
}
