//! The coordinator's side of the standby protocol (see `lull_shared::standby`): HTTP calls
//! to an agent waiting in standby, and what each answer means.

use lull_shared::standby::{
    self, AuthenticateRequest, AuthenticateResponse, SEQUENCE_HEADER, SESSION_HEADER,
    SIGNATURE_HEADER, StandbyAnswer, StandbyHello,
};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Why a call to a standby agent did not give the answer hoped for.
#[derive(Debug, thiserror::Error)]
pub enum CallFailure {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("refused with {status}: {detail}")]
    Refused { status: u16, detail: String },
    #[error("answered something unreadable: {0}")]
    Malformed(String),
}

/// An authenticated session with one agent.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    key: String,
    sequence: u64,
}

pub struct StandbyClient {
    http: reqwest::Client,
}

impl StandbyClient {
    pub fn new(timeout: Duration) -> StandbyClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        StandbyClient { http }
    }

    pub async fn hello(&self, address: &str) -> Result<StandbyHello, CallFailure> {
        let response = self
            .http
            .get(format!("http://{address}/standby"))
            .send()
            .await
            .map_err(|e| CallFailure::Unreachable(describe(&e)))?;
        answer(response).await
    }

    /// Proves we know the join secret and checks that the agent does too. `Ok(None)`:
    /// the agent's proof was wrong.
    pub async fn authenticate(
        &self,
        address: &str,
        join_secret: &str,
        challenge: &str,
    ) -> Result<Option<Session>, CallFailure> {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let request = AuthenticateRequest {
            challenge: challenge.to_string(),
            nonce: nonce.clone(),
            proof: standby::coordinator_proof(join_secret, challenge, &nonce),
        };
        let response = self
            .http
            .post(format!("http://{address}/standby/authenticate"))
            .json(&request)
            .send()
            .await
            .map_err(|e| CallFailure::Unreachable(describe(&e)))?;
        let answer: AuthenticateResponse = answer(response).await?;
        if !standby::verify_agent_proof(join_secret, challenge, &nonce, &answer.proof) {
            return Ok(None);
        }
        Ok(Some(Session {
            id: answer.session,
            key: standby::session_key(join_secret, challenge, &nonce),
            sequence: 0,
        }))
    }

    /// A signed call in `session`: `configure`, `start` or `leave`.
    pub async fn call(
        &self,
        address: &str,
        session: &mut Session,
        action: &str,
        body: &serde_json::Value,
    ) -> Result<StandbyAnswer, CallFailure> {
        session.sequence += 1;
        let path = format!("/standby/{action}");
        let body = body.to_string().into_bytes();
        let signature = standby::sign_call(&session.key, session.sequence, "POST", &path, &body);
        let response = self
            .http
            .post(format!("http://{address}{path}"))
            .header(SESSION_HEADER, &session.id)
            .header(SEQUENCE_HEADER, session.sequence.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| CallFailure::Unreachable(describe(&e)))?;
        answer(response).await
    }
}

/// A reqwest error without the URL noise, down to its cause (`connection refused`).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = last {
        text.push_str(": ");
        text.push_str(&cause);
    }
    text
}

async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, CallFailure> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| CallFailure::Unreachable(describe(&e)))?;
    if !status.is_success() {
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        return Err(CallFailure::Refused {
            status: status.as_u16(),
            detail,
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| CallFailure::Malformed(e.to_string()))
}
