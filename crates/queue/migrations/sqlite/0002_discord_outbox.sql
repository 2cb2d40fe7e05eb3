-- The Discord outbox: one row per job that answers a Discord interaction. The delivery task
-- works it: progress edits while the job runs, then the result, retried on its own schedule.
CREATE TABLE discord_deliveries (
    job_id           TEXT    PRIMARY KEY,
    application_id   TEXT    NOT NULL,
    token            TEXT    NOT NULL,
    channel_id       TEXT,
    created_at       INTEGER NOT NULL,
    token_expires_at INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    last_progress    TEXT,
    last_edit_at     INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    error            TEXT
);
CREATE INDEX discord_deliveries_due ON discord_deliveries (state, next_attempt_at);
