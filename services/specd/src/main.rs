//! The `specd` binary: one executable, one subcommand per job.
//!
//! - `specd generate`: one prompt through the single-process engine, text streamed to stdout, a stats line
//!   to stderr.
//! - `specd loadtest`: closed-loop load against a router's gRPC API, with latency percentiles.
//! - `specd bench-cluster`: the distributed path's overhead against the single-process engine.
//! - `specd bench`: the speculation benchmark over code and prose prompts (a program that prints figures).
//! - `specd bench-kernels`: the cost of a forward as rows are added, prefill, decode and batched decode.
//! - `specd models fetch`: the pinned model files, through `scripts/fetch-models.sh`.
//! - `specd up`: a whole cluster in this process (router, drafter worker, target worker, embedded
//!   coordination store); `specd router|drafter|target --etcd URL`: one role per process.
//!
//! Every failure is a clear message on stderr and a non-zero exit, never a panic.

mod bench;
mod bench_cluster;
mod bench_kernels;
mod cli;
mod demo_osd;
mod generate;
mod loadtest;
mod serve;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Up(args) => Some(serve::run_up(args)),
        cli::Command::Router(args) => Some(serve::run_router(args)),
        cli::Command::Drafter(args) => Some(serve::run_drafter(args)),
        cli::Command::Target(args) => Some(serve::run_target(args)),
        cli::Command::Trainer(args) => Some(serve::run_trainer(args)),
        other => {
            run_local(other);
            None
        }
    };
    if let Some(Err(err)) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The single-process commands, with plain stderr logging.
fn run_local(command: cli::Command) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPECD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match command {
        cli::Command::Generate(args) => generate::run(args),
        cli::Command::Bench(args) => bench::run(args),
        cli::Command::BenchCluster(args) => bench_cluster::run(args),
        cli::Command::BenchKernels(args) => bench_kernels::run(args),
        cli::Command::Loadtest(args) => loadtest::run(args),
        cli::Command::DemoOsd(args) => demo_osd::run(args),
        cli::Command::Models(cli::ModelsCommand::Fetch(args)) => cli::fetch_models(args),
        cli::Command::Up(_)
        | cli::Command::Router(_)
        | cli::Command::Drafter(_)
        | cli::Command::Target(_)
        | cli::Command::Trainer(_) => Ok(()),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
