//! Turning accepted tokens into client text: incremental UTF-8 decoding, stop strings, and the text
//! deltas a stream sends.
//!
//! Text that could still turn out to be the start of a stop string is held back until it cannot, so a
//! stream never sends text it later has to take back; the stop string itself is never returned.

use specd_tokenizer::{DecodeStream, SpecdTokenizer};
use tonic::Status;

/// Decoded output of one request.
pub struct Output {
    decoder: DecodeStream,
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    stopped: bool,
}

impl Output {
    pub fn new(tok: &SpecdTokenizer, stops: Vec<String>) -> Self {
        Self {
            decoder: DecodeStream::new(tok, true),
            stops,
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Whether any stop string was asked for.
    pub fn has_stops(&self) -> bool {
        !self.stops.is_empty()
    }

    /// Whether a stop string was hit.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds tokens; returns the text that is now final (may be empty).
    pub fn push(&mut self, tokens: &[u32]) -> Result<String, Status> {
        if self.stopped {
            return Ok(String::new());
        }
        let piece = self
            .decoder
            .push_many(tokens)
            .map_err(|e| Status::internal(format!("decoding output tokens: {e}")))?;
        self.text.push_str(&piece);
        Ok(self.release(false))
    }

    /// Ends the output; returns the remaining text.
    pub fn finish(&mut self) -> String {
        if !self.stopped {
            let tail = self.decoder.finish();
            self.text.push_str(&tail);
        }
        self.release(true)
    }

    /// The whole text handed out so far.
    pub fn text(&self) -> &str {
        &self.text[..self.sent]
    }

    fn release(&mut self, all: bool) -> String {
        if !self.stopped {
            // A stop string can only start where it still overlaps text not searched before.
            let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
            let mut from = self.sent.saturating_sub(longest);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .stops
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
                .min();
            if let Some(at) = hit {
                self.text.truncate(at);
                self.stopped = true;
            }
        }
        let end = if all || self.stopped {
            self.text.len()
        } else {
            self.text.len() - self.held_back()
        };
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        delta
    }

    /// Bytes at the end of the unsent text that are a proper prefix of some stop string (rounded up to
    /// whole characters).
    fn held_back(&self) -> usize {
        let t = self.text.as_bytes();
        let mut best = 0;
        for s in &self.stops {
            let s = s.as_bytes();
            if let Some(n) = (1..s.len().min(t.len() + 1))
                .rev()
                .find(|&n| t[t.len() - n..] == s[..n])
            {
                best = best.max(n);
            }
        }
        let mut cut = t.len() - best.min(t.len() - self.sent);
        while !self.text.is_char_boundary(cut) {
            cut -= 1;
        }
        t.len() - cut.max(self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use specd_tokenizer::testing::tiny_tokenizer;

    fn ids(tok: &SpecdTokenizer, s: &str) -> Vec<u32> {
        tok.encode(s, false).expect("encode")
    }

    #[test]
    fn stop_string_split_across_tokens_is_held_then_cut() {
        let tok = tiny_tokenizer();
        let mut out = Output::new(&tok, vec!["END".into()]);
        let mut streamed = String::new();
        for t in ids(&tok, "hello EN") {
            streamed += &out.push(&[t]).expect("push");
        }
        assert!(
            !streamed.contains("EN"),
            "a possible stop prefix is held back: {streamed:?}"
        );
        for t in ids(&tok, "D more") {
            streamed += &out.push(&[t]).expect("push");
        }
        assert!(out.stopped());
        streamed += &out.finish();
        assert_eq!(streamed, "hello ");
    }

    #[test]
    fn without_stops_everything_streams() {
        let tok = tiny_tokenizer();
        let mut out = Output::new(&tok, Vec::new());
        let mut s = String::new();
        for t in ids(&tok, "hello world") {
            s += &out.push(&[t]).expect("push");
        }
        s += &out.finish();
        assert_eq!(s, "hello world");
        assert_eq!(out.text(), "hello world");
    }

    #[test]
    fn held_text_that_is_not_a_stop_is_released() {
        let tok = tiny_tokenizer();
        let mut out = Output::new(&tok, vec!["lo!".into()]);
        let mut s = String::new();
        for t in ids(&tok, "hello world") {
            s += &out.push(&[t]).expect("push");
        }
        s += &out.finish();
        assert_eq!(s, "hello world");
        assert!(!out.stopped());
    }
}
