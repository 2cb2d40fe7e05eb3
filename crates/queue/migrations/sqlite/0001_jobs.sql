-- Jobs: the queue and the record of every request, in one table.
-- `seq` orders jobs FIFO within their group; `groups.last_served` makes leasing fair across groups.
CREATE TABLE jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    owner          TEXT    NOT NULL,
    group_key      TEXT    NOT NULL,
    dedup_key      TEXT,
    request_hash   TEXT    NOT NULL,
    request        TEXT    NOT NULL,
    batch_key      TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    max_attempts   INTEGER NOT NULL,
    lease_id       TEXT,
    lease_owner    TEXT,
    lease_until    INTEGER,
    progress_step  INTEGER,
    progress_total INTEGER,
    images         INTEGER NOT NULL DEFAULT 0,
    error_code     TEXT,
    error_message  TEXT,
    created_at     INTEGER NOT NULL,
    started_at     INTEGER,
    finished_at    INTEGER,
    updated_at     INTEGER NOT NULL
);
CREATE UNIQUE INDEX jobs_dedup ON jobs (owner, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX jobs_by_status_group ON jobs (status, group_key, seq);
CREATE INDEX jobs_by_lease ON jobs (status, lease_until);

CREATE TABLE groups (
    name        TEXT    PRIMARY KEY,
    last_served INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    scopes     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
