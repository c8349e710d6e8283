-- Real producers: evolving events (a camera's tracked object), evidence references, zones and
-- districts; the source registry with health; profiles that map producers' names; zone
-- polygons; watch lists; dead-letter replay.

-- Events ---------------------------------------------------------------------------------------
ALTER TABLE events
    -- Further zones the event is in (a camera's object in overlapping zones).
    ADD COLUMN extra_zones   text[] NOT NULL DEFAULT '{}',
    ADD COLUMN district      text,
    -- References to evidence kept elsewhere: [{"kind": "snapshot", "reference": "frigate:…",
    -- "url": "http://nvr:5000/api/events/…/snapshot.jpg"}].
    ADD COLUMN evidence      jsonb NOT NULL DEFAULT '[]',
    -- An evolving event (a camera's tracked object: new, updates, end) is one row holding its
    -- latest state; a message replaces it only when its revision is newer.
    ADD COLUMN revision_at   timestamptz,
    ADD COLUMN revision_rank smallint,
    ADD COLUMN revisions     integer NOT NULL DEFAULT 1 CHECK (revisions > 0),
    -- When its latest revision arrived (received_at is when the first batch that stored it
    -- did).
    ADD COLUMN revised_at    timestamptz;

-- Constraints on a table that may already hold millions of events: added NOT VALID (no scan
-- under an exclusive lock), then validated under a lock that lets ingest go on.
ALTER TABLE events ADD CONSTRAINT events_revision_whole
    CHECK ((revision_at IS NULL) = (revision_rank IS NULL)) NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_revision_whole;

-- Events OCC makes itself (a source that went silent) travel by no transport.
ALTER TABLE events DROP CONSTRAINT events_transport_check;
ALTER TABLE events ADD CONSTRAINT events_transport_check
    CHECK (transport IN ('mqtt', 'grpc', 'system')) NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_transport_check;

-- Rules match districts as well as zones.
ALTER TABLE rules ADD COLUMN districts text[] NOT NULL DEFAULT '{}';

ALTER TABLE audit_log DROP CONSTRAINT audit_log_entity_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_entity_type_check
    CHECK (entity_type IN ('incident', 'rule', 'unit', 'queue', 'source', 'profile', 'zone',
                           'watchlist', 'dead_letter'));
-- Registry entries are named, not numbered: their audit entries carry the name in detail and
-- a stable uuid derived from it as entity_id.

-- Sources -----------------------------------------------------------------------------------
-- Cameras, sensors and gateways: registered by the city (verified) or by OCC when their first
-- event arrives (unverified). Settings above the line, health below.
CREATE TABLE sources (
    id                        text PRIMARY KEY,
    kind                      text,
    name                      text NOT NULL DEFAULT '',
    lat                       double precision CHECK (lat BETWEEN -90 AND 90),
    lon                       double precision CHECK (lon BETWEEN -180 AND 180),
    zone                      text,
    district                  text,
    tags                      jsonb NOT NULL DEFAULT '{}',
    enabled                   boolean NOT NULL DEFAULT true,
    verified                  boolean NOT NULL DEFAULT false,
    profile                   text,
    mapping                   jsonb NOT NULL DEFAULT '{}',
    expected_interval_seconds integer CHECK (expected_interval_seconds > 0),
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    -- Health.
    status                    text NOT NULL DEFAULT 'unknown'
                              CHECK (status IN ('unknown', 'online', 'offline')),
    status_changed_at         timestamptz,
    -- When the latest status report about it was received, whether it changed anything: an
    -- older one delivered late is stale.
    status_reported_at        timestamptz,
    last_seen                 timestamptz,
    -- When it counts as silent: last_seen + expected interval while online, else NULL.
    silent_after              timestamptz,
    battery_pct               double precision,
    last_error                text,
    last_error_at             timestamptz,
    qos0_events               bigint NOT NULL DEFAULT 0,
    CHECK ((lat IS NULL) = (lon IS NULL))
);

CREATE INDEX sources_silent_after ON sources (silent_after) WHERE silent_after IS NOT NULL;
CREATE INDEX sources_by_zone ON sources (zone, id);
CREATE INDEX sources_by_district ON sources (district, id);

-- Named mappings shared by sources: a device model, a LoRaWAN device profile.
CREATE TABLE source_profiles (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    mapping     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Zones: named polygons (GeoJSON geometry, WGS 84), each in a district.
CREATE TABLE zones (
    name        text PRIMARY KEY,
    district    text,
    description text NOT NULL DEFAULT '',
    geometry    jsonb NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Watch lists: plates (normalised: upper-case letters and digits) the police want to know
-- about. Removing an entry keeps it, with who removed it and when.
CREATE TABLE watchlist_entries (
    id         uuid PRIMARY KEY,
    plate      text NOT NULL,
    display    text NOT NULL,
    list       text NOT NULL,
    reason     text NOT NULL DEFAULT '',
    expires_at timestamptz,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    removed_by text,
    removed_at timestamptz
);

CREATE UNIQUE INDEX watchlist_active ON watchlist_entries (list, plate) WHERE removed_at IS NULL;
CREATE INDEX watchlist_by_plate ON watchlist_entries (plate) WHERE removed_at IS NULL;

-- Every sighting of a wanted plate: which entry, which event (camera, place, time). One row
-- per entry and event, however often an evolving detection is revised.
CREATE TABLE watchlist_hits (
    entry_id  uuid NOT NULL REFERENCES watchlist_entries (id),
    event_id  uuid NOT NULL REFERENCES events (id),
    plate     text NOT NULL,
    source_id text NOT NULL,
    zone      text,
    seen_at   timestamptz NOT NULL,
    hit_at    timestamptz NOT NULL,
    PRIMARY KEY (entry_id, event_id)
);

CREATE INDEX watchlist_hits_by_time ON watchlist_hits (hit_at);
CREATE INDEX watchlist_hits_by_entry ON watchlist_hits (entry_id, seen_at DESC);
CREATE INDEX watchlist_hits_by_event ON watchlist_hits (event_id);

-- Every OCC instance keeps the registry in memory and reloads it when it changes. Health
-- columns of sources change all the time and do not count; neither does OCC registering an
-- unknown source (it has no settings yet).
CREATE FUNCTION occ_notify_registry_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('occ_registry_changed', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER sources_registered
    AFTER INSERT ON sources
    FOR EACH ROW WHEN (NEW.verified) EXECUTE FUNCTION occ_notify_registry_changed();
CREATE TRIGGER sources_settings_changed
    AFTER UPDATE OF kind, name, lat, lon, zone, district, tags, enabled, verified, profile,
                    mapping, expected_interval_seconds
    ON sources
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_registry_changed();
CREATE TRIGGER sources_removed
    AFTER DELETE OR TRUNCATE ON sources
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_registry_changed();
CREATE TRIGGER source_profiles_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON source_profiles
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_registry_changed();
CREATE TRIGGER zones_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON zones
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_registry_changed();
CREATE TRIGGER watchlist_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON watchlist_entries
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_registry_changed();

-- Dead letters -----------------------------------------------------------------------------------
-- A dead letter can be decoded again after a fix or a new adapter; once it yields events it is
-- resolved, and replaying it again changes nothing.
ALTER TABLE dead_letters
    ADD COLUMN replays        integer NOT NULL DEFAULT 0,
    ADD COLUMN last_replay_at timestamptz,
    ADD COLUMN resolved_at    timestamptz,
    ADD COLUMN resolved_by    text,
    -- How many events the replay stored (0: the message carried nothing that matters).
    ADD COLUMN resolved_events integer;

CREATE INDEX dead_letters_unresolved ON dead_letters (received_at, id) WHERE resolved_at IS NULL;

-- Default rules for what a source's health and a maintenance report raise -----------------------
INSERT INTO rules (id, name, description, event_types, source_kinds, zones, min_confidence,
                   thresholds, attributes, category, queue, priority, title_template,
                   correlation_fields, correlation_window_seconds)
VALUES
    (gen_random_uuid(), 'source-offline',
     'A camera, sensor or gateway went silent past its expected interval, reported itself offline, or its broker last will fired: municipal maintenance.',
     '{source.offline}', '{}', '{}', NULL, '[]', '{}',
     'device_offline', 'municipal', 4, 'Source {source_id} offline ({zone})', '{source_id}', 86400),

    (gen_random_uuid(), 'low-battery',
     'A battery-powered sensor reported a low battery: municipal maintenance, one incident per device per week.',
     '{device.battery_low}', '{}', '{}', NULL, '[]', '{}',
     'maintenance', 'municipal', 4, 'Low battery at {source_id} ({zone})', '{source_id}', 604800)
-- A city that already has rules of these names keeps its own.
ON CONFLICT (name) DO NOTHING;

-- A recognised plate on a watch list, whether reported as a plate read or as a camera's
-- tracked vehicle with its plate: OCC's watch lists set `watchlisted`.
-- One incident per plate however a reader spelt it ("505 AAA 02", "505aaa02"): by its
-- normalised form, which enrichment sets beside the plate as read.
UPDATE rules
   SET event_types = '{vehicle.plate,object.*}',
       correlation_fields = '{attribute.plate_normalized}',
       title_template = 'Watch-listed vehicle {attribute.plate_normalized} seen in {zone}',
       description = 'A licence plate on one of OCC''s watch lists was recognised (by a plate reader or a camera''s tracked vehicle): police. One incident per plate, however it was spelt.'
 WHERE name = 'watchlisted-plate';
