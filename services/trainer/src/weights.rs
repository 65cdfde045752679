//! The weight store: published drafter weight files in a directory (a shared volume in a cluster), one
//! file per (model, kind, version), written atomically and served by `Trainer.FetchWeights`.
//!
//! Layout: `{dir}/{model}/{kind}/{version:020}.safetensors`, path segments escaped as in the coordination
//! keys. A file is written to a temporary name, synced and renamed, so a reader never sees half of
//! one; a trainer killed mid-write leaves only a temporary file, which the next write of that version
//! replaces. Files are never modified after the rename; the version record's sha256 is their checksum.

use std::io::Write;
use std::path::{Path, PathBuf};

use specd_coord::keys::segment;
use specd_proto::internal::v1 as pb;
use specd_service::weights::{sha256_hex, CHUNK_BYTES};
use tonic::Status;

/// The directory of published weight files.
#[derive(Clone, Debug)]
pub struct WeightStore {
    dir: PathBuf,
}

impl WeightStore {
    /// Opens (creating it if needed) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a version's file lives.
    pub fn path(&self, model: &str, kind: &str, version: u64) -> PathBuf {
        self.dir
            .join(segment(model))
            .join(segment(kind))
            .join(format!("{version:020}.safetensors"))
    }

    /// Writes a version's file atomically; its sha256 and size.
    pub fn write(
        &self,
        model: &str,
        kind: &str,
        version: u64,
        data: &[u8],
    ) -> std::io::Result<(String, u64)> {
        let path = self.path(model, kind, version);
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent)?;
        let tmp = path.with_extension("safetensors.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok((sha256_hex(data), data.len() as u64))
    }

    /// Reads a version's file.
    pub fn read(&self, model: &str, kind: &str, version: u64) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(model, kind, version))
    }

    /// A version's file as the chunks `FetchWeights` sends: in order, the first with the size and the
    /// sha256 of the bytes as read now.
    pub fn chunks(
        &self,
        model: &str,
        kind: &str,
        version: u64,
    ) -> Result<Vec<pb::WeightChunk>, Status> {
        let data = self.read(model, kind, version).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Status::not_found(format!(
                    "no weights of version {version} of the {kind:?} drafter of {model:?} here"
                ))
            } else {
                Status::internal(format!("reading the weights of version {version}: {e}"))
            }
        })?;
        let total = data.len() as u64;
        let sha = sha256_hex(&data);
        let mut out: Vec<pb::WeightChunk> = data
            .chunks(CHUNK_BYTES)
            .enumerate()
            .map(|(i, c)| pb::WeightChunk {
                data: c.to_vec(),
                offset: (i * CHUNK_BYTES) as u64,
                total_size: total,
                sha256: String::new(),
                version: String::new(),
            })
            .collect();
        if out.is_empty() {
            out.push(pb::WeightChunk {
                data: Vec::new(),
                offset: 0,
                total_size: 0,
                sha256: String::new(),
                version: String::new(),
            });
        }
        out[0].sha256 = sha;
        out[0].version = version.to_string();
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_whole_and_chunked_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let (sha, size) = store.write("Qwen/x", "self", 3, &data).unwrap();
        assert_eq!(size, data.len() as u64);
        assert!(store
            .path("Qwen/x", "self", 3)
            .ends_with("Qwen%2Fx/self/00000000000000000003.safetensors"));
        let chunks = store.chunks("Qwen/x", "self", 3).unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].sha256, sha);
        assert_eq!(chunks[0].version, "3");
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, data);
        assert_eq!(chunks[2].offset, 2 * CHUNK_BYTES as u64);
        let missing = store.chunks("Qwen/x", "self", 4).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }
}
