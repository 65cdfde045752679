//! Leader election over compare-and-swap, identical on both backends.
//!
//! The leader of an election key is whoever created the key, attached to its lease: `campaign` tries
//! to create it (CAS on "does not exist"); if someone holds it, it watches the key from the holder's
//! revision until it is deleted (resignation, or the holder's lease expired) and tries again. One key,
//! one leader; leadership lasts exactly as long as the key, i.e. at most as long as the lease, so a
//! leader must stop leading when its [`crate::KeepAlive`] reports loss (or [`Leadership::lost`] resolves).
//!
//! It does not queue candidates fairly (etcd's election API does): waiting candidates race on each
//! vacancy, which is fine for one trainer leader per drafter model.

use crate::error::{CoordError, Result};
use crate::store::Store;
use crate::types::{LeaseId, WatchEvent};

/// Held leadership of one election key.
#[derive(Debug)]
pub struct Leadership {
    store: Store,
    key: String,
    lease: LeaseId,
    mod_revision: i64,
}

impl Store {
    /// Waits until this candidate leads `election_key`, then returns its leadership. The key holds
    /// `candidate_value` (e.g. the candidate's address) and is attached to `lease`, which the caller
    /// keeps alive. Fails with `LeaseLost` if `lease` is gone when it gets its chance. Campaigning again
    /// with the lease that already leads returns the same leadership.
    pub async fn campaign(
        &self,
        election_key: &str,
        candidate_value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Result<Leadership> {
        let value = candidate_value.into();
        loop {
            if let Some(rev) = self
                .compare_and_swap_revision(election_key, None, value.clone(), Some(lease))
                .await?
            {
                return Ok(self.leadership(election_key, lease, rev));
            }
            let Some(holder) = self.get_entry(election_key).await? else {
                continue; // vacated between the two calls
            };
            if holder.lease == Some(lease) {
                if let Some(rev) = self
                    .compare_and_swap_revision(
                        election_key,
                        Some(holder.mod_revision),
                        value.clone(),
                        Some(lease),
                    )
                    .await?
                {
                    return Ok(self.leadership(election_key, lease, rev));
                }
                continue;
            }
            tracing::debug!(
                key = election_key,
                "election key held; waiting for it to be vacated"
            );
            self.wait_changed(election_key, holder.mod_revision, true)
                .await?;
        }
    }

    /// The current leader's value for `election_key`, if any.
    pub async fn leader(&self, election_key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get(election_key).await?.map(|(v, _)| v))
    }

    fn leadership(&self, key: &str, lease: LeaseId, mod_revision: i64) -> Leadership {
        Leadership {
            store: self.clone(),
            key: key.to_owned(),
            lease,
            mod_revision,
        }
    }

    /// Waits until `key` is deleted (or, unless `only_delete`, written by someone else) after `revision`.
    async fn wait_changed(&self, key: &str, revision: i64, only_delete: bool) -> Result<()> {
        let mut watch = self.watch_prefix(key, revision + 1).await?;
        loop {
            match watch.next().await {
                Some(WatchEvent::Delete { key: k, .. }) if k == key => return Ok(()),
                Some(WatchEvent::Put { key: k, .. }) if k == key && !only_delete => return Ok(()),
                Some(WatchEvent::Resync { snapshot }) => {
                    let current = snapshot.entries.iter().find(|e| e.key == key);
                    match current {
                        None => return Ok(()),
                        Some(e) if e.mod_revision != revision && !only_delete => return Ok(()),
                        Some(_) => {}
                    }
                }
                Some(_) => {}
                None => return Err(CoordError::Unavailable("coordination store closed".into())),
            }
        }
    }
}

impl Leadership {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The mod revision of the election key as this leader last wrote it.
    pub fn revision(&self) -> i64 {
        self.mod_revision
    }

    /// Whether the key still holds this leadership.
    pub async fn is_leader(&self) -> Result<bool> {
        Ok(self
            .store
            .get_entry(&self.key)
            .await?
            .is_some_and(|e| e.mod_revision == self.mod_revision))
    }

    /// Replaces the leader's value; `Conflict` if leadership was lost meanwhile.
    pub async fn proclaim(&mut self, value: impl Into<Vec<u8>>) -> Result<()> {
        match self
            .store
            .compare_and_swap_revision(&self.key, Some(self.mod_revision), value, Some(self.lease))
            .await?
        {
            Some(rev) => {
                self.mod_revision = rev;
                Ok(())
            }
            None => Err(CoordError::Conflict(format!(
                "leadership of {} was lost",
                self.key
            ))),
        }
    }

    /// Resolves when this leadership ends: the key was deleted (lease expired or revoked) or taken over.
    pub async fn lost(&self) -> Result<()> {
        self.store
            .wait_changed(&self.key, self.mod_revision, false)
            .await
    }

    /// Gives up leadership (deletes the key if it is still ours), letting the next candidate in.
    pub async fn resign(self) -> Result<()> {
        self.store
            .compare_and_delete(&self.key, self.mod_revision)
            .await
            .map(drop)
    }
}
