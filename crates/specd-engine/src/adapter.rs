//! The self-drafter's exit adapter: its arithmetic at serving time and its weight file.
//!
//! An [`ExitAdapter`] is what online distillation trains and publishes (`crate::exit_train` trains it,
//! the trainer service publishes it, drafter workers load it with [`crate::Model::with_adapter`]). Its
//! file is safetensors: two f32 tensors, `exit.a` (`rank x hidden`) and `exit.b` (`hidden x rank`), and
//! metadata naming the format and the hidden size. [`ExitAdapter::from_file_bytes`] refuses anything
//! else (another format, missing or misshapen tensors, NaN or inf), so bad weights never reach a swap.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::EngineError;

/// The `format` metadata value of an exit adapter file.
pub const FILE_FORMAT: &str = "specd-exit-adapter-v1";

/// A low-rank correction of the residual stream before the final norm: `x + B (A x)`, trained by
/// distillation (`crate::exit_train`) so that a self-drafter's early exit predicts what the full model
/// would. `a` is `rank x hidden` and `b` is `hidden x rank`, row-major; per row the arithmetic is fixed,
/// so it keeps the forward batch-invariant.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitAdapter {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl ExitAdapter {
    /// Checks its shape against a hidden size.
    pub fn check(&self, hidden: usize) -> Result<(), EngineError> {
        if self.rank == 0
            || self.a.len() != self.rank * hidden
            || self.b.len() != hidden * self.rank
        {
            return Err(EngineError::BadModel(format!(
                "exit adapter of rank {} does not fit a hidden size of {hidden}",
                self.rank
            )));
        }
        if self.a.iter().chain(&self.b).any(|v| !v.is_finite()) {
            return Err(EngineError::BadModel(
                "exit adapter holds NaN or inf".into(),
            ));
        }
        Ok(())
    }

    /// The hidden size it was built for.
    pub fn hidden(&self) -> usize {
        self.a.len() / self.rank.max(1)
    }

    /// `x += B (A x)` for one row.
    pub(crate) fn apply(&self, x: &mut [f32]) {
        let d = x.len();
        let t: Vec<f32> = self
            .a
            .chunks_exact(d)
            .map(|row| row.iter().zip(x.iter()).map(|(a, x)| a * x).sum())
            .collect();
        for (xi, brow) in x.iter_mut().zip(self.b.chunks_exact(self.rank)) {
            *xi += brow.iter().zip(&t).map(|(b, t)| b * t).sum::<f32>();
        }
    }

    /// The adapter as a safetensors file.
    pub fn to_file_bytes(&self) -> Result<Vec<u8>, EngineError> {
        let hidden = self.hidden();
        self.check(hidden)?;
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (a, b) = (bytes(&self.a), bytes(&self.b));
        let bad =
            |e: safetensors::SafeTensorError| EngineError::Internal(format!("adapter file: {e}"));
        let tensors = [
            (
                "exit.a",
                TensorView::new(Dtype::F32, vec![self.rank, hidden], &a).map_err(bad)?,
            ),
            (
                "exit.b",
                TensorView::new(Dtype::F32, vec![hidden, self.rank], &b).map_err(bad)?,
            ),
        ];
        let meta = HashMap::from([
            ("format".to_string(), FILE_FORMAT.to_string()),
            ("hidden".to_string(), hidden.to_string()),
            ("rank".to_string(), self.rank.to_string()),
        ]);
        safetensors::serialize(tensors, Some(meta)).map_err(bad)
    }

    /// Reads an adapter file for a model of hidden size `hidden`; anything that is not a well-formed
    /// adapter of that size is an error.
    pub fn from_file_bytes(data: &[u8], hidden: usize) -> Result<Self, EngineError> {
        let bad = |m: String| EngineError::BadModel(format!("exit adapter file: {m}"));
        let (_, meta) = SafeTensors::read_metadata(data).map_err(|e| bad(e.to_string()))?;
        let format = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned())
            .unwrap_or_default();
        if format != FILE_FORMAT {
            return Err(bad(format!("format {format:?}, expected {FILE_FORMAT:?}")));
        }
        let st = SafeTensors::deserialize(data).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EngineError> {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
                return Err(bad(format!(
                    "{name} is {:?} {:?}, expected a 2-d f32 tensor",
                    t.dtype(),
                    t.shape()
                )));
            }
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), v))
        };
        let (sa, a) = read("exit.a")?;
        let (sb, b) = read("exit.b")?;
        let rank = sa[0];
        if sa != [rank, hidden] || sb != [hidden, rank] {
            return Err(bad(format!(
                "shapes {sa:?} and {sb:?} do not make a rank-{rank} adapter for a hidden size of {hidden}"
            )));
        }
        let adapter = Self { rank, a, b };
        adapter.check(hidden)?;
        Ok(adapter)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn adapter(rank: usize, hidden: usize) -> ExitAdapter {
        ExitAdapter {
            rank,
            a: (0..rank * hidden).map(|i| i as f32 * 0.01).collect(),
            b: (0..rank * hidden).map(|i| -(i as f32) * 0.02).collect(),
        }
    }

    #[test]
    fn a_file_round_trips_exactly() {
        let a = adapter(4, 12);
        let bytes = a.to_file_bytes().unwrap();
        assert_eq!(ExitAdapter::from_file_bytes(&bytes, 12).unwrap(), a);
    }

    #[test]
    fn wrong_size_truncated_foreign_or_nan_files_are_refused() {
        let bytes = adapter(4, 12).to_file_bytes().unwrap();
        let err = ExitAdapter::from_file_bytes(&bytes, 16).unwrap_err();
        assert!(err.to_string().contains("hidden size of 16"), "{err}");
        assert!(ExitAdapter::from_file_bytes(&bytes[..bytes.len() - 3], 12).is_err());
        assert!(ExitAdapter::from_file_bytes(b"not a file", 12).is_err());
        // A valid safetensors file that is not an adapter.
        let data = vec![0u8; 16];
        let view = TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap();
        let foreign = safetensors::serialize([("exit.a", view)], None).unwrap();
        let err = ExitAdapter::from_file_bytes(&foreign, 2).unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
        // NaN inside a well-formed file (written past the check, as a corrupted trainer might).
        let mut nan = adapter(2, 3);
        nan.a[1] = f32::NAN;
        let raw: Vec<u8> = nan.a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let rawb: Vec<u8> = nan.b.iter().flat_map(|x| x.to_le_bytes()).collect();
        let meta = HashMap::from([("format".to_string(), FILE_FORMAT.to_string())]);
        let file = safetensors::serialize(
            [
                (
                    "exit.a",
                    TensorView::new(Dtype::F32, vec![2, 3], &raw).unwrap(),
                ),
                (
                    "exit.b",
                    TensorView::new(Dtype::F32, vec![3, 2], &rawb).unwrap(),
                ),
            ],
            Some(meta),
        )
        .unwrap();
        let err = ExitAdapter::from_file_bytes(&file, 3).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }
}
