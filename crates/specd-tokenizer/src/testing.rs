//! Writers for tiny GGUF files, for tests here and in other crates.
//!
//! [`write_gguf`] writes a complete little-endian GGUF (v2 or v3) file from key/values and
//! optional tensors; [`tiny_tokenizer_kv`] produces the `tokenizer.ggml.*` metadata of a
//! tiny but real byte-level BPE tokenizer (256 byte tokens in GPT-2 byte-to-unicode form,
//! a few merges, and the ChatML specials), so the whole GGUF → [`crate::SpecdTokenizer`]
//! path can be exercised without real model files. Other crates can append these
//! key/values to their own tiny-model metadata.

use std::io::{self, Write};
use std::path::Path;

use crate::gguf_meta::{GgufValueType, MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::tokenizer::{
    byte_to_char, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED,
};

/// A tensor to write with [`write_gguf`]: the bytes are written verbatim, padded to the
/// file's alignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorSpec {
    /// Tensor name.
    pub name: String,
    /// Dimensions in ggml order (innermost first).
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32, 1 = F16, ...).
    pub ggml_type: u32,
    /// The raw tensor data.
    pub data: Vec<u8>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn write_str<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value<W: Write>(w: &mut W, v: &MetaValue) -> io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        MetaValue::String(s) => write_str(w, s),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Array(ty, items) => {
            w.write_all(&ty.id().to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                if item.value_type() != *ty {
                    return Err(invalid(format!(
                        "array declared {ty:?} holds a {:?}",
                        item.value_type()
                    )));
                }
                write_value(w, item)?;
            }
            Ok(())
        }
    }
}

/// Writes a complete GGUF file (`version` 2 or 3): header, `kvs` in order, the tensor-info
/// table and the tensor data, each tensor aligned to `general.alignment` (taken from `kvs`,
/// default 32).
pub fn write_gguf<W: Write>(
    w: &mut W,
    version: u32,
    kvs: &[(String, MetaValue)],
    tensors: &[GgufTensorSpec],
) -> io::Result<()> {
    if version != 2 && version != 3 {
        return Err(invalid(format!(
            "can only write GGUF v2/v3, not v{version}"
        )));
    }
    let alignment = kvs
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT)
        .max(1);
    let pad = |n: u64| n.div_ceil(alignment) * alignment - n;

    let mut head = Vec::new();
    head.extend_from_slice(&GGUF_MAGIC);
    head.extend_from_slice(&version.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        write_str(&mut head, k)?;
        head.extend_from_slice(&v.value_type().id().to_le_bytes());
        write_value(&mut head, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        let len = t.data.len() as u64;
        offset += len + pad(len);
    }
    let head_pad = pad(head.len() as u64) as usize;
    head.resize(head.len() + head_pad, 0);
    w.write_all(&head)?;
    for t in tensors {
        w.write_all(&t.data)?;
        w.write_all(&vec![0u8; pad(t.data.len() as u64) as usize])?;
    }
    Ok(())
}

/// The merges of the tiny tokenizer, in priority order (GGUF `"left right"` form).
///
/// They cover `"hello"`, `" the"`, `" world"`, runs of spaces and newlines, and `"ä½"` —
/// the first two bytes of `你` (E4 BD A0), so that one token ends mid-character.
pub const TINY_MERGES: &[&str] = &[
    "Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    "Ġ Ġ", "Ċ Ċ", "ä ½", "Ġ hello",
];

/// The special (CONTROL) tokens of the tiny tokenizer, appended after the merged tokens.
pub const TINY_SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A user-defined (non-special, but matched whole) added token of the tiny tokenizer.
pub const TINY_USER_DEFINED: &str = "<tool_call>";

/// A ChatML template string that mentions nothing model-specific.
pub const TINY_CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The tokens of the tiny tokenizer, in id order: 256 byte tokens (byte `b` has id `b`),
/// then one token per entry of [`TINY_MERGES`], then [`TINY_SPECIALS`], then
/// [`TINY_USER_DEFINED`].
pub fn tiny_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    for m in TINY_MERGES {
        tokens.push(m.replace(' ', ""));
    }
    tokens.extend(TINY_SPECIALS.iter().map(|s| s.to_string()));
    tokens.push(TINY_USER_DEFINED.to_string());
    tokens
}

/// The id of `token` in the tiny tokenizer (see [`tiny_tokens`]).
pub fn tiny_token_id(token: &str) -> Option<u32> {
    tiny_tokens()
        .iter()
        .position(|t| t == token)
        .and_then(|i| u32::try_from(i).ok())
}

fn str_array(items: impl IntoIterator<Item = String>) -> MetaValue {
    MetaValue::Array(
        GgufValueType::String,
        items.into_iter().map(MetaValue::String).collect(),
    )
}

/// The `tokenizer.ggml.*` (and, if given, `tokenizer.chat_template`) metadata of the tiny
/// byte-level BPE tokenizer. `pre` is the `tokenizer.ggml.pre` value (`"qwen2"`,
/// `"smollm"`, ...). bos, eos and padding are all `<|endoftext|>`; `add_bos_token` is false.
pub fn tiny_tokenizer_kv(pre: &str, chat_template: Option<&str>) -> Vec<(String, MetaValue)> {
    let tokens = tiny_tokens();
    let n_plain = 256 + TINY_MERGES.len();
    let types: Vec<MetaValue> = (0..tokens.len())
        .map(|i| {
            MetaValue::I32(if i < n_plain {
                TOKEN_TYPE_NORMAL
            } else if i < n_plain + TINY_SPECIALS.len() {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            })
        })
        .collect();
    let eot = n_plain as u32;
    let mut kvs = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::String(pre.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), str_array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(GgufValueType::I32, types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            str_array(TINY_MERGES.iter().map(|s| s.to_string())),
        ),
        (
            "tokenizer.ggml.bos_token_id".to_string(),
            MetaValue::U32(eot),
        ),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            MetaValue::U32(eot),
        ),
        (
            "tokenizer.ggml.padding_token_id".to_string(),
            MetaValue::U32(eot),
        ),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            MetaValue::Bool(false),
        ),
    ];
    if let Some(t) = chat_template {
        kvs.push((
            "tokenizer.chat_template".to_string(),
            MetaValue::String(t.to_string()),
        ));
    }
    kvs
}

/// Writes a GGUF v3 file at `path` holding `general.architecture = "tiny"` plus
/// [`tiny_tokenizer_kv`]`(pre, chat_template)`, and no tensors.
pub fn write_tiny_gguf_tokenizer(
    path: &Path,
    pre: &str,
    chat_template: Option<&str>,
) -> io::Result<()> {
    let mut kvs = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("tiny".into()),
        ),
        (
            "general.name".to_string(),
            MetaValue::String("tiny tokenizer".into()),
        ),
    ];
    kvs.extend(tiny_tokenizer_kv(pre, chat_template));
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    write_gguf(&mut file, 3, &kvs, &[])?;
    file.flush()
}

/// The tiny tokenizer itself (qwen2 pre-tokenizer, ChatML template), built in memory.
pub fn tiny_tokenizer() -> crate::SpecdTokenizer {
    let mut kvs = vec![(
        "general.architecture".to_string(),
        MetaValue::String("tiny".into()),
    )];
    kvs.extend(tiny_tokenizer_kv("qwen2", Some(TINY_CHATML_TEMPLATE)));
    let mut bytes = Vec::new();
    // Writing to memory cannot fail, and the tiny metadata always forms a valid tokenizer.
    #[allow(clippy::expect_used)]
    {
        write_gguf(&mut bytes, 3, &kvs, &[]).expect("writing to memory");
        let meta = crate::GgufMeta::read(&mut io::Cursor::new(bytes)).expect("tiny GGUF reads");
        crate::SpecdTokenizer::from_gguf_meta(&meta).expect("tiny tokenizer builds")
    }
}

/// The policy for a test whose model file is missing. Under `CI`, or with `SPECD_REQUIRE_MODELS` set
/// (`make test` sets it), a missing model is a failure: the environment is broken, and a silent skip
/// would turn coverage off unnoticed. Elsewhere the test prints `SKIP: ...` and the reason is appended
/// to the file `$SPECD_SKIP_LOG`, if set, so a run can say how many tests it skipped (`make
/// test-fast` does).
pub fn missing_model(path: &std::path::Path) {
    let reason = format!(
        "model file {} not found (run `make models`, or set SPECD_MODELS_DIR)",
        path.display()
    );
    if std::env::var_os("CI").is_some() || std::env::var_os("SPECD_REQUIRE_MODELS").is_some() {
        panic!("{reason}; CI / SPECD_REQUIRE_MODELS is set, so real-model tests must run");
    }
    println!("SKIP: {reason}");
    if let Some(log) = std::env::var_os("SPECD_SKIP_LOG") {
        // Best effort: the count is a report, not a test result.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{reason}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufMeta;

    #[test]
    fn tiny_file_round_trips_through_the_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf_tokenizer(&path, "qwen2", Some(TINY_CHATML_TEMPLATE)).expect("write");
        let meta = GgufMeta::open(&path).expect("read");
        assert_eq!(meta.architecture(), Some("tiny"));
        assert_eq!(meta.get_str("tokenizer.ggml.pre"), Some("qwen2"));
        let tokens = meta.get_str_array("tokenizer.ggml.tokens").expect("tokens");
        assert_eq!(tokens.len(), tiny_tokens().len());
        assert_eq!(tokens[b'a' as usize], "a");
        assert_eq!(tokens[b' ' as usize], "Ġ");
        assert_eq!(tokens[b'\n' as usize], "Ċ");
        assert_eq!(tiny_token_id("<|im_start|>"), Some(272));
    }

    #[test]
    fn rejects_mistyped_arrays() {
        let kvs = vec![(
            "k".to_string(),
            MetaValue::Array(GgufValueType::U8, vec![MetaValue::U32(1)]),
        )];
        assert!(write_gguf(&mut Vec::new(), 3, &kvs, &[]).is_err());
        assert!(write_gguf(&mut Vec::new(), 1, &[], &[]).is_err());
    }
}
