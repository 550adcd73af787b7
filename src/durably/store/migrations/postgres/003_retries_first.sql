-- Claims take due retries before fresh jobs. jobs_waiting now leads with (queue, status), so a
-- claim walks the retrying and the pending jobs of a queue as two ordered ranges of one index,
-- each stopping at the first job not yet due: neither a deep backlog nor 200,000 jobs scheduled
-- ahead is ever sorted or scanned. Rows sit in it only while waiting, as before.
DROP INDEX jobs_waiting;
CREATE INDEX jobs_waiting ON jobs (queue, status, run_at, id) WHERE status IN ('pending', 'retrying');

-- jobs_status (status, id) took an entry on every claim, retry and completion (those updates
-- change indexed columns, so none is HOT) and served no hot-path query. Operators list the
-- statuses that pile up rarely (dead letters, cancelled, resolved, abandoned) among millions of
-- finished jobs: only those enter it now. Waiting and running jobs have their own partial
-- indexes; succeeded jobs are the newest ids, found walking the primary key backwards.
DROP INDEX jobs_status;
CREATE INDEX jobs_status ON jobs (status, id)
    WHERE status IN ('dead_letter', 'resolved', 'abandoned', 'cancelled');
