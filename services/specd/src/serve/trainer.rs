//! The trainer role: `specd trainer` and the trainer inside `specd up`: its flags, the weight store
//! and publisher it publishes through, the distillation loop and the election it campaigns in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use specd_coord::{Role, Store};
use specd_engine::exit_train::ExitConfig;
use specd_engine::lora_train::LoraConfig;
use specd_engine::preset::{default_self_layers, trim_draft_head};
use specd_engine::{load_gguf, LoadedModel};
use specd_proto::internal::v1::trainer_server::TrainerServer;
use specd_service::grpc::MAX_MESSAGE_BYTES;
use specd_service::{Drain, Shutdown};
use specd_trainer::buffer::BufferConfig;
use specd_trainer::idle::IdleGate;
use specd_trainer::publish::{GateConfig, Publisher};
use specd_trainer::service::{TrainerConfig, TrainerService};
use specd_trainer::train::TrainConfig;
use specd_trainer::weights::WeightStore;
use specd_worker::{serve_worker, WorkerIdentity};

use super::{
    instance_id, model_id, record, run_role, serve_options, target_file, wait, ServiceArgs,
};
use crate::cli::ModelArgs;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Most training positions kept per drafter kind (oldest samples go first).
    #[arg(long, env = "SPECD_BUFFER_POSITIONS", default_value_t = 200_000)]
    pub buffer_positions: usize,
    /// One sample in this many is held out for evaluation.
    #[arg(long, env = "SPECD_EVAL_EVERY", default_value_t = 10)]
    pub eval_every: u64,
    /// Optimizer steps between two held-out evaluations (each may publish).
    #[arg(long, env = "SPECD_EVAL_STEPS", default_value_t = 20)]
    pub eval_steps: u64,
    /// Drafter kind distilled: `self` (the self-drafter's exit adapter) or `model` (LoRA adapters on
    /// the separate draft model's projections, OSD's own setting; needs a draft model: the qwen preset
    /// or --draft-model).
    #[arg(long, env = "SPECD_TRAIN_KIND", default_value = "self")]
    pub train_kind: String,
    /// Rank of the draft model's LoRA adapters (kind `model`).
    #[arg(long, env = "SPECD_TRAIN_LORA_RANK", default_value_t = 8)]
    pub train_lora_rank: usize,
    /// LoRA alpha: the adapters' update is scaled by alpha / rank.
    #[arg(long, env = "SPECD_TRAIN_LORA_ALPHA", default_value_t = 16.0)]
    pub train_lora_alpha: f32,
    /// Projections given LoRA adapters: `all` or a list of q, k, v, o, gate, up, down.
    #[arg(long, env = "SPECD_TRAIN_LORA_TARGETS", default_value = "all")]
    pub train_lora_targets: String,
    /// AdamW learning rate of the LoRA adapters.
    #[arg(long, env = "SPECD_TRAIN_LORA_LR", default_value_t = 5e-4)]
    pub train_lora_lr: f64,
    /// Sequences per LoRA optimizer step.
    #[arg(long, env = "SPECD_TRAIN_LORA_BATCH", default_value_t = 2)]
    pub train_lora_batch: usize,
    /// Target layers of the self-drafter whose exit adapter is trained (default: --self-layers, else
    /// the preset's). Drafter workers refuse versions trained for another layer count.
    #[arg(long, env = "SPECD_TRAIN_LAYERS")]
    pub train_layers: Option<usize>,
    /// Rank of the exit adapter.
    #[arg(long, env = "SPECD_TRAIN_RANK", default_value_t = 16)]
    pub train_rank: usize,
    /// AdamW learning rate.
    #[arg(long, env = "SPECD_TRAIN_LR", default_value_t = 1e-3)]
    pub train_lr: f64,
    /// Distillation loss: fkl, rkl, jsd, jsd:BETA or tv.
    #[arg(long, env = "SPECD_TRAIN_LOSS", default_value = "fkl")]
    pub train_loss: String,
    /// Positions learned from: rejected (where the drafter did not supply the target's token: its
    /// draft was rejected, or it drafted nothing there; OSD's default) or all.
    #[arg(long, env = "SPECD_TRAIN_POSITIONS", default_value = "rejected")]
    pub train_positions: String,
    /// Training steps start only while requests in flight plus waiting, over all routers, are at most
    /// this.
    #[arg(long, env = "SPECD_TRAIN_MAX_LOAD", default_value_t = 0)]
    pub train_max_load: u32,
    /// Directory of published weight files (a shared volume in a cluster; kept across restarts).
    #[arg(long, env = "SPECD_WEIGHTS_DIR", default_value = "weights")]
    pub weights_dir: PathBuf,
    /// A candidate is published only if its held-out expected acceptance beats the live version's by
    /// this much.
    #[arg(long, env = "SPECD_GATE_MARGIN", default_value_t = 0.02)]
    pub gate_margin: f64,
    /// Held-out positions the gate needs before it decides.
    #[arg(long, env = "SPECD_GATE_MIN_POSITIONS", default_value_t = 128)]
    pub gate_min_positions: usize,
    /// A live acceptance this far below the parent version's rolls the live version back.
    #[arg(long, env = "SPECD_ROLLBACK_MARGIN", default_value_t = 0.1)]
    pub rollback_margin: f64,
    /// Drafted tokens each version needs in the live figures before a rollback is considered.
    #[arg(long, env = "SPECD_ROLLBACK_MIN_DRAFTED", default_value_t = 400)]
    pub rollback_min_drafted: u64,
}

impl TrainArgs {
    fn buffer(&self) -> BufferConfig {
        BufferConfig {
            max_positions: self.buffer_positions.max(1),
            max_held_out: (self.buffer_positions / 10).max(1),
            eval_every: self.eval_every,
        }
    }

    pub(crate) fn train(&self) -> anyhow::Result<TrainConfig> {
        let loss = specd_core::Loss::parse(&self.train_loss)
            .map_err(|e| anyhow::anyhow!("--train-loss: {e}"))?;
        let mask = match self.train_positions.as_str() {
            "rejected" => specd_core::PositionMask::Rejected,
            "all" => specd_core::PositionMask::All,
            other => bail!("--train-positions must be rejected or all, got {other:?}"),
        };
        if self.train_rank == 0 || !(self.train_lr > 0.0 && self.train_lr.is_finite()) {
            bail!("--train-rank must be at least 1 and --train-lr positive");
        }
        if !matches!(self.train_kind.as_str(), "self" | "model") {
            bail!(
                "--train-kind must be self or model, got {:?}",
                self.train_kind
            );
        }
        if self.train_lora_rank == 0
            || !(self.train_lora_lr > 0.0 && self.train_lora_lr.is_finite())
            || !(self.train_lora_alpha > 0.0 && self.train_lora_alpha.is_finite())
            || self.train_lora_batch == 0
        {
            bail!("--train-lora-rank and --train-lora-batch must be at least 1, --train-lora-lr and --train-lora-alpha positive");
        }
        let targets = specd_engine::lora::parse_projections(&self.train_lora_targets)
            .map_err(|e| anyhow::anyhow!("--train-lora-targets: {e}"))?;
        let fraction = |v: f64| (0.0..=1.0).contains(&v);
        if !fraction(self.gate_margin) || !fraction(self.rollback_margin) {
            bail!("--gate-margin and --rollback-margin are acceptance differences between 0 and 1");
        }
        Ok(TrainConfig {
            gate: GateConfig {
                margin: self.gate_margin,
                min_positions: self.gate_min_positions,
                rollback_margin: self.rollback_margin,
                rollback_min_drafted: self.rollback_min_drafted,
            },
            exit: ExitConfig {
                rank: self.train_rank,
                lr: self.train_lr,
                loss,
                ..ExitConfig::default()
            },
            lora: LoraConfig {
                rank: self.train_lora_rank,
                alpha: self.train_lora_alpha,
                lr: self.train_lora_lr,
                loss,
                targets,
                ..LoraConfig::default()
            },
            kind: self.train_kind.clone(),
            lora_batch: self.train_lora_batch,
            mask,
            eval_every: self.eval_steps.max(1),
            ..TrainConfig::default()
        })
    }

    /// The drafter trained, as drafter workers serve it (the same trimmed head): for kind `model` the
    /// separate draft model, else the self-drafter of `target` whose exit is trained.
    pub(crate) fn drafter(
        &self,
        target: &LoadedModel,
        margs: &ModelArgs,
    ) -> anyhow::Result<specd_engine::Model> {
        if self.train_kind == "model" {
            let (preset, _) = target_file(margs)?;
            return super::draft_model(preset, margs, target);
        }
        let layers = self
            .train_layers
            .or(margs.self_layers)
            .unwrap_or_else(|| default_self_layers(target.model.config().layers));
        let cut = target.model.truncated(layers)?;
        Ok(trim_draft_head(
            &cut,
            target.tokenizer.stop_ids(),
            margs.draft_vocab,
        )?)
    }
}

#[derive(Debug, Clone, Args)]
pub struct TrainerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// gRPC listen address.
    #[arg(long, env = "SPECD_GRPC_ADDR", default_value = "0.0.0.0:50081")]
    pub grpc_addr: SocketAddr,
    /// Prometheus /metrics and /health listen address (none: not served).
    #[arg(long, env = "SPECD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// Serves a trainer for `target` (its id `model`), campaigns for its election and runs the distillation
/// loop on `drafter` until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_trainer(
    model: String,
    vocab: usize,
    drafter: specd_engine::Model,
    args: &ServiceArgs,
    addr: SocketAddr,
    train: &TrainArgs,
    store: Store,
    shutdown: Shutdown,
) -> anyhow::Result<specd_worker::Running> {
    let cfg = train.train()?;
    let drafter_layers = drafter.config().layers;
    let weights = WeightStore::open(&train.weights_dir)
        .with_context(|| format!("opening the weight store {}", train.weights_dir.display()))?;
    let svc = TrainerService::new(TrainerConfig {
        model: model.clone(),
        vocab,
        buffer: train.buffer(),
        weights: weights.clone(),
    });
    let leader = svc.leader_flag();
    let gate = IdleGate::follow(store.clone(), train.train_max_load, shutdown.clone())
        .await
        .context("following the routers' load")?;
    let svc_handles = (
        svc.buffer_handle(),
        svc.training_handle(),
        svc.leader_flag(),
        svc.live_counts(),
    );
    let router = specd_service::grpc::server(args.keepalive()).add_service(
        TrainerServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let id = WorkerIdentity {
        instance_id: instance_id(args, Role::Trainer),
        model: model.clone(),
        ..WorkerIdentity::default()
    };
    let running = serve_worker(
        router,
        specd_worker::health_name(Role::Trainer),
        record(Role::Trainer, &id, 0, Vec::new()),
        || 0,
        Drain::new(),
        serve_options(args, addr, store.clone(), shutdown.clone()),
    )
    .await?;
    // The loop starts once the address drafters fetch from is known.
    let publishing = specd_trainer::train::Publishing {
        publisher: Publisher {
            store: store.clone(),
            weights,
            model: model.clone(),
            kind: cfg.kind.clone(),
            layers: drafter_layers,
            url: running.advertised.clone(),
            cfg: cfg.gate,
            keepalive: args.keepalive(),
        },
        runtime: tokio::runtime::Handle::current(),
    };
    specd_trainer::train::spawn(
        drafter,
        cfg,
        specd_trainer::train::Shared {
            buffer: svc_handles.0,
            status: svc_handles.1,
            leader: svc_handles.2,
            live: svc_handles.3,
        },
        gate,
        Some(publishing),
        shutdown.clone(),
    )?;
    tokio::spawn(specd_trainer::service::lead(
        store,
        model,
        running.advertised.clone(),
        Duration::from_secs(args.lease_ttl.max(1)),
        leader,
        shutdown,
    ));
    Ok(running)
}

pub fn run_trainer(args: TrainerArgs) -> anyhow::Result<()> {
    let a = &args;
    if a.service.check_config {
        return super::check::trainer(a);
    }
    run_role(
        "specd-trainer",
        a.model.threads,
        &a.service,
        a.metrics_addr,
        false,
        |store, shutdown| async move {
            let (_, path) = target_file(&a.model)?;
            // The draft model, or the target's first layers (the self-drafter whose exit is
            // distilled).
            let target = load_gguf(&path)?;
            let drafter = a.train.drafter(&target, &a.model)?;
            let running = start_trainer(
                model_id(&path),
                target.model.config().vocab,
                drafter,
                &a.service,
                a.grpc_addr,
                &a.train,
                store,
                shutdown,
            )
            .await?;
            println!("trainer listening on {}", running.advertised);
            wait(running.task).await
        },
    )
}
