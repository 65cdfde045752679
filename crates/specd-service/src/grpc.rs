//! A tonic server with the parts every specd service exposes: gRPC health checking (`grpc.health.v1`)
//! and server reflection over specd's descriptors, both `grpc.reflection.v1` and `v1alpha` (grpcurl 1.8
//! and ghz only speak v1alpha). Also the transport settings every server and client shares: message size
//! limits and HTTP/2 + TCP keepalive, so a peer that vanishes without closing its connection (a frozen or
//! partitioned host) is noticed and its streams end.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;

/// Largest message any specd server or client encodes or decodes, set explicitly on every generated
/// server and client (tonic's default decode limit is 4 MiB and its encode limit unbounded). The largest
/// legitimate messages are prompts (4 bytes per token id, so a 1M-token context is 4 MiB) and proposals
/// (bounded by construction: at most 32 drafts of at most `DRAFT_SUPPORT` entries each, a few KB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// HTTP/2 keepalive of a connection: a PING every `interval`; no answer within `timeout` closes the
/// connection and ends its streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A tonic server builder with specd's transport settings: HTTP/2 keepalive (a client whose host froze
/// or vanished without FIN/RST stops answering PINGs, its connection is closed and every stream on it
/// ends, freeing what the handlers hold), TCP keepalive, no Nagle delay.
pub fn server(keepalive: Keepalive) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
        .tcp_keepalive(Some(keepalive.interval))
        .tcp_nodelay(true)
}

/// A client endpoint for `http://{address}` with the same settings, connected lazily.
pub fn endpoint(address: &str, keepalive: Keepalive) -> Result<tonic::transport::Endpoint, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address:?}: {e}"))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .tcp_keepalive(Some(keepalive.interval))
                .http2_keep_alive_interval(keepalive.interval)
                .keep_alive_timeout(keepalive.timeout)
                .keep_alive_while_idle(true)
        })
}

/// A bound listener, so the address (port 0 picks a free one) is known before serving.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the gRPC address {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Marks `service` and the whole server (the empty service name) SERVING or NOT_SERVING.
pub async fn set_serving(health: &HealthReporter, service: &str, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in ["", service] {
        health.set_service_status(name, status).await;
    }
}

/// Adds health checking and reflection to a server router; returns the health reporter, with which the
/// service marks itself SERVING or NOT_SERVING.
pub fn add_common(router: Router) -> anyhow::Result<(Router, HealthReporter)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(specd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(specd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let router = router
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, health))
}
