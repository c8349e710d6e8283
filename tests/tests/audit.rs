//! The tamper-evident audit log, tried as an investigator would: `occ audit verify` on a real
//! record, then on the same record after someone with the database's owner rights edited,
//! deleted, reordered or cut entries directly in PostgreSQL.

use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_tests::{Broker, Occ, database_url, incidents, serve_args};
use sqlx::PgPool;

/// Runs `occ audit args…` against the test's database: (exit success, stdout).
async fn audit(pool: &PgPool, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_occ-under-test"))
        .arg("audit")
        .args(args)
        .args(["--database-url", &database_url(pool)])
        .env("OCC_LOG", "warn")
        .output()
        .await
        .expect("occ runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// An incident with a record: opened by two panic presses, claimed, annotated twice. Returns
/// its number.
async fn incident_with_a_record(pool: &PgPool) -> String {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(pool),
        broker.port,
        "occ-audit",
        &[],
    ))
    .await
    .expect("OCC starts");
    let press = |n: usize| pb::Event {
        source_id: "panic-1".into(),
        external_id: format!("press-{n}"),
        r#type: "panic.pressed".into(),
        zone: "esil_transit_stop_1".into(),
        ..Default::default()
    };
    let number = occ_tests::open_incidents(&occ.grpc, vec![press(1), press(2)])
        .await
        .remove(0);
    DispatchServiceClient::connect(occ.grpc.clone())
        .await
        .expect("connect")
        .claim_next(pb::ClaimNextRequest {
            queue: "police".into(),
            lease: None,
        })
        .await
        .expect("claim");
    let mut client = incidents(&occ.grpc).await;
    for text in ["caller on the line", "patrol informed"] {
        client
            .add_note(pb::AddNoteRequest {
                id: number.clone(),
                text: text.into(),
            })
            .await
            .expect("note");
    }
    occ.stop().await.expect("stop");
    number
}

/// The incident's audit entries' ids, oldest first.
async fn entries(pool: &PgPool, number: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT a.id FROM audit_log a JOIN incidents i ON a.entity_id = i.id \
         WHERE i.number = $1 ORDER BY a.chain_position",
    )
    .bind(number)
    .fetch_all(pool)
    .await
    .expect("entries")
}

/// Runs `sql` as the database's owner would to hide a change: with triggers off, so the
/// append-only guard does not stop it.
async fn tamper(pool: &PgPool, sql: &'static str, id: i64) {
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("triggers off");
    sqlx::query(sql)
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("tampered");
    tx.commit().await.expect("commit");
}

#[sqlx::test(migrations = false)]
async fn an_intact_record_verifies_and_is_anchored(pool: PgPool) {
    let number = incident_with_a_record(&pool).await;
    assert!(entries(&pool, &number).await.len() >= 4);
    let (ok, out) = audit(&pool, &["anchor"]).await;
    assert!(ok && out.starts_with("anchor "), "{out}");
    let (ok, out) = audit(&pool, &["verify"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("intact; anchored by anchor"), "{out}");
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(ok && out.contains("1 chains"), "{out}");

    // The log refuses changes, even from OCC's own database user.
    let refused = sqlx::query("UPDATE audit_log SET actor = 'someone else'")
        .execute(&pool)
        .await
        .expect_err("append-only");
    assert!(refused.to_string().contains("append-only"), "{refused}");
}

#[sqlx::test(migrations = false)]
async fn an_edited_entry_is_found(pool: PgPool) {
    let number = incident_with_a_record(&pool).await;
    let ids = entries(&pool, &number).await;
    tamper(
        &pool,
        "UPDATE audit_log SET actor = 'key:someone-else' WHERE id = $1",
        ids[2],
    )
    .await;
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(!ok);
    assert!(
        out.contains(&format!("entry 3 (audit id {}) was altered", ids[2])),
        "{out}"
    );
    // The whole-log check finds the same.
    let (ok, out) = audit(&pool, &["verify"]).await;
    assert!(!ok && out.contains("was altered"), "{out}");
}

#[sqlx::test(migrations = false)]
async fn a_deleted_entry_is_found(pool: PgPool) {
    let number = incident_with_a_record(&pool).await;
    let ids = entries(&pool, &number).await;
    tamper(&pool, "DELETE FROM audit_log WHERE id = $1", ids[1]).await;
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(!ok);
    assert!(out.contains("entry 2 is missing"), "{out}");
}

#[sqlx::test(migrations = false)]
async fn reordered_entries_are_found(pool: PgPool) {
    let number = incident_with_a_record(&pool).await;
    let ids = entries(&pool, &number).await;
    // Entries 2 and 3 swap places (through a free position: positions are unique).
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("triggers off");
    for (id, position) in [(ids[1], -1), (ids[2], 2), (ids[1], 3)] {
        sqlx::query("UPDATE audit_log SET chain_position = $2 WHERE id = $1")
            .bind(id)
            .bind(position)
            .execute(&mut *tx)
            .await
            .expect("moved");
    }
    tx.commit().await.expect("commit");
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(!ok);
    assert!(out.contains("entry 2 (audit id"), "{out}");
}

#[sqlx::test(migrations = false)]
async fn cutting_the_newest_entries_is_found_even_with_the_head_rewritten(pool: PgPool) {
    let number = incident_with_a_record(&pool).await;
    let (ok, _) = audit(&pool, &["anchor"]).await;
    assert!(ok);
    let ids = entries(&pool, &number).await;
    let last = *ids.last().expect("entries");
    tamper(&pool, "DELETE FROM audit_log WHERE id = $1", last).await;
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(!ok);
    assert!(out.contains("its newest entries were deleted"), "{out}");

    // Covering the cut by moving the chain's head back is still caught by the anchor.
    let n = ids.len() as i64 - 1;
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query(
        "UPDATE audit_heads h SET chain_position = a.chain_position, hash = a.hash \
           FROM audit_log a JOIN incidents i ON a.entity_id = i.id \
          WHERE i.number = $1 AND a.chain_position = $2 \
            AND h.entity_type = a.entity_type AND h.entity_id = a.entity_id",
    )
    .bind(&number)
    .bind(n)
    .execute(&mut *tx)
    .await
    .expect("head moved back");
    tx.commit().await.expect("commit");
    let (ok, out) = audit(&pool, &["verify", "--incident", &number]).await;
    assert!(!ok);
    assert!(
        out.contains(&format!("entry {}, vouched for by anchor", n + 1)),
        "{out}"
    );
}
