//! `Registration`: an instance record kept in the store for as long as the process lives.
//!
//! An actor task owns the record, the lease and its [`KeepAlive`]. When the lease is lost (etcd was
//! unreachable for a TTL, restarted without it, or someone revoked it) the actor grants a new lease and
//! writes the record again, retrying with backoff until the store answers; the state is observable
//! through [`Registration::subscribe`]. `deregister` revokes the lease (graceful shutdown); dropping the
//! handle does the same, best effort.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::error::{CoordError, Result};
use crate::lease::KeepAlive;
use crate::records::{InstanceRecord, Record};
use crate::store::Store;
use crate::types::LeaseId;

/// Where a registration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// The record is in the store under `lease`, written at `revision`.
    Registered { lease: LeaseId, revision: i64 },
    /// The lease was lost; a new one is being granted and the record rewritten.
    Reregistering,
    /// `deregister` ran: the lease is revoked and the record gone.
    Deregistered,
}

enum Command {
    Update {
        apply: Box<dyn FnOnce(&mut InstanceRecord) + Send>,
        reply: oneshot::Sender<Result<()>>,
    },
    Pause(bool),
    Deregister {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to a live registration. Commands go to the owning actor with `oneshot` replies.
#[derive(Debug)]
pub struct Registration {
    key: String,
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<RegistrationState>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Update { .. } => "Update",
            Command::Pause(_) => "Pause",
            Command::Deregister { .. } => "Deregister",
        })
    }
}

fn gone() -> CoordError {
    CoordError::Unavailable("registration actor stopped".into())
}

impl Registration {
    /// Registers `record` under a fresh lease of `ttl` and keeps it registered. The first registration
    /// happens before this returns, so a store that is down at start-up is an error here.
    pub async fn register(
        store: Store,
        record: InstanceRecord,
        ttl: Duration,
    ) -> Result<Registration> {
        let key = record.key();
        let mut actor = Actor {
            store,
            record,
            key: key.clone(),
            ttl,
            keep_alive: None,
            paused: false,
        };
        let (lease, revision) = actor.register_once().await?;
        let (state_tx, state) = watch::channel(RegistrationState::Registered { lease, revision });
        let (commands, rx) = mpsc::channel(16);
        let task = tokio::spawn(actor.run(rx, state_tx));
        tracing::info!(key, lease = %lease, "registered");
        Ok(Registration {
            key,
            commands,
            state,
            task,
        })
    }

    /// The key the record lives under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// The lease the record is attached to, while registered.
    pub fn lease(&self) -> Option<LeaseId> {
        match *self.state.borrow() {
            RegistrationState::Registered { lease, .. } => Some(lease),
            _ => None,
        }
    }

    /// Follows state changes.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Publishes a new load figure.
    pub async fn update(&self, load: u32) -> Result<()> {
        self.update_with(move |r| r.load = load).await
    }

    /// Changes the record (e.g. `weights_version` after a hot swap) and publishes it. While
    /// re-registering the change is kept and written with the new lease, and this returns `Unavailable`.
    pub async fn update_with(
        &self,
        apply: impl FnOnce(&mut InstanceRecord) + Send + 'static,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Update {
                apply: Box::new(apply),
                reply,
            })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Fault injection (tests, chaos drills): stop refreshing the lease as a hung process would, so
    /// the record expires from the store after its TTL and is not re-registered until resumed.
    pub async fn pause_keepalive(&self) -> Result<()> {
        self.commands
            .send(Command::Pause(true))
            .await
            .map_err(|_| gone())
    }

    /// Undoes [`Registration::pause_keepalive`]: a lease lost meanwhile is re-granted and the record rewritten.
    pub async fn resume_keepalive(&self) -> Result<()> {
        self.commands
            .send(Command::Pause(false))
            .await
            .map_err(|_| gone())
    }

    /// Revokes the lease, removing the record at once (graceful shutdown).
    pub async fn deregister(self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Deregister { reply })
            .await
            .map_err(|_| gone())?;
        let res = rx.await.map_err(|_| gone())?;
        // The actor exits right after replying.
        let _ = self.task.await;
        res
    }
}

struct Actor {
    store: Store,
    record: InstanceRecord,
    key: String,
    ttl: Duration,
    keep_alive: Option<KeepAlive>,
    paused: bool,
}

impl Actor {
    /// Grants a lease, writes the record under it and starts keeping it alive.
    async fn register_once(&mut self) -> Result<(LeaseId, i64)> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let written = async {
            let bytes = self.record.encode()?;
            let revision = self.store.put(&self.key, bytes, Some(lease)).await?;
            let keep_alive = self.store.keep_alive(lease).await?;
            Ok::<_, CoordError>((revision, keep_alive))
        }
        .await;
        match written {
            Ok((revision, keep_alive)) => {
                if self.paused {
                    keep_alive.pause();
                }
                let old = self.keep_alive.replace(keep_alive).map(|k| k.lease());
                if let Some(old) = old.filter(|old| *old != lease) {
                    // The old lease may still exist server-side (etcd extends leases across a restart);
                    // it holds no keys any more, so revoke it rather than wait for it to expire.
                    if let Err(err) = self.store.revoke(old).await {
                        tracing::debug!(lease = %old, cause = %err, "could not revoke the old lease");
                    }
                }
                Ok((lease, revision))
            }
            Err(err) => {
                let _ = self.store.revoke(lease).await;
                Err(err)
            }
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        state: watch::Sender<RegistrationState>,
    ) {
        let mut backoff = Backoff::reconnect();
        loop {
            let lost = async {
                match &self.keep_alive {
                    Some(k) => k.lost().await,
                    None => std::future::ready(()).await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Update { apply, reply }) => {
                        apply(&mut self.record);
                        let res = self.publish().await;
                        if matches!(res, Err(CoordError::LeaseLost(_))) {
                            self.keep_alive = None;
                        }
                        let _ = reply.send(res);
                    }
                    Some(Command::Pause(paused)) => {
                        self.paused = paused;
                        if let Some(k) = &self.keep_alive {
                            if paused { k.pause() } else { k.resume() }
                        }
                    }
                    Some(Command::Deregister { reply }) => {
                        let _ = reply.send(self.revoke().await);
                        state.send_replace(RegistrationState::Deregistered);
                        return;
                    }
                    None => {
                        // The handle was dropped without deregistering: clean up, best effort.
                        let _ = self.revoke().await;
                        return;
                    }
                },
                () = lost => {
                    tracing::warn!(key = %self.key, "registration lease lost; re-registering");
                    state.send_replace(RegistrationState::Reregistering);
                    if !self.reregister(&mut commands, &state, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    async fn publish(&self) -> Result<()> {
        let Some(keep_alive) = &self.keep_alive else {
            return Err(CoordError::Unavailable("re-registering".into()));
        };
        let bytes = self.record.encode()?;
        self.store
            .put(&self.key, bytes, Some(keep_alive.lease()))
            .await
            .map(drop)
    }

    async fn revoke(&mut self) -> Result<()> {
        match self.keep_alive.take() {
            Some(k) => self.store.revoke(k.lease()).await,
            None => Ok(()),
        }
    }

    /// Retries `register_once` until it works, serving commands meanwhile. False if the actor must stop.
    async fn reregister(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        state: &watch::Sender<RegistrationState>,
        backoff: &mut Backoff,
    ) -> bool {
        loop {
            if !self.paused {
                match self.register_once().await {
                    Ok((lease, revision)) => {
                        tracing::info!(key = %self.key, lease = %lease, "re-registered");
                        backoff.reset();
                        state.send_replace(RegistrationState::Registered { lease, revision });
                        return true;
                    }
                    Err(err) => {
                        tracing::debug!(key = %self.key, cause = %err, "re-registration failed; retrying")
                    }
                }
            }
            let delay = backoff.next_delay();
            let deadline = tokio::time::sleep(delay);
            tokio::pin!(deadline);
            // Serve commands until the next attempt is due.
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    command = commands.recv() => match command {
                        Some(Command::Update { apply, reply }) => {
                            apply(&mut self.record);
                            let _ = reply.send(Err(CoordError::Unavailable("re-registering".into())));
                        }
                        Some(Command::Pause(paused)) => {
                            self.paused = paused;
                            if !paused {
                                break;
                            }
                        }
                        Some(Command::Deregister { reply }) => {
                            let _ = reply.send(self.revoke().await);
                            state.send_replace(RegistrationState::Deregistered);
                            return false;
                        }
                        None => return false,
                    },
                }
            }
        }
    }
}
