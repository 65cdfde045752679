//! [`DecodeStream`]: incremental detokenization for streaming text to clients.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character (an emoji
//! or CJK character is often split across two or three tokens). The stream keeps such an
//! incomplete tail until later tokens complete it, so it never emits U+FFFD for a prefix
//! that is merely incomplete. Bytes that can never become valid UTF-8 are replaced by
//! U+FFFD exactly as [`String::from_utf8_lossy`] (and so [`SpecdTokenizer::decode`]) does:
//! the concatenation of everything returned by [`DecodeStream::push`] plus
//! [`DecodeStream::finish`] equals `decode(all_ids)`.

use std::sync::Arc;

use crate::tokenizer::{SpecdTokenizer, TokenTable};
use crate::TokenizerError;

/// Incremental decoder; owns a shared handle to the vocabulary, so it is `'static + Send`.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    table: Arc<TokenTable>,
    skip_special: bool,
    /// Bytes not yet emitted: at most an incomplete UTF-8 sequence (≤ 3 bytes) between
    /// calls.
    pending: Vec<u8>,
}

impl DecodeStream {
    /// A new stream decoding with `tok`'s vocabulary; with `skip_special`, CONTROL tokens
    /// produce no text.
    pub fn new(tok: &SpecdTokenizer, skip_special: bool) -> Self {
        Self {
            table: Arc::clone(tok.table()),
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token and returns the text it completed (possibly empty). An id outside
    /// the vocabulary is an error and leaves the stream unchanged.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.table
            .push_bytes(id, self.skip_special, &mut self.pending)?;
        Ok(self.drain_complete())
    }

    /// Adds several tokens and returns the text they completed. On an invalid id, the
    /// tokens before it are kept (their text is returned by the next call) and the error
    /// is returned.
    pub fn push_many(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        for &id in ids {
            self.table
                .push_bytes(id, self.skip_special, &mut self.pending)?;
        }
        Ok(self.drain_complete())
    }

    /// Flushes whatever is still held (an incomplete sequence becomes U+FFFD) and resets
    /// the stream.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Number of bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Emits the longest prefix of `pending` that is final: valid UTF-8, with invalid
    /// sequences replaced by U+FFFD, stopping before an incomplete sequence at the end.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction; lossy never replaces here.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Incomplete sequence at the end: keep it for later tokens.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_token_id, tiny_tokenizer_kv, write_gguf};
    use crate::GgufMeta;
    use proptest::prelude::*;

    fn tiny() -> SpecdTokenizer {
        let mut bytes = Vec::new();
        write_gguf(&mut bytes, 3, &tiny_tokenizer_kv("qwen2", None), &[]).expect("write");
        let meta = GgufMeta::read(&mut std::io::Cursor::new(bytes)).expect("read");
        SpecdTokenizer::from_gguf_meta(&meta).expect("build")
    }

    fn streamed(tok: &SpecdTokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut s = DecodeStream::new(tok, skip);
        let mut pieces: Vec<String> = ids.iter().map(|&id| s.push(id).expect("push")).collect();
        pieces.push(s.finish());
        let joined = pieces.concat();
        (pieces, joined)
    }

    #[test]
    fn multibyte_text_streams_without_replacement_chars() {
        let tok = tiny();
        for text in [
            "你好，世界",
            "emoji 😀🎉 mix",
            "naïve café ñ",
            "hello 你 world 🌍!",
        ] {
            let ids = tok.encode(text, false).expect("encode");
            let (pieces, joined) = streamed(&tok, &ids, false);
            assert_eq!(joined, text);
            assert_eq!(joined, tok.decode(&ids, false).expect("decode"));
            for p in &pieces {
                assert!(!p.contains('\u{FFFD}'), "{text:?}: piece {p:?}");
            }
        }
    }

    #[test]
    fn holds_a_token_that_ends_mid_character() {
        let tok = tiny();
        let ids = tok.encode("你", false).expect("encode");
        // "ä½" is the first two bytes of 你, then the byte A0.
        assert_eq!(ids, vec![tiny_token_id("ä½").expect("id"), 0xA0]);
        let mut s = DecodeStream::new(&tok, false);
        assert_eq!(s.push(ids[0]).expect("push"), "");
        assert_eq!(s.pending_bytes(), 2);
        assert_eq!(s.push(ids[1]).expect("push"), "你");
        assert_eq!(s.pending_bytes(), 0);
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_like_full_decode() {
        let tok = tiny();
        // 0xFF is never valid; E4 then 'a' is a truncated sequence followed by ASCII.
        let ids = [u32::from(b'a'), 0xFF, 0xE4, u32::from(b'b'), 0xF0, 0x9F];
        let (_, joined) = streamed(&tok, &ids, false);
        assert_eq!(joined, tok.decode(&ids, false).expect("decode"));
        assert_eq!(joined, "a\u{FFFD}\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn skip_special_and_bad_ids() {
        let tok = tiny();
        let ids = tok
            .encode("<|im_start|>hello<|im_end|>", false)
            .expect("encode");
        assert_eq!(streamed(&tok, &ids, true).1, "hello");
        assert_eq!(streamed(&tok, &ids, false).1, "<|im_start|>hello<|im_end|>");
        let mut s = DecodeStream::new(&tok, false);
        assert_eq!(s.push(0xE4).expect("push"), "");
        assert!(s.push(1_000_000).is_err());
        assert_eq!(s.pending_bytes(), 1);
        assert_eq!(
            s.push_many(&[0xBD, 0xA0, u32::from(b'!')]).expect("push"),
            "你!"
        );
    }

    proptest! {
        #[test]
        fn stream_equals_full_decode_for_any_ids(ids in proptest::collection::vec(0u32..275, 0..64)) {
            let tok = tiny();
            for skip in [false, true] {
                let (_, joined) = streamed(&tok, &ids, skip);
                prop_assert_eq!(joined, tok.decode(&ids, skip).expect("decode"));
            }
        }

        #[test]
        fn round_trip_any_string(text in "\\PC{0,40}") {
            let tok = tiny();
            let ids = tok.encode(&text, false).expect("encode");
            let (pieces, joined) = streamed(&tok, &ids, false);
            prop_assert_eq!(&joined, &text);
            for p in pieces {
                let ok = !p.contains(char::REPLACEMENT_CHARACTER)
                    || text.contains(char::REPLACEMENT_CHARACTER);
                prop_assert!(ok, "replacement char in piece {:?}", p);
            }
        }
    }
}
