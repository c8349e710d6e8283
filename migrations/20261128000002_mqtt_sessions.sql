-- When the broker's session under each OCC client id began. Packet ids are numbered within a
-- session; a message without a producer id is told from its redelivery by (session, packet id,
-- bytes), so the session must change when the broker starts a new one under the same client
-- id (session expired, broker restarted without its sessions).
CREATE TABLE mqtt_sessions (
    client_id  text PRIMARY KEY,
    started_at timestamptz NOT NULL
);
