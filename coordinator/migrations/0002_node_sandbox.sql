-- What each node's runs are protected by (JSON of lull_shared::Protections) and how they run.
ALTER TABLE nodes ADD COLUMN sandbox TEXT;
ALTER TABLE nodes ADD COLUMN executor TEXT;
