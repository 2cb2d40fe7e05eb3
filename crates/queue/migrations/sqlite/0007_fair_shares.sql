-- Fairness in two levels: a job's share (an API key, or one Discord user) takes its turn
-- round-robin with the other shares; inside a share, its groups (an API key's end users)
-- take turns, FIFO within each. A share or group that starts waiting is stamped after every
-- stamp handed out so far, so a fresh one never jumps ahead of those already waiting.
-- Queued counts per share, per group and in all are kept by triggers in the transaction that
-- changes a job, so leasing, positions and statistics read counters instead of the queue.
ALTER TABLE jobs ADD COLUMN share_key TEXT;
UPDATE jobs SET share_key = group_key;

CREATE TABLE shares (
    name        TEXT    PRIMARY KEY,
    last_served INTEGER NOT NULL DEFAULT 0,
    queued      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO shares (name, last_served) SELECT name, last_served FROM groups;
ALTER TABLE groups ADD COLUMN share TEXT;
ALTER TABLE groups ADD COLUMN queued INTEGER NOT NULL DEFAULT 0;
UPDATE groups SET share = name;

-- One row: queued and running jobs, and the last stamp handed to a share or group.
CREATE TABLE queue_counts (
    queued INTEGER NOT NULL,
    running INTEGER NOT NULL,
    stamp INTEGER NOT NULL
);
INSERT INTO queue_counts (queued, running, stamp) VALUES (0, 0, 0);

CREATE INDEX shares_waiting ON shares (last_served) WHERE queued > 0;
CREATE INDEX groups_waiting ON groups (share, last_served) WHERE queued > 0;
CREATE INDEX jobs_queued_by_share ON jobs (status, share_key, batch_key, seq);
CREATE INDEX jobs_in_order ON jobs (status, seq);
CREATE INDEX jobs_by_finish ON jobs (status, finished_at);

CREATE TRIGGER jobs_counted_on_insert AFTER INSERT ON jobs
BEGIN
    UPDATE queue_counts SET queued = queued + (NEW.status = 'queued'),
        running = running + (NEW.status = 'running');
    UPDATE shares SET queued = queued + 1 WHERE name = NEW.share_key AND NEW.status = 'queued';
    UPDATE groups SET queued = queued + 1 WHERE name = NEW.group_key AND NEW.status = 'queued';
END;

CREATE TRIGGER jobs_counted_on_status AFTER UPDATE OF status ON jobs
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE queue_counts SET
        queued = queued - (OLD.status = 'queued') + (NEW.status = 'queued'),
        running = running - (OLD.status = 'running') + (NEW.status = 'running');
    UPDATE shares SET queued = queued - (OLD.status = 'queued') + (NEW.status = 'queued')
    WHERE name = NEW.share_key;
    UPDATE groups SET queued = queued - (OLD.status = 'queued') + (NEW.status = 'queued')
    WHERE name = NEW.group_key;
END;

CREATE TRIGGER jobs_counted_on_delete AFTER DELETE ON jobs
BEGIN
    UPDATE queue_counts SET queued = queued - (OLD.status = 'queued'),
        running = running - (OLD.status = 'running');
    UPDATE shares SET queued = queued - 1 WHERE name = OLD.share_key AND OLD.status = 'queued';
    UPDATE groups SET queued = queued - 1 WHERE name = OLD.group_key AND OLD.status = 'queued';
END;

-- Counts as they stand (rows written before this migration).
UPDATE shares SET queued = (SELECT COUNT(*) FROM jobs
    WHERE jobs.share_key = shares.name AND jobs.status = 'queued');
UPDATE groups SET queued = (SELECT COUNT(*) FROM jobs
    WHERE jobs.group_key = groups.name AND jobs.status = 'queued');
UPDATE queue_counts SET
    queued = (SELECT COUNT(*) FROM jobs WHERE status = 'queued'),
    running = (SELECT COUNT(*) FROM jobs WHERE status = 'running'),
    stamp = (SELECT COALESCE(MAX(last_served), 0) FROM shares);
