//! The workers a router can place on: a live view of `/specd/v1/instances/` in the coordination store,
//! with one lazily connected gRPC channel per worker and the router's own count of sequences on each.
//!
//! Placement is least-loaded (the larger of the worker's published load and this router's own count,
//! over its capacity), with session affinity by rendezvous hashing: a request with a session id goes to
//! the same worker as long as that worker is present and not full. Drafters are only ever paired with
//! targets whose tokenizer fingerprint matches. A worker that fails a call is ejected for a few seconds;
//! one whose lease expires leaves the view with the store's delete event.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use specd_coord::{keys, InstanceRecord, Record, Role, Store, WatchEvent};
use specd_service::grpc::Keepalive;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;

/// How long a worker that failed a call is left out of placement (unless it re-registers).
pub const EJECT_FOR: Duration = Duration::from_secs(5);

/// A worker as the router sees it.
#[derive(Debug)]
pub struct Worker {
    pub record: InstanceRecord,
    pub channel: Channel,
    /// Sequences this router has open on it; shared with the entries that replace this one when the
    /// record changes, so a lease taken on an older entry is still counted and released.
    in_flight: Arc<AtomicU32>,
    /// Until when it is left out of placement after a failure; shared like `in_flight`, so the
    /// record updates a worker publishes every second do not cut an ejection short.
    ejected_until: Arc<RwLock<Option<Instant>>>,
}

impl Worker {
    fn new(record: InstanceRecord, keepalive: Keepalive) -> Result<Self, String> {
        let endpoint = specd_service::grpc::endpoint(&record.address, keepalive)
            .map_err(|e| format!("worker {}: {e}", record.id))?;
        Ok(Self {
            channel: endpoint.connect_lazy(),
            record,
            in_flight: Arc::new(AtomicU32::new(0)),
            ejected_until: Arc::new(RwLock::new(None)),
        })
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    fn is_ejected(&self) -> bool {
        let until = *self.ejected_until.read().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Load in [0, inf): sequences over capacity.
    fn load(&self) -> f64 {
        let mine = self.in_flight.load(Ordering::Acquire);
        let used = mine.max(self.record.load);
        f64::from(used) / f64::from(self.record.capacity.max(1))
    }

    fn is_full(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) >= self.record.capacity.max(1)
    }
}

/// A sequence placed on a worker; dropping it releases the router's count and wakes requests waiting
/// for a slot.
#[derive(Debug)]
pub struct Lease {
    pub worker: Arc<Worker>,
    freed: Arc<Notify>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

/// The outcome of waiting for a slot.
#[derive(Debug)]
pub enum Placed {
    Placed(Lease),
    /// No worker matches at all (none registered, all ejected or excluded).
    NoWorker,
    /// Workers match but none had a free slot within the wait.
    Full,
}

/// How often a waiting placement looks again even without a wake-up (a worker's published load can
/// fall without any lease of this router being dropped).
const RECHECK: Duration = Duration::from_millis(250);

/// The live set of workers.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    workers: Arc<RwLock<HashMap<String, Arc<Worker>>>>,
    changed: Arc<watch::Sender<u64>>,
    /// Notified whenever a lease is dropped.
    freed: Arc<Notify>,
    /// Requests waiting for a slot pass through this one at a time, in arrival order (tokio's mutex is
    /// fair), so freed slots go to the longest waiter; `waiting` counts them, and while any waits a
    /// newcomer queues behind them instead of taking the next free slot.
    turnstile: Arc<tokio::sync::Mutex<()>>,
    waiting: Arc<AtomicU32>,
    /// Keepalive of the channels to workers.
    keepalive: Keepalive,
}

/// What a placement needs to match.
#[derive(Clone, Debug, Default)]
pub struct Want<'a> {
    pub fingerprint: &'a str,
    /// Drafter kind for drafters; ignored for targets.
    pub kind: Option<&'a str>,
    pub session: Option<&'a str>,
    /// Workers to avoid (failed earlier in this request).
    pub exclude: &'a [String],
}

impl Pool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool whose worker channels use `keepalive`.
    pub fn with_keepalive(keepalive: Keepalive) -> Self {
        Self {
            keepalive,
            ..Self::default()
        }
    }

    /// Follows the store: loads the current instances, then applies every change until `stop` fires.
    /// Returns once the initial snapshot is loaded.
    pub async fn follow(&self, store: Store, stop: specd_service::Shutdown) -> anyhow::Result<()> {
        let prefix = keys::instances();
        let snapshot = store.get_prefix(&prefix).await?;
        self.replace_all(&snapshot.entries);
        let mut watch = store.watch_prefix(&prefix, snapshot.revision + 1).await?;
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = watch.next() => ev,
                    _ = stop.wait() => return,
                };
                match ev {
                    Some(WatchEvent::Put { key, value, .. }) => pool.put(&key, &value),
                    Some(WatchEvent::Delete { key, .. }) => pool.remove(&key),
                    Some(WatchEvent::Resync { snapshot }) => pool.replace_all(&snapshot.entries),
                    None => {
                        tracing::error!("coordination watch ended; placement is frozen");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    fn replace_all(&self, entries: &[specd_coord::KeyValue]) {
        let mut fresh = HashMap::new();
        {
            let current = self.read();
            for kv in entries {
                if let Some(w) = self.build(&kv.key, &kv.value, &current) {
                    fresh.insert(w.record.id.clone(), w);
                }
            }
        }
        *self.write() = fresh;
        self.bump();
    }

    fn put(&self, key: &str, value: &[u8]) {
        let built = {
            let current = self.read();
            self.build(key, value, &current)
        };
        if let Some(w) = built {
            self.write().insert(w.record.id.clone(), w);
            self.bump();
        }
    }

    fn remove(&self, key: &str) {
        if let Some((_, id)) = keys::parse_instance(key) {
            if self.write().remove(&id).is_some() {
                tracing::info!(worker = %id, "worker left placement");
            }
            self.bump();
        }
    }

    /// A worker entry for a record, reusing the existing entry (channel, counts, ejection) when its
    /// address is unchanged: a load update is not a recovery. A worker that restarts registers under a
    /// new instance id (or a new address) and so starts with a clean entry.
    fn build(
        &self,
        key: &str,
        value: &[u8],
        current: &HashMap<String, Arc<Worker>>,
    ) -> Option<Arc<Worker>> {
        let record = match InstanceRecord::decode(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring an unreadable instance record");
                return None;
            }
        };
        if !matches!(record.role, Role::Target | Role::Drafter) || record.key() != key {
            return None;
        }
        if let Some(old) = current.get(&record.id) {
            if old.record.address == record.address {
                return Some(Arc::new(Worker {
                    channel: old.channel.clone(),
                    in_flight: Arc::clone(&old.in_flight),
                    ejected_until: Arc::clone(&old.ejected_until),
                    record,
                }));
            }
        }
        match Worker::new(record, self.keepalive) {
            Ok(w) => {
                tracing::info!(worker = %w.record.id, role = %w.record.role, address = %w.record.address, "worker joined placement");
                Some(Arc::new(w))
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring an instance record");
                None
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Worker>>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Worker>>> {
        self.workers.write().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Resolves on the next change of the worker set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every worker of `role`.
    pub fn workers(&self, role: Role) -> Vec<Arc<Worker>> {
        let mut v: Vec<_> = self
            .read()
            .values()
            .filter(|w| w.record.role == role)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        v
    }

    /// Leaves a worker out of placement for [`EJECT_FOR`] after a failed call.
    pub fn eject(&self, id: &str) {
        if let Some(w) = self.read().get(id) {
            *w.ejected_until.write().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + EJECT_FOR);
            tracing::warn!(worker = %id, "worker ejected from placement after a failure");
        }
    }

    /// The workers of `role` that match `want`, full ones included or not.
    fn candidates(&self, role: Role, want: &Want<'_>, include_full: bool) -> Vec<Arc<Worker>> {
        self.read()
            .values()
            .filter(|w| w.record.role == role)
            .filter(|w| w.record.tokenizer_fingerprint == want.fingerprint)
            .filter(|w| match (role, want.kind) {
                (Role::Drafter, Some(kind)) => w.record.drafter_kinds.iter().any(|k| k == kind),
                _ => true,
            })
            .filter(|w| !want.exclude.contains(&w.record.id))
            .filter(|w| !w.is_ejected() && (include_full || !w.is_full()))
            .cloned()
            .collect()
    }

    /// Places a sequence on a worker of `role`, or `None` when no worker matches or all are full.
    pub fn place(&self, role: Role, want: &Want<'_>) -> Option<Lease> {
        let candidates = self.candidates(role, want, false);
        let chosen = match want.session {
            Some(s) if !s.is_empty() => candidates
                .iter()
                .max_by_key(|w| rendezvous(s, &w.record.id)),
            _ => candidates.iter().min_by(|a, b| {
                a.load()
                    .total_cmp(&b.load())
                    .then_with(|| a.record.id.cmp(&b.record.id))
            }),
        }?;
        chosen.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Lease {
            worker: Arc::clone(chosen),
            freed: Arc::clone(&self.freed),
        })
    }

    /// Places a sequence, waiting up to `wait` for a slot while matching workers are all full (first
    /// come, first served); answers at once when no worker matches at all.
    pub async fn place_wait(&self, role: Role, want: &Want<'_>, wait: Duration) -> Placed {
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Some(lease) = self.place(role, want) {
                return Placed::Placed(lease);
            }
        }
        if self.candidates(role, want, true).is_empty() {
            return Placed::NoWorker;
        }
        let end = tokio::time::Instant::now() + wait;
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Decrement(Arc::clone(&self.waiting));
        let Ok(_turn) = tokio::time::timeout_at(end, self.turnstile.lock()).await else {
            return Placed::Full;
        };
        let mut changed = self.subscribe();
        loop {
            // Registered before looking, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(lease) = self.place(role, want) {
                return Placed::Placed(lease);
            }
            if self.candidates(role, want, true).is_empty() {
                return Placed::NoWorker;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return Placed::Full;
            }
            let nap = (end - now).min(RECHECK);
            tokio::select! {
                _ = &mut freed => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }
}

/// Decrements a counter when dropped.
struct Decrement(Arc<AtomicU32>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn rendezvous(session: &str, worker: &str) -> u64 {
    let mut h = DefaultHasher::new();
    session.hash(&mut h);
    worker.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: Role, id: &str, capacity: u32, load: u32) -> InstanceRecord {
        InstanceRecord {
            role,
            id: id.into(),
            address: format!("127.0.0.1:{}", 9000 + id.len()),
            model: "m".into(),
            family: "llama".into(),
            tokenizer_fingerprint: "fp".into(),
            capacity,
            load,
            drafter_kinds: vec!["ngram".into()],
            weights_version: None,
        }
    }

    fn pool_with(records: &[InstanceRecord]) -> Pool {
        let pool = Pool::new();
        for r in records {
            pool.put(&r.key(), &r.encode().expect("encode"));
        }
        pool
    }

    #[tokio::test]
    async fn waiting_placements_get_freed_slots_first_come_first_served() {
        let pool = pool_with(&[record(Role::Target, "a", 1, 0)]);
        let want = Want {
            fingerprint: "fp",
            ..Want::default()
        };
        let held = pool.place(Role::Target, &want).expect("placed");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (pool, tx) = (pool.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let want = Want {
                    fingerprint: "fp",
                    ..Want::default()
                };
                match pool
                    .place_wait(Role::Target, &want, Duration::from_secs(10))
                    .await
                {
                    Placed::Placed(lease) => {
                        tx.send(i).expect("send");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        drop(lease);
                    }
                    other => panic!("waiter {i}: {other:?}"),
                }
            }));
            // Arrival order is the order they queue in.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A newcomer while others wait queues behind them rather than taking the next slot.
        let late = {
            let (pool, tx) = (pool.clone(), tx.clone());
            tokio::spawn(async move {
                let want = Want {
                    fingerprint: "fp",
                    ..Want::default()
                };
                let placed = matches!(
                    pool.place_wait(Role::Target, &want, Duration::from_secs(10))
                        .await,
                    Placed::Placed(_)
                );
                tx.send(9).expect("send");
                placed
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for w in waiters {
            w.await.expect("waiter");
        }
        assert!(late.await.expect("late"));
        let order: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, vec![0, 1, 2, 9]);
        // Nobody holds a slot now; a full worker times out as Full, no worker at all is NoWorker.
        let held = pool.place(Role::Target, &want).expect("placed");
        assert!(matches!(
            pool.place_wait(Role::Target, &want, Duration::from_millis(50))
                .await,
            Placed::Full
        ));
        drop(held);
        let other = Want {
            fingerprint: "another",
            ..Want::default()
        };
        assert!(matches!(
            pool.place_wait(Role::Target, &other, Duration::from_secs(10))
                .await,
            Placed::NoWorker
        ));
    }

    #[tokio::test]
    async fn least_loaded_then_full_then_affinity() {
        let pool = pool_with(&[
            record(Role::Target, "a", 2, 1),
            record(Role::Target, "b", 2, 0),
        ]);
        let want = Want {
            fingerprint: "fp",
            ..Want::default()
        };
        let first = pool.place(Role::Target, &want).expect("placed");
        assert_eq!(first.worker.id(), "b", "least loaded by published load");
        let second = pool.place(Role::Target, &want).expect("placed");
        let third = pool.place(Role::Target, &want).expect("placed");
        let fourth = pool.place(Role::Target, &want).expect("placed");
        assert!(pool.place(Role::Target, &want).is_none(), "all full");
        drop((second, third, fourth));
        drop(first);

        let session = Want {
            fingerprint: "fp",
            session: Some("user-42"),
            ..Want::default()
        };
        let a = pool.place(Role::Target, &session).expect("placed");
        let b = pool.place(Role::Target, &session).expect("placed");
        assert_eq!(a.worker.id(), b.worker.id(), "same session, same worker");
    }

    #[tokio::test]
    async fn leases_survive_record_updates() {
        let r = record(Role::Target, "a", 1, 0);
        let pool = pool_with(std::slice::from_ref(&r));
        let want = Want {
            fingerprint: "fp",
            ..Want::default()
        };
        let lease = pool.place(Role::Target, &want).expect("placed");
        // A load update replaces the entry while the lease is out.
        let mut updated = r.clone();
        updated.load = 1;
        pool.put(&updated.key(), &updated.encode().expect("encode"));
        assert!(pool.place(Role::Target, &want).is_none(), "still full");
        drop(lease);
        assert!(
            pool.place(Role::Target, &want).is_some(),
            "the lease was released on the current entry"
        );
    }

    #[tokio::test]
    async fn fingerprint_kind_exclusion_and_ejection() {
        let mut other = record(Role::Drafter, "x", 4, 0);
        other.tokenizer_fingerprint = "other".into();
        let pool = pool_with(&[record(Role::Drafter, "d", 4, 0), other]);
        let excluded = ["d".to_string()];
        let want = |kind, exclude| Want {
            fingerprint: "fp",
            kind: Some(kind),
            session: None,
            exclude,
        };
        assert_eq!(
            pool.place(Role::Drafter, &want("ngram", &[]))
                .expect("placed")
                .worker
                .id(),
            "d"
        );
        assert!(
            pool.place(Role::Drafter, &want("model", &[])).is_none(),
            "kind not offered"
        );
        assert!(pool
            .place(Role::Drafter, &want("ngram", &excluded))
            .is_none());
        pool.eject("d");
        assert!(
            pool.place(Role::Drafter, &want("ngram", &[])).is_none(),
            "ejected"
        );
        // A record update (the worker republishing its load every second) keeps the ejection.
        let mut r = record(Role::Drafter, "d", 4, 0);
        r.load = 1;
        pool.put(&r.key(), &r.encode().expect("encode"));
        assert!(
            pool.place(Role::Drafter, &want("ngram", &[])).is_none(),
            "a load update undid the ejection"
        );
        // A restart at a new address is a new process: not ejected.
        r.address = "127.0.0.1:9999".into();
        pool.put(&r.key(), &r.encode().expect("encode"));
        assert!(pool.place(Role::Drafter, &want("ngram", &[])).is_some());
        pool.remove(&r.key());
        assert!(pool.workers(Role::Drafter).iter().all(|w| w.id() != "d"));
    }
}
