//! Hot swap on a drafter worker, against a real trainer service over loopback gRPC and the coordination
//! store: a published version is fetched, checked and swapped in for new sequences; a corrupt, NaN or
//! truncated file is refused (the old version stays and a bad-version report goes to the store); a
//! rollback record brings the previous version back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use specd_coord::{keys, BadVersion, DrafterVersion, Store};
use specd_engine::lora::LoraPair;
use specd_engine::testing::{write_tiny_model, TinySpec};
use specd_engine::{
    load_gguf, ExitAdapter, Family, LogitsWanted, LoraAdapter, Model, TrainedWeights,
};
use specd_proto::internal::v1::trainer_server::TrainerServer;
use specd_service::grpc::Keepalive;
use specd_service::Shutdown;
use specd_trainer::buffer::BufferConfig;
use specd_trainer::publish::{GateConfig, GateFigures, Publisher};
use specd_trainer::service::{TrainerConfig, TrainerService};
use specd_trainer::weights::WeightStore;
use specd_worker::swap::{follow, FollowConfig, LiveDrafter};
use tokio_stream::wrappers::TcpListenerStream;

const WAIT: Duration = Duration::from_secs(30);

struct Rig {
    _dir: tempfile::TempDir,
    base: Model,
    store: Store,
    publisher: Publisher,
    live: LiveDrafter,
    stop: Shutdown,
}

async fn rig() -> Rig {
    rig_for("self").await
}

/// A trainer and a drafter worker's follower for drafter `kind`: `self` drafts with the target's first
/// layer, `model` with a separate two-layer draft model.
async fn rig_for(kind: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut spec = TinySpec::new(Family::Qwen2, 5);
    spec.layers = 3;
    write_tiny_model(&path, &spec).unwrap();
    let target = load_gguf(&path).unwrap().model;
    let base = if kind == "model" {
        let draft = dir.path().join("draft.gguf");
        let mut spec = TinySpec::new(Family::Qwen2, 6);
        spec.layers = 2;
        write_tiny_model(&draft, &spec).unwrap();
        load_gguf(&draft).unwrap().model
    } else {
        target.truncated(1).unwrap()
    };
    let weights = WeightStore::open(dir.path().join("weights")).unwrap();
    let svc = TrainerService::new(TrainerConfig {
        model: "tiny".into(),
        vocab: target.config().vocab,
        buffer: BufferConfig::default(),
        weights: weights.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TrainerServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let store = Store::memory();
    let publisher = Publisher {
        store: store.clone(),
        weights,
        model: "tiny".into(),
        kind: kind.into(),
        layers: base.config().layers,
        url: addr,
        cfg: GateConfig::default(),
        keepalive: Keepalive::default(),
    };
    let live = LiveDrafter::new(base.clone(), kind);
    let stop = Shutdown::new();
    tokio::spawn(follow(
        store.clone(),
        FollowConfig {
            model: "tiny".into(),
            reporter: "drafter-1".into(),
            keepalive: Keepalive::default(),
            fetch_timeout: Duration::from_secs(10),
        },
        live.clone(),
        stop.clone(),
    ));
    Rig {
        _dir: dir,
        base,
        store,
        publisher,
        live,
        stop,
    }
}

fn adapter(hidden: usize, seed: f32) -> ExitAdapter {
    let rank = 4;
    ExitAdapter {
        rank,
        a: (0..rank * hidden)
            .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.1)
            .collect(),
        b: (0..rank * hidden)
            .map(|i| ((i as f32 * 0.11 - seed).cos()) * 0.1)
            .collect(),
    }
}

/// An adapter file written without the writer's checks, as a broken trainer might.
fn unchecked_file(a: &ExitAdapter) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let hidden = a.a.len() / a.rank;
    let raw = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (ra, rb) = (raw(&a.a), raw(&a.b));
    let meta = std::collections::HashMap::from([(
        "format".to_string(),
        specd_engine::adapter::FILE_FORMAT.to_string(),
    )]);
    safetensors::serialize(
        [
            (
                "exit.a",
                TensorView::new(Dtype::F32, vec![a.rank, hidden], &ra).unwrap(),
            ),
            (
                "exit.b",
                TensorView::new(Dtype::F32, vec![hidden, a.rank], &rb).unwrap(),
            ),
        ],
        Some(meta),
    )
    .unwrap()
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let end = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < end, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// LoRA adapters (rank 2 on q and down) for the first `layers` layers of `m`.
fn lora(m: &Model, layers: usize, seed: f32) -> LoraAdapter {
    let targets = vec![0, 6];
    let mut pairs = Vec::new();
    for l in 0..layers {
        for &p in &targets {
            let w = m.weights().layers[l].matrices()[p].1;
            pairs.push(LoraPair {
                a: (0..2 * w.cols())
                    .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.1)
                    .collect(),
                b: (0..2 * w.rows())
                    .map(|i| ((i as f32 * 0.11 - seed).cos()) * 0.1)
                    .collect(),
            });
        }
    }
    LoraAdapter {
        rank: 2,
        scale: 1.0,
        targets,
        pairs,
    }
}

async fn bad_reports(store: &Store, version: u64) -> Vec<BadVersion> {
    bad_reports_of(store, "self", version).await
}

async fn bad_reports_of(store: &Store, kind: &str, version: u64) -> Vec<BadVersion> {
    let prefix = format!("{}bad/{version:020}/", keys::drafter("tiny", kind));
    store.list_records(&prefix).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_version_is_swapped_in_for_new_sequences_and_a_rollback_restores_the_parent() {
    let r = rig().await;
    let d = r.base.config().hidden;
    let held_by_a_stream = r.live.current();
    assert_eq!(held_by_a_stream.1, 0);
    let a1 = adapter(d, 1.0);
    let v1 = r
        .publisher
        .publish(&TrainedWeights::Exit(a1.clone()), GateFigures::default())
        .await
        .unwrap();
    until("version 1 not swapped in", || r.live.version() == 1).await;
    let (model, version) = r.live.current();
    assert_eq!(version, v1.version);
    assert_eq!(model.adapter(), Some(&a1));
    // The served drafter computes what the adapter says, and a sequence opened before the swap still
    // drafts with the version it started with.
    let tokens = [1u32, 5, 9, 13];
    let with = model
        .forward(&mut model.new_cache(), &tokens, LogitsWanted::Last)
        .unwrap();
    let want = r
        .base
        .with_adapter(Some(a1.clone()))
        .unwrap()
        .forward(&mut r.base.new_cache(), &tokens, LogitsWanted::Last)
        .unwrap();
    assert_eq!(with, want);
    assert!(held_by_a_stream.0.adapter().is_none());

    let v2 = r
        .publisher
        .publish(
            &TrainedWeights::Exit(adapter(d, 2.0)),
            GateFigures::default(),
        )
        .await
        .unwrap();
    until("version 2 not swapped in", || r.live.version() == 2).await;
    // The trainer rolls version 2 back: the drafters follow to its parent.
    let (cur, rev) = r.publisher.current().await.unwrap().unwrap();
    assert_eq!(cur.version, v2.version);
    r.publisher
        .rollback(&cur, rev, "forced".into())
        .await
        .unwrap();
    until("not rolled back to version 1", || r.live.version() == 1).await;
    assert_eq!(r.live.current().0.adapter(), Some(&a1));
    assert!(bad_reports(&r.store, 2).await.is_empty());
    r.stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_nan_and_mislabelled_files_are_refused_and_the_live_version_stays() {
    let r = rig().await;
    let d = r.base.config().hidden;
    let a1 = adapter(d, 1.0);
    r.publisher
        .publish(&TrainedWeights::Exit(a1.clone()), GateFigures::default())
        .await
        .unwrap();
    until("version 1 not swapped in", || r.live.version() == 1).await;

    // Version 3's file is damaged at rest: one flipped byte, so its sha256 is not the record's.
    let v2 = r
        .publisher
        .publish(
            &TrainedWeights::Exit(adapter(d, 2.0)),
            GateFigures::default(),
        )
        .await
        .unwrap();
    let mut bytes = r
        .publisher
        .weights
        .read("tiny", "self", v2.version)
        .unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(r.publisher.weights.path("tiny", "self", 3), &bytes).unwrap();
    let damaged = DrafterVersion {
        version: 3,
        ..v2.clone()
    };
    r.store.put_record(&damaged, None).await.unwrap();
    let end = Instant::now() + WAIT;
    while bad_reports(&r.store, 3).await.is_empty() {
        assert!(Instant::now() < end, "the damaged file was not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = &bad_reports(&r.store, 3).await[0];
    assert!(report.reason.contains("sha256"), "{}", report.reason);
    assert_eq!(report.reporter, "drafter-1");
    assert_ne!(r.live.version(), 3);

    // A file whose checksum is right but which holds NaN: refused at load.
    let mut nan = adapter(d, 4.0);
    nan.a[0] = f32::NAN;
    let raw = unchecked_file(&nan);
    let (sha256, size) = r.publisher.weights.write("tiny", "self", 4, &raw).unwrap();
    let rec = DrafterVersion {
        version: 4,
        sha256,
        size,
        ..damaged.clone()
    };
    r.store.put_record(&rec, None).await.unwrap();
    let end = Instant::now() + WAIT;
    while bad_reports(&r.store, 4).await.is_empty() {
        assert!(Instant::now() < end, "the NaN file was not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bad_reports(&r.store, 4).await[0].reason.contains("NaN"));

    // A record that announces fewer bytes than the file has (a truncated announcement): refused.
    let good = ExitAdapter::to_file_bytes(&adapter(d, 5.0)).unwrap();
    let (sha256, size) = r.publisher.weights.write("tiny", "self", 5, &good).unwrap();
    let rec = DrafterVersion {
        version: 5,
        sha256,
        size: size - 10,
        ..damaged.clone()
    };
    r.store.put_record(&rec, None).await.unwrap();
    let end = Instant::now() + WAIT;
    while bad_reports(&r.store, 5).await.is_empty() {
        assert!(Instant::now() < end, "the size mismatch was not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Through all of it, new sequences kept drafting with a version that loaded.
    let v = r.live.version();
    assert!(v == 1 || v == 2, "live version {v}");
    assert!(r.live.current().0.adapter().is_some());
    r.stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draft_models_lora_versions_swap_in_and_one_for_another_depth_is_refused() {
    let r = rig_for("model").await;
    let layers = r.base.config().layers;
    let l1 = lora(&r.base, layers, 1.0);
    let v1 = r
        .publisher
        .publish(&TrainedWeights::Lora(l1.clone()), GateFigures::default())
        .await
        .unwrap();
    until("LoRA version 1 not swapped in", || r.live.version() == 1).await;
    let (model, version) = r.live.current();
    assert_eq!(version, v1.version);
    assert_eq!(model.lora(), Some(&l1));
    let tokens = [1u32, 5, 9, 13];
    let with = model
        .forward(&mut model.new_cache(), &tokens, LogitsWanted::All)
        .unwrap();
    let want = r
        .base
        .with_lora(Some(l1.clone()))
        .unwrap()
        .forward(&mut r.base.new_cache(), &tokens, LogitsWanted::All)
        .unwrap();
    assert_eq!(with, want);
    let plain = r
        .base
        .forward(&mut r.base.new_cache(), &tokens, LogitsWanted::All)
        .unwrap();
    assert_ne!(with, plain);

    // Adapters for a one-layer model: the file is well formed but does not fit this draft model.
    let v2 = r
        .publisher
        .publish(
            &TrainedWeights::Lora(lora(&r.base, layers - 1, 2.0)),
            GateFigures::default(),
        )
        .await
        .unwrap();
    let end = Instant::now() + WAIT;
    while bad_reports_of(&r.store, "model", v2.version)
        .await
        .is_empty()
    {
        assert!(Instant::now() < end, "the misfit version was not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.live.version(), 1);
    assert_eq!(r.live.current().0.lora(), Some(&l1));
    r.stop.trigger();
}
