//! Logging and tracing: `tracing` to stderr, as text for people or JSON for log shippers, and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans
//! exported over OTLP/gRPC to a collector (Jaeger, Tempo, an OpenTelemetry Collector). The
//! exporter follows the standard `OTEL_*` variables (endpoint, headers, timeout, batch delay);
//! the service is named `occ` unless `OTEL_SERVICE_NAME` says otherwise. Spans at INFO and
//! above are exported whatever `--log` filters out of the log.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogArgs;

/// What logging set up that must be flushed at exit: the span exporter, if any.
#[derive(Debug)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered. The exporter's shutdown blocks, so it runs off the
    /// runtime's workers (which the export itself needs).
    pub async fn shutdown(self) {
        if let Some(provider) = self.traces {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                eprintln!("occ: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Whether the environment asks for OTLP trace export.
fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Starts logging (and trace export, when asked for). Must run inside the Tokio runtime: the
/// OTLP client is a tonic channel.
pub fn init(args: &LogArgs) -> anyhow::Result<Telemetry> {
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
    let fmt = tracing_subscriber::fmt::layer().with_writer(|| Stderr);
    let fmt = if args.format == "json" {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let traces = if otlp_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up OTLP trace export: {e}"))?;
        let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok() {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("occ").build()
        };
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };
    // Spans are exported whatever the log filter says (a quiet log still traces every call),
    // except the transport's own, which would trace the export itself.
    let otel = traces.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("occ"))
            .with_filter(EnvFilter::new(
                "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,sqlx=warn",
            ))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))?;
    if traces.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Ok(Telemetry { traces })
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
