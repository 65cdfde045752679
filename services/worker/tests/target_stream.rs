//! A target worker's Verify streams served over loopback gRPC, against a tiny random-weight model:
//! prefill progress, an abandoned prefill given up on the engine thread, an idle stream ended.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use specd_engine::testing::{write_tiny_model, TinySpec};
use specd_engine::{load_gguf, Family};
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::target_client::TargetClient;
use specd_proto::internal::v1::target_server::TargetServer;
use specd_service::Drain;
use specd_worker::target::{BatchLimits, TargetService};
use specd_worker::WorkerIdentity;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const WAIT: Duration = Duration::from_secs(60);

/// A target service on 127.0.0.1 over a tiny model with a long context; its address.
async fn serve(limits: BatchLimits) -> (TargetService, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    let mut spec = TinySpec::new(Family::Qwen2, 3);
    spec.context = 8192;
    spec.layers = 4;
    write_tiny_model(&path, &spec).expect("write");
    let model = load_gguf(&path).expect("load").model;
    let svc = TargetService::start(model, WorkerIdentity::default(), 4, limits, Drain::new())
        .expect("start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = TargetServer::new(svc.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (svc, addr, dir)
}

fn open(prompt: Vec<u32>, report_progress: bool) -> pb::VerifyRequest {
    pb::VerifyRequest {
        msg: Some(pb::verify_request::Msg::Open(pb::verify_request::Open {
            sequence_id: "s".into(),
            prompt_ids: prompt,
            sampling: Some(pb::SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: None,
            }),
            emit_samples: false,
            report_progress,
        })),
    }
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prefill_reports_progress_and_is_given_up_when_its_router_goes() {
    let (svc, addr, _dir) = serve(BatchLimits {
        prefill_chunk: 4,
        ..BatchLimits::default()
    })
    .await;
    let prompt: Vec<u32> = (0..6000u32).map(|i| (i * 7 + 1) % 250).collect();
    let mut client = TargetClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(2);
    tx.send(open(prompt.clone(), true)).await.expect("send");
    let mut answers = client
        .verify(ReceiverStream::new(rx))
        .await
        .expect("verify")
        .into_inner();
    // Progress comes before Opened, and grows.
    let first = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("an answer")
        .expect("ok")
        .expect("a message");
    let Some(pb::verify_response::Msg::Prefilling(p)) = first.msg else {
        panic!("expected a progress report first, got {first:?}");
    };
    assert_eq!(p.total, 6000);
    assert!(p.prefilled > 0 && p.prefilled < 6000, "{p:?}");
    // The router goes away mid-prefill: the engine drops the sequence between two chunks.
    drop(answers);
    drop(tx);
    until("the slot and the cache to be freed", || {
        svc.active() == 0 && svc.held() == 0
    })
    .await;
    let stopped_at = svc.prefilled_tokens();
    assert!(
        stopped_at < prompt.len() as u64 - 1,
        "the whole prompt was prefilled for nobody ({stopped_at} tokens)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.prefilled_tokens(), stopped_at, "prefilling went on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_goes_quiet_is_ended_and_its_sequence_freed() {
    let (svc, addr, _dir) = serve(BatchLimits {
        stream_idle: Duration::from_millis(500),
        ..BatchLimits::default()
    })
    .await;
    let mut client = TargetClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(2);
    tx.send(open(vec![5, 6, 7, 8], false)).await.expect("send");
    let mut answers = client
        .verify(ReceiverStream::new(rx))
        .await
        .expect("verify")
        .into_inner();
    let opened = answers.message().await.expect("ok").expect("a message");
    assert!(matches!(
        opened.msg,
        Some(pb::verify_response::Msg::Opened(_))
    ));
    assert_eq!(svc.active(), 1);
    // The client keeps the stream open and sends nothing.
    let ended = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("ended");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
    until("the sequence to be freed", || {
        svc.active() == 0 && svc.held() == 0
    })
    .await;
    drop(tx);
}
