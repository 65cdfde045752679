//! The key layout of the coordination store: every key specd writes is built here, under one versioned
//! prefix, so a layout change is one `v2` away and no other crate formats keys by hand.
//!
//! Segments (model names, ids) are escaped so that a `/` inside them (as in `Qwen/Qwen2.5-Coder`) cannot
//! change the key's shape: `%` becomes `%25` and `/` becomes `%2F`.

use crate::records::Role;

/// Every specd key starts with this.
pub const PREFIX: &str = "/specd/v1/";

/// Escapes one path segment (`%` -> `%25`, `/` -> `%2F`).
pub fn segment(raw: &str) -> String {
    raw.replace('%', "%25").replace('/', "%2F")
}

/// Reverses [`segment`].
pub fn unescape(segment: &str) -> String {
    segment
        .replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%25", "%")
}

/// Prefix of all instance registrations.
pub fn instances() -> String {
    format!("{PREFIX}instances/")
}

/// Prefix of the registrations of one role, e.g. `/specd/v1/instances/drafter/`.
pub fn instances_of(role: Role) -> String {
    format!("{PREFIX}instances/{}/", role.as_str())
}

/// `/specd/v1/instances/{role}/{id}`: attached to the instance's lease.
pub fn instance(role: Role, id: &str) -> String {
    format!("{PREFIX}instances/{}/{}", role.as_str(), segment(id))
}

/// Splits an instance key back into its role and id.
pub fn parse_instance(key: &str) -> Option<(Role, String)> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix("instances/")?;
    let (role, id) = rest.split_once('/')?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    Some((role.parse().ok()?, unescape(id)))
}

/// Prefix of every published drafter version record.
pub fn drafters() -> String {
    format!("{PREFIX}drafters/")
}

/// `/specd/v1/drafters/{model}/{kind}/`: everything about one trainable drafter of a model.
pub fn drafter(model: &str, kind: &str) -> String {
    format!("{PREFIX}drafters/{}/{}/", segment(model), segment(kind))
}

/// `/specd/v1/drafters/{model}/{kind}/current`: the live version of a drafter (a pointer, never
/// weights). Written by the leading trainer only, by compare-and-swap.
pub fn drafter_current(model: &str, kind: &str) -> String {
    format!("{}current", drafter(model, kind))
}

/// `/specd/v1/drafters/{model}/{kind}/versions/{version}`: every version ever published, with its
/// lineage and gate figures (zero-padded so that keys sort by version).
pub fn drafter_version(model: &str, kind: &str, version: u64) -> String {
    format!("{}versions/{version:020}", drafter(model, kind))
}

/// `/specd/v1/drafters/{model}/{kind}/bad/{version}/{reporter}`: a drafter worker's report that a
/// version's weights did not verify or load.
pub fn drafter_bad(model: &str, kind: &str, version: u64, reporter: &str) -> String {
    format!(
        "{}bad/{version:020}/{}",
        drafter(model, kind),
        segment(reporter)
    )
}

/// Prefix of all router load reports.
pub fn loads() -> String {
    format!("{PREFIX}load/")
}

/// `/specd/v1/load/{router}`: a router's load report, attached to its lease.
pub fn load(router: &str) -> String {
    format!("{PREFIX}load/{}", segment(router))
}

/// `/specd/v1/election/trainer/{model}`: one trainer leader per drafter model.
pub fn trainer_election(model: &str) -> String {
    format!("{PREFIX}election/trainer/{}", segment(model))
}

/// `/specd/v1/tp/{group}`: rank 0 of a multi-process tensor-parallel group, attached to its lease.
pub fn tp_group(group: &str) -> String {
    format!("{PREFIX}tp/{}", segment(group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(
            instance(Role::Drafter, "d-1"),
            "/specd/v1/instances/drafter/d-1"
        );
        assert_eq!(instances_of(Role::Target), "/specd/v1/instances/target/");
        assert_eq!(
            drafter_current("smollm", "self"),
            "/specd/v1/drafters/smollm/self/current"
        );
        assert_eq!(
            drafter_version("smollm", "self", 3),
            "/specd/v1/drafters/smollm/self/versions/00000000000000000003"
        );
        assert_eq!(
            drafter_bad("smollm", "self", 3, "d/1"),
            "/specd/v1/drafters/smollm/self/bad/00000000000000000003/d%2F1"
        );
        assert_eq!(load("r0"), "/specd/v1/load/r0");
        assert_eq!(trainer_election("qwen"), "/specd/v1/election/trainer/qwen");
        assert_eq!(
            drafter_current("Qwen/Coder", "self"),
            "/specd/v1/drafters/Qwen%2FCoder/self/current"
        );
        assert!(instance(Role::Router, "x").starts_with(&instances()));
        assert!(load("x").starts_with(&loads()));
        assert!(drafter_current("x", "self").starts_with(&drafter("x", "self")));
        assert!(drafter("x", "self").starts_with(&drafters()));
    }

    #[test]
    fn parse_instance_rejects_other_keys() {
        assert_eq!(parse_instance("/specd/v1/load/r0"), None);
        assert_eq!(parse_instance("/specd/v1/instances/nope/x"), None);
        assert_eq!(parse_instance("/specd/v1/instances/router/"), None);
        assert_eq!(parse_instance("/specd/v1/instances/router/a/b"), None);
    }

    proptest! {
        #[test]
        fn segments_round_trip_and_never_contain_a_slash(raw in ".{0,24}") {
            let seg = segment(&raw);
            prop_assert!(!seg.contains('/'));
            prop_assert_eq!(unescape(&seg), raw.clone());
            if !raw.is_empty() {
                let key = instance(Role::Target, &raw);
                prop_assert_eq!(parse_instance(&key), Some((Role::Target, raw)));
            }
        }
    }
}
