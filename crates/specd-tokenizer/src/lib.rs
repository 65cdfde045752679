//! `specd-tokenizer`: the model's tokenizer, built from the GGUF model file's own metadata.
//!
//! Both the router (which must not link candle) and the engine need to turn text into
//! token ids and back with exactly the tokenizer the model was trained with, without any
//! hub access. This crate owns:
//!
//! - [`gguf_meta`]: a defensive GGUF (v2/v3) metadata reader — header, key/values and the
//!   tensor-info table, plus the data offset. It does **not** read tensor data.
//! - [`tokenizer`]: [`SpecdTokenizer`], a byte-level BPE tokenizer (`tokenizer.ggml.model ==
//!   "gpt2"`, as used by Qwen2 and SmolLM2) built from `tokenizer.ggml.*` metadata, with a
//!   stable [`SpecdTokenizer::fingerprint`] to pair drafters with targets.
//! - [`stream`]: [`DecodeStream`], incremental detokenization that never emits a partial
//!   UTF-8 character.
//! - [`chat`]: ChatML prompt rendering for instruct models.
//! - [`testing`]: writers for tiny GGUF files so tests (here and in other crates) can
//!   exercise the full GGUF → tokenizer path without real model files.
//!
//! It does not own tensor data, model weights, or anything candle-related.

pub mod chat;
pub mod gguf_meta;
pub mod stream;
pub mod testing;
pub mod tokenizer;

pub use chat::{chat_prompt_ids, prompt_ids, render_chat, render_prompt, ChatMessage};
pub use gguf_meta::{GgufMeta, GgufValueType, MetaValue, TensorInfo};
pub use stream::DecodeStream;
pub use tokenizer::{PreTokenizerKind, SpecdTokenizer};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Reading the file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The input is not a well-formed GGUF file (the reason says where and why).
    #[error("bad GGUF: {0}")]
    BadGguf(String),
    /// The GGUF file uses a tokenizer model this crate cannot build (e.g. `llama`).
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// A required metadata key is absent.
    #[error("missing GGUF metadata key `{0}`")]
    MissingKey(String),
    /// A metadata key is present but its value is unusable.
    #[error("invalid GGUF metadata value for `{key}`: {reason}")]
    InvalidValue {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building the tokenizer from the metadata failed.
    #[error("failed to build tokenizer: {0}")]
    Build(String),
    /// Encoding text failed.
    #[error("encode failed: {0}")]
    Encode(String),
    /// Decoding ids failed (e.g. an id outside the vocabulary).
    #[error("decode failed: {0}")]
    Decode(String),
    /// A chat message or template cannot be rendered.
    #[error("invalid chat: {0}")]
    Chat(String),
}

/// Shorthand for results in this crate.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
