//! The behavioural suite on `MemoryStore`, under paused tokio time, plus memory-only edge cases.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[macro_use]
mod suite;

use std::time::Duration;

use specd_coord::{MemoryStore, Store, WatchEvent};
use suite::{next_event, Harness};

fn harness() -> Harness {
    let store = Store::memory();
    Harness {
        other: store.clone(),
        store,
        expiry_slack: Duration::ZERO,
    }
}

macro_rules! memory_tests {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $case() {
                suite::$case(&harness()).await;
            }
        )*
    };
}

suite_cases!(memory_tests);

#[tokio::test(start_paused = true)]
async fn lease_expires_exactly_at_its_ttl() {
    let s = Store::memory();
    let lease = s.grant_lease(Duration::from_secs(10)).await.unwrap();
    s.put("/k", "v", Some(lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(9_990)).await;
    assert!(
        s.get("/k").await.unwrap().is_some(),
        "alive just before the TTL"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        s.get("/k").await.unwrap().is_none(),
        "gone just after the TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn lagging_watcher_gets_a_resync() {
    // Broadcast buffer of 2 batches and a watch buffer of 256: 600 unread writes overflow both.
    let s = Store::Memory(MemoryStore::with_limits(10_000, 2));
    let mut w = s.watch_prefix("/lag/", 0).await.unwrap();
    for i in 0..600 {
        s.put(&format!("/lag/{i:04}"), "x", None).await.unwrap();
    }
    let last = s.put("/lag/last", "x", None).await.unwrap();
    // Drain: somewhere there must be a resync, and the consumer's view must end up complete.
    let mut keys = std::collections::BTreeSet::new();
    let mut resyncs = 0;
    let mut seen_rev = 0;
    while seen_rev < last {
        let ev = next_event(&mut w, Duration::from_secs(1)).await;
        assert!(
            ev.revision() > seen_rev || matches!(ev, WatchEvent::Resync { .. }),
            "revisions go forward"
        );
        seen_rev = ev.revision();
        match ev {
            WatchEvent::Put { key, .. } => {
                keys.insert(key);
            }
            WatchEvent::Delete { key, .. } => {
                keys.remove(&key);
            }
            WatchEvent::Resync { snapshot } => {
                resyncs += 1;
                keys = snapshot.entries.into_iter().map(|e| e.key).collect();
            }
        }
    }
    assert!(resyncs >= 1, "the lagging watcher must have been resynced");
    assert_eq!(keys.len(), 601);
}

#[tokio::test(start_paused = true)]
async fn history_overflow_counts_as_compaction() {
    let s = Store::Memory(MemoryStore::with_limits(4, 64));
    let first = s.put("/h/0", "x", None).await.unwrap();
    for i in 1..10 {
        s.put(&format!("/h/{i}"), "x", None).await.unwrap();
    }
    let mut w = s.watch_prefix("/h/", first).await.unwrap();
    match next_event(&mut w, Duration::from_secs(1)).await {
        WatchEvent::Resync { snapshot } => assert_eq!(snapshot.entries.len(), 10),
        other => panic!("expected a resync, got {other:?}"),
    }
    // Within the retained history, replay still works.
    let rev = s.get_prefix("/h/").await.unwrap().revision;
    let mut w = s.watch_prefix("/h/", rev - 1).await.unwrap();
    assert_eq!(
        next_event(&mut w, Duration::from_secs(1)).await.revision(),
        rev - 1
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_store_ends_watches_and_lease_timers() {
    let s = Store::memory();
    let lease = s.grant_lease(Duration::from_secs(5)).await.unwrap();
    s.put("/d/k", "v", Some(lease)).await.unwrap();
    let mut w = s.watch_prefix("/d/", 0).await.unwrap();
    drop(s);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("ends"),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn compacting_the_future_is_a_config_error() {
    let s = Store::memory();
    let rev = s.put("/x", "v", None).await.unwrap();
    let err = s.compact(rev + 5).await.expect_err("future revision");
    assert_eq!(err.error_type(), "config");
}
