//! The `specd` binary: one executable, one subcommand per job.
//!
//! - `specd generate`: one prompt through the single-process engine, text streamed to stdout, a stats line
//!   to stderr.
//! - `specd bench`: the speculation benchmark over code and prose prompts (a program that prints figures).
//! - `specd models fetch`: the pinned model files, through `scripts/fetch-models.sh`.
//!
//! Every failure is a clear message on stderr and a non-zero exit, never a panic.

mod bench;
mod cli;
mod generate;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPECD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.command {
        cli::Command::Generate(args) => generate::run(args),
        cli::Command::Bench(args) => bench::run(args),
        cli::Command::Models(cli::ModelsCommand::Fetch(args)) => cli::fetch_models(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
