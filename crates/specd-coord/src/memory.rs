//! `MemoryStore`: the in-process coordination backend used by `specd up` (one process, no etcd) and by
//! tests. It reproduces the etcd semantics the rest of specd relies on:
//!
//! - one global revision, bumped once per write; a lease expiry or revoke deleting several keys is one
//!   revision, as in etcd;
//! - leases with a TTL driven by tokio time (so tests can pause and advance the clock), keys attached to
//!   a lease vanish with it;
//! - compare-and-swap on a key's mod revision (or on its absence), compare-and-delete;
//! - prefix watches that replay retained history from any revision, and answer with a `Resync` of the
//!   full prefix when that history was compacted or the watcher fell behind the broadcast buffer.
//!
//! It does not persist anything and is not shared between processes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::error::{CoordError, Result};
use crate::types::{Entry, KeyValue, LeaseId, Snapshot, Watch, WatchEvent, WATCH_BUFFER};

/// How many revisions of history a store keeps for watches that start in the past.
const DEFAULT_HISTORY: usize = 4096;
/// Capacity of the broadcast channel feeding watch tasks; a watcher further behind gets a `Resync`.
const DEFAULT_BROADCAST: usize = 1024;

/// The in-process store. Cheap to clone; clones share the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("revision", &self.lock().revision)
            .finish()
    }
}

struct Inner {
    // A std mutex, not a tokio one: every critical section is short, synchronous and never awaits,
    // and the lease-expiry and watch tasks take it from plain code paths.
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Batch>>,
}

/// All events of one revision.
struct Batch {
    revision: i64,
    events: Vec<WatchEvent>,
}

struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: Option<LeaseId>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    revision: i64,
    /// Lowest revision a watch can still replay from (etcd's compact revision).
    compact_revision: i64,
    kv: BTreeMap<String, Stored>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: i64,
    history: VecDeque<Arc<Batch>>,
    history_limit: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 1 (as a fresh etcd cluster).
    pub fn new() -> Self {
        MemoryStore::with_limits(DEFAULT_HISTORY, DEFAULT_BROADCAST)
    }

    /// A store keeping `history` revisions for replay and buffering `broadcast` batches per watcher.
    /// Small values make compaction and lagging watchers easy to provoke in tests.
    pub fn with_limits(history: usize, broadcast: usize) -> Self {
        let (events, _) = broadcast::channel(broadcast.max(1));
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    revision: 1,
                    compact_revision: 0,
                    kv: BTreeMap::new(),
                    leases: HashMap::new(),
                    next_lease: 0x5eed_0000,
                    history: VecDeque::new(),
                    history_limit: history.max(1),
                }),
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl.max(Duration::from_millis(1));
        let id = {
            let mut st = self.lock();
            st.next_lease += 1;
            let id = LeaseId(st.next_lease);
            st.leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        };
        tokio::spawn(expire_when_due(Arc::downgrade(&self.inner), id));
        Ok(id)
    }

    /// One keep-alive: pushes the deadline a full TTL out and returns the TTL.
    pub(crate) async fn refresh_lease(&self, lease: LeaseId) -> Result<Duration> {
        let mut st = self.lock();
        let l = st
            .leases
            .get_mut(&lease)
            .ok_or(CoordError::LeaseLost(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut st = self.lock();
        st.drop_lease(&self.inner.events, lease);
        Ok(())
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<i64> {
        let mut st = self.lock();
        st.check_lease(lease)?;
        Ok(st.put(&self.inner.events, key, value, lease))
    }

    pub(crate) async fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        let st = self.lock();
        Ok(st.kv.get(key).map(|s| Entry {
            value: s.value.clone(),
            mod_revision: s.mod_revision,
            lease: s.lease,
        }))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot> {
        Ok(self.lock().snapshot(prefix))
    }

    pub async fn delete(&self, key: &str) -> Result<bool> {
        let mut st = self.lock();
        Ok(st.delete(&self.inner.events, key))
    }

    pub async fn compare_and_swap_revision(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>> {
        let mut st = self.lock();
        if st.kv.get(key).map(|s| s.mod_revision) != expected_mod_revision {
            return Ok(None);
        }
        // As in etcd, the lease is only checked on the branch that runs.
        st.check_lease(lease)?;
        Ok(Some(st.put(&self.inner.events, key, value, lease)))
    }

    pub async fn compare_and_delete(&self, key: &str, expected_mod_revision: i64) -> Result<bool> {
        let mut st = self.lock();
        if st.kv.get(key).map(|s| s.mod_revision) != Some(expected_mod_revision) {
            return Ok(false);
        }
        Ok(st.delete(&self.inner.events, key))
    }

    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut st = self.lock();
        if revision > st.revision {
            return Err(CoordError::Config(format!(
                "cannot compact at future revision {revision} (current {})",
                st.revision
            )));
        }
        if st.compact_revision > 0 && revision <= st.compact_revision {
            // As etcd: a revision at or below the last compaction is gone already.
            return Err(CoordError::Config(format!(
                "revision {revision} is already compacted (at {})",
                st.compact_revision
            )));
        }
        while st.history.front().is_some_and(|b| b.revision < revision) {
            st.history.pop_front();
        }
        st.compact_revision = st.compact_revision.max(revision);
        Ok(())
    }

    pub async fn watch_prefix(&self, prefix: &str, from_revision: i64) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let (sub, first, skip_below) = {
            let st = self.lock();
            // Subscribing under the lock: no batch can slip between the history read and the subscription.
            let sub = self.inner.events.subscribe();
            let start = if from_revision <= 0 {
                st.revision + 1
            } else {
                from_revision
            };
            let first = if start < st.compact_revision {
                vec![WatchEvent::Resync {
                    snapshot: st.snapshot(prefix),
                }]
            } else {
                st.history
                    .iter()
                    .filter(|b| b.revision >= start)
                    .flat_map(|b| b.events.iter())
                    .filter(|e| under(e, prefix))
                    .cloned()
                    .collect()
            };
            (sub, first, start.max(st.revision + 1))
        };
        let task = tokio::spawn(feed_watch(
            Arc::downgrade(&self.inner),
            prefix.to_owned(),
            sub,
            tx,
            first,
            skip_below,
        ));
        Ok(Watch::new(rx, task))
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding this lock leaves maps that are still structurally valid; keep serving.
    inner
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn under(event: &WatchEvent, prefix: &str) -> bool {
    match event {
        WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key.starts_with(prefix),
        WatchEvent::Resync { .. } => true,
    }
}

impl State {
    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(CoordError::LeaseLost(id)),
            _ => Ok(()),
        }
    }

    fn snapshot(&self, prefix: &str) -> Snapshot {
        let entries = self
            .kv
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, s)| KeyValue {
                key: k.clone(),
                value: s.value.clone(),
                mod_revision: s.mod_revision,
            })
            .collect();
        Snapshot {
            entries,
            revision: self.revision,
        }
    }

    fn commit(&mut self, events: &broadcast::Sender<Arc<Batch>>, batch: Vec<WatchEvent>) {
        let batch = Arc::new(Batch {
            revision: self.revision,
            events: batch,
        });
        self.history.push_back(batch.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compact_revision = self.compact_revision.max(old.revision + 1);
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = events.send(batch);
    }

    fn put(
        &mut self,
        events: &broadcast::Sender<Arc<Batch>>,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> i64 {
        self.revision += 1;
        let rev = self.revision;
        let old_lease = self.kv.get(key).and_then(|s| s.lease);
        if old_lease != lease {
            if let Some(l) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.insert(key.to_owned());
            }
        }
        self.kv.insert(
            key.to_owned(),
            Stored {
                value: value.clone(),
                mod_revision: rev,
                lease,
            },
        );
        self.commit(
            events,
            vec![WatchEvent::Put {
                key: key.to_owned(),
                value,
                mod_revision: rev,
            }],
        );
        rev
    }

    fn delete(&mut self, events: &broadcast::Sender<Arc<Batch>>, key: &str) -> bool {
        let Some(old) = self.kv.remove(key) else {
            return false;
        };
        if let Some(l) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
        self.revision += 1;
        let rev = self.revision;
        self.commit(
            events,
            vec![WatchEvent::Delete {
                key: key.to_owned(),
                mod_revision: rev,
            }],
        );
        true
    }

    /// Revoke or expiry: the lease and all its keys go in one revision.
    fn drop_lease(&mut self, events: &broadcast::Sender<Arc<Batch>>, lease: LeaseId) {
        let Some(l) = self.leases.remove(&lease) else {
            return;
        };
        if l.keys.is_empty() {
            return;
        }
        self.revision += 1;
        let rev = self.revision;
        let mut batch = Vec::with_capacity(l.keys.len());
        for key in l.keys {
            self.kv.remove(&key);
            batch.push(WatchEvent::Delete {
                key,
                mod_revision: rev,
            });
        }
        self.commit(events, batch);
    }
}

/// Sleeps until the lease's deadline, re-reading it after each wake (keep-alives push it out).
/// Holds only a weak reference while sleeping so a dropped store is freed.
async fn expire_when_due(inner: Weak<Inner>, lease: LeaseId) {
    loop {
        let deadline = {
            let Some(inner) = inner.upgrade() else { return };
            let st = lock(&inner);
            match st.leases.get(&lease) {
                Some(l) => l.deadline,
                None => return,
            }
        };
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut st = lock(&inner);
        match st.leases.get(&lease) {
            None => return,
            Some(l) if l.deadline <= Instant::now() => {
                tracing::debug!(lease = %lease, "memory store lease expired");
                st.drop_lease(&inner.events, lease);
                return;
            }
            Some(_) => {}
        }
    }
}

/// Forwards broadcast batches under `prefix` to one watcher, after its replayed history; resyncs from
/// the current state when the broadcast buffer overflowed.
async fn feed_watch(
    inner: Weak<Inner>,
    prefix: String,
    mut sub: broadcast::Receiver<Arc<Batch>>,
    tx: mpsc::Sender<WatchEvent>,
    first: Vec<WatchEvent>,
    mut skip_below: i64,
) {
    for event in first {
        if tx.send(event).await.is_err() {
            return;
        }
    }
    loop {
        match sub.recv().await {
            Ok(batch) => {
                if batch.revision < skip_below {
                    continue;
                }
                for event in batch.events.iter().filter(|e| under(e, &prefix)) {
                    if tx.send(event.clone()).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                let snapshot = {
                    let st = lock(&strong);
                    sub = strong.events.subscribe();
                    st.snapshot(&prefix)
                };
                drop(strong);
                tracing::debug!(
                    prefix,
                    missed,
                    revision = snapshot.revision,
                    "memory watch lagged; resyncing"
                );
                skip_below = snapshot.revision + 1;
                if tx.send(WatchEvent::Resync { snapshot }).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
