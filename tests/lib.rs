//! Shared helpers for the integration tests: where the real model files live (and skipping when they are
//! absent), tiny random-weight models in a temporary directory, rewriting GGUF files, plain greedy
//! reference decoding, bitwise comparison of logits and the row-independence check of the kernels.
//!
//! Real-model tests look in `$SPECD_MODELS_DIR`, else the workspace's `models/` directory. A missing
//! file fails the test under `CI` or `SPECD_REQUIRE_MODELS` (`make test`); elsewhere the test prints a
//! `SKIP: ...` line and passes (`make test-fast` points the variable at a missing directory and reports
//! how many tests skipped).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use specd_core::SamplingParams;
use specd_engine::testing::{write_tiny_model, TinySpec};
use specd_engine::{
    load_gguf, Family, GenerateOptions, GenerationStats, Generator, LoadedModel, Model,
};

pub use specd_engine::preset::{QWEN_DRAFT_FILE, QWEN_TARGET_FILE, SMOLLM_FILE};

/// The directory holding the real model files.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("SPECD_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"),
    }
}

/// `Some(path)` when `path` exists; else, under `CI` or `SPECD_REQUIRE_MODELS`, a failure, and
/// elsewhere a `SKIP:` line (counted in `$SPECD_SKIP_LOG`) and `None`.
pub fn skip_unless(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        Some(path.to_path_buf())
    } else {
        specd_tokenizer::testing::missing_model(path);
        None
    }
}

/// The real model file `name` in [`models_dir`], or `None` (with a `SKIP:` line) when absent.
pub fn model_file(name: &str) -> Option<PathBuf> {
    skip_unless(&models_dir().join(name))
}

/// Loads the real model file `name`, or `None` (with a `SKIP:` line) when absent.
pub fn load_real(name: &str) -> Option<LoadedModel> {
    let path = model_file(name)?;
    Some(load_gguf(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
}

/// The default tiny model shape for `family` and `seed` (3 layers, hidden 256, context 512).
pub fn tiny_spec(family: Family, seed: u64) -> TinySpec {
    TinySpec::new(family, seed)
}

/// Writes a tiny model of shape `spec` into `dir` and returns its path. The file name encodes the
/// family, seed and every size, the scale and the weight format, so different specs never overwrite each
/// other.
pub fn write_tiny(dir: &Path, spec: &TinySpec) -> PathBuf {
    let path = dir.join(format!(
        "tiny-{}-s{}-l{}-h{}x{}x{}-f{}-c{}-x{}{}.gguf",
        spec.family.name(),
        spec.seed,
        spec.layers,
        spec.hidden,
        spec.heads,
        spec.kv_heads,
        spec.ffn,
        spec.context,
        spec.scale,
        if spec.float { "-f32" } else { "" }
    ));
    write_tiny_model(&path, spec).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Writes and loads a tiny model of shape `spec` in `dir`.
pub fn tiny_model_spec(dir: &Path, spec: &TinySpec) -> LoadedModel {
    let path = write_tiny(dir, spec);
    load_gguf(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Writes and loads the default tiny model of `family` with `seed` in `dir`.
pub fn tiny_model(dir: &Path, family: Family, seed: u64) -> LoadedModel {
    tiny_model_spec(dir, &tiny_spec(family, seed))
}

/// A fresh temporary directory for model files.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

/// Plain (drafter-free) generation of up to `max_new` tokens after `prompt`.
pub fn plain_generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    params: SamplingParams,
) -> (Vec<u32>, GenerationStats) {
    let mut g = Generator::new(model.clone(), None);
    g.generate(prompt, &GenerateOptions::new(max_new, params), |_| true)
        .expect("plain generation")
}

/// Plain greedy generation of up to `max_new` tokens after `prompt`: the independent reference
/// ([`plain_greedy`], not the engine's `Generator`), with no stop tokens.
pub fn greedy_reference(model: &Model, prompt: &[u32], max_new: usize) -> Vec<u32> {
    plain_greedy(model, prompt, max_new, &[])
}

/// The reference every greedy-equality test compares against: feed the prompt, take the argmax, feed
/// it back, one token at a time, until `max_new` tokens, a stop token (not emitted) or the end of the
/// context. Written here from `Model::forward` alone, so that a fault in the engine's generation loop
/// (`Generator`, which speculation shares) cannot hide in both sides of a comparison.
pub fn plain_greedy(model: &Model, prompt: &[u32], max_new: usize, stop_ids: &[u32]) -> Vec<u32> {
    let context = model.config().context;
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    if prompt.is_empty() || prompt.len() >= context {
        return out;
    }
    let mut logits = model
        .forward(&mut cache, prompt, specd_engine::LogitsWanted::Last)
        .expect("reference forward");
    while out.len() < max_new && prompt.len() + out.len() < context {
        let t = specd_core::argmax(&logits);
        if stop_ids.contains(&t) {
            break;
        }
        out.push(t);
        if out.len() == max_new || prompt.len() + out.len() >= context {
            break;
        }
        logits = model
            .forward(&mut cache, &[t], specd_engine::LogitsWanted::Last)
            .expect("reference forward");
    }
    out
}

/// Asserts `a` and `b` hold the same f32 values bit for bit (so `-0.0 != 0.0`, and NaNs compare by
/// payload), naming the first differing index on failure.
#[track_caller]
pub fn assert_bitwise_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
    {
        let diffs = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        panic!(
            "{what}: {diffs} of {} values differ; first at index {i}: {} vs {} (bits {:#010x} vs {:#010x})",
            a.len(),
            a[i],
            b[i],
            a[i].to_bits(),
            b[i].to_bits()
        );
    }
}

/// The real model file `name`, loaded once per test binary and shared by its tests (leaked: it lives as
/// long as the process); `None`, with a `SKIP:` line at every call, when absent.
pub fn shared_real(name: &'static str) -> Option<&'static LoadedModel> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LOADED: OnceLock<Mutex<HashMap<&'static str, &'static LoadedModel>>> = OnceLock::new();
    model_file(name)?;
    // Loading under the lock: concurrent tests wanting the same file wait for one load.
    let mut map = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let model = *map
        .entry(name)
        .or_insert_with(|| Box::leak(Box::new(load_real(name).expect("model file exists"))));
    Some(model)
}

/// Copies the GGUF file `src` to `dst`, letting `edit` change its key/values and tensors on the way
/// (tensor data is handed over verbatim, possibly with trailing alignment padding).
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(
        &mut Vec<(String, specd_tokenizer::MetaValue)>,
        &mut Vec<specd_tokenizer::testing::GgufTensorSpec>,
    ),
) {
    use specd_tokenizer::testing::{write_gguf, GgufTensorSpec};
    let meta = specd_tokenizer::GgufMeta::open(src).expect("reading GGUF metadata");
    let bytes = std::fs::read(src).expect("reading the GGUF file");
    let base = meta.data_offset() as usize;
    let mut offsets: Vec<u64> = meta.tensors().iter().map(|t| t.offset).collect();
    offsets.sort_unstable();
    let mut tensors: Vec<GgufTensorSpec> = meta
        .tensors()
        .iter()
        .map(|t| {
            let end = offsets
                .iter()
                .find(|&&o| o > t.offset)
                .map_or(bytes.len(), |&o| base + o as usize);
            GgufTensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ggml_type: t.ggml_type,
                data: bytes[base + t.offset as usize..end].to_vec(),
            }
        })
        .collect();
    let mut kvs = meta.metadata().to_vec();
    edit(&mut kvs, &mut tensors);
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(dst).expect("creating the GGUF file"));
    write_gguf(&mut out, meta.version(), &kvs, &tensors).expect("writing the GGUF file");
    std::io::Write::flush(&mut out).expect("writing the GGUF file");
}

/// `QWeight::matmul` of `m` rows equals each row multiplied alone, bit for bit, for the embedding, the
/// head and every matrix of `layers`, and each row count in `counts`.
pub fn check_matmul_rows(model: &Model, layers: &[usize], counts: &[usize], what: &str) {
    let w = model.weights();
    let mut mats: Vec<(String, &specd_engine::qweight::QWeight)> =
        vec![("embedding".into(), &w.embed)];
    for &li in layers {
        for (name, m) in w.layers[li].matrices() {
            mats.push((format!("layer {li} {name}"), m));
        }
    }
    if let Some(h) = &w.lm_head {
        mats.push(("head".into(), h));
    }
    for (name, qw) in mats {
        let (n, k) = (qw.rows(), qw.cols());
        for &m in counts {
            // Activations of realistic size, different in every row.
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 + 13) % 2003) as f32 / 2003.0 * 6.0 - 3.0)
                .collect();
            let all = qw.matmul(&x, m);
            assert_eq!(all.len(), m * n);
            for r in 0..m {
                let one = qw.matmul(&x[r * k..(r + 1) * k], 1);
                assert_bitwise_eq(
                    &one,
                    &all[r * n..(r + 1) * n],
                    &format!("{what}: {name} ({qw:?}), row {r} of {m} vs alone"),
                );
            }
        }
    }
}

/// The `specd` binary, built on first use.
pub fn specd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SPECD_BIN") {
            return PathBuf::from(p);
        }
        // Tests run from <target>/<profile dir>/deps/.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("a target directory")
            .to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace)
            .args([
                "build",
                "--quiet",
                "-p",
                "specd",
                "--bin",
                "specd",
                "--target-dir",
            ])
            .arg(&target_dir);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => panic!(
                "cannot tell the build profile from {}",
                profile_dir.display()
            ),
        }
        let out = cmd.output().expect("running cargo build -p specd");
        assert!(
            out.status.success(),
            "cargo build -p specd failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join(format!("specd{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}
