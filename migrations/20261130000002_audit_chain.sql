-- A tamper-evident audit log. Every entry is a link in its entity's chain (one chain per
-- incident, rule, unit, key...): its hash covers the previous link's hash, its position in the
-- chain and every field. Chains are independent, so appending locks only the entity's head,
-- never the whole log. Periodic anchors (below) hash every head that moved since the last
-- anchor into a chain of their own, so removing a chain's newest entries is detected too.

-- The fields of an entry as hashed, in one canonical text: times in UTC with microseconds,
-- jsonb in PostgreSQL's own normalised rendering, fields separated by U+001F. `occ audit
-- verify` recomputes the same text outside the database.
CREATE FUNCTION occ_audit_digest(prev bytea, chain_position bigint, entity_type text,
                                 entity_id uuid, at timestamptz, actor text, action text,
                                 before jsonb, after jsonb, detail text)
RETURNS bytea LANGUAGE sql STABLE AS $$
    SELECT sha256(coalesce(prev, ''::bytea) || convert_to(concat_ws(chr(31),
        chain_position::text, entity_type, entity_id::text,
        to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        actor, action, coalesce(before::text, ''), coalesce(after::text, ''), detail), 'UTF8'))
$$;

-- Each chain's newest link.
CREATE TABLE audit_heads (
    entity_type       text NOT NULL,
    entity_id         uuid NOT NULL,
    chain_position    bigint NOT NULL,
    hash              bytea NOT NULL,
    -- The position the latest anchor covers.
    anchored_position bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (entity_type, entity_id)
);

ALTER TABLE audit_log
    ADD COLUMN chain_position bigint,
    ADD COLUMN hash bytea;

-- Entries written before the chain: linked in the order they were written.
DO $$
DECLARE
    r record;
    prev bytea;
    n bigint;
    last_type text := NULL;
    last_id uuid := NULL;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY entity_type, entity_id, id LOOP
        IF last_type IS DISTINCT FROM r.entity_type OR last_id IS DISTINCT FROM r.entity_id THEN
            IF last_type IS NOT NULL THEN
                INSERT INTO audit_heads VALUES (last_type, last_id, n, prev);
            END IF;
            prev := NULL;
            n := 0;
            last_type := r.entity_type;
            last_id := r.entity_id;
        END IF;
        n := n + 1;
        prev := occ_audit_digest(prev, n, r.entity_type, r.entity_id, r.at, r.actor, r.action,
                                 r.before, r.after, r.detail);
        UPDATE audit_log SET chain_position = n, hash = prev WHERE id = r.id;
    END LOOP;
    IF last_type IS NOT NULL THEN
        INSERT INTO audit_heads VALUES (last_type, last_id, n, prev);
    END IF;
END
$$;

ALTER TABLE audit_log
    ALTER COLUMN chain_position SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL;

CREATE UNIQUE INDEX audit_log_chain ON audit_log (entity_type, entity_id, chain_position);

-- Links every new entry, whoever writes it: one statement on the entity's head row, which is
-- also what serialises two transactions appending to the same entity.
CREATE FUNCTION occ_audit_link() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_heads AS h (entity_type, entity_id, chain_position, hash)
    VALUES (NEW.entity_type, NEW.entity_id, 1,
            occ_audit_digest(NULL, 1, NEW.entity_type, NEW.entity_id, NEW.at, NEW.actor,
                             NEW.action, NEW.before, NEW.after, NEW.detail))
    ON CONFLICT (entity_type, entity_id) DO UPDATE
       SET chain_position = h.chain_position + 1,
           hash = occ_audit_digest(h.hash, h.chain_position + 1, NEW.entity_type,
                                   NEW.entity_id, NEW.at, NEW.actor, NEW.action, NEW.before,
                                   NEW.after, NEW.detail)
    RETURNING chain_position, hash INTO NEW.chain_position, NEW.hash;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_link BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION occ_audit_link();

-- The log is append-only. This stops mistakes, not an owner who disables triggers: that is
-- what the chain and `occ audit verify` are for.
CREATE FUNCTION occ_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION occ_audit_append_only();

-- Anchors: every few minutes, the heads that moved since the last anchor, hashed into a chain
-- of anchors. Each anchor's hash is also logged by the instance that wrote it, so a copy lives
-- outside the database.
CREATE TABLE audit_anchors (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL,
    -- [[entity_type, entity_id, chain_position, hash as hex], ...], in (type, id) order.
    heads     jsonb NOT NULL,
    prev_hash bytea,
    hash      bytea NOT NULL
);

CREATE TRIGGER audit_anchors_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION occ_audit_append_only();
