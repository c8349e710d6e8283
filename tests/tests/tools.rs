//! The command-line tools city IT runs: `occ sources import`, `occ zones import`,
//! `occ watchlist import`, `occ dead-letters list|replay`, as the real program against a real
//! PostgreSQL.

use std::path::PathBuf;

use occ_tests::fixture;
use sqlx::PgPool;

/// Runs `occ args…` against the test's database: (success, stdout, stderr).
async fn occ(pool: &PgPool, args: &[&str]) -> (bool, String, String) {
    occ_tests::occ_command(env!("CARGO_BIN_EXE_occ-under-test"), pool, args).await
}

fn file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("occ-tools-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write");
    path
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[sqlx::test(migrations = false)]
async fn a_sources_file_is_imported_whole_or_not_at_all(pool: PgPool) {
    let bad = file(
        "sources.csv",
        "id,kind,name,lat,lon,zone,district,expected_interval,tags\n\
         cam-esil-0042,camera,Kabanbay 3,51.128,71.43,esil_street_1,esil,15m,vendor=axis\n\
         bad id,camera,,95,71.4,,,,\n",
    );
    let (ok, _, err) = occ(&pool, &["sources", "import", bad.to_str().expect("path")]).await;
    assert!(!ok);
    assert!(err.contains("line 3, id: may only contain"), "{err}");
    assert!(
        err.contains("line 3, lat: must be between -90 and 90, got 95"),
        "{err}"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sources").await,
        0,
        "nothing imported"
    );

    let good = file(
        "sources.csv",
        "id,kind,name,lat,lon,zone,district,expected_interval,tags\n\
         cam-esil-0042,camera,Kabanbay 3,51.128,71.43,esil_street_1,esil,15m,vendor=axis\n\
         lorawan:a84041000181c0a7,water_level_sensor,Ishim 7,51.1621,71.4304,ishim_embankment,esil,2h,\n",
    );
    let path = good.to_str().expect("path");
    let (ok, out, err) = occ(&pool, &["sources", "import", path]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2 sources registered, 0 updated"), "{out}");
    let (ok, out, _) = occ(&pool, &["sources", "import", path]).await;
    assert!(ok);
    assert!(out.contains("0 sources registered, 2 updated"), "{out}");
    let interval: i32 = sqlx::query_scalar(
        "SELECT expected_interval_seconds FROM sources WHERE id = 'cam-esil-0042'",
    )
    .fetch_one(&pool)
    .await
    .expect("registered");
    assert_eq!(interval, 900);
    let audited = count(
        &pool,
        "SELECT count(*) FROM audit_log WHERE entity_type = 'source' AND actor LIKE 'cli:%'",
    )
    .await;
    assert_eq!(audited, 4);

    // JSON with a profile.
    let json = file(
        "registry.json",
        r#"{"profiles": [{"name": "ultrasonic-level-v2",
                          "mapping": {"event_types": {"lorawan.uplink": "water.level"},
                                      "measurements": {"waterLevelCm": "water_level_cm"}}}],
            "sources": [{"id": "lorawan:a84041000181c0a8", "profile": "ultrasonic-level-v2",
                         "zone": "ishim_embankment"}]}"#,
    );
    let (ok, out, err) = occ(&pool, &["sources", "import", json.to_str().expect("path")]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("1 sources registered, 0 updated, 1 profiles"),
        "{out}"
    );
    let bad_json = file("bad.json", r#"[{"id": "x", "colour": "red"}]"#);
    let (ok, _, err) = occ(
        &pool,
        &["sources", "import", bad_json.to_str().expect("path")],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("[0].colour: unknown field `colour`"), "{err}");
}

#[sqlx::test(migrations = false)]
async fn zones_and_watch_lists_are_imported(pool: PgPool) {
    let zones = file(
        "zones.geojson",
        r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": "ishim_embankment", "district": "esil"},
             "geometry": {"type": "Polygon", "coordinates": [[[71.42, 51.15], [71.44, 51.15],
                [71.44, 51.17], [71.42, 51.17], [71.42, 51.15]]]}}]}"#,
    );
    let (ok, out, err) = occ(&pool, &["zones", "import", zones.to_str().expect("path")]).await;
    assert!(ok, "{err}");
    assert!(out.contains("1 zones created, 0 updated"), "{out}");

    let broken = file(
        "zones.geojson",
        r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": "x"},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}}]}"#,
    );
    let (ok, _, err) = occ(&pool, &["zones", "import", broken.to_str().expect("path")]).await;
    assert!(!ok);
    assert!(
        err.contains("features[0].geometry.coordinates[0]: a ring must end where it starts"),
        "{err}"
    );

    let watch = file(
        "watch.csv",
        "plate,list,reason,expires_at\n\
         505 aaa-02,stolen_vehicles,reported stolen,\n\
         777ABC01,amber_alert,child abduction,2099-01-01T00:00:00Z\n",
    );
    let (ok, out, err) = occ(
        &pool,
        &["watchlist", "import", watch.to_str().expect("path")],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("2 entries added, 0 updated"), "{out}");
    let plates: Vec<String> =
        sqlx::query_scalar("SELECT plate FROM watchlist_entries ORDER BY plate")
            .fetch_all(&pool)
            .await
            .expect("plates");
    assert_eq!(plates, ["505AAA02", "777ABC01"]);
}

#[sqlx::test(migrations = false)]
async fn dead_letters_are_replayed_from_the_command_line(pool: PgPool) {
    // Migrate through the tool itself first.
    let (ok, _, err) = occ(&pool, &["dead-letters", "list"]).await;
    assert!(ok, "{err}");
    let payload = fixture("chirpstack/up-water-level.json");
    let topic = "application/9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44/device/a84041000181c0a7/event/up";
    sqlx::query(
        "INSERT INTO dead_letters (id, received_at, transport, topic, payload, payload_size, payload_sha256, reason)
         VALUES ($1, now(), 'mqtt', $2, $3, $4, sha256($3), 'no adapter handles topic')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(topic)
    .bind(&payload)
    .bind(i32::try_from(payload.len()).expect("small"))
    .execute(&pool)
    .await
    .expect("dead letter");

    let (ok, out, _) = occ(&pool, &["dead-letters", "list", "--unresolved"]).await;
    assert!(ok);
    assert!(
        out.contains(topic) && out.contains("1 dead letters"),
        "{out}"
    );
    let (ok, out, err) = occ(&pool, &["dead-letters", "replay"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("resolved: 1 events stored") && out.contains("1 of 1 resolved"),
        "{out}"
    );
    let (ok, out, _) = occ(&pool, &["dead-letters", "replay"]).await;
    assert!(ok);
    assert!(out.contains("0 of 0 resolved"), "nothing left: {out}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE source_id = 'lorawan:a84041000181c0a7'"
        )
        .await,
        1
    );
}

/// `occ bench` runs end to end on a small load: its own broker, databases and OCC, the drain
/// (into an empty table and beside events already stored) and the live stage checked to store
/// exactly the events the messages hold, one table printed, nothing left behind. (What it measures is reported from real runs, not asserted here.)
#[sqlx::test(migrations = false)]
async fn the_bench_runs_and_cleans_up_after_itself(pool: PgPool) {
    let (ok, out, err) = occ(
        &pool,
        &[
            "bench",
            "--messages",
            "400",
            "--incidents",
            "2400",
            "--operators",
            "2",
            "--pairs",
            "50",
            "--live-rates",
            "500",
            "--live-seconds",
            "2",
            "--stages",
            "ingest,live,dispatch,stored,search",
            "--stored",
            "3000",
        ],
    )
    .await;
    assert!(ok, "{err}");
    for line in [
        "| broker alone",
        "| PostgreSQL alone: COPY of the decoded events into OCC's events",
        "| PostgreSQL alone: the same writes",
        "| bare consumer",
        "| OCC drain: 400 queued messages",
        "| OCC peak RSS",
        "| OCC drain with 3,000 events of a year stored",
        "| bare consumer live at 500 msg/s",
        "| OCC, exactly once, live at 500 msg/s",
        "| ListIncidents, first page of 50 of 2400 open incidents",
        // 2 × 50 pairs, a fifth of them warm-up (untimed).
        "| ClaimNext + DispatchUnits, 2 operators on one queue, 80 pairs",
        "| SearchEvents: one zone, one day",
        "| PlateHistory: one plate, a year",
        "| AroundIncident: 500 m",
    ] {
        assert!(out.contains(line), "{line} missing from:\n{out}");
    }
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'occ_bench_%'")
            .fetch_one(&pool)
            .await
            .expect("databases");
    assert_eq!(left, 0, "the bench dropped its databases");
}
