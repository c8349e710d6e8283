//! Generates OCC's gRPC code and the file descriptor set (for server reflection) from
//! `proto/occ/v1/*.proto`, with the vendored `protoc`, so a build needs no system protobuf.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos: Vec<PathBuf> = [
        "event",
        "ingest",
        "incident",
        "rule",
        "unit",
        "dispatch",
        "source",
        "zone",
        "watchlist",
        "dead_letter",
        "key",
        "search",
        "stats",
    ]
    .iter()
    .map(|name| root.join(format!("occ/v1/{name}.proto")))
    .collect();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    tonic_prost_build::configure()
        .protoc_arg("--experimental_allow_proto3_optional")
        .file_descriptor_set_path(out.join("occ_v1_descriptor.bin"))
        // Deterministic encoding, so a content hash of an event is stable.
        .btree_map(".")
        .compile_with_config(
            {
                let mut c = tonic_prost_build::Config::new();
                c.protoc_executable(protoc);
                c
            },
            &protos,
            &[root],
        )?;
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
