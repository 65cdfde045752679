//! `specd-router`: the front door of a specd cluster.
//!
//! - [`api`]: the public gRPC service `specd.v1.Generation` (`Generate`, `GenerateStream`, `Tokenize`,
//!   `ListModels`), deadlines from `grpc-timeout`.
//! - [`http`]: the OpenAI-compatible HTTP API (completions and chat, SSE streaming), health, metrics.
//! - [`core`]: the request path both front ends share: validation and tokenization, admission,
//!   the speculation loop, text and stop strings, metrics.
//! - [`spec`]: the distributed speculation loop over one target stream and one drafter stream, with
//!   adaptive draft length and the fallbacks that keep a worker failure from failing a request.
//! - [`conn`]: one sequence's streams to its workers, with rollback bookkeeping.
//! - [`pool`]: the live worker set from the coordination store, and placement.
//! - [`admission`]: bounded concurrency and queue; [`output`]: incremental text with stop strings.
//!
//! It loads no model weights: only the target's tokenizer and shape, from the GGUF metadata.

pub mod admission;
pub mod api;
pub mod conn;
pub mod core;
pub mod http;
pub mod output;
pub mod pool;
pub mod spec;
