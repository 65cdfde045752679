//! Typed JSON records stored under the keys of [`crate::keys`]: instance registrations, drafter version
//! pointers and router load reports.
//!
//! Records hold pointers, versions and checksums only; weights never go into the store (etcd values are
//! limited to about 1.5 MB). Optional fields default on decode so an older writer stays readable.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CoordError, Result};
use crate::keys;

/// The kind of process an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Router,
    Drafter,
    Target,
    Trainer,
}

impl Role {
    /// The role as it appears in keys and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Drafter => "drafter",
            Role::Target => "target",
            Role::Trainer => "trainer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CoordError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "router" => Ok(Role::Router),
            "drafter" => Ok(Role::Drafter),
            "target" => Ok(Role::Target),
            "trainer" => Ok(Role::Trainer),
            other => Err(CoordError::Codec(format!("unknown role {other:?}"))),
        }
    }
}

/// A record with a home key in the store.
pub trait Record: Serialize + DeserializeOwned {
    /// The key this record lives under.
    fn key(&self) -> String;

    /// JSON bytes for the store.
    fn encode(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Parses a record read from the store.
    fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A live process, registered under `/specd/v1/instances/{role}/{id}` and attached to its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub role: Role,
    pub id: String,
    /// Where its gRPC server listens (`host:port`).
    pub address: String,
    /// The model it serves (target or drafter model name); empty for routers.
    #[serde(default)]
    pub model: String,
    /// Model family (`qwen2`, `llama`), so drafters are paired with matching targets.
    #[serde(default)]
    pub family: String,
    /// `SpecdTokenizer::fingerprint()`: drafter and target must agree.
    #[serde(default)]
    pub tokenizer_fingerprint: String,
    /// Sequences it can hold at once.
    #[serde(default)]
    pub capacity: u32,
    /// Sequences it holds now (updated by the owner).
    #[serde(default)]
    pub load: u32,
    /// Drafter kinds offered (`model`, `ngram`, ...), for drafter workers.
    #[serde(default)]
    pub drafter_kinds: Vec<String>,
    /// Version of the drafter weights loaded, if any.
    #[serde(default)]
    pub weights_version: Option<u64>,
}

impl Record for InstanceRecord {
    fn key(&self) -> String {
        keys::instance(self.role, &self.id)
    }
}

/// A published drafter version: where to fetch its weights and how to check them, its lineage and the
/// gate figures that let it out; never the weights themselves. Stored under
/// `/specd/v1/drafters/{model}/{kind}/versions/{version}` (history) and, while live, as
/// `.../current`. Version 0 is the drafter as loaded, with no trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrafterVersion {
    pub model: String,
    /// Drafter kind (`self`, `model`, ...).
    pub kind: String,
    /// Monotonic per (model, kind); 0: no trained weights.
    pub version: u64,
    /// Hex sha256 of the weight file (empty for version 0).
    pub sha256: String,
    /// Size of the weight file in bytes.
    #[serde(default)]
    pub size: u64,
    /// The trainer's gRPC address that serves the file (`Trainer.FetchWeights`).
    pub url: String,
    /// Target layers of the self-drafter the weights were trained for (0: not stated).
    #[serde(default)]
    pub layers: u64,
    /// Version it was trained from.
    #[serde(default)]
    pub parent: Option<u64>,
    /// Held-out expected acceptance of the version live when this one was gated, and of this one.
    #[serde(default)]
    pub gate_live: f64,
    #[serde(default)]
    pub gate_candidate: f64,
    /// Held-out positions the gate evaluated.
    #[serde(default)]
    pub gate_positions: u64,
    /// Unix milliseconds.
    pub published_at: u64,
    /// Set on a `current` record that a rollback wrote: the version it replaced, and why.
    #[serde(default)]
    pub rolled_back_from: Option<u64>,
    #[serde(default)]
    pub reason: String,
}

impl DrafterVersion {
    /// The version on the wire (`drafter_version` fields): its number in decimal.
    pub fn tag(&self) -> String {
        self.version.to_string()
    }
}

impl Record for DrafterVersion {
    fn key(&self) -> String {
        keys::drafter_current(&self.model, &self.kind)
    }
}

/// A drafter worker's report that a version's weights were refused (hash mismatch, truncated, do not
/// load), under `/specd/v1/drafters/{model}/{kind}/bad/{version}/{reporter}`. The trainer rolls back a
/// live version that is reported bad.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadVersion {
    pub model: String,
    pub kind: String,
    pub version: u64,
    /// Instance id of the reporting drafter worker.
    pub reporter: String,
    pub reason: String,
    /// Unix milliseconds.
    pub at: u64,
}

impl Record for BadVersion {
    fn key(&self) -> String {
        keys::drafter_bad(&self.model, &self.kind, self.version, &self.reporter)
    }
}

/// A router's load, under `/specd/v1/load/{router}`; the trainer trains only while the sum is low.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub router: String,
    /// Requests being generated.
    pub in_flight: u32,
    /// Requests admitted and waiting.
    pub queue: u32,
    /// Unix milliseconds.
    pub at: u64,
}

impl Record for LoadReport {
    fn key(&self) -> String {
        keys::load(&self.router)
    }
}

/// Where rank 0 of a tensor-parallel target group whose ranks are separate processes waits for the
/// others, under `/specd/v1/tp/{group}` and attached to rank 0's lease: the other ranks read it to join,
/// and its disappearance (or a new generation) tells them rank 0 is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpGroupRecord {
    pub group: String,
    /// `host:port` of rank 0's collective listener.
    pub addr: String,
    pub world: u32,
    /// Chosen by rank 0 at each start; a rank of an older generation is refused.
    pub generation: u64,
    /// The model file's name: every rank must load the same one.
    pub model: String,
}

impl Record for TpGroupRecord {
    fn key(&self) -> String {
        keys::tp_group(&self.group)
    }
}

/// Wall-clock unix milliseconds, for `published_at` and `at` fields.
pub fn now_unix_ms() -> u64 {
    // A clock before 1970 is a broken host; 0 is a harmless timestamp there.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_record_round_trips_and_tolerates_missing_optionals() {
        let rec = InstanceRecord {
            role: Role::Drafter,
            id: "d0".into(),
            address: "127.0.0.1:7000".into(),
            model: "smollm".into(),
            family: "llama".into(),
            tokenizer_fingerprint: "abc".into(),
            capacity: 8,
            load: 2,
            drafter_kinds: vec!["ngram".into()],
            weights_version: Some(3),
        };
        let bytes = rec.encode().expect("encode");
        assert_eq!(InstanceRecord::decode(&bytes).expect("decode"), rec);
        assert_eq!(rec.key(), "/specd/v1/instances/drafter/d0");

        let minimal = br#"{"role":"router","id":"r","address":"a:1"}"#;
        let rec = InstanceRecord::decode(minimal).expect("decode minimal");
        assert_eq!(rec.role, Role::Router);
        assert!(rec.drafter_kinds.is_empty());
        assert_eq!(rec.weights_version, None);
    }

    #[test]
    fn bad_json_is_a_codec_error() {
        let err = LoadReport::decode(b"{").expect_err("must fail");
        assert_eq!(err.error_type(), "codec");
        let err = "boss".parse::<Role>().expect_err("must fail");
        assert_eq!(err.error_type(), "codec");
    }

    #[test]
    fn roles_parse_back() {
        for role in [Role::Router, Role::Drafter, Role::Target, Role::Trainer] {
            assert_eq!(role.as_str().parse::<Role>().expect("parse"), role);
        }
    }
}
