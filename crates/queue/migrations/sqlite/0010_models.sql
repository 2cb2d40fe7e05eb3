-- A deployment serves several models and a worker only some of them: each job's model is
-- read from its batch key (`MODEL|WxH|STEPS|SCHEDULER`; model names never hold `|`), and
-- a worker's leases look only at the queued jobs of the models it serves.
ALTER TABLE jobs ADD COLUMN model TEXT
    GENERATED ALWAYS AS (substr(batch_key, 1, instr(batch_key, '|') - 1)) VIRTUAL;
CREATE INDEX jobs_queued_by_model ON jobs (share_key, model, seq) WHERE status = 'queued';

-- A worker reports what it can make of each model it has loaded.
CREATE TABLE worker_capacity_by_model (
    worker      TEXT    NOT NULL,
    model       TEXT    NOT NULL,
    pixels      INTEGER NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (worker, model)
);
INSERT INTO worker_capacity_by_model SELECT worker, model, pixels, reported_at FROM worker_capacity;
DROP TABLE worker_capacity;
ALTER TABLE worker_capacity_by_model RENAME TO worker_capacity;

-- What each job costs a GPU (units of one SD 1.5 step at 512², see ValidImageRequest::cost),
-- summed over the queued and the running jobs for the scaler. Jobs from before count 0.
ALTER TABLE jobs ADD COLUMN cost REAL NOT NULL DEFAULT 0;
CREATE INDEX jobs_cost_by_status ON jobs (status, cost);

-- A key's own jobs, newest first (GET /v1/jobs).
CREATE INDEX jobs_by_owner_seq ON jobs (owner, seq);
