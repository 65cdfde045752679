//! The cluster end to end: router, drafter and target workers as separate `specd` processes over
//! loopback, coordinating through a real etcd child process.
//!
//! - Greedy output through the cluster equals single-process plain decoding token for token (tiny random
//!   models; SmolLM2 with its self-drafter and the model-free drafter).
//! - A drafter killed mid-stream costs no request and changes no output; a target killed mid-request
//!   hands the rest of the request to another target (re-prefilled from the tokens so far); with no
//!   target left the answer is UNAVAILABLE and nothing hangs.
//! - A target split over two processes (`--rank`/`--world`, meeting through etcd) serves like the
//!   unsplit model; when a rank dies, rank 0 leaves placement and exits and its requests go on elsewhere.
//! - etcd restarting while serving: serving goes on and registrations come back; a worker that dies
//!   leaves placement within its lease TTL.
//! - Bad requests get INVALID_ARGUMENT naming the field; overload gets RESOURCE_EXHAUSTED; SIGTERM drains
//!   an in-flight request before the router exits.
//! - The OpenAI HTTP surface, streaming included, through the unmodified `openai` Python client.
//!
//! Without etcd (or without SmolLM2 for the real-model cases) the tests print SKIP and pass, except under
//! `CI`, where `make test` has installed both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use specd_coord::testing::{etcd_or_skip, EtcdServer};
use specd_engine::testing::TinySpec;
use specd_engine::{load_gguf, Family, LoadedModel};
use specd_proto::internal::v1::target_client::TargetClient;
use specd_proto::internal::v1::InfoRequest;
use specd_proto::v1::generate_request::Input;
use specd_proto::v1::generation_client::GenerationClient;
use specd_proto::v1::{FinishReason, GenerateRequest, ListModelsRequest};
use specd_tests::{
    model_file, plain_greedy, specd_bin, temp_dir, tiny_spec, write_tiny, SMOLLM_FILE,
};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::{v1 as reflection_v1, v1alpha};

/// Longest any single wait in these tests may take before they fail instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// A `specd` child process, killed when dropped.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `specd args...` and waits for its first stdout line (the address banner).
    fn start(name: &str, args: &[String], log_dir: &Path) -> (Proc, String) {
        let log = log_dir.join(format!("{name}.log"));
        let mut child = Command::new(specd_bin())
            .args(args)
            .env("SPECD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning specd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Proc {
            child,
            name: name.to_string(),
            log,
        };
        match rx.recv_timeout(WAIT) {
            Ok(line) => (proc, line),
            Err(_) => {
                let _ = proc.child.kill();
                panic!("{name} did not start:\n{}", proc.log_tail());
            }
        }
    }

    /// Its whole log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let s = self.log();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {}", self.name);
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not exit within {within:?}:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a cluster is built from.
#[derive(Clone)]
struct ModelSel {
    /// `--model-preset` and `--model` arguments.
    args: Vec<String>,
    /// The drafter kinds the drafter worker offers.
    kinds: &'static str,
}

/// A running cluster.
struct Cluster {
    etcd: EtcdServer,
    sel: ModelSel,
    dir: tempfile::TempDir,
    router: Option<Proc>,
    drafters: Vec<Proc>,
    targets: Vec<Proc>,
    /// Tensor-parallel ranks other than 0 (they serve nothing themselves).
    ranks: Vec<Proc>,
    grpc: String,
    http: String,
    /// Extra arguments for every worker started from now on.
    worker_extra: Vec<String>,
    /// Extra arguments for every target started from now on.
    target_extra: Vec<String>,
    /// Where each of `targets` listens.
    target_addrs: Vec<String>,
}

impl Cluster {
    fn common(&self) -> Vec<String> {
        let mut a = self.sel.args.clone();
        a.extend([
            "--etcd".into(),
            self.etcd.endpoint(),
            "--lease-ttl".into(),
            "2".into(),
        ]);
        a
    }

    /// The arguments of the next target.
    fn target_args(&self) -> Vec<String> {
        let mut args = vec![
            "target".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
        ];
        args.extend(self.common());
        args.extend(self.worker_extra.iter().cloned());
        args.extend(self.target_extra.iter().cloned());
        args
    }

    fn start_target(&mut self) {
        let n = self.targets.len();
        let (p, banner) = Proc::start(&format!("target{n}"), &self.target_args(), self.dir.path());
        // "target listening on ADDR"
        let addr = banner
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
        self.targets.push(p);
        self.target_addrs.push(addr);
    }

    /// Starts rank `rank` (> 0) of the tensor-parallel group `group` of `world` processes; it returns
    /// once the rank has loaded its shard (it then waits for rank 0's record in etcd).
    fn start_rank(&mut self, group: &str, rank: usize, world: usize) {
        let mut args = vec![
            "target".to_string(),
            "--threads".into(),
            "1".into(),
            "--rank".into(),
            rank.to_string(),
            "--world".into(),
            world.to_string(),
            "--tp-group".into(),
            group.into(),
        ];
        args.extend(self.common());
        args.extend(self.worker_extra.iter().cloned());
        let (p, banner) = Proc::start(&format!("{group}-rank{rank}"), &args, self.dir.path());
        assert_eq!(
            banner,
            format!("tensor-parallel rank {rank} of {world} (group {group}) loaded")
        );
        self.ranks.push(p);
    }

    /// Starts a trainer process; it and its address.
    fn start_trainer(&mut self, n: usize) -> (Proc, String) {
        self.start_trainer_with(n, &[])
    }

    /// Starts a trainer process with extra arguments (its weight store is in the cluster's directory).
    fn start_trainer_with(&mut self, n: usize, extra: &[&str]) -> (Proc, String) {
        let weights = self.dir.path().join("weights");
        let mut args = vec![
            "trainer".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--weights-dir".into(),
            weights.display().to_string(),
        ];
        args.extend(self.common());
        args.extend(extra.iter().map(|s| s.to_string()));
        let (p, banner) = Proc::start(&format!("trainer{n}"), &args, self.dir.path());
        let addr = banner
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
        (p, addr)
    }

    fn start_drafter(&mut self) {
        let mut args = vec![
            "drafter".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
            "--kinds".into(),
            self.sel.kinds.into(),
        ];
        args.extend(self.common());
        args.extend(self.worker_extra.iter().cloned());
        let n = self.drafters.len();
        let (p, _) = Proc::start(&format!("drafter{n}"), &args, self.dir.path());
        self.drafters.push(p);
    }

    fn start_router(&mut self, extra: &[&str]) {
        let mut args = vec![
            "router".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--drain-secs".into(),
            "20".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.common());
        let (p, line) = Proc::start("router", &args, self.dir.path());
        // "router grpc ADDR http ADDR"
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.len(), 5, "router banner: {line}");
        self.grpc = parts[2].to_string();
        self.http = parts[4].to_string();
        self.router = Some(p);
    }

    /// Etcd, one target, one drafter, one router.
    async fn start(sel: ModelSel, router_extra: &[&str]) -> Option<Cluster> {
        Self::start_with(sel, router_extra, &[], &[]).await
    }

    /// [`Cluster::start`], with extra arguments for the workers and for the targets alone.
    async fn start_with(
        sel: ModelSel,
        router_extra: &[&str],
        worker_extra: &[&str],
        target_extra: &[&str],
    ) -> Option<Cluster> {
        let mut c = Cluster::new(sel, worker_extra, target_extra).await?;
        c.start_target();
        c.start_drafter();
        c.start_router(router_extra);
        c.wait_ready().await;
        Some(c)
    }

    /// Etcd alone: the caller starts the processes.
    async fn new(sel: ModelSel, worker_extra: &[&str], target_extra: &[&str]) -> Option<Cluster> {
        let etcd = etcd_or_skip().await?;
        Some(Cluster {
            etcd,
            sel,
            dir: temp_dir(),
            router: None,
            drafters: Vec::new(),
            targets: Vec::new(),
            ranks: Vec::new(),
            grpc: String::new(),
            http: String::new(),
            worker_extra: worker_extra.iter().map(|s| s.to_string()).collect(),
            target_extra: target_extra.iter().map(|s| s.to_string()).collect(),
            target_addrs: Vec::new(),
        })
    }

    async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connecting to the router")
    }

    /// Waits until the router places requests and sees every drafter kind.
    async fn wait_ready(&self) {
        let mut client = self.client().await;
        let end = Instant::now() + WAIT;
        loop {
            let probe = client.generate(request("ready?", 1, "none")).await;
            let models = client.list_models(ListModelsRequest {}).await;
            let kinds_ok = models.is_ok_and(|m| {
                let d = &m.get_ref().models[0].drafters;
                self.sel.kinds.split(',').all(|k| d.iter().any(|x| x == k))
            });
            if probe.is_ok() && kinds_ok {
                return;
            }
            assert!(
                Instant::now() < end,
                "cluster not ready: {probe:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn router_log(&self) -> String {
        self.router.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Starts one stream per request and returns once every one of them has produced tokens.
    async fn streams_flowing(&self, requests: Vec<GenerateRequest>) -> Vec<StreamTask> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(requests.len().max(1));
        let mut tasks = Vec::new();
        for req in requests {
            let client = self.client().await;
            tasks.push(tokio::spawn(stream_all(client, req, Some(tx.clone()))));
        }
        all_started(&mut rx, tasks.len()).await;
        tasks
    }

    /// Every stream's tokens and finish reason; a stream that hangs or fails fails the test, with the logs.
    async fn finished(&self, tasks: Vec<StreamTask>) -> Vec<(Vec<u32>, i32)> {
        let mut out = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            out.push(
                tokio::time::timeout(WAIT, t)
                    .await
                    .expect("no hang")
                    .expect("join")
                    .unwrap_or_else(|e| panic!("request {i} failed: {e}\n{}", self.logs())),
            );
        }
        out
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for p in self
            .router
            .iter()
            .chain(&self.drafters)
            .chain(&self.targets)
            .chain(&self.ranks)
        {
            s += &format!("--- {} ---\n{}\n", p.name, p.log_tail());
        }
        s
    }
}

fn request(prompt: &str, max_new: u32, drafter: &str) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Prompt(prompt.into())),
        raw_prompt: true,
        max_new_tokens: max_new,
        temperature: Some(0.0),
        drafter: drafter.into(),
        ..Default::default()
    }
}

/// Plain greedy decoding in this process, with the model's stop tokens: a forward-and-argmax loop of
/// its own, not the engine's `Generator`.
fn reference(model: &LoadedModel, prompt: &str, max_new: usize) -> Vec<u32> {
    let ids = model.tokenizer.encode(prompt, false).expect("encode");
    plain_greedy(&model.model, &ids, max_new, model.tokenizer.stop_ids())
}

fn smollm() -> Option<(ModelSel, LoadedModel)> {
    let path = model_file(SMOLLM_FILE)?;
    let model = load_gguf(&path).expect("SmolLM2 loads");
    let sel = ModelSel {
        args: vec![
            "--model-preset".into(),
            "smollm".into(),
            "--model".into(),
            path.display().to_string(),
        ],
        kinds: "self,ngram",
    };
    Some((sel, model))
}

/// A cluster of a tiny random model file, its self-drafter one layer deep.
fn tiny_sel(path: &Path) -> ModelSel {
    ModelSel {
        args: vec![
            "--model-preset".into(),
            "smollm".into(),
            "--model".into(),
            path.display().to_string(),
            "--self-layers".into(),
            "1".into(),
        ],
        kinds: "self,ngram",
    }
}

const PROMPTS: &[&str] = &[
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "The three primary colors are",
];

/// Greedy requests through the cluster equal plain single-process decoding, for every drafter.
async fn check_equal(c: &Cluster, model: &LoadedModel, max_new: u32, drafters: &[&str]) {
    let mut client = c.client().await;
    for prompt in PROMPTS {
        let want = reference(model, prompt, max_new as usize);
        for drafter in drafters {
            let got = client
                .generate(request(prompt, max_new, drafter))
                .await
                .unwrap_or_else(|e| panic!("{drafter}: {e}\n{}", c.logs()))
                .into_inner();
            assert_eq!(got.token_ids, want, "drafter {drafter}, prompt {prompt:?}");
            let spec = got.speculation.expect("speculation stats");
            if *drafter != "none" {
                assert_eq!(spec.drafter, *drafter, "the drafter asked for was used");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_greedy_equals_plain_decoding_tiny_models() {
    let dir = temp_dir();
    for (i, family) in [Family::Llama, Family::Qwen2].into_iter().enumerate() {
        let path = write_tiny(dir.path(), &tiny_spec(family, 11 + i as u64));
        let model = load_gguf(&path).expect("tiny model");
        let sel = tiny_sel(&path);
        let Some(c) = Cluster::start(sel, &[]).await else {
            return;
        };
        check_equal(&c, &model, 24, &["none", "self", "ngram", "auto"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_greedy_equals_plain_decoding_smollm() {
    let Some((sel, model)) = smollm() else { return };
    let Some(c) = Cluster::start(sel, &[]).await else {
        return;
    };
    check_equal(&c, &model, 40, &["none", "self", "ngram", "auto"]).await;
    // Pinned draft lengths go through the same path.
    let mut client = c.client().await;
    let want = reference(&model, PROMPTS[0], 32);
    for k in [1, 4] {
        let mut r = request(PROMPTS[0], 32, "self");
        r.draft_len = Some(k);
        let got = client.generate(r).await.expect("generate").into_inner();
        assert_eq!(got.token_ids, want, "self-drafter with k = {k}");
        assert!(got.speculation.expect("stats").drafted > 0);
    }
    // Sampling with a seed is repeatable through the cluster, with or without a drafter.
    for drafter in ["none", "self", "ngram"] {
        let sampled = |seed| GenerateRequest {
            temperature: Some(0.9),
            seed: Some(seed),
            ..request(PROMPTS[1], 32, drafter)
        };
        let a = client.generate(sampled(7)).await.expect("a").into_inner();
        let b = client.generate(sampled(7)).await.expect("b").into_inner();
        assert_eq!(
            a.token_ids, b.token_ids,
            "{drafter}: same seed, same output"
        );
        let mut differs = false;
        for seed in [8, 9, 10] {
            let c = client
                .generate(sampled(seed))
                .await
                .expect("c")
                .into_inner();
            differs |= c.token_ids != a.token_ids;
        }
        assert!(differs, "{drafter}: other seeds sample other outputs");
    }
}

/// Under sampling, the first token through the cluster (drafted by the self-drafter, decided by the
/// target's rejection rule) follows the target's distribution and not the drafter's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_through_the_cluster_follows_the_target_distribution() {
    let Some((sel, model)) = smollm() else { return };
    let Some(c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let prompt = PROMPTS[1];
    let params = specd_core::SamplingParams {
        temperature: 1.0,
        top_k: 6,
        top_p: 1.0,
        seed: None,
    };
    let ids = model.tokenizer.encode(prompt, false).expect("encode");
    let dist_of = |m: &specd_engine::Model| {
        let logits = m
            .forward(&mut m.new_cache(), &ids, specd_engine::LogitsWanted::Last)
            .expect("forward");
        specd_core::SparseDist::from_logits(&logits, &params).expect("dist")
    };
    let p = dist_of(&model.model);
    let layers = specd_engine::preset::default_self_layers(model.model.config().layers);
    let q = dist_of(&model.model.truncated(layers).expect("self-drafter"));
    // Bins: the target's support, then everything else (expected 0).
    let mut support: Vec<u32> = p.ids().to_vec();
    for &id in q.ids() {
        if !support.contains(&id) {
            support.push(id);
        }
    }
    let n = 400u64;
    let mut counts = vec![0u64; support.len() + 1];
    let client = c.client().await;
    let mut pending = tokio::task::JoinSet::new();
    for seed in 0..n {
        let mut client = client.clone();
        pending.spawn(async move {
            let req = GenerateRequest {
                temperature: Some(1.0),
                top_k: Some(6),
                seed: Some(1000 + seed),
                draft_len: Some(1),
                ..request(prompt, 2, "self")
            };
            client.generate(req).await
        });
        while pending.len() >= 8 {
            tally(&mut pending, &support, &mut counts).await;
        }
    }
    while !pending.is_empty() {
        tally(&mut pending, &support, &mut counts).await;
    }
    let expected = |d: &specd_core::SparseDist| -> Vec<f64> {
        let mut e: Vec<f64> = support.iter().map(|&id| f64::from(d.prob(id))).collect();
        e.push(0.0);
        e
    };
    let fit = specd_core::chi_square_test(&counts, &expected(&p));
    assert!(
        fit.p_value > 1e-4,
        "first tokens do not follow the target: {fit:?}, counts {counts:?} over {support:?}"
    );
    let wrong = specd_core::chi_square_test(&counts, &expected(&q));
    assert!(
        wrong.p_value < 1e-3,
        "the test cannot tell the drafter's distribution apart: {wrong:?}"
    );
}

async fn tally(
    pending: &mut tokio::task::JoinSet<
        Result<tonic::Response<specd_proto::v1::GenerateResponse>, tonic::Status>,
    >,
    support: &[u32],
    counts: &mut [u64],
) {
    let r = pending.join_next().await.expect("a task").expect("join");
    let r = r.expect("sampled request").into_inner();
    let first = r.token_ids[0];
    let bin = support
        .iter()
        .position(|&id| id == first)
        .unwrap_or(support.len());
    counts[bin] += 1;
    let spec = r.speculation.expect("stats");
    assert!(
        spec.drafted >= 1,
        "the first token was drafted and verified"
    );
}

/// Streams a request to its end; the token ids and the finish reason.
/// A spawned [`stream_all`].
type StreamTask = tokio::task::JoinHandle<Result<(Vec<u32>, i32), tonic::Status>>;

async fn stream_all(
    mut client: GenerationClient<Channel>,
    req: GenerateRequest,
    started: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<(Vec<u32>, i32), tonic::Status> {
    let mut stream = client.generate_stream(req).await?.into_inner();
    let mut ids = Vec::new();
    let mut started = started;
    loop {
        match stream.message().await? {
            Some(m) => {
                ids.extend(m.token_ids);
                if !ids.is_empty() {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(()).await;
                    }
                }
                if let Some(f) = m.finish_reason {
                    return Ok((ids, f));
                }
            }
            None => {
                return Err(tonic::Status::internal(
                    "stream ended without a finish reason",
                ))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_drafter_mid_stream_costs_no_request() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let max_new = 96;
    let requests = PROMPTS
        .iter()
        .chain(PROMPTS)
        .enumerate()
        .map(|(i, prompt)| {
            let drafter = if i % 2 == 0 { "self" } else { "ngram" };
            request(prompt, max_new, drafter)
        });
    // Once tokens flow on every stream, the drafter dies.
    let tasks = c.streams_flowing(requests.collect()).await;
    c.drafters[0].kill();
    for (i, (ids, finish)) in c.finished(tasks).await.into_iter().enumerate() {
        let prompt = PROMPTS[i % PROMPTS.len()];
        assert_eq!(
            ids,
            reference(&model, prompt, max_new as usize),
            "request {i}"
        );
        assert_ne!(finish, FinishReason::Error as i32);
    }
    assert!(
        c.router_log().contains("drafter failed"),
        "the kill hit requests in flight (the router logged a drafter failure)"
    );
    // Later requests go on without a drafter.
    let mut client = c.client().await;
    let got = client
        .generate(request(PROMPTS[1], 16, "self"))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(got.token_ids, reference(&model, PROMPTS[1], 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_drafter_is_dropped_within_its_timeout() {
    let Some((sel, model)) = smollm() else { return };
    let Some(c) = Cluster::start(sel, &["--drafter-timeout-ms", "300"]).await else {
        return;
    };
    let max_new = 96;
    let requests = PROMPTS.iter().map(|p| request(p, max_new, "self"));
    let tasks = c.streams_flowing(requests.collect()).await;
    // Frozen, not dead: its connections stay open and it never answers.
    c.drafters[0].signal("-STOP");
    for (i, (ids, _)) in c.finished(tasks).await.into_iter().enumerate() {
        assert_eq!(
            ids,
            reference(&model, PROMPTS[i], max_new as usize),
            "request {i}"
        );
    }
    c.drafters[0].signal("-CONT");
    let log = c.router_log();
    assert!(
        log.contains("drafter failed") && log.contains("no answer within 300 ms"),
        "the router timed the drafter out:\n{}",
        c.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_drains_on_sigterm() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let long = c
        .streams_flowing(vec![request(PROMPTS[0], 160, "self")])
        .await;
    c.targets[0].signal("-TERM");
    // The sequence it holds is finished there; then it leaves placement and exits cleanly.
    let (ids, _) = c.finished(long).await.remove(0);
    assert_eq!(ids, reference(&model, PROMPTS[0], 160));
    assert_eq!(
        c.targets[0].wait_exit(WAIT),
        Some(0),
        "target exits 0 after draining"
    );
    let mut client = c.client().await;
    let err = client
        .generate(request(PROMPTS[1], 4, "none"))
        .await
        .expect_err("no target left");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_hands_over_and_none_left_is_unavailable() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start(sel, &[]).await else {
        return;
    };
    c.start_target();
    let end = Instant::now() + WAIT;
    // Wait until the router sees both targets: two concurrent requests land on different targets.
    while router_health(&c.http)["targets"] != 2 {
        assert!(Instant::now() < end, "second target never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max_new = 128;
    // With drafters, so that drafts in flight are verified again on the new target.
    let requests = PROMPTS
        .iter()
        .zip(["self", "ngram"])
        .map(|(p, d)| request(p, max_new, d));
    let tasks = c.streams_flowing(requests.collect()).await;
    // Kill a target that holds a sequence (placement by published load may have put both on one).
    let mut victim = 0;
    for (i, addr) in c.target_addrs.iter().enumerate() {
        let mut t = TargetClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        if t.info(InfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .active_sequences
            > 0
        {
            victim = i;
            break;
        }
    }
    c.targets[victim].kill();
    for (i, (ids, _)) in c.finished(tasks).await.into_iter().enumerate() {
        assert_eq!(
            ids,
            reference(&model, PROMPTS[i], max_new as usize),
            "request {i}"
        );
    }
    assert!(
        c.router_log()
            .contains("target failed; re-prefilling on another"),
        "the kill hit a request in flight (the router logged the hand-over)"
    );
    c.targets[1 - victim].kill();
    let mut client = c.client().await;
    let t0 = Instant::now();
    let err = tokio::time::timeout(WAIT, client.generate(request(PROMPTS[0], 8, "none")))
        .await
        .expect("no hang")
        .expect_err("no target left");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "answered promptly");
}

/// Rank 0's extra target flags in a group of two processes named `group`.
fn rank0_args(group: &'static str) -> Vec<&'static str> {
    vec![
        "--rank",
        "0",
        "--world",
        "2",
        "--tp-group",
        group,
        "--tp-listen",
        "127.0.0.1:0",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_split_over_processes_serves_and_a_dead_rank_hands_over() {
    // f32 weights: the split model's greedy text is the unsplit one's (float rounding alone differs).
    let dir = temp_dir();
    let spec = TinySpec {
        ffn: 768,
        float: true,
        ..tiny_spec(Family::Qwen2, 17)
    };
    let path = write_tiny(dir.path(), &spec);
    let model = load_gguf(&path).expect("tiny model");
    let split = specd_engine::tp::load_gguf_local(&path, 2, &Default::default()).expect("TP=2");
    let max_new = 200;
    for p in PROMPTS {
        assert_eq!(
            reference(&split, p, max_new),
            reference(&model, p, max_new),
            "TP=2 in one process vs unsplit, prompt {p:?}"
        );
    }
    drop(split);
    let mut rank0 = rank0_args("g1");
    // Longer than the test's pause of rank 1 below: the kill, not a timeout, fails the group.
    rank0.extend(["--tp-timeout-secs", "50"]);
    let Some(mut c) = Cluster::new(tiny_sel(&path), &[], &rank0).await else {
        return;
    };
    // Rank 1 first: it loads and waits for rank 0's record; rank 0 answers once the group has formed.
    c.start_rank("g1", 1, 2);
    c.start_target();
    c.target_extra.clear();
    c.start_drafter();
    c.start_router(&[]);
    c.wait_ready().await;
    check_equal(&c, &model, 24, &["none", "self", "ngram"]).await;

    // Streams on the group (the only target), then rank 1 paused mid-stream while a plain target
    // joins, then killed: rank 0's step fails, it leaves placement and the streams go on elsewhere.
    let requests = PROMPTS
        .iter()
        .zip(["self", "ngram"])
        .map(|(p, d)| request(p, max_new as u32, d));
    let tasks = c.streams_flowing(requests.collect()).await;
    c.ranks[0].signal("-STOP");
    c.start_target();
    let end = Instant::now() + WAIT;
    while router_health(&c.http)["targets"] != 2 {
        assert!(Instant::now() < end, "second target never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.ranks[0].kill();
    for (i, (ids, _)) in c.finished(tasks).await.into_iter().enumerate() {
        assert_eq!(ids, reference(&model, PROMPTS[i], max_new), "request {i}");
    }
    assert!(
        c.router_log()
            .contains("target failed; re-prefilling on another"),
        "the requests were in flight on the group when it failed\n{}",
        c.logs()
    );
    let code = c.targets[0].wait_exit(WAIT);
    assert_ne!(
        code,
        Some(0),
        "rank 0 of a failed group exits with an error"
    );
    assert!(
        c.targets[0].log().contains("tensor-parallel group failed"),
        "{}",
        c.logs()
    );
    check_equal(&c, &model, 24, &["none", "self"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_processes_drains_together_and_a_rank_without_rank_0_exits() {
    let dir = temp_dir();
    let path = write_tiny(dir.path(), &tiny_spec(Family::Qwen2, 19));
    let rank0 = rank0_args("g2");
    let Some(mut c) = Cluster::new(tiny_sel(&path), &[], &rank0).await else {
        return;
    };
    // Rank 0 first this time: it publishes its record and answers once rank 1 has joined.
    let args = c.target_args();
    let log_dir = c.dir.path().to_path_buf();
    let lead = std::thread::spawn(move || Proc::start("g2-rank0", &args, &log_dir));
    c.start_rank("g2", 1, 2);
    let (p, banner) = lead.join().unwrap();
    assert!(banner.starts_with("target listening on"), "{banner}");
    c.targets.push(p);
    // SIGTERM on rank 0: it drains, shuts the group down, and both exit cleanly.
    c.targets[0].signal("-TERM");
    assert_eq!(c.targets[0].wait_exit(WAIT), Some(0), "{}", c.logs());
    assert_eq!(c.ranks[0].wait_exit(WAIT), Some(0), "{}", c.logs());
    assert!(
        c.ranks[0].log().contains("rank 0 shut the group down"),
        "{}",
        c.logs()
    );
    // A rank whose rank 0 is killed exits with an error (a supervisor restarts the group); a restarted
    // group forms again under a new generation.
    c.start_rank("g2", 1, 2);
    c.start_target();
    c.targets[1].kill();
    let t = Instant::now();
    assert_ne!(c.ranks[1].wait_exit(WAIT), Some(0), "{}", c.logs());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Waits until `n` streams have received tokens (so every one of them is placed and decoding).
async fn all_started(rx: &mut tokio::sync::mpsc::Receiver<()>, n: usize) {
    for _ in 0..n {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("tokens started")
            .expect("sender alive");
    }
}

/// The body of the router's HTTP `GET path`.
fn router_get(http: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(http).expect("connect");
    write!(conn, "GET {path} HTTP/1.0\r\nHost: specd\r\n\r\n").expect("write");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read");
    raw.split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string()
}

/// The router's `/health` JSON (its own view of the workers).
fn router_health(http: &str) -> serde_json::Value {
    serde_json::from_str(&router_get(http, "/health")).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_survives_an_etcd_restart_and_dead_workers_leave_within_their_ttl() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let mut client = c.client().await;
    c.etcd.kill();
    let got = client
        .generate(request(PROMPTS[0], 24, "self"))
        .await
        .expect("served without etcd")
        .into_inner();
    assert_eq!(got.token_ids, reference(&model, PROMPTS[0], 24));
    c.etcd.restart().await.expect("etcd restarts");
    // Every process registers again (the data dir survived, the leases may not have).
    let end = Instant::now() + WAIT;
    loop {
        let store = c.etcd.store().await;
        let (all, _) = store
            .list_records::<specd_coord::InstanceRecord>(&specd_coord::keys::instances())
            .await
            .expect("list");
        if all.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < end,
            "registrations did not come back: {all:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = client
        .generate(request(PROMPTS[1], 24, "ngram"))
        .await
        .expect("served after restart")
        .into_inner();
    assert_eq!(got.token_ids, reference(&model, PROMPTS[1], 24));

    // A drafter frozen in place (SIGSTOP: no crash, no deregistration) stops renewing its lease and
    // leaves placement within the TTL (2 s) plus etcd's expiry granularity.
    c.drafters[0].signal("-STOP");
    let t0 = Instant::now();
    loop {
        let models = client
            .list_models(ListModelsRequest {})
            .await
            .expect("list models")
            .into_inner();
        if !models.models[0].drafters.iter().any(|d| d == "self") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "frozen drafter still placed after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = client
        .generate(request(PROMPTS[0], 16, "self"))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(got.token_ids, reference(&model, PROMPTS[0], 16));
    c.drafters[0].signal("-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_overload_and_sigterm_drain() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start(sel, &["--max-concurrent", "1", "--max-queue", "0"]).await
    else {
        return;
    };
    let mut client = c.client().await;
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                input: None,
                ..request("", 8, "none")
            },
            "prompt",
        ),
        (request("", 8, "none"), "prompt"),
        (
            GenerateRequest {
                temperature: Some(-1.0),
                ..request("x", 8, "none")
            },
            "temperature",
        ),
        (
            GenerateRequest {
                temperature: Some(f32::NAN),
                ..request("x", 8, "none")
            },
            "temperature",
        ),
        (
            GenerateRequest {
                top_p: Some(1.5),
                ..request("x", 8, "none")
            },
            "top_p",
        ),
        (request("x", 1_000_000, "none"), "max_new_tokens"),
        (request("x", 8, "bogus"), "drafter"),
        (
            GenerateRequest {
                draft_len: Some(0),
                ..request("x", 8, "self")
            },
            "draft_len",
        ),
        (
            GenerateRequest {
                stop: vec![String::new()],
                ..request("x", 8, "none")
            },
            "stop",
        ),
        (request(&"word ".repeat(9000), 8, "none"), "prompt"),
    ];
    for (req, field) in cases {
        let err = client.generate(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(
            err.message().starts_with(field),
            "message names {field}: {}",
            err.message()
        );
    }
    let err = client
        .generate(GenerateRequest {
            model: "gpt-9".into(),
            ..request("x", 8, "none")
        })
        .await
        .expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound);
    let err = generate_invalid_utf8(&c.grpc).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("GenerateRequest.input") && err.message().contains("UTF-8"),
        "names the field: {}",
        err.message()
    );

    // Overload: one slot, no queue.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let long = tokio::spawn(stream_all(
        c.client().await,
        request(PROMPTS[0], 200, "none"),
        Some(tx),
    ));
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("first request running");
    let err = client
        .generate(request(PROMPTS[1], 4, "none"))
        .await
        .expect_err("overloaded");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");

    // SIGTERM: the in-flight request finishes, new ones are refused, the router exits cleanly.
    let router = c.router.as_mut().expect("router");
    router.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client
        .generate(request(PROMPTS[1], 4, "none"))
        .await
        .expect_err("draining");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::ResourceExhausted),
        "{refused}"
    );
    let (ids, finish) = tokio::time::timeout(WAIT, long)
        .await
        .expect("no hang")
        .expect("join")
        .expect("drained to the end");
    // Drained to its end: the whole reference output, up to the length or the model's own stop (which
    // of the two depends on the kernels' rounding on this CPU, not on the drain).
    let want = reference(&model, PROMPTS[0], 200);
    let expected = if want.len() == 200 {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    assert_eq!(finish, expected as i32);
    assert_eq!(ids, want);
    let code = c.router.as_mut().expect("router").wait_exit(WAIT);
    assert_eq!(code, Some(0), "router exits cleanly after draining");
}

/// The target workers registered right now, with their addresses.
async fn target_addresses(c: &Cluster) -> Vec<String> {
    let store = c.etcd.store().await;
    let (records, _) = store
        .list_records::<specd_coord::InstanceRecord>(&specd_coord::keys::instances_of(
            specd_coord::Role::Target,
        ))
        .await
        .expect("list");
    records.into_iter().map(|r| r.address).collect()
}

/// Sequences open on all targets right now.
async fn targets_active(c: &Cluster) -> u32 {
    let mut n = 0;
    for addr in target_addresses(c).await {
        let mut target = TargetClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        n += target
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .active_sequences;
    }
    n
}

/// Waits until every target holds no sequence: no open stream and no KV cache (the cache is freed by
/// the engine thread after the stream's slot, so the slot count alone would pass too early).
async fn wait_targets_idle(c: &Cluster, what: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    for addr in target_addresses(c).await {
        let mut target = TargetClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        loop {
            let info = target
                .info(InfoRequest {})
                .await
                .expect("info")
                .into_inner();
            if info.active_sequences == 0 && info.held_sequences == 0 {
                break;
            }
            assert!(
                Instant::now() < end,
                "{what}: target still has {} streams and {} caches",
                info.active_sequences,
                info.held_sequences
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_disconnects_health_and_reflection() {
    let Some((sel, _)) = smollm() else { return };
    let Some(c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let channel = Channel::from_shared(format!("http://{}", c.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect");

    // gRPC health, overall and per service.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "specd.v1.Generation"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    // Reflection, in the v1alpha dialect grpcurl and ghz speak, and in v1.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("unexpected reflection answer: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "specd.v1.Generation"),
        "{names:?}"
    );
    let mut v1 =
        reflection_v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = reflection_v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection_v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "specd.v1.Generation".into(),
            ),
        ),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("reflection v1")
        .into_inner();
    assert!(matches!(
        answers
            .message()
            .await
            .expect("answer")
            .expect("one")
            .message_response,
        Some(reflection_v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));

    // The client's deadline bounds the request, and the workers' sequences are freed.
    let mut client = GenerationClient::new(channel.clone());
    let mut req = tonic::Request::new(request(PROMPTS[1], 4000, "self"));
    req.set_timeout(Duration::from_millis(400));
    let t0 = Instant::now();
    let err = client.generate(req).await.expect_err("deadline");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    wait_targets_idle(&c, "after a deadline").await;

    // An HTTP client that hangs up on a non-streaming completion frees the worker-side sequences too.
    {
        use std::io::Write;
        let body = serde_json::json!({
            "prompt": PROMPTS[1],
            "max_tokens": 4000,
            "temperature": 0,
        })
        .to_string();
        let mut conn = std::net::TcpStream::connect(&c.http).expect("connect");
        write!(
            conn,
            "POST /v1/completions HTTP/1.1\r\nHost: specd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            targets_active(&c).await,
            1,
            "the completion is being generated"
        );
        drop(conn);
        wait_targets_idle(&c, "after an HTTP client hung up").await;
    }

    // A client that walks away from a stream frees the worker-side sequences.
    let mut stream = client
        .generate_stream(request(PROMPTS[0], 4000, "ngram"))
        .await
        .expect("stream")
        .into_inner();
    let mut got = 0;
    while got < 5 {
        got += stream
            .message()
            .await
            .expect("message")
            .expect("more")
            .token_ids
            .len();
    }
    drop(stream);
    wait_targets_idle(&c, "after a disconnect").await;
}

/// `GenerateRequest` with its `prompt` field (a proto `string`) carrying bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerateRequest {
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
    #[prost(uint32, tag = "10")]
    max_new_tokens: u32,
}

async fn generate_invalid_utf8(addr: &str) -> tonic::Status {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec =
        tonic_prost::ProstCodec::<RawGenerateRequest, specd_proto::v1::GenerateResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/specd.v1.Generation/Generate");
    let req = tonic::Request::new(RawGenerateRequest {
        prompt: vec![b'h', 0xff, 0xfe, b'i'],
        max_new_tokens: 4,
    });
    grpc.unary(req, path, codec)
        .await
        .expect_err("invalid UTF-8 is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_against_the_http_api() {
    let Some((sel, model)) = smollm() else { return };
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with openai is missing under CI: run scripts/setup.sh"
        );
        eprintln!("SKIP: python3 -c 'import openai' fails (scripts/setup.sh installs it)");
        return;
    }
    let Some(c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let want = model
        .tokenizer
        .decode(&reference(&model, PROMPTS[0], 24), true)
        .expect("decode");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("openai_client.py");
    let http = c.http.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(format!("http://{http}/v1"))
            .arg(PROMPTS[0])
            .output()
            .expect("python3")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("script prints JSON");
    assert_eq!(
        result["completion"], want,
        "completion text equals plain decoding"
    );
    assert_eq!(
        result["completion_stream"], want,
        "streamed completion equals plain decoding"
    );
    assert_eq!(
        result["chat"], result["chat_stream"],
        "chat, streamed or not, gives the same text"
    );
    assert!(!result["chat"].as_str().unwrap_or("").is_empty());
    assert_eq!(result["models"][0], serde_json::json!(model_id(&model)));
    assert_eq!(result["bad_status"], 400);
    assert_eq!(result["usage_completion_tokens"], 24);
    assert_eq!(
        result["metrics_missing"],
        serde_json::json!([]),
        "Prometheus metrics missing from /metrics"
    );
}

fn model_id(model: &LoadedModel) -> String {
    model
        .path
        .file_stem()
        .expect("stem")
        .to_string_lossy()
        .into_owned()
}

/// A long prompt's prefill outlasts the target's step timeout but keeps reporting progress, so it is
/// served, not failed over; sampled proposals at the longest draft length stay under the message limit.
/// Neither ejects a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_and_long_sampled_drafts_eject_nobody() {
    let Some((sel, model)) = smollm() else { return };
    // Prefill chunks of 16 tokens (under 0.1 s each here) report progress well within the 1 s step
    // timeout; the whole prompt takes several times that (about 250 tokens took 1.3 s once the
    // column-group kernels landed, so the prompt is about 500).
    let Some(c) = Cluster::start_with(
        sel,
        &["--target-timeout-ms", "1000"],
        &[],
        &["--prefill-chunk", "16"],
    )
    .await
    else {
        return;
    };
    let mut client = c.client().await;
    let long: String = (0..48)
        .map(|i| format!("Line {i}: the quick brown fox jumps. "))
        .collect();
    let n = model.tokenizer.encode(&long, false).expect("encode").len();
    assert!(n > 400, "{n} tokens");
    let t0 = Instant::now();
    let got = client
        .generate(request(&long, 4, "self"))
        .await
        .unwrap_or_else(|e| panic!("long prompt: {e}\n{}", c.logs()))
        .into_inner();
    let took = t0.elapsed();
    assert_eq!(got.token_ids, reference(&model, &long, 4));
    println!("FIGURE open of a {n}-token prompt on SmolLM2 (1 thread): {took:?}");
    assert!(
        took > Duration::from_millis(1000),
        "the prefill did not outlast the step timeout ({took:?}): the test proves nothing"
    );
    // Sampling at k = 32 with the self-drafter's 32K-entry head: the full q was ~8 MB per proposal.
    for seed in 0..2 {
        let r = GenerateRequest {
            temperature: Some(1.0),
            seed: Some(seed),
            draft_len: Some(32),
            ..request(PROMPTS[0], 12, "self")
        };
        let got = client.generate(r).await.expect("sampled").into_inner();
        let spec = got.speculation.expect("stats");
        assert_eq!(spec.drafter, "self", "the drafter stayed with the request");
        assert!(spec.drafted >= 32, "{spec:?}");
    }
    let log = c.router_log();
    assert!(
        !log.contains("ejected") && !log.contains("failed"),
        "a worker was failed or ejected:\n{}",
        c.logs()
    );
}

/// A stop string cuts the output at the token that completes it, whatever the drafter accepted in
/// that step: the same tokens and the same usage for every drafter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_output_at_the_same_token_for_every_drafter() {
    let Some((sel, model)) = smollm() else { return };
    let Some(c) = Cluster::start(sel, &[]).await else {
        return;
    };
    let prompt = PROMPTS[0];
    let full = reference(&model, prompt, 48);
    // A stop string that ends inside the output, some tokens in.
    let piece = model.tokenizer.decode(&full[20..22], true).expect("decode");
    let stop = piece.trim().to_string();
    assert!(!stop.is_empty(), "{piece:?}");
    let end = (1..=full.len())
        .find(|&n| {
            model
                .tokenizer
                .decode(&full[..n], true)
                .expect("decode")
                .contains(&stop)
        })
        .expect("the stop string occurs");
    let mut client = c.client().await;
    for (drafter, k) in [("none", None), ("self", Some(8)), ("ngram", None)] {
        let r = GenerateRequest {
            stop: vec![stop.clone()],
            draft_len: k,
            ..request(prompt, 48, drafter)
        };
        let got = client.generate(r).await.expect("generate").into_inner();
        assert_eq!(
            got.token_ids,
            full[..end],
            "{drafter}: tokens past the stop"
        );
        assert_eq!(
            got.usage.expect("usage").completion_tokens as usize,
            end,
            "{drafter}: usage"
        );
        assert_eq!(got.finish_reason, FinishReason::Stop as i32);
        assert!(!got.text.contains(&stop));
    }
}

/// A router that freezes (SIGSTOP: its sockets stay open, it answers nothing) loses its sequences on
/// the workers within the keepalive timeout: slots and caches are freed, not held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_router_frees_its_sequences_on_the_workers() {
    let Some((sel, _)) = smollm() else { return };
    let keepalive = ["--keepalive-secs", "1", "--keepalive-timeout-secs", "1"];
    let Some(c) = Cluster::start_with(sel, &[], &keepalive, &[]).await else {
        return;
    };
    let tasks = c
        .streams_flowing(vec![
            request(PROMPTS[0], 2000, "self"),
            request(PROMPTS[1], 2000, "ngram"),
        ])
        .await;
    assert!(targets_active(&c).await > 0);
    let router = c.router.as_ref().expect("router");
    router.signal("-STOP");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (streams, caches) = targets_held(&c).await;
        let drafting = drafters_active(&c).await;
        if streams == 0 && caches == 0 && drafting == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "workers still hold {streams} target streams, {caches} caches, {drafting} drafter \
             streams 20 s after their router froze\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    router.signal("-CONT");
    for t in tasks {
        t.abort();
    }
}

/// Open streams and held caches on all targets.
async fn targets_held(c: &Cluster) -> (u32, u32) {
    let (mut streams, mut caches) = (0, 0);
    for addr in target_addresses(c).await {
        let mut target = TargetClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let info = target
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        streams += info.active_sequences;
        caches += info.held_sequences;
    }
    (streams, caches)
}

/// Open streams on all drafters.
async fn drafters_active(c: &Cluster) -> u32 {
    let store = c.etcd.store().await;
    let (records, _) = store
        .list_records::<specd_coord::InstanceRecord>(&specd_coord::keys::instances_of(
            specd_coord::Role::Drafter,
        ))
        .await
        .expect("list");
    let mut n = 0;
    for r in records {
        let mut d = specd_proto::internal::v1::drafter_client::DrafterClient::connect(format!(
            "http://{}",
            r.address
        ))
        .await
        .expect("connect");
        n += d
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .active_sequences;
    }
    n
}

async fn trainer_status(addr: &str) -> Option<specd_proto::internal::v1::TrainerStatus> {
    let mut t =
        specd_proto::internal::v1::trainer_client::TrainerClient::connect(format!("http://{addr}"))
            .await
            .ok()?;
    t.status(specd_proto::internal::v1::TrainerStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Serves requests until the trainer at `addr` holds samples; the outputs stay plain greedy decoding.
async fn serve_until_buffered(c: &Cluster, model: &LoadedModel, addr: &str, what: &str) {
    let mut client = c.client().await;
    let end = Instant::now() + WAIT;
    for i in 0.. {
        let prompt = PROMPTS[i % PROMPTS.len()];
        let got = client
            .generate(request(prompt, 16, "self"))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", c.logs()))
            .into_inner();
        assert_eq!(got.token_ids, reference(model, prompt, 16), "{what}");
        if trainer_status(addr)
            .await
            .is_some_and(|s| s.buffered_samples > 0)
        {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: no sample reached the trainer\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Targets capture distillation samples and stream them to the trainer that leads the election; when
/// it dies, the standby takes over and receives them; serving never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_reach_the_leading_trainer_and_a_standby_takes_over() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start_with(sel, &[], &[], &["--sample-rate", "1"]).await else {
        return;
    };
    let (t0, a0) = c.start_trainer(0);
    let (t1, a1) = c.start_trainer(1);
    let mut trainers = [(t0, a0), (t1, a1)];
    let end = Instant::now() + WAIT;
    let leader = loop {
        let mut leading = Vec::new();
        for (i, (_, a)) in trainers.iter().enumerate() {
            if trainer_status(a).await.is_some_and(|s| s.leader) {
                leading.push(i);
            }
        }
        assert!(leading.len() <= 1, "two leaders");
        if let Some(&i) = leading.first() {
            break i;
        }
        assert!(Instant::now() < end, "no trainer leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let addr = trainers[leader].1.clone();
    serve_until_buffered(&c, &model, &addr, "to the leader").await;
    trainers[leader].0.kill();
    let standby = trainers[1 - leader].1.clone();
    let end = Instant::now() + WAIT;
    while !trainer_status(&standby).await.is_some_and(|s| s.leader) {
        assert!(
            Instant::now() < end,
            "the standby never took over\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serve_until_buffered(&c, &model, &standby, "to the standby").await;
}

/// Online distillation end to end while serving: targets capture samples, the trainer (allowed to train
/// under load here) distills the self-drafter, publishes a version through etcd, the drafter worker
/// fetches, verifies and swaps it in, and a stream of requests running through all of it has no failure
/// and every output equal to plain greedy decoding, before, during and after the swap.
///
/// The traffic is three prompts in turn and one sample in four is held out, so the held-out slice holds
/// every prompt and so does the training set (one in three would hold out the third prompt alone and
/// never train on it: the gate then asks a 135M model's exit to generalize from two sequences to a
/// third, which it does only by chance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distilled_drafter_is_published_and_hot_swapped_under_traffic_without_changing_outputs() {
    let Some((sel, model)) = smollm() else { return };
    let Some(mut c) = Cluster::start_with(sel, &[], &[], &["--sample-rate", "1"]).await else {
        return;
    };
    let (trainer, addr) = c.start_trainer_with(
        0,
        &[
            "--train-max-load",
            "1000",
            "--gate-margin",
            "0.001",
            "--gate-min-positions",
            "16",
            "--eval-every",
            "4",
            "--eval-steps",
            "5",
        ],
    );
    let drafter_log = c.drafters[0].log.clone();
    let swapped = || {
        std::fs::read_to_string(&drafter_log)
            .unwrap_or_default()
            .contains("drafter version swapped in")
    };
    let mut client = c.client().await;
    let end = Instant::now() + Duration::from_secs(240);
    let (mut served, mut after_swap) = (0, 0);
    let prompts = [
        PROMPTS[0],
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        PROMPTS[1],
    ];
    while after_swap < 4 {
        let prompt = prompts[served % prompts.len()];
        let got = client
            .generate(request(prompt, 16, "self"))
            .await
            .unwrap_or_else(|e| panic!("request {served} failed: {e}\n{}", c.logs()))
            .into_inner();
        assert_eq!(
            got.token_ids,
            reference(&model, prompt, 16),
            "request {served} (swapped: {})",
            swapped()
        );
        served += 1;
        if swapped() {
            after_swap += 1;
        }
        assert!(
            Instant::now() < end,
            "no version swapped in after {served} requests; trainer: {:?}\n{}--- trainer ---\n{}",
            trainer_status(&addr).await,
            c.logs(),
            trainer.log_tail()
        );
    }
    let st = trainer_status(&addr).await.expect("trainer status");
    assert!(st.live_version.parse::<u64>().unwrap_or(0) >= 1, "{st:?}");
    let store = specd_coord::Store::etcd(c.etcd.config()).await.unwrap();
    let key = specd_coord::keys::drafter_current(&model_id(&model), "self");
    let live: specd_coord::DrafterVersion = store.get_record(&key).await.unwrap().expect("record");
    assert!(live.version >= 1 && live.sha256.len() == 64, "{live:?}");
    // The router's speculation counters are per drafter version: the plain self-drafter's steps and
    // a swapped-in version's, apart.
    let metrics = router_get(&c.http, "/metrics");
    let versions: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("specd_spec_decode_num_draft_tokens_total{")
                && l.contains("drafter=\"self\"")
        })
        .filter_map(|l| l.split("version=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        versions.len() >= 2
            && versions
                .iter()
                .any(|v| v.parse::<u64>().is_ok_and(|v| v >= 1)),
        "per-version draft counters: {versions:?}\n{metrics}"
    );
    println!(
        "osd in the cluster: {served} requests, version {} live ({:.3} -> {:.3} held out)",
        live.version, live.gate_live, live.gate_candidate
    );
}

/// Load beyond capacity waits instead of failing: a target of 2 slots, 12 concurrent clients; every
/// request is answered (admitted requests wait for a freed slot) with plain greedy output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_clients_than_target_slots_wait_and_all_succeed() {
    let dir = temp_dir();
    let path = write_tiny(dir.path(), &tiny_spec(Family::Qwen2, 21));
    let model = load_gguf(&path).expect("tiny model");
    let sel = tiny_sel(&path);
    let Some(c) = Cluster::start_with(sel, &[], &[], &["--capacity", "2"]).await else {
        return;
    };
    let want = reference(&model, PROMPTS[0], 24);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut client = c.client().await;
        let drafter = ["none", "ngram", "self"][i % 3];
        tasks.push(tokio::spawn(async move {
            client
                .generate(request(PROMPTS[0], 24, drafter))
                .await
                .map(|r| r.into_inner().token_ids)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = tokio::time::timeout(WAIT, t)
            .await
            .expect("no hang")
            .expect("task")
            .unwrap_or_else(|e| panic!("request {i} failed: {e}\n{}", c.logs()));
        assert_eq!(got, want, "request {i}");
    }
}
