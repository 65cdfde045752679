//! The cluster roles of the binary: `specd target`, `specd drafter`, `specd router` (each a process of
//! its own, coordinating through etcd) and `specd up` (all three in this process, as tasks sharing the
//! embedded coordination store or a given etcd, and sharing the target's weights with the
//! self-drafter).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use specd_coord::{EtcdConfig, InstanceRecord, Role, Store};
use specd_engine::preset::{default_self_layers, trim_draft_head, Preset};
use specd_engine::{load_gguf, LoadedModel};
use specd_proto::internal::v1::drafter_server::DrafterServer;
use specd_proto::internal::v1::target_server::TargetServer;
use specd_proto::v1::generation_server::GenerationServer;
use specd_router::core::{ModelMeta, Router, RouterConfig};
use specd_router::pool::Pool;
use specd_service::grpc::{Keepalive, MAX_MESSAGE_BYTES};
use specd_service::telemetry::{LogFormat, TelemetryConfig};
use specd_service::{Drain, Shutdown};
use specd_worker::drafter::{DrafterModels, DrafterService};
use specd_worker::samples::{run_sender, SampleConfig, SampleSink};
use specd_worker::swap::{FollowConfig, LiveDrafter};
use specd_worker::target::{
    BatchLimits, TargetService, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_PREFILL_CHUNK,
};
use specd_worker::{serve_worker, ServeOptions, WorkerIdentity};

use crate::cli::{init_threads, ModelArgs, TpArgs};

mod check;
mod kv;
pub mod tp;
mod trainer;
pub use kv::KvArgs;
use trainer::start_trainer;
pub use trainer::{run_trainer, TrainArgs, TrainerArgs};

/// What every service role takes.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// etcd endpoints, comma-separated (http://host:port). Required for a lone role; `specd up` uses the
    /// embedded store without it.
    #[arg(long, env = "SPECD_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Id registered in the coordination store (default: role plus a random suffix).
    #[arg(long, env = "SPECD_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Address other services dial (default: the bound address, loopback if bound to all interfaces).
    #[arg(long, env = "SPECD_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Registration lease TTL in seconds: a process that dies leaves placement within this.
    #[arg(long, env = "SPECD_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Seconds a draining service waits for in-flight work after SIGTERM.
    #[arg(long, env = "SPECD_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "SPECD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// OTLP/gRPC endpoint for traces (also OTEL_EXPORTER_OTLP_ENDPOINT); none: spans are not exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Seconds between HTTP/2 keepalive PINGs on every gRPC connection, served and dialled.
    #[arg(long, env = "SPECD_KEEPALIVE_SECS", default_value_t = 10)]
    pub keepalive_secs: u64,
    /// Seconds a PING may go unanswered before the connection is closed and its streams end (a peer
    /// whose host froze or vanished without closing the connection).
    #[arg(long, env = "SPECD_KEEPALIVE_TIMEOUT_SECS", default_value_t = 5)]
    pub keepalive_timeout_secs: u64,
    /// A worker stream with no request for this many seconds is ended and its sequence freed.
    #[arg(long, env = "SPECD_STREAM_IDLE_SECS", default_value_t = 300)]
    pub stream_idle_secs: u64,
    /// Parse and validate the flags and `SPECD_*` variables, print whether they are valid, and exit
    /// without starting, reading a file or dialling anything (deployments check their commands with it).
    #[arg(long)]
    pub check_config: bool,
}

impl ServiceArgs {
    pub(crate) fn keepalive(&self) -> Keepalive {
        Keepalive {
            interval: Duration::from_secs(self.keepalive_secs.max(1)),
            timeout: Duration::from_secs(self.keepalive_timeout_secs.max(1)),
        }
    }

    pub(crate) fn stream_idle(&self) -> Duration {
        Duration::from_secs(self.stream_idle_secs.max(1))
    }
}

/// Distillation sample capture on a target (sent to a trainer when one is registered).
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Fraction of sequences whose verified positions are captured for the trainer (0: off). Nothing
    /// is captured while no trainer leads the model's election.
    #[arg(long, env = "SPECD_SAMPLE_RATE", default_value_t = 0.1)]
    pub sample_rate: f64,
    /// Target tokens kept per captured position (top-w, plus the tail mass).
    #[arg(long, env = "SPECD_SAMPLE_WIDTH", default_value_t = 32)]
    pub sample_width: usize,
    /// Captured samples waiting to be sent, at most; beyond it they are dropped and counted.
    #[arg(long, env = "SPECD_SAMPLE_QUEUE", default_value_t = 256)]
    pub sample_queue: usize,
    /// Prompt positions captured per sampled sequence as well (the last ones of its prompt, read off
    /// the prefill: the target's distribution over the request's own text); 0: verified positions only.
    /// Each captured row costs the LM head and a pass over the vocabulary in that sequence's prefill
    /// (Qwen2.5 1.5B, a 225-token prompt: 1.8-2.0 s -> 2.1-2.7 s to the first token on 2 threads).
    #[arg(long, env = "SPECD_SAMPLE_PROMPT_POSITIONS", default_value_t = 0)]
    pub sample_prompt_positions: usize,
}

impl SampleArgs {
    pub(crate) fn config(&self) -> anyhow::Result<SampleConfig> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            bail!("--sample-rate must be in [0, 1], got {}", self.sample_rate);
        }
        if self.sample_width == 0 {
            bail!("--sample-width must be at least 1");
        }
        Ok(SampleConfig {
            rate: self.sample_rate,
            width: self.sample_width,
            queue: self.sample_queue.max(1),
            prompt_positions: self.sample_prompt_positions,
            ..SampleConfig::default()
        })
    }
}

/// The trainer's replay buffer and distillation loop.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub tp: TpArgs,
    #[command(flatten)]
    pub ranks: tp::RankArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// gRPC listen address.
    #[arg(long, env = "SPECD_GRPC_ADDR", default_value = "0.0.0.0:50061")]
    pub grpc_addr: SocketAddr,
    /// Prometheus /metrics and /health listen address (none: not served).
    #[arg(long, env = "SPECD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Sequences held at once.
    #[arg(long, env = "SPECD_CAPACITY", default_value_t = 16)]
    pub capacity: u32,
    /// Most new tokens in one batched forward.
    #[arg(long, env = "SPECD_MAX_BATCH_TOKENS", default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one prefill per batched forward (long prompts are prefilled in chunks
    /// between other sequences' steps).
    #[arg(long, env = "SPECD_PREFILL_CHUNK", default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub kv: KvArgs,
    #[command(flatten)]
    pub samples: SampleArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DrafterArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// gRPC listen address.
    #[arg(long, env = "SPECD_GRPC_ADDR", default_value = "0.0.0.0:50071")]
    pub grpc_addr: SocketAddr,
    /// Prometheus /metrics and /health listen address (none: not served).
    #[arg(long, env = "SPECD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Sequences held at once.
    #[arg(long, env = "SPECD_CAPACITY", default_value_t = 64)]
    pub capacity: u32,
    /// Drafter kinds to offer: model, self, ngram (default: the preset's draft model if it has one,
    /// else self; and ngram).
    #[arg(long, env = "SPECD_DRAFTER_KINDS", value_delimiter = ',')]
    pub kinds: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub router: RouterOpts,
}

#[derive(Debug, Clone, Args)]
pub struct RouterOpts {
    /// Public gRPC listen address.
    #[arg(long, env = "SPECD_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// OpenAI-compatible HTTP listen address (also /metrics and /health).
    #[arg(long, env = "SPECD_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Requests generating at once.
    #[arg(long, env = "SPECD_MAX_CONCURRENT", default_value_t = 64)]
    pub max_concurrent: usize,
    /// Requests waiting for a slot before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SPECD_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// max_new_tokens of requests that leave it at 0.
    #[arg(long, env = "SPECD_DEFAULT_MAX_NEW_TOKENS", default_value_t = 256)]
    pub default_max_new_tokens: u32,
    /// Longest adaptive draft.
    #[arg(long, env = "SPECD_MAX_DRAFT_LEN", default_value_t = 8)]
    pub max_draft_len: usize,
    /// A drafter not answering a step within this many ms is dropped for the request.
    #[arg(long, env = "SPECD_DRAFTER_TIMEOUT_MS", default_value_t = 2000)]
    pub drafter_timeout_ms: u64,
    /// A target not answering a step, or not reporting prefill progress, within this many ms is
    /// treated as failed (a long prompt gets as long as its prefill keeps progressing).
    #[arg(long, env = "SPECD_TARGET_TIMEOUT_MS", default_value_t = 120_000)]
    pub target_timeout_ms: u64,
    /// How long an admitted request waits for a free target slot when every target is full (within
    /// its deadline) before RESOURCE_EXHAUSTED; UNAVAILABLE is only for no target at all.
    #[arg(long, env = "SPECD_PLACEMENT_WAIT_SECS", default_value_t = 60)]
    pub placement_wait_secs: u64,
    /// Largest prompt (or sum of chat contents) in bytes; larger requests are INVALID_ARGUMENT before
    /// anything is tokenized.
    #[arg(long, env = "SPECD_MAX_PROMPT_BYTES", default_value_t = specd_router::core::DEFAULT_MAX_PROMPT_BYTES)]
    pub max_prompt_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub router: RouterOpts,
    /// Drafter kinds to offer (default: the preset's draft model if it has one, self, ngram).
    #[arg(long, env = "SPECD_DRAFTER_KINDS", value_delimiter = ',')]
    pub drafter_kinds: Vec<String>,
    /// The target split over ranks in this process (the drafters and the trainer load their own
    /// unsplit copy when it is).
    #[command(flatten)]
    pub tp: TpArgs,
    /// Sequences the target holds at once.
    #[arg(long, env = "SPECD_CAPACITY", default_value_t = 16)]
    pub capacity: u32,
    #[command(flatten)]
    pub kv: KvArgs,
    #[command(flatten)]
    pub samples: SampleArgs,
    /// Also run a trainer (it collects the target's distillation samples, distills the self-drafter's
    /// exit on idle capacity and publishes versions that pass its gate; off by default: capturing
    /// costs the target some time per captured step).
    #[arg(long, env = "SPECD_TRAINER")]
    pub trainer: bool,
    #[command(flatten)]
    pub train: TrainArgs,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn telemetry(service: &str, args: &ServiceArgs) -> anyhow::Result<()> {
    let log_format: LogFormat = args.log_format.parse()?;
    specd_service::telemetry::init(&TelemetryConfig {
        service: service.to_string(),
        log_format,
        otlp_endpoint: args.otlp_endpoint.clone(),
    })?;
    specd_service::metrics::install()?;
    Ok(())
}

async fn store(args: &ServiceArgs, allow_memory: bool) -> anyhow::Result<Store> {
    if args.etcd.is_empty() {
        if allow_memory {
            return Ok(Store::memory());
        }
        bail!(
            "this role needs --etcd http://HOST:PORT (or SPECD_ETCD); `specd up` runs without one"
        );
    }
    Store::etcd(EtcdConfig::new(args.etcd.clone()))
        .await
        .with_context(|| format!("connecting to etcd at {}", args.etcd.join(",")))
}

pub(crate) fn instance_id(args: &ServiceArgs, role: Role) -> String {
    args.instance_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", role.as_str(), &specd_service::random_id()[..8]))
}

fn serve_options(
    args: &ServiceArgs,
    addr: SocketAddr,
    store: Store,
    shutdown: Shutdown,
) -> ServeOptions {
    ServeOptions {
        grpc_addr: addr,
        advertise: args.advertise_addr.clone(),
        store,
        lease_ttl: Duration::from_secs(args.lease_ttl.max(1)),
        drain_deadline: Duration::from_secs(args.drain_secs),
        shutdown,
    }
}

pub(crate) fn target_file(args: &ModelArgs) -> anyhow::Result<(Preset, PathBuf)> {
    let preset: Preset = args.model_preset.parse()?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| preset.target_path(&args.models_dir));
    Ok((preset, path))
}

pub(crate) fn identity(target: &LoadedModel, id: String) -> WorkerIdentity {
    WorkerIdentity {
        instance_id: id,
        model: model_id(&target.path),
        family: target.model.config().family.name().to_string(),
        fingerprint: target.tokenizer.fingerprint().to_string(),
        context: target.model.config().context,
        weights_version: String::new(),
    }
}

fn model_id(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn record(role: Role, id: &WorkerIdentity, capacity: u32, kinds: Vec<String>) -> InstanceRecord {
    InstanceRecord {
        role,
        id: id.instance_id.clone(),
        address: String::new(),
        model: id.model.clone(),
        family: id.family.clone(),
        tokenizer_fingerprint: id.fingerprint.clone(),
        capacity,
        load: 0,
        drafter_kinds: kinds,
        weights_version: None,
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_target(
    target: &LoadedModel,
    args: &ServiceArgs,
    addr: SocketAddr,
    capacity: u32,
    limits: BatchLimits,
    samples: SampleConfig,
    store: Store,
    shutdown: Shutdown,
) -> anyhow::Result<specd_worker::Running> {
    let id = identity(target, instance_id(args, Role::Target));
    let drain = Drain::new();
    let sink = if samples.rate > 0.0 {
        let (sink, rx, stats) = SampleSink::new(samples, id.model.clone());
        tokio::spawn(run_sender(
            rx,
            id.model.clone(),
            store.clone(),
            args.keepalive(),
            stats,
            shutdown.clone(),
        ));
        Some(sink)
    } else {
        None
    };
    let svc = TargetService::start(
        target.model.clone(),
        id.clone(),
        capacity,
        limits,
        sink,
        drain.clone(),
    )?;
    let load = svc.clone();
    let router = specd_service::grpc::server(args.keepalive()).add_service(
        TargetServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    serve_worker(
        router,
        specd_worker::health_name(Role::Target),
        record(Role::Target, &id, capacity, Vec::new()),
        move || load.load(),
        drain,
        serve_options(args, addr, store, shutdown),
    )
    .await
}

/// The separate draft model for `target` (`--draft-model`, else the preset's), with the trimmed head it
/// drafts with: what drafter workers serve as kind `model` and what the trainer distills for it.
pub(crate) fn draft_model(
    preset: Preset,
    margs: &ModelArgs,
    target: &LoadedModel,
) -> anyhow::Result<specd_engine::Model> {
    let path = margs
        .draft_model
        .clone()
        .or_else(|| preset.draft_path(&margs.models_dir))
        .with_context(|| {
            format!(
                "preset {} has no draft model; pass --draft-model",
                preset.name()
            )
        })?;
    let draft = load_gguf(&path)?;
    specd_engine::preset::check_pair(target, &draft)?;
    Ok(trim_draft_head(
        &draft.model,
        draft.tokenizer.stop_ids(),
        margs.draft_vocab,
    )?)
}

/// The drafter models for `kinds` (empty: the preset's default set).
pub(crate) fn drafter_models(
    kinds: &[String],
    preset: Preset,
    margs: &ModelArgs,
    target: &LoadedModel,
    share_target: bool,
) -> anyhow::Result<(DrafterModels, Vec<String>)> {
    let defaults: Vec<String> = match (preset, share_target) {
        (Preset::Qwen, true) => vec!["model".into(), "self".into(), "ngram".into()],
        (Preset::Qwen, false) => vec!["model".into(), "ngram".into()],
        (Preset::Smollm, _) => vec!["self".into(), "ngram".into()],
    };
    let kinds = if kinds.is_empty() {
        defaults
    } else {
        kinds.to_vec()
    };
    let mut models = DrafterModels {
        draft: None,
        self_drafter: None,
        ngram: false,
        context: target.model.config().context,
        vocab: target.model.config().vocab,
    };
    for k in &kinds {
        match k.as_str() {
            "model" => {
                models.draft = Some(LiveDrafter::new(
                    draft_model(preset, margs, target)?,
                    "model",
                ));
            }
            "self" => {
                let n = margs
                    .self_layers
                    .unwrap_or_else(|| default_self_layers(target.model.config().layers));
                models.self_drafter = Some(LiveDrafter::new(
                    trim_draft_head(
                        &target.model.truncated(n)?,
                        target.tokenizer.stop_ids(),
                        margs.draft_vocab,
                    )?,
                    "self",
                ));
            }
            "ngram" | "auto" => models.ngram = true,
            other => bail!("unknown drafter kind {other:?} (model, self, ngram)"),
        }
    }
    let offered = models.kinds();
    Ok((models, offered))
}

pub(crate) async fn start_drafter(
    models: DrafterModels,
    id: WorkerIdentity,
    args: &ServiceArgs,
    addr: SocketAddr,
    capacity: u32,
    store: Store,
    shutdown: Shutdown,
) -> anyhow::Result<specd_worker::Running> {
    let drain = Drain::new();
    for live in [models.draft.clone(), models.self_drafter.clone()]
        .into_iter()
        .flatten()
    {
        // Trained versions of the draft model and the self-drafter, as the trainer publishes them.
        let cfg = FollowConfig {
            model: id.model.clone(),
            reporter: id.instance_id.clone(),
            keepalive: args.keepalive(),
            fetch_timeout: Duration::from_secs(60),
        };
        tokio::spawn(specd_worker::swap::follow(
            store.clone(),
            cfg,
            live,
            shutdown.clone(),
        ));
    }
    let svc = DrafterService::new(
        models,
        id.clone(),
        capacity,
        args.stream_idle(),
        drain.clone(),
    );
    let kinds = svc.kinds();
    let load = svc.clone();
    let router = specd_service::grpc::server(args.keepalive()).add_service(
        DrafterServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    serve_worker(
        router,
        specd_worker::health_name(Role::Drafter),
        record(Role::Drafter, &id, capacity, kinds),
        move || load.active(),
        drain,
        serve_options(args, addr, store, shutdown),
    )
    .await
}

/// A started router: its addresses and the task that ends when it has drained.
pub struct RouterRunning {
    pub router: Arc<Router>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub(crate) async fn start_router(
    margs: &ModelArgs,
    args: &ServiceArgs,
    opts: &RouterOpts,
    store: Store,
    shutdown: Shutdown,
) -> anyhow::Result<RouterRunning> {
    let (preset, path) = target_file(margs)?;
    let model = ModelMeta::from_gguf(&path, vec![preset.name().to_string()])?;
    let mut cfg = RouterConfig {
        max_concurrent: opts.max_concurrent,
        max_queue: opts.max_queue,
        default_max_new_tokens: opts.default_max_new_tokens,
        max_prompt_bytes: opts.max_prompt_bytes.max(1),
        ..RouterConfig::default()
    };
    cfg.spec.max_draft_len = opts.max_draft_len.max(1);
    cfg.spec.drafter_timeout = Duration::from_millis(opts.drafter_timeout_ms.max(1));
    cfg.spec.target_timeout = Duration::from_millis(opts.target_timeout_ms.max(1));
    cfg.spec.placement_wait = Duration::from_secs(opts.placement_wait_secs);
    let pool = Pool::with_keepalive(args.keepalive());
    pool.follow(store.clone(), shutdown.clone())
        .await
        .context("reading workers from the coordination store")?;
    let drain = Drain::new();
    let router = Arc::new(Router::new(pool, model, cfg, drain.clone()));
    let id = instance_id(args, Role::Router);

    let grpc = specd_service::grpc::server(args.keepalive()).add_service(
        GenerationServer::new(specd_router::api::GenerationService::new(Arc::clone(
            &router,
        )))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let (grpc, health) = specd_service::grpc::add_common(grpc)?;
    let (listener, grpc_addr) = specd_service::grpc::bind(opts.grpc_addr).await?;
    let http_listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .with_context(|| format!("binding the HTTP address {}", opts.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let advertised = specd_worker::advertise_addr(grpc_addr, args.advertise_addr.as_deref());
    let registration = specd_coord::Registration::register(
        store.clone(),
        InstanceRecord {
            role: Role::Router,
            id: id.clone(),
            address: advertised,
            model: router.model.id.clone(),
            family: router.model.family.clone(),
            tokenizer_fingerprint: router.model.fingerprint().to_string(),
            capacity: opts.max_concurrent as u32,
            load: 0,
            drafter_kinds: Vec::new(),
            weights_version: None,
        },
        Duration::from_secs(args.lease_ttl.max(1)),
    )
    .await
    .context("registering the router")?;
    specd_service::grpc::set_serving(&health, specd_worker::health_name(Role::Router), true).await;
    let stop = Shutdown::new();
    let grpc_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            grpc.serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { stop.wait().await },
            )
            .await
        })
    };
    let http_task = {
        let stop = stop.clone();
        let app = specd_router::http::app(Arc::clone(&router));
        tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move { stop.wait().await })
                .await
        })
    };
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "router serving");
    let drain_deadline = Duration::from_secs(args.drain_secs);
    let load_router = Arc::clone(&router);
    let store = store.clone();
    let router_out = Arc::clone(&router);
    let task = tokio::spawn(async move {
        // Looked at every 50 ms, written once a second, and at once when an idle router gets work:
        // the trainer trains only while the cluster is idle and must hear of the first request
        // without waiting for the next periodic report.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut last = u32::MAX;
        let mut reported: Option<(Instant, bool)> = None;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {
                    let (running, waiting) = (load_router.admission.running(), load_router.admission.waiting());
                    let now = (running + waiting) as u32;
                    let busy = now > 0;
                    let due = match reported {
                        None => true,
                        Some((at, was_busy)) => at.elapsed() >= Duration::from_secs(1) || (busy && !was_busy),
                    };
                    if !due {
                        continue;
                    }
                    reported = Some((Instant::now(), busy));
                    if now != last && registration.update(now).await.is_ok() {
                        last = now;
                    }
                    // The cluster load the trainer reads to decide whether capacity is idle.
                    let report = specd_coord::LoadReport {
                        router: id.clone(),
                        in_flight: running as u32,
                        queue: waiting as u32,
                        at: specd_coord::records::now_unix_ms(),
                    };
                    if let Err(e) = store.put_record(&report, registration.lease()).await {
                        tracing::debug!(error = %e, "load report not written");
                    }
                }
            }
        }
        tracing::info!("router draining");
        specd_service::grpc::set_serving(&health, specd_worker::health_name(Role::Router), false)
            .await;
        let _ = registration.deregister().await;
        let left = drain.drain(drain_deadline).await;
        if left > 0 {
            tracing::warn!(left, "drain deadline passed with requests in flight");
        }
        stop.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = grpc_task.await;
            let _ = http_task.await;
        })
        .await;
        tracing::info!("router stopped");
        Ok(())
    });
    Ok(RouterRunning {
        router: router_out,
        grpc_addr,
        http_addr,
        task,
    })
}

async fn wait(task: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    task.await.context("service task panicked")?
}

/// What every role's process does around its own start-up: the kernel thread pool, the runtime, logs and
/// traces, metrics, the coordination store, signal handling (and the workers' `/metrics` endpoint), then
/// the role's `body` until it has drained; spans are flushed at the end.
fn run_role<F, Fut>(
    service: &str,
    threads: Option<usize>,
    args: &ServiceArgs,
    metrics_addr: Option<SocketAddr>,
    allow_memory: bool,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Store, Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_threads(threads)?;
    let rt = runtime()?;
    rt.block_on(async {
        telemetry(service, args)?;
        let store = store(args, allow_memory).await?;
        let shutdown = Shutdown::on_signals();
        if let Some(addr) = metrics_addr {
            specd_service::metrics::serve_http(addr, shutdown.clone()).await?;
        }
        body(store, shutdown).await
    })?;
    specd_service::telemetry::shutdown();
    Ok(())
}

/// The target, split over `tp.tp` ranks running as threads of this process when asked (rank 0 serves;
/// the group registers once, with its capacity).
fn load_target_split(path: &std::path::Path, tp: &TpArgs) -> anyhow::Result<LoadedModel> {
    let opts = tp.local_options(rayon::current_num_threads())?;
    let target = if tp.tp > 1 {
        specd_engine::tp::load_gguf_local(path, tp.tp, &opts)?
    } else {
        load_gguf(path)?
    };
    if let Some(t) = target.model.tp() {
        tracing::info!(
            ranks = tp.tp,
            threads_per_rank = opts.threads_per_rank,
            heads = ?t.plan().heads,
            "target split over tensor-parallel ranks in this process"
        );
    }
    Ok(target)
}

/// The model's config with the KV heads of every rank this process holds (a rank's config holds its
/// own), for sizing the process's KV budget: all of them when the ranks are its threads, its own when
/// the ranks are processes.
fn process_config(model: &specd_engine::Model, ranks_here: usize) -> specd_engine::ModelConfig {
    let mut cfg = model.config().clone();
    if model.tp().is_some() {
        cfg.kv_heads *= ranks_here;
        cfg.heads *= ranks_here;
    }
    cfg
}

pub fn run_target(args: TargetArgs) -> anyhow::Result<()> {
    let a = &args;
    if a.service.check_config {
        return check::target(a);
    }
    run_role(
        "specd-target",
        a.model.threads,
        &a.service,
        a.metrics_addr,
        false,
        |store, shutdown| async move {
            let (_, path) = target_file(&a.model)?;
            let rank = a.ranks.rank(&a.tp)?;
            let (target, group, ranks_here) = match &rank {
                Some(me) if me.rank > 0 => {
                    let banner = format!(
                        "tensor-parallel rank {} of {} (group {}) loaded",
                        me.rank, me.world, me.group
                    );
                    return tp::follow(
                        &path,
                        me,
                        &store,
                        shutdown,
                        Duration::from_secs(a.service.drain_secs),
                        move || println!("{banner}"),
                    )
                    .await;
                }
                Some(me) => {
                    let lease_ttl = Duration::from_secs(a.service.lease_ttl.max(1));
                    let (t, keep) = tp::lead(&path, &a.ranks, me, &store, lease_ttl).await?;
                    (t, Some(keep), 1)
                }
                None => (load_target_split(&path, &a.tp)?, None, a.tp.tp),
            };
            let running = start_target(
                &target,
                &a.service,
                a.grpc_addr,
                a.capacity,
                BatchLimits {
                    max_batch_tokens: a.max_batch_tokens,
                    prefill_chunk: a.prefill_chunk,
                    stream_idle: a.service.stream_idle(),
                    kv_tokens: Some(a.kv.budget(&process_config(&target.model, ranks_here))?),
                },
                a.samples.config()?,
                store.clone(),
                shutdown,
            )
            .await?;
            println!("target listening on {}", running.advertised);
            let r = wait(running.task).await;
            // Rank 0's model going (the last copy) shuts the group down; the record goes with it.
            drop(target);
            if let Some(keep) = group {
                tp::retire(&store, keep).await;
            }
            r
        },
    )
}

pub fn run_drafter(args: DrafterArgs) -> anyhow::Result<()> {
    let a = &args;
    if a.service.check_config {
        return check::drafter(a);
    }
    run_role(
        "specd-drafter",
        a.model.threads,
        &a.service,
        a.metrics_addr,
        false,
        |store, shutdown| async move {
            let (preset, path) = target_file(&a.model)?;
            // The drafter needs the target's tokenizer, shape and (for `self`) its first layers.
            let target = load_gguf(&path)?;
            let (models, _) = drafter_models(&a.kinds, preset, &a.model, &target, false)?;
            let id = identity(&target, instance_id(&a.service, Role::Drafter));
            drop(target);
            let running = start_drafter(
                models,
                id,
                &a.service,
                a.grpc_addr,
                a.capacity,
                store,
                shutdown,
            )
            .await?;
            println!("drafter listening on {}", running.advertised);
            wait(running.task).await
        },
    )
}

pub fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let a = &args;
    if a.service.check_config {
        return check::router_role(a);
    }
    run_role(
        "specd-router",
        None,
        &a.service,
        None,
        false,
        |store, shutdown| async move {
            let running = start_router(&a.model, &a.service, &a.router, store, shutdown).await?;
            println!(
                "router grpc {} http {}",
                running.grpc_addr, running.http_addr
            );
            wait(running.task).await
        },
    )
}

pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let a = &args;
    if a.service.check_config {
        return check::up(a);
    }
    run_role(
        "specd",
        a.model.threads,
        &a.service,
        None,
        true,
        |store, shutdown| async move {
            let args = a;
            let (preset, path) = target_file(&args.model)?;
            let target = load_gguf(&path)?;
            // The served copy, split over ranks when asked; the drafters and the trainer need the
            // unsplit one (the self-drafter's trimmed head, the trainer's exit states).
            let split = (args.tp.tp > 1)
                .then(|| load_target_split(&path, &args.tp))
                .transpose()?;
            let served = split.as_ref().unwrap_or(&target);
            let (models, kinds) =
                drafter_models(&args.drafter_kinds, preset, &args.model, &target, true)?;
            let loopback: SocketAddr = "127.0.0.1:0".parse()?;
            // The workers stop only once the router has drained (see below).
            let workers = Shutdown::new();
            let mut svc_args = args.service.clone();
            svc_args.instance_id = None;
            svc_args.advertise_addr = None;
            let t = start_target(
                served,
                &svc_args,
                loopback,
                args.capacity,
                BatchLimits {
                    stream_idle: args.service.stream_idle(),
                    kv_tokens: Some(args.kv.budget(&process_config(&served.model, args.tp.tp))?),
                    ..BatchLimits::default()
                },
                args.samples.config()?,
                store.clone(),
                workers.clone(),
            )
            .await?;
            let id = identity(&target, instance_id(&svc_args, Role::Drafter));
            let d = start_drafter(
                models,
                id,
                &svc_args,
                loopback,
                64,
                store.clone(),
                workers.clone(),
            )
            .await?;
            let trainer = if args.trainer {
                Some(
                    start_trainer(
                        model_id(&path),
                        target.model.config().vocab,
                        args.train.drafter(&target, &args.model)?,
                        &svc_args,
                        loopback,
                        &args.train,
                        store.clone(),
                        workers.clone(),
                    )
                    .await?,
                )
            } else {
                None
            };
            let r = start_router(
                &args.model,
                &args.service,
                &args.router,
                store,
                shutdown.clone(),
            )
            .await?;
            println!(
                "specd up: model {} ({}), drafters {}",
                model_id(&path),
                preset.name(),
                kinds.join(", ")
            );
            println!(
                "  gRPC    {}  (specd.v1.Generation, health, reflection)",
                r.grpc_addr
            );
            println!("  HTTP    http://{}  (OpenAI /v1/completions, /v1/chat/completions, /v1/models, /metrics, /health)", r.http_addr);
            println!("  target  {}   drafter {}", t.advertised, d.advertised);
            if let Some(tr) = &trainer {
                println!("  trainer {}", tr.advertised);
            }
            println!("Ctrl-C to stop.");
            // The router drains first (in-flight requests need the workers), then the workers stop.
            let routed = wait(r.task).await;
            workers.trigger();
            let _ = wait(d.task).await;
            let _ = wait(t.task).await;
            if let Some(tr) = trainer {
                let _ = wait(tr.task).await;
            }
            routed
        },
    )
}
