//! Admission of sequences on a worker: at most `capacity` sequences and, on a target, a KV budget in
//! tokens (each sequence reserves the cache it can grow to: its prompt, the tokens it may generate and
//! one draft's worth), refused with RESOURCE_EXHAUSTED when either is used up (the router waits and
//! places again), OUT_OF_RANGE for a sequence larger than the whole budget (it never fits here), and
//! UNAVAILABLE while the worker drains.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// KV tokens all sequences together may reserve (`None`: no budget).
    kv_budget: Option<u64>,
    kv_reserved: AtomicU64,
    drain: Drain,
}

impl SlotsInner {
    fn publish_kv(&self) {
        let Some(budget) = self.kv_budget else {
            return;
        };
        let used = self.kv_reserved.load(Ordering::Acquire);
        metrics::gauge!("specd_kv_tokens_reserved", "role" => self.role).set(used as f64);
        metrics::gauge!("specd_kv_tokens_free", "role" => self.role)
            .set(budget.saturating_sub(used) as f64);
    }
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<SlotsInner>,
    /// KV tokens this sequence reserved.
    kv: u64,
    _work: InFlight,
}

impl Slot {
    /// KV tokens this sequence reserved (0 without a budget).
    pub fn kv_tokens(&self) -> u64 {
        self.kv
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.kv > 0 {
            self.inner.kv_reserved.fetch_sub(self.kv, Ordering::AcqRel);
            self.inner.publish_kv();
        }
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("specd_worker_active_sequences", "role" => self.inner.role)
            .set(f64::from(self.inner.active.load(Ordering::Acquire)));
    }
}

impl Slots {
    /// `capacity` sequences, no KV budget.
    pub fn new(role: &'static str, capacity: u32, drain: Drain) -> Self {
        Self::build(role, capacity, None, drain)
    }

    /// `capacity` sequences reserving at most `kv_budget` KV tokens together.
    pub fn with_kv_budget(role: &'static str, capacity: u32, kv_budget: u64, drain: Drain) -> Self {
        Self::build(role, capacity, Some(kv_budget), drain)
    }

    fn build(role: &'static str, capacity: u32, kv_budget: Option<u64>, drain: Drain) -> Self {
        let inner = SlotsInner {
            role,
            capacity,
            active: AtomicU32::new(0),
            kv_budget,
            kv_reserved: AtomicU64::new(0),
            drain,
        };
        if let Some(budget) = kv_budget {
            metrics::gauge!("specd_kv_budget_tokens", "role" => role).set(budget as f64);
            inner.publish_kv();
        }
        Self {
            inner: Arc::new(inner),
        }
    }

    /// KV tokens reserved by the open sequences, and the budget (`None`: no budget).
    pub fn kv(&self) -> Option<(u64, u64)> {
        let i = &self.inner;
        i.kv_budget
            .map(|budget| (i.kv_reserved.load(Ordering::Acquire), budget))
    }

    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    pub fn active(&self) -> u32 {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Takes a slot for a new sequence (no KV reservation).
    pub fn admit(&self) -> Result<Slot, Status> {
        self.admit_kv(0)
    }

    /// Takes a slot for a new sequence that reserves `kv` tokens of the KV budget.
    pub fn admit_kv(&self, kv: u64) -> Result<Slot, Status> {
        let role = self.inner.role;
        let work = self
            .inner
            .drain
            .enter()
            .ok_or_else(|| Status::unavailable(format!("{role} worker is draining")))?;
        let before = self.inner.active.fetch_add(1, Ordering::AcqRel);
        let mut slot = Slot {
            inner: Arc::clone(&self.inner),
            kv: 0,
            _work: work,
        };
        if before >= self.inner.capacity {
            return Err(Status::resource_exhausted(format!(
                "{role} worker is at its capacity of {} sequences",
                self.inner.capacity
            )));
        }
        if let Some(budget) = self.inner.kv_budget.filter(|_| kv > 0) {
            if kv > budget {
                return Err(Status::out_of_range(format!(
                    "the sequence needs {kv} KV tokens and this {role} worker's whole KV budget is \
                     {budget} (shorten the prompt or max_new_tokens, or raise --kv-tokens)"
                )));
            }
            let reserved = self.inner.kv_reserved.fetch_add(kv, Ordering::AcqRel);
            slot.kv = kv;
            if reserved + kv > budget {
                // Dropping the slot gives the reservation back.
                return Err(Status::resource_exhausted(format!(
                    "{role} worker's KV budget is in use ({reserved} of {budget} tokens reserved, \
                     this sequence needs {kv})"
                )));
            }
            self.inner.publish_kv();
        }
        metrics::gauge!("specd_worker_active_sequences", "role" => role).set(f64::from(before + 1));
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kv_budget_admits_what_fits_and_gives_back_what_closes_or_is_refused() {
        let slots = Slots::with_kv_budget("target", 8, 1000, Drain::new());
        let a = slots.admit_kv(600).expect("fits");
        assert_eq!(a.kv_tokens(), 600);
        let err = slots.admit_kv(500).expect_err("over the budget");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(slots.kv(), Some((600, 1000)), "a refusal reserves nothing");
        assert_eq!(slots.active(), 1);
        let b = slots.admit_kv(400).expect("exactly fills the budget");
        assert_eq!(
            slots.admit_kv(1001).expect_err("never fits").code(),
            tonic::Code::OutOfRange
        );
        drop(a);
        assert_eq!(slots.kv(), Some((400, 1000)));
        let _c = slots.admit_kv(600).expect("fits again after a close");
        drop(b);
        assert_eq!(slots.kv(), Some((600, 1000)));
        assert_eq!(Slots::new("drafter", 1, Drain::new()).kv(), None);
    }

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
