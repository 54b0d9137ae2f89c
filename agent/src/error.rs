//! Why the agent could not start. Once running, the agent does not fail: a coordinator that
//! is down or answers badly is retried, and a run that goes wrong is reported as a result.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid coordinator url {url:?}: {reason}")]
    InvalidCoordinatorUrl { url: String, reason: String },
    #[error("could not use the CA certificate {path}: {reason}")]
    CaCert { path: PathBuf, reason: String },
    #[error("could not create state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("could not read the node id from {path}: {source}")]
    ReadNodeId { path: PathBuf, source: io::Error },
    #[error("node id file {path} holds no usable id; fix or delete it")]
    InvalidNodeIdFile { path: PathBuf },
    #[error("could not save the node id to {path}: {source}")]
    SaveNodeId { path: PathBuf, source: io::Error },
    #[error("could not open the outbox {path}: {source}")]
    Outbox { path: PathBuf, source: io::Error },
    #[error("could not build the http client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error(
        "this host's sandbox level is {have}, below the required {want}; refusing to run tasks"
    )]
    SandboxTooWeak {
        have: lull_shared::SandboxLevel,
        want: lull_shared::SandboxLevel,
    },
}
