//! `--check-config`: every role's flags (and `SPECD_*` variables) parsed and validated without starting
//! anything, touching a file or dialling the network, so a deployment (the Helm chart's rendered
//! containers, the compose file) can be checked against the binary that will run it.
//!
//! What clap cannot express is checked here with the same rules the roles apply at start-up; what
//! needs the model file (layer counts, the draft model's vocabulary) is checked when it loads.

use anyhow::{bail, Context};
use specd_engine::preset::Preset;
use specd_service::telemetry::LogFormat;

use super::{DrafterArgs, RouterArgs, ServiceArgs, TargetArgs, TrainerArgs, UpArgs};
use crate::cli::ModelArgs;

/// Drafter kinds a drafter worker can offer.
const KINDS: [&str; 3] = ["model", "self", "ngram"];

fn service(args: &ServiceArgs, needs_etcd: bool) -> anyhow::Result<()> {
    args.log_format.parse::<LogFormat>()?;
    if needs_etcd && args.etcd.is_empty() {
        bail!("this role needs --etcd http://HOST:PORT (or SPECD_ETCD)");
    }
    for endpoint in &args.etcd {
        let rest = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(endpoint);
        host_port(rest)
            .with_context(|| format!("--etcd {endpoint:?}: expected http://HOST:PORT"))?;
    }
    if let Some(addr) = &args.advertise_addr {
        host_port(addr)
            .with_context(|| format!("--advertise-addr {addr:?}: expected HOST:PORT"))?;
    }
    if args.lease_ttl == 0 {
        bail!("--lease-ttl must be at least 1 second");
    }
    if args.keepalive_secs == 0 || args.keepalive_timeout_secs == 0 {
        bail!("--keepalive-secs and --keepalive-timeout-secs must be at least 1");
    }
    Ok(())
}

/// `HOST:PORT` with a non-empty host and a port number.
fn host_port(s: &str) -> anyhow::Result<()> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => bail!("not HOST:PORT"),
    }
}

fn model(args: &ModelArgs) -> anyhow::Result<()> {
    args.model_preset.parse::<Preset>()?;
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if args.self_layers == Some(0) {
        bail!("--self-layers must be at least 1");
    }
    Ok(())
}

fn kinds(kinds: &[String]) -> anyhow::Result<()> {
    for k in kinds {
        if !KINDS.contains(&k.as_str()) {
            bail!(
                "unknown drafter kind {k:?} (expected one of {})",
                KINDS.join(", ")
            );
        }
    }
    Ok(())
}

fn positive(name: &str, value: u64) -> anyhow::Result<()> {
    if value == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(())
}

fn router(opts: &super::RouterOpts) -> anyhow::Result<()> {
    positive("--max-concurrent", opts.max_concurrent as u64)?;
    positive("--max-draft-len", opts.max_draft_len as u64)?;
    positive("--drafter-timeout-ms", opts.drafter_timeout_ms)?;
    positive("--target-timeout-ms", opts.target_timeout_ms)?;
    positive("--max-prompt-bytes", opts.max_prompt_bytes as u64)
}

fn ok(role: &str) -> anyhow::Result<()> {
    println!("specd {role}: configuration ok");
    Ok(())
}

pub fn target(a: &TargetArgs) -> anyhow::Result<()> {
    service(&a.service, true)?;
    model(&a.model)?;
    positive("--capacity", a.capacity.into())?;
    positive("--max-batch-tokens", a.max_batch_tokens as u64)?;
    positive("--prefill-chunk", a.prefill_chunk as u64)?;
    a.kv.check()?;
    a.samples.config()?;
    a.tp.local_options(1)?;
    a.ranks.rank(&a.tp)?;
    ok("target")
}

pub fn drafter(a: &DrafterArgs) -> anyhow::Result<()> {
    service(&a.service, true)?;
    model(&a.model)?;
    positive("--capacity", a.capacity.into())?;
    kinds(&a.kinds)?;
    ok("drafter")
}

pub fn router_role(a: &RouterArgs) -> anyhow::Result<()> {
    service(&a.service, true)?;
    model(&a.model)?;
    router(&a.router)?;
    ok("router")
}

pub fn trainer(a: &TrainerArgs) -> anyhow::Result<()> {
    service(&a.service, true)?;
    model(&a.model)?;
    a.train.train()?;
    ok("trainer")
}

pub fn up(a: &UpArgs) -> anyhow::Result<()> {
    service(&a.service, false)?;
    model(&a.model)?;
    router(&a.router)?;
    positive("--capacity", a.capacity.into())?;
    kinds(&a.drafter_kinds)?;
    a.kv.check()?;
    a.samples.config()?;
    a.tp.local_options(1)?;
    if a.trainer {
        a.train.train()?;
    }
    ok("up")
}
