//! Operators signing in with the city's accounts: bearer tokens from an identity provider
//! (RS256 and ES256, keys from a JWKS file or URL) name the caller, its roles and its queues;
//! every kind of bad token is refused.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use occ_proto::v1 as pb;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_tests::{Broker, Occ, database_url, eventually, serve_args, with_key};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const ISSUER: &str = "https://sso.city.example/realms/occ";
const AUDIENCE: &str = "occ";

/// A signing key made in the test, and its public JWK.
fn signing_key(alg: Algorithm, kid: &str) -> (EncodingKey, Jwk) {
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
    );
    let key = match alg {
        Algorithm::RS256 => {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            let k = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA key");
            EncodingKey::from_rsa_der(k.to_pkcs1_der().expect("DER").as_bytes())
        }
        _ => {
            use p256::elliptic_curve::Generate;
            use p256::pkcs8::EncodePrivateKey;
            let k = p256::ecdsa::SigningKey::generate();
            EncodingKey::from_ec_der(k.to_pkcs8_der().expect("DER").as_bytes())
        }
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("JWK");
    jwk.common.key_id = Some(kid.into());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    (key, jwk)
}

fn jwks(keys: &[&Jwk]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| (*k).clone()).collect(),
    })
    .expect("JWKS")
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).expect("token")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A Keycloak-like token for `name`: a dispatcher of the police queue.
fn claims(name: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": [AUDIENCE, "account"],
        "sub": format!("f3a1-{name}"),
        "preferred_username": name,
        "exp": now() + 300,
        "nbf": now() - 5,
        "realm_access": {"roles": ["dispatcher", "offline_access", "uma_authorization"]},
        "occ_queues": ["police"],
    })
}

fn temp_file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("occ-jwt-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write");
    path
}

async fn start(pool: &PgPool, broker: &Broker, jwks: &str) -> Occ {
    let key_file =
        std::env::temp_dir().join(format!("occ-jwt-admin-{}", uuid::Uuid::now_v7().simple()));
    let mut args: Vec<String> = serve_args(&database_url(pool), broker.port, "occ-jwt", &[])
        .into_iter()
        .filter(|a| a != "--insecure")
        .collect();
    for (flag, value) in [
        ("--jwt-issuer", ISSUER),
        ("--jwt-audience", AUDIENCE),
        ("--jwt-jwks", jwks),
        ("--admin-key-file", &key_file.display().to_string()),
    ] {
        args.extend([flag.to_owned(), value.to_owned()]);
    }
    Occ::start(args).await.expect("OCC starts")
}

/// ListIncidents of `queue` with `token`: the status code (and message).
async fn list(grpc: &str, token: &str, queue: &str) -> (Code, String) {
    let answer = IncidentServiceClient::connect(grpc.to_owned())
        .await
        .expect("connect")
        .list_incidents(with_key(
            token,
            pb::ListIncidentsRequest {
                queue: queue.into(),
                ..Default::default()
            },
        ))
        .await;
    match answer {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

#[sqlx::test(migrations = false)]
async fn tokens_from_the_identity_provider_are_checked_and_scoped(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (rsa, rsa_jwk) = signing_key(Algorithm::RS256, "rsa-1");
    let (ec, ec_jwk) = signing_key(Algorithm::ES256, "ec-1");
    let file = temp_file("jwks.json", &jwks(&[&rsa_jwk, &ec_jwk]));
    let occ = start(&pool, &broker, &file.display().to_string()).await;
    let grpc = occ.grpc.as_str();

    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-1", &ec),
    ] {
        let token = sign(alg, kid, key, &claims("alice"));
        assert_eq!(list(grpc, &token, "police").await.0, Code::Ok, "{alg:?}");
        assert_eq!(
            list(grpc, &token, "fire").await.0,
            Code::PermissionDenied,
            "{alg:?}: the police queue only"
        );
    }

    let refused = |claims: Value| sign(Algorithm::RS256, "rsa-1", &rsa, &claims);
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 120);
    let mut early = claims("alice");
    early["nbf"] = json!(now() + 300);
    let mut issuer = claims("alice");
    issuer["iss"] = json!("https://sso.elsewhere.example/realms/occ");
    let mut audience = claims("alice");
    audience["aud"] = json!("another-app");
    let (stranger, _) = signing_key(Algorithm::RS256, "rsa-1");
    let forged = sign(Algorithm::RS256, "rsa-1", &stranger, &claims("alice"));
    let unknown_kid = sign(Algorithm::ES256, "ec-9", &ec, &claims("alice"));
    for (what, token, reason) in [
        ("expired", refused(expired), "expired"),
        ("not yet valid", refused(early), "not valid yet"),
        ("wrong issuer", refused(issuer), "another issuer"),
        ("wrong audience", refused(audience), "another audience"),
        ("wrong signature", forged, "signature"),
        ("unknown key", unknown_kid, "does not publish"),
        (
            "malformed",
            "eyJhbGciOi.not-a-token".into(),
            "not a valid JWT",
        ),
    ] {
        let (code, message) = list(grpc, &token, "police").await;
        assert_eq!(code, Code::Unauthenticated, "{what}");
        assert!(message.contains(reason), "{what}: {message}");
    }

    // A token without any role OCC knows authenticates, and may do nothing.
    let mut no_role = claims("bob");
    no_role["realm_access"] = json!({"roles": ["offline_access"]});
    assert_eq!(
        list(grpc, &refused(no_role), "police").await.0,
        Code::PermissionDenied
    );

    // The audit log names the signed-in user.
    let token = sign(Algorithm::ES256, "ec-1", &ec, &claims("alice"));
    let claim =
        occ_proto::v1::dispatch_service_client::DispatchServiceClient::connect(grpc.to_owned())
            .await
            .expect("connect")
            .claim_next(with_key(
                &token,
                pb::ClaimNextRequest {
                    queue: "police".into(),
                    lease: None,
                },
            ))
            .await;
    assert!(claim.is_ok(), "{claim:?}");
    occ.stop().await.expect("stop");
}

/// Serves `body` (read from `file` at each request) over plain HTTP, as an identity
/// provider's certs endpoint; returns its URL.
async fn serve_jwks(file: PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/realms/occ/protocol/openid-connect/certs",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let file = file.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let body = std::fs::read_to_string(&file).unwrap_or_default();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

#[sqlx::test(migrations = false)]
async fn keys_are_read_from_the_providers_url_and_a_rotated_key_is_picked_up(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (old, old_jwk) = signing_key(Algorithm::ES256, "2026-11");
    let file = temp_file("certs.json", &jwks(&[&old_jwk]));
    let url = serve_jwks(file.clone()).await;
    let occ = start(&pool, &broker, &url).await;
    let grpc = occ.grpc.clone();
    let old_token = sign(Algorithm::ES256, "2026-11", &old, &claims("alice"));
    assert_eq!(list(&grpc, &old_token, "police").await.0, Code::Ok);

    // The provider rotates: a new key is published beside the old one.
    let (new, new_jwk) = signing_key(Algorithm::ES256, "2026-12");
    std::fs::write(&file, jwks(&[&old_jwk, &new_jwk])).expect("rotate");
    let new_token = sign(Algorithm::ES256, "2026-12", &new, &claims("alice"));
    eventually(Duration::from_secs(30), "the new key is known", || {
        let (grpc, token) = (grpc.clone(), new_token.clone());
        async move { (list(&grpc, &token, "police").await.0 == Code::Ok).then_some(()) }
    })
    .await;
    occ.stop().await.expect("stop");
}
