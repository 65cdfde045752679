//! `specd bench-kernels`: what one forward costs as rows are added, per model file, in one run. This is
//! the compute curve every other figure rests on: a verify of k drafts is a forward of k + 1 rows, a
//! decode step of B sequences a forward of B rows, a prefill chunk a forward of many.
//!
//! Printed per model: the weight bytes a step reads and the memory bandwidth one row implies; for m = 1..
//! the median forward time (after a fixed context), its multiple of one row, and the multiply-accumulate
//! rate the extra rows reach; a prefill of P tokens from an empty cache (llama-bench's pp), a decode of N
//! tokens from an empty cache (its tg), and B sequences decoded together (llama-batched-bench's S_TG). A
//! program that prints figures; nothing here asserts a speed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use specd_engine::{kernels, load_gguf, LogitsWanted, Model, Preset, SeqInput};

use crate::bench_cluster::percentile;
use crate::cli::init_threads;

fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}

#[derive(Debug, Args)]
pub struct BenchKernelsArgs {
    /// Named model pair whose files are measured (target, then draft model): qwen or smollm.
    #[arg(long, env = "SPECD_MODEL_PRESET", default_value = "qwen")]
    pub model_preset: String,
    /// Directory holding the model files.
    #[arg(long, env = "SPECD_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Measure these GGUF files instead of the preset's (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<PathBuf>,
    /// Largest row count of the cost curve.
    #[arg(long, default_value_t = 16)]
    pub rows: usize,
    /// Context already in the cache when the curve's forwards run.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Runs per point; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Prompt tokens of the prefill figure (0 skips it).
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Rows per prefill forward (the target worker's default chunk).
    #[arg(long, default_value_t = 128)]
    pub prefill_chunk: usize,
    /// Tokens of the decode figure (0 skips it).
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Sequence counts of the batched-decode figure (comma-separated; empty skips it).
    #[arg(long, default_value = "1,4,8,16", value_parser = parse_counts)]
    pub batch: Counts,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, env = "SPECD_THREADS")]
    pub threads: Option<usize>,
    /// Print one JSON document instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// A comma-separated list of counts; the empty string is the empty list.
#[derive(Debug, Clone)]
pub struct Counts(pub Vec<usize>);

fn parse_counts(s: &str) -> Result<Counts, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse().map_err(|e| format!("{c:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(Counts)
}

#[derive(Debug, Serialize)]
struct Report {
    /// Kernels in use: "avx512-vnni", "avx2" or "scalar".
    isa: &'static str,
    threads: usize,
    models: Vec<ModelReport>,
}

#[derive(Debug, Serialize)]
struct ModelReport {
    file: String,
    weight_bytes: usize,
    /// Multiply-accumulates of one row through every matrix (attention over the context excluded).
    macs_per_row: u64,
    context: usize,
    curve: Vec<CurvePoint>,
    /// Weight bytes over the one-row forward time.
    one_row_gb_s: f64,
    prefill: Option<Rate>,
    decode: Option<Rate>,
    batched: Vec<BatchPoint>,
}

#[derive(Debug, Serialize)]
struct CurvePoint {
    rows: usize,
    ms: f64,
    x_one_row: f64,
    /// Multiply-accumulates of the rows beyond the first over the time they add (None for one row).
    extra_rows_gmac_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Rate {
    tokens: usize,
    tok_s: f64,
}

#[derive(Debug, Serialize)]
struct BatchPoint {
    sequences: usize,
    /// Tokens decoded per second over all sequences.
    tok_s: f64,
    x_one_sequence: f64,
}

pub fn run(args: BenchKernelsArgs) -> anyhow::Result<()> {
    if args.rows == 0 || args.reps == 0 {
        bail!("--rows and --reps must be at least 1");
    }
    if args.batch.0.contains(&0) {
        bail!("--batch counts must be at least 1");
    }
    init_threads(args.threads)?;
    let files = if args.model.is_empty() {
        let preset: Preset = args.model_preset.parse()?;
        let mut f = vec![preset.target_path(&args.models_dir)];
        f.extend(preset.draft_path(&args.models_dir));
        f
    } else {
        args.model.clone()
    };
    let isa = if kernels::vnni() {
        "avx512-vnni"
    } else if kernels::available() {
        "avx2"
    } else {
        "scalar"
    };
    let mut report = Report {
        isa,
        threads: rayon::current_num_threads(),
        models: Vec::new(),
    };
    for file in &files {
        let m = measure(file, &args).with_context(|| format!("measuring {}", file.display()))?;
        if !args.json {
            print_model(&m);
        }
        report.models.push(m);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("kernels: {isa}, {} threads", report.threads);
    }
    Ok(())
}

/// Token ids that are valid for any vocabulary of at least 1000 (spread so the embedding rows differ).
fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed + i * 7) % vocab as u32)
        .collect()
}

fn macs_per_row(model: &Model) -> u64 {
    let w = model.weights();
    let mut macs: u64 = w
        .layers
        .iter()
        .flat_map(|l| l.matrices())
        .map(|(_, q)| (q.rows() * q.cols()) as u64)
        .sum();
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    macs += (head.rows() * head.cols()) as u64;
    macs
}

fn measure(file: &Path, args: &BenchKernelsArgs) -> anyhow::Result<ModelReport> {
    let loaded = load_gguf(file)?;
    let model = &loaded.model;
    let vocab = model.config().vocab;
    let macs = macs_per_row(model);
    let weight_bytes = model.weights().nbytes();

    let mut cache = model.new_cache();
    model.forward(
        &mut cache,
        &tokens(args.context, 1000, vocab),
        LogitsWanted::None,
    )?;
    let base = cache.len();
    let mut curve: Vec<CurvePoint> = Vec::new();
    for m in 1..=args.rows {
        let toks = tokens(m, 2000, vocab);
        let mut times = Vec::with_capacity(args.reps);
        for _ in 0..args.reps {
            let t = Instant::now();
            model.forward(&mut cache, &toks, LogitsWanted::All)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            cache.truncate(base);
        }
        let ms = median(times);
        let one = curve.first().map_or(ms, |p| p.ms);
        curve.push(CurvePoint {
            rows: m,
            ms,
            x_one_row: ms / one,
            extra_rows_gmac_s: (m > 1 && ms > one)
                .then(|| (m - 1) as f64 * macs as f64 / ((ms - one) * 1e-3) / 1e9),
        });
    }
    let one_row_gb_s = weight_bytes as f64 / (curve[0].ms * 1e-3) / 1e9;

    let prefill = (args.prefill > 0)
        .then(|| -> anyhow::Result<Rate> {
            let prompt = tokens(args.prefill, 3000, vocab);
            let mut times = Vec::new();
            for _ in 0..args.reps.min(3) {
                let mut c = model.new_cache();
                let t = Instant::now();
                let chunks: Vec<&[u32]> = prompt.chunks(args.prefill_chunk.max(1)).collect();
                for (i, chunk) in chunks.iter().enumerate() {
                    let wanted = if i + 1 == chunks.len() {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    };
                    model.forward(&mut c, chunk, wanted)?;
                }
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(Rate {
                tokens: args.prefill,
                tok_s: args.prefill as f64 / median(times),
            })
        })
        .transpose()?;

    let decode = (args.decode > 0)
        .then(|| -> anyhow::Result<Rate> {
            let mut c = model.new_cache();
            let t = Instant::now();
            let mut tok = 1000u32 % vocab as u32;
            for i in 0..args.decode {
                model.forward(&mut c, &[tok], LogitsWanted::Last)?;
                tok = (tok + 7 + i as u32) % vocab as u32;
            }
            Ok(Rate {
                tokens: args.decode,
                tok_s: args.decode as f64 / t.elapsed().as_secs_f64(),
            })
        })
        .transpose()?;

    // B sequences, each with a 64-token prompt, decoding 32 tokens together (llama-batched-bench -npp 64).
    let mut batched: Vec<BatchPoint> = Vec::new();
    for &b in &args.batch.0 {
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        for (i, c) in caches.iter_mut().enumerate() {
            model.forward(c, &tokens(64, 4000 + i as u32, vocab), LogitsWanted::None)?;
        }
        let steps = 32;
        let feed: Vec<Vec<u32>> = (0..b).map(|i| tokens(1, 5000 + i as u32, vocab)).collect();
        let t = Instant::now();
        for _ in 0..steps {
            let mut batch: Vec<SeqInput<'_>> = caches
                .iter_mut()
                .zip(&feed)
                .map(|(cache, toks)| SeqInput {
                    cache,
                    tokens: toks,
                    wanted: LogitsWanted::Last,
                })
                .collect();
            model.forward_batch(&mut batch)?;
        }
        let tok_s = (b * steps) as f64 / t.elapsed().as_secs_f64();
        let one = batched.first().map_or(tok_s, |p| p.tok_s);
        batched.push(BatchPoint {
            sequences: b,
            tok_s,
            x_one_sequence: tok_s / one,
        });
    }

    Ok(ModelReport {
        file: file.display().to_string(),
        weight_bytes,
        macs_per_row: macs,
        context: args.context,
        curve,
        one_row_gb_s,
        prefill,
        decode,
        batched,
    })
}

fn print_model(m: &ModelReport) {
    println!(
        "{}: {:.0} MB of weights, {:.2} GMAC per row; one row reads at {:.1} GB/s",
        m.file,
        m.weight_bytes as f64 / 1e6,
        m.macs_per_row as f64 / 1e9,
        m.one_row_gb_s
    );
    println!(
        "{:>5} {:>10} {:>10} {:>16}   (after {} tokens of context)",
        "rows", "ms", "x one row", "extra GMAC/s", m.context
    );
    for p in &m.curve {
        let g = p
            .extra_rows_gmac_s
            .map_or_else(|| "-".to_string(), |g| format!("{g:.0}"));
        println!(
            "{:>5} {:>10.2} {:>10.2} {:>16}",
            p.rows, p.ms, p.x_one_row, g
        );
    }
    if let Some(p) = &m.prefill {
        println!("prefill pp{}: {:.1} tok/s", p.tokens, p.tok_s);
    }
    if let Some(d) = &m.decode {
        println!("decode tg{}: {:.1} tok/s", d.tokens, d.tok_s);
    }
    for b in &m.batched {
        println!(
            "batched decode, {:>2} sequences: {:>7.1} tok/s ({:.2}x one)",
            b.sequences, b.tok_s, b.x_one_sequence
        );
    }
    println!();
}
