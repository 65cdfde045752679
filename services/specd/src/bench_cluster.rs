//! `specd bench-cluster`: what the distributed path costs against the single-process engine.
//!
//! One process runs both: the engine's `Generator` directly, and a cluster of the same models as in
//! `specd up` (target and drafter workers as gRPC servers on loopback, a router, the embedded store),
//! with each prompt run through both, interleaved, so the machine's noise weighs on both alike. Reported:
//! decode tok/s of each and their ratio, the router's per-step overhead (step wall time at the router
//! minus the time the workers report for their own work: gRPC hops, serialization, router logic) at
//! p50/p99, and the round trip of a trivial call on the public gRPC API.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use specd_core::SamplingParams;
use specd_engine::drafter::DrafterKind;
use specd_engine::preset::build_drafter;
use specd_engine::{load_gguf, GenerateOptions, Generator};
use specd_proto::v1::generation_client::GenerationClient;
use specd_router::core::{ApiRequest, Input};
use specd_service::Shutdown;

use crate::bench::{machine_description, CODE_PROMPTS, PROSE_PROMPTS};
use crate::cli::{init_threads, ModelArgs};
use crate::generate::{prompt_ids, round};
use crate::serve::{self, RouterOpts, ServiceArgs};

#[derive(Debug, Args)]
pub struct BenchClusterArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Drafters to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "none,auto")]
    pub drafters: Vec<String>,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts per set (default: all).
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Row {
    drafter: String,
    set: String,
    single_tok_s: f64,
    cluster_tok_s: f64,
    ratio: f64,
    overhead_ms_p50: f64,
    overhead_ms_p99: f64,
    steps: usize,
    equal: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    max_new_tokens: usize,
    grpc_hop_ms_p50: f64,
    grpc_hop_ms_p99: f64,
    rows: Vec<Row>,
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

pub fn run(args: BenchClusterArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads)?;
    let rt = serve::runtime()?;
    let service = ServiceArgs {
        etcd: Vec::new(),
        instance_id: None,
        advertise_addr: None,
        lease_ttl: 10,
        drain_secs: 5,
        log_format: "text".into(),
        otlp_endpoint: None,
        keepalive_secs: 10,
        keepalive_timeout_secs: 5,
        stream_idle_secs: 300,
        check_config: false,
    };
    rt.block_on(async {
        specd_service::metrics::install()?;
        let (preset, path) = serve::target_file(&args.model)?;
        let target = load_gguf(&path)?;
        let draft = match preset.draft_path(&args.model.models_dir) {
            Some(p) if args.drafters.iter().any(|d| d == "model") => Some(load_gguf(&p)?),
            _ => None,
        };
        let store = specd_coord::Store::memory();
        let shutdown = Shutdown::new();
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let t = serve::start_target(
            &target,
            &service,
            loopback,
            16,
            specd_worker::target::BatchLimits::default(),
            // No trainer in a benchmark: nothing to capture for.
            specd_worker::samples::SampleConfig {
                rate: 0.0,
                ..Default::default()
            },
            store.clone(),
            shutdown.clone(),
        ).await?;
        let (models, _) = serve::drafter_models(&[], preset, &args.model, &target, true)?;
        let id = serve::identity(&target, serve::instance_id(&service, specd_coord::Role::Drafter));
        let d = serve::start_drafter(models, id, &service, loopback, 64, store.clone(), shutdown.clone()).await?;
        let opts = RouterOpts {
            grpc_addr: loopback,
            http_addr: loopback,
            max_concurrent: 8,
            max_queue: 8,
            default_max_new_tokens: 256,
            max_draft_len: 8,
            drafter_timeout_ms: 5000,
            target_timeout_ms: 120_000,
            placement_wait_secs: 60,
            max_prompt_bytes: specd_router::core::DEFAULT_MAX_PROMPT_BYTES,
        };
        let r = serve::start_router(&args.model, &service, &opts, store, shutdown.clone()).await?;
        let router = r.router.clone();
        // The router must see both workers before timing starts.
        let ready = Instant::now();
        while router.pool.workers(specd_coord::Role::Target).is_empty()
            || router.pool.workers(specd_coord::Role::Drafter).is_empty()
        {
            anyhow::ensure!(ready.elapsed() < Duration::from_secs(10), "workers never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The public gRPC hop: a call that does no model work.
        let mut client = GenerationClient::connect(format!("http://{}", r.grpc_addr)).await?;
        let mut hops = Vec::new();
        for i in 0..300 {
            let t0 = Instant::now();
            client.list_models(specd_proto::v1::ListModelsRequest {}).await?;
            if i >= 20 {
                hops.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }

        let take = args.prompts.unwrap_or(usize::MAX);
        let params = SamplingParams::greedy();
        let mut rows = Vec::new();
        for drafter in &args.drafters {
            let kind: DrafterKind = drafter.parse()?;
            let built = build_drafter(kind, &target, draft.as_ref(), args.model.draft_options())?;
            let mut single = Generator::new(target.model.clone(), built);
            let mut opts = GenerateOptions::new(args.max_new_tokens, params.clone());
            opts.stop_ids = target.tokenizer.stop_ids().to_vec();
            for (set, prompts) in [("code", CODE_PROMPTS), ("prose", PROSE_PROMPTS)] {
                let mut row = Row {
                    drafter: drafter.clone(),
                    set: set.into(),
                    equal: true,
                    ..Row::default()
                };
                let (mut s_tok, mut s_ms, mut c_tok, mut c_ms) = (0usize, 0.0, 0usize, 0.0);
                let mut overhead = Vec::new();
                for (i, text) in prompts.iter().take(take).enumerate() {
                    let ids = prompt_ids(&target, text, false)?;
                    // Warm-up on the first prompt of the first set, for both paths.
                    if i == 0 && set == "code" {
                        single.generate(&ids, &GenerateOptions::new(4, params.clone()), |_| true)?;
                        let mut warm = api(text, drafter, 4);
                        warm.max_new_tokens = 4;
                        let p = router.prepare(warm, "bench").map_err(|s| anyhow::anyhow!("{s}"))?;
                        router.execute(p, None, None, "bench").await.map_err(|s| anyhow::anyhow!("{s}"))?;
                    }
                    let (s_out, stats) = single.generate(&ids, &opts, |_| true)?;
                    s_tok += stats.generated.saturating_sub(1);
                    s_ms += stats.decode_ms;
                    let mut p = router
                        .prepare(api(text, drafter, args.max_new_tokens as u32), "bench")
                        .map_err(|s| anyhow::anyhow!("{s}"))?;
                    router.tokenize_prepared(&mut p).await.map_err(|s| anyhow::anyhow!("{s}"))?;
                    anyhow::ensure!(p.gen.prompt_ids == ids, "router and engine tokenize differently");
                    let c = router
                        .execute(p, None, None, "bench")
                        .await
                        .map_err(|s| anyhow::anyhow!("cluster request: {s}"))?;
                    c_tok += c.token_ids.len().saturating_sub(1);
                    c_ms += c.timings.total_ms - c.timings.ttft_ms;
                    row.equal &= c.token_ids == s_out;
                    row.steps += c.stats.steps as usize;
                    overhead.extend(c.stats.overhead_ms.iter().skip(1));
                }
                row.single_tok_s = round(s_tok as f64 / (s_ms / 1000.0).max(1e-9));
                row.cluster_tok_s = round(c_tok as f64 / (c_ms / 1000.0).max(1e-9));
                row.ratio = round(row.cluster_tok_s / row.single_tok_s.max(1e-9));
                row.overhead_ms_p50 = round(percentile(&mut overhead, 0.5));
                row.overhead_ms_p99 = round(percentile(&mut overhead, 0.99));
                rows.push(row);
            }
        }
        shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = r.task.await;
            let _ = d.task.await;
            let _ = t.task.await;
        })
        .await;
        let report = Report {
            machine: machine_description(),
            max_new_tokens: args.max_new_tokens,
            grpc_hop_ms_p50: round(percentile(&mut hops, 0.5)),
            grpc_hop_ms_p99: round(percentile(&mut hops, 0.99)),
            rows,
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report).context("JSON")?);
        } else {
            println!(
                "specd bench-cluster: {}, {} new tokens, greedy; single process vs cluster on loopback",
                report.machine, report.max_new_tokens
            );
            println!(
                "{:<8} {:<6} {:>10} {:>11} {:>7} {:>13} {:>13} {:>6} {:>6}",
                "drafter", "set", "single t/s", "cluster t/s", "ratio", "ovh p50 ms", "ovh p99 ms", "steps", "equal"
            );
            for r in &report.rows {
                println!(
                    "{:<8} {:<6} {:>10.2} {:>11.2} {:>6.3}x {:>13.3} {:>13.3} {:>6} {:>6}",
                    r.drafter, r.set, r.single_tok_s, r.cluster_tok_s, r.ratio, r.overhead_ms_p50,
                    r.overhead_ms_p99, r.steps, r.equal
                );
            }
            println!(
                "public gRPC hop (ListModels round trip on loopback): p50 {:.3} ms, p99 {:.3} ms",
                report.grpc_hop_ms_p50, report.grpc_hop_ms_p99
            );
        }
        Ok(())
    })
}

fn api(text: &str, drafter: &str, max_new: u32) -> ApiRequest {
    ApiRequest {
        input: Some(Input::Prompt {
            text: text.to_string(),
            raw: false,
        }),
        max_new_tokens: max_new,
        temperature: Some(0.0),
        drafter: drafter.to_string(),
        ..ApiRequest::default()
    }
}
