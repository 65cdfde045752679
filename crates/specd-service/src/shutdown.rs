//! Graceful shutdown: one [`Shutdown`] token per process, cancelled by SIGTERM or SIGINT (or by
//! `specd up` stopping its services), and [`Drain`], the count of in-flight work a service waits on
//! before it stops.
//!
//! The drain sequence each service runs when the token fires: report NOT_SERVING on gRPC health, leave
//! placement (revoke the coordination lease), refuse new work with UNAVAILABLE, wait for in-flight work
//! up to a deadline, then stop its servers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Fires once when the process should stop.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that fires on SIGTERM or SIGINT (Ctrl-C). Needs a tokio runtime.
    pub fn on_signals() -> Self {
        let s = Self::new();
        let token = s.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received: draining");
            token.cancel();
        });
        s
    }

    /// Fires the token (idempotent).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the token fired.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    /// A token that fires with this one and can also be fired alone (a service inside `specd up`).
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// In-flight work of a service, and whether it is draining (refusing new work).
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<DrainInner>,
}

#[derive(Debug, Default)]
struct DrainInner {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
    /// Set when the service's core failed and the process should stop (see [`Drain::fail`]).
    failed: CancellationToken,
}

/// Held while one unit of work is in flight; dropping it ends the work.
#[derive(Debug)]
pub struct InFlight {
    inner: Arc<DrainInner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a unit of work, or `None` when draining (the caller answers UNAVAILABLE).
    pub fn enter(&self) -> Option<InFlight> {
        if self.is_draining() {
            return None;
        }
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        // Re-check: a drain that started in between must not miss this unit, and must not wait for it
        // if it never really starts.
        if self.is_draining() {
            drop(InFlight {
                inner: Arc::clone(&self.inner),
            });
            return None;
        }
        Some(InFlight {
            inner: Arc::clone(&self.inner),
        })
    }

    /// Marks the service as failed beyond repair (its engine died): whoever waits on
    /// [`Drain::failed`] shuts the service down.
    pub fn fail(&self) {
        self.inner.failed.cancel();
    }

    /// Resolves once [`Drain::fail`] was called.
    pub async fn failed(&self) {
        self.inner.failed.cancelled().await
    }

    pub fn has_failed(&self) -> bool {
        self.inner.failed.is_cancelled()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Refuses new work from now on and waits until in-flight work ends or `deadline` passes. Returns
    /// the units still in flight at the end (0: drained cleanly).
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.inner.draining.store(true, Ordering::Release);
        let wait = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_in_flight_work_then_refuses_new() {
        let drain = Drain::new();
        let work = drain.enter().expect("not draining yet");
        let d = drain.clone();
        let waiter = tokio::spawn(async move { d.drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            drain.enter().is_none(),
            "new work is refused while draining"
        );
        assert!(!waiter.is_finished(), "drain waits for in-flight work");
        drop(work);
        assert_eq!(waiter.await.expect("join"), 0);
    }

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        let drain = Drain::new();
        let _stuck = drain.enter().expect("not draining yet");
        assert_eq!(drain.drain(Duration::from_millis(30)).await, 1);
    }

    #[tokio::test]
    async fn failure_is_signalled_to_waiters() {
        let drain = Drain::new();
        assert!(!drain.has_failed());
        let d = drain.clone();
        let waiter = tokio::spawn(async move { d.failed().await });
        drain.fail();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter woke")
            .expect("join");
        assert!(drain.has_failed());
    }

    #[tokio::test]
    async fn child_fires_with_parent() {
        let parent = Shutdown::new();
        let child = parent.child();
        parent.trigger();
        tokio::time::timeout(Duration::from_secs(1), child.wait())
            .await
            .expect("child fired");
    }
}
