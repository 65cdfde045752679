//! Attention of a forward's query rows against their sequences' key/value caches: work items, their
//! parallel split, and the per-block arithmetic (an AVX-512 path where the CPU has it, a portable one
//! elsewhere).
//!
//! Batch invariance: a row's arithmetic is the same whatever rows share its pass. Each score is one
//! dot product of the row's query and one key, computed by the same instructions for every key and
//! row; softmax runs over the row's keys in order; values are accumulated in key order. Blocking rows
//! together only decides which loads they share. Which path runs depends on the CPU alone (fixed for a
//! process), so every forward of a process computes a row the same way.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kv::KvCache;
use crate::model::SeqInput;
use crate::qweight::dot_f32;

/// Query rows of one sequence and head handled together, so each key and value is loaded once for all of
/// them (long prefills are otherwise bound by re-reading the cache per row).
const ATTN_BLOCK: usize = 16;

/// Attention of every row against its own sequence's cache (positions `0..=pos`). Work items are (block
/// of up to `ATTN_BLOCK` consecutive rows of one sequence, head). Returns `rows x q_dim`.
pub(crate) fn attention(
    cfg: &ModelConfig,
    layer: usize,
    rows: &[(usize, usize)],
    q: &[f32],
    batch: &[SeqInput<'_>],
    qd: usize,
) -> Vec<f32> {
    let hd = cfg.head_dim;
    let group = cfg.heads / cfg.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Row blocks never straddle two sequences.
    let mut blocks = Vec::new();
    let mut r = 0;
    while r < rows.len() {
        let mut e = r + 1;
        while e < rows.len() && e - r < ATTN_BLOCK && rows[e].0 == rows[r].0 {
            e += 1;
        }
        blocks.push((r, e));
        r = e;
    }
    let items: Vec<(usize, usize)> = blocks
        .iter()
        .flat_map(|&b| (0..cfg.heads).map(move |h| (b.0 * cfg.heads + h, b.1)))
        .collect();
    let results: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(key, r1)| {
            let (r0, h) = (key / cfg.heads, key % cfg.heads);
            let (si, last) = rows[r1 - 1];
            let cache: &KvCache = &*batch[si].cache;
            let (keys, values) = cache.head(layer, h / group, last + 1);
            let qs: Vec<&[f32]> = (r0..r1)
                .map(|r| &q[r * qd + h * hd..r * qd + (h + 1) * hd])
                .collect();
            let pos: Vec<usize> = rows[r0..r1].iter().map(|&(_, p)| p).collect();
            attend_block(&qs, &pos, keys, values, hd, scale)
        })
        .collect();
    let mut out = vec![0f32; rows.len() * qd];
    for (&(key, _), res) in items.iter().zip(results) {
        let (r0, h) = (key / cfg.heads, key % cfg.heads);
        for (b, src) in res.chunks_exact(hd).enumerate() {
            let at = (r0 + b) * qd + h * hd;
            out[at..at + hd].copy_from_slice(src);
        }
    }
    out
}

/// One block: rows `qs` (each `hd` values) at positions `pos` (ascending, one sequence) against `keys`
/// and `values` (`(last + 1) x hd`, `last` the block's last position). Returns `qs.len() x hd`.
fn attend_block(
    qs: &[&[f32]],
    pos: &[usize],
    keys: &[f32],
    values: &[f32],
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::vnni() && hd.is_multiple_of(16) {
        // SAFETY: `vnni()` checked AVX-512F; slices are as documented (the callers' cache views).
        return unsafe { avx512::attend_block(qs, pos, keys, values, hd, scale) };
    }
    attend_block_portable(qs, pos, keys, values, hd, scale)
}

/// The portable block: scores by [`dot_f32`], values accumulated with a multiply and an add per lane.
fn attend_block_portable(
    qs: &[&[f32]],
    pos: &[usize],
    keys: &[f32],
    values: &[f32],
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let n = qs.len();
    let last = pos[n - 1];
    // Scores, row-major: row b holds pos(b) + 1 entries.
    let mut scores: Vec<Vec<f32>> = pos.iter().map(|&p| Vec::with_capacity(p + 1)).collect();
    for j in 0..=last {
        let kj = &keys[j * hd..(j + 1) * hd];
        for (b, sc) in scores.iter_mut().enumerate() {
            if j <= pos[b] {
                sc.push(dot_f32(qs[b], kj) * scale);
            }
        }
    }
    let inv = softmax_rows(&mut scores);
    let mut out = vec![0f32; n * hd];
    for j in 0..=last {
        let vj = &values[j * hd..(j + 1) * hd];
        for (b, dst) in out.chunks_exact_mut(hd).enumerate() {
            if j <= pos[b] {
                let w = scores[b][j] * inv[b];
                for (o, &vv) in dst.iter_mut().zip(vj) {
                    *o += w * vv;
                }
            }
        }
    }
    out
}

/// Exponentiates each row's scores in place (minus the row's maximum) and returns `1 / sum` per row.
fn softmax_rows(scores: &mut [Vec<f32>]) -> Vec<f32> {
    scores
        .iter_mut()
        .map(|sc| {
            let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in sc.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            1.0 / sum
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Sixteen lanes per vector: a score is the lanes' fused products over the head's `hd / 16`
    //! vectors, in order, then one fixed sum tree over the lanes; a value row is added with one fused
    //! multiply-add per vector. A lone row (decode) keeps its query and output in registers.

    use std::arch::x86_64::*;

    use super::softmax_rows;

    /// The sixteen lanes summed in a fixed tree: halves, quarters, pairs, then the last two.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sum_lanes(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let s8 = _mm256_add_ps(lo, hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    /// `dot(q, k)` over `hd` values (a multiple of 16).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot(q: *const f32, k: *const f32, chunks: usize) -> f32 {
        // SAFETY: callers pass `chunks * 16` readable values at each pointer.
        unsafe {
            let mut acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
            for c in 1..chunks {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.add(16 * c)),
                    _mm512_loadu_ps(k.add(16 * c)),
                    acc,
                );
            }
            sum_lanes(acc)
        }
    }

    /// See [`super::attend_block`]. Requires AVX-512F and `hd % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_block(
        qs: &[&[f32]],
        pos: &[usize],
        keys: &[f32],
        values: &[f32],
        hd: usize,
        scale: f32,
    ) -> Vec<f32> {
        let n = qs.len();
        let last = pos[n - 1];
        let chunks = hd / 16;
        debug_assert!(keys.len() >= (last + 1) * hd && values.len() >= (last + 1) * hd);
        let mut scores: Vec<Vec<f32>> = pos.iter().map(|&p| Vec::with_capacity(p + 1)).collect();
        for j in 0..=last {
            let kj = keys[j * hd..].as_ptr();
            for (b, sc) in scores.iter_mut().enumerate() {
                if j <= pos[b] {
                    // SAFETY: `qs[b]` and the key row hold `hd` values.
                    sc.push(unsafe { dot(qs[b].as_ptr(), kj, chunks) } * scale);
                }
            }
        }
        let inv = softmax_rows(&mut scores);
        let mut out = vec![0f32; n * hd];
        if n == 1 && chunks <= 8 {
            // One row: its output stays in registers across the keys.
            let mut acc = [_mm512_setzero_ps(); 8];
            for (j, &s) in scores[0].iter().enumerate() {
                let w = _mm512_set1_ps(s * inv[0]);
                let vj = values[j * hd..].as_ptr();
                for (c, a) in acc.iter_mut().enumerate().take(chunks) {
                    // SAFETY: the value row holds `hd` values.
                    *a = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(vj.add(16 * c)) }, *a);
                }
            }
            for (c, a) in acc.iter().enumerate().take(chunks) {
                // SAFETY: `out` holds `hd` values.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *a) };
            }
            return out;
        }
        for j in 0..=last {
            let vj = values[j * hd..].as_ptr();
            for (b, dst) in out.chunks_exact_mut(hd).enumerate() {
                if j <= pos[b] {
                    let w = _mm512_set1_ps(scores[b][j] * inv[b]);
                    let d = dst.as_mut_ptr();
                    for c in 0..chunks {
                        // SAFETY: the value row and `dst` hold `hd` values.
                        unsafe {
                            let v = _mm512_loadu_ps(vj.add(16 * c));
                            let o = _mm512_loadu_ps(d.add(16 * c));
                            _mm512_storeu_ps(d.add(16 * c), _mm512_fmadd_ps(w, v, o));
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qweight::tests::random;

    /// A block of rows (consecutive positions of one sequence) against `len` cached positions.
    fn case(hd: usize, len: usize, rows: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            random(rows * hd, seed),
            random(len * hd, seed + 1),
            random(len * hd, seed + 2),
        )
    }

    #[test]
    fn a_row_is_bitwise_the_same_alone_or_in_a_block_and_the_paths_agree() {
        for hd in [64, 128, 48] {
            let (len, n) = (37, 7);
            let (q, k, v) = case(hd, len, n, hd as u64);
            let qs: Vec<&[f32]> = q.chunks_exact(hd).collect();
            let pos: Vec<usize> = (len - n..len).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let block = attend_block(&qs, &pos, &k, &v, hd, scale);
            let portable = attend_block_portable(&qs, &pos, &k, &v, hd, scale);
            for b in 0..n {
                let alone = attend_block(&qs[b..=b], &pos[b..=b], &k, &v, hd, scale);
                assert_eq!(alone, block[b * hd..(b + 1) * hd], "hd {hd} row {b}");
                // Also alone with a cache cut at its own position (a decode step).
                let cut = (pos[b] + 1) * hd;
                let short = attend_block(&qs[b..=b], &pos[b..=b], &k[..cut], &v[..cut], hd, scale);
                assert_eq!(short, alone, "hd {hd} row {b}");
            }
            for (i, (x, y)) in block.iter().zip(&portable).enumerate() {
                assert!((x - y).abs() < 1e-5, "hd {hd} value {i}: {x} vs {y}");
            }
            // A reference in f64: softmax(q k / sqrt(hd)) v.
            for b in 0..n {
                let s: Vec<f64> = (0..=pos[b])
                    .map(|j| {
                        (0..hd)
                            .map(|c| qs[b][c] as f64 * k[j * hd + c] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    let want: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w * v[j * hd + c] as f64)
                        .sum::<f64>()
                        / z;
                    let got = block[b * hd + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "hd {hd} row {b} lane {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
