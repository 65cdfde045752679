//! Distills the draft model (LoRA adapters on its projections, OSD's own setting) on real text and
//! prints what it buys: expected acceptance (mean of sum min(p, q) over the target's top 32) and greedy
//! agreement (the drafter's argmax is the target's) on held-out files of the same corpus, before and
//! after; training positions per second; and the adapted drafter's decode step against the plain one.
//!
//! Usage: lora_distill TARGET.gguf DRAFT.gguf CORPUS_DIR [THREADS]
//! Env: RANK (8), ALPHA (16), TARGETS (projections, `all` or e.g. `q,v,down`), EPOCHS (2), LR (5e-4),
//! LOSS (fkl|rkl|jsd|jsd:B|tv), BATCH (sequences per step, 2), TRAIN_FILES (24), EVAL_FILES (6), TOKENS
//! per file (256), VOCAB (draft head, 32768). Files are the corpus directory's files in name order;
//! training takes the first TRAIN_FILES, evaluation the next EVAL_FILES.
use std::sync::Arc;
use std::time::Instant;

mod common;
use common::{agreement, env};

use specd_core::{Loss, TopTarget};
use specd_engine::lora::parse_projections;
use specd_engine::lora_train::{LoraConfig, LoraTrainer, SeqSample};
use specd_engine::preset::trim_draft_head;
use specd_engine::{load_gguf, LogitsWanted, Model};

/// A file's tokens with the target's top 32 at every position, and the target's argmax there.
fn file_sample(
    target: &Model,
    tokens: &[u32],
) -> Result<(SeqSample, Vec<u32>), Box<dyn std::error::Error>> {
    let logits = target.forward(&mut target.new_cache(), tokens, LogitsWanted::All)?;
    let v = target.config().vocab;
    let mut positions = Vec::new();
    let mut argmax = Vec::new();
    for j in 0..tokens.len() {
        let row = &logits[j * v..(j + 1) * v];
        positions.push((j + 1, TopTarget::from_logits(row, 32)?));
        argmax.push(specd_core::argmax(row));
    }
    Ok((
        SeqSample {
            context: Arc::from(tokens),
            positions,
        },
        argmax,
    ))
}

/// Milliseconds per one-token decode step after a 128-token context (median of 15).
fn decode_ms(model: &Model, tokens: &[u32]) -> Result<f64, Box<dyn std::error::Error>> {
    let mut cache = model.new_cache();
    model.forward(&mut cache, &tokens[..128], LogitsWanted::Last)?;
    let mut times = Vec::new();
    for &t in &tokens[128..143] {
        let t0 = Instant::now();
        model.forward(&mut cache, &[t], LogitsWanted::Last)?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: lora_distill TARGET.gguf DRAFT.gguf CORPUS_DIR [THREADS]";
    let target_path = args.next().ok_or(usage)?;
    let draft_path = args.next().ok_or(usage)?;
    let corpus = args.next().ok_or(usage)?;
    if let Some(t) = args.next() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse()?)
            .build_global()?;
    }
    let loaded = load_gguf(std::path::Path::new(&target_path))?;
    let target = &loaded.model;
    let draft = load_gguf(std::path::Path::new(&draft_path))?;
    let drafter = trim_draft_head(
        &draft.model,
        loaded.tokenizer.stop_ids(),
        env("VOCAB", 32768usize),
    )?;
    let (n_train, n_eval, per_file) = (
        env("TRAIN_FILES", 24usize),
        env("EVAL_FILES", 6usize),
        env("TOKENS", 256usize),
    );
    let files = common::corpus(
        &loaded.tokenizer,
        &corpus,
        n_train + n_eval,
        per_file.max(143),
    )?;
    let (train_files, eval_files) = files.split_at(n_train);
    if std::env::var("SPEED_ONLY").is_ok() {
        // The cost of serving the adapters only (B = 0 costs what a trained B does).
        let cfg = LoraConfig {
            rank: env("RANK", 8usize),
            targets: parse_projections(&std::env::var("TARGETS").unwrap_or_else(|_| "all".into()))?,
            ..LoraConfig::default()
        };
        let served = drafter.with_lora(Some(LoraTrainer::new(&drafter, cfg, 1)?.adapter()?))?;
        let (plain, adapted) = (
            decode_ms(&drafter, &eval_files[0])?,
            decode_ms(&served, &eval_files[0])?,
        );
        println!("decode step (128-token context): plain {plain:.2} ms, adapted {adapted:.2} ms");
        return Ok(());
    }
    let t0 = Instant::now();
    let train: Vec<SeqSample> = train_files
        .iter()
        .map(|f| file_sample(target, f).map(|s| s.0))
        .collect::<Result<_, _>>()?;
    let (held, want): (Vec<SeqSample>, Vec<Vec<u32>>) = eval_files
        .iter()
        .map(|f| file_sample(target, f))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let want: Vec<u32> = want.concat();
    let collect_s = t0.elapsed().as_secs_f64();
    let loss = Loss::parse(&std::env::var("LOSS").unwrap_or_else(|_| "fkl".into()))?;
    let cfg = LoraConfig {
        rank: env("RANK", 8usize),
        alpha: env("ALPHA", 16f32),
        lr: env("LR", 5e-4f64),
        loss,
        targets: parse_projections(&std::env::var("TARGETS").unwrap_or_else(|_| "all".into()))?,
        ..LoraConfig::default()
    };
    let t_new = Instant::now();
    let mut trainer = LoraTrainer::new(&drafter, cfg.clone(), 1)?;
    let setup_s = t_new.elapsed().as_secs_f64();
    let acc_before = trainer.expected_acceptance(&held)?;
    let agree_before = agreement(&drafter, eval_files, &want)?;
    let (epochs, batch) = (env("EPOCHS", 2usize), env("BATCH", 2usize));
    let t1 = Instant::now();
    let (mut first, mut last, mut steps) = (None, 0.0, 0);
    for _ in 0..epochs {
        for chunk in train.chunks(batch) {
            last = trainer.step(chunk)?;
            first.get_or_insert(last);
            steps += 1;
        }
    }
    let train_s = t1.elapsed().as_secs_f64();
    let acc_after = trainer.expected_acceptance(&held)?;
    let adapter = trainer.adapter()?;
    let served = drafter.with_lora(Some(adapter.clone()))?;
    let agree_after = agreement(&served, eval_files, &want)?;
    let (plain_ms, lora_ms) = (
        decode_ms(&drafter, &eval_files[0])?,
        decode_ms(&served, &eval_files[0])?,
    );
    let positions: usize = train.iter().map(|s| s.positions.len()).sum::<usize>() * epochs;
    println!(
        "target {target_path}\ndrafter {draft_path} (head {} ids), LoRA rank {} alpha {} on {:?}: {} parameters ({:.1} MB file), loss {loss:?}",
        drafter.logit_ids().map_or(drafter.config().vocab, <[u32]>::len),
        cfg.rank,
        cfg.alpha,
        cfg.targets.iter().map(|&p| specd_engine::lora::PROJECTIONS[p]).collect::<Vec<_>>(),
        adapter.parameters(),
        adapter.to_file_bytes()?.len() as f64 / 1e6,
    );
    println!(
        "train {} positions ({n_train} files), held out {} ({n_eval} files); targets collected in {collect_s:.1} s, trainer set up in {setup_s:.1} s",
        positions / epochs,
        held.iter().map(|s| s.positions.len()).sum::<usize>()
    );
    println!(
        "training: {steps} steps of {batch} sequences, {positions} positions in {train_s:.1} s = {:.1} positions/s, {:.0} ms/step; loss {:.3} -> {last:.3}",
        positions as f64 / train_s,
        train_s * 1000.0 / steps.max(1) as f64,
        first.unwrap_or(0.0)
    );
    println!("held-out expected acceptance {acc_before:.4} -> {acc_after:.4}");
    println!("held-out greedy agreement    {agree_before:.4} -> {agree_after:.4}");
    println!("decode step (128-token context): plain {plain_ms:.2} ms, adapted {lora_ms:.2} ms");
    println!(
        "{{\"acc_before\":{acc_before:.4},\"acc_after\":{acc_after:.4},\"agree_before\":{agree_before:.4},\"agree_after\":{agree_after:.4},\"train_positions_per_s\":{:.1},\"decode_ms_plain\":{plain_ms:.2},\"decode_ms_lora\":{lora_ms:.2}}}",
        positions as f64 / train_s
    );
    Ok(())
}
