-- Each API key row carries a MAC under the keyring over what it grants (id, name, secret
-- hash, scopes, creation, revocation): a row written past the service does not authenticate.
ALTER TABLE api_keys ADD COLUMN row_tag TEXT;
