//! Tensor-parallel target groups whose ranks are separate processes (`specd target --rank R --world N
//! --tp-group G`, one process per GPU or container, Kubernetes style): the rendezvous through the
//! coordination store, rank 0's start and the other ranks' loop.
//!
//! Rank 0 binds its collective listener, then writes `/specd/v1/tp/{group}` (its address, the world size,
//! a generation chosen at this start, the model file) attached to a lease of its own, loads its shard and
//! waits for the others; once the group has formed it serves `Target.Verify` and registers like any
//! target. Every other rank loads its shard, reads the record (waiting for it), joins that generation
//! and runs the steps rank 0 broadcasts until rank 0 shuts the group down. A follower exits with an
//! error when the group fails (a rank died: rank 0's next step fails too, it leaves placement and exits)
//! or when the record disappears or changes generation (rank 0 is gone or restarted), so a supervisor
//! restarts the whole group; on SIGTERM a follower waits (up to its drain deadline) for rank 0 to drain
//! and shut the group down.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use specd_coord::{keys, KeepAlive, Store, TpGroupRecord};
use specd_engine::tp::{Collective, TcpCollective};
use specd_engine::{EngineError, LoadedModel};
use specd_service::Shutdown;
use tokio::sync::{mpsc, oneshot};

use crate::cli::TpArgs;

/// One rank of a group of processes.
#[derive(Debug, Clone, Args)]
pub struct RankArgs {
    /// This process's rank in a tensor-parallel group of `--world` processes: 0 serves and registers the
    /// group, the others compute their shard of every step. Needs `--world` and `--tp-group`.
    #[arg(long, env = "SPECD_TP_RANK")]
    pub rank: Option<usize>,
    /// Processes in the group (all loading the same model file).
    #[arg(long, env = "SPECD_TP_WORLD")]
    pub world: Option<usize>,
    /// The group's name, the same on every rank and unique in the cluster (e.g. the pod's name).
    #[arg(long, env = "SPECD_TP_GROUP")]
    pub tp_group: Option<String>,
    /// Rank 0: where it listens for the other ranks.
    #[arg(long, env = "SPECD_TP_LISTEN", default_value = "0.0.0.0:50062")]
    pub tp_listen: SocketAddr,
    /// Rank 0: `host[:port]` the other ranks reach it at (default: 127.0.0.1 when listening on every
    /// interface, as ranks in one pod share its network; else the listen address).
    #[arg(long, env = "SPECD_TP_ADVERTISE")]
    pub tp_advertise: Option<String>,
    /// How long the ranks wait for each other at start (loading a shard counts).
    #[arg(long, env = "SPECD_TP_RENDEZVOUS_SECS", default_value_t = 300)]
    pub tp_rendezvous_secs: u64,
}

/// This process's place in a group of processes.
#[derive(Clone, Debug)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub group: String,
    pub rendezvous: Duration,
    /// Bound on every collective once the group has formed.
    pub timeout: Duration,
}

impl RankArgs {
    /// The process's rank, or `None` when it is not one rank of a group of processes.
    pub fn rank(&self, tp: &TpArgs) -> anyhow::Result<Option<Rank>> {
        let (rank, world) = match (self.rank, self.world) {
            (None, None) => {
                if self.tp_group.is_some() {
                    bail!("--tp-group names a group of processes: give --rank and --world too");
                }
                return Ok(None);
            }
            (Some(r), Some(w)) => (r, w),
            _ => bail!("--rank and --world go together"),
        };
        if world == 0 {
            bail!("--world must be at least 1");
        }
        if rank >= world {
            bail!("--rank {rank} is not in a group of {world} (ranks are 0..{world})");
        }
        if tp.tp > 1 {
            bail!(
                "--tp {} splits the target over threads of one process; --rank/--world over \
                 processes: use one or the other",
                tp.tp
            );
        }
        if world == 1 {
            return Ok(None);
        }
        let Some(group) = self.tp_group.clone().filter(|g| !g.is_empty()) else {
            bail!("a group of --world {world} processes needs --tp-group NAME (the same on every rank)");
        };
        if self.tp_rendezvous_secs == 0 {
            bail!("--tp-rendezvous-secs must be at least 1");
        }
        let timeout = tp.local_options(1)?.timeout;
        Ok(Some(Rank {
            rank,
            world,
            group,
            rendezvous: Duration::from_secs(self.tp_rendezvous_secs),
            timeout,
        }))
    }

    /// Where the other ranks reach a rank 0 listening on `local`.
    fn advertised(&self, local: SocketAddr) -> String {
        let port = local.port();
        match &self.tp_advertise {
            Some(a) if a.contains(':') => a.clone(),
            Some(host) => format!("{host}:{port}"),
            None if local.ip().is_unspecified() => format!("127.0.0.1:{port}"),
            None => local.to_string(),
        }
    }
}

fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rank 0: publishes the group's record, loads its shard and waits until every rank has joined. The
/// returned lease keeps the record alive; dropping it lets the record expire (revoke it to end sooner).
pub async fn lead(
    path: &Path,
    args: &RankArgs,
    me: &Rank,
    store: &Store,
    lease_ttl: Duration,
) -> anyhow::Result<(LoadedModel, KeepAlive)> {
    let listener = TcpListener::bind(args.tp_listen)
        .with_context(|| format!("tensor-parallel listener on {}", args.tp_listen))?;
    let addr = args.advertised(listener.local_addr()?);
    let generation = u64::from_str_radix(&specd_service::random_id(), 16)?;
    let lease = store.grant_lease(lease_ttl).await?;
    let keep = store.keep_alive(lease).await?;
    let record = TpGroupRecord {
        group: me.group.clone(),
        addr: addr.clone(),
        world: me.world as u32,
        generation,
        model: model_name(path),
    };
    store.put_record(&record, Some(lease)).await?;
    tracing::info!(
        group = %me.group, %addr, world = me.world, generation,
        "tensor-parallel rank 0: loading its shard and waiting for the other ranks"
    );
    let (path, me) = (path.to_path_buf(), me.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        specd_engine::tp::load_gguf_rank(&path, 0, me.world, || {
            let comm = TcpCollective::lead(listener, me.world, generation, me.rendezvous)?
                .with_timeout(me.timeout)?;
            Ok(Box::new(comm) as Box<dyn Collective>)
        })
    })
    .await
    .context("rank 0's loader panicked")?;
    match loaded {
        Ok(m) => Ok((m, keep)),
        Err(e) => {
            let _ = store.revoke(lease).await;
            Err(e.into())
        }
    }
}

/// What a follower's compute thread reports.
enum Event {
    /// Its shard is loaded; it looks for rank 0 next.
    Loaded,
    /// It joined rank 0 of this generation.
    Joined(u64),
}

/// A rank other than 0: loads its shard, joins the group and runs its steps until rank 0 shuts the group
/// down (`Ok`), the group fails, or rank 0's record goes away (`Err`). `on_loaded` runs once the shard is
/// in memory (the caller prints its banner there).
pub async fn follow(
    path: &Path,
    me: &Rank,
    store: &Store,
    shutdown: Shutdown,
    drain: Duration,
    on_loaded: impl FnOnce(),
) -> anyhow::Result<()> {
    let key = keys::tp_group(&me.group);
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let (done, mut done_rx) = oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    let (path2, me2, store2, key2) = (path.to_path_buf(), me.clone(), store.clone(), key.clone());
    // A plain thread, not a blocking task: it may sit in a socket read when the process exits, and the
    // runtime would wait for a blocking task.
    std::thread::Builder::new()
        .name(format!("tp-rank-{}", me.rank))
        .spawn(move || {
            let r = run_follower(&path2, &me2, &store2, &key2, &handle, &events);
            let _ = done.send(r);
        })
        .context("starting the rank's thread")?;
    let mut on_loaded = Some(on_loaded);
    let mut generation = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut done_rx => {
                return match r {
                    Ok(Ok(())) => {
                        tracing::info!(group = %me.group, rank = me.rank, "rank 0 shut the group down");
                        Ok(())
                    }
                    Ok(Err(e)) => Err(anyhow::Error::from(e)
                        .context(format!("tensor-parallel rank {} of group {}", me.rank, me.group))),
                    Err(_) => bail!("the rank's thread panicked"),
                };
            }
            Some(ev) = events_rx.recv() => match ev {
                Event::Loaded => {
                    if let Some(f) = on_loaded.take() {
                        f();
                    }
                }
                Event::Joined(g) => {
                    tracing::info!(group = %me.group, rank = me.rank, generation = g, "joined the group");
                    generation = Some(g);
                }
            },
            _ = shutdown.wait() => {
                // Rank 0 drains too and then shuts the group down; a follower that left first would fail
                // its in-flight steps.
                return match tokio::time::timeout(drain, &mut done_rx).await {
                    Ok(Ok(r)) => r.map_err(Into::into),
                    _ => {
                        tracing::warn!(group = %me.group, "rank 0 did not end the group within the drain deadline");
                        Ok(())
                    }
                };
            }
            _ = tick.tick(), if generation.is_some() => {
                match store.get_record::<TpGroupRecord>(&key).await {
                    Ok(Some(r)) if Some(r.generation) == generation => {}
                    Ok(Some(r)) => bail!(
                        "rank 0 of group {} restarted (generation {} -> {}): this rank must restart too",
                        me.group, generation.unwrap_or_default(), r.generation
                    ),
                    Ok(None) => bail!("rank 0 of group {} is gone (its record expired)", me.group),
                    Err(e) => tracing::warn!(error = %e, "reading the group's record (etcd unreachable?)"),
                }
            }
        }
    }
}

/// The follower's thread: load, find rank 0 through the store, join, follow.
fn run_follower(
    path: &Path,
    me: &Rank,
    store: &Store,
    key: &str,
    handle: &tokio::runtime::Handle,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), EngineError> {
    let rendezvous_by = Instant::now() + me.rendezvous;
    let model = model_name(path);
    let loaded = specd_engine::tp::load_gguf_rank(path, me.rank, me.world, || {
        let _ = events.send(Event::Loaded);
        loop {
            let left = rendezvous_by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EngineError::Collective(
                    specd_engine::tp::CollectiveError::Rendezvous(format!(
                        "no rank 0 of group {} to join within {:?}",
                        me.group, me.rendezvous
                    )),
                ));
            }
            let record = match handle.block_on(store.get_record::<TpGroupRecord>(key)) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the group's record");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            if record.world as usize != me.world || record.model != model {
                return Err(EngineError::Internal(format!(
                    "group {} is rank 0's {} processes of {}; this rank has --world {} and {}",
                    me.group, record.world, record.model, me.world, model
                )));
            }
            let addr = match record.addr.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => a,
                _ => {
                    tracing::warn!(addr = %record.addr, "rank 0's address does not resolve yet");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            // A record left by a rank 0 that died points at nothing: give up on it quickly and read
            // again (its lease expires within its TTL).
            match TcpCollective::join_within(
                addr,
                me.rank,
                me.world,
                record.generation,
                Duration::from_secs(2),
                left,
            ) {
                Ok(comm) => {
                    let _ = events.send(Event::Joined(record.generation));
                    return Ok(Box::new(comm.with_timeout(me.timeout)?) as Box<dyn Collective>);
                }
                Err(e) => {
                    tracing::info!(error = %e, addr = %record.addr, "joining rank 0; trying again");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })?;
    specd_engine::tp::follow(&loaded.model)
}

/// Rank 0 ends the group's record at once (the followers see it gone), instead of waiting out its TTL.
pub async fn retire(store: &Store, keep: KeepAlive) {
    let lease = keep.lease();
    drop(keep);
    if let Err(e) = store.revoke(lease).await {
        tracing::warn!(error = %e, "revoking the tensor-parallel group's lease");
    }
}
