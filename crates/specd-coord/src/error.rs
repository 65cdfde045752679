//! `CoordError`: the one error type of the coordination boundary.
//!
//! Owns the classification every caller needs: is it worth retrying ([`CoordError::is_retryable`]), and a
//! stable label for metrics ([`CoordError::error_type`]). It does not map to gRPC or HTTP statuses: services
//! decide what a coordination failure means for their own callers.

use crate::types::LeaseId;

/// Everything that can go wrong talking to the coordination store.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The store could not be reached or did not answer in time. Retryable.
    #[error("coordination store unavailable: {0}")]
    Unavailable(String),
    /// The lease no longer exists (expired or revoked): keys attached to it are gone.
    #[error("lease {0} lost")]
    LeaseLost(LeaseId),
    /// A guarded write found the store in another state than expected (e.g. leadership already lost).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A key or value could not be encoded or decoded (not UTF-8, not the expected JSON record).
    #[error("codec: {0}")]
    Codec(String),
    /// The store was configured wrongly (no endpoints, bad URL, bad argument).
    #[error("configuration: {0}")]
    Config(String),
}

impl CoordError {
    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CoordError::Unavailable(_))
    }

    /// A stable, low-cardinality label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            CoordError::Unavailable(_) => "unavailable",
            CoordError::LeaseLost(_) => "lease_lost",
            CoordError::Conflict(_) => "conflict",
            CoordError::Codec(_) => "codec",
            CoordError::Config(_) => "config",
        }
    }
}

impl From<serde_json::Error> for CoordError {
    fn from(err: serde_json::Error) -> Self {
        CoordError::Codec(err.to_string())
    }
}

/// Result alias for this crate.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;
