//! Publishing drafter versions and rolling them back: the weight file, the version record and the
//! `current` pointer in the coordination store, and the live watch that undoes a bad swap.
//!
//! A publish writes the weight file to the [`WeightStore`], then the version's history record under
//! `/specd/v1/drafters/{model}/{kind}/versions/{v}` (create-only, so two trainers can never claim the same
//! number), then moves `current` to it by compare-and-swap against the revision this trainer last read:
//! a trainer that lost its leadership, or raced another, changes nothing. Versions keep their lineage
//! (`parent`) and the gate figures that let them out.
//!
//! After a swap, [`LiveCounts`] (drafted and accepted tokens per drafter version, from the samples the
//! targets send) is compared with the parent's recent figures; a live acceptance below the parent's by
//! more than a margin, or a drafter worker's report that the file did not verify or load (`bad/`), moves
//! `current` back to the parent (a record with `rolled_back_from` and the reason).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use specd_coord::records::now_unix_ms;
use specd_coord::{keys, BadVersion, CoordError, DrafterVersion, Record, Store};
use specd_engine::{Model, TrainedWeights};
use specd_proto::internal::v1 as pb;
use specd_service::grpc::Keepalive;
use specd_service::weights::{fetch, Expected};

use crate::weights::WeightStore;

/// How versions are let out and taken back.
#[derive(Clone, Copy, Debug)]
pub struct GateConfig {
    /// A candidate's held-out expected acceptance must beat the live version's by this much.
    pub margin: f64,
    /// Held-out positions the gate needs before it decides.
    pub min_positions: usize,
    /// A live acceptance this far below the parent's rolls back.
    pub rollback_margin: f64,
    /// Drafted tokens each side needs before a rollback is considered.
    pub rollback_min_drafted: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            margin: 0.02,
            min_positions: 128,
            rollback_margin: 0.1,
            rollback_min_drafted: 400,
        }
    }
}

/// What the gate measured for a candidate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GateFigures {
    pub live: f64,
    pub candidate: f64,
    pub positions: usize,
}

impl GateConfig {
    /// Whether the gate lets a candidate out.
    pub fn passes(&self, g: &GateFigures) -> bool {
        g.positions >= self.min_positions && g.candidate >= g.live + self.margin
    }
}

/// Why publishing or rolling back did nothing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("coordination store: {0}")]
    Store(#[from] CoordError),
    #[error("weight store: {0}")]
    Io(#[from] std::io::Error),
    #[error("weights: {0}")]
    Weights(String),
    /// Someone else moved `current` (another trainer, or this one is no longer the leader).
    #[error("the live version changed under this trainer")]
    Raced,
}

/// Drafted and accepted tokens per drafter version tag, over a recent window of each.
#[derive(Clone, Debug, Default)]
pub struct LiveCounts {
    inner: Arc<Mutex<HashMap<String, Window>>>,
}

/// The recent drafted tokens of one version, as (drafted, accepted) per sample, bounded.
#[derive(Clone, Debug, Default)]
struct Window {
    entries: std::collections::VecDeque<(u64, u64)>,
    drafted: u64,
    accepted: u64,
}

/// Drafted tokens a version's window keeps.
const WINDOW_DRAFTED: u64 = 4000;

impl LiveCounts {
    /// Counts one sample's verified drafts for the version that drafted them.
    pub fn record(&self, version: &str, drafted: u64, accepted: u64) {
        if drafted == 0 {
            return;
        }
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let w = m.entry(normalize(version)).or_default();
        w.entries.push_back((drafted, accepted));
        w.drafted += drafted;
        w.accepted += accepted;
        while w.drafted - w.entries.front().map_or(0, |e| e.0) >= WINDOW_DRAFTED {
            if let Some((d, a)) = w.entries.pop_front() {
                w.drafted -= d;
                w.accepted -= a;
            }
        }
    }

    /// (drafted, acceptance rate) of a version's recent window.
    pub fn rate(&self, version: u64) -> (u64, f64) {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&version.to_string()) {
            Some(w) if w.drafted > 0 => (w.drafted, w.accepted as f64 / w.drafted as f64),
            _ => (0, 0.0),
        }
    }
}

/// A version tag as counted: "" (a drafter that reports no version) is version 0.
fn normalize(v: &str) -> String {
    if v.is_empty() {
        "0".into()
    } else {
        v.to_string()
    }
}

/// Publishes and rolls back the versions of one (model, kind).
#[derive(Clone)]
pub struct Publisher {
    pub store: Store,
    pub weights: WeightStore,
    pub model: String,
    pub kind: String,
    /// Layers of the drafter trained (drafters of another layer count do not load its versions).
    pub layers: usize,
    /// This trainer's advertised gRPC address, where drafters fetch from.
    pub url: String,
    pub cfg: GateConfig,
    pub keepalive: Keepalive,
}

impl Publisher {
    /// The live version and the revision of its record (`None`: nothing was ever published).
    pub async fn current(&self) -> Result<Option<(DrafterVersion, i64)>, PublishError> {
        let key = keys::drafter_current(&self.model, &self.kind);
        match self.store.get(&key).await? {
            Some((bytes, rev)) => Ok(Some((DrafterVersion::decode(&bytes)?, rev))),
            None => Ok(None),
        }
    }

    /// The history record of a version.
    pub async fn version(&self, version: u64) -> Result<Option<DrafterVersion>, PublishError> {
        let key = keys::drafter_version(&self.model, &self.kind, version);
        Ok(self.store.get_record(&key).await?)
    }

    /// The highest version number ever published.
    async fn highest(&self) -> Result<u64, PublishError> {
        let prefix = format!("{}versions/", keys::drafter(&self.model, &self.kind));
        let (all, _) = self.store.list_records::<DrafterVersion>(&prefix).await?;
        Ok(all.iter().map(|v| v.version).max().unwrap_or(0))
    }

    /// Publishes `adapter` as the next version, trained from the live one, with the gate's figures.
    pub async fn publish(
        &self,
        adapter: &TrainedWeights,
        gate: GateFigures,
    ) -> Result<DrafterVersion, PublishError> {
        let data = adapter
            .to_file_bytes()
            .map_err(|e| PublishError::Weights(e.to_string()))?;
        let current = self.current().await?;
        let (parent, rev) = match &current {
            Some((v, rev)) => (Some(v.version), Some(*rev)),
            None => (None, None),
        };
        let version = self.highest().await?.max(parent.unwrap_or(0)) + 1;
        let (sha256, size) = self
            .weights
            .write(&self.model, &self.kind, version, &data)?;
        let record = DrafterVersion {
            model: self.model.clone(),
            kind: self.kind.clone(),
            version,
            sha256,
            size,
            url: self.url.clone(),
            layers: self.layers as u64,
            parent: Some(parent.unwrap_or(0)),
            gate_live: gate.live,
            gate_candidate: gate.candidate,
            gate_positions: gate.positions as u64,
            published_at: now_unix_ms(),
            rolled_back_from: None,
            reason: String::new(),
        };
        let history = keys::drafter_version(&self.model, &self.kind, version);
        if !self
            .store
            .compare_and_swap(&history, None, record.encode()?, None)
            .await?
        {
            return Err(PublishError::Raced);
        }
        if !self
            .store
            .compare_and_swap(&record.key(), rev, record.encode()?, None)
            .await?
        {
            return Err(PublishError::Raced);
        }
        metrics::counter!("specd_trainer_publishes_total").increment(1);
        metrics::gauge!("specd_trainer_live_version").set(version as f64);
        tracing::info!(
            version,
            parent = parent.unwrap_or(0),
            live = gate.live,
            candidate = gate.candidate,
            positions = gate.positions,
            "published a drafter version"
        );
        Ok(record)
    }

    /// Moves `current` back from `live` to its parent, saying why; the record now live.
    pub async fn rollback(
        &self,
        live: &DrafterVersion,
        rev: i64,
        reason: String,
    ) -> Result<DrafterVersion, PublishError> {
        let to = live.parent.unwrap_or(0);
        let mut record = match self.version(to).await? {
            Some(v) if to > 0 => v,
            _ => self.base_record(),
        };
        // The history record names the trainer that published it, at the address it had then (a pod IP
        // that a restart retires). When this trainer's store holds the file, drafters fetch it from here.
        if to > 0 && self.holds(&record) {
            record.url = self.url.clone();
        }
        record.rolled_back_from = Some(live.version);
        record.reason = reason.clone();
        if !self
            .store
            .compare_and_swap(&record.key(), Some(rev), record.encode()?, None)
            .await?
        {
            return Err(PublishError::Raced);
        }
        metrics::counter!("specd_trainer_rollbacks_total").increment(1);
        metrics::gauge!("specd_trainer_live_version").set(to as f64);
        tracing::warn!(from = live.version, to, %reason, "rolled back a drafter version");
        Ok(record)
    }

    /// Whether this trainer's weight store holds the file of `record`, intact.
    fn holds(&self, record: &DrafterVersion) -> bool {
        self.weights
            .read(&self.model, &self.kind, record.version)
            .is_ok_and(|d| specd_service::weights::sha256_hex(&d) == record.sha256)
    }

    /// Version 0: the drafter as loaded, no trained weights.
    fn base_record(&self) -> DrafterVersion {
        DrafterVersion {
            model: self.model.clone(),
            kind: self.kind.clone(),
            version: 0,
            sha256: String::new(),
            size: 0,
            url: self.url.clone(),
            layers: self.layers as u64,
            parent: None,
            gate_live: 0.0,
            gate_candidate: 0.0,
            gate_positions: 0,
            published_at: now_unix_ms(),
            rolled_back_from: None,
            reason: String::new(),
        }
    }

    /// Drafter workers' reports that `version` was refused.
    pub async fn bad_reports(&self, version: u64) -> Result<Vec<BadVersion>, PublishError> {
        let prefix = format!(
            "{}bad/{version:020}/",
            keys::drafter(&self.model, &self.kind)
        );
        Ok(self.store.list_records(&prefix).await?.0)
    }

    /// Checks the live version once: rolls it back if a drafter refused its file or its live acceptance
    /// fell below its parent's by more than the margin. The record now live, if it changed.
    pub async fn watch_once(
        &self,
        counts: &LiveCounts,
    ) -> Result<Option<DrafterVersion>, PublishError> {
        let Some((live, rev)) = self.current().await? else {
            return Ok(None);
        };
        if live.version == 0 {
            return Ok(None);
        }
        if let Some(bad) = self.bad_reports(live.version).await?.first() {
            let reason = format!("drafter {} refused it: {}", bad.reporter, bad.reason);
            return self.rollback(&live, rev, reason).await.map(Some);
        }
        let parent = live.parent.unwrap_or(0);
        let (n_live, live_rate) = counts.rate(live.version);
        let (n_parent, parent_rate) = counts.rate(parent);
        let min = self.cfg.rollback_min_drafted;
        if n_live >= min && n_parent >= min && live_rate + self.cfg.rollback_margin < parent_rate {
            let reason = format!(
                "live acceptance {live_rate:.3} over {n_live} drafted tokens, parent {parent} had {parent_rate:.3} over {n_parent}"
            );
            return self.rollback(&live, rev, reason).await.map(Some);
        }
        Ok(None)
    }

    /// The weights of the live version, to resume training `drafter` from: read from this trainer's
    /// weight store, else fetched from the trainer that published it. `None` for version 0 or nothing
    /// published.
    pub async fn load_live(
        &self,
        drafter: &Model,
    ) -> Result<Option<(DrafterVersion, TrainedWeights)>, PublishError> {
        let Some((live, _)) = self.current().await? else {
            return Ok(None);
        };
        if live.version == 0 {
            return Ok(None);
        }
        let data = match self.weights.read(&self.model, &self.kind, live.version) {
            Ok(d) if specd_service::weights::sha256_hex(&d) == live.sha256 => d,
            _ => {
                let req = pb::FetchWeightsRequest {
                    model: self.model.clone(),
                    drafter_kind: self.kind.clone(),
                    version: live.tag(),
                };
                let expected = Expected {
                    sha256: live.sha256.clone(),
                    size: live.size,
                    max_bytes: 1 << 30,
                };
                let d = fetch(
                    &live.url,
                    self.keepalive,
                    req,
                    &expected,
                    Duration::from_secs(60),
                )
                .await
                .map_err(|e| PublishError::Weights(e.to_string()))?;
                self.weights
                    .write(&self.model, &self.kind, live.version, &d)?;
                d
            }
        };
        let adapter = TrainedWeights::from_file_bytes(&data, drafter)
            .map_err(|e| PublishError::Weights(e.to_string()))?;
        Ok(Some((live, adapter)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HIDDEN: usize = 256;

    fn adapter(seed: f32) -> TrainedWeights {
        TrainedWeights::Exit(specd_engine::ExitAdapter {
            rank: 2,
            a: (0..2 * HIDDEN).map(|i| i as f32 * seed).collect(),
            b: (0..2 * HIDDEN).map(|i| i as f32 * -seed).collect(),
        })
    }

    /// A tiny drafter of hidden size `HIDDEN`, for reading the published files back.
    fn drafter(dir: &std::path::Path) -> Model {
        let path = dir.join("tiny.gguf");
        let spec = specd_engine::testing::TinySpec::new(specd_engine::Family::Qwen2, 1);
        assert_eq!(spec.hidden, HIDDEN);
        specd_engine::testing::write_tiny_model(&path, &spec).unwrap();
        specd_engine::load_gguf(&path).unwrap().model
    }

    fn publisher(store: Store, dir: &std::path::Path) -> Publisher {
        Publisher {
            store,
            weights: WeightStore::open(dir).unwrap(),
            model: "m".into(),
            kind: "self".into(),
            layers: 1,
            url: "127.0.0.1:1".into(),
            cfg: GateConfig {
                rollback_min_drafted: 100,
                ..GateConfig::default()
            },
            keepalive: Keepalive::default(),
        }
    }

    #[test]
    fn the_gate_needs_enough_positions_and_the_margin() {
        let g = GateConfig::default();
        let fig = |live, candidate, positions| GateFigures {
            live,
            candidate,
            positions,
        };
        assert!(g.passes(&fig(0.30, 0.33, 200)));
        assert!(!g.passes(&fig(0.30, 0.31, 200)), "inside the margin");
        assert!(!g.passes(&fig(0.30, 0.20, 200)), "worse");
        assert!(!g.passes(&fig(0.30, 0.50, 10)), "too few positions");
    }

    #[tokio::test]
    async fn versions_keep_their_lineage_and_a_live_regression_rolls_back_to_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let p = publisher(Store::memory(), dir.path());
        let gate = GateFigures {
            live: 0.1,
            candidate: 0.2,
            positions: 300,
        };
        let v1 = p.publish(&adapter(0.1), gate).await.unwrap();
        let v2 = p.publish(&adapter(0.2), gate).await.unwrap();
        assert_eq!((v1.version, v1.parent), (1, Some(0)));
        assert_eq!((v2.version, v2.parent), (2, Some(1)));
        let (live, _) = p.current().await.unwrap().unwrap();
        assert_eq!(live, v2);
        assert_eq!(p.version(1).await.unwrap().unwrap(), v1);
        // The file is what the record says.
        let (_, a) = p.load_live(&drafter(dir.path())).await.unwrap().unwrap();
        assert_eq!(a, adapter(0.2));

        // Too few drafted tokens: nothing happens, whatever the rate.
        let counts = LiveCounts::default();
        counts.record("1", 50, 40);
        counts.record("2", 50, 0);
        assert!(p.watch_once(&counts).await.unwrap().is_none());
        // A forced regression: version 2 accepts far less than version 1 did.
        counts.record("1", 100, 80);
        counts.record("2", 100, 10);
        // This trainer restarted at another address since it published version 1: the restored record
        // points drafters at where the file is now, not at the dead address.
        let p = Publisher {
            url: "10.0.0.9:50070".into(),
            ..p
        };
        let back = p.watch_once(&counts).await.unwrap().unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.url, "10.0.0.9:50070");
        assert_eq!(back.sha256, v1.sha256);
        assert_eq!(back.rolled_back_from, Some(2));
        assert!(back.reason.contains("live acceptance"), "{}", back.reason);
        assert_eq!(p.current().await.unwrap().unwrap().0.version, 1);
        // The next publish descends from the restored version with a fresh number.
        let v3 = p.publish(&adapter(0.3), gate).await.unwrap();
        assert_eq!((v3.version, v3.parent), (3, Some(1)));
    }

    #[tokio::test]
    async fn a_refused_file_rolls_back_and_a_stale_trainer_cannot_publish_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::memory();
        let p = publisher(store.clone(), dir.path());
        let gate = GateFigures::default();
        p.publish(&adapter(0.1), gate).await.unwrap();
        store
            .put_record(
                &BadVersion {
                    model: "m".into(),
                    kind: "self".into(),
                    version: 1,
                    reporter: "d1".into(),
                    reason: "sha256 mismatch".into(),
                    at: 0,
                },
                None,
            )
            .await
            .unwrap();
        let back = p.watch_once(&LiveCounts::default()).await.unwrap().unwrap();
        assert_eq!(back.version, 0);
        assert!(back.reason.contains("sha256 mismatch"));
        // Rolling back a record that changed since it was read is a race, not a write.
        let (live, rev) = p.current().await.unwrap().unwrap();
        p.publish(&adapter(0.2), gate).await.unwrap();
        assert!(matches!(
            p.rollback(&live, rev, "stale".into()).await,
            Err(PublishError::Raced)
        ));
    }

    #[test]
    fn live_counts_keep_a_recent_window() {
        let c = LiveCounts::default();
        for _ in 0..100 {
            c.record("", 100, 100);
        }
        for _ in 0..100 {
            c.record("", 100, 0);
        }
        let (n, rate) = c.rate(0);
        assert!(n <= WINDOW_DRAFTED + 100, "{n}");
        assert_eq!(
            rate, 0.0,
            "the window holds only the recent, rejected drafts"
        );
    }
}
