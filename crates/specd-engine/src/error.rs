//! The engine's error type: one enum for everything a model load or a forward pass can refuse.
//!
//! Callers (the CLI, later the workers) map it to exit codes and gRPC `Status`; it never carries a panic.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} not found (run `make models` to fetch the default models)")]
    ModelNotFound { path: PathBuf },
    #[error("cannot read model file {path}: {cause}")]
    Io {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("invalid or unsupported model: {0}")]
    BadModel(String),
    #[error(transparent)]
    Tokenizer(#[from] specd_tokenizer::TokenizerError),
    #[error("sequence of {len} tokens exceeds the model's context of {max} tokens")]
    ContextOverflow { len: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("the drafter's tokenizer ({drafter}) differs from the target's ({target})")]
    TokenizerMismatch { drafter: String, target: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Params(#[from] specd_core::ParamError),
    #[error(transparent)]
    Dist(#[from] specd_core::DistError),
    #[error(transparent)]
    Verify(#[from] specd_core::VerifyError),
    #[error("tensor-parallel group: {0}")]
    Collective(#[from] crate::tp::CollectiveError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::BadModel(e.to_string())
    }
}
