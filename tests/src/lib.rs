//! The end-to-end harness: a real Mosquitto (started with OCC's broker settings from
//! `deploy/mosquitto.conf` on a free port), a fresh PostgreSQL database per test, and OCC
//! itself, either in-process on an ephemeral gRPC port or as a child process that a test can
//! kill.
#![forbid(unsafe_code)]

pub mod secure;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use occ::ServeArgs;
use occ::serve::Running;
use occ_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_proto::v1::rule_service_client::RuleServiceClient;
use occ_proto::v1::source_service_client::SourceServiceClient;
use occ_proto::v1::watchlist_service_client::WatchlistServiceClient;
use occ_proto::v1::zone_service_client::ZoneServiceClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Logs from OCC under test, shown for failing tests (RUST_LOG, default warnings).
pub fn init_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The workspace's top folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Panic button `n` pressed at transit stop `n` (a police incident by the default rules).
pub fn panic_button(n: usize) -> occ_proto::v1::Event {
    occ_proto::v1::Event {
        source_id: format!("panic-{n}"),
        external_id: format!("press-{n}"),
        r#type: "panic.pressed".into(),
        zone: format!("esil_transit_stop_{n}"),
        location: Some(occ_proto::v1::GeoPoint {
            lat: 51.128,
            lon: 71.430 + n as f64 * 0.001,
        }),
        ..Default::default()
    }
}

/// Presses panic button 1 through `PublishEvents` of an OCC without authentication; the
/// number of the police incident it opens.
pub async fn press_panic_button(grpc: &str) -> String {
    open_incidents(grpc, vec![panic_button(1)]).await.remove(0)
}

/// Publishes `events` through `PublishEvents` of an OCC without authentication; the numbers
/// of the incidents they opened.
pub async fn open_incidents(grpc: &str, events: Vec<occ_proto::v1::Event>) -> Vec<String> {
    ingest(grpc)
        .await
        .publish_events(occ_proto::v1::PublishEventsRequest { events })
        .await
        .expect("publish")
        .into_inner()
        .results
        .into_iter()
        .flat_map(|r| r.incidents)
        .filter(|i| i.opened)
        .map(|i| i.number)
        .collect()
}

/// Runs `program` (the `occ` binary: `env!("CARGO_BIN_EXE_occ-under-test")` in a test) with
/// `args` against the test's database: (success, stdout, stderr).
pub async fn occ_command(program: &str, pool: &PgPool, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .args(["--database-url", &database_url(pool)])
        .env("OCC_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("occ runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A request carrying an API key, as every client of a secure OCC sends it.
pub fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII"),
    );
    request
}

/// The next message of a server stream, within 10 s.
pub async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on without an error")
        .expect("the stream is not over")
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Mosquitto of the machine's installation, configured as `deploy/mosquitto.conf` says,
/// listening on its own port. Stopped when dropped.
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    child: Child,
    config: std::path::PathBuf,
    /// The snapshot's folder, if the broker persists.
    data: Option<PathBuf>,
}

impl Broker {
    pub async fn start() -> anyhow::Result<Broker> {
        Self::start_with(|_| String::new()).await
    }

    /// Like [`Broker::start`], with more settings: `extra` gets the port and returns lines.
    pub async fn start_with(extra: impl Fn(u16) -> String) -> anyhow::Result<Broker> {
        Self::start_config(|port| occ::bench::mosquitto_config(port, &extra(port), "stderr")).await
    }

    /// A broker with the whole configuration `config` makes for the port it gets.
    pub async fn start_config(config: impl Fn(u16) -> String) -> anyhow::Result<Broker> {
        let mut attempt = 1;
        loop {
            let port = free_port();
            let path = std::env::temp_dir().join(format!("occ-test-mosquitto-{port}.conf"));
            std::fs::write(&path, config(port))?;
            let child = Self::spawn(&path)?;
            let mut broker = Broker {
                port,
                child,
                config: path,
                data: None,
            };
            match broker.listening().await {
                Ok(()) => return Ok(broker),
                // Another broker took the port first: another port.
                Err(e) if attempt < 5 => {
                    eprintln!("mosquitto did not start ({e}); another port");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(config: &Path) -> anyhow::Result<Child> {
        let binary = occ::bench::mosquitto_program(None);
        Command::new(&binary)
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install the mosquitto package)",
                    binary.display()
                )
            })
    }

    /// A broker that keeps its sessions and queued messages in a snapshot, written every
    /// `autosave_interval` seconds and on SIGTERM, in a folder of its own.
    pub async fn start_persistent(autosave_interval: u32) -> anyhow::Result<Broker> {
        let dir =
            std::env::temp_dir().join(format!("occ-broker-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        // Mosquitto started as root drops to its own user before it writes the snapshot.
        let mut open = std::fs::metadata(&dir)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut open, 0o777);
        std::fs::set_permissions(&dir, open)?;
        let mut broker = Self::start_with(|_| {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval {autosave_interval}\n",
                dir.display()
            )
        })
        .await?;
        broker.data = Some(dir);
        Ok(broker)
    }

    /// SIGKILLs the broker and starts it again on the same port. Without persistence (the
    /// tests' default) it comes back without any session.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        self.child = Self::spawn(&self.config)?;
        self.listening().await
    }

    /// Stops the broker with SIGTERM (with persistence, it writes its snapshot) and starts it
    /// again on the same port.
    pub async fn restart_gracefully(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("mosquitto already exited")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await??;
        self.child = Self::spawn(&self.config)?;
        self.listening().await
    }

    /// Waits until this broker listens. A port found free may be taken by another test's
    /// broker before this one binds it: this one then exits at once while the port answers
    /// all the same, and the test would share (and restart) another's broker. So the broker
    /// must still run a moment after its port answers.
    async fn listening(&mut self) -> anyhow::Result<()> {
        occ::bench::await_mosquitto(&mut self.child, self.port).await
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(dir) = &self.data {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Makes PostgreSQL refuse events of the source `poison` (a trigger raising
/// `invalid_parameter_value`), as it would a value no validation foresaw. Tried again when it
/// deadlocks with OCC making its event partitions at start (PostgreSQL then cancels one).
pub async fn refuse_poison(pool: &PgPool) {
    let sql = "CREATE OR REPLACE FUNCTION refuse_source() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.source_id = 'poison' THEN
             RAISE EXCEPTION 'refused' USING ERRCODE = '22023';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_source BEFORE INSERT ON events
           FOR EACH ROW EXECUTE FUNCTION refuse_source();";
    for attempt in 1.. {
        match sqlx::raw_sql(sql).execute(pool).await {
            Ok(_) => return,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("40P01") && attempt < 10 =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("trigger: {e}"),
        }
    }
}

/// A URL for the database behind `pool` (a `#[sqlx::test]` database), on the server of
/// DATABASE_URL.
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set (see .cargo/config.toml)");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    let name = pool
        .connect_options()
        .get_database()
        .expect("test database has a name")
        .to_owned();
    url.set_path(&name);
    url.to_string()
}

/// OCC's flags for a test: its database, the test broker, an ephemeral gRPC port, short
/// batch deadlines.
pub fn serve_args(db_url: &str, broker_port: u16, client_id: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--database-url",
        db_url,
        "--mqtt-port",
        &broker_port.to_string(),
        "--mqtt-client-id",
        client_id,
        "--batch-deadline",
        "20ms",
        "--shutdown-grace",
        "5s",
        // Many OCCs run at once in the tests: metrics only where a test asks for them.
        "--metrics-listen",
        "",
        // Tests of everything but access call as an unrestricted operator; tests/security.rs
        // starts OCC with authentication.
        "--insecure",
        // Many tests flood a few sources on purpose; tests/security.rs tries the limit.
        "--ingest-source-rate",
        "0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

#[derive(Debug, Parser)]
#[command(args_override_self = true)]
struct ServeCli {
    #[command(flatten)]
    args: ServeArgs,
}

/// OCC running in this process.
#[derive(Debug)]
pub struct Occ {
    pub grpc: String,
    shutdown: CancellationToken,
    running: Option<Running>,
}

impl Occ {
    /// Starts OCC with `args` (see [`serve_args`]) and waits until it takes events.
    pub async fn start(args: Vec<String>) -> anyhow::Result<Occ> {
        Self::start_at("127.0.0.1:0", args).await
    }

    /// Starts OCC with its API listening at `bind` and waits until it takes events.
    pub async fn start_at(bind: &str, args: Vec<String>) -> anyhow::Result<Occ> {
        let occ = Self::launch_at(bind, args).await?;
        if let Some(running) = &occ.running {
            tokio::time::timeout(Duration::from_secs(20), running.ready())
                .await
                .context("OCC not ready within 20 s")??;
        }
        Ok(occ)
    }

    /// Starts OCC with `args` without waiting until it takes events.
    pub async fn launch(args: Vec<String>) -> anyhow::Result<Occ> {
        Self::launch_at("127.0.0.1:0", args).await
    }

    /// Starts OCC with its API listening at `bind`, without waiting until it takes events.
    pub async fn launch_at(bind: &str, args: Vec<String>) -> anyhow::Result<Occ> {
        init_logs();
        let cli = ServeCli::try_parse_from(std::iter::once("occ".to_owned()).chain(args))?;
        let listener = TcpListener::bind(bind).await?;
        let shutdown = CancellationToken::new();
        let running = occ::serve::start(cli.args, listener, shutdown.clone()).await?;
        let addr = if running.grpc_addr.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], running.grpc_addr.port()))
        } else {
            running.grpc_addr
        };
        Ok(Occ {
            grpc: format!("http://{addr}"),
            shutdown,
            running: Some(running),
        })
    }

    /// Messages this instance has committed and acknowledged.
    pub fn ingested(&self) -> u64 {
        self.running.as_ref().map_or(0, |r| {
            r.ingest_stats()
                .messages
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// The most messages that waited at once between the broker and the batcher.
    pub fn inbox_peak(&self) -> u64 {
        self.running.as_ref().map_or(0, |r| {
            r.ingest_stats()
                .inbox_peak
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.running.take() {
            Some(r) => r.wait().await,
            None => Ok(()),
        }
    }
}

impl Drop for Occ {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn incidents(grpc: &str) -> IncidentServiceClient<Channel> {
    IncidentServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

/// One incident by id or number.
pub async fn get_incident(grpc: &str, id: &str) -> occ_proto::v1::Incident {
    incidents(grpc)
        .await
        .get_incident(occ_proto::v1::GetIncidentRequest { id: id.to_owned() })
        .await
        .expect("GetIncident")
        .into_inner()
        .incident
        .expect("incident")
}

/// The reference smoke-detector envelope (`tests/fixtures/native/smoke.json`).
pub fn smoke_fixture() -> Vec<u8> {
    std::fs::read(workspace_root().join("tests/fixtures/native/smoke.json")).expect("fixture")
}

pub async fn ingest(grpc: &str) -> IngestServiceClient<Channel> {
    IngestServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

pub async fn rules(grpc: &str) -> RuleServiceClient<Channel> {
    RuleServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

pub async fn sources(grpc: &str) -> SourceServiceClient<Channel> {
    SourceServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

pub async fn zones(grpc: &str) -> ZoneServiceClient<Channel> {
    ZoneServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

pub async fn watchlist(grpc: &str) -> WatchlistServiceClient<Channel> {
    WatchlistServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

pub async fn dead_letters(grpc: &str) -> DeadLetterServiceClient<Channel> {
    DeadLetterServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

/// A fixture from `tests/fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("tests/fixtures").join(path))
        .unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// A fixture from `tests/fixtures/`, as JSON to change before publishing.
pub fn fixture_json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(path)).expect("fixture is JSON")
}

/// The server-wide health status (`""`), if the server answers.
pub async fn health(grpc: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(grpc.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let r = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

/// The `occ` program as a child process, for tests that kill it.
#[derive(Debug)]
pub struct OccProcess {
    pub grpc: String,
    child: Child,
}

impl OccProcess {
    /// Starts `program serve` with `args` on a free gRPC port and waits until it reports
    /// SERVING. `program` is the `occ` binary (`env!("CARGO_BIN_EXE_occ-under-test")` in a test).
    pub async fn start(program: &str, args: &[String]) -> anyhow::Result<OccProcess> {
        Self::start_with_env(program, args, &[]).await
    }

    /// Like [`OccProcess::start`], with more environment variables.
    pub async fn start_with_env(
        program: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<OccProcess> {
        let port = free_port();
        let child = Command::new(program)
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .args(["--grpc-listen", &format!("127.0.0.1:{port}")])
            .env(
                "OCC_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let grpc = format!("http://127.0.0.1:{port}");
        let mut process = OccProcess { grpc, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if health(&process.grpc).await == Some(ServingStatus::Serving) {
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                bail!("occ exited before it was ready: {status}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("occ not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no chance to commit, ack or disconnect.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("occ already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??)
    }
}

/// An MQTT producer: publishes at QoS 1 and can wait until the broker has acknowledged
/// everything it published.
#[derive(Debug)]
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    progress: Arc<Notify>,
    published: usize,
    stop: CancellationToken,
}

impl Publisher {
    pub async fn connect(port: u16) -> Publisher {
        Self::connect_as(port, None).await
    }

    /// A publisher that signs in as `user` with `password`.
    pub async fn connect_as(port: u16, credentials: Option<(&str, &str)>) -> Publisher {
        let id = format!("test-pub-{}", uuid::Uuid::now_v7().simple());
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(4 * 1024 * 1024));
        if let Some((user, password)) = credentials {
            o.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        let acked = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (a, p, s) = (acked.clone(), progress.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    event = eventloop.poll() => match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            a.fetch_add(1, Ordering::SeqCst);
                            p.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                }
            }
        });
        Publisher {
            client,
            acked,
            progress,
            published: 0,
            stop,
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queued");
        self.published += 1;
    }

    /// Publishes at QoS 0, as Frigate and ChirpStack do unless configured: nothing waits for
    /// the broker.
    pub async fn publish_qos0(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await
            .expect("publish queued");
    }

    /// Waits at most `timeout` for the broker to acknowledge every message published so far;
    /// false if it did not.
    pub async fn try_flush(&self, timeout: Duration) -> bool {
        let want = self.published;
        let acked = self.acked.clone();
        let progress = self.progress.clone();
        tokio::time::timeout(timeout, async move {
            loop {
                let notified = progress.notified();
                if acked.load(Ordering::SeqCst) >= want {
                    break;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    /// Waits until the broker has acknowledged every message published so far.
    pub async fn flush(&self) {
        assert!(
            self.try_flush(Duration::from_secs(30)).await,
            "broker acknowledged every publish within 30 s"
        );
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads `GET /metrics` from `addr` with a bare HTTP/1.1 request.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: occ\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}

/// The value of one sample line (`name{labels} value`), if present.
pub fn sample(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// How many events the database holds.
pub async fn event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .expect("count events")
}

/// Event `i` of a stream: every other one is smoke in the same block (one incident), with the
/// producer's id; the rest people on camera (no incident), sent without an id and with the
/// same bytes every time, so each is a new event and only a redelivery is a duplicate.
pub fn stream_event(i: usize) -> (String, Vec<u8>) {
    let payload = if i.is_multiple_of(2) {
        serde_json::json!({"id": format!("s{i}"), "type": "smoke.detected", "zone": "esil_residential_9"})
    } else {
        serde_json::json!({"type": "object.person", "zone": "esil_street_1", "confidence": 0.8})
    };
    (
        format!("occ/v1/events/dev-{}", i % 17),
        payload.to_string().into_bytes(),
    )
}

pub async fn publish_stream(publisher: &mut Publisher, events: std::ops::Range<usize>) {
    for i in events {
        let (topic, payload) = stream_event(i);
        publisher.publish(&topic, payload).await;
    }
}

/// Waits until `n` events are stored, then a moment more, and checks that no more arrive
/// (redeliveries of committed messages must not add any).
pub async fn expect_exactly(pool: &PgPool, n: usize) {
    eventually(Duration::from_secs(60), "all events", || async {
        (event_count(pool).await >= n as i64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(event_count(pool).await, n as i64);
}

/// A TCP proxy in front of PostgreSQL that a test can cut and restore, to take the database
/// away from OCC without stopping the server other tests use.
#[derive(Debug)]
pub struct DbProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl DbProxy {
    pub async fn start(target: (String, u16)) -> anyhow::Result<DbProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (u, g, s) = (up.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = g.lock().expect("proxy lock").clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Ok(DbProxy {
            port,
            up,
            generation,
            stop,
        })
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().expect("proxy lock");
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` pointed at this proxy instead of the server.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).expect("database URL");
        let _ = u.set_host(Some("127.0.0.1"));
        let _ = u.set_port(Some(self.port));
        u.to_string()
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// The host and port of DATABASE_URL's server.
pub fn database_server() -> (String, u16) {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set");
    let url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    (
        url.host_str().unwrap_or("127.0.0.1").to_owned(),
        url.port().unwrap_or(5432),
    )
}
