-- A deployment serves several models and a worker only some of them: each job's model is
-- read from its batch key (`MODEL|WxH|STEPS|SCHEDULER`; model names never hold `|`), and
-- a worker's leases look only at the queued jobs of the models it serves.
ALTER TABLE jobs ADD COLUMN model TEXT
    GENERATED ALWAYS AS (split_part(batch_key, '|', 1)) STORED;
CREATE INDEX jobs_queued_by_model ON jobs (share_key, model, seq) WHERE status = 'queued';

-- A worker reports what it can make of each model it has loaded.
ALTER TABLE worker_capacity DROP CONSTRAINT worker_capacity_pkey;
ALTER TABLE worker_capacity ADD PRIMARY KEY (worker, model);

-- What each job costs a GPU (units of one SD 1.5 step at 512², see ValidImageRequest::cost),
-- summed over the queued and the running jobs for the scaler. Jobs from before count 0.
ALTER TABLE jobs ADD COLUMN cost DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE INDEX jobs_live_cost ON jobs (status) INCLUDE (cost) WHERE status IN ('queued', 'running');

-- A key's own jobs, newest first (GET /v1/jobs).
CREATE INDEX jobs_by_owner_seq ON jobs (owner, seq);
