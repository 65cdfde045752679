//! `specd bench`: every speculation config on code and prose prompts, greedy, in one process and one run,
//! so the ratios between configs are measured under the same conditions. Prints a table or one JSON
//! document. It is a program that prints figures, not a test: nothing here asserts a speed.

use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use specd_core::SamplingParams;
use specd_engine::drafter::DrafterKind;
use specd_engine::preset::{build_drafter, check_pair};
use specd_engine::{load_gguf, GenerateOptions, Generator, LoadedModel};

use crate::cli::{init_threads, BenchArgs};
use crate::generate::{load_target, prompt_ids, round};

/// Code prompts: editing and completing code the prompt already shows, the traffic a coding assistant
/// sees most.
pub(crate) const CODE_PROMPTS: &[&str] = &[
    "Add type hints and a docstring to this Python function, and return the whole function:\n\n\
def merge_intervals(intervals):\n    intervals = sorted(intervals, key=lambda x: x[0])\n    merged = []\n    \
for start, end in intervals:\n        if merged and start <= merged[-1][1]:\n            \
merged[-1][1] = max(merged[-1][1], end)\n        else:\n            merged.append([start, end])\n    return merged\n",
    "Rename the variable `cnt` to `count` everywhere in this Rust code and show the full result:\n\n\
fn histogram(words: &[&str]) -> std::collections::HashMap<String, usize> {\n    \
let mut cnt = std::collections::HashMap::new();\n    for w in words {\n        \
*cnt.entry(w.to_lowercase()).or_insert(0) += 1;\n    }\n    cnt\n}\n",
    "Write a Python function `is_prime(n)` that checks whether n is prime, with a short docstring.",
    "Convert this JavaScript function to TypeScript with explicit types, keeping the logic the same:\n\n\
function groupBy(items, key) {\n  const out = {};\n  for (const item of items) {\n    \
const k = item[key];\n    if (!out[k]) out[k] = [];\n    out[k].push(item);\n  }\n  return out;\n}\n",
];

/// Prose prompts.
pub(crate) const PROSE_PROMPTS: &[&str] = &[
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarize the main causes of the French Revolution in a few sentences.",
];

#[derive(Clone, Copy, Debug)]
enum Runner {
    Target,
    DrafterAlone,
}

struct Config {
    name: &'static str,
    runner: Runner,
    drafter: DrafterKind,
    k: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    drafter: String,
    k: String,
    prompt_set: String,
    decode_tok_s: f64,
    acceptance: f64,
    mean_accepted: f64,
    draft_ms_per_step: f64,
    verify_ms_per_step: f64,
    greedy_equal: bool,
    tokens: usize,
    speedup_vs_target: f64,
    /// With `--tp`: the share of decode time rank 0 spent in collectives (transfers and waiting for the
    /// other ranks), and the bytes it sent and received per generated token (prefill included).
    tp_collective_share: f64,
    tp_bytes_per_token: f64,
}

/// Sums over the prompts of one set for one config.
#[derive(Debug, Default)]
struct Accum {
    tokens: usize,
    decode_ms: f64,
    steps: usize,
    drafted: usize,
    accepted: usize,
    draft_ms: f64,
    verify_ms: f64,
    unequal: bool,
    tp_ms: f64,
    tp_bytes: u64,
}

impl Accum {
    fn tok_s(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.tokens as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    threads: usize,
    tp: usize,
    max_new_tokens: usize,
    target_file_bytes: u64,
    draft_file_bytes: u64,
    peak_rss_bytes: u64,
    configs: Vec<Row>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads)?;
    let (preset, target) = load_target(&args.model, Some(&args.tp))?;
    let draft = match args
        .model
        .draft_model
        .clone()
        .or_else(|| preset.draft_path(&args.model.models_dir))
    {
        Some(p) => {
            let d = load_gguf(&p)?;
            check_pair(&target, &d)?;
            Some(d)
        }
        None => None,
    };
    let mut configs = vec![Config {
        name: "target",
        runner: Runner::Target,
        drafter: DrafterKind::None,
        k: None,
    }];
    if draft.is_some() {
        configs.push(Config {
            name: "drafter-alone",
            runner: Runner::DrafterAlone,
            drafter: DrafterKind::None,
            k: None,
        });
        for (name, k) in [
            ("spec-model-k2", Some(2)),
            ("spec-model-k4", Some(4)),
            ("spec-model-k8", Some(8)),
            ("spec-model-adaptive", None),
        ] {
            configs.push(Config {
                name,
                runner: Runner::Target,
                drafter: DrafterKind::Model,
                k,
            });
        }
    }
    for (name, drafter) in [
        ("spec-self", DrafterKind::SelfLayers),
        ("spec-ngram", DrafterKind::Ngram),
        ("auto", DrafterKind::Auto),
    ] {
        configs.push(Config {
            name,
            runner: Runner::Target,
            drafter,
            k: None,
        });
    }
    if !args.only.is_empty() {
        configs.retain(|c| {
            c.name == "target" || args.only.iter().any(|o| c.name.contains(o.as_str()))
        });
    }
    let take = args.prompts.unwrap_or(usize::MAX);
    let sets: Vec<(&str, Vec<Vec<u32>>)> = [("code", CODE_PROMPTS), ("prose", PROSE_PROMPTS)]
        .iter()
        .map(|(name, prompts)| {
            let ids = prompts
                .iter()
                .take(take)
                .map(|p| prompt_ids(&target, p, false))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((*name, ids))
        })
        .collect::<anyhow::Result<_>>()?;

    let params = SamplingParams::greedy();
    let stop = target.tokenizer.stop_ids().to_vec();
    // Warm-up: first-touch page faults and caches out of the way before anything is timed.
    for m in std::iter::once(&target).chain(draft.iter()) {
        let mut g = Generator::new(m.model.clone(), None);
        g.generate(
            &sets[0].1[0],
            &GenerateOptions::new(4, params.clone()),
            |_| true,
        )?;
    }

    // Interleaved: for every prompt, every config in turn, so that whatever else the machine is doing
    // weighs on all configs alike and the ratios stay meaningful.
    let mut generators = configs
        .iter()
        .map(|cfg| {
            let model: &LoadedModel = match cfg.runner {
                Runner::Target => &target,
                Runner::DrafterAlone => draft.as_ref().context("no draft model")?,
            };
            let drafter = build_drafter(
                cfg.drafter,
                &target,
                draft.as_ref(),
                args.model.draft_options(),
            )?;
            Ok(Generator::new(model.model.clone(), drafter))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    for (set, prompts) in &sets {
        let mut acc: Vec<Accum> = configs.iter().map(|_| Accum::default()).collect();
        for (pi, ids) in prompts.iter().enumerate() {
            let mut reference: Option<Vec<u32>> = None;
            for (ci, cfg) in configs.iter().enumerate() {
                let mut opts = GenerateOptions::new(args.max_new_tokens, params.clone());
                opts.draft_len = cfg.k;
                opts.stop_ids = stop.clone();
                let before = target.model.tp_stats();
                let (out, st) = generators[ci].generate(ids, &opts, |_| true)?;
                let a = &mut acc[ci];
                if let (Some(b), Some(now)) = (before, target.model.tp_stats()) {
                    let d = now.since(&b);
                    a.tp_ms += d.nanos as f64 / 1e6;
                    a.tp_bytes += d.bytes_sent + d.bytes_received;
                }
                a.tokens += st.generated.saturating_sub(1);
                a.decode_ms += st.decode_ms;
                a.steps += st.steps;
                a.drafted += st.drafted;
                a.accepted += st.accepted;
                a.draft_ms += st.draft_ms;
                a.verify_ms += st.verify_ms;
                match (&reference, cfg.runner) {
                    (None, _) => reference = Some(out),
                    (Some(r), Runner::Target) => a.unequal |= *r != out,
                    (Some(_), Runner::DrafterAlone) => a.unequal = true,
                }
            }
            if !args.json {
                eprintln!(
                    "  {set} prompt {} done ({:.0} s)",
                    pi + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let target_tok_s = acc[0].tok_s();
        for (cfg, a) in configs.iter().zip(&acc) {
            let per_step = |v: f64| {
                if a.steps == 0 {
                    0.0
                } else {
                    round(v / a.steps as f64)
                }
            };
            rows.push(Row {
                name: cfg.name.to_string(),
                drafter: cfg.drafter.name().to_string(),
                k: cfg.k.map_or("adaptive".to_string(), |k| k.to_string()),
                prompt_set: set.to_string(),
                decode_tok_s: round(a.tok_s()),
                acceptance: if a.drafted == 0 {
                    0.0
                } else {
                    round(a.accepted as f64 / a.drafted as f64)
                },
                mean_accepted: per_step(a.tokens as f64),
                draft_ms_per_step: per_step(a.draft_ms),
                verify_ms_per_step: per_step(a.verify_ms),
                greedy_equal: !a.unequal,
                tokens: a.tokens,
                speedup_vs_target: if target_tok_s > 0.0 {
                    round(a.tok_s() / target_tok_s)
                } else {
                    0.0
                },
                tp_collective_share: if a.decode_ms > 0.0 {
                    round(a.tp_ms / a.decode_ms)
                } else {
                    0.0
                },
                tp_bytes_per_token: if a.tokens > 0 {
                    round(a.tp_bytes as f64 / a.tokens as f64)
                } else {
                    0.0
                },
            });
        }
    }
    let report = Report {
        machine: machine_description(),
        threads: rayon::current_num_threads(),
        tp: args.tp.tp,
        max_new_tokens: args.max_new_tokens,
        target_file_bytes: target.file_bytes,
        draft_file_bytes: draft.as_ref().map_or(0, |d| d.file_bytes),
        peak_rss_bytes: peak_rss_bytes(),
        configs: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "specd bench: {} threads, {} new tokens, greedy; {}",
        r.threads, r.max_new_tokens, r.machine
    );
    if r.tp > 1 {
        println!(
            "target split over {} ranks (threads of this process); coll = share of decode time rank 0 \
             spent in collectives, KB/tok = bytes it moved per generated token",
            r.tp
        );
        for c in r.configs.iter().filter(|c| c.tp_bytes_per_token > 0.0) {
            println!(
                "  {:<20} {:<6} coll {:>5.1}%  {:>8.1} KB/tok",
                c.name,
                c.prompt_set,
                100.0 * c.tp_collective_share,
                c.tp_bytes_per_token / 1024.0
            );
        }
    }
    println!(
        "{:<20} {:<6} {:<8} {:<6} {:>9} {:>8} {:>6} {:>9} {:>9} {:>6} {:>7}",
        "config",
        "drafter",
        "k",
        "set",
        "tok/s",
        "vs tgt",
        "acc",
        "mean acc",
        "draft ms",
        "vfy ms",
        "equal"
    );
    for c in &r.configs {
        println!(
            "{:<20} {:<6} {:<8} {:<6} {:>9.2} {:>7.2}x {:>6.3} {:>9.2} {:>9.1} {:>6.1} {:>7}",
            c.name,
            c.drafter,
            c.k,
            c.prompt_set,
            c.decode_tok_s,
            c.speedup_vs_target,
            c.acceptance,
            c.mean_accepted,
            c.draft_ms_per_step,
            c.verify_ms_per_step,
            c.greedy_equal
        );
    }
    let model_bytes = r.target_file_bytes + r.draft_file_bytes;
    println!(
        "peak RSS {:.0} MiB for {:.0} MiB of model files ({:.2}x)",
        r.peak_rss_bytes as f64 / 1048576.0,
        model_bytes as f64 / 1048576.0,
        r.peak_rss_bytes as f64 / model_bytes.max(1) as f64
    );
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub(crate) fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cpu}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}
