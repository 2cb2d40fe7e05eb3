-- A failed attempt that may be retried waits before its next lease (`retry_wait` until
-- `available_at`), backing off with each attempt, so a short outage does not spend every
-- attempt at once. Clients see such a job as queued.
ALTER TABLE jobs ADD COLUMN available_at INTEGER;
CREATE INDEX jobs_retry_due ON jobs (status, available_at);

-- The attempt whose images the job completed with: images are stored under their attempt,
-- so an attempt that lost its lease cannot overwrite them. NULL for jobs completed before.
ALTER TABLE jobs ADD COLUMN images_attempt INTEGER;

-- Why an attempt failed, in detail (sealed): for operators; clients see the code and a
-- message that names no server path or internal error.
ALTER TABLE jobs ADD COLUMN error_detail TEXT;

-- Leases are counted on the host's monotonic clock, which no wall-clock jump moves and which
-- starts again at each boot. Each boot's readings are shifted by an offset past every lease
-- written before it (so a lease from before a reboot has expired); leases written on the
-- wall clock before this migration are all behind the first offset, so they expire too.
CREATE TABLE lease_epochs (
    boot_id   TEXT    PRIMARY KEY,
    offset_ms INTEGER NOT NULL
);

-- A position sums over the waiting shares (and the waiting groups of one share) their queued
-- jobs and stamps: indexes that hold both answer it without reading the tables. They replace
-- the indexes of the waiting by stamp alone, which they also serve.
DROP INDEX shares_waiting;
DROP INDEX groups_waiting;
CREATE INDEX shares_waiting_counts ON shares (last_served, queued, name) WHERE queued > 0;
CREATE INDEX groups_waiting_counts ON groups (share, last_served, queued, name) WHERE queued > 0;

-- What each worker can make: the largest image in pixels for its model and device, reported
-- when it starts. Requests larger than any worker of the last week can make are refused at
-- submit.
CREATE TABLE worker_capacity (
    worker      TEXT    PRIMARY KEY,
    model       TEXT    NOT NULL,
    pixels      INTEGER NOT NULL,
    reported_at INTEGER NOT NULL
);

-- How many shares are waiting, kept by triggers: the position of a job whose share is at
-- the back of the round-robin (as every newly waiting one is) is read from it, not counted.
ALTER TABLE queue_counts ADD COLUMN waiting_shares INTEGER NOT NULL DEFAULT 0;
UPDATE queue_counts SET waiting_shares = (SELECT COUNT(*) FROM shares WHERE queued > 0);

CREATE TRIGGER shares_waiting_on_insert AFTER INSERT ON shares WHEN NEW.queued > 0
BEGIN
    UPDATE queue_counts SET waiting_shares = waiting_shares + 1;
END;

CREATE TRIGGER shares_waiting_on_update AFTER UPDATE OF queued ON shares
WHEN (OLD.queued > 0) != (NEW.queued > 0)
BEGIN
    UPDATE queue_counts SET waiting_shares = waiting_shares + (NEW.queued > 0) - (OLD.queued > 0);
END;

CREATE TRIGGER shares_waiting_on_delete AFTER DELETE ON shares WHEN OLD.queued > 0
BEGIN
    UPDATE queue_counts SET waiting_shares = waiting_shares - 1;
END;
