-- The change log without a lock that every writer takes.
--
-- Until now each incident-changing transaction took one cluster-wide advisory lock just before
-- appending here and held it through commit, so sequence order was commit order, and every row
-- NOTIFYed, which takes PostgreSQL's own database-wide notify lock through commit. Together they
-- serialised the commit of every claim, dispatch and ingest batch of every instance.
--
-- Now each row carries the id of the transaction that wrote it. A reader takes a snapshot and
-- reads the rows of transactions committed in it that it has not read yet: every transaction
-- below the snapshot's xmin has ended, so what is below it never changes again, and the few
-- committed above it are remembered by id. Rows of one incident still arrive in commit order:
-- a writer appends after it has locked the incident, so its sequence number is above that of
-- any change to the incident committed before. Readers poll (every 100 ms while someone
-- watches) instead of listening.
ALTER TABLE incident_changes ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX incident_changes_xid ON incident_changes (xid);

DROP TRIGGER incident_changes_notify ON incident_changes;
DROP FUNCTION occ_notify_incident_changes();
