-- API keys (issue 6): who may call the HTTP API, with which role. `token_hash` is the
-- SHA-256 (hex) of the key's token; the token itself is never stored. A signed key's
-- `secret` is stored as given: verifying an HMAC needs it.
CREATE TABLE api_keys (
    key_id      INTEGER PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    role        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    secret      TEXT,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
