//! `EtcdStore`: the etcd backend, and the only code in specd that links `etcd-client`.
//!
//! Every unary call carries a deadline (`EtcdConfig::request_timeout`) and maps failures onto
//! [`CoordError`]: transport trouble is `Unavailable` (retryable), a missing lease is `LeaseLost`.
//! Prefix watches run in a background task that survives etcd restarts: on a broken stream it
//! reconnects with backoff and re-watches from the last delivered revision + 1; if that revision was
//! compacted meanwhile it re-reads the prefix and emits [`WatchEvent::Resync`].
//!
//! It deliberately does not use etcd's election or lock services: elections are written once, over
//! compare-and-swap, in [`crate::election`], so the in-process backend has the same semantics.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseClient,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, ResponseHeader, Txn, TxnOp, WatchOptions,
    WatchResponse, WatchStream,
};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::error::{CoordError, Result};
use crate::types::{Entry, KeyValue, LeaseId, Snapshot, Watch, WatchEvent, WATCH_BUFFER};

/// Where etcd is and how long to wait for it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Deadline for every unary request (and for a watch or keep-alive stream to open).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Default timeouts for the given endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(CoordError::Config("no etcd endpoints given".into()));
        }
        if let Some(bad) = self.endpoints.iter().find(|e| e.trim().is_empty()) {
            return Err(CoordError::Config(format!("empty etcd endpoint {bad:?}")));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(CoordError::Config("etcd timeouts must be positive".into()));
        }
        Ok(())
    }
}

/// A connection to an etcd cluster. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    // Behind an Arc: etcd-client's `Client` is several kilobytes of per-service handles.
    client: Arc<Client>,
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Maps an etcd-client error; `lease` names the lease a "lease not found" refers to.
fn map_err(err: etcd_client::Error, lease: Option<LeaseId>) -> CoordError {
    use etcd_client::Error as E;
    use tonic::Code;
    let lease_missing = match &err {
        E::GRpcStatus(s) => s.message().contains("lease not found"),
        E::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    };
    if lease_missing {
        // Every call that names a lease passes it; 0 marks "unknown" for the others.
        return CoordError::LeaseLost(lease.unwrap_or(LeaseId(0)));
    }
    match err {
        E::InvalidArgs(m) | E::EndpointError(m) => CoordError::Config(m),
        E::InvalidUri(e) => CoordError::Config(e.to_string()),
        E::GRpcStatus(s) => match s.code() {
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated => CoordError::Config(format!("etcd: {}", s.message())),
            _ => CoordError::Unavailable(format!("etcd: {:?}: {}", s.code(), s.message())),
        },
        other => CoordError::Unavailable(other.to_string()),
    }
}

/// The store revision a response was served at. etcd always sends a header; 0 (no revision) if not.
fn revision_of(header: Option<&ResponseHeader>) -> i64 {
    header.map(|h| h.revision()).unwrap_or_default()
}

fn utf8_key(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| CoordError::Codec(format!("non-UTF-8 key {key:?}")))
}

fn lease_of(raw: i64) -> Option<LeaseId> {
    (raw != 0).then_some(LeaseId(raw))
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

impl EtcdStore {
    /// Builds the client. etcd-client connects lazily, so this succeeds while etcd is down; the first
    /// request then fails with `Unavailable`.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            // HTTP/2 pings find a silently dead connection; etcd refuses pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| map_err(e, None))?;
        Ok(EtcdStore {
            client: Arc::new(client),
            request_timeout: config.request_timeout,
        })
    }

    async fn call<T>(
        &self,
        lease: Option<LeaseId>,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(res) => res.map_err(|e| map_err(e, lease)),
            Err(_) => Err(CoordError::Unavailable(format!(
                "etcd request timed out after {:?}",
                self.request_timeout
            ))),
        }
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = (ttl.as_secs_f64().ceil() as i64).max(1);
        let mut lc = self.client.lease_client();
        let resp = self.call(None, lc.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(CoordError::Unavailable(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(LeaseId(resp.id()))
    }

    pub(crate) fn refresher(&self, lease: LeaseId) -> EtcdRefresher {
        EtcdRefresher {
            client: self.client.lease_client(),
            lease,
            stream: None,
            timeout: self.request_timeout,
        }
    }

    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut lc = self.client.lease_client();
        match self.call(Some(lease), lc.revoke(lease.0)).await {
            Ok(_) | Err(CoordError::LeaseLost(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<i64> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(lease, kv.put(key, value, put_options(lease)))
            .await?;
        Ok(revision_of(resp.header()))
    }

    pub(crate) async fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        let mut kv = self.client.kv_client();
        let resp = self.call(None, kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(|e| Entry {
            value: e.value().to_vec(),
            mod_revision: e.mod_revision(),
            lease: lease_of(e.lease()),
        }))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot> {
        let mut kv = self.client.kv_client();
        let mut resp = self
            .call(None, kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = revision_of(resp.header());
        let entries = resp
            .take_kvs()
            .into_iter()
            .map(|e| {
                Ok(KeyValue {
                    key: utf8_key(e.key())?,
                    mod_revision: e.mod_revision(),
                    value: e.into_key_value().1,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Snapshot { entries, revision })
    }

    pub async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = self.client.kv_client();
        Ok(self.call(None, kv.delete(key, None)).await?.deleted() > 0)
    }

    pub async fn compare_and_swap_revision(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>> {
        let cmp = match expected_mod_revision {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            // create_revision 0 means the key does not exist.
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key, value, put_options(lease))]);
        let mut kv = self.client.kv_client();
        let resp = self.call(lease, kv.txn(txn)).await?;
        Ok(resp.succeeded().then(|| revision_of(resp.header())))
    }

    pub async fn compare_and_delete(&self, key: &str, expected_mod_revision: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key,
                CompareOp::Equal,
                expected_mod_revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        Ok(self.call(None, kv.txn(txn)).await?.succeeded())
    }

    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut kv = self.client.kv_client();
        self.call(None, kv.compact(revision, None)).await.map(drop)
    }

    pub async fn watch_prefix(&self, prefix: &str, from_revision: i64) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut feeder = WatchFeeder {
            store: self.clone(),
            prefix: prefix.to_owned(),
            next_revision: (from_revision > 0).then_some(from_revision),
            tx,
        };
        // Opened before returning: everything written after `watch_prefix` returns is seen.
        let stream = feeder.open().await?;
        let task = tokio::spawn(feeder.run(stream));
        Ok(Watch::new(rx, task))
    }
}

/// Keeps one etcd keep-alive stream per lease, reopening it after errors.
pub(crate) struct EtcdRefresher {
    client: LeaseClient,
    lease: LeaseId,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    timeout: Duration,
}

impl EtcdRefresher {
    pub(crate) fn reset(&mut self) {
        self.stream = None;
    }

    /// One keep-alive round trip; the lease's granted TTL on success.
    pub(crate) async fn refresh(&mut self) -> Result<Duration> {
        let res = match tokio::time::timeout(self.timeout, self.refresh_inner()).await {
            Ok(res) => res,
            Err(_) => Err(CoordError::Unavailable("etcd keep-alive timed out".into())),
        };
        if res.is_err() {
            self.stream = None;
        }
        res
    }

    async fn refresh_inner(&mut self) -> Result<Duration> {
        let lease = self.lease;
        let (keeper, stream) = match &mut self.stream {
            Some(s) => s,
            None => {
                let opened = self
                    .client
                    .keep_alive(lease.0)
                    .await
                    .map_err(|e| map_err(e, Some(lease)))?;
                self.stream.insert(opened)
            }
        };
        keeper
            .keep_alive()
            .await
            .map_err(|e| map_err(e, Some(lease)))?;
        match stream
            .message()
            .await
            .map_err(|e| map_err(e, Some(lease)))?
        {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
            Some(_) => Err(CoordError::LeaseLost(lease)),
            None => Err(CoordError::Unavailable(
                "etcd keep-alive stream closed".into(),
            )),
        }
    }
}

/// What one watch response means for the feeder.
enum Step {
    Continue,
    /// The start revision was compacted: resync from a fresh read.
    Compacted,
    /// The stream is unusable (cancelled for another reason): reconnect.
    Broken,
    /// The consumer dropped its `Watch`.
    Closed,
}

struct WatchFeeder {
    store: EtcdStore,
    prefix: String,
    /// The first revision not yet delivered; `None` until the first watch tells us where "now" is.
    next_revision: Option<i64>,
    tx: mpsc::Sender<WatchEvent>,
}

impl WatchFeeder {
    /// Opens a watch stream at `next_revision` and waits for etcd to confirm it.
    async fn open(&mut self) -> Result<WatchStream> {
        let mut options = WatchOptions::new().with_prefix();
        if let Some(rev) = self.next_revision {
            options = options.with_start_revision(rev);
        }
        let mut wc = self.store.client.watch_client();
        let mut stream = self
            .store
            .call(None, wc.watch(self.prefix.as_str(), Some(options)))
            .await?;
        let created = self.store.call(None, stream.message()).await?;
        match created {
            Some(resp) if resp.created() => {
                if self.next_revision.is_none() {
                    self.next_revision = Some(revision_of(resp.header()) + 1);
                }
                Ok(stream)
            }
            _ => Err(CoordError::Unavailable("etcd watch was not created".into())),
        }
    }

    async fn handle(&mut self, resp: WatchResponse) -> Step {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Step::Compacted;
            }
            tracing::warn!(prefix = %self.prefix, reason = resp.cancel_reason(), "etcd cancelled a watch");
            return Step::Broken;
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let mod_revision = kv.mod_revision();
            let key = match utf8_key(kv.key()) {
                Ok(key) => key,
                Err(err) => {
                    tracing::warn!(cause = %err, "skipping watch event with a non-UTF-8 key");
                    self.next_revision = Some(mod_revision + 1);
                    continue;
                }
            };
            let out = match event.event_type() {
                EventType::Put => WatchEvent::Put {
                    key,
                    value: kv.value().to_vec(),
                    mod_revision,
                },
                EventType::Delete => WatchEvent::Delete { key, mod_revision },
            };
            if self.tx.send(out).await.is_err() {
                return Step::Closed;
            }
            self.next_revision = Some(mod_revision + 1);
        }
        Step::Continue
    }

    /// Re-reads the prefix until it succeeds and emits it as a `Resync`; false if the consumer is gone.
    async fn resync(&mut self, backoff: &mut Backoff) -> bool {
        loop {
            match self.store.get_prefix(&self.prefix).await {
                Ok(snapshot) => {
                    tracing::info!(prefix = %self.prefix, revision = snapshot.revision, "etcd watch resynced after compaction");
                    self.next_revision = Some(snapshot.revision + 1);
                    return self.tx.send(WatchEvent::Resync { snapshot }).await.is_ok();
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "etcd resync read failed; retrying");
                    if self.tx.is_closed() {
                        return false;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn run(mut self, mut stream: WatchStream) {
        let mut backoff = Backoff::reconnect();
        loop {
            let mut compacted = false;
            loop {
                let step = match stream.message().await {
                    Ok(Some(resp)) => self.handle(resp).await,
                    Ok(None) => Step::Broken,
                    Err(err) => {
                        tracing::debug!(prefix = %self.prefix, cause = %err, "etcd watch stream broke");
                        Step::Broken
                    }
                };
                match step {
                    Step::Continue => backoff.reset(),
                    Step::Compacted => {
                        compacted = true;
                        break;
                    }
                    Step::Broken => break,
                    Step::Closed => return,
                }
            }
            // Reconnect, resuming at the first revision not delivered.
            loop {
                if compacted {
                    if !self.resync(&mut backoff).await {
                        return;
                    }
                    compacted = false;
                } else {
                    if self.tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                match self.open().await {
                    Ok(s) => {
                        tracing::debug!(prefix = %self.prefix, from = ?self.next_revision, "etcd watch resumed");
                        stream = s;
                        break;
                    }
                    Err(err) => {
                        tracing::debug!(prefix = %self.prefix, cause = %err, "etcd watch reconnect failed")
                    }
                }
            }
        }
    }
}
