//! Per-sequence key/value cache with rollback.
//!
//! One [`KvCache`] belongs to one sequence on one model. It stores, per layer and per kv head, the keys and
//! values of every position fed so far, contiguous by position, in f32. Speculation rolls it back with
//! [`KvCache::truncate`] after rejected drafts; nothing else ever removes positions. It does not know which
//! tokens produced the positions; callers that need that (drafters, the speculation loop) track it.

/// Keys and values of one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
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
            layers,
            kv_heads,
            head_dim,
            len: 0,
            keys: vec![Vec::new(); layers * kv_heads],
            values: vec![Vec::new(); layers * kv_heads],
        }
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
