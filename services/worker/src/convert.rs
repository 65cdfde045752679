//! Wire <-> engine conversions for the worker protocol, and the mapping of engine errors to gRPC status
//! codes. Everything a client sends is checked here before it reaches a model.

use specd_core::{SamplingParams, SparseDist};
use specd_engine::EngineError;
use specd_proto::internal::v1 as pb;
use tonic::Status;

/// Most candidates per position a step may ask for as feedback.
pub const MAX_FEEDBACK_WIDTH: usize = 16;

/// Resolved sampling parameters from the wire (`None` means greedy).
pub fn sampling(p: Option<&pb::SamplingParams>) -> Result<SamplingParams, Status> {
    let Some(p) = p else {
        return Ok(SamplingParams::greedy());
    };
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p <= 0.0 || p.top_p >= 1.0 {
            1.0
        } else {
            p.top_p
        },
        seed: p.seed,
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("sampling: {e}")))?;
    Ok(params)
}

/// A draft distribution from the wire; it must give its token positive probability.
pub fn dist(d: &pb::SparseDist, token: u32, vocab: usize) -> Result<SparseDist, Status> {
    if d.ids.len() != d.probs.len() {
        return Err(Status::invalid_argument(format!(
            "q: {} ids but {} probabilities",
            d.ids.len(),
            d.probs.len()
        )));
    }
    if let Some(&id) = d.ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Status::invalid_argument(format!(
            "q: token id {id} is outside the vocabulary of {vocab}"
        )));
    }
    let q = SparseDist::from_weights(d.ids.iter().copied().zip(d.probs.iter().copied()))
        .map_err(|e| Status::invalid_argument(format!("q: {e}")))?;
    if q.prob(token) <= 0.0 {
        return Err(Status::invalid_argument(format!(
            "q: draft token {token} has probability 0 in its own draft distribution"
        )));
    }
    Ok(q)
}

pub fn dist_to_wire(d: &SparseDist) -> pb::SparseDist {
    pb::SparseDist {
        ids: d.ids().to_vec(),
        probs: d.probs().to_vec(),
    }
}

/// Checks token ids against the vocabulary.
pub fn check_tokens(what: &str, ids: &[u32], vocab: usize) -> Result<(), Status> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(Status::invalid_argument(format!(
            "{what}: token id {id} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// The status code an engine error maps to.
pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::ContextOverflow { .. }
        | EngineError::BadToken { .. }
        | EngineError::InvalidRequest(_)
        | EngineError::Params(_)
        | EngineError::TokenizerMismatch { .. } => Status::invalid_argument(e.to_string()),
        EngineError::Dist(_) | EngineError::Verify(_) => Status::invalid_argument(e.to_string()),
        // A tensor-parallel group that lost a rank: this worker cannot serve, another target can.
        EngineError::Collective(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_defaults_and_validation() {
        assert!(sampling(None).expect("greedy").is_greedy());
        let p = sampling(Some(&pb::SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.0,
            seed: Some(3),
        }))
        .expect("valid");
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.top_k, 5);
        let bad = sampling(Some(&pb::SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }))
        .expect_err("negative temperature");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("temperature"));
    }

    #[test]
    fn draft_distributions_are_checked() {
        let ok = pb::SparseDist {
            ids: vec![3, 5],
            probs: vec![0.5, 0.5],
        };
        assert!(dist(&ok, 3, 10).is_ok());
        assert!(dist(&ok, 4, 10).is_err(), "token outside its own support");
        assert!(dist(&ok, 3, 4).is_err(), "id outside the vocabulary");
        let ragged = pb::SparseDist {
            ids: vec![1],
            probs: vec![],
        };
        assert!(dist(&ragged, 1, 10).is_err());
    }
}
