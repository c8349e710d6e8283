-- OCC's spine: events and dead letters, rules, incidents, their links and the audit log.

-- Dispatch queues, one per agency or discipline. Rules and incidents name one.
CREATE TABLE queues (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,64}$'),
    display_name text NOT NULL,
    agency       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO queues (name, display_name, agency) VALUES
    ('fire',        'Fire and rescue',            'fire'),
    ('ems',         'Emergency medical services', 'ems'),
    ('police',      'Police',                     'police'),
    ('utilities',   'Utilities (water, power)',   'utilities'),
    ('environment', 'Environmental protection',   'environment'),
    ('municipal',   'Municipal services',         'municipal');

-- Every accepted event, exactly once per (source, idempotency key): a redelivered message
-- conflicts here and changes nothing.
CREATE TABLE events (
    id              uuid PRIMARY KEY,
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
    transport       text NOT NULL CHECK (transport IN ('mqtt', 'grpc')),
    CONSTRAINT events_idempotency UNIQUE (source_id, idempotency_key)
);

CREATE INDEX events_received_at ON events (received_at);

-- What could not be decoded or validated: kept with its topic, bytes and the reason, so it can
-- be inspected and replayed. Never silently dropped. Like events, a redelivered message is
-- recognised (same transport, topic and content) and changes nothing.
CREATE TABLE dead_letters (
    id             uuid PRIMARY KEY,
    received_at    timestamptz NOT NULL,
    transport      text NOT NULL CHECK (transport IN ('mqtt', 'grpc')),
    topic          text NOT NULL,
    payload        bytea NOT NULL,
    -- The size received; `payload` holds at most the payload limit of an oversize message.
    payload_size   integer NOT NULL,
    -- SHA-256 of the whole payload as received.
    payload_sha256 bytea NOT NULL,
    reason         text NOT NULL,
    CONSTRAINT dead_letters_idempotency UNIQUE (transport, topic, payload_sha256)
);

CREATE INDEX dead_letters_received_at ON dead_letters (received_at);

-- Rules turn events into incidents. Evaluated in memory; every OCC instance reloads them when
-- this table changes (NOTIFY below, plus a periodic reload in case a notification is missed).
CREATE TABLE rules (
    id                         uuid PRIMARY KEY,
    name                       text NOT NULL UNIQUE,
    description                text NOT NULL DEFAULT '',
    enabled                    boolean NOT NULL DEFAULT true,
    event_types                text[] NOT NULL,
    source_kinds               text[] NOT NULL DEFAULT '{}',
    zones                      text[] NOT NULL DEFAULT '{}',
    min_confidence             double precision,
    min_severity               text,
    -- [{"measurement": "pm2_5", "comparison": ">", "value": 55.4}]
    thresholds                 jsonb NOT NULL DEFAULT '[]',
    -- {"watchlisted": true}: attributes that must have exactly these values.
    attributes                 jsonb NOT NULL DEFAULT '{}',
    category                   text NOT NULL,
    queue                      text NOT NULL REFERENCES queues (name),
    priority                   smallint NOT NULL CHECK (priority BETWEEN 1 AND 4),
    title_template             text NOT NULL,
    correlation_fields         text[] NOT NULL DEFAULT '{}',
    correlation_window_seconds integer NOT NULL CHECK (correlation_window_seconds >= 0),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION occ_notify_rules_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('occ_rules_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER rules_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rules
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_rules_changed();

-- Incident numbers (INC-2026-000123) come from one sequence shared by all instances: unique
-- and increasing, not gapless (a rolled-back transaction uses a number up).
CREATE SEQUENCE incident_number_seq;

CREATE TABLE incidents (
    id              uuid PRIMARY KEY,
    number          text NOT NULL UNIQUE,
    category        text NOT NULL,
    queue           text NOT NULL REFERENCES queues (name),
    priority        smallint NOT NULL CHECK (priority BETWEEN 1 AND 4),
    status          text NOT NULL CHECK (status IN ('NEW', 'QUEUED', 'CLAIMED', 'DISPATCHED',
                        'EN_ROUTE', 'ON_SCENE', 'RESOLVED', 'CLOSED', 'DISMISSED')),
    title           text NOT NULL,
    lat             double precision,
    lon             double precision,
    zone            text,
    correlation_key text NOT NULL,
    -- Whether new events with this key still join this incident. At most one incident per key
    -- correlates (index below): two instances that see related events at the same moment
    -- cannot both open an incident.
    correlating     boolean NOT NULL DEFAULT true,
    -- The rule that opened it. Not a foreign key: an instance may still evaluate a rule for a
    -- moment after another instance deleted it, and its incidents must still be stored.
    rule_id         uuid,
    rule_name       text NOT NULL,
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    event_count     integer NOT NULL CHECK (event_count > 0),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    CHECK (NOT correlating OR status NOT IN ('RESOLVED', 'CLOSED', 'DISMISSED'))
);

CREATE UNIQUE INDEX incidents_correlating_key ON incidents (correlation_key) WHERE correlating;
-- Listing order everywhere: most urgent first, then oldest first.
CREATE INDEX incidents_by_urgency ON incidents (priority, created_at, id);
CREATE INDEX incidents_by_queue ON incidents (queue, priority, created_at, id);

CREATE TABLE incident_events (
    incident_id uuid NOT NULL REFERENCES incidents (id),
    event_id    uuid NOT NULL REFERENCES events (id),
    rule_id     uuid,
    linked_at   timestamptz NOT NULL,
    PRIMARY KEY (incident_id, event_id)
);

CREATE INDEX incident_events_by_event ON incident_events (event_id);

-- Append-only record of every change to an incident or a rule: who, what, when, before and
-- after. Written in the same transaction as the change.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type text NOT NULL CHECK (entity_type IN ('incident', 'rule')),
    entity_id   uuid NOT NULL,
    at          timestamptz NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    before      jsonb,
    after       jsonb,
    detail      text NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_by_entity ON audit_log (entity_type, entity_id, at, id);
