//! OCC's configuration: flags, each with an `OCC_*` environment variable, and defaults that
//! reach PostgreSQL and Mosquitto on localhost. Flags win over the environment, which wins
//! over defaults. `occ config print` shows the result with secrets masked.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use serde::{Serialize, Serializer};

/// A duration written as `250ms`, `30s`, `5m`, `2h` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} needs a unit: ms, s, m, h or d"))?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 30s"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        Ok(Span(d))
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => f.write_str("0s"),
            ms if ms % 86_400_000 == 0 => write!(f, "{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            ms if ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn masked<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

/// A database URL with its password replaced (in the user part and in a `password` query
/// parameter), for printing and logs.
pub fn mask_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "<unparseable URL>".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("********"));
    }
    if u.query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "********".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

fn masked_url<S: Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_url(value))
}

/// How events are kept: time partitions, retention, the window of redelivery keys.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StorageArgs {
    /// How much time one event partition holds: `monthly` or `daily`.
    #[arg(
        long = "event-partition-period",
        env = "OCC_EVENT_PARTITION_PERIOD",
        default_value = "monthly"
    )]
    pub partition_period: String,

    /// Partitions made ahead of the current one.
    #[arg(
        long = "event-partitions-ahead",
        env = "OCC_EVENT_PARTITIONS_AHEAD",
        default_value_t = 2
    )]
    pub partitions_ahead: u32,

    /// How long events are kept, by event type: `motion.*=30d,lpr.*=2y,default=1y` (the first
    /// matching pattern wins; `forever` keeps). Events incidents or watch-list hits link to,
    /// and those under a legal hold, are kept regardless.
    #[arg(
        long = "event-retention",
        env = "OCC_EVENT_RETENTION",
        default_value = "default=1y"
    )]
    pub retention: String,

    /// How long the key of a stored event is remembered to recognise its redeliveries (and an
    /// evolving event's revisions): at least the broker's session expiry.
    #[arg(
        long = "event-key-window",
        env = "OCC_EVENT_KEY_WINDOW",
        default_value = "7d"
    )]
    pub key_window: Span,

    /// How often partitions are made ahead, retention applied and old keys forgotten.
    #[arg(
        long = "event-maintenance-interval",
        env = "OCC_EVENT_MAINTENANCE_INTERVAL",
        default_value = "1h"
    )]
    pub maintenance_interval: Span,

    /// The city's time zone (an IANA name such as `Asia/Almaty`): the hours and days the
    /// wall's counts are kept in. The same on every instance.
    #[arg(long = "time-zone", env = "OCC_TIME_ZONE", default_value = "UTC")]
    pub time_zone: String,

    /// How often the wall's counts take in what committed since (a read always includes it).
    #[arg(
        long = "count-compaction-interval",
        env = "OCC_COUNT_COMPACTION_INTERVAL",
        default_value = "10s"
    )]
    pub count_compaction_interval: Span,

    /// How long the wall's hourly counts are kept; its daily counts are kept for good.
    #[arg(
        long = "hourly-count-retention",
        env = "OCC_HOURLY_COUNT_RETENTION",
        default_value = "90d"
    )]
    pub hourly_count_retention: Span,
}

impl StorageArgs {
    pub fn partitioning(&self) -> anyhow::Result<occ_store::partitions::Partitioning> {
        let period = self
            .partition_period
            .parse()
            .map_err(|e| anyhow::anyhow!("--event-partition-period {e}"))?;
        let retention = self
            .retention
            .parse()
            .map_err(|e| anyhow::anyhow!("--event-retention {e}"))?;
        let key_window = chrono::TimeDelta::from_std(self.key_window.0)
            .map_err(|e| anyhow::anyhow!("--event-key-window: {e}"))?;
        let hourly_counts_kept = chrono::TimeDelta::from_std(self.hourly_count_retention.0)
            .map_err(|e| anyhow::anyhow!("--hourly-count-retention: {e}"))?;
        Ok(occ_store::partitions::Partitioning {
            period,
            ahead: self.partitions_ahead,
            retention,
            key_window,
            hourly_counts_kept,
        })
    }
}

/// PostgreSQL.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DatabaseArgs {
    /// PostgreSQL URL. `occ migrate` (and `occ serve`) create the database if it is missing.
    #[arg(
        long = "database-url",
        env = "OCC_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/occ",
        hide_env_values = true
    )]
    #[serde(serialize_with = "masked_url")]
    pub url: String,

    /// Most connections for the gRPC API and background work.
    #[arg(
        long = "database-max-connections",
        env = "OCC_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,

    /// Connections each MQTT ingest slot the instance holds has of its own (a batch in
    /// flight takes one), so a burst of API calls, or another slot, cannot starve it.
    #[arg(
        long = "database-ingest-connections",
        env = "OCC_DATABASE_INGEST_CONNECTIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub ingest_connections: u32,

    /// How long one ingest commit may take before it is abandoned and retried.
    #[arg(
        long = "database-commit-timeout",
        env = "OCC_DATABASE_COMMIT_TIMEOUT",
        default_value = "30s"
    )]
    pub commit_timeout: Span,

    /// How long a request waits for a free connection before failing (UNAVAILABLE).
    #[arg(
        long = "database-acquire-timeout",
        env = "OCC_DATABASE_ACQUIRE_TIMEOUT",
        default_value = "5s"
    )]
    pub acquire_timeout: Span,

    /// The longest a statement may run before PostgreSQL cancels it (0: no bound). Ingest's
    /// batches are bounded by `--database-commit-timeout` as well.
    #[arg(
        long = "database-statement-timeout",
        env = "OCC_DATABASE_STATEMENT_TIMEOUT",
        default_value = "30s"
    )]
    pub statement_timeout: Span,

    /// The longest an API call's statement waits for a row lock before it fails (0: no bound).
    /// Ingest waits as long as its statements may run: it retries, it never fails a batch
    /// for waiting.
    #[arg(
        long = "database-lock-timeout",
        env = "OCC_DATABASE_LOCK_TIMEOUT",
        default_value = "10s"
    )]
    pub lock_timeout: Span,
}

/// The MQTT broker.
#[derive(Debug, Clone, Args, Serialize)]
pub struct BrokerArgs {
    #[arg(long = "mqtt-host", env = "OCC_MQTT_HOST", default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long = "mqtt-port", env = "OCC_MQTT_PORT", default_value_t = 1883)]
    pub port: u16,

    #[arg(long = "mqtt-username", env = "OCC_MQTT_USERNAME")]
    pub username: Option<String>,

    #[arg(
        long = "mqtt-password",
        env = "OCC_MQTT_PASSWORD",
        hide_env_values = true
    )]
    #[serde(serialize_with = "masked")]
    pub password: Option<String>,

    /// Connect to the broker over TLS (its TLS listener, usually port 8883).
    #[arg(long = "mqtt-tls", env = "OCC_MQTT_TLS")]
    pub mqtt_tls: bool,

    /// CAs (PEM) that sign the broker's certificate; the system's roots when not given.
    #[arg(long = "mqtt-tls-ca", env = "OCC_MQTT_TLS_CA", requires = "mqtt_tls")]
    pub mqtt_tls_ca: Option<std::path::PathBuf>,

    /// A client certificate (PEM) for a broker that identifies OCC by one.
    #[arg(
        long = "mqtt-tls-cert",
        env = "OCC_MQTT_TLS_CERT",
        requires = "mqtt_tls",
        requires = "mqtt_tls_key"
    )]
    pub mqtt_tls_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(
        long = "mqtt-tls-key",
        env = "OCC_MQTT_TLS_KEY",
        requires = "mqtt_tls_cert"
    )]
    pub mqtt_tls_key: Option<std::path::PathBuf>,
}

impl BrokerArgs {
    /// The broker connection's TLS settings, if TLS is asked for.
    pub fn tls(&self) -> anyhow::Result<Option<occ_ingest::MqttTls>> {
        if !self.mqtt_tls {
            return Ok(None);
        }
        let client = self
            .mqtt_tls_cert
            .as_deref()
            .zip(self.mqtt_tls_key.as_deref());
        occ_ingest::MqttTls::new(self.mqtt_tls_ca.as_deref(), client)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the broker's TLS settings: {e}"))
    }
}

/// MQTT ingest.
#[derive(Debug, Clone, Args, Serialize)]
pub struct IngestArgs {
    /// The MQTT client id: the same for every instance of one OCC and stable across restarts
    /// and redeployments (never a hostname), since the broker keeps the sessions, and the
    /// messages queued while OCC is away, under it and its slots' ids.
    #[arg(
        long = "mqtt-client-id",
        env = "OCC_MQTT_CLIENT_ID",
        default_value = "occ"
    )]
    pub client_id: String,

    /// Shared subscription group, for several instances splitting the stream. Empty, the
    /// default: a plain subscription with one slot, and the client id (`occ`) as the group
    /// with more (see the README on several instances).
    #[arg(
        long = "mqtt-share-group",
        env = "OCC_MQTT_SHARE_GROUP",
        default_value = ""
    )]
    pub share_group: String,

    /// How many ingest slots OCC's instances share: client ids `occ`, `occ-2` … `occ-N`, each
    /// held by one live instance at a time and taken over when it stops or dies. One (the
    /// default) reads everything under `occ`, whatever the number of instances; more split
    /// the stream through a shared subscription. Every instance of one OCC must be given the
    /// same number.
    #[arg(
        long = "mqtt-slots",
        env = "OCC_MQTT_SLOTS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub slots: u16,

    /// How long an ingest slot stays with an instance that stopped renewing its lease (one
    /// that died): its slots are taken over this long after, at most.
    #[arg(
        long = "mqtt-slot-lease",
        env = "OCC_MQTT_SLOT_LEASE",
        default_value = "8s"
    )]
    pub slot_lease: Span,

    #[arg(
        long = "mqtt-keep-alive",
        env = "OCC_MQTT_KEEP_ALIVE",
        default_value = "30s"
    )]
    pub keep_alive: Span,

    /// How long the broker keeps OCC's session, queuing messages, while OCC is down.
    #[arg(
        long = "mqtt-session-expiry",
        env = "OCC_MQTT_SESSION_EXPIRY",
        default_value = "1d"
    )]
    pub session_expiry: Span,

    /// Most unacknowledged messages the broker may send at once (MQTT 5 receive maximum).
    #[arg(
        long = "mqtt-receive-maximum",
        env = "OCC_MQTT_RECEIVE_MAXIMUM",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub receive_maximum: u16,

    /// Largest MQTT packet OCC accepts (announced to the broker).
    #[arg(
        long = "mqtt-max-packet-size",
        env = "OCC_MQTT_MAX_PACKET_SIZE",
        default_value_t = 1024 * 1024
    )]
    pub max_packet_size: u32,

    /// Most messages committed in one transaction.
    #[arg(
        long = "batch-size",
        env = "OCC_BATCH_SIZE",
        default_value_t = 500,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub batch_size: u32,

    /// How long the first message of a batch waits for more before the batch commits.
    #[arg(
        long = "batch-deadline",
        env = "OCC_BATCH_DEADLINE",
        default_value = "50ms"
    )]
    pub batch_deadline: Span,

    /// Most batches working at once, each in its own transaction on its own connection (at
    /// most --database-ingest-connections). They still commit, and are acked, in arrival
    /// order; 1 works on one batch at a time.
    #[arg(
        long = "batches-in-flight",
        env = "OCC_BATCHES_IN_FLIGHT",
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub batches_in_flight: u32,

    /// Largest event payload; larger ones are dead-lettered.
    #[arg(
        long = "max-payload-bytes",
        env = "OCC_MAX_PAYLOAD_BYTES",
        default_value_t = 64 * 1024
    )]
    pub max_payload_bytes: usize,

    /// Events a second each source may send on average, per instance, timed by when they
    /// happened (0: no limit); what a flooding source sends beyond it becomes dead letters with
    /// the reason.
    #[arg(
        long = "ingest-source-rate",
        env = "OCC_INGEST_SOURCE_RATE",
        default_value_t = 100.0
    )]
    pub source_rate: f64,

    /// Events a source may send at once above its rate.
    #[arg(
        long = "ingest-source-burst",
        env = "OCC_INGEST_SOURCE_BURST",
        default_value_t = 1000.0
    )]
    pub source_burst: f64,
}

/// Which producer formats OCC reads, and where.
#[derive(Debug, Clone, Args, Serialize)]
pub struct AdapterArgs {
    /// The producer formats to read: native, frigate, chirpstack, senml.
    #[arg(
        long = "adapters",
        env = "OCC_ADAPTERS",
        value_delimiter = ',',
        default_value = "native,frigate,chirpstack,senml",
        value_parser = ["native", "frigate", "chirpstack", "senml"]
    )]
    pub enabled: Vec<String>,

    /// Where OCC's own envelopes arrive; {source_id} is the last level.
    #[arg(
        long = "native-topic",
        env = "OCC_NATIVE_TOPIC",
        default_value = "occ/v1/events/{source_id}"
    )]
    pub native_topic: String,

    /// Where devices and gateways report online/offline (their MQTT last will).
    #[arg(
        long = "native-status-topic",
        env = "OCC_NATIVE_STATUS_TOPIC",
        default_value = "occ/v1/status/{source_id}"
    )]
    pub native_status_topic: String,

    /// A Frigate NVR: its MQTT topic prefix, and where consoles reach its API for snapshots
    /// and clips (PREFIX or PREFIX=BASE_URL). Repeat (or separate with commas) for several.
    #[arg(
        long = "frigate-nvr",
        env = "OCC_FRIGATE_NVR",
        value_delimiter = ',',
        default_value = "frigate"
    )]
    pub frigate_nvrs: Vec<occ_adapters::FrigateConfig>,

    /// ChirpStack's MQTT integration event topic ({dev_eui} and {event} required).
    #[arg(
        long = "chirpstack-topic",
        env = "OCC_CHIRPSTACK_TOPIC",
        default_value = "application/{application_id}/device/{dev_eui}/event/{event}"
    )]
    pub chirpstack_topic: String,

    /// A LoRaWAN device status under this battery charge (percent) is a maintenance event.
    #[arg(
        long = "low-battery-pct",
        env = "OCC_LOW_BATTERY_PCT",
        default_value_t = 20.0
    )]
    pub low_battery_pct: f64,

    /// Where SenML packs arrive; {source_id} names the source.
    #[arg(
        long = "senml-topic",
        env = "OCC_SENML_TOPIC",
        default_value = "occ/v1/senml/{source_id}"
    )]
    pub senml_topic: String,
}

impl AdapterArgs {
    /// The adapters these settings ask for.
    pub fn config(&self) -> occ_adapters::AdaptersConfig {
        let on = |name: &str| self.enabled.iter().any(|e| e == name);
        occ_adapters::AdaptersConfig {
            native: on("native").then(|| occ_adapters::NativeConfig {
                events_topic: self.native_topic.clone(),
                status_topic: self.native_status_topic.clone(),
            }),
            frigate: if on("frigate") {
                self.frigate_nvrs.clone()
            } else {
                Vec::new()
            },
            chirpstack: on("chirpstack").then(|| occ_adapters::ChirpstackConfig {
                topic: self.chirpstack_topic.clone(),
                low_battery_pct: self.low_battery_pct,
            }),
            senml: on("senml").then(|| occ_adapters::SenmlConfig {
                topic: self.senml_topic.clone(),
            }),
        }
    }
}

/// `occ serve`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub ingest: IngestArgs,

    #[command(flatten)]
    pub adapters: AdapterArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Where the gRPC API listens.
    #[arg(
        long = "grpc-listen",
        env = "OCC_GRPC_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_listen: SocketAddr,

    /// Where Prometheus metrics are served (`GET /metrics`); empty serves none.
    #[arg(
        long = "metrics-listen",
        env = "OCC_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: String,

    /// The longest a unary gRPC call may take (DEADLINE_EXCEEDED after it).
    #[arg(
        long = "grpc-request-timeout",
        env = "OCC_GRPC_REQUEST_TIMEOUT",
        default_value = "30s"
    )]
    pub grpc_request_timeout: Span,

    /// Largest gRPC request message; larger ones get RESOURCE_EXHAUSTED.
    #[arg(
        long = "grpc-max-message-bytes",
        env = "OCC_GRPC_MAX_MESSAGE_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub grpc_max_message_bytes: usize,

    /// Most API connections open at once on this instance; past it new ones are closed as
    /// they arrive (counted in `occ_grpc_connections_refused_total`), so clients try another
    /// instance instead of waiting.
    #[arg(
        long = "grpc-max-connections",
        env = "OCC_GRPC_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub grpc_max_connections: u32,

    /// How often rules and the registry (sources, zones, watch lists) are reloaded even
    /// without a change notification.
    #[arg(
        long = "rules-refresh",
        env = "OCC_RULES_REFRESH",
        default_value = "30s"
    )]
    pub rules_refresh: Span,

    /// How often what ingest heard from sources is written, and silent sources are looked for.
    #[arg(
        long = "health-interval",
        env = "OCC_HEALTH_INTERVAL",
        default_value = "1s"
    )]
    pub health_interval: Span,

    /// How often claim leases and claim deadlines are checked (expiry, escalation).
    #[arg(
        long = "sweep-interval",
        env = "OCC_SWEEP_INTERVAL",
        default_value = "1s"
    )]
    pub sweep_interval: Span,

    /// Who CAP alerts (`GetIncidentCap`) say sent them: an id without spaces or commas.
    #[arg(
        long = "cap-sender",
        env = "OCC_CAP_SENDER",
        default_value = "occ@city.example"
    )]
    pub cap_sender: String,

    /// The sender's name in CAP alerts.
    #[arg(
        long = "cap-sender-name",
        env = "OCC_CAP_SENDER_NAME",
        default_value = "Operational control center"
    )]
    pub cap_sender_name: String,

    /// The UTC offset CAP alerts write times in (the city's), e.g. `+05:00`.
    #[arg(
        long = "cap-utc-offset",
        env = "OCC_CAP_UTC_OFFSET",
        default_value = "+00:00"
    )]
    pub cap_utc_offset: String,

    /// Incident categories announced as CAP alerts on the broker, for the public-warning
    /// system (comma-separated, OCC's category names: `fire,gas_leak,flood`); empty publishes
    /// none. One instance of the cluster publishes at a time.
    #[arg(
        long = "cap-publish",
        env = "OCC_CAP_PUBLISH",
        value_delimiter = ',',
        default_value = ""
    )]
    pub cap_publish: Vec<String>,

    /// Where CAP alerts are published: `<topic>/<category>`, QoS 1, not retained.
    #[arg(long = "cap-topic", env = "OCC_CAP_TOPIC", default_value = "occ/cap")]
    pub cap_topic: String,

    /// The agencies whose incidents' reads are recorded (who read which incident, when):
    /// comma-separated; empty records none.
    #[arg(
        long = "record-reads-of",
        env = "OCC_RECORD_READS_OF",
        default_value = "police",
        value_delimiter = ','
    )]
    pub record_reads_of: Vec<String>,

    /// Which kinds of stored event each agency's investigators and supervisors may search
    /// (EventService): `agency:event-type-pattern` pairs, comma-separated
    /// (`police:*,fire:smoke.*,fire:gas.*`). An agency not named searches nothing; a caller
    /// scoped to every agency searches every kind.
    #[arg(
        long = "search-grants",
        env = "OCC_SEARCH_GRANTS",
        default_value = "police:*"
    )]
    pub search_grants: String,

    /// How often the audit log's chains are anchored (each anchor's hash is logged).
    #[arg(
        long = "audit-anchor-interval",
        env = "OCC_AUDIT_ANCHOR_INTERVAL",
        default_value = "5m"
    )]
    pub audit_anchor_interval: Span,

    /// How long shutdown waits for the batch in hand and calls in flight.
    #[arg(
        long = "shutdown-grace",
        env = "OCC_SHUTDOWN_GRACE",
        default_value = "10s"
    )]
    pub shutdown_grace: Span,

    /// Apply migrations at start-up (creating the database if needed).
    #[arg(
        long = "migrate",
        env = "OCC_MIGRATE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub migrate: bool,

    /// Also run the simulator in this process, publishing to the same broker: a city's
    /// cameras and sensors, so incidents appear.
    #[arg(long = "simulate", env = "OCC_SIMULATE")]
    pub simulate: bool,

    #[command(flatten)]
    #[serde(rename = "simulator")]
    pub simulator: SimulatorArgs,
}

/// Who may call the API.
#[derive(Debug, Clone, Args, Serialize)]
pub struct AuthArgs {
    /// Serve without authentication: every caller may do everything, and names its operator
    /// in `x-occ-operator` if it likes. For tests and closed demos only; OCC says so loudly.
    #[arg(long = "insecure", env = "OCC_INSECURE")]
    pub insecure: bool,

    /// Where OCC writes the admin key it makes when no admin key exists. Without this flag, it
    /// makes one only when it listens on loopback, in `$XDG_CONFIG_HOME/occ/admin-key` or
    /// `~/.config/occ/admin-key`; with it, on any address (a deployment that asked for it).
    #[arg(long = "admin-key-file", env = "OCC_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<std::path::PathBuf>,

    /// Who may use server reflection (grpcurl, buf curl): public, authenticated or off.
    #[arg(
        long = "grpc-reflection",
        env = "OCC_GRPC_REFLECTION",
        default_value = "authenticated",
        value_parser = ["public", "authenticated", "off"]
    )]
    pub reflection: String,

    /// How long an instance trusts what it read about a key: a revoked or expired key is
    /// refused by every instance within this time.
    #[arg(long = "auth-cache", env = "OCC_AUTH_CACHE", default_value = "2s")]
    pub cache: Span,

    /// The API's TLS certificate chain (PEM, leaf first); with `--grpc-tls-key`, the API
    /// serves TLS only. Both files are reloaded when they change.
    #[arg(
        long = "grpc-tls-cert",
        env = "OCC_GRPC_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The API's TLS private key (PEM).
    #[arg(long = "grpc-tls-key", env = "OCC_GRPC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// CAs (PEM) whose client certificates identify callers: a key made with
    /// `--certificate-subject` gives a certificate with that subject its rights.
    #[arg(
        long = "grpc-tls-client-ca",
        env = "OCC_GRPC_TLS_CLIENT_CA",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Calls a second each principal may make on average (0: no limit); above it, calls get
    /// RESOURCE_EXHAUSTED with the time to wait.
    #[arg(
        long = "grpc-rate-limit",
        env = "OCC_GRPC_RATE_LIMIT",
        default_value_t = 100.0
    )]
    pub rate_limit: f64,

    /// Calls a principal may make at once above its rate.
    #[arg(
        long = "grpc-rate-burst",
        env = "OCC_GRPC_RATE_BURST",
        default_value_t = 200.0
    )]
    pub rate_burst: f64,

    /// Watch streams a principal may hold open at once.
    #[arg(
        long = "grpc-max-streams-per-principal",
        env = "OCC_GRPC_MAX_STREAMS_PER_PRINCIPAL",
        default_value_t = 16
    )]
    pub max_streams: usize,

    /// The identity provider whose tokens (JWTs) are accepted: its issuer (`iss`), e.g.
    /// `https://sso.city.example/realms/occ`. Needs `--jwt-audience` and `--jwt-jwks`.
    #[arg(
        long = "jwt-issuer",
        env = "OCC_JWT_ISSUER",
        requires = "jwt_audience",
        requires = "jwt_jwks"
    )]
    pub jwt_issuer: Option<String>,

    /// The audience (`aud`) tokens must be for.
    #[arg(
        long = "jwt-audience",
        env = "OCC_JWT_AUDIENCE",
        requires = "jwt_issuer"
    )]
    pub jwt_audience: Option<String>,

    /// The identity provider's signing keys: a JWKS URL
    /// (`…/protocol/openid-connect/certs`) or file.
    #[arg(long = "jwt-jwks", env = "OCC_JWT_JWKS", requires = "jwt_issuer")]
    pub jwt_jwks: Option<String>,

    /// How often the JWKS is read again (also soon after a token names an unknown key).
    #[arg(
        long = "jwt-jwks-refresh",
        env = "OCC_JWT_JWKS_REFRESH",
        default_value = "10m"
    )]
    pub jwt_jwks_refresh: Span,

    /// The claims that name the caller, and hold its roles, queues and agencies (dotted paths).
    #[arg(
        long = "jwt-subject-claim",
        env = "OCC_JWT_SUBJECT_CLAIM",
        default_value = "preferred_username"
    )]
    pub jwt_subject_claim: String,

    #[arg(
        long = "jwt-roles-claim",
        env = "OCC_JWT_ROLES_CLAIM",
        default_value = "realm_access.roles"
    )]
    pub jwt_roles_claim: String,

    #[arg(
        long = "jwt-queues-claim",
        env = "OCC_JWT_QUEUES_CLAIM",
        default_value = "occ_queues"
    )]
    pub jwt_queues_claim: String,

    #[arg(
        long = "jwt-agencies-claim",
        env = "OCC_JWT_AGENCIES_CLAIM",
        default_value = "occ_agencies"
    )]
    pub jwt_agencies_claim: String,

    /// Refuse connections without a client certificate (otherwise callers without one use
    /// keys).
    #[arg(
        long = "grpc-tls-client-cert-required",
        env = "OCC_GRPC_TLS_CLIENT_CERT_REQUIRED",
        requires = "tls_client_ca"
    )]
    pub tls_client_cert_required: bool,
}

impl ServeArgs {
    /// What CAP alerts say about their sender.
    pub fn cap(&self) -> anyhow::Result<occ_domain::cap::CapSender> {
        anyhow::ensure!(
            !self.cap_sender.is_empty()
                && !self
                    .cap_sender
                    .contains(|c: char| c.is_whitespace() || matches!(c, ',' | '<' | '&')),
            "--cap-sender {:?}: no spaces, commas, '<' or '&'",
            self.cap_sender
        );
        let offset: chrono::FixedOffset = format!("2000-01-01T00:00:00{}", self.cap_utc_offset)
            .parse::<chrono::DateTime<chrono::FixedOffset>>()
            .map(|t| *t.offset())
            .map_err(|_| {
                anyhow::anyhow!(
                    "--cap-utc-offset {:?} is not like +05:00",
                    self.cap_utc_offset
                )
            })?;
        Ok(occ_domain::cap::CapSender {
            sender: self.cap_sender.clone(),
            sender_name: self.cap_sender_name.clone(),
            offset,
            radius_km: 0.1,
        })
    }
}

impl AuthArgs {
    pub fn jwt(&self) -> Option<occ_api::jwt::JwtConfig> {
        Some(occ_api::jwt::JwtConfig {
            issuer: self.jwt_issuer.clone()?,
            audience: self.jwt_audience.clone()?,
            jwks: occ_api::jwt::JwksSource::parse(self.jwt_jwks.as_deref()?),
            refresh: self.jwt_jwks_refresh.0,
            leeway: 30,
            subject_claim: self.jwt_subject_claim.clone(),
            roles_claim: self.jwt_roles_claim.clone(),
            queues_claim: self.jwt_queues_claim.clone(),
            agencies_claim: self.jwt_agencies_claim.clone(),
        })
    }

    pub fn tls(&self) -> Option<occ_api::tls::TlsConfig> {
        Some(occ_api::tls::TlsConfig {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            client_cert_required: self.tls_client_cert_required,
        })
    }

    pub fn reflection(&self) -> occ_api::Reflection {
        match self.reflection.as_str() {
            "public" => occ_api::Reflection::Public,
            "off" => occ_api::Reflection::Off,
            _ => occ_api::Reflection::Authenticated,
        }
    }
}

/// The simulator.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SimulatorArgs {
    /// Events per second across the city.
    #[arg(long = "sim-rate", env = "OCC_SIM_RATE", default_value_t = 20.0)]
    pub rate: f64,

    /// On average, how many situations the default rules catch (fires, panic buttons,
    /// floods...) start per minute.
    #[arg(
        long = "sim-situations-per-minute",
        env = "OCC_SIM_SITUATIONS_PER_MINUTE",
        default_value_t = 4.0
    )]
    pub situations_per_minute: f64,

    /// The share of messages that are malformed on purpose (they go to dead letters).
    #[arg(
        long = "sim-malformed-ratio",
        env = "OCC_SIM_MALFORMED_RATIO",
        default_value_t = 0.002
    )]
    pub malformed_ratio: f64,

    /// Stop after this many events (default: run until stopped).
    #[arg(long = "sim-count", env = "OCC_SIM_COUNT")]
    pub count: Option<u64>,

    /// Random seed, for a reproducible stream.
    #[arg(long = "sim-seed", env = "OCC_SIM_SEED")]
    pub seed: Option<u64>,

    /// Also simulate the dispatch room: units of every agency, and an operator per queue who
    /// claims, dispatches, resolves and closes incidents through the gRPC API.
    #[arg(
        long = "sim-operators",
        env = "OCC_SIM_OPERATORS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub operators: bool,

    /// The OCC API the simulated operators use (`occ serve --simulate` uses its own).
    #[arg(
        long = "sim-grpc",
        env = "OCC_SIM_GRPC",
        default_value = "http://127.0.0.1:50051"
    )]
    pub grpc: String,

    /// The key the simulator registers the city and makes its consoles' keys with (an admin
    /// and supervisor key; `occ serve --simulate` makes its own). None without authentication.
    #[arg(long = "sim-api-key", env = "OCC_SIM_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "masked")]
    pub api_key: Option<String>,

    /// A file to read that key from (OCC's admin key file, waited for while it does not exist
    /// yet), when `--sim-api-key` is not given.
    #[arg(long = "sim-api-key-file", env = "OCC_SIM_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
}

/// Logs.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LogArgs {
    /// Log filter, in `RUST_LOG` syntax.
    #[arg(long = "log", env = "OCC_LOG", default_value = "info", global = true)]
    pub filter: String,

    /// `text` for people, `json` for log shippers.
    #[arg(long = "log-format", env = "OCC_LOG_FORMAT", default_value = "text", global = true, value_parser = ["text", "json"])]
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_print() {
        for (text, d) in [
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
        ] {
            let span: Span = text.parse().expect("valid span");
            assert_eq!(span.0, d);
            assert_eq!(span.to_string(), text);
        }
        assert!("30".parse::<Span>().is_err());
        assert!("5 minutes".parse::<Span>().is_err());
        assert!("xs".parse::<Span>().is_err());
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://occ:secret@db:5432/occ"),
            "postgres://occ:********@db:5432/occ"
        );
        assert_eq!(
            mask_url("postgres://postgres@127.0.0.1:5432/occ"),
            "postgres://postgres@127.0.0.1:5432/occ"
        );
        let masked = mask_url("postgres://db/occ?user=occ&password=s3cret&sslmode=require");
        assert!(!masked.contains("s3cret"), "{masked}");
        assert!(masked.contains("sslmode=require"), "{masked}");
    }
}
