//! Hot swap of a drafter worker's trained drafter: follow the live version in the coordination store,
//! fetch and check its weights, load them beside the running drafter and switch new sequences to them.
//!
//! [`LiveDrafter`] holds a trainable drafter (the self-drafter, or the draft model) as loaded (version
//! 0) and the version live now. A stream takes
//! the live model when it opens and keeps it to the end: sequences in flight finish on the version they
//! started with (their KV caches stay valid and nothing waits), new sequences get the new version. A
//! swap is one pointer store under a lock held for nanoseconds, so it sits between two steps of every
//! stream and slows none of them.
//!
//! [`follow`] reads `/specd/v1/drafters/{model}/{kind}/current`, then watches it. For a new version it
//! fetches the file from the trainer named in the record (`Trainer.FetchWeights`), checks size and
//! sha256 against the record, parses it, builds the adapted drafter and runs a short forward to check
//! that its logits are finite, all off the async threads; only then does it swap. A file that fails any
//! check is refused: the old version stays live, the refusal is logged and counted, and a
//! [`BadVersion`] report goes to the store so the trainer rolls the version back. A trainer that cannot
//! be reached is retried with backoff; the old version serves meanwhile. Speculation is lossless with
//! any drafter, so no swap changes any output; it only changes how much is accepted.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use specd_coord::backoff::Backoff;
use specd_coord::records::now_unix_ms;
use specd_coord::{keys, BadVersion, DrafterVersion, Record, Store, WatchEvent};
use specd_engine::{LogitsWanted, Model, TrainedWeights};
use specd_proto::internal::v1 as pb;
use specd_service::grpc::Keepalive;
use specd_service::weights::{fetch, Expected, FetchError};
use specd_service::Shutdown;

/// Largest weight file a drafter accepts.
pub const MAX_WEIGHT_BYTES: u64 = 256 << 20;

/// A trainable drafter as loaded and the version serving new sequences.
#[derive(Clone)]
pub struct LiveDrafter {
    base: Model,
    /// Its kind on the wire and in the store (`self` or `model`).
    kind: String,
    live: Arc<RwLock<(Model, u64)>>,
}

impl LiveDrafter {
    pub fn new(base: Model, kind: &str) -> Self {
        Self {
            live: Arc::new(RwLock::new((base.clone(), 0))),
            kind: kind.to_string(),
            base,
        }
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The model new sequences draft with, and its version.
    pub fn current(&self) -> (Model, u64) {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn version(&self) -> u64 {
        self.live.read().unwrap_or_else(|e| e.into_inner()).1
    }

    /// The drafter with trained weights `w` (none: as loaded), checked: the weights fit and a short
    /// forward gives finite logits. CPU work; call it off the async threads.
    pub fn prepare(&self, w: Option<TrainedWeights>) -> Result<Model, String> {
        let Some(w) = w else {
            return Ok(self.base.clone());
        };
        let model = w.apply_to(&self.base).map_err(|e| e.to_string())?;
        {
            let probe: Vec<u32> = (0..8u32)
                .map(|i| (i * 7919) % model.config().vocab as u32)
                .collect();
            let logits = model
                .forward(&mut model.new_cache(), &probe, LogitsWanted::All)
                .map_err(|e| e.to_string())?;
            if logits.iter().any(|v| !v.is_finite()) {
                return Err("the adapted drafter computes NaN or inf logits".into());
            }
        }
        Ok(model)
    }

    /// Makes `model` (version `version`) the drafter of new sequences.
    pub fn install(&self, model: Model, version: u64) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = (model, version);
        metrics::gauge!("specd_drafter_version", "kind" => self.kind.clone()).set(version as f64);
    }
}

/// Where [`follow`] reports and fetches.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// The target model the drafter drafts for (its id in the store).
    pub model: String,
    /// This worker's instance id, for bad-version reports.
    pub reporter: String,
    pub keepalive: Keepalive,
    /// Fetch timeout per attempt.
    pub fetch_timeout: Duration,
}

/// Keeps `live` on the version the store names, until `stop`.
pub async fn follow(store: Store, cfg: FollowConfig, live: LiveDrafter, stop: Shutdown) {
    let key = keys::drafter_current(&cfg.model, &live.kind);
    let mut backoff = Backoff::reconnect();
    loop {
        // Start (or start over) from a read of the record, then follow its changes.
        let start = tokio::select! { r = store.get(&key) => r, _ = stop.wait() => return };
        let (record, revision) = match start {
            Ok(Some((bytes, rev))) => (DrafterVersion::decode(&bytes).ok(), rev),
            Ok(None) => (None, store_revision(&store, &key).await),
            Err(e) => {
                tracing::warn!(error = %e, "reading the live drafter version failed; retrying");
                tokio::select! { _ = tokio::time::sleep(backoff.next_delay()) => continue, _ = stop.wait() => return }
            }
        };
        backoff.reset();
        if let Some(r) = record {
            apply(&store, &cfg, &live, r, &stop).await;
        }
        let mut watch = match store.watch_prefix(&key, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "watching the live drafter version failed; retrying");
                tokio::select! { _ = tokio::time::sleep(backoff.next_delay()) => continue, _ = stop.wait() => return }
            }
        };
        loop {
            let ev = tokio::select! { ev = watch.next() => ev, _ = stop.wait() => return };
            match ev {
                Some(WatchEvent::Put { key: k, value, .. }) if k == key => {
                    match DrafterVersion::decode(&value) {
                        Ok(r) => apply(&store, &cfg, &live, r, &stop).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring an unreadable drafter version record")
                        }
                    }
                }
                Some(WatchEvent::Delete { key: k, .. }) if k == key => {
                    // No live version: back to the drafter as loaded.
                    if live.version() != 0 {
                        live.install(live.base.clone(), 0);
                        tracing::info!(
                            "live drafter version removed; drafting with the drafter as loaded"
                        );
                    }
                }
                Some(WatchEvent::Resync { .. }) => break,
                Some(_) => {}
                None => break,
            }
        }
    }
}

/// The store's revision now, read through the key's (empty) prefix.
async fn store_revision(store: &Store, key: &str) -> i64 {
    store.get_prefix(key).await.map(|s| s.revision).unwrap_or(0)
}

/// Makes the record's version live, unless it is live already or its weights are refused.
async fn apply(
    store: &Store,
    cfg: &FollowConfig,
    live: &LiveDrafter,
    r: DrafterVersion,
    stop: &Shutdown,
) {
    if r.version == live.version() || r.kind != live.kind {
        return;
    }
    let layers = live.base.config().layers as u64;
    if r.layers != 0 && r.layers != layers {
        // A configuration mismatch, not a bad file: the version may be right for other drafters.
        tracing::error!(
            version = r.version,
            trained_for = r.layers,
            layers,
            kind = %live.kind,
            "drafter version trained for another drafter depth; not loaded (check --self-layers and --train-layers, or the draft model)"
        );
        metrics::counter!("specd_drafter_swaps_total", "outcome" => "mismatch").increment(1);
        return;
    }
    let t0 = Instant::now();
    let adapter = if r.version == 0 {
        None
    } else {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let data = loop {
            let req = pb::FetchWeightsRequest {
                model: r.model.clone(),
                drafter_kind: r.kind.clone(),
                version: r.tag(),
            };
            let expected = Expected {
                sha256: r.sha256.clone(),
                size: r.size,
                max_bytes: MAX_WEIGHT_BYTES,
            };
            match fetch(&r.url, cfg.keepalive, req, &expected, cfg.fetch_timeout).await {
                Ok(d) => break d,
                Err(e @ FetchError::Refused { .. }) => {
                    refuse(store, cfg, &r, e.to_string()).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(version = r.version, error = %e, "fetching drafter weights failed; retrying");
                    metrics::counter!("specd_drafter_swaps_total", "outcome" => "fetch_retry")
                        .increment(1);
                    // A newer record replaces this one; the caller's watch picks it up after this.
                    if let Ok(Some((bytes, _))) = store.get(&r.key()).await {
                        if DrafterVersion::decode(&bytes)
                            .map(|n| n.version != r.version)
                            .unwrap_or(false)
                        {
                            return;
                        }
                    }
                    tokio::select! { _ = tokio::time::sleep(backoff.next_delay()) => continue, _ = stop.wait() => return }
                }
            }
        };
        match TrainedWeights::from_file_bytes(&data, &live.base) {
            Ok(a) => Some(a),
            Err(e) => {
                refuse(store, cfg, &r, e.to_string()).await;
                return;
            }
        }
    };
    let prep = live.clone();
    let model = match tokio::task::spawn_blocking(move || prep.prepare(adapter)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            refuse(store, cfg, &r, e).await;
            return;
        }
        Err(e) => {
            refuse(store, cfg, &r, format!("loading panicked: {e}")).await;
            return;
        }
    };
    let from = live.version();
    live.install(model, r.version);
    let load_s = t0.elapsed().as_secs_f64();
    let since_publish_ms = now_unix_ms().saturating_sub(r.published_at);
    metrics::counter!("specd_drafter_swaps_total", "outcome" => "swapped").increment(1);
    metrics::histogram!("specd_drafter_swap_seconds").record(load_s);
    tracing::info!(
        from,
        to = r.version,
        fetch_and_load_ms = (load_s * 1000.0) as u64,
        since_publish_ms,
        reason = %r.reason,
        "drafter version swapped in for new sequences"
    );
}

/// Refuses a version's weights: logged, counted, reported to the store; the old version stays.
async fn refuse(store: &Store, cfg: &FollowConfig, r: &DrafterVersion, reason: String) {
    tracing::error!(version = r.version, %reason, "drafter weights refused; the live version stays");
    metrics::counter!("specd_drafter_swaps_total", "outcome" => "refused").increment(1);
    let report = BadVersion {
        model: r.model.clone(),
        kind: r.kind.clone(),
        version: r.version,
        reporter: cfg.reporter.clone(),
        reason,
        at: now_unix_ms(),
    };
    if let Err(e) = store.put_record(&report, None).await {
        tracing::warn!(error = %e, "reporting the refused version failed");
    }
}
