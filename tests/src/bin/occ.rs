//! `occ`, built in the test package so its tests can start it as a child process.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    occ::cli::main()
}
