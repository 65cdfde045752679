//! Test support: a real etcd child process on free loopback ports, for this crate's tests and for any
//! integration test that needs etcd.
//!
//! [`EtcdServer`] starts `etcd` with a temporary data dir, waits until a client gets an answer, can be
//! killed and restarted on the same data dir and ports (to test outages), and kills the process when
//! dropped. [`etcd_or_skip`] implements the policy for machines without etcd: under `CI` that is a
//! failure pointing at `scripts/setup.sh`, elsewhere the test prints `SKIP` and returns.

use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::etcd::EtcdConfig;
use crate::store::Store;

/// The etcd binary name looked up on `PATH`.
pub const ETCD_BINARY: &str = "etcd";

/// Whether an `etcd` binary can be run.
pub fn etcd_available() -> bool {
    Command::new(ETCD_BINARY)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts etcd, or decides the test cannot run: panics under `CI` (the environment is broken),
/// otherwise prints `SKIP: etcd not installed` and returns `None`.
pub async fn etcd_or_skip() -> Option<EtcdServer> {
    if !etcd_available() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "etcd is not installed but CI is set: run scripts/setup.sh to install etcd-server"
            );
        }
        eprintln!("SKIP: etcd not installed");
        return None;
    }
    match EtcdServer::start().await {
        Ok(server) => Some(server),
        Err(err) => panic!("could not start etcd: {err}"),
    }
}

/// A throwaway single-member etcd cluster.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    data_dir: TempDir,
    log_path: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it answers (usually well under a second).
    /// Heartbeat 50 ms and election timeout 500 ms make its minimum lease TTL 1 s (default: 2 s).
    pub async fn start() -> io::Result<EtcdServer> {
        let data_dir = tempfile::Builder::new().prefix("specd-etcd-").tempdir()?;
        let log_path = std::env::temp_dir().join(format!(
            "specd-etcd-{}.log",
            data_dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let mut server = EtcdServer {
            child: None,
            data_dir,
            log_path,
            client_port,
            peer_port,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Client settings with short deadlines, suited to tests.
    pub fn config(&self) -> EtcdConfig {
        let mut config = EtcdConfig::new([self.endpoint()]);
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(2);
        config
    }

    /// A new client of this server.
    pub async fn store(&self) -> Store {
        // The config is built here and always valid; connecting is lazy and cannot fail otherwise.
        Store::etcd(self.config()).await.expect("valid etcd config")
    }

    /// SIGKILLs etcd (no graceful shutdown), keeping its data dir and ports.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports; waits until it answers.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// Starts etcd again on the same data dir but another client port, so clients of the old endpoint
    /// stay cut off (e.g. to write while a watcher cannot possibly be connected). [`EtcdServer::endpoint`]
    /// and [`EtcdServer::store`] follow the new port.
    pub async fn restart_with_client_port(&mut self, port: u16) -> io::Result<()> {
        self.kill();
        self.client_port = port;
        self.spawn_and_wait().await
    }

    /// The current client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The tail of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn spawn_and_wait(&mut self) -> io::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(ETCD_BINARY)
            .arg("--name=default")
            .arg(format!(
                "--data-dir={}",
                self.data_dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> io::Result<()> {
        let mut config = self.config();
        config.request_timeout = Duration::from_millis(500);
        let store = Store::etcd(config)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                let status = status?;
                return Err(io::Error::other(format!(
                    "etcd exited with {status}; log:\n{}",
                    self.log_tail()
                )));
            }
            if store.get("/specd-ready").await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd not ready after 15 s; log:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log_path);
    }
}
