-- Claims take due retries before fresh jobs. One partial index per waiting status lets each group
-- be read as an ordered index walk that stops at the first job not yet due, however deep the
-- backlog of future jobs. The rowid (id) ends every index entry, so (queue, run_at) already
-- orders ties by id.
DROP INDEX jobs_waiting;
CREATE INDEX jobs_retrying ON jobs (queue, run_at) WHERE status = 'retrying';
CREATE INDEX jobs_pending ON jobs (queue, run_at) WHERE status = 'pending';
