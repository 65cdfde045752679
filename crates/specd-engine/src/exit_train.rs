//! Distilling a self-drafter's early exit: training an [`ExitAdapter`] with real gradients.
//!
//! The self-drafter is the target's first N layers, its final norm and its (trimmed) LM head, all
//! frozen and shared with the target; what is trained is a low-rank correction of the residual stream
//! at the exit, `u = h + B (A h)` (Kangaroo's adapter, in its smallest form). Per position the forward
//! is `logits = W rmsnorm(u)`, with `h` the frozen layers' output ([`Model::final_hidden`], computed by
//! the engine's own kernels and held constant) and `W` the head's rows as f32. The loss is one of
//! `specd_core::distill`'s against the target's captured top-w distribution; its gradient with respect to
//! the logits is analytic, and candle's autograd carries it to `A` and `B` through the surrogate
//! `sum(logits * g)` with `g` held constant, whose gradient is exactly the loss's. AdamW updates them.
//! The head is a frozen op (`lora_train`'s): its forward is the drafter's own served head, its backward
//! a multiply by the f32 rows, and no gradient of the head itself is computed.
//!
//! `B` starts at zero, so an untrained adapter is the plain self-drafter; the trained one is applied at
//! serving time by [`Model::with_adapter`] with the same arithmetic.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use specd_core::{expected_acceptance, loss_and_grad, Loss, TopTarget};

use crate::error::EngineError;
use crate::lora_train::{rms_norm, Frozen, SmallInit};
use crate::model::{ExitAdapter, Model};

/// One training position: the exit's hidden state and the target's distribution there.
#[derive(Clone, Debug)]
pub struct ExitSample {
    /// The residual stream after the drafter's last layer (`hidden` values).
    pub hidden: Vec<f32>,
    /// The target's captured top-w distribution (token ids).
    pub target: TopTarget,
}

/// Hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct ExitConfig {
    pub rank: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub loss: Loss,
}

impl Default for ExitConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            lr: 1e-3,
            weight_decay: 0.0,
            loss: Loss::ForwardKl,
        }
    }
}

/// The adapter being trained, with the frozen head it trains through.
pub struct ExitTrainer {
    cfg: ExitConfig,
    hidden: usize,
    eps: f64,
    a: Var,
    b: Var,
    opt: AdamW,
    /// The head (its rows `columns x hidden` in f32 for the backward pass) and the final norm, frozen.
    head: Frozen,
    norm: Tensor,
    columns: HeadColumns,
}

/// How a drafter's logit columns map to token ids (a trimmed head has fewer columns than the vocabulary):
/// shared by the trainers, which meet the target's distributions in token ids.
#[derive(Clone, Debug)]
pub(crate) struct HeadColumns {
    /// Token id of each logit column.
    ids: Vec<u32>,
    /// Column of each token id (`u32::MAX`: not in the head).
    column: Vec<u32>,
}

impl HeadColumns {
    /// The columns of `drafter`'s head, which has `columns` rows.
    pub(crate) fn new(drafter: &Model, columns: usize) -> Self {
        let ids: Vec<u32> = match drafter.logit_ids() {
            Some(ids) => ids.to_vec(),
            None => (0..columns as u32).collect(),
        };
        let vocab = drafter
            .config()
            .vocab
            .max(ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
        let mut column = vec![u32::MAX; vocab];
        for (c, &id) in ids.iter().enumerate() {
            column[id as usize] = c as u32;
        }
        Self { ids, column }
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The target's distribution in logit columns: ids the head lacks join the tail.
    pub(crate) fn in_columns(&self, t: &TopTarget) -> Result<TopTarget, EngineError> {
        let (mut ids, mut probs) = (Vec::new(), Vec::new());
        for (&id, &p) in t.ids().iter().zip(t.probs()) {
            match self.column.get(id as usize) {
                Some(&c) if c != u32::MAX => {
                    ids.push(c);
                    probs.push(p);
                }
                _ => {}
            }
        }
        if ids.is_empty() {
            // None of the target's tokens is draftable: all of it is tail, against column 0's absence.
            return TopTarget::new(vec![0], vec![0.0])
                .map_err(|e| EngineError::Internal(e.to_string()));
        }
        TopTarget::new(ids, probs).map_err(|e| EngineError::Internal(e.to_string()))
    }
}

pub(crate) fn candle(e: candle_core::Error) -> EngineError {
    EngineError::Internal(format!("training: {e}"))
}

impl ExitTrainer {
    /// A fresh adapter (A small and random, B zero) for the exit of `drafter`.
    pub fn new(drafter: &Model, cfg: ExitConfig, seed: u64) -> Result<Self, EngineError> {
        if cfg.rank == 0 {
            return Err(EngineError::InvalidRequest(
                "adapter rank must be at least 1".into(),
            ));
        }
        let d = drafter.config().hidden;
        let dev = Device::Cpu;
        let (w, norm) = drafter.head_f32()?;
        let columns = w.len() / d;
        // B = 0 keeps the start exact.
        let a0 = SmallInit::new(seed).matrix(cfg.rank, d);
        let a = Var::from_tensor(&Tensor::from_vec(a0, (cfg.rank, d), &dev).map_err(candle)?)
            .map_err(candle)?;
        let b = Var::zeros((d, cfg.rank), DType::F32, &dev).map_err(candle)?;
        let opt = AdamW::new(
            vec![a.clone(), b.clone()],
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..ParamsAdamW::default()
            },
        )
        .map_err(candle)?;
        Ok(Self {
            cfg,
            hidden: d,
            eps: f64::from(drafter.config().rms_eps),
            a,
            b,
            opt,
            head: Frozen::head(
                drafter,
                Tensor::from_vec(w, (columns, d), &dev).map_err(candle)?,
            ),
            norm: Tensor::from_vec(norm, d, &dev).map_err(candle)?,
            columns: HeadColumns::new(drafter, columns),
        })
    }

    /// Training that goes on from `adapter` (a published version): same parameters, fresh optimizer
    /// state. Its rank is the adapter's.
    pub fn resume(
        drafter: &Model,
        cfg: ExitConfig,
        adapter: &ExitAdapter,
    ) -> Result<Self, EngineError> {
        let d = drafter.config().hidden;
        adapter.check(d)?;
        let t = Self::new(
            drafter,
            ExitConfig {
                rank: adapter.rank,
                ..cfg
            },
            1,
        )?;
        let dev = Device::Cpu;
        t.a.set(&Tensor::from_vec(adapter.a.clone(), (adapter.rank, d), &dev).map_err(candle)?)
            .map_err(candle)?;
        t.b.set(&Tensor::from_vec(adapter.b.clone(), (d, adapter.rank), &dev).map_err(candle)?)
            .map_err(candle)?;
        Ok(t)
    }

    /// Logits (`n x columns`) of the adapted exit for a batch of hidden states, as a graph.
    fn logits(&self, hidden: &[&[f32]]) -> Result<Tensor, candle_core::Error> {
        self.logits_with(self.a.as_tensor(), self.b.as_tensor(), hidden)
    }

    /// [`Self::logits`] with adapter matrices `a` (`rank x hidden`) and `b` (`hidden x rank`).
    fn logits_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        hidden: &[&[f32]],
    ) -> Result<Tensor, candle_core::Error> {
        let n = hidden.len();
        let flat: Vec<f32> = hidden.iter().flat_map(|h| h.iter().copied()).collect();
        let h = Tensor::from_vec(flat, (n, self.hidden), &Device::Cpu)?;
        let u = (&h + h.matmul(&a.t()?)?.matmul(&b.t()?)?)?;
        self.head.apply(&rms_norm(&u, &self.norm, self.eps)?)
    }

    /// One optimizer step on `batch`; the mean loss before the step.
    pub fn step(&mut self, batch: &[ExitSample]) -> Result<f64, EngineError> {
        if batch.is_empty() {
            return Ok(0.0);
        }
        let hidden: Vec<&[f32]> = batch.iter().map(|s| s.hidden.as_slice()).collect();
        if let Some(h) = hidden.iter().find(|h| h.len() != self.hidden) {
            return Err(EngineError::InvalidRequest(format!(
                "a hidden state of {} values for a hidden size of {}",
                h.len(),
                self.hidden
            )));
        }
        let logits = self.logits(&hidden).map_err(candle)?;
        let rows: Vec<Vec<f32>> = logits.to_vec2().map_err(candle)?;
        let n = batch.len();
        let mut grads = Vec::with_capacity(n * self.columns.len());
        let mut total = 0.0;
        for (s, row) in batch.iter().zip(&rows) {
            let t = self.columns.in_columns(&s.target)?;
            let (l, g) = loss_and_grad(self.cfg.loss, &t, row)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            total += l;
            grads.extend(g.into_iter().map(|v| v / n as f32));
        }
        let g = Tensor::from_vec(grads, (n, self.columns.len()), &Device::Cpu).map_err(candle)?;
        let surrogate = (logits * g).map_err(candle)?.sum_all().map_err(candle)?;
        self.opt.backward_step(&surrogate).map_err(candle)?;
        Ok(total / n as f64)
    }

    /// Mean expected acceptance (sum of min(p, q) over the captured ids) of the adapted exit.
    pub fn expected_acceptance(&self, batch: &[ExitSample]) -> Result<f64, EngineError> {
        self.acceptance_with(self.a.as_tensor(), self.b.as_tensor(), batch)
    }

    /// [`Self::expected_acceptance`] of another adapter of the same exit (`None`: the plain exit),
    /// through this trainer's frozen head, so a live version is measured without a second copy of it.
    pub fn expected_acceptance_of(
        &self,
        adapter: Option<&ExitAdapter>,
        batch: &[ExitSample],
    ) -> Result<f64, EngineError> {
        let d = self.hidden;
        let (a, b) = match adapter {
            Some(x) => {
                x.check(d)?;
                (
                    Tensor::from_vec(x.a.clone(), (x.rank, d), &Device::Cpu),
                    Tensor::from_vec(x.b.clone(), (d, x.rank), &Device::Cpu),
                )
            }
            // B = 0: exactly the plain exit.
            None => (
                Tensor::zeros((1, d), DType::F32, &Device::Cpu),
                Tensor::zeros((d, 1), DType::F32, &Device::Cpu),
            ),
        };
        self.acceptance_with(&a.map_err(candle)?, &b.map_err(candle)?, batch)
    }

    fn acceptance_with(
        &self,
        a: &Tensor,
        b: &Tensor,
        batch: &[ExitSample],
    ) -> Result<f64, EngineError> {
        if batch.is_empty() {
            return Ok(0.0);
        }
        let hidden: Vec<&[f32]> = batch.iter().map(|s| s.hidden.as_slice()).collect();
        let rows: Vec<Vec<f32>> = self
            .logits_with(a, b, &hidden)
            .and_then(|l| l.to_vec2())
            .map_err(candle)?;
        let mut sum = 0.0;
        for (s, row) in batch.iter().zip(&rows) {
            let t = self.columns.in_columns(&s.target)?;
            sum +=
                expected_acceptance(&t, row).map_err(|e| EngineError::Internal(e.to_string()))?;
        }
        Ok(sum / batch.len() as f64)
    }

    /// The adapter as trained so far, for [`Model::with_adapter`].
    pub fn adapter(&self) -> Result<ExitAdapter, EngineError> {
        let a: Vec<f32> = self
            .a
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(candle)?;
        let b: Vec<f32> = self
            .b
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(candle)?;
        Ok(ExitAdapter {
            rank: self.cfg.rank,
            a,
            b,
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

    /// Positions of a narrow "traffic": variations (two tokens changed at random) of six fixed
    /// sequences, as a service's queries share their domain. For each, the drafter's exit state and the
    /// target's top-16 there.
    fn samples(target: &Model, drafter: &Model, seqs: std::ops::Range<u64>) -> Vec<ExitSample> {
        let vocab = target.config().vocab as u32;
        let mut out = Vec::new();
        for s in seqs {
            let tokens = narrow_traffic(vocab, s);
            let logits = target
                .forward(&mut target.new_cache(), &tokens, LogitsWanted::All)
                .unwrap();
            let hidden = drafter
                .final_hidden(&mut drafter.new_cache(), &tokens)
                .unwrap();
            let (v, d) = (target.config().vocab, drafter.config().hidden);
            for j in 0..tokens.len() {
                out.push(ExitSample {
                    hidden: hidden[j * d..(j + 1) * d].to_vec(),
                    target: TopTarget::from_logits(&logits[j * v..(j + 1) * v], 16).unwrap(),
                });
            }
        }
        out
    }

    #[test]
    fn distilling_the_exit_raises_held_out_acceptance_and_serving_applies_what_was_trained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let mut spec = TinySpec::new(Family::Qwen2, 11);
        spec.layers = 4;
        spec.scale = 0.3;
        write_tiny_model(&path, &spec).unwrap();
        let target = load_gguf(&path).unwrap().model;
        let drafter = target.truncated(1).unwrap();
        let train = samples(&target, &drafter, 0..60);
        let held_out = samples(&target, &drafter, 1000..1012);
        let mut t = ExitTrainer::new(
            &drafter,
            ExitConfig {
                rank: 8,
                lr: 3e-3,
                ..ExitConfig::default()
            },
            1,
        )
        .unwrap();
        let before = t.expected_acceptance(&held_out).unwrap();
        let train_before = t.expected_acceptance(&train).unwrap();
        let first = t.step(&train[..64]).unwrap();
        let mut last = first;
        for epoch in 0..10 {
            for chunk in train.chunks(64) {
                last = t.step(chunk).unwrap();
            }
            let _ = epoch;
        }
        let after = t.expected_acceptance(&held_out).unwrap();
        let train_after = t.expected_acceptance(&train).unwrap();
        println!("held-out expected acceptance {before:.4} -> {after:.4}, train {train_before:.4} -> {train_after:.4}, loss {first:.4} -> {last:.4}");
        assert!(last < first, "training loss {first} -> {last}");
        assert!(
            after > before + 0.02,
            "held-out acceptance {before} -> {after}"
        );

        // A published version read back from its file resumes exactly where training left it.
        let file = t.adapter().unwrap().to_file_bytes().unwrap();
        let read = ExitAdapter::from_file_bytes(&file, drafter.config().hidden).unwrap();
        let resumed = ExitTrainer::resume(&drafter, ExitConfig::default(), &read).unwrap();
        assert_eq!(resumed.expected_acceptance(&held_out).unwrap(), after);
        assert_eq!(
            t.expected_acceptance_of(Some(&read), &held_out).unwrap(),
            after
        );
        assert_eq!(t.expected_acceptance_of(None, &held_out).unwrap(), before);

        // Serving: the drafter with the trained adapter computes the logits the trainer trained.
        let served = drafter.with_adapter(Some(t.adapter().unwrap())).unwrap();
        let tokens: Vec<u32> = (0..10u32).map(|i| (i * 37 + 5) % 200).collect();
        let got = served
            .forward(&mut served.new_cache(), &tokens, LogitsWanted::Last)
            .unwrap();
        let hidden = drafter
            .final_hidden(&mut drafter.new_cache(), &tokens)
            .unwrap();
        let d = drafter.config().hidden;
        let want: Vec<f32> = t
            .logits(&[&hidden[(tokens.len() - 1) * d..]])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        // The served head runs the quantized kernel on a quantized activation row, the trainer the f32
        // dequantized head: the same distribution up to that quantization.
        let softmax = |z: &[f32]| {
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = z.iter().map(|&v| f64::from(v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / s).collect::<Vec<f64>>()
        };
        let tv: f64 = softmax(&got)
            .iter()
            .zip(softmax(&want))
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / 2.0;
        assert!(
            tv < 0.02,
            "served and trained distributions differ: total variation {tv}"
        );
        // Batch invariance holds with the adapter: the last row of an all-rows forward is bitwise the
        // last-row forward.
        let all = served
            .forward(&mut served.new_cache(), &tokens, LogitsWanted::All)
            .unwrap();
        assert_eq!(&all[all.len() - got.len()..], &got[..]);
        // An untrained adapter (B = 0) changes nothing.
        let fresh = ExitTrainer::new(&drafter, ExitConfig::default(), 2).unwrap();
        let plain = drafter
            .forward(&mut drafter.new_cache(), &tokens, LogitsWanted::Last)
            .unwrap();
        let same = drafter
            .with_adapter(Some(fresh.adapter().unwrap()))
            .unwrap()
            .forward(&mut drafter.new_cache(), &tokens, LogitsWanted::Last)
            .unwrap();
        assert_eq!(plain, same);
    }

    #[test]
    fn bad_adapters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::new(Family::Qwen2, 3)).unwrap();
        let m = load_gguf(&path).unwrap().model;
        let d = m.config().hidden;
        let bad = ExitAdapter {
            rank: 2,
            a: vec![0.0; 2 * d],
            b: vec![0.0; d],
        };
        assert!(m.with_adapter(Some(bad)).is_err());
        let nan = ExitAdapter {
            rank: 1,
            a: vec![f32::NAN; d],
            b: vec![0.0; d],
        };
        assert!(m.with_adapter(Some(nan)).is_err());
    }
}
