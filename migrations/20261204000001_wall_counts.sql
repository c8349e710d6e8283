-- Counts for the operations center's wall: events and incidents per zone and type, per hour and
-- per day, for heat maps and trends, without scanning raw events.
--
-- A committing batch appends what it adds to a delta table, in the same statement that stores
-- its events (one row per hour, zone and type it touched). No row is ever updated there, so
-- batches committing at once on any number of instances never wait on each other. A compaction
-- (one instance at a time, every few seconds) folds the deltas into the hourly and daily counts;
-- a read adds the deltas not folded yet. Counts outlive the events' retention.
--
-- Hours and days are those of the city's time zone, which `occ serve --time-zone` sets here.

CREATE TABLE wall_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    time_zone text NOT NULL
);
INSERT INTO wall_settings (time_zone) VALUES ('UTC');

-- Events first stored (a redelivery or an evolving event's later revision adds nothing), by the
-- hour they happened in (seen_at), their zone ('' for none) and their type.
CREATE TABLE event_count_deltas (
    hour        timestamptz NOT NULL,
    zone        text NOT NULL,
    event_type  text NOT NULL,
    n           bigint NOT NULL
);
CREATE TABLE event_counts_hourly (
    bucket      timestamptz NOT NULL,
    zone        text NOT NULL,
    event_type  text NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (bucket, zone, event_type)
);
CREATE TABLE event_counts_daily (LIKE event_counts_hourly INCLUDING ALL);
-- One zone's trend (the keys above serve a window across zones: a heat map).
CREATE INDEX event_counts_hourly_by_zone ON event_counts_hourly (zone, bucket);
CREATE INDEX event_counts_daily_by_zone ON event_counts_daily (zone, bucket);
-- The same, city-wide: a trend not split by zone reads types × buckets rows, not zones times
-- as many.
CREATE TABLE event_counts_city_hourly (
    bucket      timestamptz NOT NULL,
    event_type  text NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (bucket, event_type)
);
CREATE TABLE event_counts_city_daily (LIKE event_counts_city_hourly INCLUDING ALL);

-- Incidents opened, by the hour they were opened in, their zone ('' for none), category, the
-- queue that opened them and their priority then.
CREATE TABLE incident_count_deltas (
    hour        timestamptz NOT NULL,
    zone        text NOT NULL,
    category    text NOT NULL,
    queue       text NOT NULL,
    priority    smallint NOT NULL,
    n           bigint NOT NULL
);
CREATE TABLE incident_counts_hourly (
    bucket      timestamptz NOT NULL,
    zone        text NOT NULL,
    category    text NOT NULL,
    queue       text NOT NULL,
    priority    smallint NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (bucket, zone, category, queue, priority)
);
CREATE TABLE incident_counts_daily (LIKE incident_counts_hourly INCLUDING ALL);

-- What was stored before the counts existed, counted once; the first compaction folds it in.
INSERT INTO event_count_deltas (hour, zone, event_type, n)
SELECT date_trunc('hour', seen_at, 'UTC'), coalesce(zone, ''), event_type, count(*)
  FROM events
 GROUP BY 1, 2, 3;
INSERT INTO incident_count_deltas (hour, zone, category, queue, priority, n)
SELECT date_trunc('hour', created_at, 'UTC'), coalesce(zone, ''), category, queue, priority,
       count(*)
  FROM incidents
 GROUP BY 1, 2, 3, 4, 5;
