//! The AVX-512 VNNI kernels (`vpdpbusd`: four u8 x i8 products per 32-bit lane in one instruction) for
//! Q4_K, Q6_K, Q8_0 and Q5_0, up to eight rows per weight decode, and the layouts they read: Q4_K
//! weights with their nibbles reordered at load ([`Q4KVnni`]) and Q8_0 activation rows as values then
//! scales ([`values_then_scales`]).

use super::avx2::{hsum_float_8, q6k_unpack};
use super::*;

/// A Q4_K block whose 256 nibbles are reordered for the AVX-512 VNNI kernel (same 144 bytes, same
/// values): in each 64-weight vector `t` (low then high nibbles of each 64-byte half), 32-bit lane `L`
/// holds four weights of sub-block `L % 8`. One `vpdpbusd` per vector then accumulates 16 products of a
/// single sub-block per lane, and the sub-block scale is applied once per block instead of once per
/// vector (5 multiplies per row and block instead of 8). The activations get the same order in
/// [`MultiRow::prepare`].
#[repr(transparent)]
#[derive(Clone)]
pub struct Q4KVnni(BlockQ4K);

/// Original weight index (0..256) of position `np = 64 t + p` in the VNNI order.
pub(super) const fn q4k_vnni_source(np: usize) -> usize {
    let (t, p) = (np / 64, np % 64);
    let (sub, half, byte) = ((p / 4) % 8, p / 32, p % 4);
    32 * sub + 8 * t + 4 * half + byte
}

pub(super) const Q4K_VNNI_ORDER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = q4k_vnni_source(i) as u8;
        i += 1;
    }
    t
};

/// The 256 weights of a Q4_K block in natural order (0..16 each).
pub(super) fn q4k_nibbles(x: &Q4K) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (i, v) in q.iter_mut().enumerate() {
        let (sub, o) = (i / 32, i % 32);
        let byte = x.qs[32 * (sub / 2) + o];
        *v = if sub % 2 == 0 { byte & 0x0f } else { byte >> 4 };
    }
    q
}

impl Q4KVnni {
    /// Reorders a block's nibbles (exact: a permutation).
    pub fn from_block(block: &BlockQ4K) -> Self {
        let mut out = block.clone();
        let src: &Q4K = &cast(std::slice::from_ref(block))[0];
        let q = q4k_nibbles(src);
        let dst: &mut Q4K = &mut cast_mut(std::slice::from_mut(&mut out))[0];
        for (b, byte) in dst.qs.iter_mut().enumerate() {
            // Byte b of half c holds vector 2c (low nibble) and vector 2c + 1 (high nibble) at p.
            let (c, p) = (b / 64, b % 64);
            let lo = q[Q4K_VNNI_ORDER[128 * c + p] as usize];
            let hi = q[Q4K_VNNI_ORDER[128 * c + 64 + p] as usize];
            *byte = lo | (hi << 4);
        }
        Self(out)
    }

    /// The block in ggml's order.
    pub fn to_block(&self) -> BlockQ4K {
        let mut out = self.0.clone();
        let src: &Q4K = &cast(std::slice::from_ref(&self.0))[0];
        let mut q = [0u8; 256];
        for (b, byte) in src.qs.iter().enumerate() {
            let (c, p) = (b / 64, b % 64);
            q[Q4K_VNNI_ORDER[128 * c + p] as usize] = byte & 0x0f;
            q[Q4K_VNNI_ORDER[128 * c + 64 + p] as usize] = byte >> 4;
        }
        let dst: &mut Q4K = &mut cast_mut(std::slice::from_mut(&mut out))[0];
        for (b, byte) in dst.qs.iter_mut().enumerate() {
            let (pair, o) = (b / 32, b % 32);
            *byte = q[64 * pair + o] | (q[64 * pair + 32 + o] << 4);
        }
        out
    }
}

impl MultiRow for Q4KVnni {
    const BLOCK: usize = 256;
    type Act = BlockQ8K;
    /// Reorders each block's activations like the weights, and replaces its 16 i16 sums of 16 by the 8
    /// f32 values `d * sum of 32` (same 32 bytes): the mins term then costs one load and one fused
    /// multiply-add per row and block instead of an integer multiply, a conversion, a scalar product and
    /// a broadcast.
    fn prepare(acts: &mut [BlockQ8K]) {
        for y in cast_mut::<_, Q8K>(acts) {
            let scaled: [f32; 8] = std::array::from_fn(|s| {
                y.d * (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32) as f32
            });
            // SAFETY: bsums is 32 bytes, exactly the 8 f32 written; the kernel reads them back the same way.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    scaled.as_ptr() as *const u8,
                    y.bsums.as_mut_ptr() as *mut u8,
                    32,
                )
            };
            let orig = y.qs;
            for (v, &src) in y.qs.iter_mut().zip(Q4K_VNNI_ORDER.iter()) {
                *v = orig[src as usize];
            }
        }
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        debug_assert!(vnni());
        dispatch_rows!(
            q4k_rows_vnni,
            Q8K,
            cast::<_, Q4K>(w),
            ys,
            out,
            [1, 2, 3, 4, 5, 6, 7, 8]
        )
    }
}

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

/// `vpdpbusd` written out: LLVM rewrites the intrinsic into `vpmaddubsw` + `vpmaddwd` when it can prove
/// the unsigned operand small (our 4- and 6-bit weights), which is the two-multiply sequence this kernel
/// exists to avoid.
#[cfg(target_arch = "x86_64")]
macro_rules! dpbusd {
    ($acc:expr, $u8s:expr, $i8s:expr) => {{
        let mut acc: __m512i = $acc;
        let (u, i): (__m512i, __m512i) = ($u8s, $i8s);
        // SAFETY: register-only AVX-512 VNNI instruction; callers are compiled with avx512vnni.
        unsafe {
            std::arch::asm!(
                "vpdpbusd {acc}, {u}, {i}",
                acc = inout(zmm_reg) acc,
                u = in(zmm_reg) u,
                i = in(zmm_reg) i,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
        acc
    }};
}

/// Folds a 16-lane integer accumulator into 8 lanes (lane i + lane i+8, exact), matching the AVX2 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(super) fn fold16(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Q4_K (in [`Q4KVnni`] order) x Q8_K (prepared) for R rows with AVX-512 VNNI. Per row and block: four
/// `vpdpbusd` (u4 x i8, 16 products of one sub-block per 32-bit lane; at most 16 * 15 * 128 = 30720, so
/// the lane is also a valid i16), one `vpmaddwd` by the lane's sub-block scale, then the block's float
/// step. Every row's operations are the same whatever R is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
pub(super) unsafe fn q4k_rows_vnni<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let ahead = prefetch_distance();
    for (b, x) in xs.iter().enumerate() {
        prefetch_ahead(x, ahead);
        let xd = f16_to_f32(x.d);
        let xdmin = f16_to_f32(x.dmin);
        let utmp = q4k_scales_mins(x);
        let scales = (utmp[0] as u64 | ((utmp[1] as u64) << 32)) as i64;
        let mins = (utmp[2] as u64 | ((utmp[3] as u64) << 32)) as i64;
        // Lane L: the scale of sub-block L % 8 as an i16 pair (scale, 0).
        let scale = _mm512_cvtepu8_epi32(_mm_set1_epi64x(scales));
        // -dmin * min of each sub-block, against the rows' `d * sum of 32` (see `prepare`).
        let mins = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set1_epi64x(mins))),
            _mm256_set1_ps(-xdmin),
        );
        // SAFETY: qs is 128 bytes = 2 x 64.
        let (h0, h1) = unsafe {
            (
                _mm512_loadu_si512(x.qs.as_ptr() as *const _),
                _mm512_loadu_si512(x.qs.as_ptr().add(64) as *const _),
            )
        };
        let w = [
            _mm512_and_si512(h0, m4),
            _mm512_and_si512(_mm512_srli_epi16(h0, 4), m4),
            _mm512_and_si512(h1, m4),
            _mm512_and_si512(_mm512_srli_epi16(h1, 4), m4),
        ];
        // Two chains per row (vectors 0, 2 and 1, 3), rows interleaved, so 2R independent chains of
        // multiplies are in flight (measured faster than finishing one row at a time). A lane sums at most
        // 16 products.
        let mut even = [_mm512_setzero_si512(); R];
        let mut odd = [_mm512_setzero_si512(); R];
        for t in 0..2 {
            for r in 0..R {
                let q8 = ys[r][b].qs.as_ptr();
                // SAFETY: qs has 256 bytes = 4 x 64.
                let (y0, y1) = unsafe {
                    (
                        _mm512_loadu_si512(q8.add(128 * t) as *const _),
                        _mm512_loadu_si512(q8.add(128 * t + 64) as *const _),
                    )
                };
                even[r] = dpbusd!(even[r], w[2 * t], y0);
                odd[r] = dpbusd!(odd[r], w[2 * t + 1], y1);
            }
        }
        let xd = _mm256_set1_ps(xd);
        for r in 0..R {
            let y = &ys[r][b];
            let p = _mm512_madd_epi16(_mm512_add_epi32(even[r], odd[r]), scale);
            let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(fold16(p)), xd);
            // SAFETY: `prepare` stored 8 f32 in the 32 bytes of bsums.
            let sums = unsafe { _mm256_loadu_ps(y.bsums.as_ptr() as *const f32) };
            // One accumulator per row for both terms: with eight rows, a second set would not fit the
            // registers (measured 25% slower).
            acc[r] = _mm256_fmadd_ps(
                mins,
                sums,
                _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&y.d), acc[r]),
            );
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}

/// Q6_K x Q8_K for R rows with AVX-512 VNNI. Per 64 values and row: one `vpdpbusd` of the unsigned 6-bit
/// values (0..64) with the activations (4 products per lane, at most 4 * 63 * 128 = 32256, a valid i16)
/// and one `vpdpwssd` by the lane's 16-value scale; the `- 32` offset is taken once per block from the
/// activations' sums of 16 (`32 * sum(scale * bsum)`). Every row's operations are the same whatever R is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
pub(super) unsafe fn q6k_rows_vnni<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let low16 = _mm512_set1_epi32(0xFFFF);
    let mut acc = [_mm256_setzero_ps(); R];
    let ahead = prefetch_distance();
    for (b, x) in xs.iter().enumerate() {
        prefetch_ahead(x, ahead);
        let xd = f16_to_f32(x.d);
        // SAFETY: scales is 16 bytes.
        let sc = unsafe { _mm_loadu_si128(x.scales.as_ptr() as *const __m128i) };
        // Lane L of the vector holding chunks (2c, 2c + 1) of half j: scale 8j + 4c + L / 4, as an i16
        // pair (scale, 0).
        let lanes = |first: i8| {
            let idx = _mm_setr_epi8(
                first,
                first,
                first,
                first,
                first + 1,
                first + 1,
                first + 1,
                first + 1,
                first + 2,
                first + 2,
                first + 2,
                first + 2,
                first + 3,
                first + 3,
                first + 3,
                first + 3,
            );
            _mm512_and_si512(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(sc, idx)), low16)
        };
        let s = [lanes(0), lanes(4), lanes(8), lanes(12)];
        let mut w = [_mm512_setzero_si512(); 4];
        for j in 0..2 {
            let [q0, q1, q2, q3] = q6k_unpack(x, j);
            w[2 * j] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1);
            w[2 * j + 1] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q2), q3);
        }
        let sc16 = _mm256_cvtepi8_epi16(sc);
        // Rows interleaved and two accumulators per row, so R * 2 dependency chains run at once (measured
        // faster than one accumulator per row despite the register pressure at eight rows).
        let mut even = [_mm512_setzero_si512(); R];
        let mut odd = [_mm512_setzero_si512(); R];
        for t in 0..2 {
            for r in 0..R {
                let q8 = ys[r][b].qs.as_ptr();
                // SAFETY: qs has 256 bytes = 4 x 64.
                let (y0, y1) = unsafe {
                    (
                        _mm512_loadu_si512(q8.add(128 * t) as *const _),
                        _mm512_loadu_si512(q8.add(128 * t + 64) as *const _),
                    )
                };
                let p0 = dpbusd!(_mm512_setzero_si512(), w[2 * t], y0);
                let p1 = dpbusd!(_mm512_setzero_si512(), w[2 * t + 1], y1);
                even[r] = _mm512_dpwssd_epi32(even[r], p0, s[2 * t]);
                odd[r] = _mm512_dpwssd_epi32(odd[r], p1, s[2 * t + 1]);
            }
        }
        for r in 0..R {
            let y = &ys[r][b];
            // SAFETY: bsums is 16 i16.
            let bs = unsafe { _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i) };
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
            let total = _mm256_sub_epi32(fold16(_mm512_add_epi32(even[r], odd[r])), offset);
            let d = y.d * xd;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(total), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
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
