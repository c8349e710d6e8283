//! The gRPC server: every service behind the authentication and authorization layer, health and reflection, HTTP/2
//! keepalive, graceful shutdown.

use std::time::Duration;

use occ_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
use occ_proto::v1::dispatch_service_server::DispatchServiceServer;
use occ_proto::v1::event_service_server::EventServiceServer;
use occ_proto::v1::incident_service_server::IncidentServiceServer;
use occ_proto::v1::ingest_service_server::IngestServiceServer;
use occ_proto::v1::key_service_server::KeyServiceServer;
use occ_proto::v1::rule_service_server::RuleServiceServer;
use occ_proto::v1::source_service_server::SourceServiceServer;
use occ_proto::v1::stats_service_server::StatsServiceServer;
use occ_proto::v1::unit_service_server::UnitServiceServer;
use occ_proto::v1::watchlist_service_server::WatchlistServiceServer;
use occ_proto::v1::zone_service_server::ZoneServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::ApiState;
use crate::dead_letters::DeadLetterApi;
use crate::dispatch::DispatchApi;
use crate::edge::RequestStatusLayer;
use crate::events::EventApi;
use crate::incidents::IncidentApi;
use crate::ingest::IngestApi;
use crate::keys::KeyApi;
use crate::metrics::GrpcMetricsLayer;
use crate::principal::AuthLayer;
use crate::rules::RuleApi;
use crate::sources::SourceApi;
use crate::stats::StatsApi;
use crate::units::UnitApi;
use crate::watchlist::WatchlistApi;
use crate::zones::ZoneApi;

/// Server settings.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// How often idle connections are pinged, so dead clients are noticed.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Largest request message.
    pub max_message_bytes: usize,
    /// Most calls (HTTP/2 streams) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Most connections open at once; past it new ones are closed as they arrive.
    pub max_connections: usize,
    /// The longest a unary call may take (a client's shorter `grpc-timeout` wins); streams
    /// are bounded only in how long their answer takes to start.
    pub request_timeout: Duration,
    /// TLS, from [`crate::tls::acceptor`] (none: plaintext, for loopback and a mesh that
    /// encrypts).
    pub tls: Option<crate::tls::Acceptor>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 256,
            max_connections: 1024,
            request_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets calls in flight
/// finish.
///
/// `ready` drives the server-wide health status (service name `""`): SERVING while OCC takes
/// events (subscribed to the broker, database reachable), NOT_SERVING otherwise, so a load
/// balancer or orchestrator can tell. The gRPC services themselves report SERVING throughout.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    config: GrpcConfig,
    mut ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // The reporter starts with the server as a whole SERVING: until ingest has subscribed, a
    // check answered before the task below runs would call OCC ready (and a deployment that
    // stopped it then would leave a session without its subscription).
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let overall = health.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let status = if *ready.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            overall.set_service_status("", status).await;
            tokio::select! {
                changed = ready.changed() => if changed.is_err() { break },
                () = stop.cancelled() => break,
            }
        }
        overall
            .set_service_status("", ServingStatus::NotServing)
            .await;
    });
    health.set_serving::<IngestServiceServer<IngestApi>>().await;
    health
        .set_serving::<IncidentServiceServer<IncidentApi>>()
        .await;
    health.set_serving::<RuleServiceServer<RuleApi>>().await;
    health
        .set_serving::<DispatchServiceServer<DispatchApi>>()
        .await;
    health.set_serving::<UnitServiceServer<UnitApi>>().await;
    health.set_serving::<SourceServiceServer<SourceApi>>().await;
    health.set_serving::<ZoneServiceServer<ZoneApi>>().await;
    health
        .set_serving::<WatchlistServiceServer<WatchlistApi>>()
        .await;
    health
        .set_serving::<DeadLetterServiceServer<DeadLetterApi>>()
        .await;
    health.set_serving::<KeyServiceServer<KeyApi>>().await;
    health.set_serving::<EventServiceServer<EventApi>>().await;
    health.set_serving::<StatsServiceServer<StatsApi>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(occ_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("OCC's descriptor sets are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(occ_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("OCC's descriptor sets are valid");

    let max = config.max_message_bytes;
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, tls = config.tls.is_some(), "gRPC listening");
    let router = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.request_timeout)
        .layer(GrpcMetricsLayer)
        .layer(RequestStatusLayer)
        .layer(AuthLayer::new(state.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            IngestServiceServer::new(IngestApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            IncidentServiceServer::new(IncidentApi::new(state.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            DispatchServiceServer::new(DispatchApi::new(state.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            UnitServiceServer::new(UnitApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            RuleServiceServer::new(RuleApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            SourceServiceServer::new(SourceApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            ZoneServiceServer::new(ZoneApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            WatchlistServiceServer::new(WatchlistApi::new(state.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            DeadLetterServiceServer::new(DeadLetterApi::new(state.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            EventServiceServer::new(EventApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(
            StatsServiceServer::new(StatsApi::new(state.clone())).max_decoding_message_size(max),
        )
        .add_service(KeyServiceServer::new(KeyApi::new(state)).max_decoding_message_size(max));
    let max_connections = config.max_connections;
    match config.tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    crate::connections::incoming(listener, max_connections, |tcp| async {
                        Ok(tcp)
                    }),
                    shutdown.cancelled_owned(),
                )
                .await
        }
        Some(acceptor) => {
            router
                .serve_with_incoming_shutdown(
                    crate::connections::incoming(listener, max_connections, move |tcp| {
                        acceptor.accept(tcp)
                    }),
                    shutdown.cancelled_owned(),
                )
                .await
        }
    }
}
