-- Ingest slots: the MQTT client ids under which OCC's instances read from the broker. The
-- broker keeps a session, and the messages queued for it, under each; a slot is held by one
-- live instance at a time (a lease renewed every second), and when its holder stops or dies a
-- live instance takes it over and resumes the session, so no message is stranded in a session
-- nobody will resume.
CREATE TABLE ingest_slots (
    client_id     text PRIMARY KEY,
    holder        uuid,
    holder_name   text,
    -- PostgreSQL's clock, the one clock every instance shares.
    lease_until   timestamptz,
    -- What the slot's session is subscribed to, as far as OCC knows: filters it no longer
    -- wants (a plain subscription become shared, a share group renamed) are unsubscribed.
    subscriptions text[] NOT NULL DEFAULT '{}',
    -- No longer configured (the number of slots was lowered): whoever takes it drains its
    -- session, ends it on the broker and deletes the slot.
    retiring      boolean NOT NULL DEFAULT false,
    CHECK ((holder IS NULL) = (lease_until IS NULL))
);

-- Instances alive, for sharing the slots out evenly.
CREATE TABLE ingest_instances (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    seen_until timestamptz NOT NULL
);
