-- One outbox for every answer a job owes (a Discord interaction, a webhook, ...), written in the
-- same transaction as the job. The queue knows a delivery only as a channel name and a sealed,
-- opaque payload; the delivery task of each channel claims due rows for a while (`claim_id`,
-- `next_attempt_at` pushed past the claim), so any number of processes can work the outbox and
-- each message is sent once.
CREATE TABLE deliveries (
    id              TEXT    PRIMARY KEY,
    job_id          TEXT    NOT NULL,
    channel         TEXT    NOT NULL,
    -- sealed: what the channel needs to answer (a token, a URL)
    payload         TEXT    NOT NULL,
    -- sealed, optional: what the channel last sent (a progress text), to send only changes
    state           TEXT,
    -- pending | delivered | abandoned | dead (could not be opened)
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    -- a pending delivery waiting for its job to change is made due by the change
    -- (no sooner than `not_before`)
    wake_on_change  INTEGER NOT NULL DEFAULT 0,
    not_before      INTEGER NOT NULL DEFAULT 0,
    -- the job changed while the delivery was claimed: waiting for a change is over at once
    job_changed     INTEGER NOT NULL DEFAULT 0,
    claim_id        TEXT,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (status, channel, next_attempt_at);
CREATE INDEX deliveries_by_job ON deliveries (job_id);

-- The Discord-only outbox it replaces. Its tokens were sealed under a column binding only the
-- old Discord code knew; answers pending at the upgrade are not carried over.
DROP TABLE discord_deliveries;

-- Every commit that changes what a client can see of a job (its status, progress, images or
-- error) moves the change counter on and stamps the job with it, in the same transaction. A
-- process follows other processes' commits with one indexed query for `revision > last seen`.
CREATE TABLE job_revision (value INTEGER NOT NULL);
INSERT INTO job_revision (value) VALUES (0);
ALTER TABLE jobs ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_revision ON jobs (revision);

CREATE TRIGGER jobs_revision_on_insert AFTER INSERT ON jobs
BEGIN
    UPDATE job_revision SET value = value + 1;
    UPDATE jobs SET revision = (SELECT value FROM job_revision) WHERE seq = NEW.seq;
END;

CREATE TRIGGER jobs_revision_on_change AFTER UPDATE OF status, progress_step, progress_total,
    images, error_code ON jobs
WHEN OLD.status IS NOT NEW.status
  OR OLD.progress_step IS NOT NEW.progress_step
  OR OLD.progress_total IS NOT NEW.progress_total
  OR OLD.images IS NOT NEW.images
  OR OLD.error_code IS NOT NEW.error_code
BEGIN
    UPDATE job_revision SET value = value + 1;
    UPDATE jobs SET revision = (SELECT value FROM job_revision) WHERE seq = NEW.seq;
    UPDATE deliveries SET job_changed = 1
    WHERE job_id = NEW.id AND status = 'pending' AND claim_id IS NOT NULL;
    -- A final answer goes at once; progress no sooner than the channel asked.
    UPDATE deliveries SET next_attempt_at = MIN(next_attempt_at, CASE
            WHEN NEW.status IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')
            THEN NEW.updated_at ELSE MAX(not_before, NEW.updated_at) END),
        wake_on_change = 0
    WHERE job_id = NEW.id AND status = 'pending' AND wake_on_change = 1 AND claim_id IS NULL;
END;

-- Each API key signs its webhooks with a secret of its own (sealed). After a rotation the
-- previous secret signs too, until `webhook_previous_until`, so receivers can switch over.
ALTER TABLE api_keys ADD COLUMN webhook_secret TEXT;
ALTER TABLE api_keys ADD COLUMN webhook_secret_previous TEXT;
ALTER TABLE api_keys ADD COLUMN webhook_previous_until INTEGER;
