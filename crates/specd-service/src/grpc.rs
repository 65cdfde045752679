//! A tonic server with the parts every specd service exposes: gRPC health checking (`grpc.health.v1`)
//! and server reflection over specd's descriptors, both `grpc.reflection.v1` and `v1alpha` (grpcurl 1.8
//! and ghz only speak v1alpha).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;

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
