//! The trainable drafter kinds behind one interface for the training loop: the self-drafter's exit
//! adapter (`self`, [`ExitTrainer`]) and the draft model's LoRA adapters (`model`, [`LoraTrainer`]).
//!
//! A [`Learner`] turns a captured [`Sample`] into what it trains on (exit states per position for the
//! exit adapter, which needs the frozen layers run once; the sequence itself with its kept positions for
//! LoRA, whose forward runs inside every step), takes optimizer steps on batches of those, measures
//! expected acceptance for the gate (its own and a live version's), and hands out its weights as a
//! [`TrainedWeights`] to publish.

use std::sync::Arc;

use specd_core::PositionMask;
use specd_engine::exit_train::{ExitSample, ExitTrainer};
use specd_engine::lora_train::{LoraTrainer, SeqSample};
use specd_engine::{EngineError, Model, TrainedWeights};

use crate::buffer::Sample;
use crate::train::TrainConfig;

/// A trainable drafter.
pub trait Learner: Sized {
    /// One unit of training data.
    type Item: Clone + Send;
    /// Fresh trained weights (an untrained adapter is the plain drafter).
    fn fresh(drafter: &Model, cfg: &TrainConfig) -> Result<Self, EngineError>;
    /// Training that goes on from published weights.
    fn resume(drafter: &Model, cfg: &TrainConfig, w: &TrainedWeights) -> Result<Self, EngineError>;
    /// Items per optimizer step.
    fn batch(cfg: &TrainConfig) -> usize;
    /// What `sample` gives to train on: the positions `mask` keeps.
    fn items(
        drafter: &Model,
        sample: &Sample,
        mask: PositionMask,
    ) -> Result<Vec<Self::Item>, EngineError>;
    /// Positions in `items`.
    fn positions(items: &[Self::Item]) -> usize;
    /// One optimizer step; the mean loss before it.
    fn step(&mut self, batch: &[Self::Item]) -> Result<f64, EngineError>;
    /// Mean expected acceptance of the weights being trained over `batch`.
    fn acceptance(&self, batch: &[Self::Item]) -> Result<f64, EngineError>;
    /// The same for other weights of this drafter (`None`: the plain drafter).
    fn acceptance_of(
        &self,
        w: Option<&TrainedWeights>,
        batch: &[Self::Item],
    ) -> Result<f64, EngineError>;
    fn weights(&self) -> Result<TrainedWeights, EngineError>;
}

fn kept(sample: &Sample, mask: PositionMask) -> impl Iterator<Item = &crate::buffer::Position> {
    sample
        .positions
        .iter()
        .filter(move |p| mask.keeps(p.draft.is_some() && !p.rejected))
}

fn other_kind(w: &TrainedWeights, want: &str) -> EngineError {
    let got = match w {
        TrainedWeights::Exit(_) => "an exit adapter",
        TrainedWeights::Lora(_) => "LoRA adapters",
    };
    EngineError::InvalidRequest(format!("{got} where {want} was expected"))
}

impl Learner for ExitTrainer {
    type Item = ExitSample;

    fn fresh(drafter: &Model, cfg: &TrainConfig) -> Result<Self, EngineError> {
        ExitTrainer::new(drafter, cfg.exit, 1)
    }

    fn resume(drafter: &Model, cfg: &TrainConfig, w: &TrainedWeights) -> Result<Self, EngineError> {
        match w {
            TrainedWeights::Exit(a) => ExitTrainer::resume(drafter, cfg.exit, a),
            other => Err(other_kind(other, "an exit adapter")),
        }
    }

    fn batch(cfg: &TrainConfig) -> usize {
        cfg.batch.max(1)
    }

    /// The exit states (the frozen layers run once over the context) and targets of the kept positions.
    fn items(
        drafter: &Model,
        sample: &Sample,
        mask: PositionMask,
    ) -> Result<Vec<ExitSample>, EngineError> {
        let kept: Vec<_> = kept(sample, mask).collect();
        let Some(upto) = kept.iter().map(|p| p.prefix).max() else {
            return Ok(Vec::new());
        };
        let d = drafter.config().hidden;
        let hidden = drafter.final_hidden(&mut drafter.new_cache(), &sample.context[..upto])?;
        Ok(kept
            .into_iter()
            .map(|p| ExitSample {
                hidden: hidden[(p.prefix - 1) * d..p.prefix * d].to_vec(),
                target: p.target.clone(),
            })
            .collect())
    }

    fn positions(items: &[ExitSample]) -> usize {
        items.len()
    }

    fn step(&mut self, batch: &[ExitSample]) -> Result<f64, EngineError> {
        ExitTrainer::step(self, batch)
    }

    fn acceptance(&self, batch: &[ExitSample]) -> Result<f64, EngineError> {
        self.expected_acceptance(batch)
    }

    fn acceptance_of(
        &self,
        w: Option<&TrainedWeights>,
        batch: &[ExitSample],
    ) -> Result<f64, EngineError> {
        match w {
            None => self.expected_acceptance_of(None, batch),
            Some(TrainedWeights::Exit(a)) => self.expected_acceptance_of(Some(a), batch),
            Some(other) => Err(other_kind(other, "an exit adapter")),
        }
    }

    fn weights(&self) -> Result<TrainedWeights, EngineError> {
        self.adapter().map(TrainedWeights::Exit)
    }
}

impl Learner for LoraTrainer {
    type Item = SeqSample;

    fn fresh(drafter: &Model, cfg: &TrainConfig) -> Result<Self, EngineError> {
        LoraTrainer::new(drafter, cfg.lora.clone(), 1)
    }

    fn resume(drafter: &Model, cfg: &TrainConfig, w: &TrainedWeights) -> Result<Self, EngineError> {
        match w {
            TrainedWeights::Lora(l) => LoraTrainer::resume(drafter, cfg.lora.clone(), l),
            other => Err(other_kind(other, "LoRA adapters")),
        }
    }

    fn batch(cfg: &TrainConfig) -> usize {
        cfg.lora_batch.max(1)
    }

    /// The sequence up to its last kept position, with the kept positions' targets.
    fn items(
        _drafter: &Model,
        sample: &Sample,
        mask: PositionMask,
    ) -> Result<Vec<SeqSample>, EngineError> {
        let positions: Vec<(usize, specd_core::TopTarget)> = kept(sample, mask)
            .map(|p| (p.prefix, p.target.clone()))
            .collect();
        let Some(upto) = positions.iter().map(|p| p.0).max() else {
            return Ok(Vec::new());
        };
        Ok(vec![SeqSample {
            context: Arc::from(&sample.context[..upto]),
            positions,
        }])
    }

    fn positions(items: &[SeqSample]) -> usize {
        items.iter().map(|s| s.positions.len()).sum()
    }

    fn step(&mut self, batch: &[SeqSample]) -> Result<f64, EngineError> {
        LoraTrainer::step(self, batch)
    }

    fn acceptance(&self, batch: &[SeqSample]) -> Result<f64, EngineError> {
        self.expected_acceptance(batch)
    }

    fn acceptance_of(
        &self,
        w: Option<&TrainedWeights>,
        batch: &[SeqSample],
    ) -> Result<f64, EngineError> {
        match w {
            None => self.expected_acceptance_of(None, batch),
            Some(TrainedWeights::Lora(l)) => self.expected_acceptance_of(Some(l), batch),
            Some(other) => Err(other_kind(other, "LoRA adapters")),
        }
    }

    fn weights(&self) -> Result<TrainedWeights, EngineError> {
        self.adapter().map(TrainedWeights::Lora)
    }
}
