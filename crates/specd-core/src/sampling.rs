//! Sampling parameters of a request and the seedable random source that draws tokens.
//!
//! Owns [`SamplingParams`] (temperature / top-k / top-p / seed, with validation) and [`Sampler`]
//! (a ChaCha8 RNG that draws uniforms and tokens from a [`SparseDist`]). It does not turn logits
//! into distributions (that is [`crate::dist`]) and does not decide acceptance of draft tokens
//! (that is [`crate::verify`]).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dist::SparseDist;

/// Highest accepted temperature. Beyond this the distribution is uniform for all practical purposes.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// A sampling parameter outside its valid range. The message names the field and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// `temperature` must be finite and in `[0, 100]`.
    #[error("temperature must be finite and in [0, {MAX_TEMPERATURE}], got {0}")]
    Temperature(f32),
    /// `top_p` must be in `(0, 1]`.
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
}

/// How a request wants its tokens sampled.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` means greedy (argmax) decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches `top_p`;
    /// `1.0` disables the filter.
    pub top_p: f32,
    /// Seed of the request's [`Sampler`]; `None` seeds from OS entropy.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, no truncation, no seed.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }

    /// Whether these parameters mean argmax decoding (`temperature == 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the ranges: temperature finite and in `[0, 100]`, top_p in `(0, 1]`; any top_k is valid.
    pub fn validate(&self) -> Result<(), ParamError> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return Err(ParamError::Temperature(t));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(ParamError::TopP(p));
        }
        Ok(())
    }

    /// Whether top-k or top-p actually truncates anything for a vocabulary of `vocab` tokens.
    pub fn truncates(&self, vocab: usize) -> bool {
        (self.top_k > 0 && self.top_k < vocab) || self.top_p < 1.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// A seedable random source for one sequence (ChaCha8 inside, so a seed reproduces a stream
/// exactly on every platform).
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    /// From `seed`, or from OS entropy when `None`.
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self { rng }
    }

    /// A uniform draw in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Draws a token from `d` by inverse-CDF over its (id-ascending) entries.
    ///
    /// If rounding leaves the cumulative mass below the draw, the last token of `d` is returned,
    /// so the result is always in `d`'s support.
    pub fn sample(&mut self, d: &SparseDist) -> u32 {
        let ids = d.ids();
        let probs = d.probs();
        if ids.len() == 1 {
            // Still consume a draw so the stream position does not depend on the distribution's size.
            let _ = self.uniform();
            return ids[0];
        }
        let u = self.uniform();
        let mut cum = 0.0f64;
        for (&id, &p) in ids.iter().zip(probs) {
            cum += f64::from(p);
            if u < cum {
                return id;
            }
        }
        // Rounding: the probabilities summed to slightly less than `u`. A `SparseDist` is never
        // empty, so `last()` exists; fall back to 0 only to avoid a panic path.
        ids.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn defaults_are_greedy() {
        let d = SamplingParams::default();
        assert_eq!(d, SamplingParams::greedy());
        assert!(d.is_greedy());
        assert_eq!(d.top_k, 0);
        assert_eq!(d.top_p, 1.0);
        assert_eq!(d.seed, None);
        assert!(d.validate().is_ok());
        assert!(!d.truncates(10));
    }

    #[test]
    fn validate_names_the_field() {
        let bad_t = [-0.1, f32::NAN, f32::INFINITY, 100.5];
        for t in bad_t {
            let p = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            let e = p.validate().unwrap_err();
            assert!(matches!(e, ParamError::Temperature(_)));
            assert!(e.to_string().contains("temperature"), "{e}");
        }
        for tp in [0.0, -1.0, 1.0001, f32::NAN] {
            let p = SamplingParams {
                temperature: 1.0,
                top_p: tp,
                ..SamplingParams::default()
            };
            let e = p.validate().unwrap_err();
            assert!(matches!(e, ParamError::TopP(_)));
            assert!(e.to_string().contains("top_p"), "{e}");
        }
        let ok = SamplingParams {
            temperature: 100.0,
            top_k: 123_456,
            top_p: 1e-6,
            seed: Some(1),
        };
        assert!(ok.validate().is_ok());
        assert!(!ok.is_greedy());
        assert!(ok.truncates(10));
    }

    #[test]
    fn seeded_samplers_reproduce() {
        let mut a = Sampler::new(Some(42));
        let mut b = Sampler::new(Some(42));
        let mut c = Sampler::new(Some(43));
        let xa: Vec<f64> = (0..16).map(|_| a.uniform()).collect();
        let xb: Vec<f64> = (0..16).map(|_| b.uniform()).collect();
        let xc: Vec<f64> = (0..16).map(|_| c.uniform()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        assert!(xa.iter().all(|u| (0.0..1.0).contains(u)));
        // Entropy-seeded samplers differ from each other (with overwhelming probability).
        let mut e1 = Sampler::new(None);
        let mut e2 = Sampler::new(None);
        assert_ne!(e1.uniform(), e2.uniform());
    }

    #[test]
    fn sample_follows_distribution() {
        let d = SparseDist::from_weights([(3, 1.0), (10, 3.0)]).unwrap();
        let mut s = Sampler::new(Some(0));
        let n = 20_000;
        let tens = (0..n).filter(|_| s.sample(&d) == 10).count();
        let frac = tens as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        let one = SparseDist::one_hot(5);
        assert!((0..100).all(|_| s.sample(&one) == 5));
    }
}
