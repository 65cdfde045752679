//! Admission of sequences on a worker: a fixed number of slots, refused with RESOURCE_EXHAUSTED when
//! full and with UNAVAILABLE while the worker drains.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use specd_service::shutdown::InFlight;
use specd_service::Drain;
use tonic::Status;

/// The sequence slots of one worker.
#[derive(Clone, Debug)]
pub struct Slots {
    inner: Arc<SlotsInner>,
}

#[derive(Debug)]
struct SlotsInner {
    role: &'static str,
    capacity: u32,
    active: AtomicU32,
    drain: Drain,
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<SlotsInner>,
    _work: InFlight,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("specd_worker_active_sequences", "role" => self.inner.role)
            .set(f64::from(self.inner.active.load(Ordering::Acquire)));
    }
}

impl Slots {
    pub fn new(role: &'static str, capacity: u32, drain: Drain) -> Self {
        Self {
            inner: Arc::new(SlotsInner {
                role,
                capacity,
                active: AtomicU32::new(0),
                drain,
            }),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    pub fn active(&self) -> u32 {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Takes a slot for a new sequence.
    pub fn admit(&self) -> Result<Slot, Status> {
        let role = self.inner.role;
        let work = self
            .inner
            .drain
            .enter()
            .ok_or_else(|| Status::unavailable(format!("{role} worker is draining")))?;
        let before = self.inner.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            inner: Arc::clone(&self.inner),
            _work: work,
        };
        if before >= self.inner.capacity {
            return Err(Status::resource_exhausted(format!(
                "{role} worker is at its capacity of {} sequences",
                self.inner.capacity
            )));
        }
        metrics::gauge!("specd_worker_active_sequences", "role" => role).set(f64::from(before + 1));
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_is_resource_exhausted_and_draining_is_unavailable() {
        let drain = Drain::new();
        let slots = Slots::new("target", 1, drain.clone());
        let a = slots.admit().expect("first slot");
        let err = slots.admit().expect_err("full");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(slots.active(), 1, "a refused admission frees what it took");
        drop(a);
        assert_eq!(slots.active(), 0);
        let d = drain.clone();
        assert_eq!(d.drain(std::time::Duration::from_millis(10)).await, 0);
        assert_eq!(
            slots.admit().expect_err("draining").code(),
            tonic::Code::Unavailable
        );
    }
}
