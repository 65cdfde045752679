//! The real Qwen2.5-Coder pair (1.5B target, 0.5B drafter), skipped when the files are absent:
//!
//! - the tokenizer loaded with the model knows Qwen's ids (`"Hello world"` is `[9707, 1879]`,
//!   `<|im_start|>` is 151644) and both models share one tokenizer fingerprint, so they may be paired;
//! - the quantized kernels multiply several rows exactly as each row alone on the formats these files
//!   use (Q4_K, Q6_K, Q5_0 converted to Q8_0);
//! - greedy speculation with the 0.5B draft model (k = 4) and with the n-gram drafter emits exactly
//!   the tokens of plain greedy decoding of the 1.5B on a code prompt, with drafts accepted.
//!
//! Kept short (24 new tokens): the 1.5B decodes at about 15 tokens/s on a CI CPU.
#![allow(clippy::unwrap_used)]

use specd_core::SamplingParams;
use specd_engine::preset::{build_drafter, check_pair, DraftOptions};
use specd_engine::{DrafterKind, GenerateOptions, Generator, LoadedModel};
use specd_tests::{check_matmul_rows, shared_real, QWEN_DRAFT_FILE, QWEN_TARGET_FILE};

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
    let text = specd_tokenizer::render_prompt(
        &target.tokenizer,
        "Write a Python function `is_prime(n)` that checks whether n is prime.",
    )
    .unwrap();
    let prompt = target.tokenizer.encode(&text, false).unwrap();
    let opts = |k: Option<usize>| {
        let mut o = GenerateOptions::new(NEW_TOKENS, SamplingParams::greedy());
        o.draft_len = k;
        o.stop_ids = target.tokenizer.stop_ids().to_vec();
        o
    };
    let mut plain = Generator::new(target.model.clone(), None);
    let (reference, _) = plain.generate(&prompt, &opts(None), |_| true).unwrap();
    assert_eq!(reference.len(), NEW_TOKENS, "plain decoding stopped early");

    for (kind, k) in [(DrafterKind::Model, Some(4)), (DrafterKind::Ngram, None)] {
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
        if kind == DrafterKind::Model {
            assert!(
                st.accepted > 0,
                "the 0.5B never had a draft accepted: {st:?}"
            );
        }
    }
}

#[test]
fn qwen_matmul_rows_are_independent() {
    let Some((target, draft)) = pair() else {
        return;
    };
    check_matmul_rows(&draft.model, &[0], &[2, 5], "Qwen2.5-0.5B");
    check_matmul_rows(&target.model, &[0], &[3], "Qwen2.5-1.5B");
}
