-- API keys: OCC's own credentials for gateways, consoles and agency integrations. Only a
-- SHA-256 of the secret is kept (the secret has 256 random bits: a slow hash adds nothing);
-- the secret itself is shown once, when the key is made.
CREATE TABLE api_keys (
    id                uuid PRIMARY KEY,
    name              text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$'),
    -- The key's first characters, to recognise it in a list without revealing it.
    prefix            text NOT NULL,
    secret_sha256     bytea NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
    roles             text[] NOT NULL CHECK (cardinality(roles) > 0 AND roles <@ ARRAY[
                          'gateway', 'dispatcher', 'supervisor', 'integration', 'admin']),
    -- The queues whose incidents it sees ('*' for all) and the agencies whose queues and units
    -- it works; a gateway's sources (globs, none for any).
    queues            text[] NOT NULL DEFAULT '{}',
    agencies          text[] NOT NULL DEFAULT '{}',
    sources           text[] NOT NULL DEFAULT '{}',
    may_update_status boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    created_by        text NOT NULL,
    expires_at        timestamptz,
    revoked_at        timestamptz,
    revoked_by        text,
    last_used_at      timestamptz
);

-- One active key per name: the name is the key's principal (`key:<name>`) in audit entries
-- and claims.
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;

ALTER TABLE audit_log DROP CONSTRAINT audit_log_entity_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_entity_type_check
    CHECK (entity_type IN ('incident', 'rule', 'unit', 'queue', 'source', 'profile', 'zone',
                           'watchlist', 'dead_letter', 'key'));
