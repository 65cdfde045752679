//! `specd-trainer`: the trainer service of online speculative decoding (OSD).
//!
//! - [`buffer`]: the replay buffer, one per (model, drafter kind): validated samples, newest first,
//!   bounded in positions, with a held-out slice for evaluating candidate drafters.
//! - [`idle`]: [`idle::IdleGate`], whether the routers' published load leaves room for a training step.
//! - [`service`]: `Trainer` over gRPC (`SubmitSamples` into the buffer, dropping and counting what it
//!   cannot take; `Status`; `FetchWeights`, which serves nothing until a version is published), and
//!   [`service::lead`], one leader per drafter model through the coordination store's election: target
//!   workers stream their samples to the leader, a standby takes over when the leader's lease goes.
//!
//! Not here yet (issue 9's remaining work): the distillation loop (gated by [`idle`]) over the engine's
//! trainable exit adapter (`specd_engine::exit_train`),
//! the evaluation gate, publishing and hot swap. The losses they will use are `specd_core::distill`.
//! Serving, registration and drain come from the binary (`specd trainer`, `specd up`).

pub mod buffer;
pub mod idle;
pub mod service;
