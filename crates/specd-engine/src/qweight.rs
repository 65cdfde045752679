//! Weight matrices and the batch-invariant matrix-vector kernels that read them.
//!
//! A [`QWeight`] is an `n x k` matrix (n output features, k input features) stored the way the model file
//! stores it: ggml quantized blocks along k, or plain f32. [`QWeight::matmul`] multiplies `m` activation
//! rows by its transpose. It owns the property the whole engine rests on:
//!
//! **Batch invariance.** Every output element `(row, col)` is computed by exactly one dot product (a
//! multi-row kernel of `kernels/`, or candle's per-block `GgmlType::vec_dot` where none applies) on the
//! row quantized by itself and the column's blocks, in an order that depends on nothing but the column
//! index. So a row's result is bitwise the same whether it
//! is multiplied alone, inside a verify of k+1 rows, or inside a batch of sequences, and whatever the
//! thread count. candle's own `QMatMul` switches kernels with the row count (repacked tiles for m > 1,
//! AMX for long prefills), which changes the rounding, so the engine does not use it.
//!
//! **One weight read per step.** The loop runs column-major: a column's blocks (under 1 KiB) are loaded once
//! and applied to every row while they sit in L1, so a verify of k+1 rows costs far less than k+1 decode
//! steps on a memory-bound CPU.
//!
//! Q5_0 tensors (most of Qwen2.5-0.5B, whose hidden size 896 is not a multiple of 256) keep their 5.5
//! bits and get a multi-row kernel (`kernels/`). On CPUs without AVX2 they are converted to Q8_0 at
//! load instead: every Q5_0 value is `d * (q - 16)` with `q` in 0..32 and Q8_0 stores `d * q` with `q` an
//! i8 over the same 32-element block, so the conversion is exact, and candle's Q8_0 `vec_dot` is faster
//! than its scalar Q5_0 one.
//!
//! It does not know about layers or models; `model.rs` composes these.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, GgmlType};
use half::f16;
use rayon::prelude::*;

use crate::error::EngineError;
use crate::kernels::{self, GroupRows, MultiRow, GROUP, Q4KX16, Q4_1X16, Q5_0X16, Q6KX16, Q8_0X16};

/// Columns per parallel task: a multiple of 4 so column quads never straddle tasks.
const COLS_PER_TASK: usize = 64;
/// Activation rows per pass over a task's columns (a multiple of the kernels' 4-row groups): long prefills
/// keep a tile of quantized rows in cache instead of streaming every row once per column.
const ROW_TILE: usize = 32;

/// Quantized (or float) storage of one weight matrix, blocks laid out row-major over the n output rows.
#[derive(Clone)]
pub enum QData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    /// Q4_K in column groups of sixteen ([`Q4KX16`]; group `g`'s k / 256 blocks contiguous), chosen at
    /// load on CPUs with AVX-512 VNNI.
    Q4KX16(Vec<Q4KX16>),
    /// Q6_K in column groups of sixteen ([`Q6KX16`]), chosen at load on CPUs with AVX-512 VNNI.
    Q6KX16(Vec<Q6KX16>),
    /// Q8_0 in column groups of sixteen, two blocks per unit ([`Q8_0X16`]; AVX-512 VNNI CPUs, rows of
    /// an even block count).
    Q8_0X16(Vec<Q8_0X16>),
    /// Q4_1 in column groups of sixteen ([`Q4_1X16`]; AVX-512 VNNI CPUs).
    Q4_1X16(Vec<Q4_1X16>),
    /// Q5_0 in column groups of sixteen, two blocks per unit ([`Q5_0X16`]; AVX-512 VNNI CPUs, rows of
    /// an even block count).
    Q5_0X16(Vec<Q5_0X16>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// An `n x k` weight matrix.
#[derive(Clone)]
pub struct QWeight {
    n: usize,
    k: usize,
    data: QData,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({}x{} {})", self.n, self.k, self.dtype_name())
    }
}

/// Reinterprets raw little-endian ggml bytes as a vector of blocks, checking the length.
fn blocks_from_bytes<T: GgmlType>(bytes: &[u8], count: usize) -> Result<Vec<T>, EngineError> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != count * size {
        return Err(EngineError::BadModel(format!(
            "tensor data is {} bytes, expected {} blocks of {size}",
            bytes.len(),
            count
        )));
    }
    let mut out: Vec<T> = (0..count).map(|_| T::zeros()).collect();
    // SAFETY: ggml block types are `repr(C)` plain-old-data whose layout is the ggml file layout, every
    // bit pattern is a valid value, and the destination holds exactly `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, bytes.len());
    }
    Ok(out)
}

/// Exact conversion of Q5_0 blocks (22 bytes: f16 d, 4 bytes of high bits, 16 bytes of nibbles) to Q8_0
/// blocks (34 bytes: f16 d, 32 i8).
fn q5_0_bytes_to_q8_0(bytes: &[u8], count: usize) -> Result<Vec<BlockQ8_0>, EngineError> {
    const IN: usize = 22;
    const OUT: usize = 34;
    if bytes.len() != count * IN {
        return Err(EngineError::BadModel(format!(
            "Q5_0 tensor data is {} bytes, expected {}",
            bytes.len(),
            count * IN
        )));
    }
    let mut converted = vec![0u8; count * OUT];
    for (src, dst) in bytes.chunks_exact(IN).zip(converted.chunks_exact_mut(OUT)) {
        dst[0..2].copy_from_slice(&src[0..2]);
        let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
        let qs = &src[6..22];
        for j in 0..16 {
            let lo = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            dst[2 + j] = (lo as i8 - 16) as u8;
            dst[2 + j + 16] = (hi as i8 - 16) as u8;
        }
    }
    blocks_from_bytes::<BlockQ8_0>(&converted, count)
}

impl QWeight {
    /// A float matrix, `data` row-major `n x k`.
    pub fn from_f32(n: usize, k: usize, data: Vec<f32>) -> Result<Self, EngineError> {
        if data.len() != n * k {
            return Err(EngineError::BadModel(format!(
                "f32 weight has {} values, expected {n}x{k}",
                data.len()
            )));
        }
        Ok(Self {
            n,
            k,
            data: QData::F32(data),
        })
    }

    /// Builds from the raw bytes of a ggml tensor of shape `n x k` (k contiguous).
    pub fn from_ggml_bytes(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: &[u8],
    ) -> Result<Self, EngineError> {
        let bs = dtype.block_size();
        if !k.is_multiple_of(bs) {
            return Err(EngineError::BadModel(format!(
                "row length {k} is not a multiple of the {dtype:?} block size {bs}"
            )));
        }
        let count = n * k / bs;
        let data = match dtype {
            GgmlDType::F32 => {
                if bytes.len() != n * k * 4 {
                    return Err(EngineError::BadModel(
                        "f32 tensor has the wrong size".into(),
                    ));
                }
                QData::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            GgmlDType::F16 => QData::F16(blocks_from_bytes::<f16>(bytes, count)?),
            GgmlDType::Q4_0 => QData::Q4_0(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q4_1 if kernels::vnni() => {
                QData::Q4_1X16(interleave(&blocks_from_bytes(bytes, count)?, n, k))
            }
            GgmlDType::Q4_1 => QData::Q4_1(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q5_0 if kernels::vnni() && (k / 32).is_multiple_of(2) => {
                QData::Q5_0X16(interleave(&blocks_from_bytes(bytes, count)?, n, k))
            }
            GgmlDType::Q5_0 if kernels::available() => {
                QData::Q5_0(blocks_from_bytes(bytes, count)?)
            }
            GgmlDType::Q5_0 => QData::Q8_0(q5_0_bytes_to_q8_0(bytes, count)?),
            GgmlDType::Q5_1 => QData::Q5_1(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q8_0 if kernels::vnni() && (k / 32).is_multiple_of(2) => {
                QData::Q8_0X16(interleave(&blocks_from_bytes(bytes, count)?, n, k))
            }
            GgmlDType::Q8_0 => QData::Q8_0(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q2K => QData::Q2K(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q3K => QData::Q3K(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q4K if kernels::vnni() => QData::Q4KX16(interleave(
                &blocks_from_bytes::<BlockQ4K>(bytes, count)?,
                n,
                k,
            )),
            GgmlDType::Q4K => QData::Q4K(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q5K => QData::Q5K(blocks_from_bytes(bytes, count)?),
            GgmlDType::Q6K if kernels::vnni() => QData::Q6KX16(interleave(
                &blocks_from_bytes::<BlockQ6K>(bytes, count)?,
                n,
                k,
            )),
            GgmlDType::Q6K => QData::Q6K(blocks_from_bytes(bytes, count)?),
            other => {
                return Err(EngineError::BadModel(format!(
                    "unsupported weight type {other:?}"
                )))
            }
        };
        Ok(Self { n, k, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        fn b<T>(v: &[T]) -> usize {
            std::mem::size_of_val(v)
        }
        match &self.data {
            QData::F32(v) => b(v),
            QData::F16(v) => b(v),
            QData::Q4_0(v) => b(v),
            QData::Q4_1(v) => b(v),
            QData::Q5_0(v) => b(v),
            QData::Q5_1(v) => b(v),
            QData::Q8_0(v) => b(v),
            QData::Q2K(v) => b(v),
            QData::Q3K(v) => b(v),
            QData::Q4K(v) => b(v),
            QData::Q4KX16(v) => b(v),
            QData::Q6KX16(v) => b(v),
            QData::Q8_0X16(v) => b(v),
            QData::Q4_1X16(v) => b(v),
            QData::Q5_0X16(v) => b(v),
            QData::Q5K(v) => b(v),
            QData::Q6K(v) => b(v),
        }
    }

    /// The storage format's name, for logs.
    pub fn dtype_name(&self) -> &'static str {
        match &self.data {
            QData::F32(_) => "f32",
            QData::F16(_) => "f16",
            QData::Q4_0(_) => "q4_0",
            QData::Q4_1(_) | QData::Q4_1X16(_) => "q4_1",
            QData::Q5_0(_) | QData::Q5_0X16(_) => "q5_0",
            QData::Q5_1(_) => "q5_1",
            QData::Q8_0(_) | QData::Q8_0X16(_) => "q8_0",
            QData::Q2K(_) => "q2_k",
            QData::Q3K(_) => "q3_k",
            QData::Q4K(_) | QData::Q4KX16(_) => "q4_k",
            QData::Q5K(_) => "q5_k",
            QData::Q6K(_) | QData::Q6KX16(_) => "q6_k",
        }
    }

    /// Dequantizes output row `row` (length k) into `out`: the embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), EngineError> {
        if row >= self.n || out.len() != self.k {
            return Err(EngineError::Internal(format!(
                "row {row} out of range for {:?}",
                self
            )));
        }
        fn deq<T: GgmlType>(blocks: &[T], row: usize, k: usize, out: &mut [f32]) {
            let per_row = k / T::BLCK_SIZE;
            T::to_float(&blocks[row * per_row..(row + 1) * per_row], out);
        }
        match &self.data {
            QData::F32(v) => out.copy_from_slice(&v[row * self.k..(row + 1) * self.k]),
            QData::F16(v) => deq(v, row, self.k, out),
            QData::Q4_0(v) => deq(v, row, self.k, out),
            QData::Q4_1(v) => deq(v, row, self.k, out),
            QData::Q5_0(v) => deq(v, row, self.k, out),
            QData::Q5_1(v) => deq(v, row, self.k, out),
            QData::Q8_0(v) => deq(v, row, self.k, out),
            QData::Q2K(v) => deq(v, row, self.k, out),
            QData::Q3K(v) => deq(v, row, self.k, out),
            QData::Q4K(v) => deq(v, row, self.k, out),
            QData::Q4KX16(v) => deq(&group_column(v, self.k, row), 0, self.k, out),
            QData::Q6KX16(v) => deq(&group_column(v, self.k, row), 0, self.k, out),
            QData::Q8_0X16(v) => deq(&group_column(v, self.k, row), 0, self.k, out),
            QData::Q4_1X16(v) => deq(&group_column(v, self.k, row), 0, self.k, out),
            QData::Q5_0X16(v) => deq(&group_column(v, self.k, row), 0, self.k, out),
            QData::Q5K(v) => deq(v, row, self.k, out),
            QData::Q6K(v) => deq(v, row, self.k, out),
        }
        Ok(())
    }

    /// `x` is `m x k` row-major; returns `m x n` row-major: `y[r][c] = dot(x[r], w[c])`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.k);
        match &self.data {
            QData::F32(w) => matmul_f32(w, self.n, self.k, x, m),
            QData::F16(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q4_0(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q4_1(w) if kernels::available() => matmul_multi(w, self.n, self.k, x, m),
            QData::Q4_1(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q5_0(w) if kernels::available() => matmul_multi(w, self.n, self.k, x, m),
            QData::Q5_0(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q5_1(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q8_0(w) if kernels::available() => matmul_multi(w, self.n, self.k, x, m),
            QData::Q8_0(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q2K(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q3K(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q4K(w) if kernels::available() => matmul_multi(w, self.n, self.k, x, m),
            QData::Q4K(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q4KX16(w) => matmul_groups(w, self.n, self.k, x, m),
            QData::Q6KX16(w) => matmul_groups(w, self.n, self.k, x, m),
            QData::Q8_0X16(w) => matmul_groups(w, self.n, self.k, x, m),
            QData::Q4_1X16(w) => matmul_groups(w, self.n, self.k, x, m),
            QData::Q5_0X16(w) => matmul_groups(w, self.n, self.k, x, m),
            QData::Q5K(w) => matmul_blocks(w, self.n, self.k, x, m),
            QData::Q6K(w) if kernels::available() => matmul_multi(w, self.n, self.k, x, m),
            QData::Q6K(w) => matmul_blocks(w, self.n, self.k, x, m),
        }
    }

    /// A copy holding only the output rows in `keep` (in that order): a trimmed vocabulary head.
    pub fn select_rows(&self, keep: &[u32]) -> Result<Self, EngineError> {
        fn sel<T: Clone>(v: &[T], per_row: usize, keep: &[u32]) -> Vec<T> {
            keep.iter()
                .flat_map(|&r| {
                    v[r as usize * per_row..(r as usize + 1) * per_row]
                        .iter()
                        .cloned()
                })
                .collect()
        }
        if let Some(&bad) = keep.iter().find(|&&r| r as usize >= self.n) {
            return Err(EngineError::Internal(format!("row {bad} out of range")));
        }
        let k = self.k;
        let data = match &self.data {
            QData::F32(v) => QData::F32(sel(v, k, keep)),
            QData::F16(v) => QData::F16(sel(v, k, keep)),
            QData::Q4_0(v) => QData::Q4_0(sel(v, k / 32, keep)),
            QData::Q4_1(v) => QData::Q4_1(sel(v, k / 32, keep)),
            QData::Q5_0(v) => QData::Q5_0(sel(v, k / 32, keep)),
            QData::Q5_1(v) => QData::Q5_1(sel(v, k / 32, keep)),
            QData::Q8_0(v) => QData::Q8_0(sel(v, k / 32, keep)),
            QData::Q2K(v) => QData::Q2K(sel(v, k / 256, keep)),
            QData::Q3K(v) => QData::Q3K(sel(v, k / 256, keep)),
            QData::Q4K(v) => QData::Q4K(sel(v, k / 256, keep)),
            QData::Q4KX16(v) => QData::Q4KX16(select_columns(v, k, keep)),
            QData::Q6KX16(v) => QData::Q6KX16(select_columns(v, k, keep)),
            QData::Q8_0X16(v) => QData::Q8_0X16(select_columns(v, k, keep)),
            QData::Q4_1X16(v) => QData::Q4_1X16(select_columns(v, k, keep)),
            QData::Q5_0X16(v) => QData::Q5_0X16(select_columns(v, k, keep)),
            QData::Q5K(v) => QData::Q5K(sel(v, k / 256, keep)),
            QData::Q6K(v) => QData::Q6K(sel(v, k / 256, keep)),
        };
        Ok(Self {
            n: keep.len(),
            k,
            data,
        })
    }
}

/// Quantizes each activation row by itself to block type `A` (row-independent by construction: the
/// scale of a block depends on that block of that row alone).
fn quantize_rows<A: GgmlType>(x: &[f32], m: usize, k: usize) -> Vec<A> {
    let kb = k / A::BLCK_SIZE;
    let mut xq: Vec<A> = (0..m * kb).map(|_| A::zeros()).collect();
    for r in 0..m {
        A::from_float(&x[r * k..(r + 1) * k], &mut xq[r * kb..(r + 1) * kb]);
    }
    xq
}

/// Quantized kernel: activation rows are quantized to the weight type's dot-product type one row at a
/// time, then every `(row, col)` is one `vec_dot` (quads of columns use `vec_dot_4`, chosen by column index
/// alone).
fn matmul_blocks<T: GgmlType>(w: &[T], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let kb = k / T::BLCK_SIZE;
    let xq = quantize_rows::<T::VecDotType>(x, m, k);
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let c0 = task * COLS_PER_TASK;
            let cols = chunk.len() / m;
            let col = |c: usize| &w[c * kb..(c + 1) * kb];
            for t0 in (0..m).step_by(ROW_TILE) {
                let rows = t0..m.min(t0 + ROW_TILE);
                let mut c = 0;
                while c + 4 <= cols {
                    let (w0, w1, w2, w3) = (
                        col(c0 + c),
                        col(c0 + c + 1),
                        col(c0 + c + 2),
                        col(c0 + c + 3),
                    );
                    for r in rows.clone() {
                        let (d0, d1, d2, d3) =
                            T::vec_dot_4(k, w0, w1, w2, w3, &xq[r * kb..(r + 1) * kb]);
                        chunk[c * m + r] = d0;
                        chunk[(c + 1) * m + r] = d1;
                        chunk[(c + 2) * m + r] = d2;
                        chunk[(c + 3) * m + r] = d3;
                    }
                    c += 4;
                }
                while c < cols {
                    let wc = col(c0 + c);
                    for r in rows.clone() {
                        chunk[c * m + r] = T::vec_dot(k, wc, &xq[r * kb..(r + 1) * kb]);
                    }
                    c += 1;
                }
            }
        });
    transpose(out_t, n, m)
}

/// Multi-row kernel path: the column's blocks are decoded once for up to four rows at a time
/// (`kernels/`); per-row arithmetic is the same as `matmul_blocks`' `vec_dot`, bit for bit.
fn matmul_multi<T: MultiRow>(w: &[T], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let kb = k / T::BLOCK;
    let mut xq = quantize_rows::<T::Act>(x, m, k);
    if kb > 0 {
        xq.chunks_exact_mut(kb).for_each(T::prepare);
    }
    let rows: Vec<&[T::Act]> = xq.chunks_exact(kb).collect();
    // Fills `cols` columns from `c0` for every row, column-major (`m` values per column).
    let task = |c0: usize, dst: &mut [f32]| {
        for t0 in (0..m).step_by(ROW_TILE) {
            let t1 = m.min(t0 + ROW_TILE);
            for (c, col) in dst.chunks_exact_mut(m).enumerate() {
                T::dot_rows(
                    &w[(c0 + c) * kb..(c0 + c + 1) * kb],
                    &rows[t0..t1],
                    &mut col[t0..t1],
                );
            }
        }
    };
    let mut out = vec![0f32; n * m];
    if m == 1 {
        // One row: column-major is row-major, so the tasks fill the output in place (the decode path).
        out.par_chunks_mut(COLS_PER_TASK)
            .enumerate()
            .for_each(|(i, dst)| task(i * COLS_PER_TASK, dst));
        return out;
    }
    let dst = Disjoint(out.as_mut_ptr());
    (0..n.div_ceil(COLS_PER_TASK))
        .into_par_iter()
        .for_each(|i| {
            let c0 = i * COLS_PER_TASK;
            let cols = COLS_PER_TASK.min(n - c0);
            // Column-major for the kernels, then written row-major straight into the output (no separate
            // transpose of the whole n x m result).
            let mut local = vec![0f32; cols * m];
            task(c0, &mut local);
            for r in 0..m {
                for (c, col) in local.chunks_exact(m).enumerate() {
                    // SAFETY: `out` holds n * m values and outlives the parallel loop; task `i` is the only
                    // writer of columns c0..c0 + cols, so no two writes alias.
                    unsafe { *dst.at(r * n + c0 + c) = col[r] };
                }
            }
        });
    out
}

/// `blocks` (an `n x k` matrix of ggml blocks, a row's block count a multiple of `T::UNIT`) in column
/// groups of sixteen, the last padded with zeros.
fn interleave<T: GroupRows>(blocks: &[T::Block], n: usize, k: usize) -> Vec<T> {
    let kb = k / <T::Block as GgmlType>::BLCK_SIZE;
    let units = kb / T::UNIT;
    (0..n.div_ceil(GROUP))
        .flat_map(|g| {
            let cols = g * GROUP..n.min((g + 1) * GROUP);
            (0..units).map(move |u| {
                let group: Vec<&[T::Block]> = cols
                    .clone()
                    .map(|c| &blocks[c * kb + u * T::UNIT..c * kb + (u + 1) * T::UNIT])
                    .collect();
                T::from_blocks(&group)
            })
        })
        .collect()
}

/// Column `col`'s ggml blocks (a row of `k` weights) back in ggml's layout.
fn group_column<T: GroupRows>(v: &[T], k: usize, col: usize) -> Vec<T::Block> {
    let units = k / <T::Block as GgmlType>::BLCK_SIZE / T::UNIT;
    let (g, c) = (col / GROUP, col % GROUP);
    v[g * units..(g + 1) * units]
        .iter()
        .flat_map(|x| x.column(c))
        .collect()
}

/// The columns in `keep` (in that order), regrouped.
fn select_columns<T: GroupRows>(v: &[T], k: usize, keep: &[u32]) -> Vec<T> {
    let cols: Vec<T::Block> = keep
        .iter()
        .flat_map(|&r| group_column(v, k, r as usize))
        .collect();
    interleave(&cols, keep.len(), k)
}

/// Column-group kernel path: each task takes a few groups of sixteen columns and runs every row
/// through them in tiles, up to eight rows per weight decode; each row's sixteen outputs land in the
/// output directly. Per row, the arithmetic is the same whatever m is.
fn matmul_groups<T: GroupRows>(w: &[T], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    /// Groups per parallel task (64 columns, as `COLS_PER_TASK`).
    const GROUPS_PER_TASK: usize = COLS_PER_TASK / GROUP;
    // Activation blocks per row, and the weights' units per group along k.
    let kb = k / <T::Act as GgmlType>::BLCK_SIZE;
    let units = kb / T::UNIT;
    let mut out = vec![0f32; n * m];
    if kb == 0 || m == 0 {
        return out;
    }
    let mut xq = quantize_rows::<T::Act>(x, m, k);
    xq.chunks_exact_mut(kb).for_each(T::prepare);
    let rows: Vec<&[T::Act]> = xq.chunks_exact(kb).collect();
    let groups = n.div_ceil(GROUP);
    let dst = Disjoint(out.as_mut_ptr());
    (0..groups.div_ceil(GROUPS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let mut tile = [[0f32; GROUP]; ROW_TILE];
            for t0 in (0..m).step_by(ROW_TILE) {
                let t1 = m.min(t0 + ROW_TILE);
                for g in task * GROUPS_PER_TASK..groups.min((task + 1) * GROUPS_PER_TASK) {
                    let tile = &mut tile[..t1 - t0];
                    T::dot_group(&w[g * units..(g + 1) * units], &rows[t0..t1], tile);
                    let (c0, cols) = (g * GROUP, GROUP.min(n - g * GROUP));
                    for (r, vals) in (t0..t1).zip(tile.iter()) {
                        // SAFETY: `out` holds n * m values and outlives the parallel loop; group g
                        // belongs to this task alone, so no two writes alias.
                        unsafe {
                            std::ptr::copy_nonoverlapping(vals.as_ptr(), dst.at(r * n + c0), cols)
                        };
                    }
                }
            }
        });
    out
}

/// The output buffer of a parallel matmul whose tasks write disjoint elements.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);

// SAFETY: shared only for writes to disjoint indices (see `matmul_multi`).
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// Pointer to element `i` (callers guarantee it is in bounds and theirs alone).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Float kernel: a fixed 8-lane accumulation order per dot product, independent of m.
fn matmul_f32(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let c0 = task * COLS_PER_TASK;
            for c in 0..chunk.len() / m {
                let wc = &w[(c0 + c) * k..(c0 + c + 1) * k];
                for r in 0..m {
                    chunk[c * m + r] = dot_f32(wc, &x[r * k..(r + 1) * k]);
                }
            }
        });
    transpose(out_t, n, m)
}

/// Deterministic f32 dot product: 8 independent lanes (vectorizes), summed in a fixed tree.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn transpose(src: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return src;
    }
    let mut out = vec![0f32; n * m];
    for c in 0..n {
        for r in 0..m {
            out[r * n + c] = src[c * m + r];
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random values in [-0.5, 0.5) for kernel tests.
    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn quantized(dtype: GgmlDType, n: usize, k: usize) -> (QWeight, Vec<f32>) {
        let w = random(n * k, 7);
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let bytes = q.data().expect("data");
        let qw = QWeight::from_ggml_bytes(dtype, n, k, &bytes).expect("load");
        let deq = q
            .dequantize(&Device::Cpu)
            .expect("deq")
            .flatten_all()
            .expect("flat");
        (qw, deq.to_vec1::<f32>().expect("vec"))
    }

    #[test]
    fn rows_are_bitwise_independent_of_batch() {
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::F32,
        ] {
            // 70 columns (a padded group), and rows past one tile of the eight-row kernels.
            let (n, k, m) = (70, 512, 24);
            let (w, _) = quantized(dtype, n, k);
            let x = random(m * k, 3);
            let all = w.matmul(&x, m);
            for r in 0..m {
                let one = w.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(one, all[r * n..(r + 1) * n].to_vec(), "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        // Every format with a kernel, 33 columns (two groups and a padded one), row lengths that are
        // not a power of two (SmolLM2's 576 and a third of it, Qwen's 1536).
        for (dtype, k) in [
            (GgmlDType::Q8_0, 576),
            (GgmlDType::Q8_0, 192),
            (GgmlDType::Q4_1, 576),
            (GgmlDType::Q4_1, 192),
            (GgmlDType::Q5_0, 576),
            (GgmlDType::Q4K, 1536),
            (GgmlDType::Q6K, 1536),
        ] {
            let n = 33;
            let (w, deq) = quantized(dtype, n, k);
            let x = random(3 * k, 11);
            let y = w.matmul(&x, 3);
            for r in 0..3 {
                for c in 0..n {
                    let want: f32 = (0..k).map(|i| x[r * k + i] * deq[c * k + i]).sum();
                    assert!(
                        (y[r * n + c] - want).abs() < 0.05 * (k as f32 / 256.0).sqrt(),
                        "{dtype:?} k={k} row {r} column {c}: {} vs {want}",
                        y[r * n + c]
                    );
                }
            }
        }
    }

    #[test]
    fn q5_0_converts_exactly_to_q8_0() {
        let (n, k) = (8, 64);
        let w = random(n * k, 5);
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, GgmlDType::Q5_0).expect("quantize");
        let want = q
            .dequantize(&Device::Cpu)
            .expect("deq")
            .flatten_all()
            .expect("f");
        let want = want.to_vec1::<f32>().expect("vec");
        let bytes = q.data().expect("data");
        let converted = QWeight {
            n,
            k,
            data: QData::Q8_0(q5_0_bytes_to_q8_0(&bytes, n * k / 32).expect("convert")),
        };
        // As loaded: kept as Q5_0 where the multi-row kernels run, converted elsewhere.
        let loaded = QWeight::from_ggml_bytes(GgmlDType::Q5_0, n, k, &bytes).expect("load");
        let kept = if kernels::available() { "q5_0" } else { "q8_0" };
        assert_eq!(loaded.dtype_name(), kept);
        let mut row = vec![0f32; k];
        for qw in [&converted, &loaded] {
            for r in 0..n {
                qw.dequantize_row(r, &mut row).expect("row");
                assert_eq!(row, want[r * k..(r + 1) * k].to_vec());
            }
        }
    }

    #[test]
    fn select_rows_keeps_rows() {
        let (w, _) = quantized(GgmlDType::Q4K, 12, 256);
        let sel = w.select_rows(&[3, 7]).expect("select");
        let x = random(256, 1);
        let full = w.matmul(&x, 1);
        assert_eq!(sel.matmul(&x, 1), vec![full[3], full[7]]);
        assert!(w.select_rows(&[12]).is_err());
    }
}
