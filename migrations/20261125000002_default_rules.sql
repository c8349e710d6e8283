-- A default rule set for a city. Operators change it through RuleService; this migration only
-- seeds it once.
INSERT INTO rules (id, name, description, event_types, source_kinds, zones, min_confidence,
                   thresholds, attributes, category, queue, priority, title_template,
                   correlation_fields, correlation_window_seconds)
VALUES
    (gen_random_uuid(), 'fire-smoke',
     'Smoke, flame or fire detected: fire and rescue, highest priority. Detectors in one zone are one fire.',
     '{smoke.*,fire.*,flame.*}', '{}', '{}', 0.5, '[]', '{}',
     'fire', 'fire', 1, 'Smoke or fire detected in {zone}', '{zone}', 1800),

    (gen_random_uuid(), 'gas-leak',
     'Combustible or toxic gas detected: fire and rescue, highest priority.',
     '{gas.*}', '{}', '{}', 0.5, '[]', '{}',
     'gas_leak', 'fire', 1, 'Gas detected in {zone}', '{zone}', 1800),

    (gen_random_uuid(), 'panic-button',
     'A panic button was pressed: police, highest priority, one incident per button.',
     '{panic.*}', '{}', '{}', NULL, '[]', '{}',
     'panic_alarm', 'police', 1, 'Panic button pressed at {source_id} ({zone})', '{source_id}', 900),

    (gen_random_uuid(), 'gunshot',
     'Acoustic gunshot detection: police, highest priority. Sensors in one zone are one shooting.',
     '{gunshot.*,audio.gunshot}', '{}', '{}', 0.6, '[]', '{}',
     'shots_fired', 'police', 1, 'Possible gunshot in {zone}', '{zone}', 600),

    (gen_random_uuid(), 'restricted-intrusion',
     'A person or intrusion detected inside a restricted zone (zones named restricted_*): police.',
     '{intrusion.*,object.person}', '{}', '{restricted_*}', 0.7, '[]', '{}',
     'intrusion', 'police', 2, 'Intrusion into {zone}', '{zone}', 900),

    (gen_random_uuid(), 'watchlisted-plate',
     'A licence plate on a watch list was read: police. One incident per plate.',
     '{vehicle.plate}', '{}', '{}', NULL, '[]', '{"watchlisted": true}',
     'watchlisted_vehicle', 'police', 2, 'Watch-listed vehicle {attribute.plate} seen in {zone}',
     '{attribute.plate}', 1800),

    (gen_random_uuid(), 'flood-water-level',
     'River or drain level at or above 300 cm: utilities, flood watch.',
     '{water.level}', '{}', '{}', NULL,
     '[{"measurement": "water_level_cm", "comparison": ">=", "value": 300}]', '{}',
     'flood', 'utilities', 2, 'Water level {measurement.water_level_cm} cm at {zone}', '{zone}', 3600),

    (gen_random_uuid(), 'air-quality-pm25',
     'PM2.5 above 55.4 µg/m³ (unhealthy on the US EPA AQI scale): environmental protection.',
     '{air.quality}', '{}', '{}', NULL,
     '[{"measurement": "pm2_5", "comparison": ">", "value": 55.4}]', '{}',
     'air_quality', 'environment', 3, 'PM2.5 at {measurement.pm2_5} µg/m³ in {zone}', '{zone}', 3600),

    (gen_random_uuid(), 'medical-alarm',
     'A medical or fall alarm (personal alarm, public defibrillator cabinet): EMS, highest priority.',
     '{medical.*}', '{}', '{}', NULL, '[]', '{}',
     'medical', 'ems', 1, 'Medical alarm at {source_id} ({zone})', '{source_id}', 900);
