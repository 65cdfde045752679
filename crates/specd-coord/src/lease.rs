//! `KeepAlive`: the background task that keeps one lease alive and says when it is lost.
//!
//! A lease is *lost* when the store answers that it no longer exists, or when no keep-alive has
//! succeeded for a whole TTL (the store may have expired it while we could not reach it; the process
//! must assume its keys are gone). Loss is final for that lease: the owner re-grants (as
//! [`crate::Registration`] does) or cancels itself. The refresh cadence is a third of the TTL, and failed
//! refreshes retry with backoff inside the TTL.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::error::{CoordError, Result};
use crate::etcd::EtcdRefresher;
use crate::memory::MemoryStore;
use crate::store::Store;
use crate::types::LeaseId;

/// One keep-alive round trip against either backend.
pub(crate) enum Refresher {
    // Boxed: etcd's keep-alive stream state is large next to the memory variant.
    Etcd(Box<EtcdRefresher>),
    Memory(MemoryStore, LeaseId),
}

impl Refresher {
    pub(crate) fn new(store: &Store, lease: LeaseId) -> Self {
        match store {
            Store::Etcd(s) => Refresher::Etcd(Box::new(s.refresher(lease))),
            Store::Memory(s) => Refresher::Memory(s.clone(), lease),
        }
    }

    /// Forgets a half-used stream after an interrupted refresh.
    fn reset(&mut self) {
        if let Refresher::Etcd(r) = self {
            r.reset();
        }
    }

    async fn refresh(&mut self) -> Result<Duration> {
        match self {
            Refresher::Etcd(r) => r.refresh().await,
            Refresher::Memory(s, lease) => s.refresh_lease(*lease).await,
        }
    }
}

/// Keeps a lease alive until dropped. Dropping it stops the refreshes (the lease then expires after its
/// TTL); it does not revoke the lease.
#[derive(Debug)]
pub struct KeepAlive {
    lease: LeaseId,
    lost: watch::Receiver<bool>,
    paused: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    /// Refreshes once (so a dead lease fails here with `LeaseLost`), then keeps refreshing in the background.
    pub(crate) async fn start(store: &Store, lease: LeaseId) -> Result<KeepAlive> {
        let mut refresher = Refresher::new(store, lease);
        let ttl = refresher.refresh().await?;
        let (lost_tx, lost) = watch::channel(false);
        let (paused, paused_rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive(refresher, lease, ttl, lost_tx, paused_rx));
        Ok(KeepAlive {
            lease,
            lost,
            paused,
            task,
        })
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A signal that turns `true` once, when the lease is lost; hand it to whatever must stop then.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        // An error means the task ended without reporting loss (it was aborted); that only happens when
        // `self` is being dropped, so waiting forever is the right answer.
        if rx.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Fault injection (tests, chaos drills): stop refreshing, as a hung process would, so the store
    /// expires the lease. Loss is not reported while paused; [`KeepAlive::resume`] finds out.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Undoes [`KeepAlive::pause`]; the next refresh runs at once.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_alive(
    mut refresher: Refresher,
    lease: LeaseId,
    mut ttl: Duration,
    lost: watch::Sender<bool>,
    mut paused: watch::Receiver<bool>,
) {
    let mut last_ok = Instant::now();
    let mut backoff = Backoff::new((ttl / 20).max(Duration::from_millis(10)), ttl / 3);
    let mut wait = ttl / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Resuming refreshes at once rather than after the rest of the interval.
            changed = paused.changed() => if changed.is_err() { return },
        }
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        // Never wait past the point where the lease would be gone anyway.
        let budget = ttl
            .saturating_sub(last_ok.elapsed())
            .max(Duration::from_millis(10));
        let refreshed = match tokio::time::timeout(budget, refresher.refresh()).await {
            Ok(res) => res,
            Err(_) => {
                refresher.reset();
                Err(CoordError::Unavailable("keep-alive timed out".into()))
            }
        };
        match refreshed {
            Ok(granted) => {
                last_ok = Instant::now();
                ttl = granted;
                backoff.reset();
                wait = ttl / 3;
            }
            Err(CoordError::LeaseLost(_)) => {
                tracing::warn!(lease = %lease, "lease lost: the store no longer has it");
                lost.send_replace(true);
                return;
            }
            Err(err) => {
                let silent_for = last_ok.elapsed();
                if silent_for >= ttl {
                    tracing::warn!(lease = %lease, cause = %err, ?silent_for, "lease lost: no keep-alive succeeded for a whole TTL");
                    lost.send_replace(true);
                    return;
                }
                tracing::debug!(lease = %lease, cause = %err, "keep-alive failed; retrying");
                wait = backoff.next_delay().min(ttl - silent_for);
            }
        }
    }
}
