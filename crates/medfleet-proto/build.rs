//! Compiles proto/ with protox (no system protoc) and writes the descriptor set used for gRPC reflection.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> anyhow::Result<()> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(proto_root.join("medfleet/v1"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("medfleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Image chunks are served from the server's chunk cache: `Bytes` shares them instead of copying 1 MiB per
        // chunk per device.
        .bytes(".medfleet.v1.ArtifactChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
