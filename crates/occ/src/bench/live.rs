//! The live stage: the simulator's messages published at a fixed rate while the consumer
//! runs, and how long each takes from publish to visible in PostgreSQL, for OCC and for the
//! bare consumer on the same broker and server.
//!
//! One message in [`PROBE_EVERY`] is a probe: a gateway envelope from source `bench-probe`
//! with an id that orders them. The publisher notes when it handed each probe to its MQTT
//! client; a watcher on its own connection asks every [`POLL`] which probes are visible (from
//! the oldest not yet seen on, through an index), so both consumers are timed the same way:
//! publish → committed → seen by a reader, to within the poll.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Filter;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::dispatch::Latencies;
use super::{Msg, bare_consume, bare_table, make_session, publish_each};

/// One message in this many is a probe.
pub(super) const PROBE_EVERY: usize = 50;
/// How often the watcher looks for probes.
const POLL: Duration = Duration::from_millis(5);
const PROBE_TOPIC: &str = "occ/v1/events/bench-probe";
const PROBE_PREFIX: &str = "probe-";

/// What one consumer did at one rate.
#[derive(Debug)]
pub(super) struct Live {
    /// The rate the publisher reached (it may fall short of the one asked on a busy machine).
    pub published_per_s: f64,
    pub latency: Latencies,
    /// PostgreSQL's CPU from the first message published to the last probe seen, per message,
    /// but for the watcher's own backend.
    pub pg_cpu_per_message: Duration,
}

/// Publishes `messages` paced and waits for the watcher to see every probe: the rate reached,
/// the probes' latencies, and PostgreSQL's CPU per message meanwhile.
async fn publish_watched(
    port: u16,
    db: &PgConnectOptions,
    table: Table,
    messages: &[Msg],
    probes: usize,
    rate: u32,
) -> anyhow::Result<Live> {
    let sent: Sent = Arc::new(Mutex::new(vec![None; probes]));
    let mut conn = db.connect().await?;
    // The watcher's polling is the bench's, not the consumer's: its backend's CPU is left out.
    let watcher_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let watcher_pid = u32::try_from(watcher_pid)?;
    let watcher = tokio::spawn(watch(conn, table, sent.clone(), probes, PATIENCE));
    let pg_before = super::cpu_of_processes("postgres");
    let watcher_before = super::cpu_of_pid(watcher_pid);
    let published_per_s = publish_paced(port, messages, rate, sent).await?;
    let (samples, conn) = watcher.await.context("watcher")??;
    let pg_cpu = super::cpu_of_processes("postgres")
        .saturating_sub(pg_before)
        .saturating_sub(super::cpu_of_pid(watcher_pid).saturating_sub(watcher_before));
    conn.close().await?;
    Ok(Live {
        published_per_s,
        latency: Latencies::of(samples),
        pg_cpu_per_message: pg_cpu / u32::try_from(messages.len().max(1)).unwrap_or(u32::MAX),
    })
}

/// `messages` with every [`PROBE_EVERY`]th replaced by a probe; and how many probes.
pub(super) fn with_probes(mut messages: Vec<Msg>) -> (Vec<Msg>, usize) {
    let mut probes = 0;
    for (i, m) in messages.iter_mut().enumerate() {
        if i % PROBE_EVERY == PROBE_EVERY - 1 {
            *m = Msg {
                topic: PROBE_TOPIC.into(),
                payload: serde_json::json!({
                    "id": probe_key(probes),
                    "type": "object.person",
                    "confidence": 0.9,
                    "zone": "bench",
                })
                .to_string()
                .into_bytes(),
            };
            probes += 1;
        }
    }
    (messages, probes)
}

/// Probe `i`'s id: ids sort as their numbers do.
fn probe_key(i: usize) -> String {
    format!("{PROBE_PREFIX}{i:09}")
}

/// A probe's id, for the bare consumer: none for any other message.
pub(super) fn probe_id<'a>(topic: &[u8], payload: &'a [u8]) -> Option<&'a str> {
    if topic != PROBE_TOPIC.as_bytes() {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let start = text.find(PROBE_PREFIX)?;
    let len = PROBE_PREFIX.len() + 9;
    text.get(start..start + len)
}

/// When each probe was handed to the publisher's client.
type Sent = Arc<Mutex<Vec<Option<Instant>>>>;

/// Publishes `messages` at `rate` a second at QoS 1, noting when each probe was sent; returns
/// the rate reached, once the broker has acknowledged everything.
async fn publish_paced(port: u16, messages: &[Msg], rate: u32, sent: Sent) -> anyhow::Result<f64> {
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut probe = 0;
    let took = publish_each(port, messages, async |i, m: &Msg| {
        let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        if m.topic == PROBE_TOPIC {
            sent.lock().unwrap_or_else(PoisonError::into_inner)[probe] = Some(Instant::now());
            probe += 1;
        }
    })
    .await?;
    Ok(messages.len() as f64 / took.as_secs_f64().max(1e-9))
}

/// Where a consumer's probes become visible.
#[derive(Debug, Clone, Copy)]
enum Table {
    /// OCC's events: the probe's id is its external id, its key `id:<id>`.
    Events,
    /// The bare consumer's messages.
    Messages,
}

/// Polls until every probe is visible, or `patience` after the last was sent; returns each
/// probe's time from sent to seen, and the connection.
async fn watch(
    mut conn: PgConnection,
    table: Table,
    sent: Sent,
    probes: usize,
    patience: Duration,
) -> anyhow::Result<(Vec<Duration>, PgConnection)> {
    let mut seen: Vec<Option<Duration>> = vec![None; probes];
    let mut oldest = 0;
    let mut last_sent_at: Option<Instant> = None;
    while oldest < probes {
        let from = probe_key(oldest);
        let visible: Vec<String> = match table {
            Table::Events => sqlx::query_scalar(
                "SELECT external_id FROM events WHERE source_id = 'bench-probe' AND idempotency_key >= $1",
            )
            .bind(format!("id:{from}")),
            Table::Messages => {
                sqlx::query_scalar("SELECT probe FROM messages WHERE probe >= $1").bind(from)
            }
        }
        .fetch_all(&mut conn)
        .await?;
        let now = Instant::now();
        {
            let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
            for key in visible {
                let Some(i) = key
                    .strip_prefix(PROBE_PREFIX)
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                if let (Some(slot @ None), Some(Some(at))) = (seen.get_mut(i), sent.get(i)) {
                    *slot = Some(now.saturating_duration_since(*at));
                }
            }
            if let Some(Some(at)) = sent.last() {
                last_sent_at = Some(*at);
            }
        }
        while oldest < probes && seen[oldest].is_some() {
            oldest += 1;
        }
        if let Some(at) = last_sent_at {
            ensure!(
                at.elapsed() < patience,
                "{} of {probes} probes still not visible {patience:?} after the last was sent",
                probes - oldest
            );
        }
        tokio::time::sleep(POLL).await;
    }
    Ok((seen.into_iter().flatten().collect(), conn))
}

/// How long a consumer may take to show the last probe after it was sent.
const PATIENCE: Duration = Duration::from_secs(60);

/// OCC at `rate`: started on a fresh database, then the messages published live.
pub(super) async fn occ(
    port: u16,
    db: &PgConnectOptions,
    messages: &[Msg],
    probes: usize,
    expected: usize,
    rate: u32,
) -> anyhow::Result<Live> {
    let client_id = format!("occ-bench-live-{rate}-{}", std::process::id());
    let (mut child, grpc) = super::start_occ(port, db, &client_id).await?;
    super::wait_serving(&grpc, &mut child).await?;
    let live = publish_watched(port, db, Table::Events, messages, probes, rate).await?;
    // Everything else the messages hold, exactly once.
    let mut conn = db.connect().await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut conn)
            .await?;
        if stored as usize >= expected {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(&mut conn)
                .await?;
            ensure!(
                stored as usize == expected,
                "OCC stored {stored} events live, expected {expected}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "OCC stored {stored} of {expected} events live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conn.close().await?;
    super::terminate(&mut child).await?;
    Ok(live)
}

/// The bare consumer at `rate`, its session made and its consumer running before the first
/// message is published.
pub(super) async fn bare(
    port: u16,
    db: &PgConnectOptions,
    messages: &[Msg],
    probes: usize,
    rate: u32,
) -> anyhow::Result<Live> {
    let mut conn = db.connect().await?;
    bare_table(&mut conn).await?;
    let client_id = format!("occ-bench-live-bare-{rate}-{}", std::process::id());
    make_session(&client_id, port, vec![Filter::new("#", QoS::AtLeastOnce)]).await?;
    let consumer = tokio::spawn(bare_consume(port, client_id, conn, messages.len()));
    let live = publish_watched(port, db, Table::Messages, messages, probes, rate).await?;
    let (_, conn) = consumer.await.context("bare consumer")??;
    conn.close().await?;
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_found_by_their_id_and_sort_as_numbers() {
        let messages = (0..120)
            .map(|i| Msg {
                topic: format!("occ/v1/events/dev-{i}"),
                payload: b"{}".to_vec(),
            })
            .collect();
        let (messages, probes) = with_probes(messages);
        assert_eq!(probes, 2);
        let found: Vec<&str> = messages
            .iter()
            .filter_map(|m| probe_id(m.topic.as_bytes(), &m.payload))
            .collect();
        assert_eq!(found, ["probe-000000000", "probe-000000001"]);
        assert!(probe_key(9) < probe_key(10));
    }
}
