//! Per-sequence key/value cache with rollback.
//!
//! One [`KvCache`] belongs to one sequence on one model. It stores, per layer and per kv head, the keys and
//! values of every position fed so far, contiguous by position, in f32. Speculation rolls it back with
//! [`KvCache::truncate`] after rejected drafts; nothing else ever removes positions. It does not know which
//! tokens produced the positions; callers that need that (drafters, the speculation loop) track it.
//!
//! Every cache has a process-unique identity. On rank 0 of a tensor-parallel group the other ranks keep
//! a cache of their own for each of rank 0's, named by that identity; a cache made by a tensor-parallel
//! model reports its drop, so the other ranks free theirs. A clone is a new cache with a new identity
//! (the other ranks do not have its contents, so feeding a clone of a tensor-parallel cache fails the
//! step instead of computing garbage).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Identities of dropped caches, collected for the next tensor-parallel step.
#[derive(Debug, Default)]
pub struct DropList(pub(crate) Mutex<Vec<u64>>);

/// Keys and values of one sequence.
#[derive(Debug)]
pub struct KvCache {
    id: u64,
    dropped: Option<Arc<DropList>>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    /// `keys[layer * kv_heads + head]` holds `len * head_dim` values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            dropped: None,
            layers,
            kv_heads,
            head_dim,
            len: 0,
            keys: vec![Vec::new(); layers * kv_heads],
            values: vec![Vec::new(); layers * kv_heads],
        }
    }

    /// A cache that reports its drop to `list` (a tensor-parallel leader's).
    pub(crate) fn tracked(mut self, list: Option<Arc<DropList>>) -> Self {
        self.dropped = list;
        self
    }

    /// This cache's process-unique identity.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layers this cache was made for.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Drops every position at or after `len` (no-op when `len >= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let keep = len * self.head_dim;
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.truncate(keep);
        }
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.keys
            .iter()
            .chain(self.values.iter())
            .map(|v| v.len() * 4)
            .sum()
    }

    /// Appends one position's key and value rows (each `kv_heads * head_dim`) to `layer`. The cache's
    /// length advances only in [`KvCache::commit`], once every layer has its rows.
    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            self.keys[layer * self.kv_heads + h].extend_from_slice(&k[h * hd..(h + 1) * hd]);
            self.values[layer * self.kv_heads + h].extend_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Marks `n` pushed positions as part of the sequence.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self
            .keys
            .iter()
            .all(|k| k.len() == self.len * self.head_dim));
    }

    /// Keys and values of `layer`, kv head `head`, positions `0..upto` (`upto` may include pushed but
    /// uncommitted positions).
    pub(crate) fn head(&self, layer: usize, head: usize, upto: usize) -> (&[f32], &[f32]) {
        let i = layer * self.kv_heads + head;
        let n = upto * self.head_dim;
        (&self.keys[i][..n], &self.values[i][..n])
    }

    /// Reserves room for `extra` more positions in every layer.
    pub(crate) fn reserve(&mut self, extra: usize) {
        let n = extra * self.head_dim;
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.reserve(n);
        }
    }
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            dropped: self.dropped.clone(),
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            len: self.len,
            keys: self.keys.clone(),
            values: self.values.clone(),
        }
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Some(d) = &self.dropped {
            if let Ok(mut l) = d.0.lock() {
                l.push(self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_drops_tail_positions() {
        let mut c = KvCache::new(2, 1, 2);
        for p in 0..3 {
            for l in 0..2 {
                c.push(l, &[p as f32, 0.0], &[0.0, p as f32]);
            }
            c.commit(1);
        }
        assert_eq!(c.len(), 3);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        let (k, v) = c.head(1, 0, 1);
        assert_eq!((k, v), (&[0.0, 0.0][..], &[0.0, 0.0][..]));
        c.truncate(5);
        assert_eq!(c.len(), 1);
    }
}
