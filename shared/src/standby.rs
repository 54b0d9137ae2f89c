//! The standby protocol (scale-out, seed 002): how a coordinator adopts an agent started
//! with `lull-agent --standby --listen IP:PORT --join-secret S`.
//!
//! Both sides prove they know the join secret without sending it (HMAC-SHA256, compared in
//! constant time):
//!
//! 1. `GET /standby` → [`StandbyHello`]: the agent's state, node id and a fresh `challenge`
//!    (single use, short-lived).
//! 2. `POST /standby/authenticate` with [`AuthenticateRequest`]: the coordinator's own
//!    `nonce` and [`coordinator_proof`] over challenge and nonce. The agent checks it and
//!    answers [`AuthenticateResponse`] with [`agent_proof`] (a different label, so neither
//!    proof can be replayed as the other) and a session id. Both sides now derive the same
//!    [`session_key`]; it never travels.
//! 3. Every later call (`configure`, `start`, `leave`) carries the session id, a sequence
//!    number that must grow, and [`sign_call`] over them, the method, path and body, keyed
//!    with the session key.
//!
//! Architecture Invariant: no IO here; both peers build and check the same strings.

use crate::signing;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header naming the session a signed call belongs to.
pub const SESSION_HEADER: &str = "x-lull-session";
/// The header carrying the call's sequence number (strictly increasing per session).
pub const SEQUENCE_HEADER: &str = "x-lull-sequence";
/// The header carrying [`sign_call`].
pub const SIGNATURE_HEADER: &str = "x-lull-signature";

/// Where a standby agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StandbyState {
    /// Waiting to be adopted.
    Standby,
    /// A coordinator pushed its configuration; the executor has not started.
    Configured,
    /// Running as a node of a coordinator.
    Adopted,
}

impl StandbyState {
    pub fn as_str(self) -> &'static str {
        match self {
            StandbyState::Standby => "standby",
            StandbyState::Configured => "configured",
            StandbyState::Adopted => "adopted",
        }
    }
}

/// `GET /standby`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyHello {
    pub state: StandbyState,
    pub node_id: String,
    /// Fresh for every hello; good for one authentication within a minute.
    pub challenge: String,
    pub version: String,
    /// The coordinator it was configured for or adopted by, if any.
    #[serde(default)]
    pub coordinator: Option<String>,
}

/// `POST /standby/authenticate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticateRequest {
    pub challenge: String,
    pub nonce: String,
    pub proof: String,
}

/// The answer to a good [`AuthenticateRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthenticateResponse {
    pub session: String,
    pub proof: String,
}

/// `POST /standby/configure`: everything the agent needs to become a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    /// Where to heartbeat and pull.
    pub coordinator_url: String,
    /// An `agent` API key made for this agent (when the coordinator has auth on).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// The operator's `configs` (seed 002's `obConfigs`): `type`, `cpus`, `memory_mb`,
    /// `executor`, `heartbeat_interval`; strings or numbers. Anything else is refused.
    #[serde(default)]
    pub configs: Map<String, Value>,
}

/// The answer to a configure, start or leave call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyAnswer {
    pub state: StandbyState,
    pub node_id: String,
    /// The executor the agent runs tasks with, once started.
    #[serde(default)]
    pub executor: Option<String>,
}

fn mac(key: &str, label: &str, parts: &[&str]) -> HmacSha256 {
    let mut mac = match HmacSha256::new_from_slice(key.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(label.as_bytes());
    for part in parts {
        mac.update(b"\n");
        mac.update(part.as_bytes());
    }
    mac
}

fn mac_hex(key: &str, label: &str, parts: &[&str]) -> String {
    hex::encode(mac(key, label, parts).finalize().into_bytes())
}

fn mac_matches(key: &str, label: &str, parts: &[&str], given: &str) -> bool {
    let Ok(given) = hex::decode(given.trim()) else {
        return false;
    };
    mac(key, label, parts).verify_slice(&given).is_ok()
}

/// What the coordinator sends to prove it knows the join secret.
pub fn coordinator_proof(join_secret: &str, challenge: &str, nonce: &str) -> String {
    mac_hex(join_secret, "lull-standby coordinator", &[challenge, nonce])
}

/// Whether `proof` is [`coordinator_proof`] (constant time).
pub fn verify_coordinator_proof(
    join_secret: &str,
    challenge: &str,
    nonce: &str,
    proof: &str,
) -> bool {
    mac_matches(
        join_secret,
        "lull-standby coordinator",
        &[challenge, nonce],
        proof,
    )
}

/// What the agent answers to prove it knows the join secret too.
pub fn agent_proof(join_secret: &str, challenge: &str, nonce: &str) -> String {
    mac_hex(join_secret, "lull-standby agent", &[challenge, nonce])
}

/// Whether `proof` is [`agent_proof`] (constant time).
pub fn verify_agent_proof(join_secret: &str, challenge: &str, nonce: &str, proof: &str) -> bool {
    mac_matches(
        join_secret,
        "lull-standby agent",
        &[challenge, nonce],
        proof,
    )
}

/// The key both sides derive for the session's signed calls; it is never sent.
pub fn session_key(join_secret: &str, challenge: &str, nonce: &str) -> String {
    mac_hex(join_secret, "lull-standby session", &[challenge, nonce])
}

/// The signature of one call in a session (the sequence number stands where a signed API
/// request has its timestamp; see [`signing::canonical`]).
pub fn sign_call(
    session_key: &str,
    sequence: u64,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    signing::sign(session_key, &sequence.to_string(), method, path, body)
}

/// Whether `signature` is [`sign_call`] of this call (constant time).
pub fn verify_call(
    session_key: &str,
    sequence: u64,
    method: &str,
    path: &str,
    body: &[u8],
    signature: &str,
) -> bool {
    signing::verify(
        session_key,
        &sequence.to_string(),
        method,
        path,
        body,
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_need_the_secret_and_cannot_stand_in_for_each_other() {
        let c = coordinator_proof("s", "chal", "nonce");
        assert!(verify_coordinator_proof("s", "chal", "nonce", &c));
        assert!(!verify_coordinator_proof("other", "chal", "nonce", &c));
        assert!(!verify_coordinator_proof("s", "chal2", "nonce", &c));
        let a = agent_proof("s", "chal", "nonce");
        assert_ne!(a, c);
        assert!(verify_agent_proof("s", "chal", "nonce", &a));
        assert!(!verify_agent_proof("s", "chal", "nonce", &c));
        assert!(!verify_agent_proof("s", "chal", "nonce", "not hex"));
        let key = session_key("s", "chal", "nonce");
        assert!(key != a && key != c);
    }

    #[test]
    fn a_call_signature_covers_sequence_and_body() {
        let sig = sign_call("k", 3, "POST", "/standby/start", b"{}");
        assert!(verify_call("k", 3, "post", "/standby/start", b"{}", &sig));
        assert!(!verify_call("k", 4, "POST", "/standby/start", b"{}", &sig));
        assert!(!verify_call("k", 3, "POST", "/standby/leave", b"{}", &sig));
        assert!(!verify_call("k", 3, "POST", "/standby/start", b"{ }", &sig));
    }
}
