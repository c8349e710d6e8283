//! `occ`: the backend of a city's operational control center.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    occ::cli::main()
}
