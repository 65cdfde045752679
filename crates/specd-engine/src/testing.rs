//! Tiny random-weight model files for hermetic tests (here, in the services and in `tests/`).
//!
//! [`write_tiny_model`] writes a complete GGUF file: a Qwen2- or Llama-shaped decoder with random weights
//! quantized to the same formats real files use (Q4_K, Q6_K, Q8_0, Q5_0), plus the tiny
//! byte-level BPE tokenizer from `specd_tokenizer::testing`. Everything a real model exercises (loading,
//! tokenizer, quantized kernels, biases, both RoPE layouts, GQA) is exercised in milliseconds.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use specd_tokenizer::testing::{
    tiny_tokenizer_kv, tiny_tokens, write_gguf, GgufTensorSpec, TINY_CHATML_TEMPLATE,
};
use specd_tokenizer::MetaValue;

use crate::config::Family;
use crate::error::EngineError;

/// Shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub family: Family,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub seed: u64,
    /// Scale of the random weights; larger makes sharper (less uniform) next-token distributions.
    pub scale: f32,
    /// Every tensor in f32 instead of the quantized formats (no activation quantization either: an
    /// engine path whose arithmetic differs only by float rounding stays within rounding).
    pub float: bool,
}

impl TinySpec {
    pub fn new(family: Family, seed: u64) -> Self {
        Self {
            family,
            layers: 3,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            ffn: 512,
            context: 512,
            seed,
            scale: 0.15,
            float: false,
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn tensor(
    name: &str,
    n: usize,
    k: usize,
    data: Vec<f32>,
    dtype: GgmlDType,
) -> Result<GgufTensorSpec, EngineError> {
    let bytes = if dtype == GgmlDType::F32 {
        data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        let t = Tensor::from_vec(data, (n, k), &Device::Cpu)?;
        QTensor::quantize(&t, dtype)?.data()?.into_owned()
    };
    let dims = if n == 1 {
        vec![k as u64]
    } else {
        vec![k as u64, n as u64]
    };
    Ok(GgufTensorSpec {
        name: name.to_string(),
        dims,
        ggml_type: ggml_type_id(dtype),
        data: bytes,
    })
}

/// Writes a tiny random model with the tiny tokenizer to `path`.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> Result<(), EngineError> {
    let vocab = tiny_tokens().len();
    let arch = spec.family.name();
    let head_dim = spec.hidden / spec.heads;
    let (d, q, kv, f) = (spec.hidden, spec.hidden, spec.kv_heads * head_dim, spec.ffn);
    let mut rng = Rng(spec.seed);
    let tensor = |name: &str, n: usize, k: usize, data: Vec<f32>, dtype: GgmlDType| {
        tensor(
            name,
            n,
            k,
            data,
            if spec.float { GgmlDType::F32 } else { dtype },
        )
    };
    let s = spec.scale;
    let mut t = vec![tensor(
        "token_embd.weight",
        vocab,
        d,
        rng.vec(vocab * d, 1.0),
        GgmlDType::Q8_0,
    )?];
    for i in 0..spec.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        let norm = |rng: &mut Rng| {
            rng.vec(d, 0.1)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect::<Vec<_>>()
        };
        t.push(tensor(
            &p("attn_norm.weight"),
            1,
            d,
            norm(&mut rng),
            GgmlDType::F32,
        )?);
        t.push(tensor(
            &p("attn_q.weight"),
            q,
            d,
            rng.vec(q * d, s),
            GgmlDType::Q4K,
        )?);
        t.push(tensor(
            &p("attn_k.weight"),
            kv,
            d,
            rng.vec(kv * d, s),
            GgmlDType::Q4K,
        )?);
        t.push(tensor(
            &p("attn_v.weight"),
            kv,
            d,
            rng.vec(kv * d, s),
            GgmlDType::Q6K,
        )?);
        if spec.family == Family::Qwen2 {
            t.push(tensor(
                &p("attn_q.bias"),
                1,
                q,
                rng.vec(q, 0.1),
                GgmlDType::F32,
            )?);
            t.push(tensor(
                &p("attn_k.bias"),
                1,
                kv,
                rng.vec(kv, 0.1),
                GgmlDType::F32,
            )?);
            t.push(tensor(
                &p("attn_v.bias"),
                1,
                kv,
                rng.vec(kv, 0.1),
                GgmlDType::F32,
            )?);
        }
        t.push(tensor(
            &p("attn_output.weight"),
            d,
            q,
            rng.vec(d * q, s),
            GgmlDType::Q5_0,
        )?);
        t.push(tensor(
            &p("ffn_norm.weight"),
            1,
            d,
            norm(&mut rng),
            GgmlDType::F32,
        )?);
        t.push(tensor(
            &p("ffn_gate.weight"),
            f,
            d,
            rng.vec(f * d, s),
            GgmlDType::Q4K,
        )?);
        t.push(tensor(
            &p("ffn_up.weight"),
            f,
            d,
            rng.vec(f * d, s),
            GgmlDType::Q4K,
        )?);
        t.push(tensor(
            &p("ffn_down.weight"),
            d,
            f,
            rng.vec(d * f, s),
            GgmlDType::Q6K,
        )?);
    }
    t.push(tensor(
        "output_norm.weight",
        1,
        d,
        vec![1.0; d],
        GgmlDType::F32,
    )?);
    if spec.family == Family::Llama {
        // Llama files carry their own head; the Qwen2 one stays tied to the embedding.
        t.push(tensor(
            "output.weight",
            vocab,
            d,
            rng.vec(vocab * d, 1.0),
            GgmlDType::Q6K,
        )?);
    }
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut kvs = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String(arch.into()),
        ),
        (
            "general.name".to_string(),
            MetaValue::String(format!("tiny-{arch}-{}", spec.seed)),
        ),
        (format!("{arch}.embedding_length"), u(d)),
        (format!("{arch}.block_count"), u(spec.layers)),
        (format!("{arch}.feed_forward_length"), u(f)),
        (format!("{arch}.attention.head_count"), u(spec.heads)),
        (format!("{arch}.attention.head_count_kv"), u(spec.kv_heads)),
        (format!("{arch}.context_length"), u(spec.context)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-6),
        ),
        (format!("{arch}.rope.freq_base"), MetaValue::F32(10_000.0)),
    ];
    let pre = if spec.family == Family::Qwen2 {
        "qwen2"
    } else {
        "smollm"
    };
    kvs.extend(tiny_tokenizer_kv(pre, Some(TINY_CHATML_TEMPLATE)));
    let file = std::fs::File::create(path).map_err(|cause| EngineError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut w = std::io::BufWriter::new(file);
    write_gguf(&mut w, 3, &kvs, &t)
        .and_then(|_| std::io::Write::flush(&mut w))
        .map_err(|cause| EngineError::Io {
            path: path.to_path_buf(),
            cause,
        })
}

/// Sequence `s` of a narrow "traffic" over `vocab` tokens, as a service's queries share their domain:
/// one of six fixed 24-token sequences (`s % 6`) with two tokens changed at random (seeded by `s`).
/// For the trainers' unit tests (`rand` is a dev-dependency).
#[cfg(test)]
pub(crate) fn narrow_traffic(vocab: u32, s: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let template = |t: u64| -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_000_000 + t);
        (0..24).map(|_| rng.random_range(0..vocab)).collect()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
    let mut tokens = template(s % 6);
    for _ in 0..2 {
        let at = rng.random_range(0..tokens.len());
        tokens[at] = rng.random_range(0..vocab);
    }
    tokens
}
