-- Searching a year of events for investigations: the indexes the searches use (each one for a
-- question EventService answers, nothing more), investigators, and searches on the record.
--
-- Every index is on the partitioned table, so every partition (those OCC makes later too) has
-- it. Each ends in seen_at: a search names a time window, and pages newest first by it.

-- A time window alone (types, an area, attribute values, minimum confidence are checked on the
-- rows of the window). seen_at grows with arrival, so inserts append at the index's end.
CREATE INDEX events_by_time ON events (seen_at);
-- One zone, one day: the wall's and the investigator's most common question.
CREATE INDEX events_by_zone ON events (zone, seen_at);
-- What a camera or sensor reported (and what sources around an incident reported).
CREATE INDEX events_by_source ON events (source_id, seen_at);
-- A plate's sightings: only plate reads are in it.
CREATE INDEX events_by_plate ON events ((attributes ->> 'plate_normalized'), seen_at)
    WHERE attributes ? 'plate_normalized';
-- Events also in further zones (a camera's object in overlapping zones): few, so only those.
CREATE INDEX events_by_extra_zone ON events USING gin (extra_zones)
    WHERE extra_zones <> '{}';

ALTER TABLE api_keys DROP CONSTRAINT api_keys_roles_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_roles_check
    CHECK (cardinality(roles) > 0 AND roles <@ ARRAY[
        'gateway', 'dispatcher', 'supervisor', 'integration', 'admin', 'investigator']);

-- A case: the chain of every search made for it (entity id: a UUID v5 of its reference).
ALTER TABLE audit_log DROP CONSTRAINT audit_log_entity_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_entity_type_check
    CHECK (entity_type IN ('incident', 'rule', 'unit', 'queue', 'source', 'profile', 'zone',
                           'watchlist', 'dead_letter', 'key', 'legal_hold', 'case'));

-- The oversight report lists searches by time.
CREATE INDEX audit_log_searches ON audit_log (at) WHERE entity_type = 'case';
