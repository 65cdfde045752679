//! Multi-row quantized dot-product kernels (x86-64 AVX2 + FMA): one weight column against up to R
//! activation rows, decoding each weight block once for all of them.
//!
//! These follow candle's single-row AVX2 kernels (`vec_dot_q4k_q8k`, `vec_dot_q6k_q8k`,
//! `vec_dot_q8_0_q8_0`) instruction for instruction *per row*: every row keeps its own accumulators and
//! sees the same sequence of integer and floating-point operations whatever R is, so a row's result is
//! bitwise the same computed alone or with others (and bitwise equal to candle's `vec_dot`, which the tests
//! check). What is shared across rows is the work that depends only on the weights: unpacking nibbles,
//! 6-bit scales and high bits. That is most of a verify step's extra cost on a CPU, so k+1 rows cost much
//! less than k+1 single-row passes.
//!
//! Only the formats of the project's model files get a kernel (Q4_K, Q6_K, Q8_0 and so Q5_0, converted
//! to Q8_0 at load, and Q4_1, SmolLM2's); `qweight.rs` falls back to candle's `vec_dot` for the others and
//! on CPUs without AVX2. Candle has no SIMD Q4_1 kernel: its scalar `vec_dot_q4_1_q8_1` sums each block in
//! integers and then does a fixed sequence of f32 operations per block; the kernel here computes the same
//! integer sums with AVX2 and then the same f32 operations in the same order, so it is bitwise equal too.
//! The choice depends on the CPU and the format, never on the row count.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1,
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

/// Whether the AVX-512 VNNI variants (Q4_K, Q6_K) can run on this CPU (checked once). They produce the
/// same bits as the AVX2 ones: integer partial sums are exact and are folded into the same eight lanes
/// before the first floating-point operation.
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
pub trait MultiRow: Sized {
    type Act;
    /// Rewrites quantized activation rows, once per matmul, into the form `dot_rows` reads (work that
    /// would otherwise be redone for every weight column). The rows are only fit for `dot_rows` after.
    fn prepare(_acts: &mut [Self::Act]) {}
    /// `out[r] = dot(w, ys[r])` for every row of prepared activations. Requires [`available`].
    fn dot_rows(w: &[Self], ys: &[&[Self::Act]], out: &mut [f32]);
}

/// Rows per kernel call: enough to share the weight decoding, few enough to keep accumulators in
/// registers.
const ROWS: usize = 4;

macro_rules! dispatch_rows {
    ($kernel:ident, $mirror:ty, $w:expr, $ys:expr, $out:expr) => {{
        let (w, ys, out) = ($w, $ys, $out);
        let c = |r: usize| -> &[$mirror] { cast(ys[r]) };
        // Groups as even as possible (9 rows: 3+3+3, not 4+4+1): a lone row pays the whole weight decode.
        let groups = ys.len().div_ceil(ROWS);
        let mut r = 0;
        for g in 0..groups {
            let n = (ys.len() - r) / (groups - g);
            // SAFETY: callers check `available()` (AVX2 + FMA); slices are the mirrored layouts of the
            // blocks they came from, and every row has as many blocks as the weight column.
            unsafe {
                match n {
                    4 => $kernel::<4>(w, [c(r), c(r + 1), c(r + 2), c(r + 3)], &mut out[r..r + 4]),
                    3 => $kernel::<3>(w, [c(r), c(r + 1), c(r + 2)], &mut out[r..r + 3]),
                    2 => $kernel::<2>(w, [c(r), c(r + 1)], &mut out[r..r + 2]),
                    _ => $kernel::<1>(w, [c(r)], &mut out[r..r + 1]),
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

impl MultiRow for BlockQ4K {
    type Act = BlockQ8K;
    /// Replaces each block's 16 sums of 16 activations by 8 sums of 32 (first half of `bsums`, wrapping
    /// i16 adds exactly like `_mm_hadd_epi16`): the mins term needs only those.
    fn prepare(acts: &mut [BlockQ8K]) {
        for y in cast_mut::<_, Q8K>(acts) {
            for s in 0..8 {
                y.bsums[s] = y.bsums[2 * s].wrapping_add(y.bsums[2 * s + 1]);
            }
        }
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(q4k_rows_vnni, Q8K, cast::<_, Q4K>(w), ys, out)
        } else {
            dispatch_rows!(q4k_rows, Q8K, cast::<_, Q4K>(w), ys, out)
        }
    }
}

impl MultiRow for BlockQ6K {
    type Act = BlockQ8K;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(q6k_rows_vnni, Q8K, cast::<_, Q6K>(w), ys, out)
        } else {
            dispatch_rows!(q6k_rows, Q8K, cast::<_, Q6K>(w), ys, out)
        }
    }
}

impl MultiRow for BlockQ8_0 {
    type Act = BlockQ8_0;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        dispatch_rows!(q8_0_rows, Q80, cast::<_, Q80>(w), ys, out)
    }
}

impl MultiRow for BlockQ4_1 {
    type Act = BlockQ8_1;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_1]], out: &mut [f32]) {
        dispatch_rows!(q4_1_rows, Q81, cast::<_, Q41>(w), ys, out)
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
unsafe fn q4k_rows<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
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
unsafe fn q6k_rows<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m32s = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
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

/// Folds a 16-lane integer accumulator into 8 lanes (lane i + lane i+8, exact), matching the AVX2 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
fn fold16(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Q4_K x Q8_K for R rows with AVX-512 VNNI: 64 weights (two sub-blocks) per `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn q4k_rows_vnni<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        let xd = f16_to_f32(x.d);
        let xdmin = f16_to_f32(x.dmin);
        let utmp = q4k_scales_mins(x);
        let sc: [u8; 16] = {
            let mut t = [0u8; 16];
            for (i, u) in utmp.iter().enumerate() {
                t[4 * i..4 * i + 4].copy_from_slice(&u.to_le_bytes());
            }
            t
        };
        let mins = _mm256_extracti128_si256(
            _mm256_cvtepu8_epi16(_mm_set_epi32(
                utmp[3] as i32,
                utmp[2] as i32,
                utmp[1] as i32,
                utmp[0] as i32,
            )),
            1,
        );
        for r in 0..R {
            let y = &ys[r][b];
            let dmin = -y.d * xdmin;
            // SAFETY: bsums is 16 i16; `prepare` left the 8 sums of 32 in its first 16 bytes.
            let q8s = unsafe { _mm_loadu_si128(y.bsums.as_ptr() as *const __m128i) };
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
        }
        let mut sumi = [_mm512_setzero_si512(); R];
        for j in 0..4 {
            // Lanes 0..7 carry sub-block 2j (low nibbles), lanes 8..15 sub-block 2j+1 (high nibbles).
            let scale = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16(sc[2 * j] as i16)),
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
            );
            // SAFETY: qs has 128 bytes = 4 x 32.
            let q4bits = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * j) as *const __m256i) };
            let q4 = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_and_si256(q4bits, m4)),
                _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4),
            );
            for r in 0..R {
                // SAFETY: qs has 256 bytes = 4 x 64.
                let q8 =
                    unsafe { _mm512_loadu_si512(ys[r][b].qs.as_ptr().add(64 * j) as *const _) };
                // u8 x i8 pairs to i16 (no saturation: 15 * 127 * 2 < 2^15), then scale and pair-sum into
                // the i32 accumulator in one VNNI instruction.
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], scale, _mm512_maddubs_epi16(q4, q8));
            }
        }
        for r in 0..R {
            let d = ys[r][b].d * xd;
            acc[r] = _mm256_fmadd_ps(
                _mm256_set1_ps(d),
                _mm256_cvtepi32_ps(fold16(sumi[r])),
                acc[r],
            );
        }
    }
    for r in 0..R {
        let am = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
        let am = _mm_add_ss(am, _mm_movehdup_ps(am));
        out[r] = hsum_float_8(acc[r]) + _mm_cvtss_f32(am);
    }
}

/// Q6_K x Q8_K for R rows with AVX-512 VNNI: two 32-value chunks per `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn q6k_rows_vnni<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
    let m32s = _mm512_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        let xd = f16_to_f32(x.d);
        let mut sumi = [_mm512_setzero_si512(); R];
        for j in 0..2 {
            let [q4_0, q4_1, q4_2, q4_3] = q6k_unpack(x, j);
            let w01 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q4_0), q4_1);
            let w23 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q4_2), q4_3);
            // Scale of every 16 values: chunk c (32 values) has scales[8j + 2c] then [8j + 2c + 1]; as i16
            // lanes, 8 per scale.
            let sc = |c: usize, h: usize| x.scales[8 * j + 2 * c + h] as i16;
            let lanes = |c0: usize, c1: usize| {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_setr_epi16(
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 0),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                        sc(c0, 1),
                    )),
                    _mm256_setr_epi16(
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 0),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                        sc(c1, 1),
                    ),
                )
            };
            let (s01, s23) = (lanes(0, 1), lanes(2, 3));
            for r in 0..R {
                let q8 = ys[r][b].qs.as_ptr();
                // SAFETY: qs has 256 bytes = 2 x 128.
                let (y01, y23) = unsafe {
                    (
                        _mm512_loadu_si512(q8.add(128 * j) as *const _),
                        _mm512_loadu_si512(q8.add(128 * j + 64) as *const _),
                    )
                };
                // i16 pair sums of (q - 32) * y, exactly as the AVX2 kernel, then scaled into i32 lanes.
                let p01 = _mm512_sub_epi16(
                    _mm512_maddubs_epi16(w01, y01),
                    _mm512_maddubs_epi16(m32s, y01),
                );
                let p23 = _mm512_sub_epi16(
                    _mm512_maddubs_epi16(w23, y23),
                    _mm512_maddubs_epi16(m32s, y23),
                );
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], s01, p01);
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], s23, p23);
            }
        }
        for r in 0..R {
            let d = ys[r][b].d * xd;
            acc[r] = _mm256_fmadd_ps(
                _mm256_broadcast_ss(&d),
                _mm256_cvtepi32_ps(fold16(sumi[r])),
                acc[r],
            );
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}

/// Q8_0 x Q8_0 for R rows (candle's `vec_dot_q8_0_q8_0`, per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_rows<const R: usize>(xs: &[Q80], ys: [&[Q80]; R], out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
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
            acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}

/// Q4_1 x Q8_1 for R rows (candle's scalar `vec_dot_q4_1_q8_1`, per row: the block's integer sum is
/// exact whatever computes it, and the f32 epilogue is the same expression in the same order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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

    fn check<T: GgmlType + MultiRow<Act = T::VecDotType>>(dtype: GgmlDType) {
        if !available() {
            eprintln!("SKIP: no AVX2/FMA");
            return;
        }
        let k = 512;
        let w: Vec<T> = blocks(dtype, 1, k, 1);
        for rows in 1..=9 {
            let acts: Vec<Vec<T::VecDotType>> = (0..rows)
                .map(|r| {
                    let x = random(k, 100 + r as u64);
                    let mut q: Vec<T::VecDotType> = (0..k / T::VecDotType::BLCK_SIZE)
                        .map(|_| T::VecDotType::zeros())
                        .collect();
                    T::VecDotType::from_float(&x, &mut q);
                    q
                })
                .collect();
            let mut prepared = acts.clone();
            for p in prepared.iter_mut() {
                T::prepare(p);
            }
            let ys: Vec<&[T::VecDotType]> = prepared.iter().map(|a| a.as_slice()).collect();
            let mut out = vec![0f32; rows];
            T::dot_rows(&w, &ys, &mut out);
            for r in 0..rows {
                let want = T::vec_dot(k, &w, &acts[r]);
                assert_eq!(
                    out[r].to_bits(),
                    want.to_bits(),
                    "{dtype:?} rows={rows} r={r}"
                );
            }
        }
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
            dispatch_rows!(q4k_rows, Q8K, cast::<_, Q4K>(&w4), &ps, &mut o4[..]);
            dispatch_rows!(q6k_rows, Q8K, cast::<_, Q6K>(&w6), &ys, &mut o6[..]);
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
        check::<BlockQ6K>(GgmlDType::Q6K);
    }

    #[test]
    fn q8_0_matches_candle_bitwise_for_any_row_count() {
        check::<BlockQ8_0>(GgmlDType::Q8_0);
    }

    #[test]
    fn q4_1_matches_candle_bitwise_for_any_row_count() {
        check::<BlockQ4_1>(GgmlDType::Q4_1);
    }
}
