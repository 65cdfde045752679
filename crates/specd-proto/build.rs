//! Compiles the .proto files under the workspace's `proto/` directory into Rust code (prost messages,
//! tonic clients and servers) and a file descriptor set for gRPC server reflection.
//!
//! Needs `protoc` (found through the `PROTOC` environment variable or on `PATH`).

use std::{env, error::Error, path::PathBuf};

/// The proto files to compile, relative to the proto root. Imports are resolved from the root.
const PROTOS: &[&str] = &[
    "specd/v1/generation.proto",
    "specd/internal/v1/worker.proto",
    "specd/internal/v1/trainer.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // Watch the whole tree so that added or edited imports also trigger a rebuild.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!("cargo:rerun-if-env-changed=PROTOC");

    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out_dir.join("specd_descriptor.bin"))
        .codec_path("crate::codec::SpecdCodec")
        .compile_protos(&protos, &[proto_root])?;
    Ok(())
}
