//! The `occ` command line: parsing and dispatch to the commands.

use std::io::Write;
use std::time::Duration;

use std::path::PathBuf;

use crate::config::{
    AdapterArgs, BrokerArgs, DatabaseArgs, LogArgs, ServeArgs, SimulatorArgs, mask_url,
};
use crate::{dead_letters, import, serve, simulate, telemetry};
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
    /// The registry of cameras, sensors and gateways.
    Sources {
        #[command(subcommand)]
        command: SourcesCommand,
    },
    /// The city's zones.
    Zones {
        #[command(subcommand)]
        command: ZonesCommand,
    },
    /// Watch lists of plates.
    Watchlist {
        #[command(subcommand)]
        command: WatchlistCommand,
    },
    /// Measure ingest on this machine against baselines from the same run (starts its own
    /// broker, databases and OCC; prints one table).
    Bench(crate::bench::BenchArgs),
    /// The ingest slots (MQTT client ids) OCC's instances share, and who holds each.
    Slots {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The tamper-evident audit log: verify it, anchor it.
    Audit {
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Stored events: their time partitions, retention and legal holds.
    Events {
        #[command(subcommand)]
        command: crate::storage::EventsCommand,
    },
    /// Evidence packages of incidents, for a court: write one, check one.
    Export {
        #[command(subcommand)]
        command: crate::export::ExportCommand,
    },
    /// API keys for gateways, consoles and integrations.
    Keys {
        #[command(subcommand)]
        command: crate::keys::KeysCommand,
    },
    /// What could not become events.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SourcesCommand {
    /// Registers or updates sources from a CSV file (header: id, and any of kind, name, lat,
    /// lon, zone, district, profile, expected_interval, enabled, tags as key=value;key=value)
    /// or a JSON file (an array of sources, or {"profiles": [...], "sources": [...]}). All of
    /// the file, or nothing.
    Import {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ZonesCommand {
    /// Creates or replaces zones from a GeoJSON FeatureCollection (properties: name, and
    /// optionally district and description). All of the file, or nothing.
    Import {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
enum WatchlistCommand {
    /// Puts plates on watch lists from a CSV file (plate, list, reason, expires_at) or a JSON
    /// array of the same. A plate already on its list gets the new reason and expiry.
    Import {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// The newest dead letters, one line each.
    List {
        /// Only those not resolved by a replay.
        #[arg(long)]
        unresolved: bool,
        /// Only topics starting with this (frigate/, application/).
        #[arg(long)]
        topic_prefix: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Decodes dead letters again with the adapters configured as for `occ serve`: those
    /// named by --id, or the oldest unresolved ones. What now decodes is stored, once.
    Replay {
        #[arg(long = "id")]
        ids: Vec<uuid::Uuid>,
        #[arg(long)]
        topic_prefix: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Largest event payload, as for `occ serve`.
        #[arg(
            long = "max-payload-bytes",
            env = "OCC_MAX_PAYLOAD_BYTES",
            default_value_t = 64 * 1024
        )]
        max_payload_bytes: usize,
        #[command(flatten)]
        adapters: AdapterArgs,
        #[command(flatten)]
        database: DatabaseArgs,
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

/// The database for a one-shot tool: migrated, waiting a minute at most for PostgreSQL.
async fn tool_pool(
    database: &DatabaseArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<occ_store::PgPool> {
    serve::prepare_database(database, Some(Duration::from_secs(60)), shutdown).await
}

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(async {
            let telemetry = telemetry::init(&cli.log)?;
            let result = run(cli).await;
            telemetry.shutdown().await;
            result
        })
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
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Simulate { broker, simulator } => {
            stop_on_signals(shutdown.clone())?;
            simulate::run(broker, simulator, shutdown).await
        }
        Command::Sources {
            command: SourcesCommand::Import { file, database },
        } => {
            let pool = tool_pool(&database, &shutdown).await?;
            let done = import::sources(&pool, &file).await?;
            println!(
                "{}: {} sources registered, {} updated{}",
                file.display(),
                done.created,
                done.updated,
                if done.profiles > 0 {
                    format!(", {} profiles", done.profiles)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::Zones {
            command: ZonesCommand::Import { file, database },
        } => {
            let pool = tool_pool(&database, &shutdown).await?;
            let done = import::zones(&pool, &file).await?;
            println!(
                "{}: {} zones created, {} updated",
                file.display(),
                done.created,
                done.updated
            );
            Ok(())
        }
        Command::Watchlist {
            command: WatchlistCommand::Import { file, database },
        } => {
            let pool = tool_pool(&database, &shutdown).await?;
            let done = import::watchlist(&pool, &file).await?;
            println!(
                "{}: {} entries added, {} updated",
                file.display(),
                done.created,
                done.updated
            );
            Ok(())
        }
        Command::Audit { command } => {
            let pool = tool_pool(command.database(), &shutdown).await?;
            crate::audit::run(command, &pool).await
        }
        Command::Events { command } => {
            let pool = tool_pool(command.database(), &shutdown).await?;
            crate::storage::run(command, &pool).await
        }
        Command::Export { command } => match command {
            crate::export::ExportCommand::Incident {
                incident,
                case,
                out,
                by,
                database,
            } => {
                let pool = tool_pool(&database, &shutdown).await?;
                crate::export::incident(&pool, &incident, &case, &out, by).await
            }
            crate::export::ExportCommand::Verify {
                dir,
                offline,
                database,
            } => {
                let pool = if offline {
                    None
                } else {
                    Some(tool_pool(&database, &shutdown).await?)
                };
                crate::export::verify(&dir, pool.as_ref()).await
            }
        },
        Command::Keys { command } => {
            let pool = tool_pool(command.database(), &shutdown).await?;
            crate::keys::run(command, &pool).await
        }
        Command::Slots { database } => {
            let pool = tool_pool(&database, &shutdown).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<24} {:<32} lease left", "client id", "held by")?;
            for slot in occ_store::slots::list(&pool).await? {
                let lease = match slot.lease_left {
                    Some(left) if left > 0.0 => format!("{left:.1} s"),
                    Some(_) => "ran out (taken over soon)".to_owned(),
                    None => "-".to_owned(),
                };
                let holder = slot.holder.as_deref().unwrap_or("nobody");
                let client_id = if slot.retiring {
                    format!("{} (retiring)", slot.client_id)
                } else {
                    slot.client_id
                };
                writeln!(out, "{client_id:<24} {holder:<32} {lease}")?;
            }
            Ok(())
        }
        Command::DeadLetters {
            command:
                DeadLettersCommand::List {
                    unresolved,
                    topic_prefix,
                    limit,
                    database,
                },
        } => {
            let pool = tool_pool(&database, &shutdown).await?;
            dead_letters::list(&pool, unresolved, topic_prefix, limit).await
        }
        Command::DeadLetters {
            command:
                DeadLettersCommand::Replay {
                    ids,
                    topic_prefix,
                    limit,
                    max_payload_bytes,
                    adapters,
                    database,
                },
        } => {
            let pool = tool_pool(&database, &shutdown).await?;
            let built =
                occ_adapters::build(&adapters.config()).context("the adapters' settings")?;
            let limits = occ_domain::Limits {
                max_payload_bytes,
                ..occ_domain::Limits::default()
            };
            dead_letters::replay(&pool, &built, &limits, &ids, topic_prefix.as_deref(), limit).await
        }
        Command::Config {
            command: ConfigCommand::Print(args),
        } => {
            let effective = toml::Table::try_from(&*args)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", toml::to_string_pretty(&effective)?)?;
            Ok(())
        }
    }
}
