//! The decoder: Qwen2 and Llama forward passes over ragged batches, with logits at every fed position.
//!
//! A [`Model`] is a view over shared [`Weights`] that uses their first `n_layers` layers: the full target,
//! or a self-drafter cut from the target's own first layers (same weights, no copy). [`Model::forward`]
//! feeds any number of new tokens for any number of sequences in one pass: every linear layer runs once
//! over all rows of all sequences ([`QWeight::matmul`]), attention runs per row against that row's own
//! sequence cache. Every per-row computation (norms, RoPE, attention, dot products) is written so that its
//! arithmetic does not depend on which other rows are in the pass: a position's logits are bitwise equal
//! whether computed alone, in a verify of k+1 positions, in a batch of sequences, or in any prefill
//! chunking. The speculation loop relies on that for exact greedy losslessness.
//!
//! A model may be one rank's shard of a tensor-parallel group (`tp`): the same forward over its slice of
//! the heads, FFN features and vocabulary, with an all-reduce after the attention output and FFN down
//! projections and the head's slices gathered on rank 0.
//!
//! It does not sample and does not know about drafts; see `speculate.rs`.

use std::sync::Arc;

pub use crate::adapter::ExitAdapter;
use crate::attention::attention;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::EngineError;
use crate::kv::KvCache;
pub use crate::lora::LoraAdapter;
use crate::lora::ServedLora;
use crate::qweight::{dot_f32, QWeight};
use crate::tp::{StatsSnapshot, TpRank};

/// One decoder block's weights, named after the GGUF tensors they come from.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: QWeight,
    pub bq: Option<Vec<f32>>,
    pub wk: QWeight,
    pub bk: Option<Vec<f32>>,
    pub wv: QWeight,
    pub bv: Option<Vec<f32>>,
    pub wo: QWeight,
    pub ffn_norm: Vec<f32>,
    pub w_gate: QWeight,
    pub w_up: QWeight,
    pub w_down: QWeight,
}

impl Layer {
    /// The layer's weight matrices with their short names, in forward order.
    pub fn matrices(&self) -> [(&'static str, &QWeight); 7] {
        [
            ("q", &self.wq),
            ("k", &self.wk),
            ("v", &self.wv),
            ("o", &self.wo),
            ("gate", &self.w_gate),
            ("up", &self.w_up),
            ("down", &self.w_down),
        ]
    }
}

/// All weights of a model file.
#[derive(Debug)]
pub struct Weights {
    pub embed: QWeight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<QWeight>,
}

impl Weights {
    /// Bytes held by all weights.
    pub fn nbytes(&self) -> usize {
        let layer = |l: &Layer| l.matrices().iter().map(|(_, w)| w.nbytes()).sum::<usize>();
        self.embed.nbytes()
            + self.layers.iter().map(layer).sum::<usize>()
            + self.lm_head.as_ref().map_or(0, |w| w.nbytes())
    }
}

/// What logits a sequence in a batch wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk whose output is not needed).
    None,
    /// The last fed position only (prefill, plain decode).
    Last,
    /// Every fed position (verification, drafting several tokens).
    All,
    /// The last n fed positions (a verify step that also feeds context tokens it had not seen).
    Tail(usize),
}

/// One sequence's part of a batched forward.
#[derive(Debug)]
pub struct SeqInput<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub wanted: LogitsWanted,
}

/// An LM head cut down to the first token ids plus a few more: a drafter's cheaper head (see
/// [`Model::with_head_prefix`]).
#[derive(Debug)]
struct HeadSubset {
    /// Rows for token ids `0..prefix.rows()`, shared by every model trimmed from the same one.
    prefix: Arc<QWeight>,
    /// Rows for `extra_ids`.
    extra: QWeight,
    /// Further token ids, strictly ascending, all `>= prefix.rows()`.
    extra_ids: Vec<u32>,
    /// The token id of every logit column: `0..prefix.rows()` then `extra_ids`.
    ids: Vec<u32>,
}

/// A decoder over shared weights.
#[derive(Clone, Debug)]
pub struct Model {
    cfg: ModelConfig,
    weights: Arc<Weights>,
    /// When set, logits are computed only for these token ids.
    head: Option<Arc<HeadSubset>>,
    /// Applied to the residual stream of the rows that want logits, before the final norm.
    adapter: Option<Arc<ExitAdapter>>,
    /// Low-rank adapters on the layers' projections (a distilled draft model).
    lora: Option<Arc<ServedLora>>,
    /// This model's rank in a tensor-parallel group (its weights are that rank's shard).
    tp: Option<Arc<TpRank>>,
}

impl Model {
    /// A model over all layers of `weights`.
    pub fn new(cfg: ModelConfig, weights: Arc<Weights>) -> Result<Self, EngineError> {
        if weights.layers.len() != cfg.layers {
            return Err(EngineError::BadModel(format!(
                "config says {} layers, weights have {}",
                cfg.layers,
                weights.layers.len()
            )));
        }
        Ok(Self {
            cfg,
            weights,
            head: None,
            adapter: None,
            lora: None,
            tp: None,
        })
    }

    /// This shard as rank `tp` of its group (the weights must be that rank's shard, from
    /// `load::load_gguf_shard`).
    pub fn with_tp(&self, tp: TpRank) -> Result<Self, EngineError> {
        if self.head.is_some() || self.adapter.is_some() || self.lora.is_some() {
            return Err(EngineError::InvalidRequest(
                "a model with a trimmed head or an adapter cannot be tensor-parallel".into(),
            ));
        }
        Ok(Self {
            tp: Some(Arc::new(tp)),
            ..self.clone()
        })
    }

    /// This model's tensor-parallel membership, when it is a shard.
    pub fn tp(&self) -> Option<&TpRank> {
        self.tp.as_deref()
    }

    /// Bytes moved and time spent in collectives by this rank (`None` when not tensor-parallel).
    pub fn tp_stats(&self) -> Option<StatsSnapshot> {
        self.tp.as_ref().map(|t| t.stats())
    }

    fn refuse_tp(&self, what: &str) -> Result<(), EngineError> {
        match &self.tp {
            Some(_) => Err(EngineError::InvalidRequest(format!(
                "{what} is not supported on a tensor-parallel model"
            ))),
            None => Ok(()),
        }
    }

    /// The same model with `adapter` applied before its final norm (`None` removes it).
    pub fn with_adapter(&self, adapter: Option<ExitAdapter>) -> Result<Self, EngineError> {
        if let Some(a) = &adapter {
            a.check(self.cfg.hidden)?;
            self.refuse_tp("an exit adapter")?;
        }
        Ok(Self {
            adapter: adapter.map(Arc::new),
            ..self.clone()
        })
    }

    pub fn adapter(&self) -> Option<&ExitAdapter> {
        self.adapter.as_deref()
    }

    /// The same model with low-rank adapters on its projections (`None` removes them).
    pub fn with_lora(&self, lora: Option<LoraAdapter>) -> Result<Self, EngineError> {
        if let Some(l) = &lora {
            l.check(&self.weights, self.cfg.layers)?;
            self.refuse_tp("a LoRA adapter")?;
        }
        Ok(Self {
            lora: lora.map(|l| Arc::new(ServedLora::new(l))),
            ..self.clone()
        })
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_deref().map(|l| &l.adapter)
    }

    /// The rows of the LM head as f32, one per logit column (all token ids, or a trimmed head's), and
    /// the final norm's weights: what a trainer needs to backpropagate through the head.
    pub fn head_f32(&self) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        self.refuse_tp("training through the head")?;
        let d = self.cfg.hidden;
        let full = self.full_head();
        let ids: Vec<u32> = match self.logit_ids() {
            Some(ids) => ids.to_vec(),
            None => (0..full.rows() as u32).collect(),
        };
        let mut w = vec![0f32; ids.len() * d];
        for (i, &id) in ids.iter().enumerate() {
            full.dequantize_row(id as usize, &mut w[i * d..(i + 1) * d])?;
        }
        Ok((w, self.weights.norm.clone()))
    }

    /// The residual stream after the last layer, before the adapter and the final norm, for every token
    /// fed (`tokens.len() x hidden`): a trainer's input. Feeds the cache like [`Model::forward`].
    pub fn final_hidden(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        self.refuse_tp("reading final hidden states")?;
        let mut batch = [SeqInput {
            cache,
            tokens,
            wanted: LogitsWanted::None,
        }];
        Ok(rayon::scope(|_| self.run_layers(&mut batch))?.unwrap_or_default())
    }

    /// The same model using only its first `n_layers` layers, then the final norm and LM head: a
    /// self-drafter that shares every weight with this model.
    pub fn truncated(&self, n_layers: usize) -> Result<Self, EngineError> {
        if n_layers == 0 || n_layers > self.weights.layers.len() {
            return Err(EngineError::InvalidRequest(format!(
                "self-drafter layer count {n_layers} must be in 1..={}",
                self.weights.layers.len()
            )));
        }
        let mut cfg = self.cfg.clone();
        cfg.layers = n_layers;
        Ok(Self {
            cfg,
            weights: Arc::clone(&self.weights),
            head: self.head.clone(),
            adapter: self.adapter.clone(),
            lora: self.lora.clone(),
            tp: self.tp.clone(),
        })
    }

    /// The LM head of the file (the embedding when tied).
    fn full_head(&self) -> &QWeight {
        self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed)
    }

    /// The same model computing logits only for token ids below `prefix` and those in `extra_ids`: its
    /// LM head keeps those rows (a copy of them; every other weight is shared). For a drafter, where the
    /// head is a large part of a step (the Qwen 0.5B's is 30% of its weight bytes) and rarely used tokens
    /// are rarely worth drafting; the target verifying the drafts keeps the full vocabulary, so nothing is
    /// lost but the chance to draft the tokens left out. [`Model::logit_ids`] maps logit columns to ids.
    pub fn with_head_prefix(
        &self,
        prefix: usize,
        extra_ids: Vec<u32>,
    ) -> Result<Self, EngineError> {
        self.refuse_tp("a trimmed head")?;
        let full = self.full_head();
        if prefix == 0 || prefix > full.rows() {
            return Err(EngineError::InvalidRequest(format!(
                "a head prefix of {prefix} ids must be in 1..={}",
                full.rows()
            )));
        }
        let rows: Vec<u32> = (0..prefix as u32).collect();
        let prefix = Arc::new(full.select_rows(&rows)?);
        self.with_prefix_and_extra(prefix, extra_ids)
    }

    /// A model with a head prefix ([`Model::with_head_prefix`]) and another set of extra ids, sharing
    /// the prefix rows: cheap enough to make per sequence (only the extra rows are copied). Unchanged
    /// model without a head prefix.
    pub fn with_head_extra(&self, extra_ids: Vec<u32>) -> Result<Self, EngineError> {
        match &self.head {
            Some(h) => self.with_prefix_and_extra(Arc::clone(&h.prefix), extra_ids),
            None => Ok(self.clone()),
        }
    }

    fn with_prefix_and_extra(
        &self,
        prefix: Arc<QWeight>,
        extra_ids: Vec<u32>,
    ) -> Result<Self, EngineError> {
        let n = prefix.rows() as u32;
        if !extra_ids.windows(2).all(|w| w[0] < w[1]) || extra_ids.first().is_some_and(|&f| f < n) {
            return Err(EngineError::InvalidRequest(format!(
                "extra head ids must be strictly ascending and at least {n}"
            )));
        }
        let extra = self.full_head().select_rows(&extra_ids)?;
        let ids = (0..n).chain(extra_ids.iter().copied()).collect();
        Ok(Self {
            cfg: self.cfg.clone(),
            weights: Arc::clone(&self.weights),
            adapter: self.adapter.clone(),
            lora: self.lora.clone(),
            tp: None,
            head: Some(Arc::new(HeadSubset {
                prefix,
                extra,
                extra_ids,
                ids,
            })),
        })
    }

    /// The token id of each logit column when the head is trimmed ([`Model::with_head_prefix`]);
    /// `None` when column i is token i.
    pub fn logit_ids(&self) -> Option<&[u32]> {
        self.head.as_deref().map(|h| h.ids.as_slice())
    }

    /// The size of the trimmed head's prefix and its extra ids, when the head is trimmed.
    pub fn head_prefix(&self) -> Option<(usize, &[u32])> {
        self.head
            .as_deref()
            .map(|h| (h.prefix.rows(), h.extra_ids.as_slice()))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    /// A fresh cache for one sequence on this model (on a tensor-parallel rank: for its KV heads).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.layers, self.cfg.kv_heads, self.cfg.head_dim)
            .tracked(self.tp.as_ref().and_then(|t| t.drop_list()))
    }

    /// Feeds `tokens` to one sequence; returns the wanted logits, row-major `rows x vocab` (`rows x
    /// subset` with a head subset).
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        wanted: LogitsWanted,
    ) -> Result<Vec<f32>, EngineError> {
        let mut out = self.forward_batch(&mut [SeqInput {
            cache,
            tokens,
            wanted,
        }])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Feeds several sequences in one pass; returns, per sequence, its wanted logits row-major. On
    /// rank 0 of a tensor-parallel group the other ranks run the same step on their shards.
    pub fn forward_batch(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        match &self.tp {
            Some(tp) => tp.lead(self, batch),
            // The whole forward on one of the pool's threads: called from any other thread, each of
            // its ~8 parallel steps per layer would be sent to the pool and the caller put to sleep
            // until done (two futex wake-ups per matmul); on a pool thread they are split in place
            // and the other threads steal what they can (AMD EPYC, 2 threads, SmolLM2-135M one row:
            // 12-12.6 ms sent step by step, 5.7-6.8 ms on a pool thread). Not with tensor
            // parallelism: a rank that waits for its peers must not hold a pool thread they need.
            None => rayon::scope(|_| self.forward_local(batch)),
        }
    }

    /// This rank's part of a forward (the whole forward without tensor parallelism).
    pub(crate) fn forward_local(
        &self,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let Some(x) = self.run_layers(batch)? else {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        };
        self.head_rows(batch, &x)
    }

    /// Checks every sequence of a batch (cache shape, context, token ids) before anything is touched,
    /// so a bad input leaves every sequence intact (and a tensor-parallel group in step).
    pub(crate) fn validate(&self, batch: &[SeqInput<'_>]) -> Result<(), EngineError> {
        let cfg = &self.cfg;
        for s in batch.iter() {
            if s.cache.layers() != cfg.layers {
                return Err(EngineError::Internal(format!(
                    "cache made for {} layers used with a {}-layer model",
                    s.cache.layers(),
                    cfg.layers
                )));
            }
            let len = s.cache.len() + s.tokens.len();
            if len > cfg.context {
                return Err(EngineError::ContextOverflow {
                    len,
                    max: cfg.context,
                });
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(EngineError::BadToken {
                    id,
                    vocab: cfg.vocab,
                });
            }
        }
        Ok(())
    }

    /// Embeds every fed token and runs the layers, filling the caches; the residual stream of every
    /// row (`None` when nothing was fed).
    fn run_layers(&self, batch: &mut [SeqInput<'_>]) -> Result<Option<Vec<f32>>, EngineError> {
        let cfg = &self.cfg;
        self.validate(batch)?;
        // Rows: (sequence index, absolute position).
        let rows: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.tokens.len()).map(move |j| (i, s.cache.len() + j)))
            .collect();
        let m = rows.len();
        if m == 0 {
            return Ok(None);
        }
        for s in batch.iter_mut() {
            s.cache.reserve(s.tokens.len());
        }
        let d = cfg.hidden;
        let mut x = vec![0f32; m * d];
        for (r, tok) in batch.iter().flat_map(|s| s.tokens.iter()).enumerate() {
            self.weights
                .embed
                .dequantize_row(*tok as usize, &mut x[r * d..(r + 1) * d])?;
        }
        let rope = RopeRows::new(cfg, rows.iter().map(|&(_, p)| p));
        let mut h = vec![0f32; m * d];
        for (li, layer) in self.weights.layers[..cfg.layers].iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, cfg.rms_eps, &mut h);
            let lora = |p: usize, x: &[f32], y: &mut Vec<f32>| {
                if let Some(l) = &self.lora {
                    l.add(li, p, x, m, y);
                }
            };
            let mut q = layer.wq.matmul(&h, m);
            let mut k = layer.wk.matmul(&h, m);
            let mut v = layer.wv.matmul(&h, m);
            lora(0, &h, &mut q);
            lora(1, &h, &mut k);
            lora(2, &h, &mut v);
            add_bias(&mut q, layer.bq.as_deref());
            add_bias(&mut k, layer.bk.as_deref());
            add_bias(&mut v, layer.bv.as_deref());
            rope.apply(&mut q, cfg.heads, cfg.head_dim, cfg.rope);
            rope.apply(&mut k, cfg.kv_heads, cfg.head_dim, cfg.rope);
            let (kvd, qd) = (cfg.kv_dim(), cfg.q_dim());
            for (r, &(si, _)) in rows.iter().enumerate() {
                batch[si]
                    .cache
                    .push(li, &k[r * kvd..(r + 1) * kvd], &v[r * kvd..(r + 1) * kvd]);
            }
            let attn = attention(cfg, li, &rows, &q, batch, qd);
            let mut o = layer.wo.matmul(&attn, m);
            lora(3, &attn, &mut o);
            if let Some(tp) = &self.tp {
                tp.comm().all_reduce_sum(&mut o)?;
            }
            add_into(&mut x, &o);
            rms_norm_rows(&x, &layer.ffn_norm, cfg.rms_eps, &mut h);
            let mut g = layer.w_gate.matmul(&h, m);
            let mut u = layer.w_up.matmul(&h, m);
            lora(4, &h, &mut g);
            lora(5, &h, &mut u);
            for (gi, ui) in g.iter_mut().zip(u.iter()) {
                *gi = silu(*gi) * ui;
            }
            let mut down = layer.w_down.matmul(&g, m);
            lora(6, &g, &mut down);
            if let Some(tp) = &self.tp {
                tp.comm().all_reduce_sum(&mut down)?;
            }
            add_into(&mut x, &down);
        }
        for s in batch.iter_mut() {
            s.cache.commit(s.tokens.len());
        }
        Ok(Some(x))
    }

    /// Logits of the rows that want them, from the residual stream `x` of every fed row.
    fn head_rows(&self, batch: &[SeqInput<'_>], x: &[f32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.cfg;
        let d = cfg.hidden;
        // Logits only for the rows that want them.
        let mut want_rows = Vec::new();
        let mut start = 0;
        for s in batch.iter() {
            let n = s.tokens.len();
            match s.wanted {
                LogitsWanted::None => {}
                LogitsWanted::Last if n > 0 => want_rows.push(start + n - 1),
                LogitsWanted::Last => {}
                LogitsWanted::All => want_rows.extend(start..start + n),
                LogitsWanted::Tail(t) => want_rows.extend(start + n - t.min(n)..start + n),
            }
            start += n;
        }
        let mut sel = vec![0f32; want_rows.len() * d];
        let mut row = vec![0f32; d];
        for (i, &r) in want_rows.iter().enumerate() {
            row.copy_from_slice(&x[r * d..(r + 1) * d]);
            if let Some(a) = &self.adapter {
                a.apply(&mut row);
            }
            rms_norm(
                &row,
                &self.weights.norm,
                cfg.rms_eps,
                &mut sel[i * d..(i + 1) * d],
            );
        }
        let (logits, vocab) = match (&self.tp, want_rows.len()) {
            (_, 0) => (Vec::new(), 0),
            (Some(tp), w) => {
                // Each rank has a slice of the vocabulary; rank 0 puts the rows back together.
                let local = self.full_head().matmul(&sel, w);
                match tp.comm().gather(&local)? {
                    None => return Ok(batch.iter().map(|_| Vec::new()).collect()),
                    Some(parts) => (interleave_rows(&parts, w), cfg.vocab),
                }
            }
            (None, w) => (self.head_matmul(&sel, w), self.head_columns()),
        };
        let mut out = Vec::with_capacity(batch.len());
        let mut taken = 0;
        for s in batch.iter() {
            let n = match s.wanted {
                LogitsWanted::None => 0,
                LogitsWanted::Last => usize::from(!s.tokens.is_empty()),
                LogitsWanted::All => s.tokens.len(),
                LogitsWanted::Tail(t) => t.min(s.tokens.len()),
            };
            out.push(logits[taken * vocab..(taken + n) * vocab].to_vec());
            taken += n;
        }
        Ok(out)
    }
}

impl Model {
    /// Logit columns of the head: the vocabulary, or a trimmed head's ids.
    pub(crate) fn head_columns(&self) -> usize {
        match &self.head {
            None => self.full_head().rows(),
            Some(h) => h.prefix.rows() + h.extra.rows(),
        }
    }

    /// The head over `w` normed rows (`w x hidden`): `w x head_columns()`, the arithmetic serving runs
    /// (not for a tensor-parallel shard, whose head is a slice).
    pub(crate) fn head_matmul(&self, sel: &[f32], w: usize) -> Vec<f32> {
        match &self.head {
            None => self.full_head().matmul(sel, w),
            Some(h) => {
                let (p, e) = (h.prefix.rows(), h.extra.rows());
                let a = h.prefix.matmul(sel, w);
                let b = if e > 0 {
                    h.extra.matmul(sel, w)
                } else {
                    Vec::new()
                };
                let mut l = Vec::with_capacity(w * (p + e));
                for r in 0..w {
                    l.extend_from_slice(&a[r * p..(r + 1) * p]);
                    l.extend_from_slice(&b[r * e..(r + 1) * e]);
                }
                l
            }
        }
    }
}

/// Rows of logits put back together from each rank's vocabulary slice (`parts[rank]` is `rows x
/// slice`, slices in rank order).
fn interleave_rows(parts: &[Vec<f32>], rows: usize) -> Vec<f32> {
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    for r in 0..rows {
        for p in parts {
            let n = p.len() / rows;
            out.extend_from_slice(&p[r * n..(r + 1) * n]);
        }
    }
    out
}

/// Cosines and sines of every row's position, computed once per forward and shared by all layers
/// (`rows x head_dim / 2` each; the LoRA trainer's graph uses the same tables).
pub(crate) struct RopeRows {
    half: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl RopeRows {
    pub(crate) fn new(cfg: &ModelConfig, positions: impl Iterator<Item = usize>) -> Self {
        let half = cfg.head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every head of every row of `x` (`rows x heads*head_dim`) in place.
    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, style: RopeStyle) {
        let half = self.half;
        for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let (cos, sin) = (
                &self.cos[r * half..(r + 1) * half],
                &self.sin[r * half..(r + 1) * half],
            );
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match style {
                        RopeStyle::Halves => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm(xr, w, eps, or);
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot_f32(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * scale * wv;
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
