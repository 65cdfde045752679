//! Distilling a draft model: training its [`LoraAdapter`] with real gradients through its frozen,
//! quantized layers.
//!
//! OSD's own setting: the draft model learns the target's distributions on the live query stream. What
//! is trained is a low-rank adapter on each chosen projection of every layer (`W x + s B (A x)`); the
//! base weights stay frozen and quantized. The forward is candle's autograd graph over one sequence at a
//! time, causal attention over the whole context, with every frozen projection a custom op
//! ([`Frozen`]) whose forward is the engine's own quantized kernel (the arithmetic serving runs) and
//! whose backward multiplies the incoming gradient by a dequantized f32 copy of the weight (the
//! straight-through gradient of QLoRA): candle's own matmul would also compute the gradient of every
//! frozen weight, as much work again and a weight-sized allocation per projection per step. The LM
//! head is frozen the same way, over the drafter's logit columns (all of them, or its trimmed head's).
//!
//! Per kept position the loss is one of `specd_core::distill`'s against the target's captured top-w
//! distribution; its gradient with respect to the logits is analytic, and autograd carries it to the
//! adapters through the surrogate `sum(logits * g)` with `g` held constant (as in `exit_train`). A
//! step's gradients are summed over its sequences, one backward pass each (a sequence's graph is freed
//! before the next is built), then AdamW updates the adapters.
//!
//! `B` starts at zero, so an untrained adapter is the plain draft model; the trained one is applied at
//! serving time by [`Model::with_lora`].

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use specd_core::{expected_acceptance, loss_and_grad, Loss, TopTarget};

use crate::config::RopeStyle;
use crate::error::EngineError;
use crate::exit_train::{candle, HeadColumns};
use crate::lora::{LoraAdapter, LoraPair, PROJECTIONS};
use crate::model::{Model, RopeRows, Weights};
use crate::qweight::QWeight;

/// One training sequence: its tokens, and the target's distribution at some of its positions.
#[derive(Clone, Debug)]
pub struct SeqSample {
    pub context: Arc<[u32]>,
    /// `(prefix, target)`: the target's distribution of the token after `context[..prefix]`
    /// (`1 <= prefix <= context.len()`).
    pub positions: Vec<(usize, TopTarget)>,
}

impl SeqSample {
    /// Tokens the forward must run over: up to the last position's prefix.
    fn upto(&self) -> usize {
        self.positions.iter().map(|p| p.0).max().unwrap_or(0)
    }
}

/// Hyperparameters.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub rank: usize,
    /// LoRA's alpha: the update is scaled by `alpha / rank`.
    pub alpha: f32,
    pub lr: f64,
    pub weight_decay: f64,
    pub loss: Loss,
    /// Adapted projections ([`crate::lora::PROJECTIONS`] indices, ascending).
    pub targets: Vec<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            lr: 5e-4,
            weight_decay: 0.0,
            loss: Loss::ForwardKl,
            targets: (0..PROJECTIONS.len()).collect(),
        }
    }
}

/// How a frozen projection's forward runs.
#[derive(Clone)]
enum Forward {
    /// Projection `.2` of layer `.1`, by the engine's kernel.
    Layer(Arc<Weights>, usize, usize),
    /// The model's LM head (trimmed or not), as serving computes it.
    Head(Box<Model>),
}

/// A frozen projection as a custom op: forward through the engine's kernel (the arithmetic serving
/// runs), backward by the f32 weight, and no gradient for the weight itself.
#[derive(Clone)]
pub(crate) struct Frozen {
    forward: Forward,
    /// `out x in`, f32.
    w: Tensor,
}

impl Frozen {
    /// `drafter`'s LM head (`w`: its rows in f32, one per logit column).
    pub(crate) fn head(drafter: &Model, w: Tensor) -> Self {
        Self {
            forward: Forward::Head(Box::new(drafter.clone())),
            w,
        }
    }

    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "specd-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, wk) = self.w.dims2()?;
        if k != wk {
            candle_core::bail!("frozen linear: {k} inputs for a {n} x {wk} weight");
        }
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("frozen linear: f32 input expected");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen linear: contiguous input expected");
        };
        let x = &all[a..b];
        let y = match &self.forward {
            Forward::Layer(w, layer, p) => w.layers[*layer].matrices()[*p].1.matmul(x, m),
            Forward::Head(model) => model.head_matmul(x, m),
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// The trainers' deterministic small initialisation of an adapter's `A` (a scaled xorshift stream, so a
/// seed gives the same adapter on every machine).
pub(crate) struct SmallInit(u64);

impl SmallInit {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next `rows x cols` values, uniform in +-1/sqrt(cols).
    pub(crate) fn matrix(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        let scale = 1.0 / (cols as f32).sqrt();
        (0..rows * cols)
            .map(|_| {
                let s = &mut self.0;
                *s ^= *s << 13;
                *s ^= *s >> 7;
                *s ^= *s << 17;
                ((*s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }
}

/// RMS norm of every row of `x` (`rows x hidden`) times `w`, as a graph.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// A whole matrix dequantized to f32 (`rows x cols`).
fn dequantized(w: &QWeight) -> Result<Tensor, EngineError> {
    let (n, k) = (w.rows(), w.cols());
    let mut out = vec![0f32; n * k];
    for (r, row) in out.chunks_exact_mut(k).enumerate() {
        w.dequantize_row(r, row)?;
    }
    Tensor::from_vec(out, (n, k), &Device::Cpu).map_err(candle)
}

/// A layer's frozen parts.
struct FrozenLayer {
    proj: Vec<Frozen>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q, k, v biases.
    bias: [Option<Tensor>; 3],
}

/// The adapters being trained, with the frozen draft model they train through.
pub struct LoraTrainer {
    cfg: LoraConfig,
    model: Model,
    layers: Vec<FrozenLayer>,
    norm: Tensor,
    head: Frozen,
    columns: HeadColumns,
    /// `(A, B)` per layer and target, as in [`LoraAdapter::pairs`].
    vars: Vec<(Var, Var)>,
    opt: AdamW,
}

impl LoraTrainer {
    /// Fresh adapters (A small and random, B zero) on `drafter`'s projections.
    pub fn new(drafter: &Model, cfg: LoraConfig, seed: u64) -> Result<Self, EngineError> {
        if cfg.rank == 0 || cfg.targets.is_empty() {
            return Err(EngineError::InvalidRequest(
                "LoRA needs a rank of at least 1 and at least one projection".into(),
            ));
        }
        if drafter.adapter().is_some() || drafter.tp().is_some() {
            return Err(EngineError::InvalidRequest(
                "LoRA trains a plain draft model (no exit adapter, not tensor-parallel)".into(),
            ));
        }
        let dev = Device::Cpu;
        let weights = Arc::clone(drafter.weights());
        let n_layers = drafter.config().layers;
        let mut layers = Vec::with_capacity(n_layers);
        for (li, l) in weights.layers[..n_layers].iter().enumerate() {
            let proj = l
                .matrices()
                .iter()
                .enumerate()
                .map(|(p, (_, w))| {
                    Ok(Frozen {
                        forward: Forward::Layer(Arc::clone(&weights), li, p),
                        w: dequantized(w)?,
                    })
                })
                .collect::<Result<Vec<_>, EngineError>>()?;
            let vec = |v: &[f32]| Tensor::from_slice(v, v.len(), &dev).map_err(candle);
            let bias = |b: &Option<Vec<f32>>| b.as_deref().map(vec).transpose();
            layers.push(FrozenLayer {
                proj,
                attn_norm: vec(&l.attn_norm)?,
                ffn_norm: vec(&l.ffn_norm)?,
                bias: [bias(&l.bq)?, bias(&l.bk)?, bias(&l.bv)?],
            });
        }
        let d = drafter.config().hidden;
        let (head, norm) = drafter.head_f32()?;
        let columns = head.len() / d;
        let head = Frozen::head(
            drafter,
            Tensor::from_vec(head, (columns, d), &dev).map_err(candle)?,
        );
        let mut init = SmallInit::new(seed);
        let mut vars = Vec::new();
        for li in 0..n_layers {
            for &p in &cfg.targets {
                let w = weights.layers[li].matrices()[p].1;
                let (out, inp) = (w.rows(), w.cols());
                // B = 0 keeps the start exact.
                let a0 = init.matrix(cfg.rank, inp);
                let a =
                    Var::from_tensor(&Tensor::from_vec(a0, (cfg.rank, inp), &dev).map_err(candle)?)
                        .map_err(candle)?;
                let b = Var::zeros((out, cfg.rank), DType::F32, &dev).map_err(candle)?;
                vars.push((a, b));
            }
        }
        let opt = AdamW::new(
            vars.iter()
                .flat_map(|(a, b)| [a.clone(), b.clone()])
                .collect(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..ParamsAdamW::default()
            },
        )
        .map_err(candle)?;
        Ok(Self {
            columns: HeadColumns::new(drafter, columns),
            cfg,
            model: drafter.clone(),
            layers,
            norm: Tensor::from_vec(norm, d, &dev).map_err(candle)?,
            head,
            vars,
            opt,
        })
    }

    /// Training that goes on from `adapter` (a published version): same parameters, fresh optimizer
    /// state; its rank, scale and projections are the adapter's.
    pub fn resume(
        drafter: &Model,
        cfg: LoraConfig,
        adapter: &LoraAdapter,
    ) -> Result<Self, EngineError> {
        adapter.check(drafter.weights(), drafter.config().layers)?;
        let t = Self::new(
            drafter,
            LoraConfig {
                rank: adapter.rank,
                alpha: adapter.scale * adapter.rank as f32,
                targets: adapter.targets.clone(),
                ..cfg
            },
            1,
        )?;
        for ((a, b), pair) in t.vars.iter().zip(&adapter.pairs) {
            a.set(&Tensor::from_slice(&pair.a, a.shape(), &Device::Cpu).map_err(candle)?)
                .map_err(candle)?;
            b.set(&Tensor::from_slice(&pair.b, b.shape(), &Device::Cpu).map_err(candle)?)
                .map_err(candle)?;
        }
        Ok(t)
    }

    fn scale(&self) -> f32 {
        self.cfg.alpha / self.cfg.rank as f32
    }

    /// Logits (`positions x columns`) at the sample's positions, with adapters `lora` (`(A, B)` per layer
    /// and target of `targets`, scaled by `scale`; empty: the plain draft model), as a graph.
    fn logits_with(
        &self,
        lora: &[(Tensor, Tensor)],
        targets: &[usize],
        scale: f64,
        sample: &SeqSample,
    ) -> candle_core::Result<Tensor> {
        let cfg = self.model.config();
        let dev = Device::Cpu;
        let t = sample.upto();
        let tokens = &sample.context[..t];
        let (d, hd, heads, kv) = (cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads);
        let half = hd / 2;
        let mut x0 = vec![0f32; t * d];
        for (r, &tok) in tokens.iter().enumerate() {
            self.model
                .weights()
                .embed
                .dequantize_row(tok as usize, &mut x0[r * d..(r + 1) * d])
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        let mut x = Tensor::from_vec(x0, (t, d), &dev)?;
        // The engine's own RoPE tables, and the causal mask.
        let tables = RopeRows::new(cfg, 0..t);
        let cos = Tensor::from_vec(tables.cos, (1, t, half), &dev)?;
        let sin = Tensor::from_vec(tables.sin, (1, t, half), &dev)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, t), &dev)?;
        let rope = |x: &Tensor| -> candle_core::Result<Tensor> {
            // x: (heads, t, hd)
            let (x1, x2) = match cfg.rope {
                RopeStyle::Halves => (x.narrow(2, 0, half)?, x.narrow(2, half, half)?),
                RopeStyle::Interleaved => {
                    let (h, t, _) = x.dims3()?;
                    let p = x.reshape((h, t, half, 2))?;
                    (
                        p.narrow(3, 0, 1)?.squeeze(3)?,
                        p.narrow(3, 1, 1)?.squeeze(3)?,
                    )
                }
            };
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
            match cfg.rope {
                RopeStyle::Halves => Tensor::cat(&[r1, r2], 2),
                RopeStyle::Interleaved => {
                    let (h, t, _) = r1.dims3()?;
                    Tensor::stack(&[r1, r2], 3)?.reshape((h, t, hd))
                }
            }
        };
        let eps = f64::from(cfg.rms_eps);
        let rms = |x: &Tensor, w: &Tensor| rms_norm(x, w, eps);
        let per = targets.len();
        for (li, layer) in self.layers[..cfg.layers].iter().enumerate() {
            let proj = |p: usize, x: &Tensor| -> candle_core::Result<Tensor> {
                let y = layer.proj[p].apply(x)?;
                match targets.iter().position(|&q| q == p) {
                    Some(i) if !lora.is_empty() => {
                        let (a, b) = &lora[li * per + i];
                        y + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?
                    }
                    _ => Ok(y),
                }
            };
            let with_bias = |y: Tensor, b: &Option<Tensor>| match b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
            let h = rms(&x, &layer.attn_norm)?;
            let q = with_bias(proj(0, &h)?, &layer.bias[0])?;
            let k = with_bias(proj(1, &h)?, &layer.bias[1])?;
            let v = with_bias(proj(2, &h)?, &layer.bias[2])?;
            let q = rope(&q.reshape((t, heads, hd))?.transpose(0, 1)?.contiguous()?)?;
            let k = rope(&k.reshape((t, kv, hd))?.transpose(0, 1)?.contiguous()?)?;
            let v = v.reshape((t, kv, hd))?.transpose(0, 1)?;
            // Query head h reads KV head h / group.
            let group = heads / kv;
            let expand = |z: &Tensor| -> candle_core::Result<Tensor> {
                z.reshape((kv, 1, t, hd))?
                    .broadcast_as((kv, group, t, hd))?
                    .contiguous()?
                    .reshape((heads, t, hd))
            };
            let (k, v) = (expand(&k)?, expand(&v)?);
            let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let attn = probs
                .matmul(&v)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, heads * hd))?;
            x = (x + proj(3, &attn)?)?;
            let h = rms(&x, &layer.ffn_norm)?;
            let g = proj(4, &h)?;
            let u = proj(5, &h)?;
            let act = ((&g / (g.neg()?.exp()? + 1.0)?)? * u)?;
            x = (x + proj(6, &act)?)?;
        }
        let rows: Vec<u32> = sample.positions.iter().map(|p| p.0 as u32 - 1).collect();
        let sel = x.index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?;
        self.head.apply(&rms(&sel, &self.norm)?)
    }

    fn own(&self) -> Vec<(Tensor, Tensor)> {
        self.vars
            .iter()
            .map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone()))
            .collect()
    }

    /// Refuses samples the forward cannot take (positions outside the context or the model's window,
    /// token ids outside the vocabulary).
    fn check(&self, s: &SeqSample) -> Result<(), EngineError> {
        let cfg = self.model.config();
        let upto = s.upto();
        if s.positions.iter().any(|p| p.0 == 0) || upto > s.context.len() || upto > cfg.context {
            return Err(EngineError::InvalidRequest(format!(
                "a position outside a context of {} tokens (model window {})",
                s.context.len(),
                cfg.context
            )));
        }
        if let Some(&id) = s.context[..upto]
            .iter()
            .find(|&&id| id as usize >= cfg.vocab)
        {
            return Err(EngineError::BadToken {
                id,
                vocab: cfg.vocab,
            });
        }
        Ok(())
    }

    /// One optimizer step on `batch` (its positions weighted equally); the mean loss before the step.
    pub fn step(&mut self, batch: &[SeqSample]) -> Result<f64, EngineError> {
        let n: usize = batch.iter().map(|s| s.positions.len()).sum();
        if n == 0 {
            return Ok(0.0);
        }
        for s in batch {
            self.check(s)?;
        }
        let own = self.own();
        let scale = f64::from(self.scale());
        let mut total = 0.0;
        let mut summed: Option<GradStore> = None;
        for s in batch.iter().filter(|s| !s.positions.is_empty()) {
            let logits = self
                .logits_with(&own, &self.cfg.targets, scale, s)
                .map_err(candle)?;
            let rows: Vec<Vec<f32>> = logits.to_vec2().map_err(candle)?;
            let mut g = Vec::with_capacity(rows.len() * self.columns.len());
            for ((_, target), row) in s.positions.iter().zip(&rows) {
                let t = self.columns.in_columns(target)?;
                let (l, grad) = loss_and_grad(self.cfg.loss, &t, row)
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                total += l;
                g.extend(grad.into_iter().map(|v| v / n as f32));
            }
            let g = Tensor::from_vec(g, logits.shape(), &Device::Cpu).map_err(candle)?;
            let grads = (logits * g)
                .and_then(|s| s.sum_all())
                .and_then(|s| s.backward())
                .map_err(candle)?;
            summed = Some(match summed {
                None => grads,
                Some(mut acc) => {
                    for (a, b) in &self.vars {
                        for v in [a.as_tensor(), b.as_tensor()] {
                            if let Some(new) = grads.get(v) {
                                let sum = match acc.get(v) {
                                    Some(old) => (old + new).map_err(candle)?,
                                    None => new.clone(),
                                };
                                acc.insert(v, sum);
                            }
                        }
                    }
                    acc
                }
            });
        }
        if let Some(grads) = summed {
            self.opt.step(&grads).map_err(candle)?;
        }
        Ok(total / n as f64)
    }

    /// Mean expected acceptance (sum of min(p, q) over the captured ids) of the adapted draft model
    /// over every position of `batch`.
    pub fn expected_acceptance(&self, batch: &[SeqSample]) -> Result<f64, EngineError> {
        self.acceptance_with(
            &self.own(),
            &self.cfg.targets,
            f64::from(self.scale()),
            batch,
        )
    }

    /// [`Self::expected_acceptance`] of another adapter of the same draft model (`None`: the plain
    /// model), through this trainer's frozen weights, so a live version is measured without a second
    /// copy of them.
    pub fn expected_acceptance_of(
        &self,
        adapter: Option<&LoraAdapter>,
        batch: &[SeqSample],
    ) -> Result<f64, EngineError> {
        let Some(x) = adapter else {
            return self.acceptance_with(&[], &[], 0.0, batch);
        };
        x.check(self.model.weights(), self.model.config().layers)?;
        let dev = Device::Cpu;
        let mut lora = Vec::with_capacity(x.pairs.len());
        for (i, pair) in x.pairs.iter().enumerate() {
            let w = self.model.weights().layers[i / x.targets.len()].matrices()
                [x.targets[i % x.targets.len()]]
            .1;
            lora.push((
                Tensor::from_slice(&pair.a, (x.rank, w.cols()), &dev).map_err(candle)?,
                Tensor::from_slice(&pair.b, (w.rows(), x.rank), &dev).map_err(candle)?,
            ));
        }
        self.acceptance_with(&lora, &x.targets, f64::from(x.scale), batch)
    }

    fn acceptance_with(
        &self,
        lora: &[(Tensor, Tensor)],
        targets: &[usize],
        scale: f64,
        batch: &[SeqSample],
    ) -> Result<f64, EngineError> {
        let (mut sum, mut n) = (0.0, 0usize);
        for s in batch.iter().filter(|s| !s.positions.is_empty()) {
            self.check(s)?;
            let rows: Vec<Vec<f32>> = self
                .logits_with(lora, targets, scale, s)
                .and_then(|l| l.detach().to_vec2())
                .map_err(candle)?;
            for ((_, target), row) in s.positions.iter().zip(&rows) {
                let t = self.columns.in_columns(target)?;
                sum += expected_acceptance(&t, row)
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                n += 1;
            }
        }
        Ok(if n == 0 { 0.0 } else { sum / n as f64 })
    }

    /// The adapters as trained so far, for [`Model::with_lora`].
    pub fn adapter(&self) -> Result<LoraAdapter, EngineError> {
        let flat = |v: &Var| -> Result<Vec<f32>, EngineError> {
            v.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(candle)
        };
        let pairs = self
            .vars
            .iter()
            .map(|(a, b)| {
                Ok(LoraPair {
                    a: flat(a)?,
                    b: flat(b)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(LoraAdapter {
            rank: self.cfg.rank,
            scale: self.scale(),
            targets: self.cfg.targets.clone(),
            pairs,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::LogitsWanted;
    use crate::testing::{narrow_traffic, write_tiny_model, TinySpec};
    use crate::{load_gguf, Family};

    fn tiny(dir: &std::path::Path, seed: u64, layers: usize, float: bool) -> Model {
        tiny_scaled(dir, seed, layers, float, 0.3)
    }

    fn tiny_scaled(
        dir: &std::path::Path,
        seed: u64,
        layers: usize,
        float: bool,
        scale: f32,
    ) -> Model {
        let path = dir.join(format!("tiny-{seed}-{layers}-{float}.gguf"));
        let mut spec = TinySpec::new(Family::Qwen2, seed);
        spec.layers = layers;
        spec.scale = scale;
        spec.float = float;
        write_tiny_model(&path, &spec).unwrap();
        load_gguf(&path).unwrap().model
    }

    /// Narrow "traffic": variations (two tokens changed) of six fixed sequences, with the target's
    /// top-16 at every position.
    fn samples(target: &Model, seqs: std::ops::Range<u64>) -> Vec<SeqSample> {
        let vocab = target.config().vocab as u32;
        seqs.map(|s| {
            let tokens = narrow_traffic(vocab, s);
            let logits = target
                .forward(&mut target.new_cache(), &tokens, LogitsWanted::All)
                .unwrap();
            let v = target.config().vocab;
            SeqSample {
                positions: (0..tokens.len())
                    .map(|j| {
                        let t = TopTarget::from_logits(&logits[j * v..(j + 1) * v], 16).unwrap();
                        (j + 1, t)
                    })
                    .collect(),
                context: tokens.into(),
            }
        })
        .collect()
    }

    fn softmax(z: &[f32]) -> Vec<f64> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = z.iter().map(|&v| f64::from(v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    #[test]
    fn distilling_a_draft_model_raises_held_out_acceptance_and_serving_applies_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = tiny(dir.path(), 11, 4, false);
        let drafter = tiny(dir.path(), 12, 2, false);
        let train = samples(&target, 0..48);
        let held_out = samples(&target, 1000..1012);
        let cfg = LoraConfig {
            rank: 4,
            lr: 3e-3,
            ..LoraConfig::default()
        };
        let mut t = LoraTrainer::new(&drafter, cfg.clone(), 1).unwrap();
        let before = t.expected_acceptance(&held_out).unwrap();
        assert_eq!(t.expected_acceptance_of(None, &held_out).unwrap(), before);
        let first = t.step(&train[..4]).unwrap();
        let mut last = first;
        for _ in 0..4 {
            for chunk in train.chunks(4) {
                last = t.step(chunk).unwrap();
            }
        }
        let after = t.expected_acceptance(&held_out).unwrap();
        println!(
            "held-out expected acceptance {before:.4} -> {after:.4}, loss {first:.4} -> {last:.4}"
        );
        assert!(last < first, "training loss {first} -> {last}");
        assert!(
            after > before + 0.02,
            "held-out acceptance {before} -> {after}"
        );

        // The published file resumes exactly where training left it.
        let adapter = t.adapter().unwrap();
        let file = adapter.to_file_bytes().unwrap();
        let read = LoraAdapter::from_file_bytes(&file, drafter.weights(), drafter.config().layers)
            .unwrap();
        let resumed = LoraTrainer::resume(&drafter, LoraConfig::default(), &read).unwrap();
        assert_eq!(resumed.expected_acceptance(&held_out).unwrap(), after);
        assert_eq!(
            t.expected_acceptance_of(Some(&read), &held_out).unwrap(),
            after
        );

        // Serving: the drafter with the trained adapter computes the distributions the trainer
        // trained, up to the order of float sums (both run the same quantized kernels; the adapter's
        // update is summed in another order). A last-bit difference can move one activation across a
        // quantization step, which in this tiny random model shifts a position by a few percent, so
        // the bound is on the typical position; the base model (no adapter) is the negative control.
        let served = drafter.with_lora(Some(adapter)).unwrap();
        let s = &held_out[0];
        let want: Vec<Vec<f32>> = t
            .logits_with(&t.own(), &t.cfg.targets, f64::from(t.scale()), s)
            .unwrap()
            .to_vec2()
            .unwrap();
        let v = served.config().vocab;
        let tvs = |model: &Model| -> Vec<f64> {
            let got = model
                .forward(&mut model.new_cache(), &s.context, LogitsWanted::All)
                .unwrap();
            let mut tvs: Vec<f64> = want
                .iter()
                .enumerate()
                .map(|(j, w)| {
                    softmax(&got[j * v..(j + 1) * v])
                        .iter()
                        .zip(softmax(w))
                        .map(|(a, b)| (a - b).abs())
                        .sum::<f64>()
                        / 2.0
                })
                .collect();
            tvs.sort_by(f64::total_cmp);
            tvs
        };
        let (with, base) = (tvs(&served), tvs(&drafter));
        let median = |t: &[f64]| t[t.len() / 2];
        let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
        println!(
            "served vs trained TV: median {:.5} mean {:.5} max {:.5}; base model: median {:.5}",
            median(&with),
            mean(&with),
            with[with.len() - 1],
            median(&base)
        );
        assert!(
            median(&with) < 0.005 && mean(&with) < 0.02,
            "served vs trained TV {with:?}"
        );
        assert!(median(&base) > 0.05, "the adapter barely matters: {base:?}");
    }

    /// The gradient autograd carries through the frozen layers equals finite differences of the loss
    /// (f32 weights, so the forward is smooth). Reverse KL: the forward KL's gradient is that of the
    /// unclamped loss, which differs from its value's finite differences where the drafter's mass on a
    /// target token is under `specd_core::distill::EPS`, as it is between two random tiny models.
    #[test]
    fn gradients_through_frozen_layers_match_finite_differences() {
        const LOSS: Loss = Loss::ReverseKl;
        let dir = tempfile::tempdir().unwrap();
        let target = tiny_scaled(dir.path(), 21, 2, true, 0.15);
        let drafter = tiny_scaled(dir.path(), 22, 2, true, 0.15);
        let batch = samples(&target, 0..2);
        let cfg = LoraConfig {
            rank: 2,
            loss: LOSS,
            ..LoraConfig::default()
        };
        let t = LoraTrainer::new(&drafter, cfg, 3).unwrap();
        // Give B some value so A's gradient is not zero either.
        for (i, (_, b)) in t.vars.iter().enumerate() {
            let vals: Vec<f32> = (0..b.elem_count())
                .map(|j| ((i * 31 + j) as f32 * 0.7).sin() * 0.05)
                .collect();
            b.set(&Tensor::from_vec(vals, b.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let rows_of = |t: &LoraTrainer, s: &SeqSample| -> Vec<Vec<f32>> {
            t.logits_with(&t.own(), &t.cfg.targets, f64::from(t.scale()), s)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let loss_of = |t: &LoraTrainer| -> f64 {
            let mut total = 0.0;
            for s in &batch {
                for ((_, target), row) in s.positions.iter().zip(&rows_of(t, s)) {
                    total += loss_and_grad(LOSS, target, row).unwrap().0;
                }
            }
            total
        };
        let per_position =
            loss_of(&t) / batch.iter().map(|s| s.positions.len()).sum::<usize>() as f64;
        assert!(
            per_position > 0.05,
            "degenerate distributions: loss {per_position} per position"
        );
        // Autograd through the surrogate, summed over the sequences.
        let params: Vec<&Var> = t.vars.iter().flat_map(|(a, b)| [a, b]).collect();
        let mut acc: Vec<Vec<f32>> = params.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        for s in &batch {
            let logits = t
                .logits_with(&t.own(), &t.cfg.targets, f64::from(t.scale()), s)
                .unwrap();
            let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            let mut g = Vec::new();
            for ((_, target), row) in s.positions.iter().zip(&rows) {
                g.extend(loss_and_grad(LOSS, target, row).unwrap().1);
            }
            let g = Tensor::from_vec(g, logits.shape(), &Device::Cpu).unwrap();
            let gs = (logits * g).unwrap().sum_all().unwrap().backward().unwrap();
            for (x, v) in acc.iter_mut().zip(&params) {
                let y: Vec<f32> = gs
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
            }
        }
        // Finite differences on entries of the first layer's q adapter and the last layer's down one.
        let picks = [
            (0usize, 3usize),
            (1, 5),
            (params.len() - 2, 7),
            (params.len() - 1, 1),
        ];
        let h = 1e-2f32;
        for (pi, e) in picks {
            let v = params[pi];
            let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let at = |delta: f32| {
                let mut w = base.clone();
                w[e] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&t)
            };
            let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
            v.set(&Tensor::from_vec(base, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let ad = f64::from(acc[pi][e]);
            assert!(
                fd.abs() > 1e-3 && (fd - ad).abs() <= 0.03 * fd.abs().max(ad.abs()),
                "parameter {pi} entry {e}: finite differences {fd}, autograd {ad}"
            );
        }
    }
}
