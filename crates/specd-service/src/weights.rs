//! Published drafter weights on the wire: checksums and the `Trainer.FetchWeights` client.
//!
//! A weight file is fetched as ordered chunks and checked twice before anyone loads it: the bytes must
//! cover the announced size without gap or overlap, and their sha256 must equal the one in the version
//! record the fetcher read from the coordination store (not only the one the server announces, so a file
//! corrupted at rest is refused too). A file over `max_bytes` is refused before it is buffered.

use std::time::Duration;

use sha2::{Digest, Sha256};
use specd_proto::internal::v1 as pb;
use specd_proto::internal::v1::trainer_client::TrainerClient;

use crate::grpc::{endpoint, Keepalive, MAX_MESSAGE_BYTES};

/// Chunk size the trainer serves files in (well under the message limit).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a fetch gave no usable file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The trainer could not be reached or answered with an error.
    #[error("fetching weights from {address}: {message}")]
    Unreachable { address: String, message: String },
    /// The bytes arrived but are not the file the record describes.
    #[error("weights from {address} refused: {message}")]
    Refused { address: String, message: String },
}

impl FetchError {
    /// Whether the file itself is wrong (as opposed to the trainer being away).
    pub fn is_refused(&self) -> bool {
        matches!(self, FetchError::Refused { .. })
    }
}

/// What the fetched file must be.
#[derive(Clone, Debug)]
pub struct Expected {
    pub sha256: String,
    pub size: u64,
    pub max_bytes: u64,
}

/// Fetches one version's file from the trainer at `address` and checks it against `expected`.
pub async fn fetch(
    address: &str,
    keepalive: Keepalive,
    request: pb::FetchWeightsRequest,
    expected: &Expected,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let unreachable = |message: String| FetchError::Unreachable {
        address: address.to_string(),
        message,
    };
    let refused = |message: String| FetchError::Refused {
        address: address.to_string(),
        message,
    };
    if expected.size > expected.max_bytes {
        return Err(refused(format!(
            "the record announces {} bytes, over the limit of {}",
            expected.size, expected.max_bytes
        )));
    }
    let channel = endpoint(address, keepalive).map_err(unreachable)?;
    let mut client = TrainerClient::new(channel.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let work = async {
        let mut stream = client
            .fetch_weights(request)
            .await
            .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        let mut data: Vec<u8> = Vec::new();
        let mut announced: Option<(u64, String)> = None;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
        {
            let (total, _) =
                announced.get_or_insert_with(|| (chunk.total_size, chunk.sha256.clone()));
            if chunk.total_size != *total || chunk.offset != data.len() as u64 {
                return Err(refused(format!(
                    "a chunk at offset {} of {} bytes arrived after {} bytes of {}",
                    chunk.offset,
                    chunk.total_size,
                    data.len(),
                    total
                )));
            }
            if data.len() as u64 + chunk.data.len() as u64 > expected.size.min(expected.max_bytes) {
                return Err(refused(format!(
                    "more than the {} bytes the record announces",
                    expected.size
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (total, announced_sha) = announced.unwrap_or_default();
        if data.len() as u64 != expected.size || total != expected.size {
            return Err(refused(format!(
                "{} bytes received ({} announced by the trainer), the record says {}",
                data.len(),
                total,
                expected.size
            )));
        }
        let got = sha256_hex(&data);
        if got != expected.sha256 {
            return Err(refused(format!(
                "sha256 {got} (the trainer announced {announced_sha}), the record says {}",
                expected.sha256
            )));
        }
        Ok(data)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!("no complete file within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
