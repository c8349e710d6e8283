//! The `occ` command line: parsing and dispatch to the commands.

use std::io::Write;
use std::time::Duration;

use crate::config::{BrokerArgs, DatabaseArgs, LogArgs, ServeArgs, SimulatorArgs, mask_url};
use crate::{serve, simulate, telemetry};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// OCC: city events over MQTT → PostgreSQL → rule-routed incidents for dispatch, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "occ", version, about, args_override_self = true)]
pub struct Cli {
    #[command(flatten)]
    log: LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run OCC: MQTT ingest, rules, incidents and the gRPC API, in one process.
    Serve(Box<ServeArgs>),
    /// Create the database if it does not exist and apply pending migrations.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Publish a simulated city's camera and sensor events to the broker.
    Simulate {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        simulator: SimulatorArgs,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the configuration `occ serve` would run with (flags, OCC_* variables and
    /// defaults), secrets masked.
    Print(Box<ServeArgs>),
}

/// Cancels `token` on SIGINT or SIGTERM.
fn stop_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        token.cancel();
    });
    Ok(())
}

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(&cli.log)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Serve(args) => {
            stop_on_signals(shutdown.clone())?;
            let listener = TcpListener::bind(args.grpc_listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.grpc_listen))?;
            let running = serve::start(*args, listener, shutdown).await?;
            running.wait().await
        }
        Command::Migrate { database } => {
            stop_on_signals(shutdown.clone())?;
            // A one-shot job: wait a minute for PostgreSQL, then fail.
            serve::prepare_database(&database, Some(Duration::from_secs(60)), &shutdown).await?;
            tracing::info!(url = %mask_url(&database.url), "database migrated");
            Ok(())
        }
        Command::Simulate { broker, simulator } => {
            stop_on_signals(shutdown.clone())?;
            simulate::run(broker, simulator, shutdown).await
        }
        Command::Config {
            command: ConfigCommand::Print(args),
        } => {
            let mut effective = toml::Table::try_from(&*args)?;
            effective.insert(
                "mqtt_client_id_effective".into(),
                toml::Value::String(args.ingest.client_id()),
            );
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", toml::to_string_pretty(&effective)?)?;
            Ok(())
        }
    }
}
