-- The queue and its metadata on PostgreSQL: the same tables, counters and turns as the
-- embedded backend, arranged so that any number of processes can lease, submit and deliver
-- at once.
--
-- Locks are taken in one order so that no two transactions wait on each other: claimers
-- take share, group and job rows with SKIP LOCKED (they never wait on a row); submitters take
-- advisory locks on what their limits count, then share and group rows in sorted order; the
-- one row every commit that changes a job touches (`queue_state`: the change counter and the
-- queue's counts) is taken last, by deferred triggers, at commit. Its row lock is what puts
-- revisions in commit order.

-- The database's clock in milliseconds: leases of every host are counted on it.
CREATE FUNCTION sparkle_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

CREATE TABLE jobs (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             TEXT   NOT NULL UNIQUE,
    owner          TEXT   NOT NULL,
    -- blind indexes of the share and group; the group also sealed, to be read back
    share_key      TEXT   NOT NULL,
    group_key      TEXT   NOT NULL,
    group_sealed   TEXT   NOT NULL,
    dedup_key      TEXT,
    request_hash   TEXT   NOT NULL,
    -- sealed
    request        TEXT   NOT NULL,
    batch_key      TEXT   NOT NULL,
    -- queued | retry_wait | running | succeeded | failed | cancelled | dead_lettered
    status         TEXT   NOT NULL,
    attempts       BIGINT NOT NULL DEFAULT 0,
    max_attempts   BIGINT NOT NULL,
    lease_id       TEXT,
    lease_owner    TEXT,
    -- on the lease clock (`sparkle_now_ms()`)
    lease_until    BIGINT,
    progress_step  BIGINT,
    progress_total BIGINT,
    images         BIGINT NOT NULL DEFAULT 0,
    images_attempt BIGINT,
    error_code     TEXT,
    error_message  TEXT,
    -- sealed
    error_detail   TEXT,
    available_at   BIGINT,
    created_at     BIGINT NOT NULL,
    started_at     BIGINT,
    finished_at    BIGINT,
    updated_at     BIGINT NOT NULL,
    revision       BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_dedup ON jobs (owner, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX jobs_queued_in_group ON jobs (group_key, seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_by_share ON jobs (share_key, batch_key, seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_in_order ON jobs (seq) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_retry_due ON jobs (available_at) WHERE status = 'retry_wait';
CREATE INDEX jobs_live_by_owner ON jobs (owner)
    WHERE status IN ('queued', 'retry_wait', 'running');
CREATE INDEX jobs_live_by_group ON jobs (group_key)
    WHERE status IN ('queued', 'retry_wait', 'running');
CREATE INDEX jobs_by_revision ON jobs (revision);
CREATE INDEX jobs_finished ON jobs (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled', 'dead_lettered');
CREATE INDEX jobs_succeeded ON jobs (finished_at) WHERE status = 'succeeded';

-- Turns: every turn taken and every share or group that starts waiting is stamped with the
-- next value; the waiting one with the oldest stamp goes next.
CREATE SEQUENCE turn_stamps;

CREATE TABLE shares (
    name        TEXT   PRIMARY KEY,
    last_served BIGINT NOT NULL,
    queued      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX shares_waiting ON shares (last_served) INCLUDE (queued) WHERE queued > 0;

CREATE TABLE groups (
    name        TEXT   PRIMARY KEY,
    share       TEXT   NOT NULL,
    last_served BIGINT NOT NULL,
    queued      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX groups_waiting ON groups (share, last_served) INCLUDE (queued) WHERE queued > 0;

-- One row: the change counter and the queue's counts.
CREATE TABLE queue_state (
    one      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    revision BIGINT  NOT NULL,
    queued   BIGINT  NOT NULL,
    running  BIGINT  NOT NULL
);
INSERT INTO queue_state (revision, queued, running) VALUES (0, 0, 0);

CREATE TABLE api_keys (
    id                      TEXT   PRIMARY KEY,
    name                    TEXT   NOT NULL,
    hash                    TEXT   NOT NULL UNIQUE,
    scopes                  TEXT   NOT NULL,
    created_at              BIGINT NOT NULL,
    revoked_at              BIGINT,
    -- sealed
    webhook_secret          TEXT,
    webhook_secret_previous TEXT,
    webhook_previous_until  BIGINT
);

-- The outbox (see the embedded backend's migrations for the meaning of each column).
CREATE TABLE deliveries (
    id              TEXT    PRIMARY KEY,
    job_id          TEXT    NOT NULL,
    channel         TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    state           TEXT,
    status          TEXT    NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    wake_on_change  BOOLEAN NOT NULL DEFAULT FALSE,
    not_before      BIGINT  NOT NULL DEFAULT 0,
    job_changed     BOOLEAN NOT NULL DEFAULT FALSE,
    claim_id        TEXT,
    last_error      TEXT,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (channel, next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_by_job ON deliveries (job_id);

CREATE TABLE worker_capacity (
    worker      TEXT   PRIMARY KEY,
    model       TEXT   NOT NULL,
    pixels      BIGINT NOT NULL,
    reported_at BIGINT NOT NULL
);

-- Leases counted on each host's own monotonic clock (`lease_clock = local`, one host only).
CREATE TABLE lease_epochs (
    boot_id   TEXT   PRIMARY KEY,
    offset_ms BIGINT NOT NULL
);

-- Queued counts of shares and groups, kept in the statement that changes a job: the rows
-- are those the statement's transaction already holds or takes in order.
CREATE FUNCTION jobs_count_turns() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_queued INTEGER := 0;
    is_queued  INTEGER := 0;
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status = 'queued' THEN was_queued := 1; END IF;
    IF TG_OP <> 'DELETE' AND NEW.status = 'queued' THEN is_queued := 1; END IF;
    IF is_queued <> was_queued THEN
        IF TG_OP = 'DELETE' THEN
            UPDATE shares SET queued = queued - 1 WHERE name = OLD.share_key;
            UPDATE groups SET queued = queued - 1 WHERE name = OLD.group_key;
        ELSE
            UPDATE shares SET queued = queued + is_queued - was_queued WHERE name = NEW.share_key;
            UPDATE groups SET queued = queued + is_queued - was_queued WHERE name = NEW.group_key;
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_count_turns_on_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_turns();
CREATE TRIGGER jobs_count_turns_on_status AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION jobs_count_turns();
CREATE TRIGGER jobs_count_turns_on_delete AFTER DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_turns();

-- A visible change of a job (its status, progress, images or error) wakes the deliveries
-- waiting on it, in the same statement.
CREATE FUNCTION jobs_wake_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE deliveries SET job_changed = TRUE
    WHERE job_id = NEW.id AND status = 'pending' AND claim_id IS NOT NULL;
    UPDATE deliveries SET next_attempt_at = LEAST(next_attempt_at, CASE
            WHEN NEW.status IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')
            THEN NEW.updated_at ELSE GREATEST(not_before, NEW.updated_at) END),
        wake_on_change = FALSE
    WHERE job_id = NEW.id AND status = 'pending' AND wake_on_change AND claim_id IS NULL;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_wake_deliveries AFTER UPDATE OF status, progress_step, progress_total,
    images, error_code ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
        OR OLD.progress_step IS DISTINCT FROM NEW.progress_step
        OR OLD.progress_total IS DISTINCT FROM NEW.progress_total
        OR OLD.images IS DISTINCT FROM NEW.images
        OR OLD.error_code IS DISTINCT FROM NEW.error_code)
    EXECUTE FUNCTION jobs_wake_deliveries();

-- At commit: the queue's counts, the change counter (the job is stamped with its new value)
-- and the notifications that wake workers and event watchers.
CREATE FUNCTION jobs_commit_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_queued  BIGINT := 0;
    d_running BIGINT := 0;
    moved     BOOLEAN := TG_OP <> 'DELETE';
    stamped   BIGINT;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        d_queued := d_queued - (OLD.status = 'queued')::INTEGER;
        d_running := d_running - (OLD.status = 'running')::INTEGER;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        d_queued := d_queued + (NEW.status = 'queued')::INTEGER;
        d_running := d_running + (NEW.status = 'running')::INTEGER;
    END IF;
    UPDATE queue_state SET
        revision = revision + moved::INTEGER,
        queued = queued + d_queued,
        running = running + d_running
    RETURNING revision INTO stamped;
    IF moved THEN
        UPDATE jobs SET revision = stamped WHERE seq = NEW.seq;
        PERFORM pg_notify('sparkle_changes', '');
        IF NEW.status = 'queued' THEN
            PERFORM pg_notify('sparkle_work', '');
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER jobs_commit_insert AFTER INSERT ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jobs_commit_change();
CREATE CONSTRAINT TRIGGER jobs_commit_update AFTER UPDATE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
        OR OLD.progress_step IS DISTINCT FROM NEW.progress_step
        OR OLD.progress_total IS DISTINCT FROM NEW.progress_total
        OR OLD.images IS DISTINCT FROM NEW.images
        OR OLD.error_code IS DISTINCT FROM NEW.error_code)
    EXECUTE FUNCTION jobs_commit_change();
CREATE CONSTRAINT TRIGGER jobs_commit_delete AFTER DELETE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jobs_commit_change();
