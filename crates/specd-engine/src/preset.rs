//! Named model pairs (`--model-preset qwen|smollm`) and building a drafter of a given kind for a target.
//!
//! Owns the default file names under the models directory (the ones `scripts/fetch-models.sh` places) and
//! the rule that a drafter is only paired with a target whose tokenizer fingerprint matches.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::drafter::{Drafter, DrafterKind, ModelDrafter, NgramConfig, NgramDrafter};
use crate::error::EngineError;
use crate::load::{load_gguf, LoadedModel};
use crate::model::Model;

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M.
pub const QWEN_TARGET_FILE: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (same tokenizer as the 1.5B).
pub const QWEN_DRAFT_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// SmolLM2-135M-Instruct, Q4_1.
pub const SMOLLM_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A named target (and optional separate draft model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Qwen,
    Smollm,
}

impl FromStr for Preset {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qwen" => Ok(Preset::Qwen),
            "smollm" => Ok(Preset::Smollm),
            other => Err(EngineError::InvalidRequest(format!(
                "unknown model preset {other:?} (qwen, smollm)"
            ))),
        }
    }
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Qwen => "qwen",
            Preset::Smollm => "smollm",
        }
    }

    pub fn target_path(self, models_dir: &Path) -> PathBuf {
        models_dir.join(match self {
            Preset::Qwen => QWEN_TARGET_FILE,
            Preset::Smollm => SMOLLM_FILE,
        })
    }

    /// The separate draft model, where the preset has one.
    pub fn draft_path(self, models_dir: &Path) -> Option<PathBuf> {
        match self {
            Preset::Qwen => Some(models_dir.join(QWEN_DRAFT_FILE)),
            Preset::Smollm => None,
        }
    }
}

/// Layers a self-drafter keeps by default: a quarter of the target's, at least one.
pub fn default_self_layers(target_layers: usize) -> usize {
    (target_layers / 4).max(1)
}

/// Default vocabulary of a model drafter's LM head (`--draft-vocab`): the first 32768 token ids.
pub const DEFAULT_DRAFT_VOCAB: usize = 32768;

/// How model drafters are built.
#[derive(Clone, Copy, Debug)]
pub struct DraftOptions {
    /// Layers a self-drafter keeps (`None`: [`default_self_layers`]).
    pub self_layers: Option<usize>,
    /// Token ids a model drafter can propose: those below this, plus the stop tokens (0: all). See
    /// [`trim_draft_head`].
    pub vocab: usize,
}

impl Default for DraftOptions {
    fn default() -> Self {
        Self {
            self_layers: None,
            vocab: DEFAULT_DRAFT_VOCAB,
        }
    }
}

/// `model` as a drafter whose LM head only scores token ids below `limit`, the tokenizer's stop ids and,
/// per sequence, the ids that sequence has shown (its prompt and output: [`ModelDrafter`] adds them);
/// unchanged when `limit` is 0 or covers the vocabulary. BPE vocabularies are numbered in merge order,
/// most frequent pieces first, so the first ids cover most of the text a drafter can hope to predict
/// (Qwen's first 32768 ids cover 95% of the bench outputs' tokens; most of the rest, like `_intervals`
/// or a fence, is in the prompt or recurs in the output), while the head shrinks in proportion: for the
/// Qwen 0.5B it is 30% of the weight bytes and drops to a fifth of that. The target still verifies
/// against its full vocabulary, so output is unchanged; a token left out is simply never drafted.
pub fn trim_draft_head(
    model: &Model,
    stop_ids: &[u32],
    limit: usize,
) -> Result<Model, EngineError> {
    let vocab = model.config().vocab;
    // A tensor-parallel self-drafter keeps the full head: it is split over the ranks like the target's.
    if limit == 0 || limit >= vocab || model.tp().is_some() {
        return Ok(model.clone());
    }
    let mut extra: Vec<u32> = stop_ids
        .iter()
        .copied()
        .filter(|&t| (t as usize) >= limit && (t as usize) < vocab)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    model.with_head_prefix(limit, extra)
}

/// Builds a drafter of `kind` for `target`. `draft` is the separate draft model (needed for
/// [`DrafterKind::Model`]). `None` and plain decoding give `Ok(None)`.
pub fn build_drafter(
    kind: DrafterKind,
    target: &LoadedModel,
    draft: Option<&LoadedModel>,
    opts: DraftOptions,
) -> Result<Option<Box<dyn Drafter>>, EngineError> {
    let stops = target.tokenizer.stop_ids();
    Ok(match kind {
        DrafterKind::None => None,
        DrafterKind::Model => {
            let draft = draft.ok_or_else(|| {
                EngineError::InvalidRequest(
                    "drafter `model` needs a separate draft model (--draft-model, or the qwen preset)".into(),
                )
            })?;
            check_pair(target, draft)?;
            Some(Box::new(ModelDrafter::new(
                DrafterKind::Model,
                trim_draft_head(&draft.model, stops, opts.vocab)?,
            )))
        }
        DrafterKind::SelfLayers => {
            let n = opts
                .self_layers
                .unwrap_or_else(|| default_self_layers(target.model.config().layers));
            Some(Box::new(ModelDrafter::new(
                DrafterKind::SelfLayers,
                trim_draft_head(&target.model.truncated(n)?, stops, opts.vocab)?,
            )))
        }
        DrafterKind::Ngram | DrafterKind::Auto => {
            let mut d = NgramDrafter::new(NgramConfig::default());
            d.set_kind(kind);
            Some(Box::new(d))
        }
    })
}

/// A drafter must share the target's tokenizer (token ids mean the same text) and vocabulary size.
pub fn check_pair(target: &LoadedModel, draft: &LoadedModel) -> Result<(), EngineError> {
    let (t, d) = (
        target.tokenizer.fingerprint(),
        draft.tokenizer.fingerprint(),
    );
    if t != d {
        return Err(EngineError::TokenizerMismatch {
            drafter: format!("{} ({})", draft.path.display(), d),
            target: format!("{} ({})", target.path.display(), t),
        });
    }
    let (tv, dv) = (target.model.config().vocab, draft.model.config().vocab);
    if tv != dv {
        return Err(EngineError::TokenizerMismatch {
            drafter: format!("{} (vocabulary of {dv})", draft.path.display()),
            target: format!("{} (vocabulary of {tv})", target.path.display()),
        });
    }
    Ok(())
}

/// Loads the preset's draft model when `kind` needs one.
pub fn load_draft_for(
    kind: DrafterKind,
    explicit: Option<&Path>,
    preset: Preset,
    models_dir: &Path,
) -> Result<Option<LoadedModel>, EngineError> {
    if kind != DrafterKind::Model {
        return Ok(None);
    }
    match explicit.map(Path::to_path_buf).or_else(|| preset.draft_path(models_dir)) {
        Some(p) => load_gguf(&p).map(Some),
        None => Err(EngineError::InvalidRequest(format!(
            "preset {} has no separate draft model; use --drafter self or ngram, or pass --draft-model",
            preset.name()
        ))),
    }
}
