//! The real Qwen2.5-Coder pair (1.5B target, 0.5B drafter), skipped when the files are absent:
//!
//! - the tokenizer loaded with the model knows Qwen's ids (`"Hello world"` is `[9707, 1879]`,
//!   `<|im_start|>` is 151644) and both models share one tokenizer fingerprint, so they may be paired;
//! - the quantized kernels multiply several rows exactly as each row alone on the formats these files
//!   use (Q4_K, Q6_K, and Q5_0, kept at its 5.5 bits);
//! - greedy speculation with the 0.5B draft model (k = 4, on a code prompt) and with the n-gram
//!   drafter (on an edit-shaped prompt it can copy from) emits exactly the tokens of an independent
//!   plain greedy loop over the 1.5B, with drafts proposed and accepted;
//! - a sampled proposal of the 0.5B stays small on the wire (its q is cut to `DRAFT_SUPPORT`).
//!
//! Kept short (24 new tokens): the 1.5B decodes at about 15 tokens/s on a CI CPU.
#![allow(clippy::unwrap_used)]

use specd_core::SamplingParams;
use specd_engine::preset::{build_drafter, check_pair, DraftOptions};
use specd_engine::{DrafterKind, GenerateOptions, Generator, LoadedModel};
use specd_tests::{
    check_matmul_rows, plain_greedy, shared_real, QWEN_DRAFT_FILE, QWEN_TARGET_FILE,
};

const NEW_TOKENS: usize = 24;

fn pair() -> Option<(&'static LoadedModel, &'static LoadedModel)> {
    let target = shared_real(QWEN_TARGET_FILE)?;
    let draft = shared_real(QWEN_DRAFT_FILE)?;
    Some((target, draft))
}

#[test]
fn qwen_tokenizer_known_ids_and_shared_fingerprint() {
    let Some((target, draft)) = pair() else {
        return;
    };
    for m in [target, draft] {
        let tok = &m.tokenizer;
        assert_eq!(
            tok.encode("Hello world", false).unwrap(),
            vec![9707, 1879],
            "{}",
            m.path.display()
        );
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
        assert!(tok.is_stop(151645), "<|im_end|> ends generation");
        assert_eq!(tok.decode(&[9707, 1879], false).unwrap(), "Hello world");
        assert!(m.model.config().vocab >= tok.vocab_size());
    }
    assert_eq!(
        target.tokenizer.fingerprint(),
        draft.tokenizer.fingerprint()
    );
    check_pair(target, draft).expect("the 0.5B may draft for the 1.5B");
    assert_eq!(target.model.config().vocab, draft.model.config().vocab);
    assert!(target.model.config().layers > draft.model.config().layers);
}

#[test]
fn qwen_greedy_speculation_equals_plain_greedy() {
    let Some((target, draft)) = pair() else {
        return;
    };
    let code = "Write a Python function `is_prime(n)` that checks whether n is prime.";
    let edit = "Rename `total` to `acc` and show the whole function:\n```python\ndef add_all(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n```";
    let stops = target.tokenizer.stop_ids().to_vec();
    let opts = |k: Option<usize>| {
        let mut o = GenerateOptions::new(NEW_TOKENS, SamplingParams::greedy());
        o.draft_len = k;
        o.stop_ids = stops.clone();
        o
    };
    for (kind, k, user) in [
        (DrafterKind::Model, Some(4), code),
        (DrafterKind::Ngram, None, edit),
    ] {
        let prompt = specd_tokenizer::prompt_ids(&target.tokenizer, user).unwrap();
        let reference = plain_greedy(&target.model, &prompt, NEW_TOKENS, &stops);
        assert_eq!(reference.len(), NEW_TOKENS, "plain decoding stopped early");
        let drafter = build_drafter(kind, target, Some(draft), DraftOptions::default()).unwrap();
        let mut g = Generator::new(target.model.clone(), drafter);
        let (out, st) = g.generate(&prompt, &opts(k), |_| true).unwrap();
        let text = target.tokenizer.decode(&out, false).unwrap();
        println!(
            "{} k={k:?}: drafted {} accepted {} steps {}: {text:?}",
            kind.name(),
            st.drafted,
            st.accepted,
            st.steps
        );
        assert_eq!(
            out,
            reference,
            "{}: speculative output differs from plain greedy",
            kind.name()
        );
        assert_eq!(st.generated, out.len());
        assert!(st.accepted <= st.drafted);
        assert_eq!(
            st.accepted_per_position.iter().sum::<u64>(),
            st.accepted as u64
        );
        assert!(
            st.drafted > 0 && st.accepted > 0,
            "{}: nothing drafted or nothing accepted, so nothing was tested: {st:?}",
            kind.name()
        );
    }
}

/// The q of a sampled proposal is cut to the drafter's top `DRAFT_SUPPORT` tokens: at k = 8 and
/// temperature 1 the 0.5B's Proposal is a few KB on the wire, where the full distribution was about
/// 1 MB per drafted token (over tonic's 4 MiB default message limit by k = 5).
#[test]
fn qwen_sampled_proposals_are_small_on_the_wire() {
    use prost::Message;
    use specd_engine::drafter::{draft_params, Drafter, ModelDrafter, DRAFT_SUPPORT};
    let Some((target, draft)) = pair() else {
        return;
    };
    let prompt =
        specd_tokenizer::prompt_ids(&target.tokenizer, "Write a haiku about rust.").unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..SamplingParams::greedy()
    };
    let wire = |q: &[specd_core::SparseDist]| -> usize {
        q.iter()
            .map(|d| {
                specd_proto::internal::v1::SparseDist {
                    ids: d.ids().to_vec(),
                    probs: d.probs().to_vec(),
                }
                .encoded_len()
                    + 4
            })
            .sum()
    };
    let mut drafter = ModelDrafter::new(DrafterKind::Model, draft.model.clone());
    drafter.begin(&prompt).unwrap();
    let mut sampler = specd_core::Sampler::new(Some(5));
    let p = drafter.propose(&prompt, 8, &params, &mut sampler).unwrap();
    assert_eq!(p.tokens.len(), 8);
    assert!(p.q.iter().all(|q| q.len() <= DRAFT_SUPPORT));
    let bytes = wire(&p.q);
    // The full distribution at the first position, as it was sent before the cut.
    let logits = draft
        .model
        .forward(
            &mut draft.model.new_cache(),
            &prompt,
            specd_engine::LogitsWanted::Last,
        )
        .unwrap();
    let full = specd_core::SparseDist::from_logits(&logits, &params).unwrap();
    let cut = specd_core::SparseDist::from_logits(&logits, &draft_params(&params)).unwrap();
    let full_bytes = wire(std::slice::from_ref(&full));
    println!(
        "FIGURE proposal k=8 temperature 1: {bytes} bytes of q ({} B/token); the full q of one \
         position {full_bytes} bytes ({} entries), cut {} bytes; mass kept by the cut at that \
         position {:.4}",
        bytes / 8,
        full.len(),
        wire(std::slice::from_ref(&cut)),
        cut.ids()
            .iter()
            .map(|&t| f64::from(full.prob(t)))
            .sum::<f64>()
    );
    assert!(bytes < 8 * 1024, "{bytes} bytes");
}

#[test]
fn qwen_matmul_rows_are_independent() {
    let Some((target, draft)) = pair() else {
        return;
    };
    check_matmul_rows(&draft.model, &[0], &[2, 5], "Qwen2.5-0.5B");
    check_matmul_rows(&target.model, &[0], &[3], "Qwen2.5-1.5B");
}
