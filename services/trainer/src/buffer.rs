//! The replay buffer: distillation samples as the trainer keeps them, validated on the way in.
//!
//! One [`ReplayBuffer`] holds a [`Shelf`] per (model, drafter kind). A shelf keeps samples newest first
//! and is bounded in positions (a sample is a context and some positions of it with the target's
//! distributions); the oldest samples go first when it is full. Every `eval_every`-th sample goes to the
//! shelf's held-out slice instead (bounded likewise), so candidates are evaluated on recent traffic
//! they were not trained on. Samples that do not make sense (positions outside the context, lengths that
//! disagree, distributions that are not distributions, ids outside the vocabulary, another model) are
//! refused with a reason for the metrics, never a panic.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use specd_core::{DistillError, TopTarget};
use specd_proto::internal::v1 as pb;

/// One verified position of a sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    /// Prefix length: the target's distribution is of the token after `context[..prefix]`.
    pub prefix: usize,
    pub target: TopTarget,
    pub rejected: bool,
    /// The drafted token, if the drafter proposed one here.
    pub draft: Option<u32>,
}

/// A validated sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub context: Arc<[u32]>,
    pub positions: Vec<Position>,
    pub drafter_version: String,
    /// Order of arrival on its shelf, from 1 (0 until filed): the training loop trains on what is new.
    pub seq: u64,
}

/// Why a sample was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("sample for model {got:?}, this trainer trains for {want:?}")]
    Model { got: String, want: String },
    #[error("sample fields disagree in length: {0}")]
    Shape(String),
    #[error("position {prefix} is outside the context of {len} tokens")]
    Position { prefix: u32, len: usize },
    #[error("target distribution: {0}")]
    Distribution(#[from] DistillError),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    Vocabulary { id: u32, vocab: usize },
    #[error("sample has no positions")]
    Empty,
}

impl Refused {
    /// A stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Model { .. } => "model",
            Refused::Shape(_) => "shape",
            Refused::Position { .. } => "position",
            Refused::Distribution(_) => "distribution",
            Refused::Vocabulary { .. } => "vocabulary",
            Refused::Empty => "empty",
        }
    }
}

/// Checks a wire sample against the model the trainer trains for.
pub fn validate(s: pb::DistillSample, model: &str, vocab: usize) -> Result<Sample, Refused> {
    if s.model != model {
        return Err(Refused::Model {
            got: s.model,
            want: model.to_string(),
        });
    }
    let n = s.positions.len();
    if n == 0 {
        return Err(Refused::Empty);
    }
    let lens = [
        ("target", s.target.len()),
        ("rejected", s.rejected.len()),
        ("drafted", s.drafted.len()),
        ("draft_ids", s.draft_ids.len()),
        ("tail_mass", s.tail_mass.len()),
    ];
    if let Some((name, len)) = lens.iter().find(|(_, len)| *len != n) {
        return Err(Refused::Shape(format!("{n} positions but {len} {name}")));
    }
    if let Some(&id) = s.context_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Refused::Vocabulary { id, vocab });
    }
    let len = s.context_ids.len();
    let mut positions = Vec::with_capacity(n);
    for i in 0..n {
        let prefix = s.positions[i];
        if prefix == 0 || prefix as usize > len {
            return Err(Refused::Position { prefix, len });
        }
        let d = &s.target[i];
        if let Some(&id) = d.ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Refused::Vocabulary { id, vocab });
        }
        let draft = s.drafted[i].then_some(s.draft_ids[i]);
        if let Some(id) = draft.filter(|&t| t as usize >= vocab) {
            return Err(Refused::Vocabulary { id, vocab });
        }
        positions.push(Position {
            prefix: prefix as usize,
            target: TopTarget::new(d.ids.clone(), d.probs.clone())?,
            rejected: s.rejected[i] && s.drafted[i],
            draft,
        });
    }
    Ok(Sample {
        context: s.context_ids.into(),
        positions,
        drafter_version: s.drafter_version,
        seq: 0,
    })
}

/// Samples of one (model, drafter kind), newest first, bounded in positions.
#[derive(Debug, Default)]
pub struct Shelf {
    train: VecDeque<Arc<Sample>>,
    held_out: VecDeque<Arc<Sample>>,
    train_positions: usize,
    held_out_positions: usize,
    /// Samples ever added, to route every `eval_every`-th to the held-out slice.
    added: u64,
    evicted: u64,
}

impl Shelf {
    /// Training samples, newest first.
    pub fn train(&self) -> impl Iterator<Item = &Arc<Sample>> {
        self.train.iter()
    }

    /// Held-out samples, newest first.
    pub fn held_out(&self) -> impl Iterator<Item = &Arc<Sample>> {
        self.held_out.iter()
    }

    /// Training samples that arrived after `seq`, newest first, at most `max`.
    pub fn newer_than(&self, seq: u64, max: usize) -> Vec<Arc<Sample>> {
        self.train
            .iter()
            .take_while(|s| s.seq > seq)
            .take(max)
            .cloned()
            .collect()
    }

    /// Positions held for training and for evaluation.
    pub fn positions(&self) -> (usize, usize) {
        (self.train_positions, self.held_out_positions)
    }

    /// Samples evicted to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// Bounds of the replay buffer.
#[derive(Clone, Copy, Debug)]
pub struct BufferConfig {
    /// Most training positions per shelf.
    pub max_positions: usize,
    /// Most held-out positions per shelf.
    pub max_held_out: usize,
    /// One sample in this many is held out (0: none).
    pub eval_every: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_positions: 200_000,
            max_held_out: 20_000,
            eval_every: 10,
        }
    }
}

/// Every shelf, by drafter kind (the trainer trains for one target model).
#[derive(Debug, Default)]
pub struct ReplayBuffer {
    cfg: BufferConfig,
    shelves: HashMap<String, Shelf>,
}

impl ReplayBuffer {
    pub fn new(cfg: BufferConfig) -> Self {
        Self {
            cfg,
            shelves: HashMap::new(),
        }
    }

    /// Adds a validated sample for `kind`, evicting the oldest samples past the bounds.
    pub fn add(&mut self, kind: &str, mut sample: Sample) {
        let cfg = self.cfg;
        let shelf = self.shelves.entry(kind.to_string()).or_default();
        shelf.added += 1;
        sample.seq = shelf.added;
        let n = sample.positions.len();
        let held = cfg.eval_every > 0 && shelf.added % cfg.eval_every == 0;
        let (deque, count, max) = if held {
            (
                &mut shelf.held_out,
                &mut shelf.held_out_positions,
                cfg.max_held_out,
            )
        } else {
            (
                &mut shelf.train,
                &mut shelf.train_positions,
                cfg.max_positions,
            )
        };
        deque.push_front(Arc::new(sample));
        *count += n;
        while *count > max {
            let Some(old) = deque.pop_back() else { break };
            *count -= old.positions.len();
            shelf.evicted += 1;
        }
    }

    pub fn shelf(&self, kind: &str) -> Option<&Shelf> {
        self.shelves.get(kind)
    }

    /// Samples held over every shelf (training and held-out).
    pub fn samples(&self) -> usize {
        self.shelves
            .values()
            .map(|s| s.train.len() + s.held_out.len())
            .sum()
    }

    /// Positions held over every shelf (training and held-out).
    pub fn positions(&self) -> usize {
        self.shelves
            .values()
            .map(|s| s.train_positions + s.held_out_positions)
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn wire(positions: Vec<u32>, context: Vec<u32>) -> pb::DistillSample {
        let n = positions.len();
        pb::DistillSample {
            model: "m".into(),
            drafter_kind: "model".into(),
            context_ids: context,
            positions,
            target: vec![
                pb::SparseDist {
                    ids: vec![3, 4],
                    probs: vec![0.6, 0.3],
                };
                n
            ],
            rejected: vec![true; n],
            drafted: vec![true; n],
            draft_ids: vec![5; n],
            drafter_version: "1".into(),
            tail_mass: vec![0.1; n],
        }
    }

    #[test]
    fn valid_samples_pass_and_bad_ones_are_refused_with_a_reason() {
        let ok = validate(wire(vec![1, 3], vec![1, 2, 3]), "m", 10).unwrap();
        assert_eq!(ok.positions.len(), 2);
        assert_eq!(ok.positions[1].prefix, 3);
        assert_eq!(ok.positions[0].draft, Some(5));
        let reason = |s: pb::DistillSample| validate(s, "m", 10).unwrap_err().reason();
        assert_eq!(reason(wire(vec![0], vec![1, 2])), "position");
        assert_eq!(reason(wire(vec![3], vec![1, 2])), "position");
        assert_eq!(reason(wire(vec![], vec![1, 2])), "empty");
        assert_eq!(reason(wire(vec![1], vec![1, 20])), "vocabulary");
        let mut other = wire(vec![1], vec![1]);
        other.model = "x".into();
        assert_eq!(reason(other), "model");
        let mut short = wire(vec![1, 1], vec![1]);
        short.rejected.pop();
        assert_eq!(reason(short), "shape");
        let mut bad = wire(vec![1], vec![1]);
        bad.target[0].probs = vec![0.9, 0.9];
        assert_eq!(reason(bad), "distribution");
        let mut neg = wire(vec![1], vec![1]);
        neg.target[0].probs = vec![-0.1, 0.5];
        assert_eq!(reason(neg), "distribution");
    }

    #[test]
    fn shelves_are_bounded_newest_first_with_a_held_out_slice() {
        let mut b = ReplayBuffer::new(BufferConfig {
            max_positions: 6,
            max_held_out: 2,
            eval_every: 4,
        });
        for i in 0..12u32 {
            let mut s = validate(wire(vec![1, 2], vec![i, 1]), "m", 100).unwrap();
            s.drafter_version = i.to_string();
            b.add("model", s);
        }
        let shelf = b.shelf("model").unwrap();
        // Samples 4, 8, 12 (1-based) were held out; the held-out slice keeps the newest one (2 positions).
        let held: Vec<&str> = shelf
            .held_out()
            .map(|s| s.drafter_version.as_str())
            .collect();
        assert_eq!(held, vec!["11"]);
        let train: Vec<&str> = shelf.train().map(|s| s.drafter_version.as_str()).collect();
        assert_eq!(
            train,
            vec!["10", "9", "8"],
            "newest first, three samples of two positions"
        );
        assert_eq!(shelf.positions(), (6, 2));
        assert_eq!(b.positions(), 8);
        assert!(shelf.evicted() > 0);
        assert!(b.shelf("self").is_none());
    }
}
