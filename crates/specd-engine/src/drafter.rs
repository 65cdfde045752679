//! Drafters: whatever proposes the next k tokens for the target to verify, behind one trait.
//!
//! Kinds:
//! - [`ModelDrafter`] over a separate draft model (Qwen2.5-0.5B for the 1.5B target) or over a
//!   self-drafter: the target's own first N layers plus its final norm and LM head (`Model::truncated`).
//! - [`NgramDrafter`], model-free and nearly free: prompt lookup (the continuation of the latest earlier
//!   occurrence of the context's suffix n-gram) and token recycling (an adjacency table of the target's
//!   own top candidates after each token, refreshed from every verify; Token Recycling, Luo et al.), and an
//!   aligned copy that survives edits (`Align`): what makes edit-shaped code requests fast.
//!
//! A drafter keeps its own per-sequence state in sync with the token history it is handed, so the caller
//! never has to replay rollbacks into it: it finds the common prefix with what it has seen and rolls back
//! itself. Draft distributions are sparse ([`SparseDist`]): the support the drafter actually sampled from,
//! so a proposal can cross a network. Deterministic drafters propose with one-hot distributions.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use specd_core::{Sampler, SamplingParams, SparseDist};

use crate::error::EngineError;
use crate::kv::KvCache;
use crate::model::{LogitsWanted, Model};

/// Drafter kinds as named on the command line and in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DrafterKind {
    /// No speculation: plain target decoding.
    None,
    /// A separate draft model.
    Model,
    /// The target's own first layers.
    SelfLayers,
    /// Prompt lookup plus token recycling, no model.
    Ngram,
    /// Chosen by the engine: the model-free drafter with the adaptive length, which falls to plain
    /// decoding where speculation does not pay.
    Auto,
}

impl DrafterKind {
    pub fn name(self) -> &'static str {
        match self {
            DrafterKind::None => "none",
            DrafterKind::Model => "model",
            DrafterKind::SelfLayers => "self",
            DrafterKind::Ngram => "ngram",
            DrafterKind::Auto => "auto",
        }
    }
}

impl FromStr for DrafterKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => DrafterKind::None,
            "model" => DrafterKind::Model,
            "self" => DrafterKind::SelfLayers,
            "ngram" => DrafterKind::Ngram,
            "auto" | "" => DrafterKind::Auto,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "unknown drafter {other:?} (none, model, self, ngram, auto)"
                )))
            }
        })
    }
}

/// Draft tokens and the distributions they were drawn from (`q.len() == tokens.len()`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    pub q: Vec<SparseDist>,
}

/// What the verifier saw at each verified position, for drafters that learn from it.
#[derive(Clone, Debug)]
pub struct Feedback<'a> {
    /// The tokens fed to the target in the verify step (the last accepted token, then the drafts).
    pub inputs: &'a [u32],
    /// For each input, the target's top candidates for the token that follows it, best first.
    pub target_top: &'a [Vec<u32>],
}

/// Proposes draft tokens for one sequence.
pub trait Drafter: Send {
    fn kind(&self) -> DrafterKind;

    /// Prepares for a new sequence with this prompt (a model drafter prefills here).
    fn begin(&mut self, prompt: &[u32]) -> Result<(), EngineError>;

    /// Brings the drafter's own state up to all of `history` but its last token, ahead of a proposal: a
    /// model drafter feeds the tokens it missed while speculation was off. Separate from
    /// [`Drafter::propose`] so that the caller can time drafting apart from this catch-up, whose cost
    /// depends on how long the drafter sat idle, not on how many tokens it drafts.
    fn catch_up(&mut self, _history: &[u32]) -> Result<(), EngineError> {
        Ok(())
    }

    /// Proposes up to `k` tokens continuing `history` (prompt plus every token emitted so far). May return
    /// fewer, or none when it has nothing worth proposing.
    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        params: &SamplingParams,
        sampler: &mut Sampler,
    ) -> Result<Proposal, EngineError>;

    /// How many target candidates per position [`Drafter::observe`] wants (0: no feedback).
    fn feedback_width(&self) -> usize {
        0
    }

    /// Learns from a verify step.
    fn observe(&mut self, _feedback: &Feedback<'_>) {}

    /// Whether proposing costs next to nothing, so the drafter should be asked every step and left to
    /// limit its own proposals (the n-gram drafter), instead of being switched off by the controller.
    fn is_free(&self) -> bool {
        false
    }

    /// The measured cost of a verify step of k drafts, for k = 0.., as a multiple of a plain decode step
    /// (`costs[0] == 1`).
    fn set_step_costs(&mut self, _costs: &[f64]) {}
}

/// A drafter running a decoder: a separate draft model or a self-drafter.
///
/// With a trimmed LM head (`preset::trim_draft_head`) it widens the head per sequence to every token the
/// sequence has shown beyond the head's prefix (prompt and output): a rare identifier in the code being
/// edited, or one that recurs in the answer, stays draftable for the cost of a few extra head rows.
pub struct ModelDrafter {
    kind: DrafterKind,
    /// As built, with the head's base extra ids (the stop tokens).
    base: Model,
    /// `base` with this sequence's extra head rows.
    model: Model,
    cache: KvCache,
    /// Tokens whose keys and values are in `cache`.
    fed: Vec<u32>,
}

/// At most this many extra head rows per sequence (a long prompt of rare tokens must not rebuild the
/// whole head).
const MAX_EXTRA_HEAD_IDS: usize = 4096;

/// Most tokens in the support a model drafter samples from when sampling (temperature > 0): its
/// distribution is cut to its `DRAFT_SUPPORT` most likely tokens (or the request's own top-k, if
/// smaller) and renormalized, and that truncated distribution is both what it samples from and the q
/// it reports. Verification stays exact (the rejection rule holds for any q the drafts were really
/// drawn from) and a proposal stays small on the wire: a full 32K-152K-entry q per drafted token was
/// 0.2-1.2 MB. The tail it drops holds little mass, so acceptance barely moves.
pub const DRAFT_SUPPORT: usize = 64;

impl ModelDrafter {
    pub fn new(kind: DrafterKind, model: Model) -> Self {
        let cache = model.new_cache();
        Self {
            kind,
            base: model.clone(),
            model,
            cache,
            fed: Vec::new(),
        }
    }

    /// Makes every token of `tokens` draftable (a trimmed head gets rows for those it lacks).
    fn widen_head(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        let Some((prefix, extra)) = self.model.head_prefix() else {
            return Ok(());
        };
        let mut missing: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|&t| t as usize >= prefix && extra.binary_search(&t).is_err())
            .collect();
        if missing.is_empty() || extra.len() >= MAX_EXTRA_HEAD_IDS {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        missing.truncate(MAX_EXTRA_HEAD_IDS - extra.len());
        missing.extend_from_slice(extra);
        missing.sort_unstable();
        self.model = self.model.with_head_extra(missing)?;
        Ok(())
    }

    /// How many leading tokens of `history` are already in the cache.
    fn common_prefix(&self, history: &[u32]) -> usize {
        self.fed
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Feeds `history[keep..]` after rolling back to the longest prefix shared with what was fed; returns
    /// the logits after the last token (none with `LogitsWanted::None`).
    fn sync(&mut self, history: &[u32], wanted: LogitsWanted) -> Result<Vec<f32>, EngineError> {
        let common = self.common_prefix(history);
        // At least the last token must be fed to get logits after it.
        let keep = common.min(history.len().saturating_sub(1));
        self.widen_head(&history[keep..])?;
        self.cache.truncate(keep);
        self.fed.truncate(keep);
        let logits = self
            .model
            .forward(&mut self.cache, &history[keep..], wanted)?;
        self.fed.extend_from_slice(&history[keep..]);
        Ok(logits)
    }
}

impl Drafter for ModelDrafter {
    fn kind(&self) -> DrafterKind {
        self.kind
    }

    fn begin(&mut self, prompt: &[u32]) -> Result<(), EngineError> {
        self.cache.truncate(0);
        self.fed.clear();
        self.model = self.base.clone();
        self.widen_head(prompt)?;
        // A prompt beyond the draft model's context is decoded without drafts (`propose` returns none).
        if prompt.len() > 1 && prompt.len() < self.model.config().context {
            // Prefill all but the last prompt token; the first proposal feeds that one.
            let n = prompt.len() - 1;
            self.model
                .forward(&mut self.cache, &prompt[..n], LogitsWanted::None)?;
            self.fed.extend_from_slice(&prompt[..n]);
        }
        Ok(())
    }

    fn catch_up(&mut self, history: &[u32]) -> Result<(), EngineError> {
        // The same bound as `propose`'s: a history the model cannot hold is not fed.
        if history.len() >= self.model.config().context {
            return Ok(());
        }
        let upto = history.len().saturating_sub(1);
        let common = self.common_prefix(history);
        // A token or two behind is the normal state after a verify: `propose` feeds them in its first
        // forward, with the last token, at no extra pass.
        if upto >= common + 2 {
            self.sync(&history[..upto], LogitsWanted::None)?;
        }
        Ok(())
    }

    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        params: &SamplingParams,
        sampler: &mut Sampler,
    ) -> Result<Proposal, EngineError> {
        let mut out = Proposal::default();
        if k == 0 || history.is_empty() || history.len() + k > self.model.config().context {
            return Ok(out);
        }
        let mut logits = self.sync(history, LogitsWanted::Last)?;
        let params = draft_params(params);
        loop {
            let mut q = SparseDist::from_logits(&logits, &params)?;
            if let Some(ids) = self.model.logit_ids() {
                q = q.map_ids(ids)?;
            }
            let t = sampler.sample(&q);
            out.tokens.push(t);
            out.q.push(q);
            if out.tokens.len() == k {
                break;
            }
            logits = self
                .model
                .forward(&mut self.cache, &[t], LogitsWanted::Last)?;
            self.fed.push(t);
        }
        Ok(out)
    }
}

/// A model drafter's sampling parameters for a request's: the same, with the support cut to at most
/// [`DRAFT_SUPPORT`] tokens.
pub fn draft_params(params: &SamplingParams) -> SamplingParams {
    let mut p = params.clone();
    if p.top_k == 0 || p.top_k > DRAFT_SUPPORT {
        p.top_k = DRAFT_SUPPORT;
    }
    p
}

/// Bounds of the n-gram drafter.
#[derive(Clone, Copy, Debug)]
pub struct NgramConfig {
    /// Longest suffix n-gram looked up in the history.
    pub max_n: usize,
    /// Shortest n-gram accepted as a prompt-lookup match.
    pub min_n: usize,
    /// Candidates kept per token in the recycling table.
    pub width: usize,
    /// Most tokens the recycling table holds entries for (bounds memory: about 40 bytes per entry).
    pub max_entries: usize,
}

impl Default for NgramConfig {
    fn default() -> Self {
        Self {
            max_n: 8,
            min_n: 1,
            width: 4,
            max_entries: 65_536,
        }
    }
}

/// Where a drafted token came from; each source has its own measured acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Prompt lookup with a suffix match of 6 or more tokens (the model is copying).
    LookupCopy = 0,
    /// Prompt lookup with a 3 to 5 token match.
    LookupLong = 1,
    /// Prompt lookup with a 2-token match.
    LookupPair = 2,
    /// Prompt lookup with a 1-token match.
    LookupOne = 3,
    /// Token recycling.
    Recycle = 4,
    /// An aligned copy that is going on (see [`Align`]).
    Anchor = 5,
    /// The source right after the token the output just replaced: a one-token substitution.
    Resume = 6,
    /// The source from the token the output diverged at: text was inserted before it.
    Insert = 7,
}

const SOURCES: usize = 8;

/// Prior acceptance per source of the first token it drafts in a proposal, and of each further token
/// once the ones before were accepted (a copy that has started tends to go on).
const FIRST_PRIOR: [f64; SOURCES] = [0.8, 0.6, 0.45, 0.2, 0.3, 0.8, 0.35, 0.2];
const CONTINUE_PRIOR: [f64; SOURCES] = [0.9, 0.8, 0.7, 0.6, 0.4, 0.9, 0.85, 0.85];
/// Shortest prompt-lookup match that starts an aligned copy.
const ANCHOR_MIN_MATCH: usize = 4;
/// How far past the divergence point an edited copy looks for the output's token to realign.
const REALIGN_WINDOW: usize = 8;
/// Output tokens after a divergence without realigning before the copy is given up.
const MAX_EDIT: usize = 24;
/// Tokens a copy must have run verbatim before a divergence is treated as an edit of it: a few echoed
/// words of prose diverge too, and guessing where they resume only costs rows.
const EDIT_MIN_RUN: usize = 12;

/// Where the output is copying from, for edit-shaped traffic (rename this, add types to that, show the
/// whole result): the output is the source with local edits, so after an edit the best draft is the
/// source just past it, which a suffix lookup cannot find (the edited text occurs nowhere earlier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    /// Not copying.
    None,
    /// The next output token is expected to be `history[at]`, after `run` tokens copied (or the copy
    /// was realigned after an edit).
    Copying { at: usize, run: usize },
    /// The output left the source at `history[base]` `since` tokens ago.
    Editing { base: usize, since: usize },
}

/// Assumed cost of one more verified position, in decode steps, until costs are measured.
const DEFAULT_ROW_COST: f64 = 0.3;
/// Relative gain over plain decoding a draft must promise before it is proposed.
const DRAFT_MARGIN: f64 = 0.05;
/// The margin of the `auto` drafter.
const AUTO_MARGIN: f64 = 0.15;
/// Per-proposal pull of every source's estimate back toward its prior.
const SOURCE_DECAY: f64 = 0.01;
/// Weight of the newest observation in a source's acceptance average.
const SOURCE_EMA: f64 = 0.1;

/// Model-free drafter: prompt lookup first, token recycling to fill the rest. It limits itself: a token is
/// proposed only while the estimated probability that it and every token before it are accepted stays
/// above the measured cost of one more verified position relative to a decode step, so a poor match costs
/// nothing and a good one is used in full.
pub struct NgramDrafter {
    kind: DrafterKind,
    cfg: NgramConfig,
    /// What it has learned, possibly shared with the other sequences of a drafter worker.
    learned: SharedNgram,
    /// Source of each token of the last proposal and whether it continued its source's run.
    pending: Vec<(Source, bool)>,
    /// Cost of a verify step with k drafts as a multiple of a decode step (index k).
    step_costs: Vec<f64>,
    /// Relative gain over plain decoding a draft must promise.
    margin: f64,
    /// The copy the output is following, and how much of the history it has been updated with.
    align: Align,
    seen: usize,
}

/// A candidate draft of the n-gram drafter.
#[derive(Default)]
struct Chain {
    tokens: Vec<u32>,
    /// Source of each token and whether it continues its source's run.
    tagged: Vec<(Source, bool)>,
    /// Tokens worth proposing.
    keep: usize,
    /// Expected tokens per unit of verify cost of the kept prefix (1 + margin when none is kept).
    gain: f64,
}

/// What the n-gram drafter learns from the target: the recycling table and the measured acceptance per
/// source. A drafter worker shares one between all its sequences (what the target predicted on one
/// request is what makes the table useful on the next), behind a mutex held for microseconds.
#[derive(Clone, Debug, Default)]
pub struct SharedNgram(Arc<Mutex<Learned>>);

#[derive(Debug)]
struct Learned {
    /// token -> the target's latest top candidates after it, best first.
    table: HashMap<u32, Vec<u32>>,
    /// Measured acceptance per [`Source`] of a first token and of a continuation token.
    first: [f64; SOURCES],
    cont: [f64; SOURCES],
}

impl Default for Learned {
    fn default() -> Self {
        Self {
            table: HashMap::new(),
            first: FIRST_PRIOR,
            cont: CONTINUE_PRIOR,
        }
    }
}

impl SharedNgram {
    fn lock(&self) -> MutexGuard<'_, Learned> {
        // The state is plain numbers and a table, valid after any panic elsewhere: use it as it is.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries in the recycling table.
    pub fn table_len(&self) -> usize {
        self.lock().table.len()
    }
}

impl NgramDrafter {
    pub fn new(cfg: NgramConfig) -> Self {
        Self::with_shared(cfg, SharedNgram::default())
    }

    /// A drafter for one sequence that learns into (and from) `learned`.
    pub fn with_shared(cfg: NgramConfig, learned: SharedNgram) -> Self {
        Self {
            kind: DrafterKind::Ngram,
            cfg,
            learned,
            pending: Vec::new(),
            step_costs: Vec::new(),
            margin: DRAFT_MARGIN,
            align: Align::None,
            seen: 0,
        }
    }

    /// Reports itself as `kind`. The engine's `auto` choice is this drafter with a wider margin: it drafts
    /// only where it expects to beat plain decoding clearly, so it never costs noticeably.
    pub fn set_kind(&mut self, kind: DrafterKind) {
        self.kind = kind;
        self.margin = if kind == DrafterKind::Auto {
            AUTO_MARGIN
        } else {
            DRAFT_MARGIN
        };
    }

    /// Where the continuation of the latest earlier occurrence of the longest matching suffix n-gram
    /// starts, and the match length (`(len, 0)` when nothing matches).
    fn lookup_at(&self, history: &[u32]) -> (usize, usize) {
        let len = history.len();
        for n in (self.cfg.min_n..=self.cfg.max_n.min(len.saturating_sub(1))).rev() {
            let suffix = &history[len - n..];
            // Latest occurrence that ends before the suffix itself.
            if let Some(s) = (0..len - n).rev().find(|&s| &history[s..s + n] == suffix) {
                return (s + n, n);
            }
        }
        (len, 0)
    }

    /// Up to `k` tokens copied from `history[from..]` as `source`, then filled by recycling, and the prefix
    /// with the best expected tokens per unit of verify cost: a draft of j tokens yields 1 + the sum of
    /// P(first i accepted) tokens and costs `step_costs[j]` decode steps. A draft must beat plain decoding
    /// by a margin that covers what the cost curve does not see (feedback bookkeeping, measurement
    /// noise).
    fn chain(
        &self,
        learned: &Learned,
        history: &[u32],
        from: usize,
        source: Source,
        k: usize,
    ) -> Chain {
        let mut tokens = history[from..(from + k).min(history.len())].to_vec();
        let mut sources = vec![source; tokens.len()];
        let mut last = *tokens.last().unwrap_or(&history[history.len() - 1]);
        while tokens.len() < k {
            match learned.table.get(&last).and_then(|c| c.first()) {
                Some(&next) => {
                    tokens.push(next);
                    sources.push(Source::Recycle);
                    last = next;
                }
                None => break,
            }
        }
        let tagged: Vec<(Source, bool)> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i > 0 && sources[i - 1] == *s))
            .collect();
        let (mut p, mut expected, mut keep, mut gain) = (1.0, 1.0, 0, 1.0 + self.margin);
        for (j, (s, continues)) in tagged.iter().enumerate() {
            p *= if *continues {
                learned.cont[*s as usize]
            } else {
                learned.first[*s as usize]
            };
            expected += p;
            let cost = self
                .step_costs
                .get(j + 1)
                .copied()
                .unwrap_or(1.0 + DEFAULT_ROW_COST * (j + 1) as f64);
            if expected / cost > gain {
                gain = expected / cost;
                keep = j + 1;
            }
        }
        Chain {
            tokens,
            tagged,
            keep,
            gain,
        }
    }

    /// Brings the copy alignment up to date with the tokens appended since the last call.
    fn follow(&mut self, history: &[u32]) {
        if history.len() < self.seen {
            // Rolled back past what was followed: start over.
            self.align = Align::None;
            self.seen = history.len();
            return;
        }
        // The first position of `x` in the source window `[from, from + REALIGN_WINDOW)` before `i`.
        let realign = |from: usize, i: usize, x: u32| {
            (from..(from + REALIGN_WINDOW).min(i))
                .find(|&j| history[j] == x)
                .map(|j| j + 1)
        };
        for (i, &x) in history.iter().enumerate().skip(self.seen) {
            self.align = match self.align {
                Align::Copying { at, .. } if at >= i => Align::None,
                Align::Copying { at, run } if history[at] == x => Align::Copying {
                    at: at + 1,
                    run: run + 1,
                },
                // A short echo diverging is not an edit.
                Align::Copying { run, .. } if run < EDIT_MIN_RUN => Align::None,
                // Skipped source tokens (a deletion), else an edit starts here.
                Align::Copying { at, .. } => match realign(at + 1, i, x) {
                    Some(j) => Align::Copying {
                        at: j,
                        run: EDIT_MIN_RUN,
                    },
                    None => Align::Editing { base: at, since: 1 },
                },
                Align::Editing { base, since } => match realign(base, i, x) {
                    Some(j) => Align::Copying {
                        at: j,
                        run: EDIT_MIN_RUN,
                    },
                    None if since < MAX_EDIT => Align::Editing {
                        base,
                        since: since + 1,
                    },
                    None => Align::None,
                },
                Align::None => Align::None,
            };
        }
        self.seen = history.len();
    }

    /// The source position an aligned copy drafts from, and as which source.
    fn anchor(&self, len: usize) -> Option<(usize, Source)> {
        let (at, source) = match self.align {
            Align::None => return None,
            Align::Copying { at, .. } => (at, Source::Anchor),
            Align::Editing { base, since: 1 } => (base + 1, Source::Resume),
            Align::Editing { base, .. } => (base, Source::Insert),
        };
        (at < len).then_some((at, source))
    }
}

impl Learned {
    fn record(&mut self, cfg: &NgramConfig, token: u32, candidates: &[u32]) {
        if candidates.is_empty() {
            return;
        }
        if self.table.len() >= cfg.max_entries && !self.table.contains_key(&token) {
            // Bounded memory: forget everything rather than grow; the table refills within a few steps.
            self.table.clear();
        }
        let w = cfg.width.min(candidates.len());
        self.table.insert(token, candidates[..w].to_vec());
    }
}

impl Drafter for NgramDrafter {
    fn kind(&self) -> DrafterKind {
        self.kind
    }

    fn begin(&mut self, prompt: &[u32]) -> Result<(), EngineError> {
        // Seed the recycling table with the prompt's own bigrams (the table persists across sequences:
        // candidates recycled from earlier requests are what makes it useful on a query stream).
        let mut learned = self.learned.lock();
        for w in prompt.windows(2) {
            learned.table.entry(w[0]).or_insert_with(|| vec![w[1]]);
        }
        drop(learned);
        self.pending.clear();
        self.align = Align::None;
        self.seen = prompt.len();
        Ok(())
    }

    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        _params: &SamplingParams,
        _sampler: &mut Sampler,
    ) -> Result<Proposal, EngineError> {
        self.pending.clear();
        if k == 0 || history.is_empty() {
            return Ok(Proposal::default());
        }
        self.follow(history);
        let (from, n) = self.lookup_at(history);
        let lookup_source = match n {
            0 => Source::Recycle,
            1 => Source::LookupOne,
            2 => Source::LookupPair,
            3..=5 => Source::LookupLong,
            _ => Source::LookupCopy,
        };
        let anchored = self.anchor(history.len());
        if n >= ANCHOR_MIN_MATCH && !matches!(self.align, Align::Copying { .. }) {
            // A long enough match starts (or re-finds) an aligned copy that survives the edits to come.
            self.align = Align::Copying { at: from, run: n };
        }
        let mut learned = self.learned.lock();
        // Estimates drift back toward the priors while unused, so a source that was switched off is
        // tried again now and then instead of never.
        for (a, prior) in learned.first.iter_mut().zip(FIRST_PRIOR) {
            *a += SOURCE_DECAY * (prior - *a);
        }
        for (a, prior) in learned.cont.iter_mut().zip(CONTINUE_PRIOR) {
            *a += SOURCE_DECAY * (prior - *a);
        }
        // The aligned copy and the suffix lookup each make a chain; the one promising more per unit of
        // verify cost is proposed.
        let mut best: Option<Chain> = None;
        for (from, source) in anchored.into_iter().chain([(from, lookup_source)]) {
            let chain = self.chain(&learned, history, from, source, k);
            if best.as_ref().is_none_or(|b| chain.gain > b.gain) {
                best = Some(chain);
            }
        }
        drop(learned);
        let Chain {
            mut tokens,
            mut tagged,
            keep,
            ..
        } = best.unwrap_or_default();
        tracing::trace!(
            matched = n,
            source = ?tagged.first().map(|t| t.0),
            found = tokens.len(),
            keep,
            "n-gram proposal"
        );
        tokens.truncate(keep);
        tagged.truncate(keep);
        self.pending = tagged;
        let q = tokens.iter().map(|&t| SparseDist::one_hot(t)).collect();
        Ok(Proposal { tokens, q })
    }

    fn feedback_width(&self) -> usize {
        self.cfg.width
    }

    fn is_free(&self) -> bool {
        true
    }

    fn set_step_costs(&mut self, costs: &[f64]) {
        self.step_costs.clear();
        self.step_costs.extend_from_slice(costs);
    }

    fn observe(&mut self, feedback: &Feedback<'_>) {
        // inputs = [last token, accepted drafts...]: the first `inputs.len() - 1` proposed tokens were
        // accepted and the next one (if any) was rejected; later ones were never tested.
        let accepted = feedback.inputs.len().saturating_sub(1);
        let mut learned = self.learned.lock();
        for (i, (s, continues)) in self.pending.iter().enumerate() {
            if i > accepted {
                break;
            }
            let hit = if i < accepted { 1.0 } else { 0.0 };
            let a = if *continues {
                &mut learned.cont[*s as usize]
            } else {
                &mut learned.first[*s as usize]
            };
            *a += SOURCE_EMA * (hit - *a);
        }
        self.pending.clear();
        for (&tok, top) in feedback.inputs.iter().zip(feedback.target_top) {
            learned.record(&self.cfg, tok, top);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Family;
    use crate::load::load_gguf;
    use crate::testing::{write_tiny_model, TinySpec};

    fn tiny_model() -> Model {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::new(Family::Qwen2, 7)).expect("write");
        load_gguf(&path).expect("load").model
    }

    #[test]
    fn trimmed_head_logits_are_the_full_heads_columns() {
        let full = tiny_model();
        let vocab = full.config().vocab;
        let trimmed = full
            .with_head_prefix(vocab / 2, vec![vocab as u32 - 3, vocab as u32 - 1])
            .expect("trim");
        let ids = trimmed.logit_ids().expect("trimmed").to_vec();
        assert_eq!(ids.len(), vocab / 2 + 2);
        let tokens = [5u32, 9, 17, 3];
        let a = full
            .forward(&mut full.new_cache(), &tokens, LogitsWanted::All)
            .expect("full");
        let b = trimmed
            .forward(&mut trimmed.new_cache(), &tokens, LogitsWanted::All)
            .expect("trimmed");
        assert_eq!(b.len(), tokens.len() * ids.len());
        for r in 0..tokens.len() {
            for (c, &id) in ids.iter().enumerate() {
                let (x, y) = (a[r * vocab + id as usize], b[r * ids.len() + c]);
                assert_eq!(x.to_bits(), y.to_bits(), "row {r} id {id}");
            }
        }
        // Widening shares the prefix and replaces the extra ids.
        let wide = trimmed
            .with_head_extra(vec![vocab as u32 - 2])
            .expect("widen");
        assert_eq!(wide.head_prefix().expect("trimmed").1, &[vocab as u32 - 2]);
        assert!(full.with_head_prefix(0, vec![]).is_err());
        assert!(
            full.with_head_prefix(8, vec![3]).is_err(),
            "extra id inside the prefix"
        );
        assert!(
            full.with_head_prefix(8, vec![20, 10]).is_err(),
            "not ascending"
        );
    }

    #[test]
    fn a_trimmed_drafter_drafts_from_its_prefix_and_the_tokens_its_sequence_showed() {
        let full = tiny_model();
        let greedy = SamplingParams::greedy();
        let mut sampler = Sampler::new(Some(1));
        // A head of id 0 only: every other draftable id must come from the sequence.
        let mut d = ModelDrafter::new(
            DrafterKind::Model,
            full.with_head_prefix(1, vec![]).expect("trim"),
        );
        let prompt: Vec<u32> = vec![7, 11, 13, 2, 5, 11];
        d.begin(&prompt).expect("begin");
        let mut history = prompt.clone();
        for step in 0..4 {
            let logits = full
                .forward(&mut full.new_cache(), &history, LogitsWanted::Last)
                .expect("forward");
            let allowed = |t: &u32| *t == 0 || history.contains(t);
            let want = (0..logits.len() as u32)
                .filter(allowed)
                .max_by(|&a, &b| {
                    logits[a as usize]
                        .total_cmp(&logits[b as usize])
                        .then(b.cmp(&a))
                })
                .expect("some id");
            let p = d
                .propose(&history, 1, &greedy, &mut sampler)
                .expect("propose");
            assert_eq!(p.tokens, vec![want], "step {step}");
            // The sequence goes on with a token the head did not have: it becomes draftable.
            history.push(40 + step);
        }
    }

    #[test]
    fn sampled_drafts_come_from_a_bounded_support_that_q_states_exactly() {
        let model = tiny_model();
        let vocab = model.config().vocab;
        assert!(
            vocab > DRAFT_SUPPORT,
            "the tiny vocabulary must exceed the cap"
        );
        let params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        };
        let mut d = ModelDrafter::new(DrafterKind::Model, model.clone());
        let prompt: Vec<u32> = vec![3, 9, 27, 81, 5];
        d.begin(&prompt).expect("begin");
        let mut sampler = Sampler::new(Some(7));
        let p = d
            .propose(&prompt, 8, &params, &mut sampler)
            .expect("propose");
        assert_eq!(p.tokens.len(), 8);
        let mut history = prompt.clone();
        for (t, q) in p.tokens.iter().zip(&p.q) {
            assert!(q.len() <= DRAFT_SUPPORT, "q has {} entries", q.len());
            assert!(q.prob(*t) > 0.0, "a draft outside its q");
            // q is exactly the model's distribution cut to its top DRAFT_SUPPORT, renormalized.
            let logits = model
                .forward(&mut model.new_cache(), &history, LogitsWanted::Last)
                .expect("forward");
            let want = SparseDist::from_logits(&logits, &draft_params(&params)).expect("dist");
            assert_eq!(q, &want);
            history.push(*t);
        }
        // A request's own smaller top-k wins.
        let narrow = SamplingParams { top_k: 5, ..params };
        assert_eq!(draft_params(&narrow).top_k, 5);
    }

    #[test]
    fn catch_up_feeds_what_was_missed_and_changes_no_proposal() {
        let model = tiny_model();
        let greedy = SamplingParams::greedy();
        let mut sampler = Sampler::new(Some(1));
        let prompt: Vec<u32> = vec![7, 11, 13, 2, 5];
        let mut history = prompt.clone();
        history.extend([9, 4, 17, 21, 3, 8]);
        let mut plain = ModelDrafter::new(DrafterKind::Model, model.clone());
        let mut caught = ModelDrafter::new(DrafterKind::Model, model);
        plain.begin(&prompt).expect("begin");
        caught.begin(&prompt).expect("begin");
        caught.catch_up(&history).expect("catch up");
        assert_eq!(caught.fed, history[..history.len() - 1]);
        // Already caught up (or one token behind): nothing more is fed.
        caught.catch_up(&history).expect("catch up");
        assert_eq!(caught.fed.len(), history.len() - 1);
        let a = plain
            .propose(&history, 3, &greedy, &mut sampler)
            .expect("plain");
        let b = caught
            .propose(&history, 3, &greedy, &mut sampler)
            .expect("caught");
        assert_eq!(a.tokens, b.tokens);
    }

    #[test]
    fn lookup_continues_latest_match() {
        let d = NgramDrafter::new(NgramConfig::default());
        let h = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3];
        assert_eq!(d.lookup_at(&h), (8, 3));
        assert_eq!(d.lookup_at(&[1, 2, 3]), (3, 0));
    }

    #[test]
    fn recycling_follows_target_candidates() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        d.set_step_costs(&[1.0, 1.05, 1.1, 1.15]);
        d.observe(&Feedback {
            inputs: &[10, 11],
            target_top: &[vec![11, 3], vec![12, 4]],
        });
        let mut s = Sampler::new(Some(1));
        let p = d
            .propose(&[5, 10], 3, &SamplingParams::greedy(), &mut s)
            .expect("propose");
        assert_eq!(p.tokens, vec![11, 12]);
        assert_eq!(p.q.len(), 2);
    }

    #[test]
    fn proposals_shrink_when_a_source_keeps_failing() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        d.set_step_costs(&[1.0, 1.1, 1.2, 1.3, 1.4]);
        let h = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3];
        let mut s = Sampler::new(Some(1));
        let params = SamplingParams::greedy();
        let first = d.propose(&h, 4, &params, &mut s).expect("propose");
        assert_eq!(first.tokens, vec![4, 5, 6, 9]);
        // Reject the first token every time: the long-lookup source's acceptance falls below the cost.
        for _ in 0..40 {
            d.propose(&h, 4, &params, &mut s).expect("propose");
            d.observe(&Feedback {
                inputs: &[3],
                target_top: &[vec![7]],
            });
        }
        assert!(d
            .propose(&h, 4, &params, &mut s)
            .expect("propose")
            .tokens
            .is_empty());
    }

    /// Proposes after each output token (as generation does) and returns the last proposal.
    fn follow_output(d: &mut NgramDrafter, prompt: &[u32], output: &[u32]) -> Vec<u32> {
        d.set_step_costs(&[1.0, 1.01, 1.02, 1.03, 1.04, 1.05]);
        d.begin(prompt).expect("begin");
        let mut s = Sampler::new(Some(1));
        let mut history = prompt.to_vec();
        let mut last = Vec::new();
        for &t in output {
            history.push(t);
            last = d
                .propose(&history, 3, &SamplingParams::greedy(), &mut s)
                .expect("propose")
                .tokens;
        }
        last
    }

    /// Source code in the prompt: 20..50 after an instruction 1, 2.
    fn source() -> Vec<u32> {
        [1, 2].into_iter().chain(20..50).collect()
    }

    /// The output copying the source verbatim through `last`, then `rest`.
    fn copied_then(last: u32, rest: &[u32]) -> Vec<u32> {
        (20..=last).chain(rest.iter().copied()).collect()
    }

    #[test]
    fn copy_resumes_after_a_substitution() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        // The output copies the source, replacing 35 by 99 (a rename): the next draft is what followed 35.
        let out = copied_then(34, &[99]);
        let drafted = follow_output(&mut d, &source(), &out);
        assert_eq!(drafted, vec![36, 37, 38]);
        assert_eq!(d.pending[0].0, Source::Resume);
        // A plain suffix lookup finds nothing after 99.
        let mut h = source();
        h.extend(out);
        assert_eq!(d.lookup_at(&h).1, 0);
    }

    #[test]
    fn copy_realigns_after_an_insertion_and_a_deletion() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        // Two tokens inserted before 35: the draft guesses the source goes on at 35, and once 35 comes
        // the copy is followed again.
        let drafted = follow_output(&mut d, &source(), &copied_then(34, &[77, 78]));
        assert_eq!(drafted, vec![35, 36, 37]);
        assert_eq!(d.pending[0].0, Source::Insert);
        let drafted = follow_output(&mut d, &source(), &copied_then(34, &[77, 78, 35]));
        assert_eq!(drafted, vec![36, 37, 38]);
        assert_eq!(d.pending[0].0, Source::Anchor);
        // 35 and 36 deleted: 37 realigns the copy at once.
        let drafted = follow_output(&mut d, &source(), &copied_then(34, &[37]));
        assert_eq!(drafted, vec![38, 39, 40]);
    }

    #[test]
    fn a_short_echo_that_diverges_is_not_an_edit() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        // Five words of the prompt echoed, then the output goes its own way.
        follow_output(&mut d, &source(), &copied_then(24, &[99]));
        assert_eq!(d.align, Align::None);
    }

    #[test]
    fn a_copy_that_is_never_resumed_is_given_up() {
        let mut d = NgramDrafter::new(NgramConfig::default());
        let rest: Vec<u32> = (100..100 + MAX_EDIT as u32 + 1).collect();
        follow_output(&mut d, &source(), &copied_then(34, &rest));
        assert_eq!(d.align, Align::None);
        // A rollback below what was followed starts over too.
        d.align = Align::Copying { at: 3, run: 20 };
        d.follow(&source()[..4]);
        assert_eq!(d.align, Align::None);
    }

    #[test]
    fn table_is_bounded() {
        let d = NgramDrafter::new(NgramConfig {
            max_entries: 8,
            ..NgramConfig::default()
        });
        let cfg = d.cfg;
        for t in 0..100 {
            d.learned.lock().record(&cfg, t, &[t + 1]);
        }
        assert!(d.learned.table_len() <= 8);
    }

    #[test]
    fn kinds_parse() {
        for k in ["none", "model", "self", "ngram", "auto"] {
            assert_eq!(k.parse::<DrafterKind>().expect("kind").name(), k);
        }
        assert!("bogus".parse::<DrafterKind>().is_err());
    }
}
