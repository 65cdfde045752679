//! What the distillation examples share: their environment knobs, the corpus they read, and greedy
//! agreement with the target.

use specd_engine::{LogitsWanted, Model};
use specd_tokenizer::SpecdTokenizer;

/// The value of `name` parsed, else `default`.
pub fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first `count` files of `dir` (in name order) that encode to at least `tokens` tokens, each cut
/// to `tokens`.
pub fn corpus(
    tokenizer: &SpecdTokenizer,
    dir: &str,
    count: usize,
    tokens: usize,
) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut files = Vec::new();
    for p in names {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let mut ids = tokenizer.encode(&text, false)?;
        if ids.len() < tokens {
            continue;
        }
        ids.truncate(tokens);
        files.push(ids);
        if files.len() == count {
            return Ok(files);
        }
    }
    Err(format!("{dir} has only {} usable files", files.len()).into())
}

/// Share of positions of `files` where `model`'s argmax (a token id) is `want` (the target's, all files'
/// positions in order).
pub fn agreement(
    model: &Model,
    files: &[Vec<u32>],
    want: &[u32],
) -> Result<f64, Box<dyn std::error::Error>> {
    let (mut hit, mut n) = (0usize, 0usize);
    let ids = model.logit_ids().map(<[u32]>::to_vec);
    for tokens in files {
        let logits = model.forward(&mut model.new_cache(), tokens, LogitsWanted::All)?;
        let cols = logits.len() / tokens.len();
        for j in 0..tokens.len() {
            let c = specd_core::argmax(&logits[j * cols..(j + 1) * cols]);
            hit += usize::from(ids.as_ref().map_or(c, |ids| ids[c as usize]) == want[n]);
            n += 1;
        }
    }
    Ok(hit as f64 / n.max(1) as f64)
}
