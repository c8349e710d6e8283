//! The registry snapshot every instance enriches events with — registered sources, profiles,
//! zones and watch-list entries — kept current like the rules (see [`crate::live`]).

use std::time::Duration;

use occ_domain::{Registry, WatchList, ZoneMap};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::{sources, watchlist, zones};

/// The channel the registry tables' triggers notify on.
pub const CHANGED_CHANNEL: &str = "occ_registry_changed";

/// The registry in force, kept current in the background.
pub type LiveRegistry = crate::live::Live<Registry>;

/// Loads the registry, then keeps it current until `shutdown`.
pub async fn live(
    pool: PgPool,
    refresh: Duration,
    shutdown: CancellationToken,
) -> Result<LiveRegistry> {
    // A reload always replaces the snapshot: comparing one is no cheaper than taking it.
    let registry = LiveRegistry::start(
        pool,
        refresh,
        CHANGED_CHANNEL,
        "registry",
        load,
        |_, _| false,
        shutdown,
    )
    .await?;
    let (sources, profiles, zones, watch) = registry.current().counts();
    tracing::info!(
        sources,
        profiles,
        zones,
        watch_entries = watch,
        "registry loaded"
    );
    Ok(registry)
}

/// The registry as stored now.
pub async fn load(pool: PgPool) -> Result<Registry> {
    let mut conn = pool.acquire().await?;
    let now = crate::dispatch::now(&mut conn).await?;
    let sources = sources::configs(&mut conn).await?;
    let profiles = sources::profiles(&mut conn).await?;
    let zones = zones::list(&mut conn, None, None, None)
        .await?
        .into_iter()
        .map(|z| z.zone)
        .collect();
    let entries = watchlist::active(&mut conn, now).await?;
    Ok(Registry::new(
        sources,
        profiles,
        ZoneMap::new(zones),
        WatchList::new(entries),
    ))
}
