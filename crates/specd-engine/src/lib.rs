//! specd's model engine: everything that touches model weights, in one process.
//!
//! - `qweight`: weight matrices and the batch-invariant quantized matmul (the kernel everything rests on).
//! - `config`, `load`: model shape and loading from GGUF (quantized) and safetensors (float).
//! - `model`, `kv`: the Qwen2/Llama decoder over ragged batches, logits at every position, per-sequence KV
//!   caches with rollback.
//! - `drafter`: the [`Drafter`] trait and its kinds (a draft model, a self-drafter cut from the target's
//!   first layers, a model-free n-gram/token-recycling drafter).
//! - `speculate`: the single-process speculation loop (draft, verify, roll back, adapt k).
//! - `adapter`: the self-drafter's exit adapter, its serving arithmetic and its weight file.
//! - `exit_train`: distilling a self-drafter's early exit (an `ExitAdapter` before its final norm) with
//!   candle autograd against the target's captured distributions.
//! - `tp`: tensor parallelism: the shard plan, the collective trait and its CPU (TCP) backend, rank 0
//!   driving the other ranks through each forward.
//! - `testing`: tiny random-weight model files for hermetic tests.
//!
//! It does not do networking, scheduling across processes, or the training loop's policy (what to train
//! on, when, and what to publish); those live in the services.

pub mod adapter;
pub mod config;
pub mod drafter;
pub mod error;
pub mod exit_train;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod model;
pub mod preset;
pub mod qweight;
pub mod speculate;
pub mod testing;
pub mod tp;

pub use config::{Family, ModelConfig, RopeStyle};
pub use drafter::{Drafter, DrafterKind, Proposal};
pub use error::EngineError;
pub use kv::KvCache;
pub use load::{load_gguf, load_safetensors, LoadedModel};
pub use model::{ExitAdapter, LogitsWanted, Model, SeqInput};
pub use preset::{build_drafter, Preset};
pub use speculate::{FinishReason, GenerateOptions, GenerationStats, Generator};
