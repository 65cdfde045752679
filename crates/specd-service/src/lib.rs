//! `specd-service`: the plumbing every specd service shares, so the router and the workers behave alike.
//!
//! - [`telemetry`]: structured logs (text or JSON) and OpenTelemetry spans, exported over OTLP when an
//!   endpoint is configured; W3C trace context carried in gRPC metadata from the router to the workers.
//! - [`metrics`]: the process-wide Prometheus recorder and the `/metrics` + `/health` HTTP endpoint of
//!   the workers (the router serves the same routes on its OpenAI-compatible HTTP server).
//! - [`grpc`]: a tonic server with gRPC health checking and server reflection (v1 and v1alpha).
//! - [`weights`]: sha256 and the `Trainer.FetchWeights` client that checks a published file before use.
//! - [`shutdown`]: SIGTERM/SIGINT handling and the drain sequence (stop accepting, finish in-flight work
//!   within a deadline, then stop).
//!
//! It owns no request logic: services decide what to do on shutdown, which metrics to record and which
//! spans to open.

pub mod grpc;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod weights;

pub use shutdown::{Drain, Shutdown};

/// A random 64-bit id in hex, for request and instance ids.
pub fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
