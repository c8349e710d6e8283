-- ClaimNext walks the waiting incidents' index, never the queue's history.
--
-- Both `incidents_waiting` (the waiting incidents of a queue, in claim order) and
-- `incidents_by_queue` (all of a queue's incidents, in the same order) can answer "the most
-- urgent, then oldest waiting incident of this queue": the second by skipping every incident
-- that is not waiting. PostgreSQL chooses between them by its statistics of `status`, taken when
-- it last analysed the table. Measured: 20,000 incidents analysed while all were waiting, then
-- 3,000 of one queue dispatched, and the claim's plan walked `incidents_by_queue` through the
-- 3,000 (in `occ bench`, 12,000: 25 ms a claim instead of a fraction of one). The dispatched are
-- exactly the most urgent and oldest, so they lie at the head of the walk, and every claim
-- after them reads all of them again: a backlog is worked in quadratic time, in a storm, when
-- it matters most.
--
-- The predicate is written as an expression PostgreSQL keeps no statistics for (`status` is
-- NOT NULL, so it means `status = 'QUEUED'`): the planner then takes the index to hold a small
-- part of the table, whatever `status` looked like at the last ANALYZE, and the claim (which
-- says the same) always walks it.
DROP INDEX incidents_waiting;
CREATE INDEX incidents_waiting ON incidents (queue, priority, created_at, id)
    WHERE coalesce(status, '') = 'QUEUED';
