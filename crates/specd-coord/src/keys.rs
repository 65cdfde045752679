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

/// `/specd/v1/drafters/{model}/current`: the live drafter version of a model (a pointer, never weights).
pub fn drafter_current(model: &str) -> String {
    format!("{PREFIX}drafters/{}/current", segment(model))
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
            drafter_current("smollm"),
            "/specd/v1/drafters/smollm/current"
        );
        assert_eq!(load("r0"), "/specd/v1/load/r0");
        assert_eq!(trainer_election("qwen"), "/specd/v1/election/trainer/qwen");
        assert_eq!(
            drafter_current("Qwen/Coder"),
            "/specd/v1/drafters/Qwen%2FCoder/current"
        );
        assert!(instance(Role::Router, "x").starts_with(&instances()));
        assert!(load("x").starts_with(&loads()));
        assert!(drafter_current("x").starts_with(&drafters()));
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
