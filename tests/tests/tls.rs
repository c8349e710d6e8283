//! The API over TLS with certificates the test makes itself: client certificates from the
//! city's CA identify integrations, a stranger's certificate and plaintext are refused, and a
//! renewed server certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_proto::v1::key_service_client::KeyServiceClient;
use occ_tests::{Broker, Occ, database_url, eventually, serve_args, with_key};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sqlx::PgPool;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

/// A certificate authority: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("self-signed").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `cn` (with `names` as subject alternative names): (cert, key) PEM.
    fn issue(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self) -> (String, String) {
        self.issue(
            "occ.test",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str) -> (String, String) {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write");
    path
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("occ-tls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// A secure OCC serving TLS with `server` (cert, key) and client certificates of `client_ca`.
/// Returns it, its https address and its admin key.
async fn start(
    pool: &PgPool,
    broker: &Broker,
    dir: &Path,
    server: &(String, String),
    client_ca: &str,
) -> (Occ, String, String) {
    let cert = write(dir, "server.pem", &server.0);
    let key = write(dir, "server.key", &server.1);
    let ca = write(dir, "clients-ca.pem", client_ca);
    let admin_file = dir.join("admin-key");
    let mut args: Vec<String> = serve_args(&database_url(pool), broker.port, "occ-tls", &[])
        .into_iter()
        .filter(|a| a != "--insecure")
        .collect();
    for (flag, path) in [
        ("--grpc-tls-cert", &cert),
        ("--grpc-tls-key", &key),
        ("--grpc-tls-client-ca", &ca),
        ("--admin-key-file", &admin_file),
    ] {
        args.extend([flag.to_owned(), path.display().to_string()]);
    }
    let occ = Occ::start(args).await.expect("OCC starts with TLS");
    let https = occ.grpc.replacen("http://", "https://", 1);
    let admin = std::fs::read_to_string(&admin_file)
        .expect("admin key")
        .trim()
        .to_owned();
    (occ, https, admin)
}

/// A TLS channel trusting `ca`, presenting `identity` if given.
async fn connect(
    https: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(https.to_owned())
        .expect("URL")
        .tls_config(tls)?
        .connect()
        .await
}

async fn list_queue(channel: &Channel, key: Option<&str>, queue: &str) -> Code {
    let message = pb::ListIncidentsRequest {
        queue: queue.into(),
        ..Default::default()
    };
    let request = match key {
        Some(key) => with_key(key, message),
        None => Request::new(message),
    };
    match IncidentServiceClient::new(channel.clone())
        .list_incidents(request)
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[sqlx::test(migrations = false)]
async fn a_client_certificate_of_the_citys_ca_identifies_an_integration(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let dir = temp_dir();
    let city = Ca::new("City of Astana test CA");
    let stranger_ca = Ca::new("Somebody else's CA");
    let (occ, https, admin) = start(&pool, &broker, &dir, &city.server(), &city.pem).await;

    let channel = connect(&https, &city.pem, None)
        .await
        .expect("TLS connects");
    let mut keys = KeyServiceClient::new(channel.clone());
    keys.create_key(with_key(
        &admin,
        pb::CreateKeyRequest {
            name: "police CAD certificate".into(),
            roles: vec!["integration".into()],
            queues: vec!["police".into()],
            certificate_subject: "cad.police.example".into(),
            ..Default::default()
        },
    ))
    .await
    .expect("a key for the CAD's certificate");
    let gateway = keys
        .create_key(with_key(
            &admin,
            pb::CreateKeyRequest {
                name: "gw".into(),
                roles: vec!["gateway".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("gateway key")
        .into_inner()
        .secret;

    // Plaintext is not served.
    let plain = DispatchServiceClient::connect(occ.grpc.clone()).await;
    let plain_call = match plain {
        Err(_) => None,
        Ok(mut c) => Some(
            c.list_queues(with_key(&admin, pb::ListQueuesRequest {}))
                .await,
        ),
    };
    assert!(
        !matches!(plain_call, Some(Ok(_))),
        "a plaintext call must fail"
    );

    // Without a certificate or a key: unauthenticated.
    assert_eq!(
        list_queue(&channel, None, "police").await,
        Code::Unauthenticated
    );

    // The CAD's certificate is its credential: its queue only.
    let cad = connect(&https, &city.pem, Some(&city.client("cad.police.example")))
        .await
        .expect("mutual TLS");
    assert_eq!(list_queue(&cad, None, "police").await, Code::Ok);
    assert_eq!(list_queue(&cad, None, "fire").await, Code::PermissionDenied);
    let number = IngestServiceClient::new(channel.clone())
        .publish_events(with_key(
            &gateway,
            pb::PublishEventsRequest {
                events: vec![pb::Event {
                    source_id: "panic-1".into(),
                    external_id: "press-1".into(),
                    r#type: "panic.pressed".into(),
                    zone: "esil_transit_stop_1".into(),
                    ..Default::default()
                }],
            },
        ))
        .await
        .expect("publish")
        .into_inner()
        .results[0]
        .incidents[0]
        .number
        .clone();
    let note = IncidentServiceClient::new(cad.clone())
        .add_note(pb::AddNoteRequest {
            id: number,
            text: "unit 12 on its way".into(),
        })
        .await
        .expect("the CAD adds a note")
        .into_inner();
    match note.entry.and_then(|e| e.entry) {
        Some(pb::timeline_entry::Entry::Audit(a)) => {
            assert_eq!(a.actor, "cert:cad.police.example")
        }
        other => panic!("a note entry, got {other:?}"),
    }

    // A certificate the city did not issue is refused, however it names itself.
    let refused = match connect(
        &https,
        &city.pem,
        Some(&stranger_ca.client("cad.police.example")),
    )
    .await
    {
        Err(_) => None,
        Ok(stranger) => Some(list_queue(&stranger, None, "police").await),
    };
    assert!(
        !matches!(refused, Some(Code::Ok)),
        "a stranger's certificate must not be accepted: {refused:?}"
    );
    // A certificate subject no key stands for is not enough either.
    let unknown = connect(&https, &city.pem, Some(&city.client("unknown.example")))
        .await
        .expect("mutual TLS");
    assert_eq!(
        list_queue(&unknown, None, "police").await,
        Code::Unauthenticated
    );
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_renewed_server_certificate_is_served_without_a_restart(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let dir = temp_dir();
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let (occ, https, admin) = start(&pool, &broker, &dir, &old_ca.server(), &old_ca.pem).await;
    let works = |ca: String| {
        let (https, admin) = (https.clone(), admin.clone());
        async move {
            match connect(&https, &ca, None).await {
                Ok(channel) => list_queue(&channel, Some(&admin), "police").await == Code::Ok,
                Err(_) => false,
            }
        }
    };
    assert!(works(old_ca.pem.clone()).await);
    assert!(
        !works(new_ca.pem.clone()).await,
        "not yet the new certificate"
    );

    // Renewed in place: key first, then certificate (a moment where they do not match).
    let (cert, key) = new_ca.server();
    write(&dir, "server.key", &key);
    tokio::time::sleep(Duration::from_millis(200)).await;
    write(&dir, "server.pem", &cert);
    eventually(
        Duration::from_secs(20),
        "the renewed certificate is served",
        || {
            let ok = works(new_ca.pem.clone());
            async move { ok.await.then_some(()) }
        },
    )
    .await;
    assert!(!works(old_ca.pem.clone()).await, "the old one is gone");
    occ.stop().await.expect("stop");
}

/// A broker with a TLS listener of its own (beside the plain one publishers use) that wants a
/// client certificate from `ca` and takes its subject as the user name.
async fn tls_broker(dir: &Path, ca: &Ca) -> (Broker, u16) {
    let (cert, key) = ca.server();
    let ca_file = write(dir, "broker-ca.pem", &ca.pem);
    let cert_file = write(dir, "broker.pem", &cert);
    let key_file = write(dir, "broker.key", &key);
    let tls_port = occ_tests::free_port();
    let broker = Broker::start_with(|_| {
        format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\n",
            ca_file.display(),
            cert_file.display(),
            key_file.display()
        )
    })
    .await
    .expect("broker with TLS");
    (broker, tls_port)
}

/// OCC's flags to read the broker's TLS listener with `client` as its certificate.
fn mqtt_tls_args(
    pool: &PgPool,
    dir: &Path,
    port: u16,
    ca: &Ca,
    client: &(String, String),
) -> Vec<String> {
    let ca_file = write(dir, "mqtt-ca.pem", &ca.pem);
    let cert = write(dir, "occ-mqtt.pem", &client.0);
    let key = write(dir, "occ-mqtt.key", &client.1);
    let mut args = serve_args(&database_url(pool), port, "occ-mqtt-tls", &[]);
    args.extend([
        "--mqtt-host".into(),
        "localhost".into(),
        "--mqtt-tls".into(),
        "--mqtt-tls-ca".into(),
        ca_file.display().to_string(),
        "--mqtt-tls-cert".into(),
        cert.display().to_string(),
        "--mqtt-tls-key".into(),
        key.display().to_string(),
    ]);
    args
}

#[sqlx::test(migrations = false)]
async fn events_arrive_over_mqtt_with_tls_and_a_client_certificate(pool: PgPool) {
    let dir = temp_dir();
    let ca = Ca::new("broker CA");
    let (broker, tls_port) = tls_broker(&dir, &ca).await;
    let occ = Occ::start(mqtt_tls_args(&pool, &dir, tls_port, &ca, &ca.client("occ")))
        .await
        .expect("OCC subscribes over TLS");
    let mut publisher = occ_tests::Publisher::connect(broker.port).await;
    occ_tests::publish_stream(&mut publisher, 0..20).await;
    occ_tests::expect_exactly(&pool, 20).await;
    occ.stop().await.expect("stop");

    // A certificate the broker's CA did not sign gets OCC nowhere: it never subscribes.
    let stranger = Ca::new("stranger");
    let occ = Occ::launch(mqtt_tls_args(
        &pool,
        &dir,
        tls_port,
        &ca,
        &stranger.client("occ"),
    ))
    .await
    .expect("OCC starts");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        occ_tests::health(&occ.grpc).await,
        Some(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    );
    occ.stop().await.expect("stop");
}

/// The test database's URL with these TLS settings instead of the tests' own.
fn with_sslmode(pool: &PgPool, settings: &[(&str, &str)]) -> url::Url {
    let mut url = url::Url::parse(&database_url(pool)).expect("URL");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("ssl"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .extend_pairs(settings.iter().copied());
    url
}

#[sqlx::test(migrations = false)]
async fn postgresql_is_reached_over_tls_when_the_url_asks(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let url = with_sslmode(&pool, &[("sslmode", "require")]);
    let occ = Occ::start(serve_args(url.as_str(), broker.port, "occ-pg-tls", &[]))
        .await
        .expect("OCC starts");
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
           JOIN pg_stat_ssl s USING (pid) \
          WHERE a.datname = current_database() AND a.application_name = 'occ'",
    )
    .fetch_one(&pool)
    .await
    .expect("connections");
    assert!(connections > 0);
    assert_eq!(encrypted, connections, "every OCC connection is encrypted");
    occ.stop().await.expect("stop");

    // verify-full with a CA that did not sign the server's certificate: OCC does not connect.
    let dir = temp_dir();
    let wrong = write(&dir, "wrong-ca.pem", &Ca::new("not PostgreSQL's CA").pem);
    let wrong = wrong.display().to_string();
    let url = with_sslmode(
        &pool,
        &[("sslmode", "verify-full"), ("sslrootcert", wrong.as_str())],
    );
    let started = tokio::time::timeout(
        Duration::from_secs(5),
        Occ::start(serve_args(
            url.as_str(),
            broker.port,
            "occ-pg-tls-wrong",
            &[],
        )),
    )
    .await;
    assert!(
        !matches!(started, Ok(Ok(_))),
        "OCC must not trust a server its CA did not sign"
    );
}
