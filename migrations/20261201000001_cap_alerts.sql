-- What OCC has published about each incident to the public-warning system's CAP topic: the first
-- alert (which every update and cancel references), what the last message said, and whether it
-- closed the matter. Written after the broker acknowledged the message, so an instance that
-- takes over publishing after a crash says again what may not have gone out (the same
-- identifier: a CAP receiver takes it as the same message) and never skips a change.
CREATE TABLE cap_alerts (
    incident_id      uuid PRIMARY KEY REFERENCES incidents (id),
    first_identifier text NOT NULL,
    first_sent       timestamptz NOT NULL,
    signature        text NOT NULL,
    ended            boolean NOT NULL,
    last_identifier  text NOT NULL,
    last_msg_type    text NOT NULL CHECK (last_msg_type IN ('Alert', 'Update', 'Cancel')),
    published_at     timestamptz NOT NULL
);

-- Alerts still in force: looked at when an instance takes over publishing.
CREATE INDEX cap_alerts_in_force ON cap_alerts (incident_id) WHERE NOT ended;
