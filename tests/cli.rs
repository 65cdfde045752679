//! The `specd` binary end to end, on tiny model files (hermetic) and SmolLM2 (real, skipped when absent).
//!
//! - `specd generate` writes only the generated text (plus a newline) to stdout and the stats line to
//!   stderr; the text is what the engine's plain greedy decoding produces, whatever the drafter.
//! - Every bad input (missing, corrupt or truncated model files, empty or oversized prompts, invalid
//!   UTF-8, out-of-range numbers, unknown names, a drafter without a draft model, a draft model with
//!   another tokenizer) exits non-zero with a clear `error:` message naming the problem on stderr,
//!   nothing on stdout, and no panic.
//! - `specd models fetch` exists (only its `--help` is run).
//!
//! The binary is built once per test run with `cargo build -p specd` into the target directory these
//! tests run from (a no-op when it is up to date, and never a stale binary); set `SPECD_BIN` to use
//! another one.
#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use specd_core::SamplingParams;
use specd_engine::{load_gguf, Family, GenerateOptions, Generator, LoadedModel};
use specd_tests::{model_file, specd_bin, temp_dir, tiny_spec, write_tiny, SMOLLM_FILE};
use specd_tokenizer::DecodeStream;

/// Longest a single `specd` run may take before the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `specd args...` with no `SPECD_*` variables from the environment, with a timeout.
fn specd<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    specd_with_stdout(args, None)
}

/// [`specd`] with stdout sent to `stdout` instead of captured (the output's `stdout` is then empty).
fn specd_with_stdout<I, S>(args: I, stdout: Option<std::fs::File>) -> Output
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = Command::new(specd_bin());
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(stdout.map_or_else(Stdio::piped, Stdio::from))
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPECD_") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd.spawn().expect("spawning specd");
    let pipe_reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).ok();
            buf
        })
    };
    let out_t = match child.stdout.take() {
        Some(o) => pipe_reader(Box::new(o)),
        None => pipe_reader(Box::new(std::io::empty())),
    };
    let err_t = pipe_reader(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for specd") {
            break s;
        }
        if start.elapsed() > RUN_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            panic!("specd {args:?} ran longer than {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8(out_t.join().unwrap()).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    Output {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// A temporary directory holding tiny models (and an empty `models/` directory to point presets at).
struct Fixture {
    dir: tempfile::TempDir,
    qwen: PathBuf,
    qwen_draft: PathBuf,
    llama: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = temp_dir();
        let qwen = write_tiny(dir.path(), &tiny_spec(Family::Qwen2, 5));
        let mut draft = tiny_spec(Family::Qwen2, 5);
        draft.layers = 2;
        let qwen_draft = write_tiny(dir.path(), &draft);
        let llama = write_tiny(dir.path(), &tiny_spec(Family::Llama, 6));
        std::fs::create_dir(dir.path().join("models")).unwrap();
        Self {
            dir,
            qwen,
            qwen_draft,
            llama,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn empty_models_dir(&self) -> PathBuf {
        self.path("models")
    }

    /// `generate --model-preset smollm --models-dir <empty> --model <model>` plus `extra`.
    fn generate(&self, model: &Path, extra: &[&str]) -> Output {
        let mut args: Vec<OsString> = vec![
            "generate".into(),
            "--model-preset".into(),
            "smollm".into(),
            "--models-dir".into(),
            self.empty_models_dir().into(),
            "--model".into(),
            model.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        specd(args)
    }
}

/// What `specd generate --raw` must print for `prompt`: plain greedy decoding with the tokenizer's stop
/// ids, detokenized with special tokens skipped, then a newline; and the token count.
fn expected_stdout(model: &LoadedModel, prompt: &str, max_new: usize) -> (String, usize) {
    let ids = model.tokenizer.encode(prompt, false).unwrap();
    let mut opts = GenerateOptions::new(max_new, SamplingParams::greedy());
    opts.stop_ids = model.tokenizer.stop_ids().to_vec();
    let mut stream = DecodeStream::new(&model.tokenizer, true);
    let mut text = String::new();
    let mut g = Generator::new(model.model.clone(), None);
    let (out, _) = g
        .generate(&ids, &opts, |t| {
            text.push_str(&stream.push_many(t).unwrap());
            true
        })
        .unwrap();
    text.push_str(&stream.finish());
    text.push('\n');
    (text, out.len())
}

#[track_caller]
fn assert_clean_failure(out: &Output, keyword: &str, what: &str) {
    assert!(!out.success(), "{what}: exited successfully\n{out:#?}");
    assert!(out.code.is_some(), "{what}: killed by a signal\n{out:#?}");
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "{what}: panicked\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("error"),
        "{what}: no error message\n{}",
        out.stderr
    );
    assert!(
        out.stderr.to_lowercase().contains(&keyword.to_lowercase()),
        "{what}: stderr does not mention {keyword:?}:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: wrote to stdout: {:?}",
        out.stdout
    );
}

#[test]
fn generate_prints_text_to_stdout_and_stats_to_stderr() {
    let fx = Fixture::new();
    let model = load_gguf(&fx.qwen).unwrap();
    let (expected, tokens) = expected_stdout(&model, "hi", 8);
    assert!(tokens > 0);
    let out = fx.generate(
        &fx.qwen,
        &[
            "--drafter",
            "none",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "8",
            "--raw",
        ],
    );
    assert!(out.success(), "{out:#?}");
    assert_eq!(
        out.stdout, expected,
        "stdout must be exactly the generated text and a newline"
    );
    assert!(!out.stderr.contains("panicked"));
    let stats: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("[specd]"))
        .collect();
    assert_eq!(stats.len(), 1, "one stats line on stderr: {:?}", out.stderr);
    assert!(stats[0].contains("drafter=none"), "{}", stats[0]);
    assert!(
        stats[0].contains(&format!("tokens={tokens}")),
        "{}",
        stats[0]
    );

    // The same as JSON.
    let out = fx.generate(
        &fx.qwen,
        &[
            "--drafter",
            "none",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "8",
            "--raw",
            "--json-stats",
        ],
    );
    assert!(out.success(), "{out:#?}");
    assert_eq!(out.stdout, expected);
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON stats line");
    let json: serde_json::Value = serde_json::from_str(line).expect("stats line is JSON");
    assert_eq!(json["drafter"], "none");
    assert_eq!(json["tokens"], tokens as u64);
    assert_eq!(json["drafted"], 0);
    assert!(json["prompt_tokens"].as_u64().unwrap() > 0);
}

/// Greedy output through the CLI does not depend on the drafter or the draft length.
#[test]
fn generate_output_is_the_same_with_every_drafter() {
    let fx = Fixture::new();
    let model = load_gguf(&fx.qwen).unwrap();
    let prompt = "hello world, hello world, hello";
    let (expected, _) = expected_stdout(&model, prompt, 24);
    let draft = fx.qwen_draft.to_str().unwrap();
    let configs: Vec<Vec<&str>> = vec![
        vec!["--drafter", "none"],
        vec!["--drafter", "self"],
        vec![
            "--drafter",
            "self",
            "--self-layers",
            "2",
            "--draft-len",
            "3",
        ],
        vec!["--drafter", "ngram"],
        vec!["--drafter", "ngram", "--draft-len", "1000"],
        vec!["--drafter", "auto"],
        vec!["--drafter", "model", "--draft-model", draft],
        vec![
            "--drafter",
            "model",
            "--draft-model",
            draft,
            "--draft-len",
            "0",
        ],
        vec![
            "--drafter",
            "model",
            "--draft-model",
            draft,
            "--draft-len",
            "5",
            "--threads",
            "1",
        ],
    ];
    for cfg in configs {
        let mut args = vec![
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
            "--raw",
            "--json-stats",
        ];
        args.extend(cfg.iter().copied());
        let out = fx.generate(&fx.qwen, &args);
        assert!(out.success(), "{cfg:?}: {out:#?}");
        assert_eq!(
            out.stdout, expected,
            "{cfg:?}: output differs from plain greedy"
        );
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON stats line");
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            json["accepted"].as_u64().unwrap() <= json["drafted"].as_u64().unwrap(),
            "{cfg:?}: {json}"
        );
    }
    // With the chat template (not --raw) it runs too.
    let out = fx.generate(
        &fx.qwen,
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--drafter",
            "ngram",
        ],
    );
    assert!(out.success(), "{out:#?}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let fx = Fixture::new();
    // Model files.
    let random = fx.path("random.gguf");
    let mut bytes = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.push(x as u8);
    }
    std::fs::write(&random, &bytes).unwrap();
    let truncated = fx.path("truncated.gguf");
    let full = std::fs::read(&fx.qwen).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let empty = fx.path("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let tokenizer_only = fx.path("tokenizer-only.gguf");
    specd_tokenizer::testing::write_tiny_gguf_tokenizer(&tokenizer_only, "qwen2", None).unwrap();
    let missing = fx.path("missing.gguf");

    let model_cases: [(&str, &Path, &str); 6] = [
        ("missing model file", &missing, "not found"),
        ("random bytes", &random, "GGUF"),
        ("truncated model file", &truncated, "truncated"),
        ("empty model file", &empty, "GGUF"),
        ("a directory as the model", fx.dir.path(), "GGUF"),
        ("GGUF without tensors", &tokenizer_only, "missing tensor"),
    ];
    for (what, path, keyword) in model_cases {
        let args = [
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--raw",
            "--drafter",
            "none",
        ];
        assert_clean_failure(&fx.generate(path, &args), keyword, what);
    }

    // A preset whose files are not there.
    let out = specd([
        OsString::from("generate"),
        "--model-preset".into(),
        "smollm".into(),
        "--models-dir".into(),
        fx.empty_models_dir().into(),
        "--prompt".into(),
        "hi".into(),
    ]);
    assert_clean_failure(&out, "not found", "preset without its files");
    let out = specd(["generate", "--model-preset", "bogus", "--prompt", "hi"]);
    assert_clean_failure(&out, "preset", "unknown preset");

    // Prompts.
    let long_prompt: String = (0..3000)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let bad_utf8 = fx.path("bad-utf8.txt");
    std::fs::write(&bad_utf8, b"hello \xff\xfe world \xc3\x28").unwrap();
    let bad_utf8 = bad_utf8.to_str().unwrap().to_string();
    let missing_prompt_file = fx.path("no-such-prompt.txt").to_str().unwrap().to_string();
    let prompt_cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("empty prompt", vec!["--prompt", ""], "empty"),
        (
            "whitespace-only prompt",
            vec!["--prompt", "  \n\t  "],
            "empty",
        ),
        (
            "prompt longer than the context",
            vec!["--prompt", &long_prompt],
            "context",
        ),
        (
            "invalid UTF-8 prompt file",
            vec!["--prompt-file", &bad_utf8],
            "UTF-8",
        ),
        (
            "missing prompt file",
            vec!["--prompt-file", &missing_prompt_file],
            "reading",
        ),
        ("no prompt", vec![], "prompt"),
        (
            "prompt and prompt file",
            vec!["--prompt", "hi", "--prompt-file", &bad_utf8],
            "cannot be used",
        ),
    ];
    for (what, prompt_args, keyword) in prompt_cases {
        let mut args = prompt_args.clone();
        args.extend(["--max-new-tokens", "4", "--raw", "--drafter", "none"]);
        assert_clean_failure(&fx.generate(&fx.qwen, &args), keyword, what);
    }

    // Numbers and names.
    let draft = fx.qwen_draft.to_str().unwrap();
    let llama = fx.llama.to_str().unwrap();
    let missing_draft = fx.path("no-draft.gguf").to_str().unwrap().to_string();
    let value_cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "zero new tokens",
            vec!["--max-new-tokens", "0"],
            "max-new-tokens",
        ),
        (
            "absurd new tokens",
            vec!["--max-new-tokens", "100000000"],
            "context",
        ),
        (
            "negative new tokens",
            vec!["--max-new-tokens=-3"],
            "max-new-tokens",
        ),
        ("unknown drafter", vec!["--drafter", "bogus"], "drafter"),
        (
            "drafter model without a draft model",
            vec!["--drafter", "model"],
            "draft model",
        ),
        (
            "missing draft model",
            vec!["--drafter", "model", "--draft-model", &missing_draft],
            "not found",
        ),
        (
            "draft model with another tokenizer",
            vec!["--drafter", "model", "--draft-model", llama],
            "tokenizer",
        ),
        (
            "negative temperature",
            vec!["--temperature=-1"],
            "temperature",
        ),
        (
            "NaN temperature",
            vec!["--temperature", "NaN"],
            "temperature",
        ),
        (
            "huge temperature",
            vec!["--temperature", "1e9"],
            "temperature",
        ),
        (
            "top_p 0",
            vec!["--temperature", "1", "--top-p", "0"],
            "top_p",
        ),
        (
            "top_p 1.5",
            vec!["--temperature", "1", "--top-p", "1.5"],
            "top_p",
        ),
        ("zero threads", vec!["--threads", "0"], "threads"),
        (
            "zero self layers",
            vec!["--drafter", "self", "--self-layers", "0"],
            "layer",
        ),
        (
            "too many self layers",
            vec!["--drafter", "self", "--self-layers", "99"],
            "layer",
        ),
    ];
    for (what, value_args, keyword) in value_cases {
        let mut args = vec!["--prompt", "hi", "--raw"];
        if !value_args.iter().any(|a| a.starts_with("--max-new-tokens")) {
            args.extend(["--max-new-tokens", "4"]);
        }
        if !value_args.contains(&"--drafter") {
            args.extend(["--drafter", "none"]);
        }
        args.extend(value_args.iter().copied());
        assert_clean_failure(&fx.generate(&fx.qwen, &args), keyword, what);
    }
    // The valid draft model does work with the same flags, so the mismatch case is about the tokenizer.
    let out = fx.generate(
        &fx.qwen,
        &[
            "--prompt",
            "hi",
            "--raw",
            "--max-new-tokens",
            "4",
            "--drafter",
            "model",
            "--draft-model",
            draft,
        ],
    );
    assert!(out.success(), "{out:#?}");
    let (a, b) = (load_gguf(&fx.qwen).unwrap(), load_gguf(&fx.llama).unwrap());
    assert_ne!(a.tokenizer.fingerprint(), b.tokenizer.fingerprint());
}

/// The real SmolLM2 file as the draft model of a tiny target: another tokenizer, refused; and the
/// smollm preset itself generates.
#[test]
fn smollm_preset_and_tokenizer_mismatch() {
    let Some(smollm) = model_file(SMOLLM_FILE) else {
        return;
    };
    let fx = Fixture::new();
    let out = fx.generate(
        &fx.qwen,
        &[
            "--prompt",
            "hi",
            "--raw",
            "--max-new-tokens",
            "4",
            "--drafter",
            "model",
            "--draft-model",
            smollm.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&out, "tokenizer", "SmolLM2 drafting for a tiny target");
    assert!(out.stderr.contains("differs"), "{}", out.stderr);

    let models_dir = smollm.parent().unwrap();
    let out = specd([
        OsString::from("generate"),
        "--model-preset".into(),
        "smollm".into(),
        "--models-dir".into(),
        models_dir.into(),
        "--prompt".into(),
        "What is 2 + 2?".into(),
        "--max-new-tokens".into(),
        "8".into(),
        "--drafter".into(),
        "ngram".into(),
    ]);
    assert!(out.success(), "{out:#?}");
    assert!(!out.stdout.trim().is_empty(), "no text generated");
    assert!(out.stderr.contains("drafter=ngram"), "{}", out.stderr);
    // The smollm preset has no separate draft model.
    let out = specd([
        OsString::from("generate"),
        "--model-preset".into(),
        "smollm".into(),
        "--models-dir".into(),
        models_dir.into(),
        "--prompt".into(),
        "hi".into(),
        "--drafter".into(),
        "model".into(),
    ]);
    assert_clean_failure(&out, "draft model", "smollm preset with drafter model");
}

/// A stdout that cannot be written (a full disk) is an error exit with a message, not a panic.
#[test]
fn unwritable_stdout_fails_cleanly() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        println!("SKIP: no /dev/full on this system");
        return;
    };
    let fx = Fixture::new();
    let mut args: Vec<OsString> = vec![
        "generate".into(),
        "--model-preset".into(),
        "smollm".into(),
        "--models-dir".into(),
        fx.empty_models_dir().into(),
        "--model".into(),
        fx.qwen.clone().into(),
    ];
    args.extend(
        [
            "--prompt",
            "hi",
            "--raw",
            "--max-new-tokens",
            "8",
            "--drafter",
            "ngram",
        ]
        .map(OsString::from),
    );
    let out = specd_with_stdout(args, Some(full));
    assert_clean_failure(&out, "No space left", "stdout on a full device");
}

#[test]
fn help_and_models_fetch_exist() {
    let out = specd(["models", "fetch", "--help"]);
    assert!(out.success(), "{out:#?}");
    assert!(
        out.stdout.to_lowercase().contains("fetch") || out.stdout.contains("Usage"),
        "{}",
        out.stdout
    );
    for args in [
        &["--help"][..],
        &["generate", "--help"],
        &["bench", "--help"],
        &["--version"],
    ] {
        let out = specd(args.iter().copied());
        assert!(out.success(), "{args:?}: {out:#?}");
        assert!(!out.stdout.is_empty(), "{args:?}: nothing printed");
    }
    let out = specd(["frobnicate"]);
    assert!(!out.success());
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let out = specd(std::iter::empty::<&str>());
    assert!(!out.success(), "no subcommand must be an error");
}

#[test]
fn generate_tp2_prints_the_same_text_as_tp1_and_refuses_degrees_that_do_not_fit() {
    let fx = Fixture::new();
    // f32 weights: TP=2 equals TP=1 within rounding, so greedy text is the same token for token.
    let float = write_tiny(
        fx.dir.path(),
        &specd_engine::testing::TinySpec {
            float: true,
            ..tiny_spec(Family::Qwen2, 5)
        },
    );
    let prompt = [
        "--raw",
        "--prompt",
        "hello world, hello",
        "--max-new-tokens",
        "24",
    ];
    let with = |extra: &[&str]| {
        let mut a = prompt.to_vec();
        a.extend_from_slice(extra);
        fx.generate(&float, &a)
    };
    let one = with(&["--drafter", "none"]);
    assert!(one.success(), "{one:#?}");
    for drafter in ["none", "self", "ngram"] {
        let two = with(&["--drafter", drafter, "--tp", "2", "--threads", "2"]);
        assert!(two.success(), "{two:#?}");
        assert_eq!(two.stdout, one.stdout, "--tp 2 --drafter {drafter}");
        if drafter == "none" {
            assert!(two.stderr.contains("tensor parallel"), "{}", two.stderr);
        }
    }
    // 4 query heads and 2 KV heads: degree 3 does not divide them.
    assert_clean_failure(&with(&["--tp", "3"]), "degree 3", "--tp 3");
    assert_clean_failure(&with(&["--tp", "0"]), "--tp", "--tp 0");
}
