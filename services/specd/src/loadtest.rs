//! `specd loadtest`: a closed-loop load generator against a router's public gRPC API (what ghz does,
//! plus token-level figures ghz cannot see).
//!
//! For each concurrency level, that many clients each stream requests back to back (`GenerateStream`,
//! prompts taken in turn from the benchmark's code and prose sets; `--think-ms` pauses each client
//! between two of its requests, so the cluster has idle gaps, as a trainer waiting for idle capacity
//! needs) until the level's request count is done, then it prints: requests/s, generated tokens/s
//! (aggregate), time to first token, end-to-end latency and time per output token at p50/p95/p99,
//! errors by gRPC code, and the drafted/accepted counts the router reported.
//!
//! With `--ghz-config FILE` it runs a ghz scenario file instead (see [`ghz`]) and writes ghz's JSON
//! report shape and an HTML report ([`html`]).

mod ghz;
mod html;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use specd_proto::v1::generate_request::Input;
use specd_proto::v1::generation_client::GenerationClient;
use specd_proto::v1::GenerateRequest;
use tokio::sync::Mutex;

use crate::bench::{CODE_PROMPTS, PROSE_PROMPTS};

#[derive(Debug, Args)]
pub struct LoadtestArgs {
    /// Router gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Concurrency levels to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Drafter to ask for.
    #[arg(long, default_value = "auto")]
    pub drafter: String,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Per-request deadline in seconds (sent as grpc-timeout).
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Pause of each client between two of its requests, in ms (0: back to back).
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Exit non-zero unless every request succeeded.
    #[arg(long)]
    pub require_ok: bool,
    /// Run a ghz scenario file (ghz's JSON config keys) instead of the concurrency levels.
    #[arg(long)]
    pub ghz_config: Option<std::path::PathBuf>,
    /// Override a key of the ghz scenario, as ghz's flags override its config (KEY=VALUE, VALUE as
    /// JSON or a string; repeatable), for example --set total=4 --set host=127.0.0.1:50051.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Write the ghz-shaped JSON report of a scenario here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// Write the HTML report of a scenario here.
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
    /// Validate the arguments (and a scenario file) and exit without sending anything.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Default, Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    wall_s: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p95: f64,
    ttft_ms_p99: f64,
    latency_ms_p50: f64,
    latency_ms_p95: f64,
    latency_ms_p99: f64,
    tpot_ms_p50: f64,
    tpot_ms_p95: f64,
    tpot_ms_p99: f64,
    drafted: u64,
    accepted: u64,
}

#[derive(Debug, Default)]
struct Samples {
    ttft: Vec<f64>,
    latency: Vec<f64>,
    tpot: Vec<f64>,
    tokens: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    drafted: u64,
    accepted: u64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn prompt(i: usize) -> &'static str {
    let all: Vec<&str> = CODE_PROMPTS.iter().chain(PROSE_PROMPTS).copied().collect();
    all[i % all.len()]
}

async fn one(
    client: &mut GenerationClient<tonic::transport::Channel>,
    args: &LoadtestArgs,
    i: usize,
    samples: &Mutex<Samples>,
) {
    let mut req = tonic::Request::new(GenerateRequest {
        input: Some(Input::Prompt(prompt(i).to_string())),
        max_new_tokens: args.max_new_tokens,
        temperature: Some(args.temperature),
        drafter: args.drafter.clone(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(args.timeout_secs));
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut tokens = 0usize;
    let result = async {
        let mut stream = client.generate_stream(req).await?.into_inner();
        let mut last = None;
        while let Some(m) = stream.message().await? {
            if !m.token_ids.is_empty() && first.is_none() {
                first = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
            tokens += m.token_ids.len();
            if m.finish_reason.is_some() {
                last = Some(m);
            }
        }
        Ok::<_, tonic::Status>(last)
    }
    .await;
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    let mut s = samples.lock().await;
    match result {
        Ok(Some(last)) => {
            s.ok += 1;
            s.tokens += tokens;
            s.latency.push(total);
            if let Some(f) = first {
                s.ttft.push(f);
                if tokens > 1 {
                    s.tpot.push((total - f) / (tokens - 1) as f64);
                }
            }
            if let Some(spec) = last.speculation {
                s.drafted += u64::from(spec.drafted);
                s.accepted += u64::from(spec.accepted);
            }
        }
        Ok(None) => *s.errors.entry("NO_FINISH".into()).or_default() += 1,
        Err(e) => {
            *s.errors
                .entry(specd_router::core::code_name(e.code()).into())
                .or_default() += 1
        }
    }
}

pub fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.ghz_config {
        return run_scenario(path, &args);
    }
    if args.check_config {
        if args.addr.is_empty() || args.requests == 0 {
            anyhow::bail!("--addr and at least one request are needed");
        }
        println!("specd loadtest: configuration ok");
        return Ok(());
    }
    let rt = crate::serve::runtime()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?
            .connect()
            .await
            .with_context(|| format!("connecting to the router at {}", args.addr))?;
        let args = Arc::new(args);
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            let c = c.max(1);
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let samples = Arc::new(Mutex::new(Samples::default()));
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (args, next, samples) = (Arc::clone(&args), Arc::clone(&next), Arc::clone(&samples));
                let mut client = GenerationClient::new(channel.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= args.requests {
                            return;
                        }
                        if i >= c && args.think_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
                        }
                        one(&mut client, &args, i, &samples).await;
                    }
                }));
            }
            for t in tasks {
                t.await.context("load client panicked")?;
            }
            let wall = t0.elapsed().as_secs_f64();
            let mut s = std::mem::take(&mut *samples.lock().await);
            levels.push(Level {
                concurrency: c,
                requests: args.requests,
                ok: s.ok,
                errors: s.errors.clone(),
                wall_s: crate::generate::round(wall),
                requests_per_s: crate::generate::round(s.ok as f64 / wall),
                tokens_per_s: crate::generate::round(s.tokens as f64 / wall),
                ttft_ms_p50: crate::generate::round(pct(&mut s.ttft, 0.5)),
                ttft_ms_p95: crate::generate::round(pct(&mut s.ttft, 0.95)),
                ttft_ms_p99: crate::generate::round(pct(&mut s.ttft, 0.99)),
                latency_ms_p50: crate::generate::round(pct(&mut s.latency, 0.5)),
                latency_ms_p95: crate::generate::round(pct(&mut s.latency, 0.95)),
                latency_ms_p99: crate::generate::round(pct(&mut s.latency, 0.99)),
                tpot_ms_p50: crate::generate::round(pct(&mut s.tpot, 0.5)),
                tpot_ms_p95: crate::generate::round(pct(&mut s.tpot, 0.95)),
                tpot_ms_p99: crate::generate::round(pct(&mut s.tpot, 0.99)),
                drafted: s.drafted,
                accepted: s.accepted,
            });
        }
        let failed: usize = levels.iter().map(|l| l.requests - l.ok).sum();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&levels)?);
            return require(args.require_ok, failed);
        }
        println!(
            "specd loadtest: {} requests per level, {} new tokens, drafter {}, temperature {}",
            args.requests, args.max_new_tokens, args.drafter, args.temperature
        );
        println!(
            "{:>5} {:>4} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  errors",
            "conc", "ok", "req/s", "tok/s", "ttft p50", "ttft p99", "lat p50", "lat p95", "lat p99", "tpot p50", "tpot p99", "accept"
        );
        for l in &levels {
            let acc = if l.drafted > 0 { l.accepted as f64 / l.drafted as f64 } else { 0.0 };
            println!(
                "{:>5} {:>4} {:>7.2} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>8.3}  {:?}",
                l.concurrency, l.ok, l.requests_per_s, l.tokens_per_s, l.ttft_ms_p50, l.ttft_ms_p99,
                l.latency_ms_p50, l.latency_ms_p95, l.latency_ms_p99, l.tpot_ms_p50, l.tpot_ms_p99, acc,
                l.errors
            );
        }
        require(args.require_ok, failed)
    })
}

fn require(require_ok: bool, failed: usize) -> anyhow::Result<()> {
    if require_ok && failed > 0 {
        anyhow::bail!("{failed} request(s) did not succeed");
    }
    Ok(())
}

/// `--ghz-config`: one scenario, ghz's summary on stdout, the JSON and HTML reports where asked (also
/// where the scenario's own `format`/`output` keys say).
fn run_scenario(path: &std::path::Path, args: &LoadtestArgs) -> anyhow::Result<()> {
    let sc = ghz::Scenario::load(path, &args.set)?;
    if args.check_config {
        println!("specd loadtest: scenario {} ok", path.display());
        return Ok(());
    }
    let sc = Arc::new(sc);
    let rt = crate::serve::runtime()?;
    let (results, wall, reason) = rt.block_on(ghz::run(Arc::clone(&sc)))?;
    let report = ghz::report(&sc, &results, wall, reason);
    let (mut json_out, mut html_out) = (args.output.clone(), args.html.clone());
    match (sc.format.as_deref(), &sc.output) {
        (Some("json" | "pretty"), Some(o)) if json_out.is_none() => json_out = Some(o.clone()),
        (Some("html"), Some(o)) if html_out.is_none() => html_out = Some(o.clone()),
        _ => {}
    }
    if let Some(p) = &json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &html_out {
        let starts: Vec<(f64, f64, bool)> = results
            .iter()
            .map(|r| {
                (
                    r.start.as_secs_f64(),
                    r.latency.as_secs_f64() * 1e3,
                    r.error.is_empty(),
                )
            })
            .collect();
        std::fs::write(p, html::page(&report, &starts))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", ghz::summary(&sc, &report));
    }
    let failed = results.iter().filter(|r| !r.error.is_empty()).count();
    require(args.require_ok, failed)
}
