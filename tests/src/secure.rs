//! OCC with authentication (its default), and keys made as an administrator makes them.

use std::path::PathBuf;

use occ_proto::v1 as pb;
use occ_proto::v1::key_service_client::KeyServiceClient;
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::{Broker, Occ, database_url, serve_args, with_key};

/// OCC's arguments without `--insecure`, and its admin key file in a directory of the test's
/// own.
pub fn secure_args(
    pool: &PgPool,
    broker: &Broker,
    id: &str,
    extra: &[&str],
) -> (Vec<String>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("occ-secure-{}", uuid::Uuid::now_v7().simple()));
    let file = dir.join("admin-key");
    let mut args: Vec<String> = serve_args(&database_url(pool), broker.port, id, extra)
        .into_iter()
        .filter(|a| a != "--insecure")
        .collect();
    args.extend(["--admin-key-file".into(), file.display().to_string()]);
    (args, file)
}

/// A secure OCC and the admin key it made on its first start.
pub async fn start(pool: &PgPool, broker: &Broker, id: &str, extra: &[&str]) -> (Occ, String) {
    let (args, file) = secure_args(pool, broker, id, extra);
    let occ = Occ::start(args).await.expect("OCC starts");
    let admin = std::fs::read_to_string(&file)
        .expect("OCC wrote its admin key")
        .trim()
        .to_owned();
    (occ, admin)
}

pub async fn channel(grpc: &str) -> Channel {
    Channel::from_shared(grpc.to_owned())
        .expect("URL")
        .connect()
        .await
        .expect("gRPC connects")
}

/// What a key may do, as an administrator would make it.
#[derive(Debug, Default)]
pub struct Grant<'a> {
    pub roles: &'a [&'a str],
    pub queues: &'a [&'a str],
    pub agencies: &'a [&'a str],
    pub sources: &'a [&'a str],
    pub may_update_status: bool,
}

impl<'a> Grant<'a> {
    pub fn role(role: &'a &'a str) -> Self {
        Grant {
            roles: std::slice::from_ref(role),
            ..Grant::default()
        }
    }

    pub fn queues(self, queues: &'a [&'a str]) -> Self {
        Grant { queues, ..self }
    }

    pub fn agencies(self, agencies: &'a [&'a str]) -> Self {
        Grant { agencies, ..self }
    }

    pub fn sources(self, sources: &'a [&'a str]) -> Self {
        Grant { sources, ..self }
    }

    pub fn updating_status(self) -> Self {
        Grant {
            may_update_status: true,
            ..self
        }
    }
}

/// A key named `name` with `grant`, made with the `admin` key; its secret.
pub async fn make_key(grpc: &str, admin: &str, name: &str, grant: Grant<'_>) -> String {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
    KeyServiceClient::new(channel(grpc).await)
        .create_key(with_key(
            admin,
            pb::CreateKeyRequest {
                name: name.into(),
                roles: strings(grant.roles),
                queues: strings(grant.queues),
                agencies: strings(grant.agencies),
                sources: strings(grant.sources),
                may_update_status: grant.may_update_status,
                ..Default::default()
            },
        ))
        .await
        .expect("CreateKey")
        .into_inner()
        .secret
}
