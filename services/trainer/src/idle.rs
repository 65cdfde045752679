//! Idle capacity: whether the cluster is quiet enough for the trainer to take an optimizer step.
//!
//! Routers publish their load every second under `/specd/v1/load/{router}` (requests generating and
//! waiting; the record is attached to the router's lease, so a dead router's load goes with it).
//! [`IdleGate::follow`] keeps the sum of every router's report current from a watch of that prefix, and
//! [`IdleGate::may_train`] says whether it is at or under the threshold. The training loop asks before
//! every step, so it yields within one step when load rises, and [`IdleGate::wait_idle`] parks it until
//! load falls again. It does not know about the trainer's own cost; keeping a step short is the loop's
//! job.

use std::collections::HashMap;

use specd_coord::{keys, LoadReport, Record, Store, WatchEvent};
use specd_service::Shutdown;
use tokio::sync::watch;

/// The cluster's load as the routers last reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterLoad {
    /// Requests generating, over all routers.
    pub in_flight: u32,
    /// Requests admitted and waiting, over all routers.
    pub queue: u32,
    /// Routers reporting.
    pub routers: usize,
}

impl ClusterLoad {
    fn of(reports: &HashMap<String, LoadReport>) -> Self {
        Self {
            in_flight: reports.values().map(|r| r.in_flight).sum(),
            queue: reports.values().map(|r| r.queue).sum(),
            routers: reports.len(),
        }
    }
}

/// Follows the routers' load reports and gates training on them.
#[derive(Clone, Debug)]
pub struct IdleGate {
    load: watch::Receiver<ClusterLoad>,
    /// Most requests in flight plus waiting at which the cluster still counts as idle.
    threshold: u32,
}

impl IdleGate {
    /// Reads the current reports, then follows every change until `stop`.
    pub async fn follow(
        store: Store,
        threshold: u32,
        stop: Shutdown,
    ) -> specd_coord::Result<IdleGate> {
        let prefix = keys::loads();
        let snapshot = store.get_prefix(&prefix).await?;
        let mut reports: HashMap<String, LoadReport> = HashMap::new();
        let put = |reports: &mut HashMap<String, LoadReport>, key: &str, value: &[u8]| {
            match LoadReport::decode(value) {
                Ok(r) => {
                    reports.insert(key.to_string(), r);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring an unreadable load report"),
            }
        };
        for kv in &snapshot.entries {
            put(&mut reports, &kv.key, &kv.value);
        }
        let (tx, rx) = watch::channel(ClusterLoad::of(&reports));
        let mut events = store.watch_prefix(&prefix, snapshot.revision + 1).await?;
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.next() => ev,
                    _ = stop.wait() => return,
                };
                match ev {
                    Some(WatchEvent::Put { key, value, .. }) => put(&mut reports, &key, &value),
                    Some(WatchEvent::Delete { key, .. }) => {
                        reports.remove(&key);
                    }
                    Some(WatchEvent::Resync { snapshot }) => {
                        reports.clear();
                        for kv in &snapshot.entries {
                            put(&mut reports, &kv.key, &kv.value);
                        }
                    }
                    None => {
                        // Without the watch the load is unknown: count the cluster busy from now on
                        // rather than train over live traffic.
                        tracing::error!("load watch ended; training stays off");
                        tx.send_replace(ClusterLoad {
                            in_flight: u32::MAX,
                            ..ClusterLoad::default()
                        });
                        return;
                    }
                }
                tx.send_replace(ClusterLoad::of(&reports));
            }
        });
        Ok(IdleGate {
            load: rx,
            threshold,
        })
    }

    /// The load last reported.
    pub fn load(&self) -> ClusterLoad {
        *self.load.borrow()
    }

    /// Whether an optimizer step may start now.
    pub fn may_train(&self) -> bool {
        let l = self.load();
        l.in_flight.saturating_add(l.queue) <= self.threshold
    }

    /// Resolves once the cluster is idle (at once if it is).
    pub async fn wait_idle(&mut self) {
        let threshold = self.threshold;
        let _ = self
            .load
            .wait_for(|l| l.in_flight.saturating_add(l.queue) <= threshold)
            .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn report(store: &Store, router: &str, in_flight: u32, queue: u32) {
        let r = LoadReport {
            router: router.into(),
            in_flight,
            queue,
            at: 0,
        };
        store.put_record(&r, None).await.unwrap();
    }

    /// Waits (bounded) until the gate's view satisfies `f`.
    async fn until(gate: &IdleGate, f: impl Fn(&IdleGate) -> bool) {
        for _ in 0..500 {
            if f(gate) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the gate never got there: {:?}", gate.load());
    }

    #[tokio::test]
    async fn training_follows_the_routers_load() {
        let store = Store::memory();
        report(&store, "r1", 0, 0).await;
        let mut gate = IdleGate::follow(store.clone(), 1, Shutdown::new())
            .await
            .unwrap();
        assert!(gate.may_train(), "an idle cluster trains");
        report(&store, "r2", 1, 1).await;
        until(&gate, |g| !g.may_train()).await;
        assert_eq!(
            gate.load(),
            ClusterLoad {
                in_flight: 1,
                queue: 1,
                routers: 2
            }
        );
        // Parked until the load falls back to the threshold.
        let waiter = {
            let mut g = gate.clone();
            tokio::spawn(async move { g.wait_idle().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "woke while busy");
        report(&store, "r2", 1, 0).await;
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(gate.may_train());
        // A router that leaves takes its load with it.
        report(&store, "r2", 5, 0).await;
        until(&gate, |g| !g.may_train()).await;
        store.delete(&keys::load("r2")).await.unwrap();
        until(&gate, |g| g.may_train()).await;
        gate.wait_idle().await;
    }
}
