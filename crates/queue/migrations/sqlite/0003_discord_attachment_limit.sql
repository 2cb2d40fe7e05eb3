-- The largest attachment, in bytes, Discord lets the interaction's response carry (it says so
-- in every interaction). NULL for deliveries recorded before it was kept, and when Discord
-- did not say: delivery then assumes Discord's default.
ALTER TABLE discord_deliveries ADD COLUMN attachment_size_limit INTEGER;
