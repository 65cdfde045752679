//! `specd-trainer`: the trainer service of online speculative decoding (OSD).
//!
//! - [`buffer`]: the replay buffer, one per (model, drafter kind): validated samples, newest first,
//!   bounded in positions, with a held-out slice for evaluating candidate drafters.
//! - [`idle`]: [`idle::IdleGate`], whether the routers' published load leaves room for a training step.
//! - [`service`]: `Trainer` over gRPC (`SubmitSamples` into the buffer, dropping and counting what it
//!   cannot take, and counting drafted/accepted tokens per drafter version; `Status`; `FetchWeights`,
//!   published files in chunks), and [`service::lead`], one leader per drafter model through the
//!   coordination store's election: target workers stream their samples to the leader, a standby takes
//!   over when the leader's lease goes.
//! - [`learner`]: the trainable drafter kinds behind one interface: the self-drafter's exit adapter and
//!   the draft model's LoRA adapters.
//! - [`train`]: the distillation loop, on a thread of its own: a learner trained on new (then replayed)
//!   samples while this trainer leads and the cluster is idle, resumed from the live version,
//!   candidates gated on held-out acceptance and published.
//! - [`weights`]: the weight store, published files in a directory; [`publish`]: version records with
//!   lineage, compare-and-swap of the live pointer, rollback on a bad report or a live regression.
//!
//! Not here yet (issue 9's remaining work): per-domain shelves.
//! Serving, registration and drain come from the binary (`specd trainer`, `specd up`).

pub mod buffer;
pub mod idle;
pub mod learner;
pub mod publish;
pub mod service;
pub mod train;
pub mod weights;
