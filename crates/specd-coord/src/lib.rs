//! `specd-coord`: coordination for specd, and the only crate that talks to etcd.
//!
//! One handle, [`Store`], over two backends with the same semantics: [`EtcdStore`] for a cluster and
//! [`MemoryStore`] for `specd up` (one process) and tests. On top of the primitive operations it offers
//! what the services need, written once for both backends:
//! - [`types`]: lease ids, entries, snapshots, [`WatchEvent`]s and the [`Watch`] receiver;
//! - [`store`]: [`Store`], the dispatching handle, with typed-record helpers;
//! - [`memory`] and [`etcd`]: the backends (etcd watches resume across outages, with `Resync` after a
//!   compaction);
//! - [`lease`]: [`KeepAlive`], which keeps a lease alive and signals its loss;
//! - [`election`]: `campaign`/[`Leadership`], one leader per key, over compare-and-swap;
//! - [`registration`]: [`Registration`], an instance record that re-registers itself after a lease loss;
//! - [`keys`] and [`records`]: the key layout under `/specd/v1/` and the JSON records stored there;
//! - [`backoff`], [`error`], and [`testing`] (a real etcd child process for tests).
//!
//! It stores pointers, versions and checksums, never weights; it knows nothing about models, gRPC or
//! process shutdown: a lost lease is reported, and the owner decides to cancel itself.

pub mod backoff;
pub mod election;
pub mod error;
pub mod etcd;
pub mod keys;
pub mod lease;
pub mod memory;
pub mod records;
pub mod registration;
pub mod store;
pub mod testing;
pub mod types;

pub use election::Leadership;
pub use error::{CoordError, Result};
pub use etcd::{EtcdConfig, EtcdStore};
pub use lease::KeepAlive;
pub use memory::MemoryStore;
pub use records::{
    BadVersion, DrafterVersion, InstanceRecord, LoadReport, Record, Role, TpGroupRecord,
};
pub use registration::{Registration, RegistrationState};
pub use store::Store;
pub use types::{KeyValue, LeaseId, Snapshot, Watch, WatchEvent};
