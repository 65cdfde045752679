//! A target worker's Verify streams served over loopback gRPC, against a tiny random-weight model:
//! prefill progress, an abandoned prefill given up on the engine thread, an idle stream ended, and
//! distillation samples captured and streamed to a (mock) trainer found in the coordination store; a
//! tensor-parallel target answering like an unsplit one, and leaving placement when a rank dies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use specd_engine::testing::{write_tiny_model, TinySpec};
use specd_engine::{load_gguf, Family};
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::target_client::TargetClient;
use specd_proto::internal::v1::target_server::TargetServer;
use specd_service::Drain;
use specd_worker::samples::{run_sender, SampleConfig, SampleSink};
use specd_worker::target::{BatchLimits, TargetService};
use specd_worker::WorkerIdentity;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const WAIT: Duration = Duration::from_secs(60);

/// A target service on 127.0.0.1 over a tiny model with a long context; its address.
async fn serve(limits: BatchLimits) -> (TargetService, String, tempfile::TempDir) {
    serve_with(limits, None).await
}

async fn serve_with(
    limits: BatchLimits,
    samples: Option<SampleSink>,
) -> (TargetService, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    let mut spec = TinySpec::new(Family::Qwen2, 3);
    spec.context = 8192;
    spec.layers = 4;
    write_tiny_model(&path, &spec).expect("write");
    let model = load_gguf(&path).expect("load").model;
    let identity = WorkerIdentity {
        context: 8192,
        ..WorkerIdentity::default()
    };
    let (svc, addr) = serve_model(model, identity, limits, samples, Drain::new()).await;
    (svc, addr, dir)
}

fn open(prompt: Vec<u32>, report_progress: bool) -> pb::VerifyRequest {
    open_for(prompt, report_progress, 0)
}

/// Opens a sequence that will generate at most `max_new_tokens` (0: up to the context).
fn open_for(prompt: Vec<u32>, report_progress: bool, max_new_tokens: u32) -> pb::VerifyRequest {
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
            max_new_tokens,
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

/// Opens a stream with `open` and returns its first answer, and the sender that keeps it open.
async fn first_answer(
    addr: &str,
    open: pb::VerifyRequest,
) -> (
    Result<pb::VerifyResponse, tonic::Status>,
    mpsc::Sender<pb::VerifyRequest>,
) {
    let mut client = TargetClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(2);
    tx.send(open).await.expect("send");
    let answer = match client.verify(ReceiverStream::new(rx)).await {
        Ok(r) => {
            let mut answers = r.into_inner();
            let a = tokio::time::timeout(WAIT, answers.message())
                .await
                .expect("an answer");
            // Keep the stream's receiving half alive with the sender.
            tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
            a.map(|m| m.expect("a message"))
        }
        Err(s) => Err(s),
    };
    (answer, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_reserve_kv_tokens_and_wait_for_room_rather_than_overcommit() {
    let (svc, addr, _dir) = serve(BatchLimits {
        kv_tokens: Some(300),
        ..BatchLimits::default()
    })
    .await;
    let prompt: Vec<u32> = (0..10u32).collect();
    // 10 prompt + 100 new + one longest draft (32) + 1 = 143 tokens each: two fit in 300, a third does not.
    let (a, a_tx) = first_answer(&addr, open_for(prompt.clone(), false, 100)).await;
    assert!(matches!(
        a.expect("a").msg,
        Some(pb::verify_response::Msg::Opened(_))
    ));
    let (b, _b_tx) = first_answer(&addr, open_for(prompt.clone(), false, 100)).await;
    assert!(b.is_ok(), "{b:?}");
    assert_eq!(svc.kv(), Some((286, 300)));
    assert_eq!(svc.active(), 2);
    assert_eq!(
        svc.load(),
        4,
        "the KV budget is the tighter limit: published as full"
    );
    let (c, _) = first_answer(&addr, open_for(prompt.clone(), false, 100)).await;
    let c = c.expect_err("no KV room");
    assert_eq!(c.code(), tonic::Code::ResourceExhausted, "{c:?}");
    assert!(c.message().contains("KV budget"), "{}", c.message());
    // A sequence that may grow to the whole context never fits this budget.
    let (d, _) = first_answer(&addr, open_for(prompt.clone(), false, 0)).await;
    assert_eq!(d.expect_err("too big").code(), tonic::Code::OutOfRange);
    assert_eq!(svc.kv(), Some((286, 300)), "refusals reserve nothing");
    // The first sequence ends: its room goes to the next one.
    drop(a_tx);
    until("the first reservation to be released", || {
        svc.kv() == Some((143, 300))
    })
    .await;
    let (e, _e_tx) = first_answer(&addr, open_for(prompt, false, 100)).await;
    assert!(e.is_ok(), "{e:?}");
    assert_eq!(svc.kv(), Some((286, 300)));
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

/// A trainer that keeps what it is sent.
#[derive(Clone, Default)]
struct MockTrainer {
    got: std::sync::Arc<std::sync::Mutex<Vec<pb::DistillSample>>>,
}

#[tonic::async_trait]
impl specd_proto::internal::v1::trainer_server::Trainer for MockTrainer {
    async fn submit_samples(
        &self,
        request: tonic::Request<tonic::Streaming<pb::DistillSample>>,
    ) -> Result<tonic::Response<pb::SubmitAck>, tonic::Status> {
        let mut stream = request.into_inner();
        let mut n = 0;
        while let Some(s) = stream.message().await? {
            self.got.lock().unwrap().push(s);
            n += 1;
        }
        Ok(tonic::Response::new(pb::SubmitAck {
            accepted: n,
            dropped: 0,
        }))
    }

    type FetchWeightsStream = ReceiverStream<Result<pb::WeightChunk, tonic::Status>>;

    async fn fetch_weights(
        &self,
        _: tonic::Request<pb::FetchWeightsRequest>,
    ) -> Result<tonic::Response<Self::FetchWeightsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("mock"))
    }

    async fn status(
        &self,
        _: tonic::Request<pb::TrainerStatusRequest>,
    ) -> Result<tonic::Response<pb::TrainerStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("mock"))
    }
}

/// Opens a Verify stream whose sequence allows samples; its request sender and answers, after Opened.
async fn open_allowing_samples(
    addr: &str,
    prompt: Vec<u32>,
) -> (
    mpsc::Sender<pb::VerifyRequest>,
    tonic::Streaming<pb::VerifyResponse>,
) {
    let mut o = open(prompt, false);
    if let Some(pb::verify_request::Msg::Open(open)) = o.msg.as_mut() {
        open.emit_samples = true;
    }
    open_stream(addr, o).await
}

/// Opens a Verify stream with `open`; its request sender and answers, after Opened.
async fn open_stream(
    addr: &str,
    open: pb::VerifyRequest,
) -> (
    mpsc::Sender<pb::VerifyRequest>,
    tonic::Streaming<pb::VerifyResponse>,
) {
    let mut client = TargetClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    tx.send(open).await.expect("send");
    let mut answers = client
        .verify(ReceiverStream::new(rx))
        .await
        .expect("verify")
        .into_inner();
    answers.message().await.expect("ok").expect("opened");
    (tx, answers)
}

fn step(keep: usize, append: Vec<u32>, drafts: Vec<u32>, kind: &str) -> pb::VerifyRequest {
    pb::VerifyRequest {
        msg: Some(pb::verify_request::Msg::Step(pb::verify_request::Step {
            drafts,
            keep_len: keep as u32,
            append_ids: append,
            drafter_kind: kind.into(),
            drafter_version: if kind.is_empty() { "" } else { "7" }.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_positions_reach_the_trainer_as_distillation_samples() {
    captured_positions_reach_the_trainer(0, BatchLimits::default()).await;
}

/// With prompt positions on, the last ones of the prompt (read off a prefill fed in chunks of two, so
/// the window starts inside a chunk) come first in the first sample, undrafted, under the drafter the
/// first step names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_positions_read_off_the_prefill_lead_the_first_sample() {
    let limits = BatchLimits {
        prefill_chunk: 2,
        ..BatchLimits::default()
    };
    captured_positions_reach_the_trainer(3, limits).await;
    // More prompt positions than the prompt has: all of them, from the first prefix.
    captured_positions_reach_the_trainer(64, limits).await;
}

async fn captured_positions_reach_the_trainer(prompt_positions: usize, limits: BatchLimits) {
    use specd_proto::internal::v1::trainer_server::TrainerServer;
    // The trainer, registered in the store the sender reads.
    let trainer = MockTrainer::default();
    let trainer_addr = on_loopback(
        tonic::transport::Server::builder().add_service(TrainerServer::new(trainer.clone())),
    )
    .await;
    let store = specd_coord::Store::memory();
    // It leads the model's trainer election: the key holds its address.
    store
        .put(
            &specd_coord::keys::trainer_election("tiny"),
            trainer_addr,
            None,
        )
        .await
        .expect("elect");
    let cfg = SampleConfig {
        rate: 1.0,
        width: 8,
        queue: 16,
        flush_positions: 3,
        prompt_positions,
    };
    let (sink, rx, stats) = SampleSink::new(cfg, "tiny".into());
    tokio::spawn(run_sender(
        rx,
        "tiny".into(),
        store,
        specd_service::grpc::Keepalive::default(),
        std::sync::Arc::clone(&stats),
        specd_service::Shutdown::new(),
    ));
    until("the sender to find the trainer", || {
        stats.trainer.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let (_svc, addr, dir) = serve_with(limits, Some(sink)).await;
    let model = load_gguf(&dir.path().join("tiny.gguf"))
        .expect("load")
        .model;
    let prompt: Vec<u32> = vec![11, 22, 33, 44, 55];
    let n = prompt.len();
    // The target's own greedy continuation, for drafts it accepts.
    let logits_after = |tokens: &[u32]| {
        model
            .forward(
                &mut model.new_cache(),
                tokens,
                specd_engine::LogitsWanted::Last,
            )
            .expect("forward")
    };
    let mut seq = prompt.clone();
    for _ in 0..3 {
        let t = specd_core::argmax(&logits_after(&seq));
        seq.push(t);
    }
    let wrong = (seq[n + 2] + 1) % 200;
    // Prefixes 1..n - 1 are prompt positions; the last `prompt_positions` of them are captured.
    let prompt_pos: Vec<u32> =
        (n.saturating_sub(prompt_positions).max(1) as u32..n as u32).collect();
    let p = prompt_pos.len();

    let (tx, mut answers) = open_allowing_samples(&addr, prompt.clone()).await;
    // Two drafts accepted, the third rejected (the target answers seq[n + 2]).
    let r = step_result(
        &tx,
        &mut answers,
        step(n, vec![], vec![seq[n], seq[n + 1], wrong], "model"),
    )
    .await;
    assert_eq!((r.accepted, r.next_token), (2, seq[n + 2]));
    // A plain step.
    tx.send(step(n + 2, vec![seq[n + 2]], vec![], ""))
        .await
        .expect("send");
    answers.message().await.expect("ok").expect("result");
    drop(tx);
    drop(answers);
    until("both samples at the trainer", || {
        trainer.got.lock().unwrap().len() == 2
    })
    .await;
    let got = trainer.got.lock().unwrap().clone();
    let (a, b) = (&got[0], &got[1]);
    assert_eq!(a.model, "tiny");
    assert_eq!(
        (a.drafter_kind.as_str(), a.drafter_version.as_str()),
        ("model", "7")
    );
    let mut want = prompt_pos.clone();
    want.extend([n as u32, n as u32 + 1, n as u32 + 2]);
    assert_eq!(a.positions, want);
    let undrafted = vec![false; p];
    assert_eq!(
        a.rejected,
        [undrafted.clone(), vec![false, false, true]].concat()
    );
    assert_eq!(a.drafted, [undrafted, vec![true, true, true]].concat());
    assert_eq!(
        a.draft_ids,
        [vec![0; p], vec![seq[n], seq[n + 1], wrong]].concat()
    );
    assert_eq!(a.context_ids, seq[..n + 2].to_vec());
    assert_eq!(b.positions, vec![n as u32 + 3]);
    assert_eq!(
        (b.drafted.clone(), b.rejected.clone()),
        (vec![false], vec![false])
    );
    assert_eq!(b.context_ids, seq[..n + 3].to_vec());
    // Each distribution is the target's own top 8 at that prefix, with its tail mass.
    for s in [a, b] {
        for (i, &pos) in s.positions.iter().enumerate() {
            let want = specd_core::TopTarget::from_logits(&logits_after(&seq[..pos as usize]), 8)
                .expect("top");
            assert_eq!(s.target[i].ids, want.ids(), "position {pos}");
            assert!((f64::from(s.tail_mass[i]) - want.tail()).abs() < 1e-5);
        }
    }
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trainer_nothing_is_captured_and_serving_goes_on() {
    let (sink, rx, stats) = SampleSink::new(
        SampleConfig {
            rate: 1.0,
            ..SampleConfig::default()
        },
        "tiny".into(),
    );
    tokio::spawn(run_sender(
        rx,
        "tiny".into(),
        specd_coord::Store::memory(),
        specd_service::grpc::Keepalive::default(),
        std::sync::Arc::clone(&stats),
        specd_service::Shutdown::new(),
    ));
    let (svc, addr, _dir) = serve_with(BatchLimits::default(), Some(sink)).await;
    let (tx, mut answers) = open_allowing_samples(&addr, vec![1, 2, 3]).await;
    tx.send(step(3, vec![], vec![7, 8], "ngram"))
        .await
        .expect("send");
    let r = answers.message().await.expect("ok").expect("result");
    assert!(
        matches!(r.msg, Some(pb::verify_response::Msg::StepResult(_))),
        "{r:?}"
    );
    drop(tx);
    drop(answers);
    until("the sequence to close", || svc.held() == 0).await;
    assert_eq!(stats.captured.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// A target service over `model` on 127.0.0.1; its address.
async fn serve_model(
    model: specd_engine::Model,
    identity: WorkerIdentity,
    limits: BatchLimits,
    samples: Option<SampleSink>,
    drain: Drain,
) -> (TargetService, String) {
    let svc = TargetService::start(model, identity, 4, limits, samples, drain).expect("start");
    let addr = on_loopback(
        tonic::transport::Server::builder().add_service(TargetServer::new(svc.clone())),
    )
    .await;
    (svc, addr)
}

/// Serves `router` on a fresh 127.0.0.1 port; its address.
async fn on_loopback(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

fn float_tiny(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny-f32.gguf");
    let spec = TinySpec {
        float: true,
        ..TinySpec::new(Family::Qwen2, 3)
    };
    write_tiny_model(&path, &spec).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_parallel_target_verifies_like_an_unsplit_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = float_tiny(dir.path());
    let plain = load_gguf(&path).expect("load").model;
    let split = specd_engine::tp::load_gguf_local(&path, 2, &Default::default())
        .expect("load over 2 ranks")
        .model;
    let (_svc, addr) = serve_model(
        split,
        Default::default(),
        Default::default(),
        None,
        Drain::new(),
    )
    .await;
    let prompt: Vec<u32> = vec![11, 22, 33, 44, 55];
    let n = prompt.len();
    let mut seq = prompt.clone();
    for _ in 0..5 {
        let l = plain
            .forward(
                &mut plain.new_cache(),
                &seq,
                specd_engine::LogitsWanted::Last,
            )
            .expect("forward");
        seq.push(specd_core::argmax(&l));
    }
    let (answer, tx) = first_answer(&addr, open(prompt.clone(), false)).await;
    assert!(matches!(
        answer.expect("opened").msg,
        Some(pb::verify_response::Msg::Opened(_))
    ));
    drop(tx);
    // On one stream: four drafts of the unsplit model's greedy text are all accepted and the fifth
    // token is its next one; then a step that rolls the context back below the cache re-feeds the last
    // kept token on every rank, and a rejected draft is answered with the unsplit model's token.
    let (tx, mut answers) = open_stream(&addr, open(prompt, false)).await;
    let r = step_result(
        &tx,
        &mut answers,
        step(n, vec![], seq[n..n + 4].to_vec(), "model"),
    )
    .await;
    assert_eq!((r.accepted, r.next_token), (4, seq[n + 4]));
    let wrong = (seq[n + 1] + 1) % 200;
    let r = step_result(
        &tx,
        &mut answers,
        step(n, vec![], vec![seq[n], wrong], "model"),
    )
    .await;
    assert_eq!((r.accepted, r.next_token), (1, seq[n + 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_whose_rank_died_answers_unavailable_and_leaves_placement() {
    use specd_engine::tp::{TcpCollective, TpRank};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = float_tiny(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = listener.local_addr().expect("addr");
    let timeout = Duration::from_secs(5);
    let p = path.clone();
    let follower = std::thread::spawn(move || {
        let (m, plan) = specd_engine::load::load_gguf_shard(&p, 1, 2).expect("shard");
        let comm = TcpCollective::join(at, 1, 2, 9, timeout).expect("join");
        // Joins the group, then dies before the first step.
        drop(
            m.model
                .with_tp(TpRank::new(plan, Box::new(comm), None).expect("rank")),
        );
    });
    let (m, plan) = specd_engine::load::load_gguf_shard(&path, 0, 2).expect("shard");
    let comm = TcpCollective::lead(listener, 2, 9, timeout).expect("lead");
    let model = m
        .model
        .with_tp(TpRank::new(plan, Box::new(comm), None).expect("rank"))
        .expect("tp");
    follower.join().expect("follower");
    let drain = Drain::new();
    let (_svc, addr) = serve_model(
        model,
        Default::default(),
        Default::default(),
        None,
        drain.clone(),
    )
    .await;
    let (answer, _tx) = first_answer(&addr, open(vec![1, 2, 3], false)).await;
    let status = answer.expect_err("no answer from a broken group");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    until("the worker to leave placement", || drain.has_failed()).await;
}

/// Sends one step on an open stream and waits for its result.
async fn step_result(
    tx: &mpsc::Sender<pb::VerifyRequest>,
    answers: &mut tonic::Streaming<pb::VerifyResponse>,
    req: pb::VerifyRequest,
) -> pb::verify_response::StepResult {
    tx.send(req).await.expect("send");
    let r = answers.message().await.expect("ok").expect("result");
    let Some(pb::verify_response::Msg::StepResult(r)) = r.msg else {
        panic!("{r:?}")
    };
    r
}
