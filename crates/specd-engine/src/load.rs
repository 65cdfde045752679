//! Loading models from files: GGUF (quantized, with its tokenizer) and safetensors (float).
//!
//! Weights are read tensor by tensor straight into their final block vectors, so peak memory stays near
//! the file size: the token embedding stays quantized (rows are dequantized on lookup) instead of being
//! expanded to f32. Owns the checkpoint tensor names; does not own the forward pass.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::quantized::GgmlDType;
use specd_tokenizer::SpecdTokenizer;

use crate::config::{Family, ModelConfig};
use crate::error::EngineError;
use crate::model::{Layer, Model, Weights};
use crate::qweight::QWeight;
use crate::tp::ShardPlan;

/// A model ready to serve: the decoder, its tokenizer and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Arc<SpecdTokenizer>,
    pub path: PathBuf,
    pub file_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |cause| EngineError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Loads a Qwen2 or Llama GGUF file with its tokenizer.
pub fn load_gguf(path: &Path) -> Result<LoadedModel, EngineError> {
    Ok(load_gguf_sliced(path, None)?.0)
}

/// Loads rank `rank`'s shard of a `world`-way tensor-parallel split of a GGUF file (see `tp`): only its
/// slice of every split tensor is read. The model is not yet attached to a group (`Model::with_tp`).
pub fn load_gguf_shard(
    path: &Path,
    rank: usize,
    world: usize,
) -> Result<(LoadedModel, ShardPlan), EngineError> {
    let (loaded, plan) = load_gguf_sliced(path, Some((rank, world)))?;
    Ok((loaded, plan.expect("a shard has a plan")))
}

/// The shard plan of `rank` of `world` for a GGUF file, from its header alone: refuses a degree the
/// model cannot be split into, naming the numbers.
pub fn shard_plan_for(path: &Path, rank: usize, world: usize) -> Result<ShardPlan, EngineError> {
    let (content, _) = read_header(path)?;
    plan_for(&content, rank, world)
}

fn read_header(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), EngineError> {
    if !path.exists() {
        return Err(EngineError::ModelNotFound {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        EngineError::BadModel(format!("{}: not a readable GGUF file: {e}", path.display()))
    })?;
    Ok((content, reader))
}

fn plan_for(
    content: &gguf_file::Content,
    rank: usize,
    world: usize,
) -> Result<ShardPlan, EngineError> {
    let info = |name: &str| {
        content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::BadModel(format!("missing tensor {name}")))
    };
    let vocab = info("token_embd.weight")?.shape.dims()[0];
    let cfg = ModelConfig::from_gguf(content, vocab)?;
    let block = |suffix: &str| -> Result<usize, EngineError> {
        let mut b = 1;
        for i in 0..cfg.layers {
            b = b.max(info(&format!("blk.{i}.{suffix}"))?.ggml_dtype.block_size());
        }
        Ok(b)
    };
    let (o_block, down_block) = (block("attn_output.weight")?, block("ffn_down.weight")?);
    ShardPlan::new(&cfg, rank, world, o_block, down_block)
}

fn load_gguf_sliced(
    path: &Path,
    shard: Option<(usize, usize)>,
) -> Result<(LoadedModel, Option<ShardPlan>), EngineError> {
    let (content, mut reader) = read_header(path)?;
    let file_bytes = reader.get_ref().metadata().map_err(io_err(path))?.len();
    let plan = shard
        .map(|(rank, world)| plan_for(&content, rank, world))
        .transpose()?;
    let tokenizer = Arc::new(SpecdTokenizer::from_gguf_file(path)?);
    let mut tensors = TensorReader {
        content: &content,
        reader: &mut reader,
        file_bytes,
    };
    let embed = tensors.weight("token_embd.weight")?;
    let full_cfg = ModelConfig::from_gguf(&content, embed.rows())?;
    let cfg = match &plan {
        Some(p) => p.local_config(&full_cfg),
        None => full_cfg.clone(),
    };
    let hd = cfg.head_dim;
    // Row and column ranges of every split tensor (everything, without a plan).
    let all = |n: usize| 0..n;
    let (q, kv, ffn, vocab) = match &plan {
        Some(p) => (p.q_cols(hd), p.kv_cols(hd), p.ffn.clone(), p.vocab.clone()),
        None => (
            all(full_cfg.q_dim()),
            all(full_cfg.kv_dim()),
            all(full_cfg.ffn),
            all(full_cfg.vocab),
        ),
    };
    let d = full_cfg.hidden;
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let bias = |t: &mut TensorReader<'_, _>,
                    s: &str,
                    keep: &Range<usize>|
         -> Result<Option<Vec<f32>>, EngineError> {
            let v = if cfg.family == Family::Qwen2 {
                Some(t.vector(&p(s))?)
            } else {
                t.optional_vector(&p(s))?
            };
            v.map(|v| {
                v.get(keep.clone()).map(<[f32]>::to_vec).ok_or_else(|| {
                    EngineError::BadModel(format!("{} has {} values", p(s), v.len()))
                })
            })
            .transpose()
        };
        layers.push(Layer {
            attn_norm: tensors.vector(&p("attn_norm.weight"))?,
            wq: tensors.slice(&p("attn_q.weight"), q.clone(), all(d))?,
            bq: bias(&mut tensors, "attn_q.bias", &q)?,
            wk: tensors.slice(&p("attn_k.weight"), kv.clone(), all(d))?,
            bk: bias(&mut tensors, "attn_k.bias", &kv)?,
            wv: tensors.slice(&p("attn_v.weight"), kv.clone(), all(d))?,
            bv: bias(&mut tensors, "attn_v.bias", &kv)?,
            wo: tensors.slice(&p("attn_output.weight"), all(d), q.clone())?,
            ffn_norm: tensors.vector(&p("ffn_norm.weight"))?,
            w_gate: tensors.slice(&p("ffn_gate.weight"), ffn.clone(), all(d))?,
            w_up: tensors.slice(&p("ffn_up.weight"), ffn.clone(), all(d))?,
            w_down: tensors.slice(&p("ffn_down.weight"), all(d), ffn.clone())?,
        });
    }
    let norm = tensors.vector("output_norm.weight")?;
    let head_name = if content.tensor_infos.contains_key("output.weight") {
        Some("output.weight")
    } else {
        None
    };
    let lm_head = match (head_name, &plan) {
        (Some(name), _) => Some(tensors.slice(name, vocab.clone(), all(d))?),
        // A tied head is the embedding; a shard keeps its own slice of it.
        (None, Some(_)) => Some(tensors.slice("token_embd.weight", vocab.clone(), all(d))?),
        (None, None) => None,
    };
    let weights = Weights {
        embed,
        layers,
        norm,
        lm_head,
    };
    check_shapes(&cfg, &weights, vocab.len())?;
    if tokenizer.vocab_size() > cfg.vocab {
        return Err(EngineError::BadModel(format!(
            "tokenizer has {} tokens but the embedding only {}",
            tokenizer.vocab_size(),
            cfg.vocab
        )));
    }
    Ok((
        LoadedModel {
            model: Model::new(cfg, Arc::new(weights))?,
            tokenizer,
            path: path.to_path_buf(),
            file_bytes,
        },
        plan,
    ))
}

struct TensorReader<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    file_bytes: u64,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>), EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::BadModel(format!("missing tensor {name}")))?;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) {
            return Err(EngineError::BadModel(format!(
                "tensor {name} has a partial block"
            )));
        }
        let size = elems / bs * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        if start + size as u64 > self.file_bytes {
            return Err(EngineError::BadModel(format!(
                "tensor {name} extends past the end of the file (truncated download?)"
            )));
        }
        let mut bytes = vec![0u8; size];
        self.reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut bytes))
            .map_err(|e| EngineError::BadModel(format!("reading tensor {name}: {e}")))?;
        Ok((info.ggml_dtype, dims, bytes))
    }

    /// Rows `rows` and columns `cols` of a 2-D weight, reading only those bytes. A column range must
    /// fall on the tensor's quantization blocks.
    fn slice(
        &mut self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<QWeight, EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::BadModel(format!("missing tensor {name}")))?;
        let [n, k] = info.shape.dims()[..] else {
            return Err(EngineError::BadModel(format!(
                "tensor {name} is not 2-D: {:?}",
                info.shape.dims()
            )));
        };
        if rows == (0..n) && cols == (0..k) {
            return self.weight(name);
        }
        let dtype = info.ggml_dtype;
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        if rows.end > n
            || cols.end > k
            || !cols.start.is_multiple_of(bs)
            || !cols.end.is_multiple_of(bs)
            || !k.is_multiple_of(bs)
        {
            return Err(EngineError::BadModel(format!(
                "cannot take rows {rows:?} and columns {cols:?} of {name} ({n}x{k}, blocks of {bs})"
            )));
        }
        let row_bytes = k / bs * ts;
        let start = self.content.tensor_data_offset + info.offset;
        if start + (n * row_bytes) as u64 > self.file_bytes {
            return Err(EngineError::BadModel(format!(
                "tensor {name} extends past the end of the file (truncated download?)"
            )));
        }
        let read = |r: &mut R, at: u64, buf: &mut [u8]| {
            r.seek(SeekFrom::Start(at))
                .and_then(|_| r.read_exact(buf))
                .map_err(|e| EngineError::BadModel(format!("reading tensor {name}: {e}")))
        };
        let mut bytes;
        if cols == (0..k) {
            bytes = vec![0u8; rows.len() * row_bytes];
            read(
                self.reader,
                start + (rows.start * row_bytes) as u64,
                &mut bytes,
            )?;
        } else {
            let (skip, take) = (cols.start / bs * ts, cols.len() / bs * ts);
            bytes = vec![0u8; rows.len() * take];
            for (i, r) in rows.clone().enumerate() {
                let at = start + (r * row_bytes + skip) as u64;
                read(self.reader, at, &mut bytes[i * take..(i + 1) * take])?;
            }
        }
        QWeight::from_ggml_bytes(dtype, rows.len(), cols.len(), &bytes)
    }

    /// A 2-D weight `n x k`.
    fn weight(&mut self, name: &str) -> Result<QWeight, EngineError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        let [n, k] = dims[..] else {
            return Err(EngineError::BadModel(format!(
                "tensor {name} is not 2-D: {dims:?}"
            )));
        };
        QWeight::from_ggml_bytes(dtype, n, k, &bytes)
    }

    /// A 1-D tensor (norm weights, biases) as f32.
    fn vector(&mut self, name: &str) -> Result<Vec<f32>, EngineError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        let n: usize = dims.iter().product();
        let w = QWeight::from_ggml_bytes(dtype, 1, n, &bytes)?;
        let mut out = vec![0f32; n];
        w.dequantize_row(0, &mut out)?;
        Ok(out)
    }

    fn optional_vector(&mut self, name: &str) -> Result<Option<Vec<f32>>, EngineError> {
        if self.content.tensor_infos.contains_key(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Checks every tensor's shape against the config (a shard's local config), so a corrupt file fails at
/// load, not mid-request. `head_rows`: the LM head's rows (the whole vocabulary, or a shard's slice).
fn check_shapes(cfg: &ModelConfig, w: &Weights, head_rows: usize) -> Result<(), EngineError> {
    let want = |name: &str, qw: &QWeight, n: usize, k: usize| {
        if qw.rows() == n && qw.cols() == k {
            Ok(())
        } else {
            Err(EngineError::BadModel(format!(
                "{name} is {}x{}, expected {n}x{k}",
                qw.rows(),
                qw.cols()
            )))
        }
    };
    let vec_len = |name: &str, v: &[f32], n: usize| {
        if v.len() == n {
            Ok(())
        } else {
            Err(EngineError::BadModel(format!(
                "{name} has {} values, expected {n}",
                v.len()
            )))
        }
    };
    let (d, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
    want("embedding", &w.embed, cfg.vocab, d)?;
    for (i, l) in w.layers.iter().enumerate() {
        vec_len(&format!("layer {i} attn_norm"), &l.attn_norm, d)?;
        vec_len(&format!("layer {i} ffn_norm"), &l.ffn_norm, d)?;
        want(&format!("layer {i} q"), &l.wq, q, d)?;
        want(&format!("layer {i} k"), &l.wk, kv, d)?;
        want(&format!("layer {i} v"), &l.wv, kv, d)?;
        want(&format!("layer {i} o"), &l.wo, d, q)?;
        want(&format!("layer {i} gate"), &l.w_gate, f, d)?;
        want(&format!("layer {i} up"), &l.w_up, f, d)?;
        want(&format!("layer {i} down"), &l.w_down, d, f)?;
        for (name, b, n) in [("bq", &l.bq, q), ("bk", &l.bk, kv), ("bv", &l.bv, kv)] {
            if let Some(b) = b {
                vec_len(&format!("layer {i} {name}"), b, n)?;
            }
        }
    }
    vec_len("output_norm", &w.norm, d)?;
    if let Some(h) = &w.lm_head {
        want("output", h, head_rows, d)?;
    }
    Ok(())
}

/// Loads a float model from a Hugging Face directory (`config.json` plus `model.safetensors`, Qwen2 or
/// Llama naming). Used for trainable drafters; the tokenizer comes from the GGUF of the same family.
pub fn load_safetensors(dir: &Path) -> Result<Model, EngineError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|cause| match cause.kind() {
        std::io::ErrorKind::NotFound => EngineError::ModelNotFound {
            path: cfg_path.clone(),
        },
        _ => EngineError::Io {
            path: cfg_path.clone(),
            cause,
        },
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::BadModel(format!("{}: {e}", cfg_path.display())))?;
    let cfg = ModelConfig::from_hf_json(&json)?;
    let st_path = dir.join("model.safetensors");
    if !st_path.exists() {
        return Err(EngineError::ModelNotFound { path: st_path });
    }
    let tensors = candle_core::safetensors::load(&st_path, &candle_core::Device::Cpu)?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EngineError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| EngineError::BadModel(format!("missing tensor {name}")))?;
        let t = t.to_dtype(candle_core::DType::F32)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    };
    let weight = |name: &str| -> Result<QWeight, EngineError> {
        let (dims, data) = get(name)?;
        let [n, k] = dims[..] else {
            return Err(EngineError::BadModel(format!("tensor {name} is not 2-D")));
        };
        QWeight::from_f32(n, k, data)
    };
    let vector = |name: &str| get(name).map(|(_, v)| v);
    let optional = |name: &str| -> Result<Option<Vec<f32>>, EngineError> {
        if tensors.contains_key(name) {
            vector(name).map(Some)
        } else {
            Ok(None)
        }
    };
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        layers.push(Layer {
            attn_norm: vector(&p("input_layernorm.weight"))?,
            wq: weight(&p("self_attn.q_proj.weight"))?,
            bq: optional(&p("self_attn.q_proj.bias"))?,
            wk: weight(&p("self_attn.k_proj.weight"))?,
            bk: optional(&p("self_attn.k_proj.bias"))?,
            wv: weight(&p("self_attn.v_proj.weight"))?,
            bv: optional(&p("self_attn.v_proj.bias"))?,
            wo: weight(&p("self_attn.o_proj.weight"))?,
            ffn_norm: vector(&p("post_attention_layernorm.weight"))?,
            w_gate: weight(&p("mlp.gate_proj.weight"))?,
            w_up: weight(&p("mlp.up_proj.weight"))?,
            w_down: weight(&p("mlp.down_proj.weight"))?,
        });
    }
    let weights = Weights {
        embed: weight("model.embed_tokens.weight")?,
        layers,
        norm: vector("model.norm.weight")?,
        lm_head: if tensors.contains_key("lm_head.weight") {
            Some(weight("lm_head.weight")?)
        } else {
            None
        },
    };
    check_shapes(&cfg, &weights, cfg.vocab)?;
    Model::new(cfg, Arc::new(weights))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::LogitsWanted;

    /// Writes a tiny Hugging Face style Qwen2 checkpoint; `skip` leaves one tensor out.
    fn write_hf(dir: &Path, skip: Option<&str>) {
        let (d, heads, kv, layers, ffn, vocab) =
            (64usize, 4usize, 2usize, 2usize, 128usize, 50usize);
        let hd = d / heads;
        let config = serde_json::json!({
            "model_type": "qwen2", "hidden_size": d, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_hidden_layers": layers, "intermediate_size": ffn,
            "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0
        });
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
        let mut seed = 1u64;
        let mut rand = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
        };
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert("model.embed_tokens.weight".into(), rand(&[vocab, d]));
        t.insert(
            "model.norm.weight".into(),
            Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).expect("ones"),
        );
        for i in 0..layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![d]),
                ("post_attention_layernorm.weight", vec![d]),
                ("self_attn.q_proj.weight", vec![heads * hd, d]),
                ("self_attn.q_proj.bias", vec![heads * hd]),
                ("self_attn.k_proj.weight", vec![kv * hd, d]),
                ("self_attn.k_proj.bias", vec![kv * hd]),
                ("self_attn.v_proj.weight", vec![kv * hd, d]),
                ("self_attn.v_proj.bias", vec![kv * hd]),
                ("self_attn.o_proj.weight", vec![d, heads * hd]),
                ("mlp.gate_proj.weight", vec![ffn, d]),
                ("mlp.up_proj.weight", vec![ffn, d]),
                ("mlp.down_proj.weight", vec![d, ffn]),
            ] {
                t.insert(p(name), rand(&shape));
            }
        }
        if let Some(s) = skip {
            t.remove(s);
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).expect("save");
    }

    #[test]
    fn safetensors_model_loads_and_is_batch_invariant() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_hf(dir.path(), None);
        let model = load_safetensors(dir.path()).expect("load");
        assert_eq!(model.config().vocab, 50);
        let tokens = [3u32, 17, 42, 8, 0, 49];
        let mut all = model.new_cache();
        let batched = model
            .forward(&mut all, &tokens, LogitsWanted::All)
            .expect("forward");
        assert!(batched.iter().all(|v| v.is_finite()));
        let mut one = model.new_cache();
        for (i, t) in tokens.iter().enumerate() {
            let row = model
                .forward(&mut one, &[*t], LogitsWanted::Last)
                .expect("forward");
            assert_eq!(row, batched[i * 50..(i + 1) * 50].to_vec(), "position {i}");
        }
    }

    #[test]
    fn safetensors_errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            load_safetensors(dir.path()),
            Err(EngineError::ModelNotFound { .. })
        ));
        write_hf(dir.path(), Some("model.layers.1.mlp.up_proj.weight"));
        let err = load_safetensors(dir.path()).expect_err("missing tensor");
        assert!(
            err.to_string()
                .contains("model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }
}
