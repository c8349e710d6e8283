//! Prometheus metrics on their own port (`--metrics-listen`): `GET /metrics`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Starts serving the metrics on `listen` (empty: not at all). One exporter per process:
/// a second OCC in the same process (tests) shares the first one's.
pub fn serve(listen: &str) -> anyhow::Result<()> {
    static SERVED: OnceLock<SocketAddr> = OnceLock::new();
    if listen.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--metrics-listen: not an address: {listen:?}"))?;
    if let Some(first) = SERVED.get() {
        tracing::info!(%first, "metrics already served by this process");
        return Ok(());
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("occ_ingest_batch_messages".into()),
            &[
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
            ],
        )?
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    let _ = SERVED.set(addr);
    describe();
    tracing::info!(%addr, "metrics at /metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "occ_ingest_messages_total",
        "MQTT messages committed (as events or dead letters), by adapter"
    );
    describe_counter!(
        "occ_ingest_dead_letters_total",
        "MQTT messages stored as dead letters, by adapter"
    );
    describe_counter!(
        "occ_ingest_events_total",
        "events of committed messages: stored (new or a newer revision) or duplicate"
    );
    describe_counter!(
        "occ_incidents_opened_total",
        "incidents opened by the rules, by queue and priority"
    );
    describe_histogram!("occ_ingest_batch_messages", "messages per committed batch");
    describe_histogram!(
        "occ_ingest_commit_seconds",
        "decode and commit time of a batch"
    );
    describe_histogram!(
        "occ_ingest_lag_seconds",
        "from receipt of a batch's oldest message to its commit"
    );
    describe_gauge!(
        "occ_ingest_inbox_messages",
        "messages waiting between the MQTT connection and the batcher"
    );
    describe_gauge!(
        "occ_ingest_acks_waiting",
        "acks of committed messages not yet handed to the MQTT connection"
    );
    describe_gauge!("occ_ingest_subscribed", "1 while subscribed to the broker");
    describe_counter!("occ_mqtt_connection_losses_total", "lost MQTT connections");
    describe_counter!(
        "occ_grpc_requests_total",
        "gRPC requests by method and status code"
    );
    describe_histogram!("occ_grpc_request_seconds", "gRPC request time by method");
    describe_gauge!(
        "occ_queue_waiting",
        "incidents waiting to be claimed, by queue and priority (the whole city's)"
    );
    describe_gauge!(
        "occ_queue_oldest_wait_seconds",
        "how long the oldest waiting incident of a queue has waited"
    );
    describe_gauge!("occ_queue_claimed", "incidents claimed, by queue");
    describe_counter!(
        "occ_claims_total",
        "ClaimNext calls by queue and outcome (claimed or empty)"
    );
    describe_gauge!(
        "occ_db_connections",
        "PostgreSQL connections of the pool, by state (idle, in_use)"
    );
}

/// Keeps the pool and queue gauges current. Queues are the whole city's, read from
/// PostgreSQL: every instance reports the same values (take `max` across instances).
pub async fn watch_pool(pool: occ_store::PgPool, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        let size = f64::from(pool.size());
        let idle = pool.num_idle() as f64;
        metrics::gauge!("occ_db_connections", "state" => "idle").set(idle);
        metrics::gauge!("occ_db_connections", "state" => "in_use").set((size - idle).max(0.0));
        if let Ok(mut conn) = pool.acquire().await
            && let Ok(queues) = occ_store::queues::summaries(&mut conn).await
        {
            for q in queues {
                for p in occ_domain::Priority::ALL {
                    let n = q
                        .waiting
                        .iter()
                        .find(|(w, _)| *w == p)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("occ_queue_waiting", "queue" => q.name.clone(), "priority" => p.as_str())
                        .set(n as f64);
                }
                metrics::gauge!("occ_queue_oldest_wait_seconds", "queue" => q.name.clone()).set(
                    q.oldest_waiting_age
                        .map_or(0.0, |a| a.as_seconds_f64().max(0.0)),
                );
                metrics::gauge!("occ_queue_claimed", "queue" => q.name).set(q.claimed as f64);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            () = shutdown.cancelled() => break,
        }
    }
}
