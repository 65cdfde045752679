//! Multi-row quantized dot-product kernels (x86-64 AVX2 + FMA, and AVX-512 VNNI where the CPU has it):
//! one weight column (a group of sixteen for the AVX-512 VNNI K-quant kernels) against up to R activation
//! rows, decoding each weight block once for all of them.
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
//! On AVX-512 VNNI CPUs Q4_K, Q6_K (nearly all of Qwen 1.5B's weights), Q4_1 (SmolLM2's), Q5_0 (most
//! of Qwen 0.5B's) and Q8_0 (heads and embeddings; these two where a row has an even block count) are
//! stored in column groups of sixteen
//! and multiplied by the kernels of `interleaved.rs` ([`GroupRows`]): one
//! `vpdpbusd` covers four weights of sixteen columns, scales are applied per lane for sixteen columns at
//! once and there are no horizontal sums, so the extra rows of a verify step or a prefill cost about
//! half of what a one-column kernel paid. Their integer sums are exact but fall into different lanes
//! than candle's, so their results differ from candle's in the last float bits (within float rounding;
//! the tests check the bound and the row invariance). `SPECD_NO_AVX512=1` selects the AVX2 kernels.
//!
//! The 32-value block formats also have one-column AVX-512 VNNI kernels (`vnni.rs`), used where a Q8_0
//! or Q5_0 row has an odd block count (none of the project's files; the kernels stay tested). Two blocks per
//! 64-byte vector; signed weights give their magnitudes to `vpdpbusd` and their signs to each row's
//! activations (one masked subtract), Q4_1's unsigned nibbles go in as they are; block scales are applied
//! per lane in f32. Their activation rows are rewritten once per matmul into values-then-scales order
//! (`values_then_scales`), so a pair of blocks is one load. On AVX2 these formats cost about
//! 20 instructions per row and 64 weights (sign moves, two-step multiplies, a scalar scale or a
//! horizontal sum per block); here about 8 to 10. Measured (AVX-512 VNNI machine, 2 threads, `specd
//! bench-kernels`): Qwen 0.5B one-row forward 65 -> 29 ms, SmolLM2 31 -> 14 ms.
//!
//! The AVX2 K-quant kernels prefetch the weight stream a few KiB ahead of the block being decoded (the matrix
//! is one contiguous stream per task), so the next weights arrive while the rows are multiplied: on the
//! one-column VNNI K-quant kernels the column groups replaced, this took the Qwen 1.5B one-row forward
//! from about 29 to 27 ms and a 4-row verify from 58 to 47 ms on this project's 2-core machine. `SPECD_PREFETCH=<bytes>` changes the distance (0 turns it off). The AVX2
//! Q8_0, Q5_0 and Q4_1 kernels do not: their blocks are small and the same prefetch made the Qwen 0.5B
//! forward slower, 18 -> 22 ms, on an AVX2 machine. The VNNI ones do, once per block pair: without it
//! the 0.5B's one-row forward took 40 ms instead of 29.
//!
//! This module holds the traits, the dispatch by row count, the block layout mirrors and the shared
//! helpers; `avx2.rs` the AVX2 kernels, `vnni.rs` the one-column AVX-512 VNNI kernels (32-value
//! blocks) and the layout they read, `interleaved.rs` the column-group layouts and kernels, `tests.rs`
//! the checks against candle.
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

/// Whether the AVX-512 VNNI kernels are used on this CPU (checked once; `SPECD_NO_AVX512` turns them
/// off). Q4_K and Q6_K weights are loaded in column groups ([`GroupRows`]) when this is true.
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
    /// Rewrites one quantized activation row (all its blocks), once per matmul, into the form
    /// `dot_rows` reads (work that would otherwise be redone for every weight column). The row is only
    /// fit for `dot_rows` after.
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

impl MultiRow for BlockQ6K {
    const BLOCK: usize = 256;
    type Act = BlockQ8K;
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [f32]) {
        dispatch_rows!(q6k_rows, Q8K, cast::<_, Q6K>(w), ys, out, [1, 2, 3, 4])
    }
}

impl MultiRow for BlockQ8_0 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_0;
    fn prepare(acts: &mut [BlockQ8_0]) {
        if vnni() {
            values_then_scales(acts);
        }
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(
                q8_0_rows_vnni,
                Q80,
                cast::<_, Q80>(w),
                ys,
                out,
                [1, 2, 3, 4, 5, 6, 7, 8]
            )
        } else {
            dispatch_rows!(q8_0_rows, Q80, cast::<_, Q80>(w), ys, out, [1, 2, 3, 4])
        }
    }
}

impl MultiRow for BlockQ5_0 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_0;
    fn prepare(acts: &mut [BlockQ8_0]) {
        if vnni() {
            values_then_scales(acts);
        }
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(
                q5_0_rows_vnni,
                Q80,
                cast::<_, Q50>(w),
                ys,
                out,
                [1, 2, 3, 4, 5, 6, 7, 8]
            )
        } else {
            dispatch_rows!(q5_0_rows, Q80, cast::<_, Q50>(w), ys, out, [1, 2, 3, 4])
        }
    }
}

impl MultiRow for BlockQ4_1 {
    const BLOCK: usize = 32;
    type Act = BlockQ8_1;
    fn prepare(acts: &mut [BlockQ8_1]) {
        if vnni() {
            values_then_scales(acts);
        }
    }
    fn dot_rows(w: &[Self], ys: &[&[BlockQ8_1]], out: &mut [f32]) {
        if vnni() {
            dispatch_rows!(
                q4_1_rows_vnni,
                Q81,
                cast::<_, Q41>(w),
                ys,
                out,
                [1, 2, 3, 4, 5, 6, 7, 8]
            )
        } else {
            dispatch_rows!(q4_1_rows, Q81, cast::<_, Q41>(w), ys, out, [1, 2, 3, 4])
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod interleaved;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
use avx2::*;
#[cfg(target_arch = "x86_64")]
pub use interleaved::{GroupRows, GROUP, Q4KX16, Q4_1X16, Q5_0X16, Q6KX16, Q8_0X16};
#[cfg(target_arch = "x86_64")]
use vnni::*;

#[inline]
fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
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

#[cfg(test)]
mod tests;
