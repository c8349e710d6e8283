//! Logging: `tracing` to stderr, as text for people or JSON for log shippers.

use tracing_subscriber::EnvFilter;

use crate::config::LogArgs;

pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.filter)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {:?}: {e}", args.filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if args.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}
