//! The node id: chosen once per state directory and kept across restarts, so that the
//! coordinator sees a restarted agent as the same node.

use crate::{AgentConfig, AgentError};
use std::io;
use std::path::Path;

const NODE_ID_FILE: &str = "node_id";

/// Creates `dir` (and what is missing above it) for its owner alone, or takes away what an
/// existing one lets others do; returns the permission bits it had when they were narrowed.
/// For what a task running on this machine as another user (the sandbox's `nobody`) must
/// not read, wherever the directory is: the agent's state (its outbox holds results not yet
/// delivered) and the coordinator's data directory (every task's code and results).
pub fn private_dir(dir: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    Ok(Some(mode & 0o777))
}

/// The state directory ([`private_dir`]; `./lull-agent-state` by default).
pub(crate) fn private_state_dir(dir: &Path) -> Result<(), AgentError> {
    let was = private_dir(dir).map_err(|source| AgentError::StateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if let Some(was) = was {
        tracing::info!(path = %dir.display(), was = format!("{was:o}"), "state directory made private to its owner");
    }
    Ok(())
}

/// The id this agent announces: `config.node_id` when given, else the one saved in
/// `state_dir/node_id`, else a new `{hostname}-{6 random hex}` saved there for next time.
pub async fn resolve_node_id(config: &AgentConfig) -> Result<String, AgentError> {
    if let Some(id) = config.node_id.as_deref().map(str::trim)
        && !id.is_empty()
    {
        return Ok(id.to_string());
    }

    let dir = &config.state_dir;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| AgentError::StateDir {
            path: dir.clone(),
            source,
        })?;

    let path = dir.join(NODE_ID_FILE);
    match tokio::fs::read_to_string(&path).await {
        Ok(saved) => {
            let id = saved.trim();
            if id.is_empty() || id.contains(char::is_whitespace) {
                return Err(AgentError::InvalidNodeIdFile { path });
            }
            Ok(id.to_string())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let id = generate_node_id();
            let to_save = format!("{id}\n");
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || write_atomically(&dir, NODE_ID_FILE, &to_save))
                .await
                .map_err(io::Error::other)
                .and_then(|written| written)
                .map_err(|source| AgentError::SaveNodeId { path, source })?;
            Ok(id)
        }
        Err(source) => Err(AgentError::ReadNodeId { path, source }),
    }
}

fn generate_node_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Keep ids URL- and log-friendly whatever the host is called.
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "node" } else { &host };
    let suffix = rand::random::<u32>() & 0x00ff_ffff;
    format!("{host}-{suffix:06x}")
}

/// Writes `dir/name` so that a crash leaves either the old file or the new one, never half.
pub(crate) fn write_atomically(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    write_replacing(dir, name, contents, true)
}

/// Writes `dir/name` through a temp file and a rename, so a reader never sees half of it;
/// with `sync`, also flushed to disk (file and directory) before returning, so it survives
/// a power loss too, not only a killed process.
pub(crate) fn write_replacing(
    dir: &Path,
    name: &str,
    contents: &str,
    sync: bool,
) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(contents.as_bytes())?;
    if sync {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    if sync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_is_its_owner_s_alone_new_or_existing() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode_of = |dir: &Path| {
            std::fs::metadata(dir)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        let root = tempfile::tempdir().expect("temp dir");
        let new = root.path().join("a/new");
        private_state_dir(&new).expect("made");
        assert_eq!(mode_of(&new), 0o700);
        let existing = root.path().join("existing");
        std::fs::create_dir(&existing).expect("dir");
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_state_dir(&existing).expect("tightened");
        assert_eq!(mode_of(&existing), 0o700);
    }

    #[tokio::test]
    async fn node_id_is_stable_across_restarts() {
        let state = tempfile::tempdir().expect("temp dir");
        let config = AgentConfig::new("http://127.0.0.1:1", state.path().join("state"));

        let first = resolve_node_id(&config).await.expect("first resolve");
        let second = resolve_node_id(&config).await.expect("second resolve");

        assert_eq!(first, second);
        let (_host, suffix) = first.rsplit_once('-').expect("id is host-suffix");
        assert_eq!(suffix.len(), 6);
        assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
        let saved = std::fs::read_to_string(state.path().join("state").join(NODE_ID_FILE))
            .expect("id saved");
        assert_eq!(saved.trim(), first);
    }

    #[tokio::test]
    async fn configured_node_id_wins() {
        let state = tempfile::tempdir().expect("temp dir");
        let mut config = AgentConfig::new("http://127.0.0.1:1", state.path().to_path_buf());
        config.node_id = Some(" node-007 ".to_string());

        assert_eq!(resolve_node_id(&config).await.expect("resolve"), "node-007");
    }

    #[tokio::test]
    async fn a_garbled_id_file_is_an_error_not_a_new_identity() {
        let state = tempfile::tempdir().expect("temp dir");
        std::fs::write(state.path().join(NODE_ID_FILE), "  \n").expect("write");
        let config = AgentConfig::new("http://127.0.0.1:1", state.path().to_path_buf());

        let err = resolve_node_id(&config).await.expect_err("must refuse");
        assert!(matches!(err, AgentError::InvalidNodeIdFile { .. }), "{err}");
    }
}
