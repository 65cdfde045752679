//! `specd-worker`: the drafter and target workers, thin gRPC servers around the engine.
//!
//! - [`target`]: `Target.Verify`, the target model with verification batched across sequences on one
//!   engine thread (rejection sampling per sequence, rollback by `keep_len`).
//! - [`drafter`]: `Drafter.Draft`, one drafter instance per sequence (draft model, self-drafter or the
//!   n-gram drafter sharing one recycling table per worker).
//! - [`swap`]: hot swap of the trained self-drafter: follow the live version in the store, fetch and
//!   check its weights, switch new sequences to it.
//! - [`samples`]: distillation sample capture on targets and the bounded sender to a trainer.
//! - [`slots`]: per-worker admission (capacity, draining); [`convert`]: wire checks and conversions;
//!   [`stream`]: the request/answer discipline both streams share.
//! - [`serve_worker`]: what both roles do around their service: bind, health and reflection, register
//!   in the coordination store with a lease and keep the load figure fresh, drain on shutdown.
//!
//! Model loading and the command line live in the `specd` binary; the router lives in `specd-router`.

pub mod convert;
pub mod drafter;
pub mod samples;
pub mod slots;
pub mod stream;
pub mod swap;
pub mod target;

use std::net::SocketAddr;
use std::time::Duration;

use specd_coord::{InstanceRecord, Registration, Role, Store};
use specd_service::{Drain, Shutdown};
use tokio::task::JoinHandle;
use tonic::transport::server::Router;

/// What a worker says about itself in `Info` and in its registration.
#[derive(Clone, Debug, Default)]
pub struct WorkerIdentity {
    pub instance_id: String,
    /// The target model's name (a drafter worker drafts for it).
    pub model: String,
    pub family: String,
    pub fingerprint: String,
    pub context: usize,
    pub weights_version: String,
}

impl WorkerIdentity {
    /// The `Info` answer of a worker with this identity.
    pub fn info(
        &self,
        role: Role,
        capacity: u32,
        active: u32,
        held: u32,
        drafter_kinds: Vec<String>,
    ) -> specd_proto::internal::v1::WorkerInfo {
        specd_proto::internal::v1::WorkerInfo {
            role: role.as_str().to_string(),
            instance_id: self.instance_id.clone(),
            model: self.model.clone(),
            family: self.family.clone(),
            tokenizer_fingerprint: self.fingerprint.clone(),
            context_length: self.context as u32,
            capacity,
            active_sequences: active,
            held_sequences: held,
            drafter_kinds,
            weights_version: self.weights_version.clone(),
            kv_budget_tokens: 0,
            kv_reserved_tokens: 0,
        }
    }
}

/// Where and how a worker serves.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// gRPC listen address (port 0 picks a free one).
    pub grpc_addr: SocketAddr,
    /// Address registered for routers to dial; default: the bound address (loopback if unspecified).
    pub advertise: Option<String>,
    pub store: Store,
    /// TTL of the registration lease: a worker that stops renewing it leaves placement within this.
    pub lease_ttl: Duration,
    /// How long a draining worker waits for its open sequences.
    pub drain_deadline: Duration,
    pub shutdown: Shutdown,
}

/// A started worker.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub advertised: String,
    /// Ends when the worker has drained and stopped.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// The address to advertise for a bound socket.
pub fn advertise_addr(bound: SocketAddr, explicit: Option<&str>) -> String {
    match explicit {
        Some(a) => a.to_string(),
        None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Serves `router` (the role's service already added) with health and reflection, registers `record`
/// (address filled in), publishes the load every second, and on shutdown: NOT_SERVING, deregister,
/// drain within the deadline, stop.
pub async fn serve_worker(
    router: Router,
    health_name: &'static str,
    mut record: InstanceRecord,
    load: impl Fn() -> u32 + Send + Sync + 'static,
    drain: Drain,
    opts: ServeOptions,
) -> anyhow::Result<Running> {
    let (router, health) = specd_service::grpc::add_common(router)?;
    let (listener, bound) = specd_service::grpc::bind(opts.grpc_addr).await?;
    let advertised = advertise_addr(bound, opts.advertise.as_deref());
    record.address = advertised.clone();
    specd_service::grpc::set_serving(&health, health_name, true).await;
    let registration = Registration::register(opts.store.clone(), record.clone(), opts.lease_ttl)
        .await
        .map_err(|e| anyhow::anyhow!("registering {} in the coordination store: {e}", record.id))?;
    let role = record.role;
    tracing::info!(role = %role, id = %record.id, address = %advertised, "worker serving");

    let stop = Shutdown::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { stop.wait().await },
                )
                .await
        })
    };
    let task = tokio::spawn(async move {
        let mut last = u32::MAX;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = opts.shutdown.wait() => break,
                _ = drain.failed() => {
                    tracing::error!(role = %role, "worker failed; leaving placement");
                    break;
                }
                _ = tick.tick() => {
                    let now = load();
                    if now != last && registration.update(now).await.is_ok() {
                        last = now;
                    }
                }
            }
        }
        tracing::info!(role = %role, "draining");
        specd_service::grpc::set_serving(&health, health_name, false).await;
        if let Err(e) = registration.deregister().await {
            tracing::warn!(error = %e, "deregistering failed; the lease will expire instead");
        }
        let left = drain.drain(opts.drain_deadline).await;
        if left > 0 {
            tracing::warn!(left, "drain deadline passed with sequences still open");
        }
        stop.trigger();
        // Streams still open past the deadline keep the server up; do not wait for them forever.
        match tokio::time::timeout(Duration::from_secs(2), server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("gRPC server did not stop within 2 s of the drain"),
        }
        tracing::info!(role = %role, "stopped");
        if drain.has_failed() {
            anyhow::bail!("the {role} worker failed (see the log) and stopped");
        }
        Ok(())
    });
    Ok(Running {
        grpc_addr: bound,
        advertised,
        task,
    })
}

/// The role name used in health checks for a role.
pub fn health_name(role: Role) -> &'static str {
    match role {
        Role::Target => "specd.internal.v1.Target",
        Role::Drafter => "specd.internal.v1.Drafter",
        Role::Router => "specd.v1.Generation",
        Role::Trainer => "specd.internal.v1.Trainer",
    }
}
