//! The AVX2 + FMA kernels: one weight column against up to four activation rows, decoding each weight
//! block once for all of them. The K-quant and Q4_1 ones follow candle's single-row kernels instruction
//! for instruction per row (bitwise candle's `vec_dot`); Q8_0 and Q5_0 keep two accumulators per row.
//! They run on every x86-64 CPU with AVX2 and FMA, and where AVX-512 VNNI is missing or turned off.

use super::*;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum_float_8(x: __m256) -> f32 {
    let res = _mm256_extractf128_ps(x, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

#[cfg(target_arch = "x86_64")]
pub(super) const K4_SHUFFLE: [u8; 256] = {
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
pub(super) const K6_SHUFFLE: [u8; 128] = {
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
pub(super) unsafe fn q4k_rows<const R: usize>(xs: &[Q4K], ys: [&[Q8K]; R], out: &mut [f32]) {
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
pub(super) fn q6k_unpack(x: &Q6K, j: usize) -> [__m256i; 4] {
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
pub(super) unsafe fn q6k_rows<const R: usize>(xs: &[Q6K], ys: [&[Q8K]; R], out: &mut [f32]) {
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

/// Q8_0 x Q8_0 for R rows (candle's `vec_dot_q8_0_q8_0`, per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn q8_0_rows<const R: usize>(xs: &[Q80], ys: [&[Q80]; R], out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    // `acc[r][b & 1]` keeps the accumulators on the stack. Taking blocks in pairs so that they stay in
    // registers (same operations, same bits) was measured slower, here and in `q5_0_rows`: Qwen 0.5B
    // one-row forward on the AVX2 path 64 -> 71-74 ms, 5 rows 104 -> 131 ms (AVX-512 machine with
    // SPECD_NO_AVX512=1). Measure before changing it.
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
pub(super) unsafe fn q5_0_rows<const R: usize>(xs: &[Q50], ys: [&[Q80]; R], out: &mut [f32]) {
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
pub(super) unsafe fn q4_1_rows<const R: usize>(xs: &[Q41], ys: [&[Q81]; R], out: &mut [f32]) {
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
pub(super) fn hsum_i32_8(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}
