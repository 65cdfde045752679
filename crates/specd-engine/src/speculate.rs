//! The single-process speculation loop: prefill, then draft / verify / roll back / adapt, streaming tokens.
//!
//! Each step: the [`SpecLenController`] picks k from measured acceptance and measured costs (k = 0 is a
//! plain decode step); the drafter proposes up to k tokens; the target runs ONE forward over the last
//! emitted token plus the drafts, getting logits at all k+1 positions; acceptance follows the lossless
//! rule (`specd_core::verify`, exact prefix match under greedy); the target's cache is truncated to the
//! accepted length. The emitted tokens are exactly what target-only decoding would produce under greedy
//! (the model's forward is batch-invariant), and follow the target's distribution otherwise.
//!
//! Owns per-step timing and statistics; does not own tokenization or transport.

use std::time::Instant;

use specd_core::{
    verify, verify_greedy, CostModel, Sampler, SamplingParams, SparseDist, SpecLenController,
};

use crate::drafter::{Drafter, DrafterKind, Feedback};
use crate::error::EngineError;
use crate::model::{LogitsWanted, Model};

/// Longest draft the adaptive controller will pick.
pub const DEFAULT_MAX_DRAFT: usize = 8;

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    /// Pins the draft length; `None` adapts it.
    pub draft_len: Option<usize>,
    /// Upper bound of the adaptive draft length.
    pub max_draft_len: usize,
    /// Tokens that end generation (not emitted).
    pub stop_ids: Vec<u32>,
}

impl GenerateOptions {
    pub fn new(max_new_tokens: usize, params: SamplingParams) -> Self {
        Self {
            max_new_tokens,
            params,
            draft_len: None,
            max_draft_len: DEFAULT_MAX_DRAFT,
            stop_ids: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The context is full.
    Context,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// What one generation did.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// `accepted_per_position[i]`: steps whose draft position i was accepted.
    pub accepted_per_position: Vec<u64>,
    pub prefill_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// Wall time from the first decode step to the end.
    pub decode_ms: f64,
    pub finish: Option<FinishReason>,
}

impl GenerationStats {
    /// Fraction of drafted tokens accepted.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Mean tokens emitted per target forward in the decode phase.
    pub fn mean_accepted(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            // The first token comes from the prefill forward.
            (self.generated.saturating_sub(1)) as f64 / self.steps as f64
        }
    }

    /// Decode throughput, tokens per second after the first token.
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_ms <= 0.0 {
            0.0
        } else {
            (self.generated.saturating_sub(1)) as f64 / (self.decode_ms / 1000.0)
        }
    }
}

/// Generates with a target model and an optional drafter, keeping measured costs across calls.
pub struct Generator {
    target: Model,
    drafter: Option<Box<dyn Drafter>>,
    costs: CostModel,
    /// The drafter's measured acceptance and probing state, kept across sequences (what a drafter gets
    /// right on one request it mostly gets right on the next), keyed by its (max k, pinned k).
    controller: Option<((usize, Option<usize>), SpecLenController)>,
}

impl Generator {
    pub fn new(target: Model, drafter: Option<Box<dyn Drafter>>) -> Self {
        Self {
            target,
            drafter,
            costs: CostModel::new(64),
            controller: None,
        }
    }

    pub fn drafter_kind(&self) -> DrafterKind {
        self.drafter
            .as_ref()
            .map_or(DrafterKind::None, |d| d.kind())
    }

    pub fn target(&self) -> &Model {
        &self.target
    }

    /// Generates after `prompt`, calling `on_tokens` with each batch of newly emitted tokens (return false
    /// to stop). Returns all emitted tokens and the statistics.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_tokens: impl FnMut(&[u32]) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats), EngineError> {
        opts.params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("prompt is empty".into()));
        }
        let context = self.target.config().context;
        if prompt.len() >= context {
            return Err(EngineError::ContextOverflow {
                len: prompt.len() + 1,
                max: context,
            });
        }
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..GenerationStats::default()
        };
        let mut out = Vec::new();
        if opts.max_new_tokens == 0 {
            stats.finish = Some(FinishReason::Length);
            return Ok((out, stats));
        }
        let params = &opts.params;
        let mut sampler = Sampler::new(params.seed);
        let max_k = opts.draft_len.unwrap_or(opts.max_draft_len);
        let nominal = CostModel::nominal(DEFAULT_MAX_DRAFT);

        let t0 = Instant::now();
        let mut cache = self.target.new_cache();
        let logits = self
            .target
            .forward(&mut cache, prompt, LogitsWanted::Last)?;
        let first = sample_one(&logits, params, &mut sampler)?;
        if let Some(d) = self.drafter.as_mut() {
            d.begin(prompt)?;
        }
        stats.prefill_ms = ms_since(t0);
        let mut history = prompt.to_vec();
        if opts.stop_ids.contains(&first) {
            stats.finish = Some(FinishReason::Stop);
            return Ok((out, stats));
        }
        history.push(first);
        out.push(first);
        stats.generated = 1;
        if !on_tokens(&[first]) {
            stats.finish = Some(FinishReason::Cancelled);
            return Ok((out, stats));
        }

        // Seeded requests start from a fresh controller, so they do not depend on earlier traffic.
        let key = (max_k, opts.draft_len);
        let mut controller = match self.controller.take() {
            Some((k, c)) if k == key && params.seed.is_none() => c,
            _ => SpecLenController::new(max_k, opts.draft_len),
        };
        let decode_start = Instant::now();
        let vocab = self.target.config().vocab;
        let finish = loop {
            if out.len() >= opts.max_new_tokens {
                break FinishReason::Length;
            }
            // The cache holds every history token but the last; this step feeds the last plus drafts.
            if history.len() >= context {
                break FinishReason::Context;
            }
            // Drafts plus the correction/bonus token must fit: the sequence may reach `context` tokens.
            let room = (opts.max_new_tokens - out.len() - 1).min(context - history.len() - 1);
            // A seeded request must be reproducible, so its draft lengths may not depend on timings: it
            // plans with nominal costs instead of measured ones.
            let costs = if params.seed.is_some() {
                &nominal
            } else {
                &self.costs
            };
            let want = match self.drafter.as_mut() {
                // A free drafter is asked every step for as much as the budget allows and limits itself by
                // the measured cost of a verified position.
                Some(d) if d.is_free() => {
                    d.set_step_costs(&costs.relative_verify_costs(max_k, 0.0));
                    opts.draft_len.unwrap_or(max_k).min(room)
                }
                Some(_) => controller.choose(costs).min(room),
                None => 0,
            };
            // A model drafter first feeds what it missed while speculation was off; that catch-up is
            // draft time for the stats but not a per-token draft cost for the controller (a catch-up
            // over 30 idle tokens counted per drafted token made drafting look several times dearer
            // than it is, and the adaptive length then kept it off).
            if want > 0 {
                if let Some(d) = self.drafter.as_mut() {
                    let t = Instant::now();
                    d.catch_up(&history)?;
                    stats.draft_ms += ms_since(t);
                }
            }
            let t_draft = Instant::now();
            let proposal = match (self.drafter.as_mut(), want) {
                (Some(d), k) if k > 0 => d.propose(&history, k, params, &mut sampler)?,
                _ => Default::default(),
            };
            let mut k = proposal.tokens.len().min(want);
            if !params.is_greedy() && proposal.q.len() < k {
                // A drafter bug: a sampled draft must come with the distribution it was drawn from.
                // Verifying without it is impossible, failing the request is not an option: this
                // step decodes plainly.
                tracing::warn!(
                    drafter = self.drafter_kind().name(),
                    tokens = k,
                    distributions = proposal.q.len(),
                    "drafter proposed tokens without their distributions; ignoring the proposal"
                );
                k = 0;
            }
            if want > 0 {
                let ms = ms_since(t_draft);
                stats.draft_ms += ms;
                if k > 0 {
                    self.costs.record_draft(k, ms);
                }
            }
            let mut inputs = Vec::with_capacity(k + 1);
            inputs.push(history[history.len() - 1]);
            inputs.extend_from_slice(&proposal.tokens[..k]);

            let t_verify = Instant::now();
            let base = cache.len();
            let logits = self
                .target
                .forward(&mut cache, &inputs, LogitsWanted::All)?;
            let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
            let verdict = if params.is_greedy() {
                let argmax: Vec<u32> = rows.iter().map(|r| specd_core::argmax(r)).collect();
                verify_greedy(&proposal.tokens[..k], &argmax)?
            } else {
                let p = rows
                    .iter()
                    .map(|r| SparseDist::from_logits(r, params))
                    .collect::<Result<Vec<_>, _>>()?;
                verify(&proposal.tokens[..k], &proposal.q[..k], &p, &mut sampler)?
            };
            cache.truncate(base + 1 + verdict.accepted);
            let ms = ms_since(t_verify);
            stats.verify_ms += ms;
            self.costs.record_verify(k, ms);

            if let Some(d) = self.drafter.as_mut() {
                let width = d.feedback_width();
                if width > 0 {
                    let used = verdict.accepted + 1;
                    let top: Vec<Vec<u32>> =
                        rows[..used].iter().map(|r| top_ids(r, width)).collect();
                    d.observe(&Feedback {
                        inputs: &inputs[..used],
                        target_top: &top,
                    });
                }
            }
            if k > 0 {
                controller.record(k, verdict.accepted);
                stats.drafted += k;
                stats.accepted += verdict.accepted;
                if stats.accepted_per_position.len() < k {
                    stats.accepted_per_position.resize(k, 0);
                }
                for slot in &mut stats.accepted_per_position[..verdict.accepted] {
                    *slot += 1;
                }
            }
            stats.steps += 1;

            tracing::trace!(
                step = stats.steps,
                want,
                drafted = k,
                accepted = verdict.accepted,
                verify_ms = ms,
                "speculation step"
            );
            let mut emitted = verdict.emitted(&proposal.tokens);
            emitted.truncate(opts.max_new_tokens - out.len());
            let stop_at = emitted.iter().position(|t| opts.stop_ids.contains(t));
            if let Some(i) = stop_at {
                emitted.truncate(i);
            }
            history.extend_from_slice(&emitted);
            out.extend_from_slice(&emitted);
            stats.generated = out.len();
            let go_on = emitted.is_empty() || on_tokens(&emitted);
            if stop_at.is_some() {
                break FinishReason::Stop;
            }
            if !go_on {
                break FinishReason::Cancelled;
            }
        };
        stats.decode_ms = ms_since(decode_start);
        if params.seed.is_none() {
            self.controller = Some((key, controller));
        }
        stats.finish = Some(finish);
        Ok((out, stats))
    }
}

fn sample_one(
    logits: &[f32],
    params: &SamplingParams,
    sampler: &mut Sampler,
) -> Result<u32, EngineError> {
    if params.is_greedy() {
        return Ok(specd_core::argmax(logits));
    }
    let d = SparseDist::from_logits(logits, params)?;
    Ok(sampler.sample(&d))
}

/// The `n` highest logits' ids, best first (ties to the lower id).
pub fn top_ids(logits: &[f32], n: usize) -> Vec<u32> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &v) in logits.iter().enumerate() {
        if best.len() < n || v > best[best.len() - 1].0 {
            let pos = best.partition_point(|&(b, _)| b >= v);
            best.insert(pos, (v, i as u32));
            best.truncate(n);
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafter::Proposal;

    /// Proposes its tokens but forgets their distributions.
    struct Forgetful;

    impl Drafter for Forgetful {
        fn kind(&self) -> DrafterKind {
            DrafterKind::Ngram
        }
        fn begin(&mut self, _prompt: &[u32]) -> Result<(), EngineError> {
            Ok(())
        }
        fn propose(
            &mut self,
            _history: &[u32],
            k: usize,
            _params: &SamplingParams,
            _sampler: &mut Sampler,
        ) -> Result<Proposal, EngineError> {
            Ok(Proposal {
                tokens: vec![1; k],
                q: Vec::new(),
            })
        }
        fn is_free(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_drafter_without_distributions_costs_no_panic_and_no_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        crate::testing::write_tiny_model(
            &path,
            &crate::testing::TinySpec::new(crate::Family::Qwen2, 2),
        )
        .expect("write");
        let model = crate::load_gguf(&path).expect("load").model;
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..SamplingParams::greedy()
        };
        let mut g = Generator::new(model, Some(Box::new(Forgetful)));
        let mut opts = GenerateOptions::new(12, params);
        opts.draft_len = Some(4);
        let (out, stats) = g.generate(&[5, 6, 7], &opts, |_| true).expect("generates");
        assert_eq!(out.len(), 12);
        assert_eq!(stats.accepted, 0, "nothing unverifiable was accepted");
    }

    #[test]
    fn top_ids_orders_and_breaks_ties_low() {
        assert_eq!(top_ids(&[0.1, 0.5, 0.5, 0.3, 0.9], 3), vec![4, 1, 2]);
        assert_eq!(top_ids(&[1.0], 3), vec![0]);
    }
}
