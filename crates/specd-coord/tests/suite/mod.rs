//! The behavioural suite every backend must pass, written once against `Store`.
//!
//! `tests/memory.rs` runs it on `MemoryStore` with paused tokio time; `tests/etcd.rs` on a real etcd
//! child process with real time. `suite_cases!` lists the cases so both files run all of them.
//! Timing bounds are checked with tokio's clock: virtual under paused time, wall time otherwise.

#![allow(clippy::unwrap_used, dead_code)] // tests: a panic is the failure report

use std::future::Future;
use std::time::Duration;

use specd_coord::{
    keys, CoordError, InstanceRecord, LeaseId, Record, Registration, RegistrationState, Role,
    Store, Watch, WatchEvent,
};
use tokio::time::Instant;

/// Expands `$m!(case, ...)` with every case of the suite.
macro_rules! suite_cases {
    ($m:ident) => {
        $m!(
            put_get_prefix,
            lease_expiry_removes_keys,
            revoke_removes_keys_at_once,
            watch_sees_puts_and_deletes_in_order,
            watch_replays_history_from_a_revision,
            watch_resyncs_after_compaction,
            compare_and_swap_conflicts,
            election_has_one_leader_and_hands_over,
            registration_updates_and_deregisters,
            registration_drops_out_when_keepalive_stops,
            registration_comes_back_after_revoke,
        );
    };
}

/// One backend under test.
pub struct Harness {
    pub store: Store,
    /// A second, independent client (another process's view).
    pub other: Store,
    /// How much later than its TTL the backend may expire a lease (etcd checks expiry every 500 ms).
    pub expiry_slack: Duration,
}

pub const TTL: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds; returns how long that took, panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next watch event, failing the test if none comes within `limit`.
pub async fn next_event(watch: &mut Watch, limit: Duration) -> WatchEvent {
    tokio::time::timeout(limit, watch.next())
        .await
        .expect("watch event in time")
        .expect("watch still open")
}

fn put(key: &str, value: &str, rev: i64) -> WatchEvent {
    WatchEvent::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        mod_revision: rev,
    }
}

fn del(key: &str, rev: i64) -> WatchEvent {
    WatchEvent::Delete {
        key: key.into(),
        mod_revision: rev,
    }
}

async fn exists(store: &Store, key: &str) -> bool {
    store.get(key).await.expect("get").is_some()
}

pub fn record(id: &str) -> InstanceRecord {
    InstanceRecord {
        role: Role::Drafter,
        id: id.into(),
        address: "127.0.0.1:7100".into(),
        model: "smollm".into(),
        family: "llama".into(),
        tokenizer_fingerprint: "fp".into(),
        capacity: 8,
        load: 0,
        drafter_kinds: vec!["ngram".into()],
        weights_version: Some(1),
    }
}

pub async fn put_get_prefix(h: &Harness) {
    let s = &h.store;
    let r1 = s.put("/t/p/b", "2", None).await.unwrap();
    let r2 = s.put("/t/p/a", "1", None).await.unwrap();
    let r3 = s.put("/t/q", "outside", None).await.unwrap();
    assert!(
        r1 < r2 && r2 < r3,
        "revisions must increase: {r1} {r2} {r3}"
    );
    assert_eq!(s.get("/t/p/a").await.unwrap(), Some((b"1".to_vec(), r2)));
    assert_eq!(s.get("/t/p/zz").await.unwrap(), None);

    let snap = s.get_prefix("/t/p/").await.unwrap();
    let keys: Vec<_> = snap
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_slice(), e.mod_revision))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("/t/p/a", b"1".as_slice(), r2),
            ("/t/p/b", b"2".as_slice(), r1)
        ]
    );
    assert!(snap.revision >= r3);

    // Overwrite bumps the key's mod revision; the other other client sees the same thing.
    let r4 = s.put("/t/p/a", "1b", None).await.unwrap();
    assert!(r4 > r3);
    assert_eq!(
        h.other.get("/t/p/a").await.unwrap(),
        Some((b"1b".to_vec(), r4))
    );

    assert!(s.delete("/t/p/a").await.unwrap());
    assert!(
        !s.delete("/t/p/a").await.unwrap(),
        "deleting a missing key reports false"
    );
    assert_eq!(s.get_prefix("/t/p/").await.unwrap().entries.len(), 1);

    // Typed records round-trip through the store.
    let rec = record("d-1");
    s.put_record(&rec, None).await.unwrap();
    assert_eq!(
        s.get_record::<InstanceRecord>(&rec.key()).await.unwrap(),
        Some(rec.clone())
    );
    s.put(&keys::instance(Role::Drafter, "garbage"), "not json", None)
        .await
        .unwrap();
    let (listed, _) = s
        .list_records::<InstanceRecord>(&keys::instances_of(Role::Drafter))
        .await
        .unwrap();
    assert_eq!(listed, vec![rec], "undecodable entries are skipped");
}

pub async fn lease_expiry_removes_keys(h: &Harness) {
    let s = &h.store;
    let doomed = s.grant_lease(TTL).await.unwrap();
    let kept = s.grant_lease(TTL).await.unwrap();
    let _keep_alive = s.keep_alive(kept).await.unwrap();
    s.put("/t/lease/a", "a", Some(doomed)).await.unwrap();
    s.put("/t/lease/b", "b", Some(doomed)).await.unwrap();
    s.put("/t/lease/kept", "k", Some(kept)).await.unwrap();
    s.put("/t/lease/plain", "p", None).await.unwrap();

    let took = wait_until(
        TTL + h.expiry_slack + POLL,
        "leased keys to expire",
        || async { s.get_prefix("/t/lease/").await.unwrap().entries.len() == 2 },
    )
    .await;
    eprintln!(
        "[{}] lease with TTL {TTL:?} expired after {took:?}",
        s.backend()
    );
    let left: Vec<_> = s
        .get_prefix("/t/lease/")
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        left,
        vec!["/t/lease/kept".to_string(), "/t/lease/plain".to_string()]
    );

    // The kept-alive lease outlives several TTLs.
    tokio::time::sleep(TTL * 3).await;
    assert!(
        exists(s, "/t/lease/kept").await,
        "keep-alive must keep the lease"
    );

    // Writing under an expired lease is LeaseLost, and a dead lease cannot be kept alive.
    let err = s
        .put("/t/lease/late", "x", Some(doomed))
        .await
        .expect_err("expired lease");
    assert!(matches!(err, CoordError::LeaseLost(_)), "{err:?}");
    let err = s.keep_alive(doomed).await.expect_err("expired lease");
    assert!(matches!(err, CoordError::LeaseLost(_)), "{err:?}");
}

pub async fn revoke_removes_keys_at_once(h: &Harness) {
    let s = &h.store;
    let ttl = Duration::from_secs(3);
    let lease = s.grant_lease(ttl).await.unwrap();
    let keep_alive = s.keep_alive(lease).await.unwrap();
    s.put("/t/revoke/a", "a", Some(lease)).await.unwrap();
    h.other.revoke(lease).await.unwrap();
    assert!(
        !exists(s, "/t/revoke/a").await,
        "revoke deletes the lease's keys immediately"
    );
    h.other.revoke(lease).await.expect("revoking twice is fine");
    // The keep-alive learns that its lease is gone.
    tokio::time::timeout(ttl / 3 + Duration::from_secs(2), keep_alive.lost())
        .await
        .expect("keep-alive reports the revoked lease as lost");
    assert!(keep_alive.is_lost());
}

pub async fn watch_sees_puts_and_deletes_in_order(h: &Harness) {
    let s = &h.store;
    let start = s.get_prefix("/t/w/").await.unwrap();
    let mut w = s.watch_prefix("/t/w/", start.revision + 1).await.unwrap();
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let r1 = s.put("/t/w/a", "1", None).await.unwrap();
    s.put("/t/other", "x", None).await.unwrap();
    let r2 = h.other.put("/t/w/b", "2", None).await.unwrap();
    s.delete("/t/w/a").await.unwrap();
    let r3 = s.get_prefix("/t/").await.unwrap().revision;
    let r4 = s.put("/t/w/c", "3", Some(lease)).await.unwrap();
    let r5 = s.put("/t/w/d", "4", Some(lease)).await.unwrap();
    s.revoke(lease).await.unwrap();
    let r6 = s.get_prefix("/t/").await.unwrap().revision;

    let limit = Duration::from_secs(5);
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(next_event(&mut w, limit).await);
    }
    assert_eq!(
        got,
        vec![
            put("/t/w/a", "1", r1),
            put("/t/w/b", "2", r2),
            del("/t/w/a", r3),
            put("/t/w/c", "3", r4),
            put("/t/w/d", "4", r5),
            // A revoke deletes all of the lease's keys in one revision.
            del("/t/w/c", r6),
            del("/t/w/d", r6),
        ]
    );
    // Nothing else: the key outside the prefix is not reported.
    assert!(tokio::time::timeout(Duration::from_millis(200), w.next())
        .await
        .is_err());
}

pub async fn watch_replays_history_from_a_revision(h: &Harness) {
    let s = &h.store;
    let r1 = s.put("/t/h/a", "1", None).await.unwrap();
    let r2 = s.put("/t/h/a", "2", None).await.unwrap();
    let r3 = s.put("/t/h/b", "3", None).await.unwrap();
    let mut w = h.other.watch_prefix("/t/h/", r2).await.unwrap();
    let limit = Duration::from_secs(5);
    assert_eq!(next_event(&mut w, limit).await, put("/t/h/a", "2", r2));
    assert_eq!(next_event(&mut w, limit).await, put("/t/h/b", "3", r3));
    let r4 = s.put("/t/h/c", "4", None).await.unwrap();
    assert_eq!(next_event(&mut w, limit).await, put("/t/h/c", "4", r4));
    assert!(r1 < r2);

    // from_revision <= 0 means "changes after this call".
    let mut now = s.watch_prefix("/t/h/", 0).await.unwrap();
    let r5 = s.put("/t/h/d", "5", None).await.unwrap();
    assert_eq!(next_event(&mut now, limit).await, put("/t/h/d", "5", r5));
}

pub async fn watch_resyncs_after_compaction(h: &Harness) {
    let s = &h.store;
    let r1 = s.put("/t/c/a", "1", None).await.unwrap();
    s.put("/t/c/b", "2", None).await.unwrap();
    s.delete("/t/c/a").await.unwrap();
    let r3 = s.put("/t/c/c", "3", None).await.unwrap();
    s.compact(r3).await.unwrap();
    let err = s.compact(r3).await.expect_err("already compacted");
    assert_eq!(err.error_type(), "config", "{err:?}");
    let err = s.compact(r3 + 100).await.expect_err("future revision");
    assert_eq!(err.error_type(), "config", "{err:?}");

    let mut w = s.watch_prefix("/t/c/", r1).await.unwrap();
    let limit = Duration::from_secs(5);
    match next_event(&mut w, limit).await {
        WatchEvent::Resync { snapshot } => {
            let keys: Vec<_> = snapshot.entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, vec!["/t/c/b", "/t/c/c"]);
            assert!(snapshot.revision >= r3);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    let r4 = s.put("/t/c/d", "4", None).await.unwrap();
    assert_eq!(next_event(&mut w, limit).await, put("/t/c/d", "4", r4));
}

pub async fn compare_and_swap_conflicts(h: &Harness) {
    let s = &h.store;
    let k = "/t/cas/k";
    assert!(
        s.compare_and_swap(k, None, "v1", None).await.unwrap(),
        "create when absent"
    );
    assert!(
        !h.other
            .compare_and_swap(k, None, "other", None)
            .await
            .unwrap(),
        "second create conflicts"
    );
    let (v, rev) = s.get(k).await.unwrap().unwrap();
    assert_eq!(v, b"v1");
    assert!(
        !s.compare_and_swap(k, Some(rev - 1), "stale", None)
            .await
            .unwrap(),
        "stale revision conflicts"
    );
    let new_rev = s
        .compare_and_swap_revision(k, Some(rev), "v2", None)
        .await
        .unwrap()
        .expect("swap");
    assert!(new_rev > rev);
    assert!(
        !h.other
            .compare_and_swap(k, Some(rev), "v3", None)
            .await
            .unwrap(),
        "old revision now stale"
    );
    assert_eq!(s.get(k).await.unwrap(), Some((b"v2".to_vec(), new_rev)));

    assert!(!s.compare_and_delete(k, rev).await.unwrap());
    assert!(s.compare_and_delete(k, new_rev).await.unwrap());
    assert!(!exists(s, k).await);

    // A winning CAS under a dead lease is LeaseLost; a losing one just loses.
    let lease = s.grant_lease(TTL).await.unwrap();
    s.revoke(lease).await.unwrap();
    let err = s
        .compare_and_swap(k, None, "x", Some(lease))
        .await
        .expect_err("dead lease");
    assert!(matches!(err, CoordError::LeaseLost(_)), "{err:?}");
    s.put(k, "y", None).await.unwrap();
    assert!(!s.compare_and_swap(k, None, "x", Some(lease)).await.unwrap());
}

pub async fn election_has_one_leader_and_hands_over(h: &Harness) {
    let key = &keys::trainer_election("smollm");
    let (a, b, c) = (&h.store, h.other.clone(), h.other.clone());
    let la = a.grant_lease(TTL).await.unwrap();
    let lb = b.grant_lease(TTL).await.unwrap();
    let lc = c.grant_lease(TTL).await.unwrap();
    let _ka = a.keep_alive(la).await.unwrap();
    let kb = b.keep_alive(lb).await.unwrap();
    let _kc = c.keep_alive(lc).await.unwrap();

    let leader_a = a.campaign(key, "a", la).await.unwrap();
    assert_eq!(
        a.leader(key).await.unwrap().as_deref(),
        Some(b"a".as_slice())
    );
    let again = a.campaign(key, "a", la).await.unwrap();
    assert_eq!(
        again.revision(),
        a.get(key).await.unwrap().unwrap().1,
        "re-campaign keeps leadership"
    );
    drop(leader_a);
    let mut leader_a = again;

    let b_task = tokio::spawn({
        let b = b.clone();
        let key = key.clone();
        async move { b.campaign(&key, "b", lb).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_task.is_finished(), "b must wait while a leads");
    assert!(leader_a.is_leader().await.unwrap());
    leader_a.proclaim("a2").await.unwrap();
    assert_eq!(
        a.leader(key).await.unwrap().as_deref(),
        Some(b"a2".as_slice())
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!b_task.is_finished(), "a proclaiming does not hand over");

    let resigned_at = Instant::now();
    leader_a.resign().await.unwrap();
    let leader_b = tokio::time::timeout(Duration::from_secs(3), b_task)
        .await
        .expect("b leads after a resigns")
        .unwrap()
        .unwrap();
    eprintln!(
        "[{}] hand-over after resign took {:?}",
        a.backend(),
        resigned_at.elapsed()
    );
    assert_eq!(
        a.leader(key).await.unwrap().as_deref(),
        Some(b"b".as_slice())
    );
    assert!(leader_b.is_leader().await.unwrap());

    let c_task = tokio::spawn({
        let c = c.clone();
        let key = key.clone();
        async move { c.campaign(&key, "c", lc).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c_task.is_finished(), "c must wait while b leads");

    // b stops keeping its lease alive: its leadership ends when the lease expires, and c takes over.
    let stopped_at = Instant::now();
    drop(kb);
    tokio::time::timeout(
        TTL + h.expiry_slack + Duration::from_secs(1),
        leader_b.lost(),
    )
    .await
    .expect("b's leadership ends with its lease")
    .unwrap();
    let leader_c = tokio::time::timeout(Duration::from_secs(3), c_task)
        .await
        .expect("c leads after b's lease expired")
        .unwrap()
        .unwrap();
    eprintln!(
        "[{}] hand-over after lease expiry took {:?}",
        a.backend(),
        stopped_at.elapsed()
    );
    assert_eq!(
        a.leader(key).await.unwrap().as_deref(),
        Some(b"c".as_slice())
    );
    assert!(!leader_b.is_leader().await.unwrap());
    let err = {
        let mut b = leader_b;
        b.proclaim("b again").await.expect_err("b lost leadership")
    };
    assert!(matches!(err, CoordError::Conflict(_)), "{err:?}");
    assert!(leader_c.is_leader().await.unwrap());
}

pub async fn registration_updates_and_deregisters(h: &Harness) {
    let s = &h.store;
    let reg = Registration::register(s.clone(), record("d-up"), TTL)
        .await
        .unwrap();
    let key = reg.key().to_owned();
    assert!(matches!(reg.state(), RegistrationState::Registered { .. }));
    let lease = reg.lease().expect("registered");
    reg.update(5).await.unwrap();
    reg.update_with(|r| r.weights_version = Some(7))
        .await
        .unwrap();
    let got = h
        .other
        .get_record::<InstanceRecord>(&key)
        .await
        .unwrap()
        .expect("registered");
    assert_eq!((got.load, got.weights_version), (5, Some(7)));

    // Still there after several TTLs: the keep-alive works.
    tokio::time::sleep(TTL * 3).await;
    assert!(exists(&h.other, &key).await);
    assert_eq!(
        reg.lease(),
        Some(lease),
        "the same lease, kept alive, not a re-registration"
    );
    let state = reg.subscribe();
    reg.deregister().await.unwrap();
    assert_eq!(*state.borrow(), RegistrationState::Deregistered);
    assert!(
        !exists(&h.other, &key).await,
        "deregister removes the record at once"
    );
}

pub async fn registration_drops_out_when_keepalive_stops(h: &Harness) {
    let s = &h.store;
    let reg = Registration::register(s.clone(), record("d-hung"), TTL)
        .await
        .unwrap();
    let key = reg.key().to_owned();
    let first = reg.lease().expect("registered");
    reg.pause_keepalive().await.unwrap();
    let prefix = keys::instances_of(Role::Drafter);
    let took = wait_until(
        TTL + h.expiry_slack + POLL,
        "the hung registration to drop out",
        || async {
            !h.other
                .get_prefix(&prefix)
                .await
                .unwrap()
                .entries
                .iter()
                .any(|e| e.key == key)
        },
    )
    .await;
    eprintln!(
        "[{}] paused registration dropped out after {took:?} (TTL {TTL:?})",
        s.backend()
    );
    // It stays out while paused.
    tokio::time::sleep(TTL).await;
    assert!(!exists(&h.other, &key).await);

    reg.resume_keepalive().await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "re-registration after resume",
        || async { exists(&h.other, &key).await && reg.lease().is_some_and(|l| l != first) },
    )
    .await;
    reg.deregister().await.unwrap();
}

pub async fn registration_comes_back_after_revoke(h: &Harness) {
    let s = &h.store;
    let reg = Registration::register(s.clone(), record("d-revoked"), TTL)
        .await
        .unwrap();
    let key = reg.key().to_owned();
    reg.update(3).await.unwrap();
    let first: LeaseId = reg.lease().expect("registered");
    h.other.revoke(first).await.unwrap();
    assert!(!exists(&h.other, &key).await);
    let took = wait_until(
        Duration::from_secs(5),
        "re-registration after revoke",
        || async {
            h.other
                .get_record::<InstanceRecord>(&key)
                .await
                .unwrap()
                .is_some_and(|r| r.load == 3)
                && reg.lease().is_some_and(|l| l != first)
        },
    )
    .await;
    eprintln!(
        "[{}] re-registered {took:?} after its lease was revoked",
        s.backend()
    );
    drop(reg);
    // Dropping the handle revokes too (best effort, asynchronously).
    wait_until(
        Duration::from_secs(5),
        "dropped registration to be revoked",
        || async { !exists(&h.other, &key).await },
    )
    .await;
}
