-- Dispatch: claims on queued incidents, units, claim deadlines and escalation, and the change
-- log that feeds live streams.

-- How long an incident may wait in its queue before it is escalated. Copied from its rule (or
-- the default for its priority) when it opens; the deadline is set each time it (re)enters its
-- queue and cleared when it is claimed or escalated.
ALTER TABLE rules
    ADD COLUMN claim_within_seconds integer CHECK (claim_within_seconds > 0);

ALTER TABLE incidents
    ADD COLUMN claim_within_seconds integer NOT NULL DEFAULT 300 CHECK (claim_within_seconds > 0),
    ADD COLUMN claim_deadline       timestamptz,
    ADD COLUMN escalated_at         timestamptz,
    ADD COLUMN acknowledged_at      timestamptz,
    ADD COLUMN acknowledged_by      text;

UPDATE incidents
   SET claim_within_seconds = CASE priority WHEN 1 THEN 60 WHEN 2 THEN 180 WHEN 3 THEN 600 ELSE 1800 END;
UPDATE incidents
   SET claim_deadline = created_at + make_interval(secs => claim_within_seconds)
 WHERE status = 'QUEUED';

-- The escalation sweep, and ClaimNext's "most urgent, then oldest" among waiting incidents.
CREATE INDEX incidents_claim_deadline ON incidents (claim_deadline) WHERE claim_deadline IS NOT NULL;
CREATE INDEX incidents_waiting ON incidents (queue, priority, created_at, id) WHERE status = 'QUEUED';

-- An operator's lease on an incident. At most one active claim per incident; an active claim
-- whose lease has passed is expired by the sweep and the incident goes back to its queue.
CREATE TABLE claims (
    id          uuid PRIMARY KEY,
    incident_id uuid NOT NULL REFERENCES incidents (id),
    holder      text NOT NULL,
    claimed_at  timestamptz NOT NULL,
    lease_until timestamptz NOT NULL,
    ended_at    timestamptz,
    end_reason  text CHECK (end_reason IN ('released', 'expired', 'dispatched', 'transferred',
                                           'dismissed')),
    CHECK ((ended_at IS NULL) = (end_reason IS NULL))
);

CREATE UNIQUE INDEX claims_one_active ON claims (incident_id) WHERE ended_at IS NULL;
CREATE INDEX claims_expiring ON claims (lease_until) WHERE ended_at IS NULL;

-- Responders: a crew or vehicle of an agency, its status and last known position.
CREATE TABLE units (
    id           uuid PRIMARY KEY,
    call_sign    text NOT NULL UNIQUE,
    agency       text NOT NULL,
    home_station text NOT NULL DEFAULT '',
    status       text NOT NULL CHECK (status IN ('AVAILABLE', 'DISPATCHED', 'EN_ROUTE',
                                                 'ON_SCENE', 'OUT_OF_SERVICE')),
    incident_id  uuid REFERENCES incidents (id),
    lat          double precision CHECK (lat BETWEEN -90 AND 90),
    lon          double precision CHECK (lon BETWEEN -180 AND 180),
    location_at  timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    CHECK ((status IN ('DISPATCHED', 'EN_ROUTE', 'ON_SCENE')) = (incident_id IS NOT NULL))
);

CREATE INDEX units_by_agency ON units (agency, status, call_sign);
CREATE INDEX units_by_incident ON units (incident_id) WHERE incident_id IS NOT NULL;

ALTER TABLE audit_log DROP CONSTRAINT audit_log_entity_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_entity_type_check
    CHECK (entity_type IN ('incident', 'rule', 'unit', 'queue'));

-- Queues are configured at run time (DispatchService.PutQueue); their changes are audited.
ALTER TABLE queues ADD COLUMN id uuid NOT NULL UNIQUE DEFAULT gen_random_uuid();

-- Every change to an incident that consoles watch, in commit order. Writers take a
-- transaction-level advisory lock just before appending here, so sequence order is commit
-- order and a reader that has seen sequence N has seen everything before it. NOTIFY is only a
-- wake-up for readers in every OCC instance; this table is the truth.
CREATE TABLE incident_changes (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id uuid NOT NULL,
    -- The queues whose watchers see the change (two for a transfer: from and to).
    queues      text[] NOT NULL,
    kind        text NOT NULL,
    at          timestamptz NOT NULL,
    actor       text NOT NULL,
    detail      text NOT NULL DEFAULT ''
);

CREATE INDEX incident_changes_at ON incident_changes (at);

CREATE FUNCTION occ_notify_incident_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('occ_incident_changes', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER incident_changes_notify
    AFTER INSERT ON incident_changes
    FOR EACH STATEMENT EXECUTE FUNCTION occ_notify_incident_changes();
