//! Logging: `tracing` to stderr, as text for people or JSON for log shippers.

use tracing_subscriber::EnvFilter;

use crate::config::LogArgs;

pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let mut filter = EnvFilter::try_new(&args.filter)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {:?}: {e}", args.filter))?;
    if !args.filter.contains("sqlx") {
        // PostgreSQL's notices ("relation ... already exists, skipping" at every migration
        // check) are not news to whoever reads OCC's log.
        filter = filter.add_directive(
            "sqlx::postgres::notice=warn"
                .parse()
                .map_err(|e| anyhow::anyhow!("log directive: {e}"))?,
        );
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr);
    let result = if args.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}

/// Standard error that never fails: a log line that cannot be written (the reader of a pipe
/// went away) is dropped rather than taking OCC down with it.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
