//! The behavioural suite on a real etcd child process, plus what only a real server can show:
//! surviving an etcd restart, and failing fast while it is down.
//!
//! Without an `etcd` binary these tests print `SKIP: etcd not installed` and pass, except under `CI`,
//! where they fail and point at `scripts/setup.sh`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[macro_use]
mod suite;

use std::time::Duration;

use specd_coord::testing::{etcd_or_skip, free_port};
use specd_coord::{
    keys, CoordError, EtcdConfig, InstanceRecord, Registration, RegistrationState, Role, Store,
    WatchEvent,
};
use suite::{next_event, record, wait_until, Harness, TTL};
use tokio::time::Instant;

macro_rules! etcd_tests {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let Some(etcd) = etcd_or_skip().await else { return };
                let harness = Harness {
                    store: etcd.store().await,
                    other: etcd.store().await,
                    // etcd's lessor looks for expired leases every 500 ms.
                    expiry_slack: Duration::from_millis(1500),
                };
                suite::$case(&harness).await;
                drop(etcd);
            }
        )*
    };
}

suite_cases!(etcd_tests);

#[tokio::test]
async fn registration_and_watch_survive_an_etcd_restart() {
    let Some(mut etcd) = etcd_or_skip().await else {
        return;
    };
    let store = etcd.store().await;
    let other = etcd.store().await;
    let reg = Registration::register(store.clone(), record("d-restart"), TTL)
        .await
        .unwrap();
    let key = reg.key().to_owned();
    let first = reg.lease().expect("registered");
    let prefix = keys::instances();
    let snap = other.get_prefix(&prefix).await.unwrap();
    let mut watch = other
        .watch_prefix(&prefix, snap.revision + 1)
        .await
        .unwrap();
    let mut states = reg.subscribe();

    etcd.kill();
    let down_at = Instant::now();
    let err = other.get(&key).await.expect_err("etcd is down");
    assert!(
        err.is_retryable(),
        "a dead etcd is Unavailable, got {err:?}"
    );
    eprintln!(
        "request against dead etcd failed after {:?}",
        down_at.elapsed()
    );
    // Stay down past the TTL so the keep-alive gives the lease up and the registration must re-grant.
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == RegistrationState::Reregistering),
    )
    .await
    .expect("lease loss noticed while etcd is down")
    .unwrap();
    eprintln!(
        "lease loss noticed {:?} after the kill (TTL {TTL:?})",
        down_at.elapsed()
    );

    // A detour first: etcd up on another client port, where our clients cannot reach it, takes a write.
    // The watch cannot be connected then, so it sees this write only if it resumes from its last
    // revision rather than from "now".
    let client_port = etcd.client_port();
    etcd.restart_with_client_port(free_port().unwrap())
        .await
        .unwrap();
    let early_key = keys::instance(Role::Router, "r-early");
    let early = etcd
        .store()
        .await
        .put(&early_key, "{}", None)
        .await
        .unwrap();
    etcd.restart_with_client_port(client_port).await.unwrap();
    let up_at = Instant::now();
    let took = wait_until(
        Duration::from_secs(8),
        "the registration to come back",
        || async {
            reg.lease().is_some_and(|l| l != first)
                && other.get(&key).await.is_ok_and(|v| v.is_some())
        },
    )
    .await;
    eprintln!(
        "registration back {took:?} after etcd restarted (down {:?})",
        up_at - down_at
    );

    // The watch resumed where it left off: it sees the re-registration and a put made after the restart.
    let rev = other
        .put(&keys::instance(Role::Router, "r-after"), "{}", None)
        .await
        .unwrap();
    let (mut saw_reregistration, mut saw_early) = (false, false);
    loop {
        match next_event(&mut watch, Duration::from_secs(8)).await {
            WatchEvent::Put { key: k, value, .. } if k == key => {
                assert_eq!(InstanceRecord::decode_bytes(&value).id, "d-restart");
                saw_reregistration = true;
            }
            WatchEvent::Put { mod_revision, .. } if mod_revision == early => saw_early = true,
            WatchEvent::Put { mod_revision, .. } if mod_revision == rev => break,
            WatchEvent::Resync { .. } => {
                panic!("no compaction happened; the watch must resume, not resync")
            }
            _ => {}
        }
    }
    assert!(
        saw_early,
        "the resumed watch must replay the put made while it was cut off"
    );
    assert!(
        saw_reregistration,
        "the resumed watch must replay the re-registration"
    );
    eprintln!(
        "watch resumed; total restart scenario {:?}",
        down_at.elapsed()
    );

    // The old lease was revoked (or expires): only the new one holds the key.
    reg.deregister().await.unwrap();
    assert!(other.get(&key).await.unwrap().is_none());
}

#[tokio::test]
async fn unreachable_etcd_is_unavailable_not_a_hang() {
    let mut config = EtcdConfig::new(["http://127.0.0.1:1"]);
    config.request_timeout = Duration::from_secs(2);
    let store = Store::etcd(config).await.expect("connects lazily");
    let start = Instant::now();
    let err = store
        .get("/x")
        .await
        .expect_err("nothing listens on port 1");
    assert!(matches!(err, CoordError::Unavailable(_)), "{err:?}");
    assert!(start.elapsed() <= Duration::from_secs(3));
    let err = Registration::register(store, record("nowhere"), TTL)
        .await
        .expect_err("no etcd");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn bad_config_is_rejected() {
    let err = Store::etcd(EtcdConfig::new(Vec::<String>::new()))
        .await
        .expect_err("no endpoints");
    assert_eq!(err.error_type(), "config");
}

trait DecodeBytes {
    fn decode_bytes(bytes: &[u8]) -> Self;
}

impl DecodeBytes for InstanceRecord {
    fn decode_bytes(bytes: &[u8]) -> Self {
        <InstanceRecord as specd_coord::Record>::decode(bytes).expect("instance record")
    }
}
