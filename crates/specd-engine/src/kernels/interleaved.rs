//! Column-interleaved weight layouts and their AVX-512 VNNI kernels: sixteen output columns side by side,
//! one per 32-bit lane, so one `vpdpbusd` multiplies four weights of each of sixteen columns by the same
//! four activations (broadcast from memory) and the block scales are applied per lane, for all sixteen
//! columns at once.
//!
//! A one-column kernel (`vnni.rs`'s, and the K-quant ones these replaced) pays, per row and weight
//! block, a handful of instructions that do no multiplying (scale products, lane folds, conversions, a
//! horizontal sum per column): for the extra rows of a verify step or a prefill, which are
//! compute-bound, that is about as much as the multiplies.
//! Here those steps cover sixteen columns each, activation loads are broadcasts (load ports, not vector
//! units), and the output of sixteen columns is one store: no horizontal sums at all. This is the layout
//! llama.cpp's repacked CPU paths use (`block_q4_Kx8`), built for our batch invariance: each row has its own
//! accumulators and sees the same operations whatever the row count, and a matrix's column groups are
//! fixed by column index alone (a column's group and lane never depend on the rows).
//!
//! Software prefetch only with several rows ([`prefetch_unit`]): one row is a forward stream the
//! hardware prefetchers follow (asking ahead made the Q6_K head of Qwen 1.5B, 191 MB, past the L3
//! cache, 20-40% slower for one row), while several rows multiply long enough per cache line that the
//! stream stalls without help.
//!
//! Integer sums are exact, so only the float steps fix the rounding: one fused step per row and block, in
//! block order. Results match candle's `vec_dot` within float rounding (the tests check the bound and
//! the row invariance).

use super::*;

/// Output columns per group (one per 32-bit lane of a 512-bit vector).
pub const GROUP: usize = 16;

/// How far ahead of the unit being multiplied a kernel of several rows asks for weights (bytes).
const PREFETCH_AHEAD: usize = 4096;

/// With several rows the kernels are compute-bound: left to the hardware prefetchers, the weight
/// stream stalls while they multiply (AMD EPYC, Qwen 1.5B's layers from memory, best of 5 passes,
/// 5 rows: 62-71 ms without, 49-54 with; 8 rows: 84-92 and 63-77). One row keeps its pace without help,
/// and asking ahead slowed the 191 MB head for one row (4.2-6.6 ms without, 6.1-8.4 with), so one row
/// does not prefetch. A unit's lines are asked for in `parts` steps spread over its multiplies (this
/// is part `part`), [`PREFETCH_AHEAD`] bytes ahead.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_part<const R: usize, T>(unit: &T, part: usize, parts: usize) {
    if R > 1 {
        let lines = std::mem::size_of::<T>().div_ceil(64);
        let p = (unit as *const T).cast::<i8>().wrapping_add(PREFETCH_AHEAD);
        for line in part * lines / parts..(part + 1) * lines / parts {
            // SAFETY: a prefetch is a hint and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line)) };
        }
    }
}

/// One Q4_K block (256 weights along k) of sixteen consecutive output columns, interleaved. Per
/// sixteen-weight run `g` (sub-block `g / 2`, half `g % 2`), `qs[g]` is two vectors: lane `c` of the
/// first holds column `c`'s weights 0..4 of the run in its low nibbles and 4..8 in its high ones, the
/// second 8..12 and 12..16. Scales and mins are unpacked from their 6-bit form (one byte each,
/// columns side by side, mins in pairs of sub-blocks), `d` and `dmin` stay f16. 2368 bytes for the
/// 2304 of sixteen ggml blocks (+2.8%); aligned so every vector load is aligned.
///
/// The fields are in the order the kernel reads them, so a matrix is one forward stream: with the
/// scales after the weights, the kernel's reads jumped back and forth inside each block and a matrix
/// too big for the L3 cache streamed from memory at half the rate (AMD EPYC, Qwen 1.5B's Q6_K head:
/// 14 ms instead of 6 for one row).
#[repr(C, align(64))]
#[derive(Clone)]
pub struct Q4KX16 {
    d: [u16; GROUP],
    dmin: [u16; GROUP],
    /// `scales[s][c]`: sub-block `s`'s scale for column `c`.
    scales: [[u8; GROUP]; 8],
    /// `mins[j][2c + e]`: sub-block `2j + e`'s min for column `c`.
    mins: [[u8; 2 * GROUP]; 4],
    qs: [[u8; 128]; 16],
}

const _: () = assert!(std::mem::size_of::<Q4KX16>() == 2368);

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

/// A candle block from its layout mirror.
fn block_from<B: GgmlType, M>(x: M) -> B {
    let mut out = B::zeros();
    cast_mut::<_, M>(std::slice::from_mut(&mut out))[0] = x;
    out
}

/// Weight `v` (0..32) of a 32-weight ggml block's nibbles: weight `v < 16` is the low nibble of byte
/// `v`, weight `16 + v` the high one.
fn nibble32(qs: &[u8; 16], v: usize) -> u8 {
    if v < 16 {
        qs[v] & 0xf
    } else {
        qs[v - 16] >> 4
    }
}

/// Sets weight `v` of a zeroed 32-weight nibble array (the inverse of [`nibble32`]).
fn set_nibble32(qs: &mut [u8; 16], v: usize, q: u8) {
    qs[v % 16] |= if v < 16 { q } else { q << 4 };
}

/// Each row's sixteen outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn store_rows<const R: usize>(acc: &[__m512; R], out: &mut [[f32; GROUP]]) {
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: o is 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
    }
}

/// Position of weight `i` (0..16) of a sixteen-weight run in its two vectors: (vector, byte within the
/// column's four bytes, high nibble).
const fn run_slot(i: usize) -> (usize, usize, bool) {
    (i / 8, i % 4, (i / 4) % 2 == 1)
}

impl Q4KX16 {
    fn from_q4k(cols: &[&BlockQ4K]) -> Self {
        debug_assert!(cols.len() <= GROUP);
        let mut out = Self {
            qs: [[0; 128]; 16],
            d: [0; GROUP],
            dmin: [0; GROUP],
            scales: [[0; GROUP]; 8],
            mins: [[0; 2 * GROUP]; 4],
        };
        for (c, block) in cols.iter().enumerate() {
            let x: &Q4K = &cast(std::slice::from_ref(*block))[0];
            let q = q4k_nibbles(x);
            let utmp = q4k_scales_mins(x);
            let bytes = |u: &[u32]| -> [u8; 8] {
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&u[0].to_le_bytes());
                b[4..].copy_from_slice(&u[1].to_le_bytes());
                b
            };
            let (scales, mins) = (bytes(&utmp[..2]), bytes(&utmp[2..]));
            out.d[c] = x.d;
            out.dmin[c] = x.dmin;
            for s in 0..8 {
                out.scales[s][c] = scales[s];
                out.mins[s / 2][2 * c + s % 2] = mins[s];
            }
            for (g, run) in out.qs.iter_mut().enumerate() {
                for i in 0..16 {
                    let (v, e, high) = run_slot(i);
                    let byte = &mut run[64 * v + 4 * c + e];
                    let nib = q[16 * g + i];
                    *byte |= if high { nib << 4 } else { nib };
                }
            }
        }
        out
    }

    fn q4k_column(&self, c: usize) -> BlockQ4K {
        let mut q = [0u8; 256];
        for (g, run) in self.qs.iter().enumerate() {
            for i in 0..16 {
                let (v, e, high) = run_slot(i);
                let byte = run[64 * v + 4 * c + e];
                q[16 * g + i] = if high { byte >> 4 } else { byte & 0x0f };
            }
        }
        let scales: [u8; 8] = std::array::from_fn(|s| self.scales[s][c]);
        let mins: [u8; 8] = std::array::from_fn(|s| self.mins[s / 2][2 * c + s % 2]);
        let mut x = Q4K {
            d: self.d[c],
            dmin: self.dmin[c],
            scales: [0; 12],
            qs: [0; 128],
        };
        // ggml's 6-bit packing (`get_scale_min_k4` read backwards): sub-blocks 0..4 in the low six bits
        // of bytes 0..4 (scales) and 4..8 (mins); 4..8 split between bytes 8..12 and the top two bits.
        for j in 0..4 {
            x.scales[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
            x.scales[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
            x.scales[j + 8] = (scales[j + 4] & 0x0f) | ((mins[j + 4] & 0x0f) << 4);
        }
        for (b, byte) in x.qs.iter_mut().enumerate() {
            let (pair, o) = (b / 32, b % 32);
            *byte = q[64 * pair + o] | (q[64 * pair + 32 + o] << 4);
        }
        block_from(x)
    }
}

/// A weight format laid out in column groups, with a kernel over up to eight rows per group.
pub trait GroupRows: Sized + Sync {
    /// ggml blocks per unit along k (one, or two where one block is too small for aligned vectors).
    const UNIT: usize = 1;
    /// The ggml block it is made of.
    type Block: GgmlType + Clone;
    /// Interleaves one unit of up to sixteen columns (`UNIT` blocks each; missing columns are zero).
    fn from_blocks(cols: &[&[Self::Block]]) -> Self;
    /// Column `c`'s `UNIT` blocks in ggml's layout (exact).
    fn column(&self, c: usize) -> Vec<Self::Block>;
    /// The quantized activation block it multiplies with.
    type Act: GgmlType + Sync;
    /// Rewrites one quantized activation row once per matmul into the form `dot_group` reads.
    fn prepare(_acts: &mut [Self::Act]) {}
    /// `out[r][c] = dot(column c of the group, ys[r])` for every row. `w` is the group's units along k.
    /// Requires [`vnni`].
    fn dot_group(w: &[Self], ys: &[&[Self::Act]], out: &mut [[f32; GROUP]]);
}

impl GroupRows for Q4KX16 {
    type Block = BlockQ4K;
    fn from_blocks(cols: &[&[BlockQ4K]]) -> Self {
        let cols: Vec<&BlockQ4K> = cols.iter().map(|c| &c[0]).collect();
        Self::from_q4k(&cols)
    }
    fn column(&self, c: usize) -> Vec<BlockQ4K> {
        vec![self.q4k_column(c)]
    }
    type Act = BlockQ8K;
    /// Sums of 32 activations in the first half of `bsums` (the mins term), as for the AVX2 kernel.
    fn prepare(acts: &mut [BlockQ8K]) {
        cast_mut::<_, Q8K>(acts).iter_mut().for_each(fold_bsums);
    }
    fn dot_group(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [[f32; GROUP]]) {
        debug_assert!(vnni());
        dispatch_rows!(q4kx16_rows, Q8K, w, ys, out, [1, 2, 3, 4, 5, 6, 7, 8])
    }
}

/// Q4_K x Q8_K for sixteen interleaved columns and R rows. Per row and sixteen-weight run: four
/// `vpdpbusd` (a lane sums 16 products u4 x i8, within an i16) and one
/// `vpdpwssd` by the run's per-column scale into the block's integer sum; per row and block, four
/// `vpdpwssd` for the mins and one float step. Weight unpacking is shared by the rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q4kx16_rows<const R: usize>(xs: &[Q4KX16], ys: [&[Q8K]; R], out: &mut [[f32; GROUP]]) {
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        let mut blk = [_mm512_setzero_si512(); R];
        for s in 0..8 {
            // Lane c: column c's scale as the i16 pair (scale, 0).
            // SAFETY: 16 bytes.
            let sc = _mm512_cvtepu8_epi32(unsafe {
                _mm_loadu_si128(x.scales[s].as_ptr() as *const __m128i)
            });
            for h in 0..2 {
                prefetch_part::<R, _>(x, 2 * s + h, 16);
                let run = x.qs[2 * s + h].as_ptr();
                // SAFETY: a run is 128 bytes, two aligned vectors.
                let (lo, hi) = unsafe {
                    (
                        _mm512_load_si512(run as *const _),
                        _mm512_load_si512(run.add(64) as *const _),
                    )
                };
                let w = [
                    _mm512_and_si512(lo, m4),
                    _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4),
                    _mm512_and_si512(hi, m4),
                    _mm512_and_si512(_mm512_srli_epi16(hi, 4), m4),
                ];
                let off = 32 * s + 16 * h;
                for r in 0..R {
                    // SAFETY: off + 16 <= 256 activation bytes; unaligned 4-byte reads.
                    let a = unsafe { ys[r][b].qs.as_ptr().add(off) as *const i32 };
                    let at = |i: usize| _mm512_set1_epi32(unsafe { a.add(i).read_unaligned() });
                    let mut t = dpbusd!(_mm512_setzero_si512(), w[0], at(0));
                    t = dpbusd!(t, w[1], at(1));
                    t = dpbusd!(t, w[2], at(2));
                    t = dpbusd!(t, w[3], at(3));
                    blk[r] = _mm512_dpwssd_epi32(blk[r], t, sc);
                }
            }
        }
        // SAFETY: 16 f16 each, 32 bytes per mins pair.
        let (dv, mv, mins) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(x.d.as_ptr() as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(x.dmin.as_ptr() as *const __m256i)),
                std::array::from_fn::<_, 4, _>(|j| {
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(x.mins[j].as_ptr() as *const __m256i))
                }),
            )
        };
        for r in 0..R {
            let y = &ys[r][b];
            // `prepare` left the 8 sums of 32 in bsums[0..8]: pairs (2j, 2j + 1) are one i32.
            let sums = y.bsums.as_ptr() as *const i32;
            let mut mi = _mm512_setzero_si512();
            for (j, m) in mins.iter().enumerate() {
                // SAFETY: j < 4: within the first 16 bytes of bsums.
                let pair = _mm512_set1_epi32(unsafe { sums.add(j).read_unaligned() });
                mi = _mm512_dpwssd_epi32(mi, *m, pair);
            }
            let part = _mm512_fmsub_ps(
                _mm512_cvtepi32_ps(blk[r]),
                dv,
                _mm512_mul_ps(_mm512_cvtepi32_ps(mi), mv),
            );
            acc[r] = _mm512_fmadd_ps(part, _mm512_set1_ps(y.d), acc[r]);
        }
    }
    store_rows(&acc, out);
}

/// One Q6_K block of sixteen consecutive output columns, interleaved. Per sixteen-weight run `g` (one
/// scale each): `ql[g]` holds the low four bits of the weights as [`Q4KX16`] holds its nibbles, and
/// `qh[g]`, lane `c`, byte `e`, bits `2i..2i + 2`, the top two bits of column `c`'s weight `4i + e` of
/// the run; `scales[j][2c + e]` is column `c`'s scale of run `2j + e`. The same 3360 bytes as sixteen
/// ggml blocks, padded to 3392 for aligned loads; in reading order, as [`Q4KX16`].
#[repr(C, align(64))]
#[derive(Clone)]
pub struct Q6KX16 {
    scales: [[i8; 2 * GROUP]; 8],
    d: [u16; GROUP],
    runs: [Q6Run; 16],
}

/// One sixteen-weight run of [`Q6KX16`]: low bits, then top bits.
#[repr(C, align(64))]
#[derive(Clone)]
struct Q6Run {
    ql: [u8; 128],
    qh: [u8; 64],
}

const _: () = assert!(std::mem::size_of::<Q6KX16>() == 3392);

/// The 256 weights of a Q6_K block in natural order (0..64, before the `- 32`), as ggml's dequantizer
/// reads them.
fn q6k_values(x: &Q6K) -> [u8; 256] {
    let mut q = [0u8; 256];
    for n in 0..2 {
        for l in 0..32 {
            let (lo, hi, h) = (x.ql[64 * n + l], x.ql[64 * n + l + 32], x.qh[32 * n + l]);
            q[128 * n + l] = (lo & 0xf) | ((h & 3) << 4);
            q[128 * n + l + 32] = (hi & 0xf) | (((h >> 2) & 3) << 4);
            q[128 * n + l + 64] = (lo >> 4) | (((h >> 4) & 3) << 4);
            q[128 * n + l + 96] = (hi >> 4) | (((h >> 6) & 3) << 4);
        }
    }
    q
}

impl GroupRows for Q6KX16 {
    type Block = BlockQ6K;
    type Act = BlockQ8K;

    fn from_blocks(cols: &[&[BlockQ6K]]) -> Self {
        debug_assert!(cols.len() <= GROUP);
        let mut out = Self {
            scales: [[0; 2 * GROUP]; 8],
            d: [0; GROUP],
            runs: std::array::from_fn(|_| Q6Run {
                ql: [0; 128],
                qh: [0; 64],
            }),
        };
        for (c, block) in cols.iter().enumerate() {
            let x: &Q6K = &cast(&block[..1])[0];
            let q = q6k_values(x);
            out.d[c] = x.d;
            for g in 0..16 {
                out.scales[g / 2][2 * c + g % 2] = x.scales[g];
                for i in 0..16 {
                    let (v, e, high) = run_slot(i);
                    let value = q[16 * g + i];
                    let nib = value & 0xf;
                    let run = &mut out.runs[g];
                    run.ql[64 * v + 4 * c + e] |= if high { nib << 4 } else { nib };
                    run.qh[4 * c + e] |= (value >> 4) << (2 * (i / 4));
                }
            }
        }
        out
    }

    fn column(&self, c: usize) -> Vec<BlockQ6K> {
        let mut q = [0u8; 256];
        for g in 0..16 {
            for i in 0..16 {
                let (v, e, high) = run_slot(i);
                let run = &self.runs[g];
                let byte = run.ql[64 * v + 4 * c + e];
                let nib = if high { byte >> 4 } else { byte & 0xf };
                let top = (run.qh[4 * c + e] >> (2 * (i / 4))) & 3;
                q[16 * g + i] = nib | (top << 4);
            }
        }
        let mut x = Q6K {
            ql: [0; 128],
            qh: [0; 64],
            scales: std::array::from_fn(|g| self.scales[g / 2][2 * c + g % 2]),
            d: self.d[c],
        };
        for n in 0..2 {
            for l in 0..32 {
                let v = |o: usize| q[128 * n + l + o];
                x.ql[64 * n + l] = (v(0) & 0xf) | ((v(64) & 0xf) << 4);
                x.ql[64 * n + l + 32] = (v(32) & 0xf) | ((v(96) & 0xf) << 4);
                x.qh[32 * n + l] =
                    (v(0) >> 4) | ((v(32) >> 4) << 2) | ((v(64) >> 4) << 4) | ((v(96) >> 4) << 6);
            }
        }
        vec![block_from(x)]
    }

    fn dot_group(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [[f32; GROUP]]) {
        debug_assert!(vnni());
        dispatch_rows!(q6kx16_rows, Q8K, w, ys, out, [1, 2, 3, 4, 5, 6, 7, 8])
    }
}

/// Q6_K x Q8_K for sixteen interleaved columns and R rows. Per row and sixteen-weight run: four
/// `vpdpbusd` of the unsigned 6-bit weights (a lane's sum of 16 products reaches 129024, past an i16,
/// so the run's scale is an i32 multiply); per row and block, the `- 32` offset from the activations'
/// sums of 16 (eight `vpdpwssd` by the scale pairs) and one float step. Weight unpacking (nibbles and
/// top bits joined by one ternary-logic op per vector) is shared by the rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q6kx16_rows<const R: usize>(xs: &[Q6KX16], ys: [&[Q8K]; R], out: &mut [[f32; GROUP]]) {
    let m4 = _mm512_set1_epi8(0xF);
    let m30 = _mm512_set1_epi8(0x30);
    // `a | (b & c)` for `_mm512_ternarylogic_epi32` (a = 0xF0, b = 0xCC, c = 0xAA).
    const A_OR_B_AND_C: i32 = 0xF8;
    let join = |nib: __m512i, top: __m512i| {
        _mm512_ternarylogic_epi32::<A_OR_B_AND_C>(_mm512_and_si512(nib, m4), top, m30)
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        // Lane c of pairs[j]: column c's scales of runs 2j and 2j + 1 as an i16 pair.
        // SAFETY: 32 bytes each.
        let pairs: [__m512i; 8] = std::array::from_fn(|j| {
            _mm512_cvtepi8_epi16(unsafe {
                _mm256_loadu_si256(x.scales[j].as_ptr() as *const __m256i)
            })
        });
        let mut blk = [_mm512_setzero_si512(); R];
        for (g, Q6Run { ql, qh }) in x.runs.iter().enumerate() {
            prefetch_part::<R, _>(x, g, 16);
            let p = pairs[g / 2];
            let sc = if g % 2 == 0 {
                _mm512_srai_epi32(_mm512_slli_epi32(p, 16), 16)
            } else {
                _mm512_srai_epi32(p, 16)
            };
            // SAFETY: aligned 64-byte vectors within the block.
            let (lo, hi, top) = unsafe {
                (
                    _mm512_load_si512(ql.as_ptr() as *const _),
                    _mm512_load_si512(ql.as_ptr().add(64) as *const _),
                    _mm512_load_si512(qh.as_ptr() as *const _),
                )
            };
            let w = [
                join(lo, _mm512_slli_epi16(top, 4)),
                join(_mm512_srli_epi16(lo, 4), _mm512_slli_epi16(top, 2)),
                join(hi, top),
                join(_mm512_srli_epi16(hi, 4), _mm512_srli_epi16(top, 2)),
            ];
            for r in 0..R {
                // SAFETY: 16 * g + 16 <= 256 activation bytes; unaligned 4-byte reads.
                let a = unsafe { ys[r][b].qs.as_ptr().add(16 * g) as *const i32 };
                let at = |i: usize| _mm512_set1_epi32(unsafe { a.add(i).read_unaligned() });
                let mut t = dpbusd!(_mm512_setzero_si512(), w[0], at(0));
                t = dpbusd!(t, w[1], at(1));
                t = dpbusd!(t, w[2], at(2));
                t = dpbusd!(t, w[3], at(3));
                blk[r] = _mm512_add_epi32(blk[r], _mm512_mullo_epi32(t, sc));
            }
        }
        // SAFETY: 16 f16.
        let dv = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(x.d.as_ptr() as *const __m256i) });
        for r in 0..R {
            let y = &ys[r][b];
            // Sums of 16 activations, pairs (2j, 2j + 1) as one i32.
            let sums = y.bsums.as_ptr() as *const i32;
            let mut off = _mm512_setzero_si512();
            for (j, p) in pairs.iter().enumerate() {
                // SAFETY: j < 8: within the 32 bytes of bsums.
                let pair = _mm512_set1_epi32(unsafe { sums.add(j).read_unaligned() });
                off = _mm512_dpwssd_epi32(off, *p, pair);
            }
            let total = _mm512_sub_epi32(blk[r], _mm512_slli_epi32(off, 5));
            let scale = _mm512_mul_ps(dv, _mm512_set1_ps(y.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), scale, acc[r]);
        }
    }
    store_rows(&acc, out);
}

/// Two Q8_0 blocks (64 weights along k) of sixteen consecutive output columns, interleaved: `qs[h][i]`,
/// lane `c`, holds column `c`'s weights `4i..4i + 4` of block `h`; `d[h]` the sixteen scales. The same
/// 1088 bytes as 32 ggml blocks (two blocks per unit so that a unit is whole cache lines).
#[repr(C, align(64))]
#[derive(Clone)]
pub struct Q8_0X16 {
    d: [[u16; GROUP]; 2],
    qs: [[[i8; 64]; 8]; 2],
}

const _: () = assert!(std::mem::size_of::<Q8_0X16>() == 1088);

impl GroupRows for Q8_0X16 {
    const UNIT: usize = 2;
    type Block = BlockQ8_0;
    type Act = BlockQ8_0;

    fn from_blocks(cols: &[&[BlockQ8_0]]) -> Self {
        debug_assert!(cols.len() <= GROUP);
        let mut out = Self {
            d: [[0; GROUP]; 2],
            qs: [[[0; 64]; 8]; 2],
        };
        for (c, blocks) in cols.iter().enumerate() {
            for (h, x) in cast::<_, Q80>(&blocks[..2]).iter().enumerate() {
                out.d[h][c] = x.d;
                for (v, &q) in x.qs.iter().enumerate() {
                    out.qs[h][v / 4][4 * c + v % 4] = q;
                }
            }
        }
        out
    }

    fn column(&self, c: usize) -> Vec<BlockQ8_0> {
        (0..2)
            .map(|h| {
                let x = Q80 {
                    d: self.d[h][c],
                    qs: std::array::from_fn(|v| self.qs[h][v / 4][4 * c + v % 4]),
                };
                block_from(x)
            })
            .collect()
    }

    /// Activations as unsigned bytes `a + 128` (the sign bit flipped), so that the signed weights can be
    /// `vpdpbusd`'s signed operand; the kernel takes `128 * sum(w)` back off per block.
    fn prepare(acts: &mut [BlockQ8_0]) {
        for y in cast_mut::<_, Q80>(acts) {
            for q in y.qs.iter_mut() {
                *q = (*q as u8 ^ 0x80) as i8;
            }
        }
    }

    fn dot_group(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [[f32; GROUP]]) {
        debug_assert!(vnni());
        dispatch_rows!(q8_0x16_rows, Q80, w, ys, out, [1, 2, 3, 4, 5, 6, 7, 8])
    }
}

/// One 32-weight block of sixteen columns as signed bytes (`w[i]`, lane `c`: column `c`'s weights
/// `4i..4i + 4`; `dv` their scales) against activation block `b` of each row (prepared as `a + 128`),
/// into each row's accumulator: eight `vpdpbusd` per row (a lane's sum of 32 products is at most
/// 32 * 255 * 128, well within an i32), the block's `128 * sum(w)` (eight `vpdpbusd` of 128s, shared
/// by the rows) taken back off, and one float step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline]
fn signed_block_rows<const R: usize>(
    w: &[__m512i; 8],
    dv: __m512,
    ys: &[&[Q80]; R],
    b: usize,
    acc: &mut [__m512; R],
) {
    let bias = _mm512_set1_epi8(-128);
    let mut corr = _mm512_setzero_si512();
    for wi in w {
        corr = dpbusd!(corr, bias, *wi);
    }
    for r in 0..R {
        let y = &ys[r][b];
        let a = y.qs.as_ptr() as *const i32;
        let mut t = _mm512_setzero_si512();
        for (i, wi) in w.iter().enumerate() {
            // SAFETY: i < 8: within the block's 32 values; unaligned 4-byte reads.
            t = dpbusd!(
                t,
                _mm512_set1_epi32(unsafe { a.add(i).read_unaligned() }),
                *wi
            );
        }
        let scale = _mm512_mul_ps(dv, _mm512_set1_ps(f16_to_f32(y.d)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(t, corr)), scale, acc[r]);
    }
}

/// Q8_0 x Q8_0 (prepared) for sixteen interleaved columns and R rows: each block's weights are
/// already signed bytes ([`signed_block_rows`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q8_0x16_rows<const R: usize>(xs: &[Q8_0X16], ys: [&[Q80]; R], out: &mut [[f32; GROUP]]) {
    let mut acc = [_mm512_setzero_ps(); R];
    for (u, x) in xs.iter().enumerate() {
        for h in 0..2 {
            prefetch_part::<R, _>(x, h, 2);
            // SAFETY: aligned 64-byte vectors within the unit; 16 f16.
            let w: [__m512i; 8] = std::array::from_fn(|i| unsafe {
                _mm512_load_si512(x.qs[h][i].as_ptr() as *const _)
            });
            let dv =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(x.d[h].as_ptr() as *const __m256i) });
            signed_block_rows(&w, dv, &ys, 2 * u + h, &mut acc);
        }
    }
    store_rows(&acc, out);
}

/// One Q4_1 block (32 weights along k) of sixteen consecutive output columns, interleaved: `qs[j]`,
/// lane `c`, holds column `c`'s weights `8j..8j + 4` in its low nibbles and `8j + 4..8j + 8` in its
/// high ones; `d` and `m` the sixteen scales and offsets. The same 320 bytes as sixteen ggml blocks.
#[repr(C, align(64))]
#[derive(Clone)]
pub struct Q4_1X16 {
    d: [u16; GROUP],
    m: [u16; GROUP],
    qs: [[u8; 64]; 4],
}

const _: () = assert!(std::mem::size_of::<Q4_1X16>() == 320);

impl GroupRows for Q4_1X16 {
    type Block = BlockQ4_1;
    type Act = BlockQ8_1;

    fn from_blocks(cols: &[&[BlockQ4_1]]) -> Self {
        debug_assert!(cols.len() <= GROUP);
        let mut out = Self {
            d: [0; GROUP],
            m: [0; GROUP],
            qs: [[0; 64]; 4],
        };
        for (c, block) in cols.iter().enumerate() {
            let x: &Q41 = &cast(&block[..1])[0];
            out.d[c] = x.d;
            out.m[c] = x.m;
            for v in 0..32 {
                let q = nibble32(&x.qs, v);
                let (j, e, high) = run_slot(v);
                out.qs[j][4 * c + e] |= if high { q << 4 } else { q };
            }
        }
        out
    }

    fn column(&self, c: usize) -> Vec<BlockQ4_1> {
        let mut x = Q41 {
            d: self.d[c],
            m: self.m[c],
            qs: [0; 16],
        };
        for v in 0..32 {
            let (j, e, high) = run_slot(v);
            let byte = self.qs[j][4 * c + e];
            let q = if high { byte >> 4 } else { byte & 0xf };
            set_nibble32(&mut x.qs, v, q);
        }
        vec![block_from(x)]
    }

    fn dot_group(w: &[Self], ys: &[&[BlockQ8_1]], out: &mut [[f32; GROUP]]) {
        debug_assert!(vnni());
        dispatch_rows!(q4_1x16_rows, Q81, w, ys, out, [1, 2, 3, 4, 5, 6, 7, 8])
    }
}

/// Q4_1 x Q8_1 for sixteen interleaved columns and R rows, ggml's sum per block: `d_w * d_a * sum(q *
/// a) + m_w * s_a` (`s_a` the activation block's `d * sum(a)`). Per row and block: eight `vpdpbusd`
/// (unsigned nibbles times broadcast activations) and two float steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q4_1x16_rows<const R: usize>(xs: &[Q4_1X16], ys: [&[Q81]; R], out: &mut [[f32; GROUP]]) {
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        prefetch_part::<R, _>(x, 0, 1);
        let mut w = [_mm512_setzero_si512(); 8];
        for (j, v) in x.qs.iter().enumerate() {
            // SAFETY: aligned 64-byte vectors within the block.
            let v = unsafe { _mm512_load_si512(v.as_ptr() as *const _) };
            w[2 * j] = _mm512_and_si512(v, m4);
            w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        // SAFETY: 16 f16 each.
        let (dv, mv) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(x.d.as_ptr() as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(x.m.as_ptr() as *const __m256i)),
            )
        };
        for r in 0..R {
            let y = &ys[r][b];
            // Vector i covers weights 4i..4i + 4 of every column (see `Q4_1X16`).
            let a = y.qs.as_ptr() as *const i32;
            let mut t = _mm512_setzero_si512();
            for (i, wi) in w.iter().enumerate() {
                // SAFETY: i < 8: within the block's 32 values; unaligned 4-byte reads.
                t = dpbusd!(
                    t,
                    *wi,
                    _mm512_set1_epi32(unsafe { a.add(i).read_unaligned() })
                );
            }
            let scale = _mm512_mul_ps(dv, _mm512_set1_ps(f16_to_f32(y.d)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(f16_to_f32(y.s)), acc[r]);
        }
    }
    store_rows(&acc, out);
}

/// Two Q5_0 blocks (64 weights along k) of sixteen consecutive output columns, interleaved: per block
/// `h`, `qs[h][j]`, lane `c`, holds column `c`'s low four bits of weights `8j..8j + 4` (low nibbles)
/// and `8j + 4..8j + 8` (high ones); `qh[h]`, lane `c`, byte `e`, bit `i`, the fifth bit of weight
/// `4i + e`; `d[h]` the sixteen scales. The same 704 bytes as 32 ggml blocks.
#[repr(C, align(64))]
#[derive(Clone)]
pub struct Q5_0X16 {
    d: [[u16; GROUP]; 2],
    qh: [[u8; 64]; 2],
    qs: [[[u8; 64]; 4]; 2],
}

const _: () = assert!(std::mem::size_of::<Q5_0X16>() == 704);

/// The 32 weights of a Q5_0 block as unsigned 5-bit values (before the `- 16`).
fn q5_0_values(x: &Q50) -> [u8; 32] {
    let qh = u32::from_le_bytes(x.qh);
    std::array::from_fn(|v| nibble32(&x.qs, v) | ((((qh >> v) & 1) as u8) << 4))
}

impl GroupRows for Q5_0X16 {
    const UNIT: usize = 2;
    type Block = BlockQ5_0;
    type Act = BlockQ8_0;

    fn from_blocks(cols: &[&[BlockQ5_0]]) -> Self {
        debug_assert!(cols.len() <= GROUP);
        let mut out = Self {
            d: [[0; GROUP]; 2],
            qh: [[0; 64]; 2],
            qs: [[[0; 64]; 4]; 2],
        };
        for (c, blocks) in cols.iter().enumerate() {
            for (h, x) in cast::<_, Q50>(&blocks[..2]).iter().enumerate() {
                out.d[h][c] = x.d;
                for (v, q) in q5_0_values(x).into_iter().enumerate() {
                    let (j, e, high) = run_slot(v);
                    out.qs[h][j][4 * c + e] |= if high { (q & 0xf) << 4 } else { q & 0xf };
                    out.qh[h][4 * c + v % 4] |= (q >> 4) << (v / 4);
                }
            }
        }
        out
    }

    fn column(&self, c: usize) -> Vec<BlockQ5_0> {
        (0..2)
            .map(|h| {
                let mut x = Q50 {
                    d: self.d[h][c],
                    qh: [0; 4],
                    qs: [0; 16],
                };
                let mut qh = 0u32;
                for v in 0..32 {
                    let (j, e, high) = run_slot(v);
                    let byte = self.qs[h][j][4 * c + e];
                    let nib = if high { byte >> 4 } else { byte & 0xf };
                    set_nibble32(&mut x.qs, v, nib);
                    qh |= (((self.qh[h][4 * c + v % 4] >> (v / 4)) & 1) as u32) << v;
                }
                x.qh = qh.to_le_bytes();
                block_from(x)
            })
            .collect()
    }

    /// As for Q8_0: activations as `a + 128`.
    fn prepare(acts: &mut [BlockQ8_0]) {
        Q8_0X16::prepare(acts)
    }

    fn dot_group(w: &[Self], ys: &[&[BlockQ8_0]], out: &mut [[f32; GROUP]]) {
        debug_assert!(vnni());
        dispatch_rows!(q5_0x16_rows, Q80, w, ys, out, [1, 2, 3, 4, 5, 6, 7, 8])
    }
}

/// Q5_0 x Q8_0 (prepared) for sixteen interleaved columns and R rows: the weights are rebuilt as signed
/// bytes `q - 16` (nibble and fifth bit joined by one ternary-logic op, then a byte subtract; shared by
/// the rows), then multiplied as Q8_0's ([`signed_block_rows`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[inline(never)]
unsafe fn q5_0x16_rows<const R: usize>(xs: &[Q5_0X16], ys: [&[Q80]; R], out: &mut [[f32; GROUP]]) {
    let m4 = _mm512_set1_epi8(0xF);
    let m10 = _mm512_set1_epi8(0x10);
    let sixteen = _mm512_set1_epi8(16);
    const A_OR_B_AND_C: i32 = 0xF8;
    let mut acc = [_mm512_setzero_ps(); R];
    for (u, x) in xs.iter().enumerate() {
        for h in 0..2 {
            prefetch_part::<R, _>(x, h, 2);
            // SAFETY: aligned 64-byte vectors within the unit; 16 f16.
            let (top, dv) = unsafe {
                (
                    _mm512_load_si512(x.qh[h].as_ptr() as *const _),
                    _mm512_cvtph_ps(_mm256_loadu_si256(x.d[h].as_ptr() as *const __m256i)),
                )
            };
            let mut nib = [_mm512_setzero_si512(); 8];
            for (j, v) in x.qs[h].iter().enumerate() {
                // SAFETY: as above.
                let v = unsafe { _mm512_load_si512(v.as_ptr() as *const _) };
                nib[2 * j] = _mm512_and_si512(v, m4);
                nib[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            // Bit i of each byte of `top` moved to bit 4 (bits crossing a byte are masked off).
            let fifth = [
                _mm512_slli_epi16(top, 4),
                _mm512_slli_epi16(top, 3),
                _mm512_slli_epi16(top, 2),
                _mm512_slli_epi16(top, 1),
                top,
                _mm512_srli_epi16(top, 1),
                _mm512_srli_epi16(top, 2),
                _mm512_srli_epi16(top, 3),
            ];
            let w: [__m512i; 8] = std::array::from_fn(|i| {
                _mm512_sub_epi8(
                    _mm512_ternarylogic_epi32::<A_OR_B_AND_C>(nib[i], fifth[i], m10),
                    sixteen,
                )
            });
            signed_block_rows(&w, dv, &ys, 2 * u + h, &mut acc);
        }
    }
    store_rows(&acc, out);
}
