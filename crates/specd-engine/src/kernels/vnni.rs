//! The one-column AVX-512 VNNI kernels (`vpdpbusd`: four u8 x i8 products per 32-bit lane in one
//! instruction) for the 32-value block formats Q8_0, Q5_0 and Q4_1, up to eight rows per weight decode,
//! and the activation layout they read ([`values_then_scales`]). The K-quants' VNNI kernels work on
//! column groups (`interleaved.rs`).

use super::*;

/// Rewrites one row of activation blocks (Q8_0: an f16 `d` then 32 values; Q8_1: `d`, `s`, then 32
/// values) in place into the layout the 32-value VNNI kernels read: the row's values contiguous (32
/// bytes per block), then each f16 field's plane (2 bytes per block, `d` first). Same bytes per block,
/// so the row's storage holds it exactly; two blocks' values are one 64-byte load.
pub(super) fn values_then_scales<T>(acts: &mut [T]) {
    let (kb, size) = (acts.len(), std::mem::size_of::<T>());
    let head = size - 32;
    // SAFETY: only called on Q8_0 / Q8_1 blocks: plain old data, f16 fields then 32 values, no padding
    // (checked in the parent module), so the row is size * kb initialized bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(acts.as_mut_ptr() as *mut u8, size * kb) };
    let mut soa = Vec::with_capacity(size * kb);
    for block in bytes.chunks_exact(size) {
        soa.extend_from_slice(&block[head..]);
    }
    for field in (0..head).step_by(2) {
        for block in bytes.chunks_exact(size) {
            soa.extend_from_slice(&block[field..field + 2]);
        }
    }
    bytes.copy_from_slice(&soa);
}

/// Two f16 scales (`pair`: low half first) as 16 f32 lanes, the first scale in lanes 0..8 and the second
/// in lanes 8..16: the scales of the two 32-value blocks one 64-byte vector holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn halves(pair: u32) -> __m512 {
    let idx = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    _mm512_cvtph_ps(_mm256_permutexvar_epi16(
        idx,
        _mm256_set1_epi32(pair as i32),
    ))
}

/// Two f16 fields as one word, the first block's low: the `pair` of [`halves`] (`hi` 0 when the pair
/// has one block).
fn f16_pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Values of blocks `b` and `b + 1` (only `b` unless `two`, the rest zero) of a row prepared by
/// [`values_then_scales`].
///
/// # Safety
/// `row` holds at least `b + 1` (`b + 2` when `two`) blocks' 32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn row_values(row: *const u8, b: usize, two: bool) -> __m512i {
    // SAFETY: the caller's.
    unsafe {
        let q = row.add(32 * b);
        if two {
            _mm512_loadu_si512(q as *const _)
        } else {
            _mm512_maskz_loadu_epi8(0xFFFF_FFFF, q as *const i8)
        }
    }
}

/// The f16 fields of blocks `b` and `b + 1` (only `b` unless `two`) of one plane of a prepared row,
/// as an [`f16_pair`].
///
/// # Safety
/// `plane` holds at least `b + 1` (`b + 2` when `two`) f16 values.
#[inline]
unsafe fn plane_pair(plane: *const u8, b: usize, two: bool) -> u32 {
    // SAFETY: the caller's.
    unsafe {
        let at = plane.add(2 * b);
        if two {
            (at as *const u32).read_unaligned()
        } else {
            (at as *const u16).read_unaligned() as u32
        }
    }
}

/// Runs `$pair!(b, acc)` over the block pairs of `$kb` blocks, the pairs alternating between the
/// accumulator sets `$even` and `$odd` (so one row never waits on its own add chain); the odd last
/// block is a pair of its own.
macro_rules! each_pair {
    ($kb:expr, $pair:ident, $even:ident, $odd:ident) => {{
        let kb = $kb;
        let mut b = 0;
        while b + 4 <= kb {
            $pair!(b, $even);
            $pair!(b + 2, $odd);
            b += 4;
        }
        if b < kb {
            $pair!(b, $even);
            b += 2;
        }
        if b < kb {
            $pair!(b, $odd);
        }
    }};
}

/// Signed 8-bit weights x Q8_0 activations (prepared by [`values_then_scales`]) for R rows with AVX-512
/// VNNI, two 32-value blocks per 64-byte vector. The weights of a block pair come from `$decode(b)` as
/// their magnitudes (u8) and the mask of the negative ones; each row moves those signs onto its
/// activations (one masked subtract: Q8_0 activations are never -128) and `vpdpbusd` sums four
/// products per 32-bit lane, eight lanes per block, exactly. The lanes are then scaled by the blocks'
/// `d_w * d_x` and accumulated in f32 per lane (pairs alternate between two accumulators so that one row
/// does not wait on its own add chain), summed in a fixed order at the end. Every row's operations are
/// the same whatever R is.
#[cfg(target_arch = "x86_64")]
macro_rules! rows32_vnni {
    ($name:ident, $block:ty, $decode:ident, $doc:literal) => {
        #[doc = $doc]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        #[inline(never)]
        pub(super) unsafe fn $name<const R: usize>(
            xs: &[$block],
            ys: [&[Q80]; R],
            out: &mut [f32],
        ) {
            let kb = xs.len();
            let zero = _mm512_setzero_si512();
            // SAFETY (whole body): every activation row holds kb blocks in the layout of
            // `values_then_scales` (32 * kb value bytes, then kb f16 scales); loads stay inside it (the odd
            // last block is loaded with a 32-byte mask and its scale as 16 bits).
            let rows: [*const u8; R] = std::array::from_fn(|r| ys[r].as_ptr() as *const u8);
            let mut even = [_mm512_setzero_ps(); R];
            let mut odd = [_mm512_setzero_ps(); R];
            let ahead = prefetch_distance();
            // Written out in place (a closure here was not inlined, and its accumulators lived in
            // memory): one block pair from `b` into `$acc`.
            macro_rules! pair {
                ($b:expr, $acc:ident) => {{
                    let b = $b;
                    let two = b + 1 < kb;
                    prefetch_ahead(&xs[b], ahead);
                    let (aw, neg) = $decode(xs, b, two);
                    let xd = halves(f16_pair(xs[b].d, if two { xs[b + 1].d } else { 0 }));
                    for r in 0..R {
                        // SAFETY: see above.
                        let (y, yd) = unsafe {
                            (
                                row_values(rows[r], b, two),
                                plane_pair(rows[r].add(32 * kb), b, two),
                            )
                        };
                        let sy = _mm512_mask_sub_epi8(y, neg, zero, y);
                        let ints = dpbusd!(zero, aw, sy);
                        let scale = _mm512_mul_ps(xd, halves(yd));
                        $acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, $acc[r]);
                    }
                }};
            }
            each_pair!(kb, pair, even, odd);
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
            }
        }
    };
}

/// Q8_0 weights of blocks `b` and `b + 1` (only `b` unless `two`): magnitudes and negative mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn q8_0_pair(xs: &[Q80], b: usize, two: bool) -> (__m512i, __mmask64) {
    // SAFETY: qs is 32 bytes; block b + 1 exists when `two`.
    let w = unsafe {
        let lo = _mm256_loadu_si256(xs[b].qs.as_ptr() as *const __m256i);
        let hi = if two {
            _mm256_loadu_si256(xs[b + 1].qs.as_ptr() as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    };
    // |-128| is 128, a valid unsigned operand.
    (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
}

/// The 64 4-bit values of blocks `b` and `b + 1` (only `b` unless `two`, the rest zero) whose 16
/// packed bytes `qs` gives, in activation order: block b's low nibbles (values 0..16) then its high
/// nibbles (16..32), then block b + 1's.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn nibbles<T>(xs: &[T], b: usize, two: bool, qs: impl Fn(&T) -> &[u8; 16]) -> __m512i {
    // SAFETY: qs is 16 bytes; block b + 1 exists when `two`.
    let (q0, q1) = unsafe {
        (
            _mm_loadu_si128(qs(&xs[b]).as_ptr() as *const __m128i),
            if two {
                _mm_loadu_si128(qs(&xs[b + 1]).as_ptr() as *const __m128i)
            } else {
                _mm_setzero_si128()
            },
        )
    };
    // 128-bit lanes: [q0, q0, q1, q1]; the second of each pair shifted to its high nibbles.
    let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q0), q1);
    let v = _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
        _mm512_castsi256_si512(both),
    );
    let v = _mm512_mask_blend_epi64(0b1100_1100, v, _mm512_srli_epi16::<4>(v));
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// Q5_0 weights of blocks `b` and `b + 1` (only `b` unless `two`), `q - 16` with `q` = nibble + 16 *
/// fifth bit: where the fifth bit is set the value is the nibble itself (>= 0), where it is clear it
/// is `nibble - 16` (< 0), of magnitude `16 - nibble`. So the negative mask is the inverted fifth bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn q5_0_pair(xs: &[Q50], b: usize, two: bool) -> (__m512i, __mmask64) {
    let nib = nibbles(xs, b, two, |x| &x.qs);
    let high = u32::from_le_bytes(xs[b].qh) as u64
        | if two {
            (u32::from_le_bytes(xs[b + 1].qh) as u64) << 32
        } else {
            0
        };
    let live: __mmask64 = if two { u64::MAX } else { 0xFFFF_FFFF };
    let neg = !high & live;
    let mag = _mm512_mask_sub_epi8(nib, neg, _mm512_set1_epi8(16), nib);
    (_mm512_maskz_mov_epi8(live, mag), neg)
}

rows32_vnni!(
    q8_0_rows_vnni,
    Q80,
    q8_0_pair,
    "Q8_0 x Q8_0 for R rows with AVX-512 VNNI (see `rows32_vnni`)."
);
rows32_vnni!(
    q5_0_rows_vnni,
    Q50,
    q5_0_pair,
    "Q5_0 x Q8_0 for R rows with AVX-512 VNNI (see `rows32_vnni`)."
);

/// Q4_1 x Q8_1 (prepared by [`values_then_scales`]) for R rows with AVX-512 VNNI, two blocks per vector. A
/// block is `d * q + m` with `q` in 0..16, so the nibbles are the unsigned `vpdpbusd` operand as they
/// are; per lane `d_w * d_x * sum(q * x)`, and the block's `m_w * s_x` (`s_x` = `d_x` * the sum of its
/// values) added once, to the block's first lane. Every row's operations are the same whatever R is.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn q4_1_rows_vnni<const R: usize>(xs: &[Q41], ys: [&[Q81]; R], out: &mut [f32]) {
    let kb = xs.len();
    let zero = _mm512_setzero_si512();
    // SAFETY (whole body): every activation row holds kb blocks in the layout of `values_then_scales`; the
    // odd last block is loaded with a 32-byte mask and its scale and sum as 16 bits.
    let rows: [*const u8; R] = std::array::from_fn(|r| ys[r].as_ptr() as *const u8);
    let mut even = [_mm512_setzero_ps(); R];
    let mut odd = [_mm512_setzero_ps(); R];
    let ahead = prefetch_distance();
    // Lane 0 of each block's eight.
    const FIRST: __mmask16 = 0x0101;
    macro_rules! pair {
        ($b:expr, $acc:ident) => {{
            let b = $b;
            let two = b + 1 < kb;
            prefetch_ahead(&xs[b], ahead);
            // Zero past a lone last block already.
            let w = nibbles(xs, b, two, |x| &x.qs);
            let xd = halves(f16_pair(xs[b].d, if two { xs[b + 1].d } else { 0 }));
            let xm = halves(f16_pair(xs[b].m, if two { xs[b + 1].m } else { 0 }));
            for r in 0..R {
                // SAFETY: see above.
                let (y, yd, ysum) = unsafe {
                    (
                        row_values(rows[r], b, two),
                        plane_pair(rows[r].add(32 * kb), b, two),
                        plane_pair(rows[r].add(34 * kb), b, two),
                    )
                };
                let ints = dpbusd!(zero, w, y);
                let scale = _mm512_mul_ps(xd, halves(yd));
                let a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, $acc[r]);
                $acc[r] = _mm512_mask3_fmadd_ps(xm, halves(ysum), a, FIRST);
            }
        }};
    }
    each_pair!(kb, pair, even, odd);
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
    }
}
