//! [`SpecdTokenizer`]: a byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*`
//! metadata, with no hub access.
//!
//! Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE, as used by Qwen2 and SmolLM2) is
//! supported. The pre-tokenizer is chosen by `tokenizer.ggml.pre` so that encoding matches
//! the model's original `tokenizer.json`:
//!
//! | `tokenizer.ggml.pre`          | pre-tokenizer                                                     |
//! |-------------------------------|-------------------------------------------------------------------|
//! | `qwen2`                       | `Split(Qwen2 regex, Isolated)` + `ByteLevel(false, false, false)` |
//! | `smollm`                      | `Digits(individual)` + `ByteLevel(false, true, true)`             |
//! | `gpt2`, `gpt-2`, `default`, absent | `ByteLevel(false, true, true)` (the GPT-2 regex)             |
//!
//! Tokens of type CONTROL (3) become special added tokens (matched whole in text, dropped
//! by `decode(.., skip_special = true)`); USER_DEFINED (4) tokens become non-special added
//! tokens (matched whole, always decoded).

use std::path::Path;
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf_meta::{GgufMeta, MetaValue};
use crate::TokenizerError;

type Result<T> = std::result::Result<T, TokenizerError>;

/// GGUF token type: ordinary vocabulary entry.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type: unknown token.
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF token type: control/special token (e.g. `<|im_start|>`).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type: user-defined added token.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF token type: unused (e.g. `[PAD123]` vocabulary padding).
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// GGUF token type: raw byte token.
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// Qwen2's pre-tokenizer regex, exactly as in its `tokenizer.json`.
pub const QWEN2_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte-to-unicode map: byte `b` is written in vocabularies as `byte_to_char(b)`.
///
/// Printable bytes (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) map to themselves; the other 68
/// bytes map, in order, to U+0100 onwards (so space is `Ġ` and `\n` is `Ċ`).
pub fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[b as usize]
}

const BYTE_TO_CHAR: [char; 256] = build_byte_to_char();

const fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

const fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let byte = b as u8;
        let code = if is_printable_byte(byte) {
            b as u32
        } else {
            next += 1;
            255 + next
        };
        table[b] = match char::from_u32(code) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

/// The inverse of [`byte_to_char`].
pub fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && is_printable_byte(code as u8) {
        return Some(code as u8);
    }
    if (256..256 + 68).contains(&code) {
        let idx = (code - 256) as usize;
        return (0..=255u8).filter(|&b| !is_printable_byte(b)).nth(idx);
    }
    None
}

/// The bytes a vocabulary entry stands for, decoded exactly as the `ByteLevel` decoder of
/// `tokenizers` does: every char mapped back through [`char_to_byte`], or — if any char is
/// not a byte-level char — the token's own UTF-8 bytes.
pub fn token_bytes(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(char_to_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

/// Which pre-tokenizer a GGUF `tokenizer.ggml.pre` value selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// Qwen2: Split on [`QWEN2_PRETOKENIZE_REGEX`] then ByteLevel without its own regex.
    Qwen2,
    /// SmolLM: individual digits then ByteLevel with the GPT-2 regex.
    SmolLm,
    /// GPT-2: ByteLevel with the GPT-2 regex.
    Gpt2,
}

impl PreTokenizerKind {
    /// Maps a `tokenizer.ggml.pre` value (absent = `None`) to a kind.
    pub fn from_gguf_pre(pre: Option<&str>) -> Result<Self> {
        match pre {
            Some("qwen2") => Ok(Self::Qwen2),
            Some("smollm") => Ok(Self::SmolLm),
            None | Some("gpt2") | Some("gpt-2") | Some("default") => Ok(Self::Gpt2),
            Some(other) => Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.pre = {other:?} (supported: \"qwen2\", \"smollm\", \"gpt2\", \"default\")"
            ))),
        }
    }

    /// A stable name, used in the fingerprint.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::SmolLm => "smollm",
            Self::Gpt2 => "gpt2",
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        Ok(match self {
            Self::Qwen2 => {
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| TokenizerError::Build(format!("qwen2 split regex: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])
                .into()
            }
            Self::SmolLm => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            Self::Gpt2 => ByteLevel::new(false, true, true).into(),
        })
    }
}

/// Bytes of every token plus which are special: shared with [`crate::DecodeStream`].
#[derive(Debug)]
pub(crate) struct TokenTable {
    data: Vec<u8>,
    /// `offsets[i]..offsets[i + 1]` is token `i`'s slice of `data`.
    offsets: Vec<usize>,
    special: Vec<bool>,
}

impl TokenTable {
    fn new(tokens: &[String], special: Vec<bool>) -> Self {
        let mut data = Vec::new();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0);
        for t in tokens {
            data.extend_from_slice(&token_bytes(t));
            offsets.push(data.len());
        }
        Self {
            data,
            offsets,
            special,
        }
    }

    /// The bytes of token `id`, `None` if `id` is out of range.
    pub(crate) fn bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let (start, end) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        self.data.get(start..end)
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Appends the bytes of `id` to `out` unless it is special and `skip_special` is set.
    pub(crate) fn push_bytes(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) -> Result<()> {
        let bytes = self.bytes(id).ok_or_else(|| {
            TokenizerError::Decode(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.special.len()
            ))
        })?;
        if !(skip_special && self.is_special(id)) {
            out.extend_from_slice(bytes);
        }
        Ok(())
    }
}

/// FNV-1a, 64-bit.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// Length-prefixed, so that concatenations cannot collide.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// The model's tokenizer, built from GGUF metadata.
#[derive(Debug, Clone)]
pub struct SpecdTokenizer {
    inner: Tokenizer,
    /// `inner`, except that special-token strings in the text are encoded as the plain text they are
    /// (`<|im_start|>` becomes `<`, `|`, `im`, ...): for text a user wrote, which must never carry
    /// control tokens into a prompt.
    plain: Arc<Tokenizer>,
    tokens: Arc<Vec<String>>,
    token_types: Arc<Vec<i32>>,
    table: Arc<TokenTable>,
    pre: PreTokenizerKind,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_ids: Vec<u32>,
    fingerprint: String,
    chat_template: Option<String>,
}

fn invalid(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidValue {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn str_array<'a>(meta: &'a GgufMeta, key: &str) -> Result<Vec<&'a str>> {
    let items = meta
        .require(key)?
        .as_array()
        .ok_or_else(|| invalid(key, "not an array"))?;
    items
        .iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                invalid(key, format!("expected strings, found {:?}", v.value_type()))
            })
        })
        .collect()
}

/// An optional token-id key: absent or negative (e.g. `-1`) means none; out of range is an error.
fn token_id(meta: &GgufMeta, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    let Some(n) = v.as_i128() else {
        return Err(invalid(key, format!("expected an integer, found {v}")));
    };
    if n < 0 {
        return Ok(None);
    }
    match u32::try_from(n) {
        Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
        _ => Err(invalid(
            key,
            format!("token id {n} is outside the vocabulary ({n_tokens} tokens)"),
        )),
    }
}

impl SpecdTokenizer {
    /// Builds the tokenizer from parsed GGUF metadata.
    pub fn from_gguf_meta(meta: &GgufMeta) -> Result<Self> {
        let model = meta
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {model:?}: only \"gpt2\" (byte-level BPE) is supported{}",
                if model == "llama" {
                    " (\"llama\" is a SentencePiece tokenizer)"
                } else {
                    ""
                }
            )));
        }
        let pre_raw = meta.get_str("tokenizer.ggml.pre");
        let pre = PreTokenizerKind::from_gguf_pre(pre_raw)?;

        let tokens: Vec<String> = str_array(meta, "tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        if tokens.is_empty() {
            return Err(invalid("tokenizer.ggml.tokens", "empty vocabulary"));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(invalid(
                "tokenizer.ggml.tokens",
                "more than u32::MAX tokens",
            ));
        }
        let n = tokens.len();

        let token_types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_TYPE_NORMAL; n],
            Some(v) => {
                let types = v
                    .as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(MetaValue::as_i32)
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| invalid("tokenizer.ggml.token_type", "not an integer array"))?;
                if types.len() != n {
                    return Err(invalid(
                        "tokenizer.ggml.token_type",
                        format!("{} types for {n} tokens", types.len()),
                    ));
                }
                types
            }
        };

        let merges_raw = str_array(meta, "tokenizer.ggml.merges")?;
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                invalid(
                    "tokenizer.ggml.merges",
                    format!("merge #{i} {m:?} is not of the form \"left right\""),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }

        // Keep the first id of any duplicated token string.
        let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
        for (i, t) in tokens.iter().enumerate() {
            // `n` was checked to fit in u32 above.
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(format!("BPE model: {e}")))?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (t, &ty) in tokens.iter().zip(&token_types) {
            if t.is_empty() {
                continue;
            }
            match ty {
                TOKEN_TYPE_CONTROL => specials.push(AddedToken::from(t.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => {
                    user_defined.push(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Build(format!("special tokens: {e}")))?;
        inner
            .add_tokens(user_defined)
            .map_err(|e| TokenizerError::Build(format!("user-defined tokens: {e}")))?;

        let special: Vec<bool> = token_types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL)
            .collect();
        let table = TokenTable::new(&tokens, special);

        let bos = token_id(meta, "tokenizer.ggml.bos_token_id", n)?;
        let eos = token_id(meta, "tokenizer.ggml.eos_token_id", n)?;
        let eot = token_id(meta, "tokenizer.ggml.eot_token_id", n)?;
        let eom = token_id(meta, "tokenizer.ggml.eom_token_id", n)?;
        // Padding is informational; a bogus value is ignored rather than fatal.
        let pad = token_id(meta, "tokenizer.ggml.padding_token_id", n).unwrap_or(None);
        let add_bos = meta
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(false);
        let add_eos = meta
            .get_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);

        let by_name = |s: &str| inner.token_to_id(s);
        let mut stop_ids = Vec::new();
        for id in [
            eos,
            eot,
            eom,
            by_name("<|im_end|>"),
            by_name("<|endoftext|>"),
        ]
        .into_iter()
        .flatten()
        {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }

        let mut h = Fnv64::new();
        h.field(b"specd-tokenizer/v1");
        h.field(model.as_bytes());
        h.field(pre.name().as_bytes());
        h.bytes(&(n as u64).to_le_bytes());
        for t in &tokens {
            h.field(t.as_bytes());
        }
        h.bytes(&(merges_raw.len() as u64).to_le_bytes());
        for m in &merges_raw {
            h.field(m.as_bytes());
        }
        for t in &token_types {
            h.bytes(&t.to_le_bytes());
        }
        let fingerprint = format!("{:016x}", h.0);

        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            plain: Arc::new(plain),
            tokens: Arc::new(tokens),
            token_types: Arc::new(token_types),
            table: Arc::new(table),
            pre,
            bos,
            eos,
            pad,
            add_bos,
            add_eos,
            stop_ids,
            fingerprint,
            chat_template: meta.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// Reads the GGUF file at `path` (metadata only) and builds the tokenizer.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        Self::from_gguf_meta(&GgufMeta::open(path)?)
    }

    /// Encodes `text`. Special tokens written in the text (e.g. `<|im_start|>`) are always
    /// recognized as such. With `add_special`, BOS/EOS are added where the GGUF asks for
    /// it (`tokenizer.ggml.add_bos_token` / `add_eos_token`, both default false).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Encodes `text` as plain text: a special token's string written in it (`<|im_start|>`) is encoded
    /// as ordinary characters, never as the control token. For user-written content inside a chat
    /// template, so a message cannot forge a turn of another role. No BOS/EOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text (invalid UTF-8 becomes U+FFFD, as in `tokenizers`). With
    /// `skip_special`, CONTROL tokens are dropped. Any id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            self.table.push_bytes(id, skip_special, &mut bytes)?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Number of tokens in the GGUF vocabulary (including added/special/padding tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of the vocabulary entry `s` (in byte-level form, e.g. `"Ġthe"`), or of an
    /// added token (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The vocabulary entry for `id` (in byte-level form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// The raw bytes token `id` decodes to (may be an incomplete UTF-8 sequence).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.table.bytes(id)
    }

    /// The GGUF token type of `id` (see the `TOKEN_TYPE_*` constants).
    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.token_types.get(id as usize).copied()
    }

    /// Whether `id` is a special (CONTROL) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.table.is_special(id)
    }

    /// `tokenizer.ggml.bos_token_id`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// `tokenizer.ggml.eos_token_id`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// `tokenizer.ggml.padding_token_id`.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether `encode(.., add_special = true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids that end generation: eos (plus eot/eom where set) and `<|im_end|>` and
    /// `<|endoftext|>` where present, without duplicates.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Whether `id` is one of [`SpecdTokenizer::stop_ids`].
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// A stable 16-hex-char fingerprint (FNV-1a 64 over model, pre-tokenizer, tokens,
    /// merges and token types). Models sharing a tokenizer share a fingerprint, which is
    /// how drafters are paired with targets.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// `tokenizer.chat_template`, if the GGUF has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The pre-tokenizer selected by `tokenizer.ggml.pre`.
    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.pre
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub(crate) fn table(&self) -> &Arc<TokenTable> {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_meta::GgufValueType;
    use crate::testing::{
        tiny_token_id, tiny_tokenizer_kv, write_gguf, write_tiny_gguf_tokenizer,
        TINY_CHATML_TEMPLATE,
    };
    use std::io::Cursor;

    fn meta_from(kvs: &[(String, MetaValue)]) -> GgufMeta {
        let mut bytes = Vec::new();
        write_gguf(&mut bytes, 3, kvs, &[]).expect("write");
        GgufMeta::read(&mut Cursor::new(bytes)).expect("read")
    }

    fn tiny(pre: &str) -> SpecdTokenizer {
        SpecdTokenizer::from_gguf_meta(&meta_from(&tiny_tokenizer_kv(
            pre,
            Some(TINY_CHATML_TEMPLATE),
        )))
        .expect("build tiny tokenizer")
    }

    fn id(s: &str) -> u32 {
        tiny_token_id(s).expect("tiny token")
    }

    #[test]
    fn byte_map_matches_gpt2() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0x7F), 'ġ');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('€'), None);
        assert_eq!(token_bytes("Ġhello"), b" hello");
        assert_eq!(token_bytes("<|im_end|>"), b"<|im_end|>");
        // Not all byte-level chars: raw UTF-8, like the tokenizers ByteLevel decoder.
        assert_eq!(token_bytes("a €"), "a €".as_bytes());
    }

    #[test]
    fn tiny_encode_uses_merges_and_specials() {
        for pre in ["qwen2", "smollm", "gpt2"] {
            let tok = tiny(pre);
            assert_eq!(
                tok.encode("hello world", true).expect("encode"),
                vec![id("hello"), id("Ġworld")],
                "{pre}"
            );
            assert_eq!(
                tok.encode("<|im_start|>user\nhello<|im_end|>", false)
                    .expect("encode"),
                vec![
                    id("<|im_start|>"),
                    u32::from(b'u'),
                    u32::from(b's'),
                    u32::from(b'e'),
                    u32::from(b'r'),
                    id("Ċ"),
                    id("hello"),
                    id("<|im_end|>")
                ],
                "{pre}"
            );
            assert_eq!(
                tok.encode("a<tool_call>b", false).expect("encode"),
                vec![u32::from(b'a'), id("<tool_call>"), u32::from(b'b')]
            );
        }
    }

    #[test]
    fn tiny_round_trips_and_matches_tokenizers_decode() {
        let texts = [
            "hello world",
            "",
            "fn main() {\n    println!(\"hi {}\", 42);\n}\n",
            "你好，世界 🌍 — naïve café",
            "digits 1234567890 and 3.14159",
            "tabs\tand   runs    of spaces\n\n\nnewlines  \n",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|endoftext|>",
            "\u{0}\u{7f} control bytes \r\n",
        ];
        for pre in ["qwen2", "smollm", "gpt2"] {
            let tok = tiny(pre);
            for text in texts {
                let ids = tok.encode(text, false).expect("encode");
                assert_eq!(
                    tok.decode(&ids, false).expect("decode"),
                    text,
                    "{pre}: {text:?}"
                );
                for skip in [false, true] {
                    assert_eq!(
                        tok.decode(&ids, skip).expect("decode"),
                        tok.inner().decode(&ids, skip).expect("inner decode"),
                        "{pre}: {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pre_tokenizers_split_digits_and_spaces_as_expected() {
        // SmolLM: each digit on its own; qwen2: \p{N} is single digits too.
        for pre in ["smollm", "qwen2"] {
            let tok = tiny(pre);
            let ids = tok.encode("12", false).expect("encode");
            assert_eq!(ids, vec![u32::from(b'1'), u32::from(b'2')]);
        }
        // Runs of spaces: "  hello" -> "Ġ" + "Ġhello" in both GPT-2 and Qwen2 style.
        for pre in ["qwen2", "smollm", "gpt2"] {
            let tok = tiny(pre);
            assert_eq!(
                tok.encode("  hello", false).expect("encode"),
                vec![u32::from(b' '), id("Ġhello")],
                "{pre}"
            );
        }
        // Qwen2 keeps "\n\n" together (\s*[\r\n]+) -> "ĊĊ".
        let tok = tiny("qwen2");
        assert_eq!(tok.encode("\n\n", false).expect("encode"), vec![id("ĊĊ")]);
    }

    #[test]
    fn decode_skips_only_control_tokens() {
        let tok = tiny("qwen2");
        let ids = tok
            .encode("<|im_start|>hello<tool_call><|im_end|>", false)
            .expect("encode");
        assert_eq!(tok.decode(&ids, true).expect("decode"), "hello<tool_call>");
        assert!(tok.is_special(id("<|im_end|>")));
        assert!(!tok.is_special(id("<tool_call>")));
        assert!(matches!(
            tok.decode(&[100_000], false),
            Err(TokenizerError::Decode(_))
        ));
    }

    #[test]
    fn ids_stop_ids_and_accessors() {
        let tok = tiny("smollm");
        let eot = id("<|endoftext|>");
        assert_eq!(tok.bos_id(), Some(eot));
        assert_eq!(tok.eos_id(), Some(eot));
        assert_eq!(tok.pad_id(), Some(eot));
        assert_eq!(tok.stop_ids(), &[eot, id("<|im_end|>")]);
        assert!(tok.is_stop(id("<|im_end|>")));
        assert!(!tok.add_bos());
        assert_eq!(tok.vocab_size(), crate::testing::tiny_tokens().len());
        assert_eq!(tok.token_to_id("Ġworld"), Some(id("Ġworld")));
        assert_eq!(tok.id_to_token(id("Ġworld")).as_deref(), Some("Ġworld"));
        assert_eq!(tok.id_to_token(u32::MAX), None);
        assert_eq!(tok.token_bytes(id("Ġworld")), Some(&b" world"[..]));
        assert_eq!(tok.token_type(id("<|im_end|>")), Some(TOKEN_TYPE_CONTROL));
        assert_eq!(tok.chat_template(), Some(TINY_CHATML_TEMPLATE));
        assert_eq!(tok.pre_tokenizer(), PreTokenizerKind::SmolLm);
    }

    #[test]
    fn add_bos_is_honoured() {
        let mut kvs = tiny_tokenizer_kv("qwen2", None);
        for (k, v) in kvs.iter_mut() {
            if k == "tokenizer.ggml.add_bos_token" {
                *v = MetaValue::Bool(true);
            }
        }
        let tok = SpecdTokenizer::from_gguf_meta(&meta_from(&kvs)).expect("build");
        let bos = id("<|endoftext|>");
        assert_eq!(
            tok.encode("hello", true).expect("encode"),
            vec![bos, id("hello")]
        );
        assert_eq!(
            tok.encode("hello", false).expect("encode"),
            vec![id("hello")]
        );
        assert_eq!(tok.chat_template(), None);
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = tiny("qwen2");
        let b = tiny("qwen2");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        assert!(a.fingerprint().chars().all(|c| c.is_ascii_hexdigit()));
        // Different pre-tokenizer -> different fingerprint.
        assert_ne!(a.fingerprint(), tiny("smollm").fingerprint());
        // Chat template and bos/eos do not matter; one token does.
        let mut kvs = tiny_tokenizer_kv("qwen2", None);
        kvs.retain(|(k, _)| k != "tokenizer.ggml.bos_token_id");
        let c = SpecdTokenizer::from_gguf_meta(&meta_from(&kvs)).expect("build");
        assert_eq!(a.fingerprint(), c.fingerprint());
        for (k, v) in kvs.iter_mut() {
            if k == "tokenizer.ggml.tokens" {
                if let MetaValue::Array(_, items) = v {
                    items[b'a' as usize] = MetaValue::String("Ā".into());
                    items[0] = MetaValue::String("a".into());
                }
            }
        }
        let d = SpecdTokenizer::from_gguf_meta(&meta_from(&kvs)).expect("build");
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    #[test]
    fn from_file_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tok.gguf");
        write_tiny_gguf_tokenizer(&path, "qwen2", None).expect("write");
        let tok = SpecdTokenizer::from_gguf_file(&path).expect("build");
        assert_eq!(
            tok.encode("hello", false).expect("encode"),
            vec![id("hello")]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let without = |key: &str| {
            let mut kvs = tiny_tokenizer_kv("qwen2", None);
            kvs.retain(|(k, _)| k != key);
            SpecdTokenizer::from_gguf_meta(&meta_from(&kvs))
        };
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.model",
        ] {
            match without(key) {
                Err(TokenizerError::MissingKey(k)) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        let err = without("nothing").map(|_| ());
        assert!(err.is_ok());

        let with = |key: &str, value: MetaValue| {
            let mut kvs = tiny_tokenizer_kv("qwen2", None);
            for (k, v) in kvs.iter_mut() {
                if k == key {
                    *v = value.clone();
                }
            }
            SpecdTokenizer::from_gguf_meta(&meta_from(&kvs))
        };
        let err =
            with("tokenizer.ggml.model", MetaValue::String("llama".into())).expect_err("llama");
        assert!(matches!(err, TokenizerError::Unsupported(_)));
        assert!(err.to_string().contains("SentencePiece"), "{err}");
        let err = with(
            "tokenizer.ggml.pre",
            MetaValue::String("deepseek-coder".into()),
        )
        .expect_err("pre");
        assert!(err.to_string().contains("deepseek-coder"), "{err}");
        let err = with(
            "tokenizer.ggml.merges",
            MetaValue::Array(
                GgufValueType::String,
                vec![MetaValue::String("nospace".into())],
            ),
        )
        .expect_err("merge");
        assert!(err.to_string().contains("nospace"), "{err}");
        let err = with(
            "tokenizer.ggml.merges",
            MetaValue::Array(GgufValueType::String, vec![MetaValue::String("€ x".into())]),
        )
        .expect_err("merge oov");
        assert!(matches!(err, TokenizerError::Build(_)), "{err}");
        let err = with("tokenizer.ggml.eos_token_id", MetaValue::U32(1 << 20)).expect_err("eos");
        assert!(err.to_string().contains("eos_token_id"), "{err}");
        let err = with(
            "tokenizer.ggml.token_type",
            MetaValue::Array(GgufValueType::I32, vec![MetaValue::I32(1)]),
        )
        .expect_err("types");
        assert!(err.to_string().contains("token_type"), "{err}");
        let err = with("tokenizer.ggml.tokens", MetaValue::U32(3)).expect_err("tokens");
        assert!(err.to_string().contains("not an array"), "{err}");
    }
}
