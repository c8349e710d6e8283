//! OCC's gRPC API, package `occ.v1`: the code generated from `proto/occ/v1/*.proto` and the
//! encoded file descriptor set that server reflection serves.
#![forbid(unsafe_code)]
// Generated code: its docs come from the .proto comments.
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("occ.v1");

    /// The encoded descriptors of every `occ.v1` file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("occ_v1_descriptor");
}
