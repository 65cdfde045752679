//! Distills a self-drafter's exit adapter on real text and prints what it buys: expected acceptance
//! (mean of sum min(p, q) over the target's top 32) and greedy agreement (the drafter's argmax is the
//! target's) on held-out files of the same corpus, before and after, and training positions per second.
//!
//! Usage: exit_distill MODEL.gguf CORPUS_DIR [THREADS]
//! Env: LAYERS (self-drafter layers, default the preset's quarter), RANK (16), EPOCHS (2), LR (1e-3),
//! LOSS (fkl|rkl|jsd|jsd:B|tv), TRAIN_FILES (24), EVAL_FILES (6), TOKENS per file (384), VOCAB (draft
//! head, 32768). Files are the corpus directory's `*.py` (or any) files in name order; training takes the
//! first TRAIN_FILES, evaluation the next EVAL_FILES.
use std::time::Instant;

mod common;
use common::{agreement, env};

use specd_core::{Loss, TopTarget};
use specd_engine::exit_train::{ExitConfig, ExitSample, ExitTrainer};
use specd_engine::preset::{default_self_layers, trim_draft_head};
use specd_engine::{load_gguf, LogitsWanted, Model};

/// The positions of one file: the drafter's exit state and the target's top 32, and whether the
/// plain drafter's argmax agrees with the target's.
fn file_samples(
    target: &Model,
    drafter: &Model,
    tokens: &[u32],
) -> Result<Vec<(ExitSample, u32)>, Box<dyn std::error::Error>> {
    let logits = target.forward(&mut target.new_cache(), tokens, LogitsWanted::All)?;
    let hidden = drafter.final_hidden(&mut drafter.new_cache(), tokens)?;
    let (v, d) = (target.config().vocab, drafter.config().hidden);
    let mut out = Vec::new();
    for j in 0..tokens.len() {
        let row = &logits[j * v..(j + 1) * v];
        out.push((
            ExitSample {
                hidden: hidden[j * d..(j + 1) * d].to_vec(),
                target: TopTarget::from_logits(row, 32)?,
            },
            specd_core::argmax(row),
        ));
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: exit_distill MODEL.gguf CORPUS_DIR [THREADS]";
    let path = args.next().ok_or(usage)?;
    let corpus = args.next().ok_or(usage)?;
    if let Some(t) = args.next() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse()?)
            .build_global()?;
    }
    let loaded = load_gguf(std::path::Path::new(&path))?;
    let target = &loaded.model;
    let layers = env("LAYERS", default_self_layers(target.config().layers));
    let drafter = trim_draft_head(
        &target.truncated(layers)?,
        loaded.tokenizer.stop_ids(),
        env("VOCAB", 32768usize),
    )?;
    let (n_train, n_eval, per_file) = (
        env("TRAIN_FILES", 24usize),
        env("EVAL_FILES", 6usize),
        env("TOKENS", 384usize),
    );
    let files = common::corpus(&loaded.tokenizer, &corpus, n_train + n_eval, per_file)?;
    let (train_files, eval_files) = files.split_at(n_train);
    let t0 = Instant::now();
    let mut train = Vec::new();
    for f in train_files {
        train.extend(
            file_samples(target, &drafter, f)?
                .into_iter()
                .map(|(s, _)| s),
        );
    }
    let mut held = Vec::new();
    let mut want = Vec::new();
    for f in eval_files {
        for (s, a) in file_samples(target, &drafter, f)? {
            held.push(s);
            want.push(a);
        }
    }
    let collect_s = t0.elapsed().as_secs_f64();
    let loss = Loss::parse(&std::env::var("LOSS").unwrap_or_else(|_| "fkl".into()))?;
    let cfg = ExitConfig {
        rank: env("RANK", 16usize),
        lr: env("LR", 1e-3f64),
        loss,
        ..ExitConfig::default()
    };
    let mut trainer = ExitTrainer::new(&drafter, cfg, 1)?;
    let acc_before = trainer.expected_acceptance(&held)?;
    let agree_before = agreement(&drafter, eval_files, &want)?;
    let epochs = env("EPOCHS", 2usize);
    let t1 = Instant::now();
    let mut first = None;
    let mut last = 0.0;
    let mut steps = 0;
    for _ in 0..epochs {
        for chunk in train.chunks(64) {
            last = trainer.step(chunk)?;
            first.get_or_insert(last);
            steps += 1;
        }
    }
    let train_s = t1.elapsed().as_secs_f64();
    let acc_after = trainer.expected_acceptance(&held)?;
    let served = drafter.with_adapter(Some(trainer.adapter()?))?;
    let agree_after = agreement(&served, eval_files, &want)?;
    let positions = train.len() * epochs;
    println!(
        "model {} self-drafter {layers}/{} layers, head {} ids, rank {}, loss {loss:?}",
        path,
        target.config().layers,
        drafter
            .logit_ids()
            .map_or(target.config().vocab, <[u32]>::len),
        cfg.rank
    );
    println!(
        "train {} positions ({n_train} files), held out {} ({n_eval} files); collected in {collect_s:.1} s",
        train.len(),
        held.len()
    );
    println!(
        "training: {steps} steps of 64, {positions} positions in {train_s:.1} s = {:.0} positions/s, {:.1} ms/step; loss {:.3} -> {last:.3}",
        positions as f64 / train_s,
        train_s * 1000.0 / steps.max(1) as f64,
        first.unwrap_or(0.0)
    );
    println!("held-out expected acceptance {acc_before:.4} -> {acc_after:.4}");
    println!("held-out greedy agreement    {agree_before:.4} -> {agree_after:.4}");
    println!(
        "{{\"acc_before\":{acc_before:.4},\"acc_after\":{acc_after:.4},\"agree_before\":{agree_before:.4},\"agree_after\":{agree_after:.4},\"train_positions_per_s\":{:.1}}}",
        positions as f64 / train_s
    );
    Ok(())
}
