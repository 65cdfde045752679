//! Plain data shared by both backends: lease ids, key-value entries, prefix snapshots, watch events and
//! the [`Watch`] receiver.
//!
//! Revisions follow etcd: one global counter, bumped once per write (a transaction or a lease expiry that
//! deletes several keys is one revision); every key carries the revision of its last modification.

use std::fmt;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// An etcd-style lease id. Keys attached to a lease disappear when it expires or is revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One key with its value and the revision that last modified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// All keys under a prefix, ascending by key, as of `revision` (the store revision of the read).
/// Watching from `revision + 1` continues exactly where the snapshot ends.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub entries: Vec<KeyValue>,
    pub revision: i64,
}

/// A change seen by a prefix watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        mod_revision: i64,
    },
    Delete {
        key: String,
        mod_revision: i64,
    },
    /// The watch could not replay history (it was compacted, or the watcher fell too far behind):
    /// this is the full current state of the prefix as of `revision`, replacing whatever the consumer held.
    /// Events that follow have revisions above `revision`.
    Resync {
        snapshot: Snapshot,
    },
}

impl WatchEvent {
    /// The revision this event brings the consumer to.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { mod_revision, .. } | WatchEvent::Delete { mod_revision, .. } => {
                *mod_revision
            }
            WatchEvent::Resync { snapshot } => snapshot.revision,
        }
    }
}

/// A stored entry as the backends see it (with its lease), used by the shared election code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: Option<LeaseId>,
}

/// The receiving end of a prefix watch. Events arrive in revision order; the background task feeding it
/// stops when this is dropped.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

/// How many events a watch buffers before its feeder waits (memory) or the stream applies backpressure (etcd).
pub(crate) const WATCH_BUFFER: usize = 256;

impl Watch {
    pub(crate) fn new(rx: mpsc::Receiver<WatchEvent>, task: JoinHandle<()>) -> Self {
        Watch { rx, task }
    }

    /// The next event; `None` only when the store is gone (memory store dropped).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
