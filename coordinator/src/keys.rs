//! API keys: roles, modes, token generation and hashing, and which role may call what.
//!
//! Pure rules, no I/O: the store keeps [`ApiKey`]s, the HTTP edge asks [`Access::of`] and
//! [`Role::may`].

use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// How far a signed request's `timestamp` may be from our clock, in milliseconds.
pub const TIMESTAMP_WINDOW_MS: i64 = 300_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("unknown role {0:?} (admin, submitter, agent or viewer)")]
    Role(String),
    #[error("unknown mode {0:?} (simple or signed)")]
    Mode(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Submitter,
    Agent,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role may make a request needing `access`.
    pub fn may(self, access: Access) -> bool {
        matches!(
            (self, access),
            (_, Access::Open)
                | (Role::Admin, _)
                | (Role::Submitter, Access::Task | Access::Read)
                | (Role::Agent, Access::Agent)
                | (Role::Viewer, Access::Read)
        )
    }

    /// What this role may do, for a 403's detail.
    pub fn allows(self) -> &'static str {
        match self {
            Role::Admin => "everything",
            Role::Submitter => {
                "submit, cancel and read tasks, change their points, and make GET reads (not /internal/* or /api/v1/keys)"
            }
            Role::Agent => "only the agent endpoints (/internal/*, /get_task, /submit_result)",
            Role::Viewer => "only GET reads and the live feed /ws/updates",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Role {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Role, KeyError> {
        match s {
            "admin" => Ok(Role::Admin),
            "submitter" => Ok(Role::Submitter),
            "agent" => Ok(Role::Agent),
            "viewer" => Ok(Role::Viewer),
            other => Err(KeyError::Role(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// The token alone authenticates.
    Simple,
    /// The token names the key; every request also carries `timestamp` and `sign_str`.
    Signed,
}

impl KeyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Simple => "simple",
            KeyMode::Signed => "signed",
        }
    }
}

impl fmt::Display for KeyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for KeyMode {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<KeyMode, KeyError> {
        match s {
            "simple" => Ok(KeyMode::Simple),
            "signed" => Ok(KeyMode::Signed),
            other => Err(KeyError::Mode(other.to_string())),
        }
    }
}

/// A stored key. Never holds the token; a signed key holds its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub key_id: i64,
    pub name: String,
    pub role: Role,
    pub mode: KeyMode,
    pub token_hash: String,
    pub secret: Option<String>,
    pub created_at: f64,
    pub revoked_at: Option<f64>,
}

/// A key about to be stored, with the credentials to show its owner once.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
    pub mode: KeyMode,
    pub token: String,
    pub secret: Option<String>,
}

impl NewKey {
    /// Fresh random credentials for a key.
    pub fn generate(name: &str, role: Role, mode: KeyMode) -> NewKey {
        NewKey {
            name: name.to_string(),
            role,
            mode,
            token: format!("lull_{}", hex::encode(rand::random::<[u8; 20]>())),
            secret: match mode {
                KeyMode::Simple => None,
                KeyMode::Signed => Some(hex::encode(rand::random::<[u8; 32]>())),
            },
        }
    }

    pub fn token_hash(&self) -> String {
        hash_token(&self.token)
    }
}

/// SHA-256 of a token, lowercase hex: what the store keeps and looks keys up by.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What a request needs, by method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `/`, `/health` and the console's static shells (`GET /ui...` but `/ui/part/...`):
    /// no credentials. The shells hold no data; the console's data comes from `/ui/part/*`
    /// and the API, with the key attached by its script.
    Open,
    /// GET reads and the live feed.
    Read,
    /// Submitting and cancelling tasks.
    Task,
    /// The agent protocol.
    Agent,
    /// Everything else (keys, node management).
    Admin,
}

impl Access {
    pub fn of(method: &str, path: &str) -> Access {
        let path = match path.len() > 1 {
            true => path.trim_end_matches('/'),
            false => path,
        };
        let get = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
        if path == "/" || path == "/health" {
            return Access::Open;
        }
        let console = path == "/ui" || path.starts_with("/ui/");
        if get && console && !path.starts_with("/ui/part/") {
            return Access::Open;
        }
        if path.starts_with("/internal/") || path == "/get_task" || path == "/submit_result" {
            return Access::Agent;
        }
        if path == "/api/v1/keys" || path.starts_with("/api/v1/keys/") {
            return Access::Admin;
        }
        if get {
            return Access::Read;
        }
        let post = method.eq_ignore_ascii_case("POST");
        let cancel = path
            .strip_prefix("/api/v1/tasks/")
            .is_some_and(|rest| rest.ends_with("/cancel") && rest.matches('/').count() == 1);
        let submit = path == "/submit" || path == "/api/v1/tasks" || path == "/api/v1/tasks/batch";
        let change_points = path == "/api/deployment/task/change_points";
        if post && (submit || cancel || change_points) {
            return Access::Task;
        }
        Access::Admin
    }
}

/// Whether a signed request's timestamp (ms) is within the window of `now_ms`.
pub fn timestamp_fresh(timestamp_ms: i64, now_ms: i64) -> bool {
    (now_ms - timestamp_ms).abs() <= TIMESTAMP_WINDOW_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_by_route() {
        assert_eq!(Access::of("GET", "/"), Access::Open);
        assert_eq!(Access::of("GET", "/health"), Access::Open);
        assert_eq!(Access::of("POST", "/internal/heartbeat"), Access::Agent);
        assert_eq!(Access::of("GET", "/get_task"), Access::Agent);
        assert_eq!(Access::of("POST", "/submit_result"), Access::Agent);
        assert_eq!(Access::of("GET", "/api/v1/keys"), Access::Admin);
        assert_eq!(Access::of("DELETE", "/api/v1/keys/3"), Access::Admin);
        assert_eq!(Access::of("GET", "/status/3"), Access::Read);
        assert_eq!(Access::of("GET", "/ws/updates"), Access::Read);
        assert_eq!(Access::of("POST", "/submit"), Access::Task);
        assert_eq!(Access::of("POST", "/api/v1/tasks"), Access::Task);
        assert_eq!(Access::of("POST", "/api/v1/tasks/7/cancel"), Access::Task);
        assert_eq!(
            Access::of("POST", "/api/deployment/task/change_points"),
            Access::Task
        );
        assert_eq!(Access::of("POST", "/api/v1/tasks/batch"), Access::Task);
        assert_eq!(Access::of("POST", "/internal/results"), Access::Agent);
        assert_eq!(Access::of("POST", "/api/v1/nodes/n1/drain"), Access::Admin);
        assert_eq!(Access::of("PUT", "/api/v1/nodes/n1/meta"), Access::Admin);
        assert_eq!(Access::of("GET", "/ui"), Access::Open);
        assert_eq!(Access::of("GET", "/ui/tasks/3"), Access::Open);
        assert_eq!(Access::of("GET", "/ui/static/console.js"), Access::Open);
        assert_eq!(Access::of("GET", "/ui/part/tasks"), Access::Read);
        assert_eq!(Access::of("GET", "/ui/part/session"), Access::Read);
        assert_eq!(Access::of("POST", "/ui/tasks"), Access::Admin);
        assert_eq!(Access::of("GET", "/uix"), Access::Read);
        assert_eq!(
            Access::of("POST", "/api/v1/cluster/scale_out"),
            Access::Admin
        );
        assert_eq!(Access::of("POST", "/api/v1/cluster/shrink"), Access::Admin);
        assert_eq!(Access::of("GET", "/api/v1/operations/3"), Access::Read);
    }

    #[test]
    fn roles() {
        assert!(Role::Admin.may(Access::Admin));
        assert!(Role::Submitter.may(Access::Task) && Role::Submitter.may(Access::Read));
        assert!(!Role::Submitter.may(Access::Agent) && !Role::Submitter.may(Access::Admin));
        assert!(Role::Agent.may(Access::Agent) && !Role::Agent.may(Access::Read));
        assert!(Role::Viewer.may(Access::Read) && !Role::Viewer.may(Access::Task));
        assert!(Role::Viewer.may(Access::Open));
    }

    #[test]
    fn generated_keys() {
        let simple = NewKey::generate("a", Role::Agent, KeyMode::Simple);
        assert!(simple.secret.is_none());
        assert_eq!(simple.token_hash(), hash_token(&simple.token));
        assert_ne!(simple.token_hash(), simple.token);
        let signed = NewKey::generate("b", Role::Admin, KeyMode::Signed);
        assert_eq!(signed.secret.as_deref().map(str::len), Some(64));
        assert!(timestamp_fresh(1_000_000, 1_000_000 + TIMESTAMP_WINDOW_MS));
        assert!(!timestamp_fresh(1_000_000, 1_000_001 + TIMESTAMP_WINDOW_MS));
    }
}
