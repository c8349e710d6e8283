-- Who read what: every call that returned incidents of the agencies whose reads are recorded
-- (the police's, by default), with the principal, the method and the incidents it saw.
-- Append-only, like the audit log.
CREATE TABLE data_reads (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL,
    principal    text NOT NULL,
    method       text NOT NULL,
    incident_ids uuid[] NOT NULL
);

CREATE INDEX data_reads_at ON data_reads (at);
CREATE INDEX data_reads_incidents ON data_reads USING gin (incident_ids);

CREATE TRIGGER data_reads_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON data_reads
    FOR EACH STATEMENT EXECUTE FUNCTION occ_audit_append_only();
