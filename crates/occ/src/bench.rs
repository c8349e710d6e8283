//! `occ bench`: how fast OCC ingests on this machine, each figure beside a baseline measured in
//! the same run, on the same broker and PostgreSQL.
//!
//! It starts what it needs on its own: a Mosquitto with OCC's settings (`deploy/mosquitto.conf`)
//! on a free port, its own databases on the PostgreSQL server it is pointed at, and OCC itself
//! as a child process (this same binary, `occ serve`), so OCC's memory and CPU are its own.
//! Everything is stopped and dropped at the end.
//!
//! Measures, in order:
//! - **broker alone**: QoS 1 publish → QoS 1 subscriber, the messages of the run;
//! - **PostgreSQL alone**: COPY of the events those messages decode to, 1,000 rows a
//!   transaction, into OCC's own `events` and `event_keys` (its schema, partitions and indexes):
//!   the least storing them costs PostgreSQL, beside which OCC's PostgreSQL CPU is shown;
//! - **bare consumer**: the least an ack-after-commit consumer can do: the backlog queued in a
//!   persistent session, drained with rumqttc (manual acks) into COPY batches of 500, acked
//!   after each commit;
//! - **OCC drain**: the same backlog queued in OCC's session while OCC is stopped, then timed
//!   from OCC's first commit to its last, and the stored events checked to be exactly those
//!   the messages hold;
//! - **live** (see [`live`]): the simulator's messages published at fixed rates while the bare
//!   consumer, then OCC, run; the time from publish to visible in PostgreSQL of one message in
//!   fifty, and everything checked stored exactly once;
//! - **dispatch** (see [`dispatch`]): `ListIncidents` latency with many incidents stored, and
//!   operators claiming and dispatching concurrently, beside the same writes made by
//!   PostgreSQL alone (two statements a pair) and empty `ClaimNext` calls.

mod dispatch;
mod live;
mod search;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::Utc;
use clap::Args;
use occ_adapters::{Adapters, Message};
use occ_domain::{Delivery, Event, Limits};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::process::{Child, Command};

/// `occ bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Messages in the run (the simulator's mix: cameras, LoRaWAN and SenML sensors, gateways;
    /// about one in twenty from a situation that opens or joins an incident).
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,

    /// The PostgreSQL server to measure on; the bench creates (and drops) its own databases
    /// there, named occ_bench_*.
    #[arg(
        long = "database-url",
        env = "OCC_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,

    /// What to measure; all by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Stage::Ingest, Stage::Live, Stage::Dispatch])]
    pub stages: Vec<Stage>,

    /// Rates of the live stage, messages a second, each measured for OCC and the bare
    /// consumer.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u32])]
    pub live_rates: Vec<u32>,

    /// How long each rate of the live stage publishes, in seconds.
    #[arg(long, default_value_t = 10)]
    pub live_seconds: u32,

    /// Incidents stored for the dispatch stage (opened through `PublishEvents`).
    #[arg(long, default_value_t = 100_000)]
    pub incidents: usize,

    /// Events already stored for the `stored` stage, spread over the past year.
    #[arg(long, default_value_t = 10_000_000)]
    pub stored: usize,

    /// Concurrent operators in the dispatch stage, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub operators: usize,

    /// `ClaimNext` + `DispatchUnits` pairs each operator makes (the first fifth warm up, untimed).
    #[arg(long, default_value_t = 1500)]
    pub pairs: usize,

    /// The Mosquitto program to start (on a free port, with OCC's settings); by default the
    /// system's.
    #[arg(long)]
    pub mosquitto: Option<PathBuf>,

    /// The OCC program to measure (another build, for a comparison in one run's conditions);
    /// by default this one.
    #[arg(long)]
    pub occ: Option<PathBuf>,
}

/// A part of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Broker alone, PostgreSQL alone, bare consumer, OCC drain.
    Ingest,
    /// Messages published at fixed rates while OCC (and the bare consumer) run: the time from
    /// publish to visible in PostgreSQL.
    Live,
    /// Incidents listed, claimed and dispatched through the API.
    Dispatch,
    /// OCC's drain again, with `--stored` events of the past year already stored, beside its
    /// drain into an empty table (with the ingest stage).
    Stored,
    /// EventService's searches of those stored events (with the stored stage).
    Search,
}

/// A configuration for a private Mosquitto on `port`: OCC's settings from
/// `deploy/mosquitto.conf`, without persistence unless `first` (settings that take precedence:
/// Mosquitto keeps the first value of a setting) asks for it, logging to `log_dest`.
pub fn mosquitto_config(port: u16, first: &str, log_dest: &str) -> String {
    let shipped = include_str!("../../../deploy/mosquitto.conf");
    let mut config = first.to_owned();
    if !config.is_empty() && !config.ends_with('\n') {
        config.push('\n');
    }
    for line in shipped.lines().filter(|l| {
        !matches!(
            l.split_whitespace().next().unwrap_or(""),
            "listener" | "persistence" | "persistence_location" | "autosave_interval" | "log_dest"
        )
    }) {
        config.push_str(line);
        config.push('\n');
    }
    config.push_str(&format!("listener {port} 127.0.0.1\nlog_dest {log_dest}\n"));
    if !first.contains("persistence ") {
        config.push_str("persistence false\n");
    }
    config
}

/// The Mosquitto program: `given`, or the system's.
pub fn mosquitto_program(given: Option<&Path>) -> PathBuf {
    given.map(Path::to_path_buf).unwrap_or_else(|| {
        [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "/usr/bin/mosquitto",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
    })
}

/// OCC's default adapters, as `occ serve` runs them in the bench.
fn default_adapters() -> anyhow::Result<Adapters> {
    Ok(occ_adapters::build(&occ_adapters::AdaptersConfig {
        native: Some(occ_adapters::NativeConfig::default()),
        frigate: vec![occ_adapters::FrigateConfig::default()],
        chirpstack: Some(occ_adapters::ChirpstackConfig::default()),
        senml: Some(occ_adapters::SenmlConfig::default()),
    })?)
}

/// One message of the run.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
}

/// One line of the result table.
#[derive(Debug)]
struct Row {
    what: String,
    result: String,
    baseline: String,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(program) = &args.occ {
        ensure!(
            program.is_file(),
            "--occ {}: no such program",
            program.display()
        );
        let _ = OCC_PROGRAM.set(program.clone());
    }
    let adapters = default_adapters()?;
    let ingest = args.stages.contains(&Stage::Ingest)
        || args.stages.contains(&Stage::Stored)
        || args.stages.contains(&Stage::Search);
    let messages = if ingest {
        mix(&adapters, args.messages)
    } else {
        Vec::new()
    };
    let events = decode(&adapters, &messages);
    let expected = distinct_events(&events);
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    if ingest {
        eprintln!(
            "occ bench: {} messages ({} bytes on average) that hold {expected} events",
            messages.len(),
            bytes / messages.len().max(1)
        );
    }

    let broker = Mosquitto::start(&mosquitto_program(args.mosquitto.as_deref())).await?;
    // As OCC reaches it: plaintext on this machine unless the URL says otherwise.
    let server = occ_store::db::connect_options(&args.database_url)?;
    let databases = Databases::new(server.clone());
    let mut result = Ok(Vec::new());
    if ingest {
        let stored = (args.stages.contains(&Stage::Stored) || args.stages.contains(&Stage::Search))
            .then_some(args.stored);
        let search = args.stages.contains(&Stage::Search);
        result = measure(
            &broker, &databases, &messages, &events, expected, stored, search,
        )
        .await;
    }
    if args.stages.contains(&Stage::Live)
        && let Ok(rows) = &mut result
    {
        match measure_live(&args, &adapters, &broker, &databases).await {
            Ok(more) => rows.extend(more),
            Err(e) => result = Err(e),
        }
    }
    if args.stages.contains(&Stage::Dispatch)
        && let Ok(rows) = &mut result
    {
        match measure_dispatch(&args, &broker, &databases).await {
            Ok(more) => rows.extend(more),
            Err(e) => result = Err(e),
        }
    }
    databases.drop_all().await;
    drop(broker);
    let rows = result?;
    print_table(&args, &rows, started.elapsed());
    Ok(())
}

async fn measure(
    broker: &Mosquitto,
    databases: &Databases,
    messages: &[Msg],
    events: &[Event],
    expected: usize,
    stored: Option<usize>,
    search: bool,
) -> anyhow::Result<Vec<Row>> {
    let n = messages.len();
    let mut rows = Vec::new();

    eprintln!("broker alone …");
    let broker_rate = broker_alone(broker.port, messages).await?;
    rows.push(Row {
        what: "broker alone: QoS 1 publish → subscribe".into(),
        result: format!("{} msg/s", thousands(broker_rate)),
        baseline: "—".into(),
    });

    eprintln!("PostgreSQL alone …");
    let db = databases.create("copy").await?;
    copy_schema(&db, events).await?;
    let (copy_rate, copy_pg) = measure_pg(|| copy_events(&db, events)).await?;
    rows.push(Row {
        what: "PostgreSQL alone: COPY of the decoded events into OCC's events and keys tables \
               (their indexes), 1,000 a transaction"
            .into(),
        result: format!("{} ev/s", thousands(copy_rate)),
        baseline: "—".into(),
    });

    eprintln!("bare consumer …");
    let db = databases.create("bare").await?;
    let (bare, bare_pg) = measure_pg(|| bare_consumer(broker.port, &db, messages)).await?;
    rows.push(Row {
        what: format!(
            "bare consumer: drain of {n} queued messages (rumqttc → COPY, ack after commit)"
        ),
        result: format!("{} msg/s", thousands(bare)),
        baseline: "—".into(),
    });

    eprintln!("OCC drain …");
    let db = databases.create("occ").await?;
    let drain = occ_drain(broker.port, &db, messages, expected, 0).await?;
    rows.push(Row {
        what: format!("OCC drain: {n} queued messages → {expected} events, exactly once"),
        result: format!("{} msg/s", thousands(drain.rate)),
        baseline: format!(
            "bare consumer {} msg/s ({:.2}×)",
            thousands(bare),
            drain.rate / bare
        ),
    });
    rows.push(Row {
        what: "PostgreSQL CPU per message, drain".into(),
        result: format!("{:.1} µs", micros(drain.pg_cpu) / n as f64),
        baseline: format!(
            "bare consumer {:.1} µs ({:.2}×); COPY into OCC's tables alone {:.1} µs ({:.2}×)",
            micros(bare_pg) / n as f64,
            drain.pg_cpu.as_secs_f64() / bare_pg.as_secs_f64().max(1e-9),
            micros(copy_pg) / n as f64,
            drain.pg_cpu.as_secs_f64() / copy_pg.as_secs_f64().max(1e-9),
        ),
    });
    rows.push(Row {
        what: "OCC CPU per message, drain".into(),
        result: format!("{:.1} µs", micros(drain.occ_cpu) / n as f64),
        baseline: "—".into(),
    });
    rows.push(Row {
        what: "OCC peak RSS, drain".into(),
        result: format!("{} MiB", drain.peak_rss_kib / 1024),
        baseline: format!("--mqtt-receive-maximum {}", RECEIVE_MAXIMUM),
    });
    if let Some(stored) = stored {
        eprintln!("OCC drain with {stored} events stored …");
        let db = databases.create("occ_stored").await?;
        let full = occ_drain(broker.port, &db, messages, expected, stored).await?;
        rows.push(Row {
            what: format!(
                "OCC drain with {} events of a year stored (monthly partitions)",
                thousands(stored as f64)
            ),
            result: format!("{} msg/s", thousands(full.rate)),
            baseline: format!(
                "empty table {} msg/s ({:.2}×)",
                thousands(drain.rate),
                full.rate / drain.rate
            ),
        });
        rows.push(Row {
            what: format!(
                "PostgreSQL CPU per message, drain with {} stored",
                thousands(stored as f64)
            ),
            result: format!("{:.1} µs", micros(full.pg_cpu) / n as f64),
            baseline: format!("empty table {:.1} µs", micros(drain.pg_cpu) / n as f64),
        });
        if search {
            eprintln!("searches of the {stored} stored events …");
            let (mut occ, grpc) = start_occ(
                broker.port,
                &db,
                &format!("occ-bench-search-{}", std::process::id()),
            )
            .await?;
            wait_serving(&grpc, &mut occ).await?;
            let measured = search::run(&grpc, Utc::now()).await;
            terminate(&mut occ).await?;
            for m in measured? {
                rows.push(Row {
                    what: format!(
                        "{} ({:.0} results a call), {} stored",
                        m.what,
                        m.results,
                        thousands(stored as f64)
                    ),
                    result: m.latency.show(),
                    baseline: if m.what.starts_with("CountEvents") {
                        "read from the counts kept, not the events".into()
                    } else {
                        "target p99 ≤ 200 ms".into()
                    },
                });
            }
        }
    }
    Ok(rows)
}

async fn measure_live(
    args: &BenchArgs,
    adapters: &Adapters,
    broker: &Mosquitto,
    databases: &Databases,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &rate in &args.live_rates {
        let n = rate as usize * args.live_seconds as usize;
        let (messages, probes) = live::with_probes(mix(adapters, n));
        let expected = distinct_events(&decode(adapters, &messages));
        eprintln!("live {rate} msg/s: bare consumer …");
        let db = databases.create(&format!("live_bare_{rate}")).await?;
        let bare = live::bare(broker.port, &db, &messages, probes, rate).await?;
        eprintln!("live {rate} msg/s: OCC …");
        let db = databases.create(&format!("live_occ_{rate}")).await?;
        let occ = live::occ(broker.port, &db, &messages, probes, expected, rate).await?;
        let what = |who: &str, published: f64| {
            format!(
                "{who} live at {} msg/s ({} reached) for {} s: publish → visible, {probes} probes",
                thousands(f64::from(rate)),
                thousands(published),
                args.live_seconds
            )
        };
        let shown = |l: &live::Live| {
            format!(
                "{} · PostgreSQL CPU {:.1} µs a message",
                l.latency.show(),
                micros(l.pg_cpu_per_message)
            )
        };
        rows.push(Row {
            what: what("bare consumer", bare.published_per_s),
            result: shown(&bare),
            baseline: "—".into(),
        });
        rows.push(Row {
            what: what("OCC, exactly once,", occ.published_per_s),
            result: shown(&occ),
            baseline: format!(
                "bare consumer p99 {} ({:.2}×), PostgreSQL CPU {:.2}×",
                dispatch::millis(bare.latency.p99),
                occ.latency.p99.as_secs_f64() / bare.latency.p99.as_secs_f64().max(1e-9),
                micros(occ.pg_cpu_per_message) / micros(bare.pg_cpu_per_message).max(1e-9)
            ),
        });
    }
    Ok(rows)
}

async fn measure_dispatch(
    args: &BenchArgs,
    broker: &Mosquitto,
    databases: &Databases,
) -> anyhow::Result<Vec<Row>> {
    eprintln!("dispatch …");
    // Half the incidents are the police's; OCC's operators, then PostgreSQL alone, each claim
    // --operators × --pairs of them.
    ensure!(
        args.incidents / 2 >= 2 * args.operators * args.pairs,
        "--incidents {} leaves {} police incidents; the dispatch stage claims {} (--operators × --pairs, twice)",
        args.incidents,
        args.incidents / 2,
        2 * args.operators * args.pairs
    );
    let db = databases.create("dispatch").await?;
    let (mut occ, grpc) = start_occ(broker.port, &db, "occ-bench-dispatch").await?;
    wait_serving(&grpc, &mut occ).await?;
    let pid = occ.id().context("occ serve exited")?;
    let pg_before = cpu_of_processes("postgres");
    let occ_before = cpu_of_pid(pid);
    let figures = dispatch::run(&grpc, &db, args.incidents, args.operators, args.pairs).await;
    let occ_cpu = cpu_of_pid(pid).saturating_sub(occ_before);
    let pg_cpu = cpu_of_processes("postgres").saturating_sub(pg_before);
    let peak = peak_rss_kib(pid);
    terminate(&mut occ).await?;
    let f = figures?;
    eprintln!("  PostgreSQL alone: the pairs' writes …");
    let floor = dispatch::floor(&db, args.operators, args.pairs).await?;
    let of_floor = if floor > 0.0 {
        format!("{:.2}×", f.pairs_per_s / floor)
    } else {
        "—".into()
    };
    Ok(vec![
        Row {
            what: format!(
                "incidents opened through PublishEvents ({} stored)",
                f.incidents
            ),
            result: format!("{} incidents/s", thousands(f.opened_per_s)),
            baseline: "—".into(),
        },
        Row {
            what: format!(
                "ListIncidents, first page of 50 of {} open incidents",
                f.incidents
            ),
            result: f.first_page.show(),
            baseline: "—".into(),
        },
        Row {
            what: format!(
                "ListIncidents, one queue paged {} pages of 100 deep",
                f.depth
            ),
            result: f.deep_pages.show(),
            baseline: "—".into(),
        },
        Row {
            what: format!(
                "ClaimNext + DispatchUnits, {} operators on one queue, {} pairs",
                f.operators, f.pairs
            ),
            result: format!("{} pairs/s ({})", thousands(f.pairs_per_s), f.pair.show()),
            baseline: format!(
                "PostgreSQL alone {} pairs/s ({of_floor}); the same operators' empty ClaimNext: {} calls/s",
                thousands(floor),
                thousands(f.empty_calls_per_s)
            ),
        },
        Row {
            what: format!(
                "PostgreSQL alone: the same writes, a pair in two statements, {} connections",
                f.operators
            ),
            result: format!("{} pairs/s", thousands(floor)),
            baseline: "—".into(),
        },
        Row {
            what: "CPU of the dispatch stage (OCC, PostgreSQL); OCC peak RSS".into(),
            result: format!(
                "{:.1} s, {:.1} s; {} MiB",
                occ_cpu.as_secs_f64(),
                pg_cpu.as_secs_f64(),
                peak / 1024
            ),
            baseline: "—".into(),
        },
    ])
}

/// OCC's receive maximum in the run (its default).
const RECEIVE_MAXIMUM: u16 = 1000;

fn print_table(args: &BenchArgs, rows: &[Row], took: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "occ bench {} — {} messages, {cores} cores, broker, PostgreSQL, OCC and load on one machine, {}",
        env!("CARGO_PKG_VERSION"),
        args.messages,
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    if let Some(program) = &args.occ {
        println!("OCC measured: {}", program.display());
    }
    println!();
    println!("| measure | result | baseline (same run) |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.what, r.result, r.baseline);
    }
    println!();
    println!("(the run took {:.0} s)", took.as_secs_f64());
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The run's messages: the simulator's city, without its status reports (whether one is
/// stored depends on the source's state, which would blur the exactly-once check).
fn mix(adapters: &Adapters, n: usize) -> Vec<Msg> {
    crate::simulate::mix(7, n * 2)
        .into_iter()
        .map(|(topic, payload)| Msg { topic, payload })
        .filter(|m| {
            decode_one(adapters, m).is_some_and(|events| {
                !events.is_empty()
                    && events.iter().all(|e| {
                        occ_domain::source::reported_status(e.event_type.as_str()).is_none()
                    })
            })
        })
        .take(n)
        .collect()
}

fn decode_one(adapters: &Adapters, m: &Msg) -> Option<Vec<Event>> {
    adapters
        .decode(
            &Message {
                topic: &m.topic,
                payload: &m.payload,
                received_at: Utc::now(),
            },
            &Limits::default(),
        )
        .ok()
}

fn decode(adapters: &Adapters, messages: &[Msg]) -> Vec<Event> {
    messages
        .iter()
        .filter_map(|m| decode_one(adapters, m))
        .flatten()
        .map(|mut e| {
            // Every message of the run is delivered once: events without a producer id are
            // each their own.
            e.idempotency_key = e.idempotency_key.scoped(&Delivery::Once);
            e
        })
        .collect()
}

/// How many events OCC must store: one per (source, key); an evolving event's revisions are
/// one row.
fn distinct_events(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| (e.source_id.as_str(), e.idempotency_key.as_str()))
        .collect::<HashSet<_>>()
        .len()
}

// ---------------------------------------------------------------------------------------------
// The broker

/// A Mosquitto with OCC's settings on a free port, without persistence. Stopped when dropped.
#[derive(Debug)]
struct Mosquitto {
    port: u16,
    child: Child,
    config: PathBuf,
}

impl Mosquitto {
    async fn start(program: &Path) -> anyhow::Result<Mosquitto> {
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let path = std::env::temp_dir().join(format!("occ-bench-mosquitto-{port}.conf"));
            // Its log, for a run that goes wrong: removed with the broker.
            let log = path.with_extension("log");
            let config = mosquitto_config(port, "", &format!("file {}", log.display()));
            std::fs::write(&path, config)?;
            let child = Command::new(program)
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| {
                    format!("starting {} (the mosquitto package)", program.display())
                })?;
            let mut broker = Mosquitto {
                port,
                child,
                config: path,
            };
            match await_mosquitto(&mut broker.child, port).await {
                Ok(()) => return Ok(broker),
                // Another program took the port first: another port.
                Err(_) if attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits until the Mosquitto `child` listens on `port`. A port found free may be taken by
/// another program before Mosquitto binds it: Mosquitto then exits at once while the port
/// answers all the same (someone else's broker, whose sessions and restarts are not ours). So
/// the child must still run a moment after its port answers.
pub async fn await_mosquitto(child: &mut Child, port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Some(status) = child.try_wait()? {
            bail!("mosquitto exited ({status}): port {port} taken?");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            // It fails to bind within milliseconds of starting, if it fails.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(status) = child.try_wait()? {
                bail!("mosquitto exited ({status}): port {port} was taken by another program");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("mosquitto did not start listening on {port}")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(self.config.with_extension("log"));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn mqtt_options(client_id: &str, port: u16, persistent: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1024 * 1024))
        .set_outgoing_inflight_upper_limit(1000);
    if persistent {
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_manual_acks(true);
    }
    o
}

/// Publishes every message at QoS 1 and returns once the broker has acknowledged them all.
async fn publish_all(port: u16, messages: &[Msg]) -> anyhow::Result<()> {
    publish_each(port, messages, async |_, _| {}).await?;
    Ok(())
}

/// Publishes every message at QoS 1, awaiting `before(i, message)` ahead of each (to pace
/// them, or note when one goes out); returns how long handing them to the client took, once
/// the broker has acknowledged them all.
async fn publish_each<F>(port: u16, messages: &[Msg], mut before: F) -> anyhow::Result<Duration>
where
    F: AsyncFnMut(usize, &Msg),
{
    let (client, mut eventloop) = AsyncClient::new(
        mqtt_options(
            &format!("occ-bench-pub-{}", std::process::id()),
            port,
            false,
        ),
        2000,
    );
    let n = messages.len();
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => bail!("publisher: {e}"),
            }
        }
        Ok(eventloop)
    });
    let started = Instant::now();
    for (i, m) in messages.iter().enumerate() {
        before(i, m).await;
        client
            .publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
            .await?;
    }
    let took = started.elapsed();
    let mut eventloop = acks.await??;
    client.disconnect().await?;
    while !matches!(
        eventloop.poll().await,
        Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
    ) {}
    Ok(took)
}

/// Connects a persistent session and subscribes, so that what is published next is queued
/// for it.
async fn make_session(client_id: &str, port: u16, filters: Vec<Filter>) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(client_id, port, true), 100);
    client.subscribe_many(filters).await?;
    loop {
        match eventloop.poll().await? {
            MqttEvent::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    client.disconnect().await?;
    while !matches!(
        eventloop.poll().await,
        Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
    ) {}
    Ok(())
}

async fn broker_alone(port: u16, messages: &[Msg]) -> anyhow::Result<f64> {
    let (client, mut eventloop) = AsyncClient::new(
        mqtt_options(
            &format!("occ-bench-sub-{}", std::process::id()),
            port,
            false,
        ),
        100,
    );
    client.subscribe("#", QoS::AtLeastOnce).await?;
    loop {
        if let MqttEvent::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
            break;
        }
    }
    let n = messages.len();
    let receiver = tokio::spawn(async move {
        let mut received = 0;
        while received < n {
            if let MqttEvent::Incoming(Packet::Publish(_)) = eventloop.poll().await? {
                received += 1;
            }
        }
        anyhow::Ok(Instant::now())
    });
    let start = Instant::now();
    publish_all(port, messages).await?;
    let end = tokio::time::timeout(Duration::from_secs(600), receiver)
        .await
        .context("the subscriber did not get every message")???;
    let _ = client.disconnect().await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// The bench's databases on the server, dropped at the end.
#[derive(Debug)]
struct Databases {
    server: PgConnectOptions,
    made: std::sync::Mutex<Vec<String>>,
}

impl Databases {
    fn new(server: PgConnectOptions) -> Self {
        Self {
            server,
            made: std::sync::Mutex::new(Vec::new()),
        }
    }

    async fn create(&self, what: &str) -> anyhow::Result<PgConnectOptions> {
        let name = format!("occ_bench_{}_{what}", std::process::id());
        let mut admin = self.server.connect().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        self.made
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.clone());
        Ok(self.server.clone().database(&name))
    }

    async fn drop_all(&self) {
        let names = std::mem::take(
            &mut *self
                .made
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let Ok(mut admin) = self.server.connect().await else {
            eprintln!("cannot drop the bench databases {names:?}");
            return;
        };
        for name in names {
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await
            {
                eprintln!("cannot drop {name}: {e}");
            }
        }
        let _ = admin.close().await;
    }
}

/// CPU time (user + system) of every process named `name`, and of `pid`'s, read from /proc.
fn cpu_of_processes(name: &str) -> Duration {
    let mut ticks = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let path = entry.path();
            let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                continue;
            };
            // With the time of exited children their parent collected: a database connection
            // closed during the measure took its CPU with it, but the postmaster keeps it.
            if stat_comm(&stat) == Some(name) {
                ticks += stat_ticks(&stat, true);
            }
        }
    }
    ticks_to_duration(ticks)
}

fn cpu_of_pid(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| ticks_to_duration(stat_ticks(&s, false)))
        .unwrap_or_default()
}

fn stat_comm(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

/// utime + stime (fields 14 and 15), in clock ticks.
/// User and system time, and with `children` that of exited children waited for.
fn stat_ticks(stat: &str, children: bool) -> u64 {
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 is index 0; utime is field 14.
    let at = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(14) + at(15) + if children { at(16) + at(17) } else { 0 }
}

/// Linux reports process times in USER_HZ, 100 per second on every mainstream build.
fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `phase` (which returns a rate) and the PostgreSQL CPU it cost.
async fn measure_pg<F, Fut>(phase: F) -> anyhow::Result<(f64, Duration)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let before = cpu_of_processes("postgres");
    let rate = phase().await?;
    let after = cpu_of_processes("postgres");
    Ok((rate, after.saturating_sub(before)))
}

/// One line of COPY's text format: tabs between fields, `\N` for null, backslash escapes.
fn copy_field(out: &mut String, value: Option<&str>) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\t');
    }
    match value {
        None => out.push_str("\\N"),
        Some(v) => {
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
}

const EVENT_COLUMNS: &str = "id, source_id, idempotency_key, external_id, event_type, severity, \
     source_kind, occurred_at, received_at, lat, lon, zone, confidence, measurements, \
     attributes, transport, seen_at";

/// An event as a line of COPY into OCC's events table (the columns of [`EVENT_COLUMNS`]), and
/// its key as a line of COPY into OCC's keys table.
fn copy_lines(events: &mut String, keys: &mut String, e: &Event) {
    let measurements = serde_json::to_string(&e.measurements).unwrap_or_else(|_| "{}".into());
    let attributes = serde_json::to_string(&e.attributes).unwrap_or_else(|_| "{}".into());
    let id = e.id.to_string();
    let received = e.received_at.to_rfc3339();
    let seen = e.observed_at().to_rfc3339();
    copy_field(events, Some(&id));
    copy_field(events, Some(e.source_id.as_str()));
    copy_field(events, Some(e.idempotency_key.as_str()));
    copy_field(events, e.external_id.as_deref());
    copy_field(events, Some(e.event_type.as_str()));
    copy_field(events, e.severity.map(|s| s.as_str()));
    copy_field(events, e.source_kind.as_ref().map(|k| k.as_str()));
    copy_field(events, Some(&e.occurred_at.to_rfc3339()));
    copy_field(events, Some(&received));
    copy_field(events, e.location.map(|l| l.lat().to_string()).as_deref());
    copy_field(events, e.location.map(|l| l.lon().to_string()).as_deref());
    copy_field(events, e.zone.as_ref().map(|z| z.as_str()));
    copy_field(
        events,
        e.confidence.map(|c| c.value().to_string()).as_deref(),
    );
    copy_field(events, Some(&measurements));
    copy_field(events, Some(&attributes));
    copy_field(events, Some("mqtt"));
    copy_field(events, Some(&seen));
    events.push('\n');
    copy_field(keys, Some(e.source_id.as_str()));
    copy_field(keys, Some(e.idempotency_key.as_str()));
    copy_field(keys, Some(&id));
    copy_field(keys, Some(&seen));
    copy_field(keys, Some(&received));
    keys.push('\n');
}

/// OCC's schema, and partitions for the events of the run, made before the COPY is measured.
async fn copy_schema(db: &PgConnectOptions, events: &[Event]) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect_with(db.clone()).await?;
    occ_store::migrate(&pool).await?;
    let seen = events.iter().map(|e| e.observed_at());
    let (from, to) = (seen.clone().min(), seen.max());
    if let (Some(from), Some(to)) = (from, to) {
        occ_store::partitions::cover(
            &pool,
            occ_domain::retention::Period::Month,
            from,
            to + chrono::TimeDelta::seconds(1),
        )
        .await?;
    }
    pool.close().await;
    Ok(())
}

/// The decoded events (one row per evolving event, as OCC keeps them) copied into OCC's own
/// events and keys tables, with their indexes, 1,000 a transaction: what storing them costs
/// PostgreSQL with none of OCC's work around it. Events a second.
async fn copy_events(db: &PgConnectOptions, events: &[Event]) -> anyhow::Result<f64> {
    let mut conn = db.connect().await?;
    let mut seen = HashSet::new();
    let rows: Vec<&Event> = events
        .iter()
        .filter(|e| seen.insert((e.source_id.as_str(), e.idempotency_key.as_str())))
        .collect();
    let start = Instant::now();
    for chunk in rows.chunks(1000) {
        let mut text = String::new();
        let mut keys = String::new();
        for e in chunk {
            copy_lines(&mut text, &mut keys, e);
        }
        let mut tx = conn.begin().await?;
        let mut copy = tx
            .copy_in_raw(&format!("COPY events ({EVENT_COLUMNS}) FROM STDIN"))
            .await?;
        copy.send(text.as_bytes()).await?;
        copy.finish().await?;
        let mut copy = tx
            .copy_in_raw(
                "COPY event_keys (source_id, idempotency_key, event_id, seen_at, used_at) \
                 FROM STDIN",
            )
            .await?;
        copy.send(keys.as_bytes()).await?;
        copy.finish().await?;
        tx.commit().await?;
    }
    let rate = rows.len() as f64 / start.elapsed().as_secs_f64();
    conn.close().await?;
    Ok(rate)
}

// ---------------------------------------------------------------------------------------------
// The bare consumer

async fn bare_consumer(port: u16, db: &PgConnectOptions, messages: &[Msg]) -> anyhow::Result<f64> {
    let mut conn = db.connect().await?;
    bare_table(&mut conn).await?;
    let client_id = format!("occ-bench-bare-{}", std::process::id());
    make_session(&client_id, port, vec![Filter::new("#", QoS::AtLeastOnce)]).await?;
    publish_all(port, messages).await?;
    let n = messages.len();
    let (first, conn) = bare_consume(port, client_id, conn, n).await?;
    let rate = n as f64
        / first
            .map_or(Duration::ZERO, |f| f.elapsed())
            .as_secs_f64()
            .max(1e-9);
    conn.close().await?;
    // The first batch's commit starts the clock, as for OCC: one batch fewer was timed.
    Ok(rate * (n - 500.min(n)) as f64 / n as f64)
}

/// The bare consumer's table: each message's topic, bytes and when it was stored; a probe of
/// the live stage also by its id.
async fn bare_table(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE messages (topic text NOT NULL, payload bytea NOT NULL, received_at timestamptz NOT NULL, probe text);
         CREATE INDEX messages_probe ON messages (probe) WHERE probe IS NOT NULL",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Consumes `n` messages from the session `client_id` into COPY batches of 500 (or what came
/// in 50 ms), acking each batch after its commit. Returns when the first batch committed.
async fn bare_consume(
    port: u16,
    client_id: String,
    mut conn: PgConnection,
    n: usize,
) -> anyhow::Result<(Option<Instant>, PgConnection)> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&client_id, port, true), 70_000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bare consumer: {e}");
                    break;
                }
            }
        }
    });
    let mut stored = 0;
    let mut first: Option<Instant> = None;
    let mut text = Vec::new();
    while stored < n {
        let mut batch = Vec::with_capacity(500);
        let Some(p) = rx.recv().await else {
            bail!("bare consumer: the connection ended after {stored} messages");
        };
        batch.push(p);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        while batch.len() < 500 {
            tokio::select! {
                p = rx.recv() => match p { Some(p) => batch.push(p), None => break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        text.clear();
        let now = Utc::now().to_rfc3339();
        for p in &batch {
            let mut line = String::new();
            copy_field(&mut line, Some(&String::from_utf8_lossy(&p.topic)));
            copy_field(&mut line, Some(&format!("\\x{}", hex(&p.payload))));
            copy_field(&mut line, Some(&now));
            copy_field(&mut line, live::probe_id(&p.topic, &p.payload));
            line.push('\n');
            text.extend_from_slice(line.as_bytes());
        }
        let mut tx = conn.begin().await?;
        let mut copy = tx
            .copy_in_raw("COPY messages (topic, payload, received_at, probe) FROM STDIN")
            .await?;
        copy.send(text.as_slice()).await?;
        copy.finish().await?;
        tx.commit().await?;
        first.get_or_insert_with(Instant::now);
        for p in &batch {
            client.ack(p).await?;
        }
        stored += batch.len();
    }
    let _ = client.disconnect().await;
    let _ = poller.await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&mut conn)
        .await?;
    ensure!(count as usize == n, "bare consumer stored {count} of {n}");
    Ok((first, conn))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// OCC

#[derive(Debug)]
struct Drain {
    rate: f64,
    pg_cpu: Duration,
    occ_cpu: Duration,
    peak_rss_kib: u64,
}

/// `occ serve` as a child process on the bench's broker and database.
async fn start_occ(
    port: u16,
    db: &PgConnectOptions,
    client_id: &str,
) -> anyhow::Result<(Child, String)> {
    spawn_occ(port, db, client_id, "").await
}

/// Like [`start_occ`], serving its metrics on a free port too; returns that address last.
async fn start_occ_metered(
    port: u16,
    db: &PgConnectOptions,
    client_id: &str,
) -> anyhow::Result<(Child, String, String)> {
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let (child, grpc) = spawn_occ(port, db, client_id, &metrics).await?;
    Ok((child, grpc, metrics))
}

/// `--occ`, when given.
static OCC_PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

async fn spawn_occ(
    port: u16,
    db: &PgConnectOptions,
    client_id: &str,
    metrics: &str,
) -> anyhow::Result<(Child, String)> {
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let url = db.to_url_lossy().to_string();
    let program = match OCC_PROGRAM.get() {
        Some(path) => path.clone(),
        None => std::env::current_exe()?,
    };
    let child = Command::new(program)
        .args(["serve", "--database-url", &url])
        .args([
            "--mqtt-port",
            &port.to_string(),
            "--mqtt-client-id",
            client_id,
        ])
        .args(["--grpc-listen", &grpc, "--metrics-listen", metrics])
        // The harness names its operators in x-occ-operator; an API key's cost (a cached
        // lookup) is not what these figures measure.
        .arg("--insecure")
        // The harness floods a few hundred sources with a backlog on purpose.
        .args(["--ingest-source-rate", "0"])
        .env("OCC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting occ serve")?;
    Ok((child, grpc))
}

async fn wait_serving(grpc: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("occ serve exited: {status}");
        }
        if serving(grpc).await {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "occ serve not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serving(grpc: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

async fn terminate(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().context("occ already exited")?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("occ serve did not stop within 30 s")??;
    Ok(())
}

/// How many MQTT messages OCC has committed, from its Prometheus metrics at `addr`.
async fn messages_committed(addr: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: occ\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("occ_ingest_messages_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

async fn occ_drain(
    port: u16,
    db: &PgConnectOptions,
    messages: &[Msg],
    expected: usize,
    prefill: usize,
) -> anyhow::Result<Drain> {
    let client_id = format!("occ-bench-occ-{}", std::process::id());
    // The first start creates the schema and OCC's session; then OCC is stopped and the
    // backlog queued in its session.
    let (mut occ, grpc) = start_occ(port, db, &client_id).await?;
    wait_serving(&grpc, &mut occ).await?;
    terminate(&mut occ).await?;
    if prefill > 0 {
        prefill_events(db, prefill).await?;
    }
    publish_all(port, messages).await?;

    let mut conn = db.connect().await?;
    let count = async |conn: &mut PgConnection| -> anyhow::Result<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut *conn)
            .await?;
        Ok(n as usize)
    };
    let pg_before = cpu_of_processes("postgres");
    let (mut occ, _, metrics) = start_occ_metered(port, db, &client_id).await?;
    let pid = occ.id().context("occ serve exited")?;
    // A drain that stops moving is a fault to report, not something to wait an hour for.
    const STALLED: Duration = Duration::from_secs(120);
    let mut progress = (Instant::now(), 0);
    // Progress from OCC's own counter of committed messages: counting rows in PostgreSQL
    // every few milliseconds would cost PostgreSQL more than the drain as the table grows.
    let n = messages.len();
    let mut first: Option<(Instant, u64)> = None;
    let end = loop {
        let done = messages_committed(&metrics).await.unwrap_or(0);
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
        }
        if done > progress.1 {
            progress = (Instant::now(), done);
        }
        if done >= n as u64 {
            break Instant::now();
        }
        if let Some(status) = occ.try_wait()? {
            bail!("occ serve exited during the drain: {status}");
        }
        ensure!(
            progress.0.elapsed() < STALLED,
            "the drain stalled: {done} of {n} messages committed, none for {} s (the backlog \
             queued in OCC's session did not arrive)",
            STALLED.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let occ_cpu = cpu_of_pid(pid);
    let peak_rss_kib = peak_rss_kib(pid);
    let pg_cpu = cpu_of_processes("postgres").saturating_sub(pg_before);
    // Nothing more may arrive: every message is one event, or a revision of one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = count(&mut conn).await?;
    terminate(&mut occ).await?;
    conn.close().await?;
    ensure!(
        stored == expected + prefill,
        "OCC stored {} events, expected {expected}",
        stored - prefill.min(stored)
    );
    let (t0, n0) = first.context("nothing stored")?;
    let timed = (n as u64).saturating_sub(n0) as f64;
    Ok(Drain {
        rate: timed / (end - t0).as_secs_f64().max(1e-9),
        pg_cpu,
        occ_cpu,
        peak_rss_kib,
    })
}

/// Stores `n` events of the past year straight into OCC's tables (a year's partitions made as
/// OCC makes them; keys for the last week, as OCC keeps them), as a city's cameras and sensors
/// would have left them: 2,000 sources, a mix of kinds, most in a zone.
async fn prefill_events(db: &PgConnectOptions, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let now = Utc::now();
    // Its statements take seconds each, by design: no slow-statement warnings for them.
    let db = &db.clone().disable_statement_logging();
    let pool = sqlx::PgPool::connect_with(db.clone()).await?;
    occ_store::partitions::cover(
        &pool,
        occ_domain::retention::Period::Month,
        now - chrono::TimeDelta::days(366),
        now,
    )
    .await?;
    let mut conn = db.connect().await?;
    const CHUNK: usize = 1_000_000;
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        sqlx::query(
            r#"
            INSERT INTO events (id, source_id, idempotency_key, external_id, event_type,
                                severity, occurred_at, received_at, lat, lon, zone, confidence,
                                attributes, transport, seen_at)
            SELECT gen_random_uuid(), 'src-' || (g % 2000), 'id:prefill-' || g,
                   'prefill-' || g,
                   (ARRAY['motion.detected', 'object.person', 'object.car', 'lpr.plate',
                          'temperature.reading', 'noise.level', 'air.pm25',
                          'door.opened'])[1 + g % 8],
                   'info', t, t, 51.0 + (g % 1000) / 5000.0, 71.3 + (g % 997) / 5000.0,
                   'zone_' || (g % 300), 0.8,
                   CASE WHEN g % 8 = 3 THEN jsonb_build_object('plate', 'P' || (g % 50000),
                                                               'plate_normalized', 'P' || (g % 50000))
                        ELSE '{}'::jsonb END,
                   'mqtt', t
              FROM generate_series($1::int8, $2::int8) AS g,
                   LATERAL (SELECT $3::timestamptz - ((g * $4) % 31536000) * interval '1 second'
                                   - (g % 1000) * interval '1 millisecond') AS at(t)
            "#,
        )
        .bind(done as i64)
        .bind((done + count) as i64 - 1)
        .bind(now - chrono::TimeDelta::minutes(5))
        // Spread over the year.
        .bind((31_536_000 / n.max(1)).max(1) as i64)
        .execute(&mut conn)
        .await?;
        done += count;
        eprintln!("  {done} of {n} events stored …");
    }
    sqlx::query(
        r#"
        INSERT INTO event_keys (source_id, idempotency_key, event_id, seen_at, used_at)
        SELECT source_id, idempotency_key, id, seen_at, received_at FROM events
         WHERE seen_at > now() - interval '7 days'
        ON CONFLICT DO NOTHING
        "#,
    )
    .execute(&mut conn)
    .await?;
    // The wall's counts of those events, as OCC would have kept them while they came: days
    // for the year, hours for the last 90 days (`--hourly-count-retention`), per zone and
    // city-wide. (An OCC from before the counts, measured with `--occ`, has none.)
    let counted: bool = sqlx::query_scalar("SELECT to_regclass('event_counts_daily') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    let statements: &[&str] = if counted { COUNTS } else { &[] };
    for statement in statements {
        sqlx::query(*statement).execute(&mut conn).await?;
    }
    // As a year-old database is: its old partitions vacuumed long ago. Otherwise autovacuum
    // works through the fresh rows during the drain, and its CPU counts as PostgreSQL's.
    let vacuum = if counted {
        "VACUUM (ANALYZE) events, event_keys, event_counts_hourly, event_counts_daily, \
         event_counts_city_hourly, event_counts_city_daily"
    } else {
        "VACUUM (ANALYZE) events, event_keys"
    };
    sqlx::query(vacuum).execute(&mut conn).await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    conn.close().await?;
    pool.close().await;
    eprintln!("  stored in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The wall's counts of the prefilled events, as OCC keeps them.
const COUNTS: &[&str] = &[
    r#"
        INSERT INTO event_counts_daily (bucket, zone, event_type, n)
        SELECT date_trunc('day', seen_at, (SELECT time_zone FROM wall_settings)),
               coalesce(zone, ''), event_type, count(*)
          FROM events GROUP BY 1, 2, 3
        "#,
    r#"
        INSERT INTO event_counts_hourly (bucket, zone, event_type, n)
        SELECT date_trunc('hour', seen_at, (SELECT time_zone FROM wall_settings)),
               coalesce(zone, ''), event_type, count(*)
          FROM events WHERE seen_at >= now() - interval '90 days' GROUP BY 1, 2, 3
        "#,
    r#"
        INSERT INTO event_counts_city_daily (bucket, event_type, n)
        SELECT bucket, event_type, sum(n) FROM event_counts_daily GROUP BY 1, 2
        "#,
    r#"
        INSERT INTO event_counts_city_hourly (bucket, event_type, n)
        SELECT bucket, event_type, sum(n) FROM event_counts_hourly GROUP BY 1, 2
        "#,
];
