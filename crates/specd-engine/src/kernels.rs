//! Multi-row quantized dot-product kernels (x86-64 AVX2 + FMA, and AVX-512 VNNI where the CPU has it):
//! one weight column against up to R activation rows, decoding each weight block once for all of them.
//!
//! **Batch invariance** is the property every kernel here keeps: every row has its own accumulators and
//! sees the same sequence of integer and floating-point operations whatever R is, so a row's result is
//! bitwise the same computed alone or with others. What is shared across rows is the work that depends only
//! on the weights: loading and unpacking nibbles, 6-bit scales and high bits. The choice of kernel depends
//! on the CPU and the format, never on the row count, so on one machine the bits never change.
//!
//! The AVX2 K-quant kernels follow candle's single-row kernels (`vec_dot_q4k_q8k`, `vec_dot_q6k_q8k`)
//! instruction for instruction per row, so they are also bitwise equal to candle's `vec_dot` (the tests
//! check). The Q8_0 and Q5_0 kernels (32-weight blocks) keep two float accumulators per row, for even and
//! odd blocks: with one, each row waited on its own add chain every block and a one-row matmul ran at
//! half the speed of a two-row one. They match candle within float rounding. Candle has no SIMD Q4_1 kernel: its scalar `vec_dot_q4_1_q8_1` sums each
//! block in integers and then does a fixed sequence of f32 operations per block; the kernel here computes
//! the same integer sums with AVX2 and then the same f32 operations in the same order, so it is bitwise
//! equal too.
//!
//! The AVX-512 VNNI kernels (Q4_K, Q6_K: nearly all of the Qwen pair's weights) are built for the extra
//! rows of a verify step, where the work is multiplies rather than memory: `vpdpbusd` sums four u8 x i8
//! products per lane in one instruction, and Q4_K weights are stored with their nibbles reordered at load
//! ([`Q4KVnni`]) so that each lane accumulates one sub-block and the scale is applied once per block.
//! Their integer sums are exact but fall into different lanes than candle's, so their results differ
//! from candle's in the last float bits (within float rounding; the tests check the bound and the row
//! invariance). `SPECD_NO_AVX512=1` selects the AVX2 kernels.
//!
//! The K-quant kernels prefetch the weight stream a few KiB ahead of the block being decoded (the matrix
//! is one contiguous stream per task), so the next weights arrive while the rows are multiplied: this
//! took the Qwen 1.5B one-row forward from about 29 to 27 ms and a 4-row verify from 58 to 47 ms on this
//! project's 2-core machine. `SPECD_PREFETCH=<bytes>` changes the distance (0 turns it off). The Q8_0 and
//! Q4_1 kernels do not: their blocks are small and the same prefetch made the Qwen 0.5B (mostly Q8_0)
//! forward slower, 18 -> 22 ms.
//!
//! Only the formats of the project's model files get a kernel (Q4_K, Q6_K, Q8_0, Q5_0 and Q4_1,
//! SmolLM2's); `qweight.rs` falls back to candle's `vec_dot` for the others and
//! on CPUs without AVX2.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};

/// Mirrors of candle's block layouts (its fields are crate-private); sizes are checked below.
#[repr(C)]
struct Q4K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; 128],
}

#[repr(C)]
struct Q6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: u16,
}

#[repr(C)]
struct Q8K {
    d: f32,
    qs: [i8; 256],
    bsums: [i16; 16],
}

#[repr(C)]
struct Q80 {
    d: u16,
    qs: [i8; 32],
}

#[repr(C)]
struct Q50 {
    d: u16,
    qh: [u8; 4],
    qs: [u8; 16],
}

#[repr(C)]
struct Q41 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

#[repr(C)]
struct Q81 {
    d: u16,
    s: u16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<Q50>() == std::mem::size_of::<BlockQ5_0>());
const _: () = assert!(std::mem::align_of::<Q50>() == std::mem::align_of::<BlockQ5_0>());
const _: () = assert!(std::mem::size_of::<Q41>() == std::mem::size_of::<BlockQ4_1>());
const _: () = assert!(std::mem::size_of::<Q81>() == std::mem::size_of::<BlockQ8_1>());
const _: () = assert!(std::mem::align_of::<Q41>() == std::mem::align_of::<BlockQ4_1>());
const _: () = assert!(std::mem::align_of::<Q81>() == std::mem::align_of::<BlockQ8_1>());
const _: () = assert!(std::mem::size_of::<Q4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<Q6K>() == std::mem::size_of::<BlockQ6K>());
const _: () = assert!(std::mem::size_of::<Q8K>() == std::mem::size_of::<BlockQ8K>());
const _: () = assert!(std::mem::size_of::<Q80>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<Q4K>() == std::mem::align_of::<BlockQ4K>());
const _: () = assert!(std::mem::align_of::<Q6K>() == std::mem::align_of::<BlockQ6K>());
const _: () = assert!(std::mem::align_of::<Q8K>() == std::mem::align_of::<BlockQ8K>());
const _: () = assert!(std::mem::align_of::<Q80>() == std::mem::align_of::<BlockQ8_0>());

/// Whether the AVX-512 VNNI kernels (Q4_K, Q6_K) are used on this CPU (checked once; `SPECD_NO_AVX512`
/// turns them off). Q4_K weights are loaded in [`Q4KVnni`] order when this is true.
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var("SPECD_NO_AVX512").is_err()
                && available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the multi-row kernels can run on this CPU (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight format with a multi-row kernel.
pub trait MultiRow: Sized + Sync {
    /// Weights per block (along k).
    const BLOCK: usize;
    /// The quantized activation block it multiplies with.
    type Act: GgmlType + Sync;
    /// Rewrites quantized activation rows, once per matmul, into the form `dot_rows` reads (work that
    /// would otherwise be redone for every weight column). The rows are only fit for `dot_rows` after.
    fn prepare(_acts: &mut [Self::Act]) {}
    /// `out[r] = dot(w, ys[r])` for every row of prepared activations. Requires [`available`].
    fn dot_rows(w: &[Self], ys: &[&[Self::Act]], out: &mut [f32]);
}

// Every kernel is `#[inline(never)]`: inlined into `dot_rows`, the two-row instance of the Q8_0 and Q4_1
// kernels ran half again slower than the three-row one (Qwen 0.5B forward over 2 rows 28 ms, 3 rows 23 ms;
// 18.5 ms for 2 rows once not inlined). One call per weight column and row group costs nothing measurable.

/// Calls `$kernel::<n>` over the rows in groups of at most the largest listed row count: four for the
/// AVX2 kernels (enough to share the weight decoding, few enough for the 16 AVX2 registers), eight for
/// the AVX-512 ones (32 registers). Groups are as even as possible (9 rows: 3+3+3, not 4+4+1): a lone row
/// pays the whole weight decode. The list must be `1..=max`.
macro_rules! dispatch_rows {
    ($kernel:ident, $mirror:ty, $w:expr, $ys:expr, $out:expr, [$($n:literal),+]) => {{
        let (w, ys, out) = ($w, $ys, $out);
        let c = |r: usize| -> &[$mirror] { cast(ys[r]) };
        let groups = ys.len().div_ceil([$($n),+].len());
        let mut r = 0;
        for g in 0..groups {
            let n = (ys.len() - r) / (groups - g);
            let o = &mut out[r..r + n];
            // SAFETY: callers check the kernel's CPU features (`available()` or `vnni()`); slices are the
            // mirrored layouts of the blocks they came from, and every row has as many blocks as the
            // weight column.
            unsafe {
                match n {
                    $($n => $kernel::<$n>(w, std::array::from_fn(|i| c(r + i)), o),)+
                    _ => unreachable!("a group of {n} rows"),
                }
            }
            r += n;
        }
        debug_assert_eq!(r, ys.len());
    }};
}

fn cast_mut<A, B>(s: &mut [A]) -> &mut [B] {
    debug_assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    // SAFETY: as `cast`; every bit pattern is valid for these plain-old-data blocks.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut B, s.len()) }
}

fn cast<A, B>(s: &[A]) -> &[B] {
    debug_assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    // SAFETY: only called between a candle block type and its layout mirror (same size, alignment and
    // field layout, checked at compile time above).
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const B, s.len()) }
}

/// Folds Q8_K's 16 sums of 16 activations into 8 sums of 32 (first half of `bsums`, wrapping i16 adds
/// exactly like `_mm_hadd_epi16`): the Q4_K mins term needs only those.
fn fold_bsums(y: &mut Q8K) {
    for s in 0..8 {
        y.bsums[s] = y.bsums[2 * s].wrapping_add(y.bsums[2 * s + 1]);
    }
}

impl MultiRow for BlockQ4K {
    const BLOCK: usize = 256;
    type Act = BlockQ8K;
    fn prepare(acts: &mut [BlockQ8K]) {
        cast_mut::<_, Q8K>(acts).iter_mut().for_each(fold_bsums);
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        dispatch_rows!(q4k_rows, Q8K, cast::<_, Q4K>(w), ys, out, [1, 2, 3, 4])
    }
}

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
const fn q4k_vnni_source(np: usize) -> usize {
    let (t, p) = (np / 64, np % 64);
    let (sub, half, byte) = ((p / 4) % 8, p / 32, p % 4);
    32 * sub + 8 * t + 4 * half + byte
}

const Q4K_VNNI_ORDER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = q4k_vnni_source(i) as u8;
        i += 1;
    }
    t
};

/// The 256 weights of a Q4_K block in natural order (0..16 each).
fn q4k_nibbles(x: &Q4K) -> [u8; 256] {
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

impl MultiRow for BlockQ6K {
    const BLOCK: usize = 256;
    type Act = BlockQ8K;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(
                q6k_rows_vnni,
                Q8K,
                cast::<_, Q6K>(w),
                ys,
                out,
                [1, 2, 3, 4, 5, 6, 7, 8]
            )
        } else {
            dispatch_rows!(q6k_rows, Q8K, cast::<_, Q6K>(w), ys, out, [1, 2, 3, 4])
        }
    }
}

impl MultiRow for BlockQ8_0 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_0;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        dispatch_rows!(q8_0_rows, Q80, cast::<_, Q80>(w), ys, out, [1, 2, 3, 4])
    }
}

impl MultiRow for BlockQ5_0 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_0;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        dispatch_rows!(q5_0_rows, Q80, cast::<_, Q50>(w), ys, out, [1, 2, 3, 4])
    }
}

impl MultiRow for BlockQ4_1 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_1;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_1]], out: &mut [f32]) {
        dispatch_rows!(q4_1_rows, Q81, cast::<_, Q41>(w), ys, out, [1, 2, 3, 4])
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[inline]
fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum_float_8(x: __m256) -> f32 {
    let res = _mm256_extractf128_ps(x, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

#[cfg(target_arch = "x86_64")]
const K4_SHUFFLE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 32 {
            t[i * 32 + j] = (2 * i + (j & 1)) as u8;
            j += 1;
        }
        i += 1;
    }
    t
};

#[cfg(target_arch = "x86_64")]
const K6_SHUFFLE: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = (i / 8) as u8;
        i += 1;
    }
    t
};

/// Q4_K x Q8_K for R rows (candle's `vec_dot_q4k_q8k`, per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn q4k_rows<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    let ahead = prefetch_distance();
    for (b, x) in xs.iter().enumerate() {
        prefetch_ahead(x, ahead);
        let xd = f16_to_f32(x.d);
        let xdmin = f16_to_f32(x.dmin);
        let utmp = q4k_scales_mins(x);
        let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
            utmp[3] as i32,
            utmp[2] as i32,
            utmp[1] as i32,
            utmp[0] as i32,
        ));
        let mins = _mm256_extracti128_si256(mins_and_scales, 1);
        for r in 0..R {
            let y = &ys[r][b];
            let dmin = -y.d * xdmin;
            // SAFETY: bsums is 16 i16; `prepare` left the 8 sums of 32 in its first 16 bytes.
            let q8s = unsafe { _mm_loadu_si128(y.bsums.as_ptr() as *const __m128i) };
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
        }
        let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
        let scales = _mm256_insertf128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            // SAFETY: the shuffle table has 8 rows of 32 bytes; qs has 128 bytes = 4 x 32.
            let (scale_l, scale_h, q4bits) = unsafe {
                (
                    _mm256_shuffle_epi8(
                        scales,
                        _mm256_loadu_si256((K4_SHUFFLE.as_ptr() as *const __m256i).add(2 * j)),
                    ),
                    _mm256_shuffle_epi8(
                        scales,
                        _mm256_loadu_si256((K4_SHUFFLE.as_ptr() as *const __m256i).add(2 * j + 1)),
                    ),
                    _mm256_loadu_si256(x.qs.as_ptr().add(32 * j) as *const __m256i),
                )
            };
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for r in 0..R {
                let q8 = ys[r][b].qs.as_ptr();
                // SAFETY: qs has 256 bytes = 8 x 32.
                let (q8l, q8h) = unsafe {
                    (
                        _mm256_loadu_si256(q8.add(64 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i),
                    )
                };
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                sumi[r] = _mm256_add_epi32(sumi[r], p16l);
                let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                sumi[r] = _mm256_add_epi32(sumi[r], p16h);
            }
        }
        for r in 0..R {
            let d = ys[r][b].d * xd;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for r in 0..R {
        let am = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
        let am = _mm_add_ss(am, _mm_movehdup_ps(am));
        out[r] = hsum_float_8(acc[r]) + _mm_cvtss_f32(am);
    }
}

/// The 6-bit values of half `j` (128 values) of a Q6_K block as four vectors of 32 unsigned bytes
/// (0..64, the value plus 32), llama.cpp's layout.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn q6k_unpack(x: &Q6K, j: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    // SAFETY: ql is 128 bytes (2 x 64), qh 64 bytes (2 x 32), j < 2.
    let (q4bits1, q4bits2, q4bits_h) = unsafe {
        (
            _mm256_loadu_si256(x.ql.as_ptr().add(64 * j) as *const __m256i),
            _mm256_loadu_si256(x.ql.as_ptr().add(64 * j + 32) as *const __m256i),
            _mm256_loadu_si256(x.qh.as_ptr().add(32 * j) as *const __m256i),
        )
    };
    let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m2), 4);
    let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 2), m2), 4);
    let q4h_2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 4), m2), 4);
    let q4h_3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 6), m2), 4);
    [
        _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0),
        _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3),
    ]
}

/// Q6_K x Q8_K for R rows (candle's `vec_dot_q6k_q8k`, per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn q6k_rows<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m32s = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); R];
    let ahead = prefetch_distance();
    for (b, x) in xs.iter().enumerate() {
        prefetch_ahead(x, ahead);
        let xd = f16_to_f32(x.d);
        // SAFETY: scales is 16 bytes.
        let scales = unsafe { _mm_loadu_si128(x.scales.as_ptr() as *const __m128i) };
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..2 {
            let is = j * 4;
            let sh = |i: usize| {
                // SAFETY: the table has 8 rows of 16 bytes and i < 8.
                unsafe {
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                        scales,
                        _mm_loadu_si128((K6_SHUFFLE.as_ptr() as *const __m128i).add(i)),
                    ))
                }
            };
            let (s0, s1, s2, s3) = (sh(is), sh(is + 1), sh(is + 2), sh(is + 3));
            let [q4_0, q4_1, q4_2, q4_3] = q6k_unpack(x, j);
            for r in 0..R {
                let q8 = ys[r][b].qs.as_ptr();
                // SAFETY: qs has 256 bytes = 8 x 32.
                let (q8_0, q8_1, q8_2, q8_3) = unsafe {
                    (
                        _mm256_loadu_si256(q8.add(128 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(128 * j + 32) as *const __m256i),
                        _mm256_loadu_si256(q8.add(128 * j + 64) as *const __m256i),
                        _mm256_loadu_si256(q8.add(128 * j + 96) as *const __m256i),
                    )
                };
                let p16_0 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(q4_0, q8_0),
                    _mm256_maddubs_epi16(m32s, q8_0),
                );
                let p16_1 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(q4_1, q8_1),
                    _mm256_maddubs_epi16(m32s, q8_1),
                );
                let p16_2 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(q4_2, q8_2),
                    _mm256_maddubs_epi16(m32s, q8_2),
                );
                let p16_3 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(q4_3, q8_3),
                    _mm256_maddubs_epi16(m32s, q8_3),
                );
                let p16_0 = _mm256_madd_epi16(s0, p16_0);
                let p16_1 = _mm256_madd_epi16(s1, p16_1);
                let p16_2 = _mm256_madd_epi16(s2, p16_2);
                let p16_3 = _mm256_madd_epi16(s3, p16_3);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p16_0, p16_1));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p16_2, p16_3));
            }
        }
        for r in 0..R {
            let d = ys[r][b].d * xd;
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}

/// Unpacks the 6-bit scales and mins of a Q4_K block (llama.cpp's `utmp` dance): 8 scales then 8 mins.
#[inline]
fn q4k_scales_mins(x: &Q4K) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let mut utmp = [0u32; 4];
    for (i, u) in utmp.iter_mut().take(3).enumerate() {
        *u = u32::from_le_bytes([
            x.scales[4 * i],
            x.scales[4 * i + 1],
            x.scales[4 * i + 2],
            x.scales[4 * i + 3],
        ]);
    }
    utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
    let uaux = utmp[1] & KMASK1;
    utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
    utmp[2] = uaux;
    utmp[0] &= KMASK1;
    utmp
}

/// Bytes ahead of the block being decoded that the kernels prefetch: far enough that the weight stream
/// arrives while the rows are multiplied (the matrix is one contiguous stream per task, so this runs
/// on into the next columns), near enough to stay in L1/L2.
fn prefetch_distance() -> usize {
    use std::sync::OnceLock;
    static D: OnceLock<usize> = OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("SPECD_PREFETCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192)
    })
}

/// Prefetches the cache lines of `bytes` bytes starting `prefetch_distance()` past `block`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead<T>(block: &T, distance: usize) {
    if distance == 0 {
        return;
    }
    let p = (block as *const T as *const i8).wrapping_add(distance);
    let size = std::mem::size_of::<T>();
    let mut off = 0;
    while off < size {
        // SAFETY: prefetch is a hint and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
        off += 64;
    }
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
fn fold16(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Q4_K (in [`Q4KVnni`] order) x Q8_K (prepared) for R rows with AVX-512 VNNI. Per row and block: four
/// `vpdpbusd` (u4 x i8, 16 products of one sub-block per 32-bit lane; at most 16 * 15 * 128 = 30720, so
/// the lane is also a valid i16), one `vpmaddwd` by the lane's sub-block scale, then the block's float
/// step. Every row's operations are the same whatever R is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q4k_rows_vnni<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
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
unsafe fn q6k_rows_vnni<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
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

/// Q8_0 x Q8_0 for R rows (candle's `vec_dot_q8_0_q8_0`, per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn q8_0_rows<const R: usize>(xs: &[Q80], ys: [&[Q80]; R], out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, x) in xs.iter().enumerate() {
        let xd = f16_to_f32(x.d);
        // SAFETY: qs is 32 bytes.
        let bx = unsafe { _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i) };
        let ax = _mm256_sign_epi8(bx, bx);
        for r in 0..R {
            let y = &ys[r][b];
            let d = _mm256_set1_ps(xd * f16_to_f32(y.d));
            // SAFETY: qs is 32 bytes.
            let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
            let sy = _mm256_sign_epi8(by, bx);
            let dot = _mm256_maddubs_epi16(ax, sy);
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
            acc[r][b & 1] = _mm256_fmadd_ps(d, q, acc[r][b & 1]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
}

/// Q5_0 x Q8_0 for R rows (candle's scalar `vec_dot_q5_0_q8_0`, per row: an exact integer sum per block,
/// then the same f32 expression in the same order, so bitwise equal). The weights are decoded once per
/// block into signed bytes `q - 16` (llama.cpp's AVX2 trick: nibbles, and `0xF0` or-ed in where the
/// fifth bit is clear), then multiplied like Q8_0. Kept at 5.5 bits instead of widened to Q8_0 at load:
/// 35% fewer bytes per step for the Qwen 0.5B draft model, whose tensors are mostly Q5_0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn q5_0_rows<const R: usize>(xs: &[Q50], ys: [&[Q80]; R], out: &mut [f32]) {
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Byte i of the 32 gets bit i of qh: broadcast the byte holding it, then test its bit.
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let all = _mm256_set1_epi8(-1);
    let high = _mm256_set1_epi8(0xF0u8 as i8);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, x) in xs.iter().enumerate() {
        // SAFETY: qs is 16 bytes.
        let raw = unsafe { _mm_loadu_si128(x.qs.as_ptr() as *const __m128i) };
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        let nibbles = _mm256_set_m128i(hi, lo);
        let qh = _mm256_set1_epi32(i32::from_le_bytes(x.qh));
        let set = _mm256_cmpeq_epi8(
            _mm256_or_si256(_mm256_shuffle_epi8(qh, spread), others),
            all,
        );
        // q - 16 as i8: the nibble where the fifth bit is set, the nibble - 16 where it is clear.
        let bx = _mm256_or_si256(nibbles, _mm256_andnot_si256(set, high));
        let ax = _mm256_sign_epi8(bx, bx);
        let xd = f16_to_f32(x.d);
        for r in 0..R {
            let y = &ys[r][b];
            let d = _mm256_set1_ps(xd * f16_to_f32(y.d));
            // SAFETY: qs is 32 bytes.
            let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
            // |x| (<= 16) x sign-moved y (Q8_0 never stores -128): pairs at most 2 * 16 * 127.
            let sy = _mm256_sign_epi8(by, bx);
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
            acc[r][b & 1] = _mm256_fmadd_ps(d, q, acc[r][b & 1]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
}

/// Q4_1 x Q8_1 for R rows (candle's scalar `vec_dot_q4_1_q8_1`, per row: the block's integer sum is
/// exact whatever computes it, and the f32 epilogue is the same expression in the same order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn q4_1_rows<const R: usize>(xs: &[Q41], ys: [&[Q81]; R], out: &mut [f32]) {
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut sumf = [0f32; R];
    for (b, x) in xs.iter().enumerate() {
        // SAFETY: qs is 16 bytes.
        let raw = unsafe { _mm_loadu_si128(x.qs.as_ptr() as *const __m128i) };
        // Low nibbles pair with activations 0..16, high nibbles with 16..32.
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        let v = _mm256_set_m128i(hi, lo);
        let (xd, xm) = (f16_to_f32(x.d), f16_to_f32(x.m));
        for r in 0..R {
            let y = &ys[r][b];
            // SAFETY: qs is 32 bytes.
            let q = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
            // u8 (<= 15) x i8 pairs: at most 2 * 15 * 128 in magnitude, no i16 saturation.
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(v, q), ones);
            let sumi = hsum_i32_8(sums);
            sumf[r] += sumi as f32 * xd * f16_to_f32(y.d) + xm * f16_to_f32(y.s);
        }
    }
    out[..R].copy_from_slice(&sumf);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum_i32_8(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qweight::tests::random;
    use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
    use candle_core::{Device, Tensor};

    fn blocks<T: GgmlType>(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> Vec<T> {
        let t = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let bytes = q.data().expect("data");
        let count = n * k / T::BLCK_SIZE;
        let mut out: Vec<T> = (0..count).map(|_| T::zeros()).collect();
        // SAFETY: test helper; ggml blocks are plain old data of exactly this size.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, bytes.len())
        };
        out
    }

    fn acts<A: GgmlType>(rows: usize, k: usize, seed: u64) -> Vec<Vec<A>> {
        (0..rows)
            .map(|r| {
                let mut q: Vec<A> = (0..k / A::BLCK_SIZE).map(|_| A::zeros()).collect();
                A::from_float(&random(k, seed + r as u64), &mut q);
                q
            })
            .collect()
    }

    /// Runs `dot_rows` over 1..=9 rows; returns per row count the outputs (prepared copies of `acts`).
    fn rows_out<T: MultiRow>(w: &[T], acts: &[Vec<T::Act>]) -> Vec<Vec<f32>>
    where
        T::Act: Clone,
    {
        (1..=acts.len())
            .map(|rows| {
                let mut prepared = acts[..rows].to_vec();
                for p in prepared.iter_mut() {
                    T::prepare(p);
                }
                let ys: Vec<&[T::Act]> = prepared.iter().map(|a| a.as_slice()).collect();
                let mut out = vec![0f32; rows];
                T::dot_rows(w, &ys, &mut out);
                out
            })
            .collect()
    }

    /// Bitwise equal to candle's `vec_dot` for any row count (the AVX2 kernels and Q8_0 / Q4_1).
    fn check<T: GgmlType + MultiRow<Act = T::VecDotType>>(dtype: GgmlDType)
    where
        T::VecDotType: Clone,
    {
        if !available() {
            eprintln!("SKIP: no AVX2/FMA");
            return;
        }
        let k = 512;
        let w: Vec<T> = blocks(dtype, 1, k, 1);
        let a: Vec<Vec<T::VecDotType>> = acts(9, k, 100);
        for (i, out) in rows_out(&w, &a).iter().enumerate() {
            for (r, got) in out.iter().enumerate() {
                let want = T::vec_dot(k, &w, &a[r]);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{dtype:?} rows={} r={r}",
                    i + 1
                );
            }
        }
    }

    /// A kernel whose integer lanes differ from candle's: every row bitwise the same whatever the row
    /// count, and within float rounding of candle's `vec_dot` (relative to the sum of the terms'
    /// magnitudes). `reference` is the same weights in candle's layout.
    fn check_invariant_and_close<T, C>(w: &[T], reference: &[C], k: usize)
    where
        T: MultiRow,
        T::Act: Clone,
        C: GgmlType<VecDotType = T::Act>,
    {
        let a: Vec<Vec<T::Act>> = acts(9, k, 300);
        let alone: Vec<f32> = a
            .iter()
            .map(|one| rows_out(w, std::slice::from_ref(one))[0][0])
            .collect();
        for (i, out) in rows_out(w, &a).iter().enumerate() {
            for (r, got) in out.iter().enumerate() {
                assert_eq!(got.to_bits(), alone[r].to_bits(), "rows={} r={r}", i + 1);
            }
        }
        let mut wf = vec![0f32; k];
        C::to_float(reference, &mut wf);
        for (r, got) in alone.iter().enumerate() {
            let mut yf = vec![0f32; k];
            T::Act::to_float(&a[r], &mut yf);
            let magnitude: f32 = wf.iter().zip(&yf).map(|(x, y)| (x * y).abs()).sum();
            let want = C::vec_dot(k, reference, &a[r]);
            assert!(
                (got - want).abs() <= 1e-5 * magnitude,
                "r={r}: {got} vs candle {want} (magnitude {magnitude})"
            );
        }
    }

    #[test]
    fn q4k_vnni_order_round_trips_and_kernel_is_row_invariant() {
        let k = 1024;
        let w: Vec<BlockQ4K> = blocks(GgmlDType::Q4K, 1, k, 5);
        let v: Vec<Q4KVnni> = w.iter().map(Q4KVnni::from_block).collect();
        let back: Vec<BlockQ4K> = v.iter().map(Q4KVnni::to_block).collect();
        let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
        BlockQ4K::to_float(&w, &mut a);
        BlockQ4K::to_float(&back, &mut b);
        assert_eq!(a, b);
        let mut seen = [false; 256];
        for &i in Q4K_VNNI_ORDER.iter() {
            assert!(!seen[i as usize], "position {i} twice");
            seen[i as usize] = true;
        }
        if !vnni() {
            eprintln!("SKIP kernel: no AVX-512 VNNI");
            return;
        }
        check_invariant_and_close(&v, &w, k);
    }

    #[test]
    fn q6k_vnni_kernel_is_row_invariant_and_close_to_candle() {
        if !vnni() {
            eprintln!("SKIP: no AVX-512 VNNI");
            return;
        }
        let k = 1024;
        let w: Vec<BlockQ6K> = blocks(GgmlDType::Q6K, 1, k, 6);
        check_invariant_and_close(&w, &w, k);
    }

    /// The AVX2 kernels directly, whatever `vnni()` says, so both paths are covered on any machine.
    #[test]
    fn avx2_kernels_match_candle_bitwise() {
        if !available() {
            eprintln!("SKIP: no AVX2/FMA");
            return;
        }
        let k = 512;
        let w4: Vec<BlockQ4K> = blocks(GgmlDType::Q4K, 1, k, 3);
        let w6: Vec<BlockQ6K> = blocks(GgmlDType::Q6K, 1, k, 4);
        for rows in 1..=9 {
            let acts: Vec<Vec<BlockQ8K>> = (0..rows)
                .map(|r| {
                    let mut q: Vec<BlockQ8K> = (0..k / 256).map(|_| BlockQ8K::zeros()).collect();
                    BlockQ8K::from_float(&random(k, 200 + r as u64), &mut q);
                    q
                })
                .collect();
            let ys: Vec<&[BlockQ8K]> = acts.iter().map(|a| a.as_slice()).collect();
            let mut prepared = acts.clone();
            for p in prepared.iter_mut() {
                BlockQ4K::prepare(p);
            }
            let ps: Vec<&[BlockQ8K]> = prepared.iter().map(|a| a.as_slice()).collect();
            let (mut o4, mut o6) = (vec![0f32; rows], vec![0f32; rows]);
            dispatch_rows!(
                q4k_rows,
                Q8K,
                cast::<_, Q4K>(&w4),
                &ps,
                &mut o4[..],
                [1, 2, 3, 4]
            );
            dispatch_rows!(
                q6k_rows,
                Q8K,
                cast::<_, Q6K>(&w6),
                &ys,
                &mut o6[..],
                [1, 2, 3, 4]
            );
            for r in 0..rows {
                assert_eq!(
                    o4[r].to_bits(),
                    BlockQ4K::vec_dot(k, &w4, &acts[r]).to_bits()
                );
                assert_eq!(
                    o6[r].to_bits(),
                    BlockQ6K::vec_dot(k, &w6, &acts[r]).to_bits()
                );
            }
        }
    }

    #[test]
    fn q4k_matches_candle_bitwise_for_any_row_count() {
        check::<BlockQ4K>(GgmlDType::Q4K);
    }

    #[test]
    fn q6k_matches_candle_bitwise_for_any_row_count() {
        if vnni() {
            eprintln!("SKIP: the VNNI kernel is checked by q6k_vnni_kernel_is_row_invariant_*");
            return;
        }
        check::<BlockQ6K>(GgmlDType::Q6K);
    }

    /// The Q8_0 and Q5_0 kernels keep two accumulators per row (even and odd blocks): with one, a row
    /// waited on its own float chain every 32 weights (Qwen 0.5B ffn gate, one row: 0.21 -> 0.12 ms).
    /// So they are not bitwise candle's, only close to it and row invariant.
    #[test]
    fn q8_0_and_q5_0_kernels_are_row_invariant_and_close_to_candle() {
        if !available() {
            eprintln!("SKIP: no AVX2/FMA");
            return;
        }
        let k = 1024;
        let w: Vec<BlockQ8_0> = blocks(GgmlDType::Q8_0, 1, k, 8);
        check_invariant_and_close(&w, &w, k);
        let w: Vec<BlockQ5_0> = blocks(GgmlDType::Q5_0, 1, k, 5);
        check_invariant_and_close(&w, &w, k);
    }

    #[test]
    fn q4_1_matches_candle_bitwise_for_any_row_count() {
        check::<BlockQ4_1>(GgmlDType::Q4_1);
    }
}
