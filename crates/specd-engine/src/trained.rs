//! What online distillation publishes for a drafter, whatever its kind: an exit adapter for the
//! self-drafter or LoRA adapters for the draft model, one file format each, told apart by the file's
//! `format` metadata.
//!
//! The trainer service and drafter workers handle versions through [`TrainedWeights`] without caring
//! which kind they hold: [`TrainedWeights::from_file_bytes`] reads either file for the drafter it will be
//! applied to (refusing one that does not fit it), [`TrainedWeights::apply_to`] builds the adapted
//! drafter.

use crate::adapter::ExitAdapter;
use crate::error::EngineError;
use crate::lora::LoraAdapter;
use crate::model::Model;

/// A drafter's trained weights.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainedWeights {
    /// The self-drafter's exit adapter.
    Exit(ExitAdapter),
    /// Low-rank adapters on the draft model's projections.
    Lora(LoraAdapter),
}

impl TrainedWeights {
    /// Reads a weight file for `drafter` (the drafter as loaded, without trained weights).
    pub fn from_file_bytes(data: &[u8], drafter: &Model) -> Result<Self, EngineError> {
        if LoraAdapter::is_lora_file(data) {
            LoraAdapter::from_file_bytes(data, drafter.weights(), drafter.config().layers)
                .map(Self::Lora)
        } else {
            ExitAdapter::from_file_bytes(data, drafter.config().hidden).map(Self::Exit)
        }
    }

    pub fn to_file_bytes(&self) -> Result<Vec<u8>, EngineError> {
        match self {
            Self::Exit(a) => a.to_file_bytes(),
            Self::Lora(l) => l.to_file_bytes(),
        }
    }

    /// `drafter` with these weights (replacing any it had of the same kind).
    pub fn apply_to(&self, drafter: &Model) -> Result<Model, EngineError> {
        match self {
            Self::Exit(a) => drafter.with_adapter(Some(a.clone())),
            Self::Lora(l) => drafter.with_lora(Some(l.clone())),
        }
    }
}
