//! Batch invariance of the forward pass: a position's logits are BITWISE the same however the tokens
//! reach the model. Checked on tiny random Qwen2 and Llama models (hermetic) and on SmolLM2-135M (real,
//! skipped when absent):
//!
//! - all positions of one multi-token forward (`LogitsWanted::All`) vs feeding one token at a time;
//! - prefill in one forward vs chunks of 3 vs irregular chunks vs token by token, then the same decode;
//! - a ragged batch of sequences (fresh and with existing caches, different lengths and wanted logits)
//!   vs each sequence alone;
//! - KV truncation and re-extension vs a fresh cache fed the resulting sequence;
//! - every weight matrix's `QWeight::matmul` over m rows vs each row alone (the kernel underneath all
//!   of the above), for every quantization format the files use;
//! - the kernel thread count;
//! - the self-drafter view (`Model::truncated`) with its own cache, and its equality with a model file
//!   holding just those layers;
//! - refused inputs (context overflow, out-of-vocabulary ids, a cache of another model) leave every
//!   cache untouched.
//!
//! Exact greedy losslessness of speculation rests on these properties.
#![allow(clippy::unwrap_used)]

use specd_engine::testing::TinySpec;
use specd_engine::{EngineError, Family, KvCache, LoadedModel, LogitsWanted, Model, SeqInput};
use specd_tests::{
    assert_bitwise_eq, check_matmul_rows, shared_real, temp_dir, tiny_model, tiny_model_spec,
    tiny_spec, SMOLLM_FILE,
};

/// A tiny model with large random weights: the layers dominate the residual stream, so a rounding
/// difference anywhere shows in the logits (with small weights the embedding dominates and can mask it).
fn tiny(family: Family) -> LoadedModel {
    let dir = temp_dir();
    let spec = TinySpec {
        scale: 1.0,
        ..tiny_spec(family, 7)
    };
    tiny_model_spec(dir.path(), &spec)
}

/// `n` token ids of the tiny vocabulary (special tokens included), different for each `salt`.
fn tiny_ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 97 + salt * 31 + 7) % 275)
        .collect()
}

fn smollm() -> Option<&'static LoadedModel> {
    shared_real(SMOLLM_FILE)
}

fn smollm_ids(m: &LoadedModel, text: &str) -> Vec<u32> {
    m.tokenizer.encode(text, false).unwrap()
}

fn vocab(model: &Model) -> usize {
    model.config().vocab
}

fn row(logits: &[f32], i: usize, vocab: usize) -> &[f32] {
    &logits[i * vocab..(i + 1) * vocab]
}

/// Feeds `tokens` one at a time, returning each position's logits.
fn one_at_a_time(model: &Model, cache: &mut KvCache, tokens: &[u32]) -> Vec<Vec<f32>> {
    tokens
        .iter()
        .map(|&t| model.forward(cache, &[t], LogitsWanted::Last).unwrap())
        .collect()
}

/// The logits are usable (finite) and position-dependent, so equalities below are not vacuous.
fn assert_meaningful(logits: &[f32], vocab: usize, what: &str) {
    assert!(!logits.is_empty(), "{what}: no logits");
    assert!(
        logits.iter().all(|v| v.is_finite()),
        "{what}: non-finite logits"
    );
    let rows = logits.len() / vocab;
    if rows >= 2 {
        assert_ne!(
            row(logits, 0, vocab),
            row(logits, rows - 1, vocab),
            "{what}: rows identical"
        );
    }
    let first = row(logits, 0, vocab);
    assert!(
        first.iter().any(|&v| v != first[0]),
        "{what}: constant logits"
    );
}

fn check_all_positions(model: &Model, tokens: &[u32], what: &str) {
    let v = vocab(model);
    let mut multi = model.new_cache();
    let all = model
        .forward(&mut multi, tokens, LogitsWanted::All)
        .unwrap();
    assert_eq!(
        all.len(),
        tokens.len() * v,
        "{what}: All returns one row per token"
    );
    assert_eq!(multi.len(), tokens.len());
    assert_meaningful(&all, v, what);
    let mut single = model.new_cache();
    for (i, one) in one_at_a_time(model, &mut single, tokens).iter().enumerate() {
        assert_bitwise_eq(
            row(&all, i, v),
            one,
            &format!("{what}: position {i}, All vs one at a time"),
        );
    }
    // Last of the same multi-token forward is the last row of All.
    let mut last_cache = model.new_cache();
    let last = model
        .forward(&mut last_cache, tokens, LogitsWanted::Last)
        .unwrap();
    assert_bitwise_eq(
        row(&all, tokens.len() - 1, v),
        &last,
        &format!("{what}: Last vs All"),
    );
    // A verify-shaped pass: a prefix fed as a prefill, then the rest in one All forward.
    let split = tokens.len() / 2;
    let mut verify = model.new_cache();
    model
        .forward(&mut verify, &tokens[..split], LogitsWanted::None)
        .unwrap();
    let tail = model
        .forward(&mut verify, &tokens[split..], LogitsWanted::All)
        .unwrap();
    for i in split..tokens.len() {
        assert_bitwise_eq(
            row(&all, i, v),
            row(&tail, i - split, v),
            &format!("{what}: position {i}, prefix + All vs All"),
        );
    }
}

/// Feeds `prompt` in the given chunk sizes (logits only for the last chunk), returning the last logits.
fn prefill_chunked(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    sizes: &[usize],
) -> Vec<f32> {
    let mut at = 0;
    let mut last = Vec::new();
    let mut sizes = sizes.iter().copied().cycle();
    while at < prompt.len() {
        let n = sizes.next().unwrap().min(prompt.len() - at);
        let end = at + n;
        let wanted = if end == prompt.len() {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        let out = model.forward(cache, &prompt[at..end], wanted).unwrap();
        if wanted == LogitsWanted::None {
            assert!(out.is_empty(), "LogitsWanted::None returned logits");
        }
        last = out;
        at = end;
    }
    assert_eq!(cache.len(), prompt.len());
    last
}

fn check_prefill_chunking(model: &Model, prompt: &[u32], continuation: &[u32], what: &str) {
    let plans: [(&str, &[usize]); 4] = [
        ("one forward", &[usize::MAX]),
        ("chunks of 3", &[3]),
        ("irregular chunks", &[1, 4, 2, 5]),
        ("token by token", &[1]),
    ];
    let mut caches: Vec<KvCache> = Vec::new();
    let mut reference: Option<Vec<f32>> = None;
    for (name, sizes) in plans {
        let mut cache = model.new_cache();
        let last = prefill_chunked(model, &mut cache, prompt, sizes);
        match &reference {
            None => {
                assert_meaningful(&last, vocab(model), what);
                reference = Some(last);
            }
            Some(r) => {
                assert_bitwise_eq(r, &last, &format!("{what}: prefill {name} vs one forward"))
            }
        }
        caches.push(cache);
    }
    // The caches the plans left behind decode identically.
    for (step, &t) in continuation.iter().enumerate() {
        let mut outs = caches
            .iter_mut()
            .map(|c| model.forward(c, &[t], LogitsWanted::Last).unwrap());
        let first = outs.next().unwrap();
        for (i, o) in outs.enumerate() {
            assert_bitwise_eq(
                &first,
                &o,
                &format!(
                    "{what}: decode step {step} after prefill plan {} vs one forward",
                    plans[i + 1].0
                ),
            );
        }
    }
}

/// A ragged batch vs each sequence alone. `prefixes[i]` is fed to sequence i's cache beforehand, then
/// `news[i]` goes through the batch with `wanted[i]`.
fn check_batch(
    model: &Model,
    prefixes: &[&[u32]],
    news: &[&[u32]],
    wanted: &[LogitsWanted],
    what: &str,
) {
    let prefill = |p: &[u32]| {
        let mut c = model.new_cache();
        model.forward(&mut c, p, LogitsWanted::None).unwrap();
        c
    };
    let mut batch_caches: Vec<KvCache> = prefixes.iter().map(|p| prefill(p)).collect();
    let mut alone_caches: Vec<KvCache> = prefixes.iter().map(|p| prefill(p)).collect();
    let mut batch: Vec<SeqInput<'_>> = batch_caches
        .iter_mut()
        .zip(news)
        .zip(wanted)
        .map(|((cache, tokens), &wanted)| SeqInput {
            cache,
            tokens,
            wanted,
        })
        .collect();
    let batched = model.forward_batch(&mut batch).unwrap();
    assert_eq!(
        batched.len(),
        prefixes.len(),
        "{what}: one output per sequence"
    );
    for (i, cache) in alone_caches.iter_mut().enumerate() {
        let alone = model.forward(cache, news[i], wanted[i]).unwrap();
        let rows = match wanted[i] {
            LogitsWanted::None => 0,
            LogitsWanted::Last => usize::from(!news[i].is_empty()),
            LogitsWanted::All => news[i].len(),
            LogitsWanted::Tail(t) => t.min(news[i].len()),
        };
        assert_eq!(
            batched[i].len(),
            rows * vocab(model),
            "{what}: sequence {i} row count"
        );
        assert_bitwise_eq(
            &alone,
            &batched[i],
            &format!("{what}: sequence {i}, batch vs alone"),
        );
        assert_eq!(
            batch_caches[i].len(),
            prefixes[i].len() + news[i].len(),
            "{what}: sequence {i} cache"
        );
    }
    assert!(
        batched.iter().any(|b| !b.is_empty()),
        "{what}: the batch returned no logits at all"
    );
    // What the batch wrote into the caches is what the lone passes wrote: the next step agrees.
    for (i, (b, a)) in batch_caches
        .iter_mut()
        .zip(alone_caches.iter_mut())
        .enumerate()
    {
        let t = [(i as u32 * 13 + 5) % 200];
        let lb = model.forward(b, &t, LogitsWanted::Last).unwrap();
        let la = model.forward(a, &t, LogitsWanted::Last).unwrap();
        assert_bitwise_eq(
            &la,
            &lb,
            &format!("{what}: sequence {i}, decode after the batch"),
        );
    }
}

fn check_batches(model: &Model, ids: &dyn Fn(usize, u32) -> Vec<u32>, what: &str) {
    let (p1, p2, p3) = (ids(5, 1), ids(9, 2), ids(4, 3));
    let (n0, n1, n2) = (ids(7, 4), ids(3, 5), ids(1, 6));
    use LogitsWanted::{All, Last, None, Tail};
    // A fresh sequence, two with caches, and one with a cache but nothing new this pass.
    check_batch(
        model,
        &[&[], &p1, &p2, &p3],
        &[&n0, &n1, &n2, &[]],
        &[All, Last, All, Last],
        &format!("{what}, mixed batch"),
    );
    // The same sequences wanting other logits (one wants none).
    check_batch(
        model,
        &[&[], &p1, &p2],
        &[&n0, &n1, &n2],
        &[Last, All, None],
        &format!("{what}, batch with other wants"),
    );
    // The target worker's verify steps: the last k + 1 rows of a feed that also catches up context.
    check_batch(
        model,
        &[&p1, &p2, &p3],
        &[&n0, &n1, &n2],
        &[Tail(3), Tail(1), Tail(5)],
        &format!("{what}, batch of tails"),
    );
    // Two copies of the same sequence in one batch get identical results.
    check_batch(
        model,
        &[&p1, &p1, &p2],
        &[&n1, &n1, &n0],
        &[All, All, All],
        &format!("{what}, batch with duplicates"),
    );
}

fn check_truncation(model: &Model, ten: &[u32], new4: &[u32], then: &[u32], what: &str) {
    assert_eq!((ten.len(), new4.len()), (10, 4));
    let v = vocab(model);
    let mut cache = model.new_cache();
    model.forward(&mut cache, ten, LogitsWanted::All).unwrap();
    assert_eq!(cache.len(), 10);
    cache.truncate(11);
    assert_eq!(
        cache.len(),
        10,
        "{what}: truncating past the end is a no-op"
    );
    cache.truncate(6);
    assert_eq!(cache.len(), 6);
    let got = model.forward(&mut cache, new4, LogitsWanted::All).unwrap();
    assert_eq!(cache.len(), 10);

    let mut seq = ten[..6].to_vec();
    seq.extend_from_slice(new4);
    let mut fresh = model.new_cache();
    let want = model.forward(&mut fresh, &seq, LogitsWanted::All).unwrap();
    assert_meaningful(&got, v, what);
    for i in 0..4 {
        assert_bitwise_eq(
            row(&want, 6 + i, v),
            row(&got, i, v),
            &format!(
                "{what}: position {} after truncate(6) + 4 new tokens vs fresh",
                6 + i
            ),
        );
    }
    // The rolled-back positions are gone for good: later decode steps agree as well.
    for (step, &t) in then.iter().enumerate() {
        let a = model.forward(&mut cache, &[t], LogitsWanted::Last).unwrap();
        let b = model.forward(&mut fresh, &[t], LogitsWanted::Last).unwrap();
        assert_bitwise_eq(
            &b,
            &a,
            &format!("{what}: decode step {step} after truncation"),
        );
    }
    // Truncating to nothing and refeeding is a fresh sequence.
    cache.truncate(0);
    assert!(cache.is_empty());
    let again = model.forward(&mut cache, &seq, LogitsWanted::All).unwrap();
    assert_bitwise_eq(
        &want,
        &again,
        &format!("{what}: truncate(0) and refeed vs fresh"),
    );
}

fn check_thread_counts(model: &Model, tokens: &[u32], what: &str) {
    let run = || {
        let mut c = model.new_cache();
        model.forward(&mut c, tokens, LogitsWanted::All).unwrap()
    };
    let global = run();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got = pool.install(run);
        assert_bitwise_eq(
            &global,
            &got,
            &format!("{what}: {threads} kernel threads vs the global pool"),
        );
    }
}

fn check_model(model: &Model, ids: &dyn Fn(usize, u32) -> Vec<u32>, what: &str) {
    check_all_positions(model, &ids(12, 0), what);
    check_prefill_chunking(model, &ids(11, 1), &ids(4, 2), what);
    check_batches(model, ids, what);
    check_truncation(model, &ids(10, 3), &ids(4, 4), &ids(3, 5), what);
}

// ---- tiny models -------------------------------------------------------------------------------

#[test]
fn tiny_all_positions_equal_one_at_a_time() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        check_all_positions(&m.model, &tiny_ids(24, 0), &format!("tiny {family:?}"));
    }
}

#[test]
fn tiny_matmul_rows_are_independent() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        let layers: Vec<usize> = (0..m.model.config().layers).collect();
        check_matmul_rows(
            &m.model,
            &layers,
            &[2, 3, 4, 5, 7, 8, 9, 17, 33],
            &format!("tiny {family:?}"),
        );
    }
}

#[test]
fn tiny_prefill_chunking_is_invisible() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        check_prefill_chunking(
            &m.model,
            &tiny_ids(17, 1),
            &tiny_ids(6, 2),
            &format!("tiny {family:?}"),
        );
    }
}

#[test]
fn tiny_batch_equals_each_sequence_alone() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        check_batches(&m.model, &tiny_ids, &format!("tiny {family:?}"));
    }
}

#[test]
fn tiny_truncate_and_reextend_equals_fresh() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        check_truncation(
            &m.model,
            &tiny_ids(10, 3),
            &tiny_ids(4, 4),
            &tiny_ids(3, 5),
            &format!("tiny {family:?}"),
        );
    }
}

#[test]
fn tiny_thread_count_is_invisible() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        check_thread_counts(&m.model, &tiny_ids(9, 6), &format!("tiny {family:?}"));
    }
}

#[test]
fn tiny_self_drafter_view_is_invariant_too() {
    for family in [Family::Qwen2, Family::Llama] {
        let m = tiny(family);
        let layers = m.model.config().layers;
        let view = m.model.truncated(1).unwrap();
        assert_eq!(view.config().layers, 1);
        assert_eq!(view.new_cache().layers(), 1);
        check_model(&view, &tiny_ids, &format!("tiny {family:?} first layer"));
        // The view differs from the full model, and the full-depth view is the model itself.
        let toks = tiny_ids(6, 9);
        let fwd = |m: &Model| {
            m.forward(&mut m.new_cache(), &toks, LogitsWanted::All)
                .unwrap()
        };
        assert_ne!(
            fwd(&view),
            fwd(&m.model),
            "a 1-layer view computes the same as {layers} layers"
        );
        assert_bitwise_eq(
            &fwd(&m.model),
            &fwd(&m.model.truncated(layers).unwrap()),
            "full-depth view",
        );
        assert!(matches!(
            m.model.truncated(0),
            Err(EngineError::InvalidRequest(_))
        ));
        assert!(matches!(
            m.model.truncated(layers + 1),
            Err(EngineError::InvalidRequest(_))
        ));
    }
}

/// A tiny Qwen2 file with the same seed and fewer layers holds exactly the target's first layers (the
/// generator draws the embedding, then layer by layer; the head is tied), so the self-drafter view must
/// compute bitwise what that file computes.
#[test]
fn tiny_self_drafter_view_equals_a_model_of_those_layers() {
    let dir = temp_dir();
    let target = tiny_model(dir.path(), Family::Qwen2, 21);
    let mut spec = tiny_spec(Family::Qwen2, 21);
    spec.layers = 2;
    let small = tiny_model_spec(dir.path(), &spec);
    let view = target.model.truncated(2).unwrap();
    let toks = tiny_ids(15, 8);
    let a = view
        .forward(&mut view.new_cache(), &toks, LogitsWanted::All)
        .unwrap();
    let b = small
        .model
        .forward(&mut small.model.new_cache(), &toks, LogitsWanted::All)
        .unwrap();
    assert_bitwise_eq(&b, &a, "truncated(2) view vs the 2-layer file");
}

#[test]
fn tiny_refused_inputs_leave_caches_intact() {
    let m = tiny(Family::Qwen2);
    let model = &m.model;
    let (ctx, v) = (model.config().context, vocab(model));
    let prompt = tiny_ids(ctx - 2, 1);
    let mut cache = model.new_cache();
    model
        .forward(&mut cache, &prompt, LogitsWanted::None)
        .unwrap();
    let mut reference = cache.clone();

    // Context overflow: nothing is written.
    let err = model
        .forward(&mut cache, &tiny_ids(3, 2), LogitsWanted::Last)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::ContextOverflow { len, max } if len == ctx + 1 && max == ctx),
        "{err:?}"
    );
    assert_eq!(cache.len(), ctx - 2);
    // Out-of-vocabulary id: nothing is written.
    let err = model
        .forward(&mut cache, &[1, v as u32], LogitsWanted::Last)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::BadToken { id, .. } if id == v as u32),
        "{err:?}"
    );
    assert_eq!(cache.len(), ctx - 2);
    // A cache made for another layer count is refused.
    let mut other = model.truncated(1).unwrap().new_cache();
    let err = model
        .forward(&mut other, &[1], LogitsWanted::Last)
        .unwrap_err();
    assert!(matches!(err, EngineError::Internal(_)), "{err:?}");
    assert!(other.is_empty());
    // A batch with one bad sequence touches none of them.
    let mut good = model.new_cache();
    {
        let mut batch = [
            SeqInput {
                cache: &mut good,
                tokens: &[1, 2, 3],
                wanted: LogitsWanted::Last,
            },
            SeqInput {
                cache: &mut cache,
                tokens: &[1, 2, 3],
                wanted: LogitsWanted::Last,
            },
        ];
        let err = model.forward_batch(&mut batch).unwrap_err();
        assert!(
            matches!(err, EngineError::ContextOverflow { .. }),
            "{err:?}"
        );
    }
    assert!(
        good.is_empty(),
        "a refused batch wrote into a valid sequence's cache"
    );
    assert_eq!(cache.len(), ctx - 2);
    // The cache still computes exactly what an untouched copy computes, up to the full context.
    let a = model
        .forward(&mut cache, &[5, 6], LogitsWanted::All)
        .unwrap();
    let b = model
        .forward(&mut reference, &[5, 6], LogitsWanted::All)
        .unwrap();
    assert_bitwise_eq(&b, &a, "after refused inputs");
    assert_eq!(cache.len(), ctx);
    // Empty input is fine and changes nothing.
    assert!(model
        .forward(&mut cache, &[], LogitsWanted::All)
        .unwrap()
        .is_empty());
    assert_eq!(cache.len(), ctx);
}

// ---- SmolLM2-135M (real) ------------------------------------------------------------------------

const SMOL_TEXT: &str =
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens, \
then the target model checks them all in one forward pass, so the output does not change at all.";

/// Token ids of SmolLM2 for sequence `salt`, `n` long.
fn smol_ids(m: &LoadedModel) -> impl Fn(usize, u32) -> Vec<u32> + '_ {
    let base = smollm_ids(m, SMOL_TEXT);
    move |n, salt| {
        base.iter()
            .cycle()
            .skip(salt as usize * 5)
            .take(n)
            .copied()
            .collect()
    }
}

#[test]
fn smollm_all_positions_equal_one_at_a_time() {
    let Some(m) = smollm() else { return };
    check_all_positions(&m.model, &smol_ids(m)(14, 0), "SmolLM2");
}

#[test]
fn smollm_matmul_rows_are_independent() {
    let Some(m) = smollm() else { return };
    let last = m.model.config().layers - 1;
    check_matmul_rows(&m.model, &[0, last], &[2, 5, 9], "SmolLM2");
}

#[test]
fn smollm_prefill_chunking_is_invisible() {
    let Some(m) = smollm() else { return };
    let ids = smol_ids(m);
    check_prefill_chunking(&m.model, &ids(13, 1), &ids(3, 2), "SmolLM2");
}

#[test]
fn smollm_batch_equals_each_sequence_alone() {
    let Some(m) = smollm() else { return };
    check_batches(&m.model, &smol_ids(m), "SmolLM2");
}

#[test]
fn smollm_truncate_and_reextend_equals_fresh() {
    let Some(m) = smollm() else { return };
    let ids = smol_ids(m);
    check_truncation(&m.model, &ids(10, 3), &ids(4, 4), &ids(3, 5), "SmolLM2");
}

#[test]
fn smollm_thread_count_is_invisible() {
    let Some(m) = smollm() else { return };
    check_thread_counts(&m.model, &smol_ids(m)(7, 6), "SmolLM2");
}

#[test]
fn smollm_self_drafter_view_is_invariant_too() {
    let Some(m) = smollm() else { return };
    let n = specd_engine::preset::default_self_layers(m.model.config().layers);
    let view = m.model.truncated(n).unwrap();
    let ids = smol_ids(m);
    check_all_positions(&view, &ids(10, 0), "SmolLM2 self-drafter");
    check_truncation(
        &view,
        &ids(10, 3),
        &ids(4, 4),
        &ids(2, 5),
        "SmolLM2 self-drafter",
    );
}
