//! The `occ` binary's library: configuration, wiring and the commands. Kept as a library so
//! the end-to-end tests start OCC in-process on ephemeral ports, exactly as `occ serve` does.
#![forbid(unsafe_code)]

mod alerts;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
mod dead_letters;
pub mod export;
pub mod import;
pub mod keys;
pub mod metrics;
mod operators;
pub mod serve;
pub mod simulate;
pub mod storage;
pub mod telemetry;

pub use config::ServeArgs;
