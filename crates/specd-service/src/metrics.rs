//! Prometheus metrics: one recorder per process (shared by every service of `specd up`), rendered by
//! `GET /metrics`; names follow vLLM's with a `specd_` prefix (`specd_time_to_first_token_seconds`, ...).
//!
//! Services record through the `metrics` macros; [`install`] must run first or the records go nowhere.
//! [`serve_http`] is the workers' small HTTP endpoint (`/metrics`, `/health`).

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::shutdown::Shutdown;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 20.0, 60.0,
];
/// Token-count buckets.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS)?
        .install_recorder()
        .or_else(|e| {
            // Lost a race with another installer in this process: use theirs.
            HANDLE.get().cloned().ok_or(e)
        })?;
    let _ = HANDLE.set(handle.clone());
    describe();
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    HANDLE.get().map(|h| h.render()).unwrap_or_default()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "specd_requests_total",
        "Requests that completed, by finish reason (failures: specd_request_errors_total)"
    );
    describe_counter!(
        "specd_request_errors_total",
        "Requests failed, by API and gRPC code"
    );
    describe_gauge!("specd_num_requests_running", "Requests being generated");
    describe_gauge!(
        "specd_num_requests_waiting",
        "Requests admitted and waiting for a slot"
    );
    describe_histogram!(
        "specd_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from request to first token"
    );
    describe_histogram!(
        "specd_time_per_output_token_seconds",
        Unit::Seconds,
        "Decode time per output token after the first"
    );
    describe_histogram!(
        "specd_e2e_request_latency_seconds",
        Unit::Seconds,
        "Time from request to last token"
    );
    describe_histogram!(
        "specd_request_queue_time_seconds",
        Unit::Seconds,
        "Time waiting for admission"
    );
    describe_histogram!("specd_request_prompt_tokens", "Prompt tokens per request");
    describe_histogram!(
        "specd_request_generation_tokens",
        "Generated tokens per request"
    );
    describe_counter!("specd_prompt_tokens_total", "Prompt tokens processed");
    describe_counter!("specd_generation_tokens_total", "Tokens generated");
    describe_counter!(
        "specd_spec_decode_num_draft_tokens_total",
        "Draft tokens proposed"
    );
    describe_counter!(
        "specd_spec_decode_num_accepted_tokens_total",
        "Draft tokens accepted"
    );
    describe_counter!(
        "specd_spec_decode_num_accepted_tokens_per_pos_total",
        "Accepted draft tokens by position"
    );
    describe_counter!("specd_spec_decode_steps_total", "Verification steps");
    describe_histogram!(
        "specd_router_step_overhead_seconds",
        Unit::Seconds,
        "Router time per step outside the workers"
    );
    describe_histogram!(
        "specd_worker_step_seconds",
        Unit::Seconds,
        "Worker time per step, by role"
    );
    describe_gauge!(
        "specd_worker_active_sequences",
        "Sequences open on a worker, by role"
    );
    describe_counter!(
        "specd_fallbacks_total",
        "Requests that lost a worker mid-flight and went on, by role"
    );
}

/// Serves `GET /metrics` and `GET /health` on `addr` until `shutdown` fires; returns the bound address.
pub async fn serve_http(
    addr: SocketAddr,
    shutdown: Shutdown,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    install()?;
    let app = axum::Router::new()
        .route("/metrics", get(|| async { render() }))
        .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics endpoint {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}
