//! Traces leave OCC over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a collector (here a
//! minimal OTLP/gRPC trace receiver in the test) gets OCC's spans, named for the call or the
//! work they cover, from service `occ`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use occ_proto::v1::ListIncidentsRequest;
use occ_tests::{Broker, OccProcess, database_url, eventually, incidents, serve_args};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sqlx::PgPool;
use tokio_stream::wrappers::TcpListenerStream;

const OCC: &str = env!("CARGO_BIN_EXE_occ-under-test");

/// What the receiver got: (service name, span name) pairs.
#[derive(Debug, Default, Clone)]
struct Received(Arc<Mutex<Vec<(String, String)>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("received");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    got.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[sqlx::test(migrations = false)]
async fn spans_reach_an_otlp_collector(pool: PgPool) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("collector port");
    let collector = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let broker = Broker::start().await.expect("broker");
    let occ = OccProcess::start_with_env(
        OCC,
        &serve_args(&database_url(&pool), broker.port, "occ-otlp", &[]),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .expect("occ starts");
    incidents(&occ.grpc)
        .await
        .list_incidents(ListIncidentsRequest::default())
        .await
        .expect("ListIncidents");
    eventually(
        Duration::from_secs(20),
        "OCC's ListIncidents span at the collector",
        || async {
            received
                .0
                .lock()
                .expect("received")
                .iter()
                .any(|(service, name)| service == "occ" && name == "list_incidents")
                .then_some(())
        },
    )
    .await;
    assert!(occ.terminate().await.expect("SIGTERM").success());
    server.abort();
}
