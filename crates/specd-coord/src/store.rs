//! `Store`: the one handle the rest of specd holds to coordinate, over etcd or the in-process store.
//!
//! It is an enum of the two backends rather than a `dyn` trait: there are exactly two, the operations
//! are `async fn`s (no boxing, no `async-trait`), and a `Store` is a cheap `Clone` to pass around where a
//! trait object would be an `Arc<dyn ...>`. Each backend implements the primitive operations
//! (leases, put/get/delete, compare-and-swap, prefix watches) with the same semantics; everything built
//! on top of them (elections, registrations, typed records) is written once, here and in the modules
//! next to it, so the two cannot drift apart.

use std::time::Duration;

use crate::error::Result;
use crate::etcd::{EtcdConfig, EtcdStore};
use crate::lease::KeepAlive;
use crate::memory::MemoryStore;
use crate::records::Record;
use crate::types::{Entry, LeaseId, Snapshot, Watch};

/// A coordination store: etcd in a cluster, in-process in `specd up` and tests.
#[derive(Clone, Debug)]
pub enum Store {
    Etcd(EtcdStore),
    Memory(MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Etcd($s) => $call,
            Store::Memory($s) => $call,
        }
    };
}

impl Store {
    /// A fresh in-process store.
    pub fn memory() -> Store {
        Store::Memory(MemoryStore::new())
    }

    /// A client of the etcd cluster at `config.endpoints` (connects lazily).
    pub async fn etcd(config: EtcdConfig) -> Result<Store> {
        Ok(Store::Etcd(EtcdStore::connect(config).await?))
    }

    /// `"etcd"` or `"memory"`, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Etcd(_) => "etcd",
            Store::Memory(_) => "memory",
        }
    }

    /// Grants a lease of `ttl` (etcd rounds up to whole seconds and enforces its minimum TTL).
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        dispatch!(self, s => s.grant_lease(ttl).await)
    }

    /// Starts keeping `lease` alive in the background; fails with `LeaseLost` if it is already gone.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive> {
        KeepAlive::start(self, lease).await
    }

    /// Revokes `lease`, deleting its keys. Revoking a lease that is already gone succeeds.
    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        dispatch!(self, s => s.revoke(lease).await)
    }

    /// Writes `key`, attached to `lease` if given (`LeaseLost` if that lease is gone). Returns the new
    /// revision, which is the key's mod revision.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<i64> {
        let value = value.into();
        dispatch!(self, s => s.put(key, value, lease).await)
    }

    /// The value of `key` and its mod revision.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        Ok(self
            .get_entry(key)
            .await?
            .map(|e| (e.value, e.mod_revision)))
    }

    pub(crate) async fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        dispatch!(self, s => s.get_entry(key).await)
    }

    /// Every key under `prefix`, ascending, and the revision of the read.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot> {
        dispatch!(self, s => s.get_prefix(prefix).await)
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        dispatch!(self, s => s.delete(key).await)
    }

    /// Writes `key` only if its mod revision is `expected_mod_revision` (`None`: only if it does not
    /// exist). Whether it was written.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        Ok(self
            .compare_and_swap_revision(key, expected_mod_revision, value, lease)
            .await?
            .is_some())
    }

    /// [`Store::compare_and_swap`] returning the new mod revision on success.
    pub async fn compare_and_swap_revision(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>> {
        let value = value.into();
        dispatch!(self, s => s.compare_and_swap_revision(key, expected_mod_revision, value, lease).await)
    }

    /// Deletes `key` only if its mod revision is `expected_mod_revision`; whether it was deleted.
    pub async fn compare_and_delete(&self, key: &str, expected_mod_revision: i64) -> Result<bool> {
        dispatch!(self, s => s.compare_and_delete(key, expected_mod_revision).await)
    }

    /// Drops the history before `revision`: watches starting earlier get a `Resync`. Operations only.
    pub async fn compact(&self, revision: i64) -> Result<()> {
        dispatch!(self, s => s.compact(revision).await)
    }

    /// Watches every key under `prefix`, starting at `from_revision` (`<= 0`: changes after this call).
    /// Usual pattern: `get_prefix`, then `watch_prefix(prefix, snapshot.revision + 1)`.
    /// The watch is established when this returns and survives store outages (see [`crate::etcd`]).
    pub async fn watch_prefix(&self, prefix: &str, from_revision: i64) -> Result<Watch> {
        dispatch!(self, s => s.watch_prefix(prefix, from_revision).await)
    }

    /// Writes a typed record under its own key.
    pub async fn put_record<R: Record>(&self, record: &R, lease: Option<LeaseId>) -> Result<i64> {
        self.put(&record.key(), record.encode()?, lease).await
    }

    /// Reads a typed record.
    pub async fn get_record<R: Record>(&self, key: &str) -> Result<Option<R>> {
        match self.get(key).await? {
            Some((bytes, _)) => Ok(Some(R::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Reads every record under `prefix` and the revision of the read. Entries that do not decode
    /// (another writer's garbage, a newer incompatible layout) are skipped with a warning rather than
    /// hiding all the others.
    pub async fn list_records<R: Record>(&self, prefix: &str) -> Result<(Vec<R>, i64)> {
        let snapshot = self.get_prefix(prefix).await?;
        let records = snapshot
            .entries
            .iter()
            .filter_map(|kv| match R::decode(&kv.value) {
                Ok(r) => Some(r),
                Err(err) => {
                    tracing::warn!(key = %kv.key, cause = %err, "skipping undecodable record");
                    None
                }
            })
            .collect();
        Ok((records, snapshot.revision))
    }
}

impl From<MemoryStore> for Store {
    fn from(s: MemoryStore) -> Store {
        Store::Memory(s)
    }
}

impl From<EtcdStore> for Store {
    fn from(s: EtcdStore) -> Store {
        Store::Etcd(s)
    }
}
