-- Browser sessions: an API key exchanged for a short-lived secret kept in an HttpOnly
-- cookie. Only the secret's SHA-256 is stored; a session ends at its expiry, at sign-out, or
-- with its key (revoked or deleted). Each row carries a MAC under the keyring over what it
-- grants (the hash, the key, the times): a row written or altered past the service is refused.
CREATE TABLE sessions (
    hash       TEXT    PRIMARY KEY,
    key_id     TEXT    NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    row_tag    TEXT    NOT NULL
);
CREATE INDEX sessions_by_key ON sessions (key_id, created_at);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
