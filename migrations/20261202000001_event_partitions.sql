-- A year of events: the events table partitioned by time, redeliveries recognised by a table of
-- recent keys, and legal holds that keep events past their retention.
--
-- Time: `seen_at`, when OCC takes the event to have happened (the producer's time, never later
-- than receipt, and receipt when the producer's clock is more than a day behind: see
-- Event::observed_at). Searches, partitions and retention all go by it; a new event's seen_at is
-- at most a day before its receipt, so it lands in the current or the previous partition.
--
-- Upgrading moves every stored event once (into the default partition; OCC then creates the
-- partitions they belong in and moves them there): on a large table this migration takes minutes.

-- Redeliveries: (source, idempotency key) → the stored event, for as long as a redelivery or a
-- newer revision of an evolving event can come (--event-key-window, a week by default). A
-- unique index on the events themselves would have to include the partition key, and one that
-- grows with a year of events would slow every insert as it outgrows memory.
CREATE TABLE event_keys (
    source_id       text NOT NULL,
    idempotency_key text NOT NULL,
    event_id        uuid NOT NULL,
    -- Where the event is: its partition key.
    seen_at         timestamptz NOT NULL,
    revision_at     timestamptz,
    revision_rank   smallint,
    -- When the key was last used (stored, or revised): it is forgotten a window after.
    used_at         timestamptz NOT NULL,
    PRIMARY KEY (source_id, idempotency_key)
) WITH (fillfactor = 80);  -- room on each page for revisions to update in place

-- No index on used_at: a revision then updates its key in place (a HOT update), and forgetting
-- old keys, once an hour, reads the table from its oldest rows.

ALTER TABLE incident_events DROP CONSTRAINT incident_events_event_id_fkey;
ALTER TABLE watchlist_hits DROP CONSTRAINT watchlist_hits_event_id_fkey;

ALTER TABLE events RENAME TO events_unpartitioned;

CREATE TABLE events (
    id              uuid NOT NULL,
    source_id       text NOT NULL,
    idempotency_key text NOT NULL,
    external_id     text,
    event_type      text NOT NULL,
    severity        text CHECK (severity IN ('info', 'minor', 'major', 'critical')),
    source_kind     text,
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    lat             double precision CHECK (lat BETWEEN -90 AND 90),
    lon             double precision CHECK (lon BETWEEN -180 AND 180),
    zone            text,
    confidence      double precision CHECK (confidence BETWEEN 0 AND 1),
    measurements    jsonb NOT NULL DEFAULT '{}',
    attributes      jsonb NOT NULL DEFAULT '{}',
    transport       text NOT NULL CHECK (transport IN ('mqtt', 'grpc', 'system')),
    extra_zones     text[] NOT NULL DEFAULT '{}',
    district        text,
    evidence        jsonb NOT NULL DEFAULT '[]',
    revision_at     timestamptz,
    revision_rank   smallint,
    revisions       integer NOT NULL DEFAULT 1 CHECK (revisions > 0),
    revised_at      timestamptz,
    seen_at         timestamptz NOT NULL,
    CHECK ((revision_at IS NULL) = (revision_rank IS NULL)),
    PRIMARY KEY (id, seen_at)
) PARTITION BY RANGE (seen_at);

-- Events for a time no partition covers yet (OCC creates them ahead; this only catches what
-- comes while it could not): stored all the same, and moved once their partition exists.
CREATE TABLE events_default PARTITION OF events DEFAULT;

INSERT INTO event_keys (source_id, idempotency_key, event_id, seen_at, revision_at, revision_rank,
                        used_at)
SELECT source_id, idempotency_key, id,
       CASE WHEN occurred_at < received_at - interval '1 day' THEN received_at
            ELSE least(occurred_at, received_at) END,
       revision_at, revision_rank, coalesce(revised_at, received_at)
  FROM events_unpartitioned;

INSERT INTO events (id, source_id, idempotency_key, external_id, event_type, severity, source_kind,
                    occurred_at, received_at, lat, lon, zone, confidence, measurements, attributes,
                    transport, extra_zones, district, evidence, revision_at, revision_rank,
                    revisions, revised_at, seen_at)
SELECT id, source_id, idempotency_key, external_id, event_type, severity, source_kind,
       occurred_at, received_at, lat, lon, zone, confidence, measurements, attributes,
       transport, extra_zones, district, evidence, revision_at, revision_rank,
       revisions, revised_at,
       CASE WHEN occurred_at < received_at - interval '1 day' THEN received_at
            ELSE least(occurred_at, received_at) END
  FROM events_unpartitioned;

DROP TABLE events_unpartitioned;
ALTER INDEX IF EXISTS events_pkey1 RENAME TO events_pkey;

-- Time ranges for the partitions OCC made, and how far retention has thinned each.
CREATE TABLE event_partitions (
    name       text PRIMARY KEY,
    from_at    timestamptz NOT NULL,
    to_at      timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    -- The retention rules last applied to it (their text), and when.
    retained   text,
    pruned_at  timestamptz,
    CHECK (from_at < to_at)
);

-- Legal holds: events an investigation or a court needs are kept past their retention. A hold
-- covers a time range, optionally only some sources and zones; it holds until released.
CREATE TABLE legal_holds (
    id          uuid PRIMARY KEY,
    case_ref    text NOT NULL CHECK (case_ref <> ''),
    reason      text NOT NULL DEFAULT '',
    from_at     timestamptz NOT NULL,
    to_at       timestamptz NOT NULL,
    sources     text[] NOT NULL DEFAULT '{}',
    zones       text[] NOT NULL DEFAULT '{}',
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL,
    released_by text,
    released_at timestamptz,
    CHECK (from_at < to_at)
);

ALTER TABLE audit_log DROP CONSTRAINT audit_log_entity_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_entity_type_check
    CHECK (entity_type IN ('incident', 'rule', 'unit', 'queue', 'source', 'profile', 'zone',
                           'watchlist', 'dead_letter', 'key', 'legal_hold'));
