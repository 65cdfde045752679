//! Low-rank adapters on a draft model's projections (LoRA): their arithmetic at serving time and their
//! weight file.
//!
//! A [`LoraAdapter`] is what online distillation of the `model` drafter trains and publishes
//! (`crate::lora_train` trains it, the trainer service publishes it, drafter workers load it with
//! [`crate::Model::with_lora`]): OSD's own setting, the draft model distilled toward the target on the
//! live query stream, here as adapters beside the frozen quantized base weights (QLoRA's arrangement), so
//! that a version is a few megabytes and a swap never touches the base. Each adapted projection `W`
//! (`out x in`) computes `W x + scale * B (A x)` with `A` `rank x in` and `B` `out x rank`, in f32, row by
//! row with a fixed accumulation order, so the forward stays batch-invariant.
//!
//! The file is safetensors: per layer `i` and adapted projection `p`, `l{i}.{p}.a` and `l{i}.{p}.b` (f32),
//! and metadata naming the format, rank, scale and projections. [`LoraAdapter::from_file_bytes`] refuses
//! anything that does not fit the model it is loaded for (another format, missing or misshapen tensors,
//! NaN or inf), so bad weights never reach a swap.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::EngineError;
use crate::model::Weights;
use rayon::prelude::*;

use crate::qweight::dot_f32;

/// The `format` metadata value of a LoRA file.
pub const FILE_FORMAT: &str = "specd-lora-v1";

/// The projection names, in the order of [`crate::model::Layer::matrices`].
pub const PROJECTIONS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// Index of a projection name in [`PROJECTIONS`].
pub fn projection(name: &str) -> Option<usize> {
    PROJECTIONS.iter().position(|&p| p == name)
}

/// Parses a comma-separated list of projection names (`q,v` or `all`), in [`PROJECTIONS`] order.
pub fn parse_projections(list: &str) -> Result<Vec<usize>, EngineError> {
    if list.trim() == "all" {
        return Ok((0..PROJECTIONS.len()).collect());
    }
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = projection(name).ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "unknown projection {name:?}; known: {} (or all)",
                PROJECTIONS.join(", ")
            ))
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(EngineError::InvalidRequest(
            "a LoRA adapter needs at least one projection".into(),
        ));
    }
    out.sort_unstable();
    Ok(out)
}

/// One adapted projection: `a` is `rank x in`, `b` is `out x rank`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Low-rank adapters on the projections `targets` of every layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub rank: usize,
    /// Multiplies `B (A x)` (LoRA's `alpha / rank`).
    pub scale: f32,
    /// Adapted projections ([`PROJECTIONS`] indices, ascending).
    pub targets: Vec<usize>,
    /// `pairs[layer * targets.len() + t]`.
    pub pairs: Vec<LoraPair>,
}

impl LoraAdapter {
    /// `(out, in)` of projection `p` of layer `layer` in `weights`.
    fn dims(weights: &Weights, layer: usize, p: usize) -> (usize, usize) {
        let w = weights.layers[layer].matrices()[p].1;
        (w.rows(), w.cols())
    }

    /// Checks the adapter against the first `layers` layers of `weights`.
    pub fn check(&self, weights: &Weights, layers: usize) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::BadModel(format!("LoRA adapter: {m}")));
        if self.rank == 0 || self.targets.is_empty() {
            return bad("rank 0 or no projections".into());
        }
        if !self.targets.windows(2).all(|w| w[0] < w[1])
            || self.targets.iter().any(|&p| p >= PROJECTIONS.len())
        {
            return bad(format!("bad projection list {:?}", self.targets));
        }
        if !self.scale.is_finite() {
            return bad("scale is not finite".into());
        }
        if self.pairs.len() != layers * self.targets.len() {
            return bad(format!(
                "{} matrices pairs for {layers} layers x {} projections",
                self.pairs.len(),
                self.targets.len()
            ));
        }
        for l in 0..layers {
            for (t, &p) in self.targets.iter().enumerate() {
                let (out, inp) = Self::dims(weights, l, p);
                let pair = &self.pairs[l * self.targets.len() + t];
                if pair.a.len() != self.rank * inp || pair.b.len() != out * self.rank {
                    return bad(format!(
                        "layer {l} {}: rank-{} matrices do not fit {out} x {inp}",
                        PROJECTIONS[p], self.rank
                    ));
                }
                if pair.a.iter().chain(&pair.b).any(|v| !v.is_finite()) {
                    return bad(format!("layer {l} {} holds NaN or inf", PROJECTIONS[p]));
                }
            }
        }
        Ok(())
    }

    /// Layers it adapts.
    pub fn layers(&self) -> usize {
        self.pairs.len() / self.targets.len().max(1)
    }

    /// Number of f32 parameters.
    pub fn parameters(&self) -> usize {
        self.pairs.iter().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// The adapter as a safetensors file.
    pub fn to_file_bytes(&self) -> Result<Vec<u8>, EngineError> {
        let bad =
            |e: safetensors::SafeTensorError| EngineError::Internal(format!("LoRA file: {e}"));
        let n = self.targets.len().max(1);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .pairs
            .iter()
            .enumerate()
            .flat_map(|(i, pair)| {
                let name = format!("l{}.{}", i / n, PROJECTIONS[self.targets[i % n]]);
                let inp = pair.a.len() / self.rank.max(1);
                let out = pair.b.len() / self.rank.max(1);
                let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
                [
                    (format!("{name}.a"), vec![self.rank, inp], le(&pair.a)),
                    (format!("{name}.b"), vec![out, self.rank], le(&pair.b)),
                ]
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (name, shape, data) in &bytes {
            views.push((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), data).map_err(bad)?,
            ));
        }
        let targets: Vec<&str> = self.targets.iter().map(|&p| PROJECTIONS[p]).collect();
        let meta = HashMap::from([
            ("format".to_string(), FILE_FORMAT.to_string()),
            ("rank".to_string(), self.rank.to_string()),
            ("scale".to_string(), self.scale.to_string()),
            ("layers".to_string(), self.layers().to_string()),
            ("targets".to_string(), targets.join(",")),
        ]);
        safetensors::serialize(views, Some(meta)).map_err(bad)
    }

    /// Whether `data` is a LoRA file (by its format metadata), without checking the rest.
    pub fn is_lora_file(data: &[u8]) -> bool {
        SafeTensors::read_metadata(data)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref()?.get("format").cloned())
            .is_some_and(|f| f == FILE_FORMAT)
    }

    /// Reads a LoRA file for the first `layers` layers of `weights`; anything that is not a well-formed
    /// adapter for them is an error.
    pub fn from_file_bytes(
        data: &[u8],
        weights: &Weights,
        layers: usize,
    ) -> Result<Self, EngineError> {
        let bad = |m: String| EngineError::BadModel(format!("LoRA file: {m}"));
        let (_, meta) = SafeTensors::read_metadata(data).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).cloned().unwrap_or_default();
        if get("format") != FILE_FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {FILE_FORMAT:?}",
                get("format")
            )));
        }
        let rank: usize = get("rank")
            .parse()
            .map_err(|_| bad(format!("rank {:?}", get("rank"))))?;
        let scale: f32 = get("scale")
            .parse()
            .map_err(|_| bad(format!("scale {:?}", get("scale"))))?;
        let file_layers: usize = get("layers")
            .parse()
            .map_err(|_| bad(format!("layers {:?}", get("layers"))))?;
        if file_layers != layers {
            return Err(bad(format!(
                "trained for {file_layers} layers, the model has {layers}"
            )));
        }
        let targets = parse_projections(&get("targets")).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(data).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, shape: [usize; 2]| -> Result<Vec<f32>, EngineError> {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "{name} is {:?} {:?}, expected f32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        if layers > weights.layers.len() {
            return Err(bad(format!(
                "{layers} layers, the weights have {}",
                weights.layers.len()
            )));
        }
        let mut pairs = Vec::with_capacity(layers * targets.len());
        for l in 0..layers {
            for &p in &targets {
                let (out, inp) = Self::dims(weights, l, p);
                let name = format!("l{l}.{}", PROJECTIONS[p]);
                pairs.push(LoraPair {
                    a: read(&format!("{name}.a"), [rank, inp])?,
                    b: read(&format!("{name}.b"), [out, rank])?,
                });
            }
        }
        let adapter = Self {
            rank,
            scale,
            targets,
            pairs,
        };
        adapter.check(weights, layers)?;
        Ok(adapter)
    }
}

/// An adapter prepared for serving: each `B` also transposed (`rank x out`), so the update of a row is
/// `rank` contiguous multiply-adds over its outputs.
#[derive(Debug)]
pub(crate) struct ServedLora {
    pub(crate) adapter: LoraAdapter,
    bt: Vec<Vec<f32>>,
}

impl ServedLora {
    pub(crate) fn new(adapter: LoraAdapter) -> Self {
        let r = adapter.rank;
        let bt = adapter
            .pairs
            .iter()
            .map(|p| {
                let out = p.b.len() / r;
                let mut t = vec![0f32; p.b.len()];
                for o in 0..out {
                    for j in 0..r {
                        t[j * out + o] = p.b[o * r + j];
                    }
                }
                t
            })
            .collect();
        Self { adapter, bt }
    }

    /// `y += B (scale * A x)` for the `m` rows of `x` (`m x in`) into `y` (`m x out`), when projection
    /// `p` of `layer` is adapted. Per row: `rank` dot products over `in`, then `rank` multiply-adds over
    /// the outputs in order of `rank`, the same whatever `m` is (batch-invariant).
    pub(crate) fn add(&self, layer: usize, p: usize, x: &[f32], m: usize, y: &mut [f32]) {
        let a = &self.adapter;
        let Some(t) = a.targets.iter().position(|&q| q == p) else {
            return;
        };
        if m == 0 {
            return;
        }
        let i = layer * a.targets.len() + t;
        let (pair, bt) = (&a.pairs[i], &self.bt[i]);
        let (inp, out, rank) = (x.len() / m, y.len() / m, a.rank);
        // scale * A x for every row, then each output chunk of each row on its own: per output the
        // same multiply-adds in order of rank, however the work is split. Split over threads only
        // when there is enough of it (a decode step's update is smaller than a fork-join costs).
        let big = m * (inp + out) * rank >= PARALLEL_MACS;
        let one_ax = |k: usize| {
            let (r, j) = (k / rank, k % rank);
            dot_f32(&pair.a[j * inp..(j + 1) * inp], &x[r * inp..(r + 1) * inp]) * a.scale
        };
        let ax: Vec<f32> = if big {
            (0..m * rank).into_par_iter().map(one_ax).collect()
        } else {
            (0..m * rank).map(one_ax).collect()
        };
        let chunk = |(c, ych): (usize, &mut [f32])| {
            // A chunk may straddle rows: split it at row ends.
            let mut at = c * LORA_CHUNK;
            let mut rest = ych;
            while !rest.is_empty() {
                let (r, o0) = (at / out, at % out);
                let n = rest.len().min(out - o0);
                let (now, later) = rest.split_at_mut(n);
                for j in 0..rank {
                    let s = ax[r * rank + j];
                    let b = &bt[j * out + o0..j * out + o0 + n];
                    for (yv, &bv) in now.iter_mut().zip(b) {
                        *yv += s * bv;
                    }
                }
                at += n;
                rest = later;
            }
        };
        if big {
            y.par_chunks_mut(LORA_CHUNK).enumerate().for_each(chunk);
        } else {
            y.chunks_mut(LORA_CHUNK).enumerate().for_each(chunk);
        }
    }
}

/// Multiply-adds from which a LoRA update is split over threads.
const PARALLEL_MACS: usize = 1 << 20;

/// Outputs per parallel work item of the LoRA update.
const LORA_CHUNK: usize = 512;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{write_tiny_model, TinySpec};
    use crate::{load_gguf, Family, LogitsWanted};

    fn adapter(m: &crate::Model, seed: f32) -> LoraAdapter {
        let w = m.weights();
        let targets = vec![0, 2, 6];
        let mut pairs = Vec::new();
        for l in 0..m.config().layers {
            for &p in &targets {
                let (out, inp) = LoraAdapter::dims(w, l, p);
                pairs.push(LoraPair {
                    a: (0..2 * inp)
                        .map(|i| ((i as f32 + seed) * 0.37).sin() * 0.1)
                        .collect(),
                    b: (0..out * 2)
                        .map(|i| ((i as f32 - seed) * 0.11).cos() * 0.1)
                        .collect(),
                });
            }
        }
        LoraAdapter {
            rank: 2,
            scale: 0.5,
            targets,
            pairs,
        }
    }

    #[test]
    fn files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::new(Family::Qwen2, 5)).unwrap();
        let m = load_gguf(&path).unwrap().model;
        let layers = m.config().layers;
        let a = adapter(&m, 1.0);
        let file = a.to_file_bytes().unwrap();
        assert!(LoraAdapter::is_lora_file(&file));
        assert_eq!(
            LoraAdapter::from_file_bytes(&file, m.weights(), layers).unwrap(),
            a
        );
        // Another depth, a truncated file, another format, NaN: refused.
        assert!(LoraAdapter::from_file_bytes(&file, m.weights(), layers - 1).is_err());
        assert!(
            LoraAdapter::from_file_bytes(&file[..file.len() - 9], m.weights(), layers).is_err()
        );
        let exit = crate::ExitAdapter {
            rank: 1,
            a: vec![0.0; m.config().hidden],
            b: vec![0.0; m.config().hidden],
        };
        let other = exit.to_file_bytes().unwrap();
        assert!(!LoraAdapter::is_lora_file(&other));
        assert!(LoraAdapter::from_file_bytes(&other, m.weights(), layers).is_err());
        let mut nan = a.clone();
        nan.pairs[1].b[0] = f32::NAN;
        assert!(nan.check(m.weights(), layers).is_err());
        assert!(m.with_lora(Some(nan)).is_err());
        assert!(parse_projections("q,x").is_err());
        assert_eq!(parse_projections("down, q,q").unwrap(), vec![0, 6]);
        assert_eq!(parse_projections("all").unwrap().len(), 7);
    }

    #[test]
    fn an_adapted_forward_stays_batch_invariant_and_a_zero_b_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::new(Family::Qwen2, 6)).unwrap();
        let m = load_gguf(&path).unwrap().model;
        let tokens: Vec<u32> = (0..12u32).map(|i| (i * 41 + 3) % 200).collect();
        let plain = m
            .forward(&mut m.new_cache(), &tokens, LogitsWanted::All)
            .unwrap();
        let adapted = m.with_lora(Some(adapter(&m, 2.0))).unwrap();
        let all = adapted
            .forward(&mut adapted.new_cache(), &tokens, LogitsWanted::All)
            .unwrap();
        assert_ne!(all, plain);
        // Fed one token at a time, every position's logits are bitwise those of the one pass.
        let mut cache = adapted.new_cache();
        let v = all.len() / tokens.len();
        for (j, t) in tokens.iter().enumerate() {
            let one = adapted
                .forward(&mut cache, &[*t], LogitsWanted::Last)
                .unwrap();
            assert_eq!(&all[j * v..(j + 1) * v], &one[..]);
        }
        let mut zero = adapter(&m, 3.0);
        for p in &mut zero.pairs {
            p.b.iter_mut().for_each(|b| *b = 0.0);
        }
        let same = m
            .with_lora(Some(zero))
            .unwrap()
            .forward(&mut m.new_cache(), &tokens, LogitsWanted::All)
            .unwrap();
        assert_eq!(same, plain);
    }
}
