//! Evidence export as a court receives it: a package written over gRPC and by `occ export`,
//! checked by `occ export verify`, and refused once any file in it is changed.

use std::path::{Path, PathBuf};

use occ_proto::v1 as pb;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_tests::secure::{Grant, channel, make_key, start};
use occ_tests::{Broker, occ_command, panic_button, with_key};
use sqlx::PgPool;
use tonic::Code;

const OCC: &str = env!("CARGO_BIN_EXE_occ-under-test");
const CASE: &str = "KR-2026-0415";

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("occ-export-{}", uuid::Uuid::now_v7().simple()))
}

async fn verify(pool: &PgPool, dir: &Path) -> (bool, String) {
    let (ok, out, err) =
        occ_command(OCC, pool, &["export", "verify", &dir.display().to_string()]).await;
    (ok, format!("{out}{err}"))
}

#[sqlx::test(migrations = false)]
async fn an_exported_incident_verifies_and_any_changed_file_is_found(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = start(&pool, &broker, "occ-export", &[]).await;
    let gateway = make_key(&occ.grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let detective = make_key(
        &occ.grpc,
        &admin,
        "detective-7",
        Grant::role(&"investigator").agencies(&["police"]),
    )
    .await;
    let fire = make_key(
        &occ.grpc,
        &admin,
        "fire-investigator",
        Grant::role(&"investigator").agencies(&["fire"]),
    )
    .await;

    // A panic alarm pressed twice, the camera's snapshot referenced; a supervisor's note.
    let mut first = panic_button(1);
    first.evidence = vec![pb::Evidence {
        kind: pb::EvidenceKind::Snapshot as i32,
        reference: "nvr-1:stop-1-0212".into(),
        url: "https://nvr-1.city.example/snap/stop-1-0212.jpg".into(),
    }];
    let mut second = panic_button(1);
    second.external_id = "press-1-again".into();
    let results = IngestServiceClient::new(channel(&occ.grpc).await)
        .publish_events(with_key(
            &gateway,
            pb::PublishEventsRequest {
                events: vec![first, second],
            },
        ))
        .await
        .expect("publish")
        .into_inner()
        .results;
    let number = results[0].incidents[0].number.clone();
    assert_eq!(
        results[1].incidents[0].number, number,
        "the second press joins"
    );
    let mut incidents = IncidentServiceClient::new(channel(&occ.grpc).await);
    incidents
        .add_note(with_key(
            &admin,
            pb::AddNoteRequest {
                id: number.clone(),
                text: "caller describes a man in a red jacket".into(),
            },
        ))
        .await
        .expect("a note");

    // Refused: without a case; for an agency whose incident it is not (as if it did not exist).
    let export = |key: &str, case: &str| {
        with_key(
            key,
            pb::ExportIncidentRequest {
                incident: number.clone(),
                case_reference: case.into(),
            },
        )
    };
    let code = |r: Result<tonic::Response<pb::ExportIncidentResponse>, tonic::Status>| {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    };
    assert_eq!(
        code(incidents.export_incident(export(&detective, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(incidents.export_incident(export(&fire, CASE)).await),
        Code::NotFound
    );

    let package = incidents
        .export_incident(export(&detective, CASE))
        .await
        .expect("ExportIncident")
        .into_inner();
    let dir = temp_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    for f in &package.files {
        std::fs::write(dir.join(&f.path), &f.content).expect("write");
    }
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).expect(name)).expect("JSON")
    };
    let events = read("events.json");
    assert_eq!(events.as_array().map(Vec::len), Some(2));
    assert_eq!(
        read("evidence.json")[0]["evidence"]["reference"],
        "nvr-1:stop-1-0212"
    );
    let record = read("record.json");
    let actions: Vec<&str> = record
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"incident.opened") && actions.contains(&"incident.note"),
        "{actions:?}"
    );
    let manifest = read("manifest.json");
    assert_eq!(manifest["case_reference"], CASE);
    assert_eq!(manifest["exported_by"], "key:detective-7");
    assert!(manifest["anchor"]["hash"].is_string(), "{manifest}");

    let (ok, out) = verify(&pool, &dir).await;
    assert!(ok && out.contains("intact"), "{out}");
    assert!(out.contains(&package.manifest_sha256));

    // Any file changed, by as little as a space, is found; so is one added.
    for f in &package.files {
        let path = dir.join(&f.path);
        let mut changed = f.content.clone();
        changed.insert(changed.len() - 1, b' ');
        std::fs::write(&path, &changed).expect("alter");
        let (ok, out) = verify(&pool, &dir).await;
        assert!(
            !ok && out.contains("BROKEN") && out.contains(&f.path),
            "{}: {out}",
            f.path
        );
        std::fs::write(&path, &f.content).expect("restore");
    }
    // An entry of the record rewritten, with the manifest made to match: the chain says so.
    let mut forged = record.clone();
    forged[0]["actor"] = "key:someone-else".into();
    let forged_bytes = serde_json::to_vec_pretty(&forged).expect("JSON");
    std::fs::write(dir.join("record.json"), &forged_bytes).expect("forge");
    let (ok, out) = verify(&pool, &dir).await;
    assert!(!ok && out.contains("record.json"), "{out}");
    std::fs::write(
        dir.join("record.json"),
        &package
            .files
            .iter()
            .find(|f| f.path == "record.json")
            .expect("record")
            .content,
    )
    .expect("restore");
    std::fs::write(dir.join("notes.txt"), b"added later").expect("add");
    let (ok, out) = verify(&pool, &dir).await;
    assert!(
        !ok && out.contains("notes.txt: not in the manifest"),
        "{out}"
    );
    std::fs::remove_file(dir.join("notes.txt")).expect("remove");
    assert!(verify(&pool, &dir).await.0, "restored, it verifies again");

    // The same from the command line; each export is in the incident's record.
    let cli_dir = temp_dir();
    let (ok, out, err) = occ_command(
        OCC,
        &pool,
        &[
            "export",
            "incident",
            &number,
            "--case",
            CASE,
            "--out",
            &cli_dir.display().to_string(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("manifest SHA-256"), "{out}");
    let (ok, out) = verify(&pool, &cli_dir).await;
    assert!(ok, "{out}");
    let (ok, out, _) = occ_command(
        OCC,
        &pool,
        &[
            "export",
            "verify",
            "--offline",
            &cli_dir.display().to_string(),
        ],
    )
    .await;
    assert!(ok && out.contains("compare with"), "{out}");
    let exports: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'incident.exported'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(exports, 2);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cli_dir);
    occ.stop().await.expect("stop");
}
