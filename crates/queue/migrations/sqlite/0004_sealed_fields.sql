-- Sensitive fields are sealed by the application from here on: `jobs.request` holds the
-- sealed request, `jobs.group_key`, `jobs.dedup_key`, `jobs.request_hash` and `groups.name`
-- hold blind indexes (keyed hashes), and `group_sealed` the sealed group so that a job's
-- group can still be read back. `discord_deliveries.token` and `last_progress` are sealed.
-- Rows written before this migration are sealed when the queue next opens the file.
ALTER TABLE jobs ADD COLUMN group_sealed TEXT;

-- Present until the queue has sealed the rows written before this migration.
CREATE TABLE plain_rows_pending (since INTEGER NOT NULL);
INSERT INTO plain_rows_pending (since) VALUES (0);
