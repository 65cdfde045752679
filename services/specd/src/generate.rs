//! `specd generate`: load, validate the request, generate with the chosen drafter, stream text to stdout.

use std::io::Write;

use anyhow::{bail, Context};
use specd_core::SamplingParams;
use specd_engine::drafter::DrafterKind;
use specd_engine::preset::{build_drafter, load_draft_for};
use specd_engine::{load_gguf, GenerateOptions, Generator, LoadedModel, Preset};
use specd_tokenizer::DecodeStream;

use crate::cli::{init_threads, GenerateArgs, ModelArgs, TpArgs};

/// The target model of `args`, split over `tp.tp` ranks of this process when asked.
pub fn load_target(args: &ModelArgs, tp: Option<&TpArgs>) -> anyhow::Result<(Preset, LoadedModel)> {
    let preset: Preset = args.model_preset.parse()?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| preset.target_path(&args.models_dir));
    let model = match tp {
        Some(tp) if tp.tp > 1 => {
            let opts = tp.local_options(rayon::current_num_threads())?;
            specd_engine::tp::load_gguf_local(&path, tp.tp, &opts)?
        }
        Some(tp) => {
            tp.local_options(1)?;
            load_gguf(&path)?
        }
        None => load_gguf(&path)?,
    };
    Ok((preset, model))
}

/// Token ids of a user prompt: chat template applied unless `raw`.
pub fn prompt_ids(target: &LoadedModel, text: &str, raw: bool) -> anyhow::Result<Vec<u32>> {
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if raw || target.tokenizer.chat_template().is_none() {
        Ok(target.tokenizer.encode(text, false)?)
    } else {
        Ok(specd_tokenizer::prompt_ids(&target.tokenizer, text)?)
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads)?;
    let kind: DrafterKind = args.drafter.parse()?;
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            String::from_utf8(bytes)
                .map_err(|e| anyhow::anyhow!("{} is not valid UTF-8: {e}", path.display()))?
        }
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file PATH"),
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    params.validate()?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let (preset, target) = load_target(&args.model, Some(&args.tp))?;
    let context = target.model.config().context;
    if args.max_new_tokens > context {
        bail!(
            "--max-new-tokens {} exceeds the model's context of {context} tokens",
            args.max_new_tokens
        );
    }
    let ids = prompt_ids(&target, &text, args.raw)?;
    if ids.len() + 1 > context {
        bail!(
            "the prompt is {} tokens; the model's context is {context}",
            ids.len()
        );
    }
    let draft = load_draft_for(
        kind,
        args.model.draft_model.as_deref(),
        preset,
        &args.model.models_dir,
    )?;
    let drafter = build_drafter(kind, &target, draft.as_ref(), args.model.draft_options())?;
    let mut generator = Generator::new(target.model.clone(), drafter);
    let mut opts = GenerateOptions::new(args.max_new_tokens, params);
    opts.draft_len = args.draft_len;
    opts.stop_ids = target.tokenizer.stop_ids().to_vec();

    let mut stream = DecodeStream::new(&target.tokenizer, true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_error = None;
    let tp_before = target.model.tp_stats();
    let (_, stats) = generator.generate(&ids, &opts, |tokens| {
        let piece = match stream.push_many(tokens) {
            Ok(p) => p,
            Err(e) => {
                io_error = Some(anyhow::anyhow!(e));
                return false;
            }
        };
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            io_error = Some(e.into());
            return false;
        }
        true
    })?;
    let tail = stream.finish();
    out.write_all(tail.as_bytes())?;
    writeln!(out)?;
    if let Some(e) = io_error {
        return Err(e);
    }
    let tp = match (tp_before, target.model.tp_stats()) {
        (Some(b), Some(now)) => {
            let d = now.since(&b);
            let total_ms = stats.prefill_ms + stats.decode_ms;
            Some(serde_json::json!({
                "ranks": args.tp.tp,
                "collective_ms": round(d.nanos as f64 / 1e6),
                "collective_share": round(d.nanos as f64 / 1e6 / total_ms.max(1e-9)),
                "collectives": d.calls,
                "bytes_per_token": round((d.bytes_sent + d.bytes_received) as f64 / stats.generated.max(1) as f64),
            }))
        }
        _ => None,
    };
    let line = serde_json::json!({
        "drafter": kind.name(),
        "prompt_tokens": stats.prompt_tokens,
        "tokens": stats.generated,
        "decode_tok_s": round(stats.decode_tok_s()),
        "acceptance": round(stats.acceptance()),
        "mean_accepted": round(stats.mean_accepted()),
        "steps": stats.steps,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "prefill_ms": round(stats.prefill_ms),
        "draft_ms": round(stats.draft_ms),
        "verify_ms": round(stats.verify_ms),
        "decode_ms": round(stats.decode_ms),
        "finish": format!("{:?}", stats.finish.unwrap_or(specd_engine::FinishReason::Length)).to_lowercase(),
        "tp": tp,
    });
    if args.json_stats {
        eprintln!("{line}");
    } else {
        eprintln!(
            "[specd] drafter={} tokens={} decode={:.2} tok/s acceptance={:.3} mean_accepted={:.2} steps={} prefill={:.0} ms",
            kind.name(),
            stats.generated,
            stats.decode_tok_s(),
            stats.acceptance(),
            stats.mean_accepted(),
            stats.steps,
            stats.prefill_ms
        );
        if let Some(tp) = &tp {
            eprintln!("[specd] tensor parallel: {tp}");
        }
    }
    Ok(())
}

pub fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
