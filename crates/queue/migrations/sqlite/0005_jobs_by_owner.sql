-- Counting an API key's live jobs (its quota) at every submit.
CREATE INDEX jobs_by_owner_status ON jobs (owner, status);
