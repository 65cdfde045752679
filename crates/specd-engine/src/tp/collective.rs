//! The collective operations a tensor-parallel group needs, as one trait, and what they cost.
//!
//! Every operation is called by every rank of the group in the same order (the ranks run the same
//! forward over their own shards). Results are deterministic: sums are taken in rank order, so every rank
//! holds bitwise the same result and a run repeats bit for bit. Every operation is bounded by the
//! backend's timeout: a dead or stuck peer is an error, never a hang. A backend that has failed once stays
//! failed (the group's state is unknown after a partial collective).
//!
//! Backends: `tcp` (processes or threads on one machine or across machines, a star through rank 0). The
//! NCCL backend for GPUs is not written yet (no GPU has been lent to this project; see issue 12).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {peer} did not answer within {timeout:?} (dead or stuck peer)")]
    Timeout { peer: usize, timeout: Duration },
    #[error("rank {peer} left the group: {cause}")]
    PeerGone { peer: usize, cause: String },
    #[error("group rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("protocol error with rank {peer}: {what}")]
    Protocol { peer: usize, what: String },
    #[error("the group has already failed ({0}); it must be rebuilt")]
    Failed(String),
}

/// Bytes moved and time spent in collectives by one rank, since it joined.
#[derive(Debug, Default)]
pub struct CollectiveStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub nanos: AtomicU64,
    pub calls: AtomicU64,
}

/// A copy of [`CollectiveStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub nanos: u64,
    pub calls: u64,
}

impl CollectiveStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record(&self, sent: usize, received: usize, elapsed: Duration) {
        self.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(received as u64, Ordering::Relaxed);
        self.nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

impl StatsSnapshot {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
            nanos: self.nanos - earlier.nanos,
            calls: self.calls - earlier.calls,
        }
    }
}

/// The operations of a tensor-parallel group. Rank 0 leads: it is the root of [`Collective::gather`] and
/// [`Collective::broadcast`].
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks, added in rank order
    /// (`((b0 + b1) + b2) + ...`), so every rank gets bitwise the same result.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank's `local` (lengths may differ), in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError>;
    /// Every rank's `local` in rank order on rank 0 (`Some`); `None` on the others.
    fn gather(&self, local: &[f32]) -> Result<Option<Vec<Vec<f32>>>, CollectiveError>;
    /// Rank 0's `bytes` on every rank (the others' input is replaced). `wait` bounds how long a non-root
    /// rank waits for it (`None`: until rank 0 sends or leaves; an idle leader sends nothing).
    fn broadcast(&self, bytes: &mut Vec<u8>, wait: Option<Duration>)
        -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;
    fn stats(&self) -> &CollectiveStats;
}
