//! `specd-core`: the pure, device-independent part of the speculative-decoding server.
//!
//! Owns the domain types and the math that decides which tokens are emitted:
//! - [`sampling`]: request sampling parameters and the seedable [`Sampler`];
//! - [`dist`]: [`SparseDist`], the truncated/tempered next-token distribution built from logits;
//! - [`verify`]: the lossless speculative-sampling acceptance rule ([`verify()`], [`verify_greedy`]);
//! - [`spec_len`]: the cost model and per-sequence controller choosing how many tokens to draft;
//! - [`stats`]: a chi-square goodness-of-fit test, used to check losslessness statistically;
//! - [`distill`]: the distillation losses (forward/reverse KL, JSD, total variation) over the target's
//!   captured top-w distributions, their gradients with respect to a drafter's logits, and expected
//!   acceptance.
//!
//! It does no I/O, runs no models and knows nothing about tensors, devices or async runtimes:
//! callers hand it plain `&[f32]` logits and token ids.

pub mod dist;
pub mod distill;
pub mod sampling;
pub mod spec_len;
pub mod stats;
pub mod verify;

pub use dist::{argmax, DistError, SparseDist};
pub use distill::{
    expected_acceptance, loss_and_grad, DistillError, Loss, PositionMask, TopTarget,
};
pub use sampling::{ParamError, Sampler, SamplingParams};
pub use spec_len::{CostModel, RowCostModel, SpecLenController};
pub use stats::{chi_square_sf, chi_square_test, ChiSquare};
pub use verify::{verify, verify_greedy, Verdict, VerifyError};
