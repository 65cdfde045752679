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
//! - `lora`: low-rank adapters on a draft model's projections (the distilled `model` drafter), their
//!   serving arithmetic and their weight file.
//! - `lora_train`: distilling a draft model's LoRA adapters with candle autograd through its frozen
//!   quantized layers, against the target's captured distributions.
//! - `tp`: tensor parallelism: the shard plan, the collective trait and its CPU (TCP) backend, rank 0
//!   driving the other ranks through each forward.
//! - `trained`: a drafter's trained weights of either kind (exit adapter, LoRA) behind one type and file
//!   reader, for the services that publish and swap them.
//! - `testing`: tiny random-weight model files for hermetic tests.
//!
//! It does not do networking, scheduling across processes, or the training loop's policy (what to train
//! on, when, and what to publish); those live in the services.

pub mod adapter;
mod attention;
pub mod config;
pub mod drafter;
pub mod error;
pub mod exit_train;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod lora;
pub mod lora_train;
pub mod model;
pub mod preset;
pub mod qweight;
pub mod speculate;
pub mod testing;
pub mod tp;
pub mod trained;

pub use config::{Family, ModelConfig, RopeStyle};
pub use drafter::{Drafter, DrafterKind, Proposal};
pub use error::EngineError;
pub use kv::KvCache;
pub use load::{load_gguf, load_safetensors, LoadedModel};
pub use lora::LoraAdapter;
pub use model::{ExitAdapter, LogitsWanted, Model, SeqInput};
pub use preset::{build_drafter, Preset};
pub use speculate::{FinishReason, GenerateOptions, GenerationStats, Generator};
pub use trained::TrainedWeights;
