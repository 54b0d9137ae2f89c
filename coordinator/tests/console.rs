//! The web console at the HTTP edge: a real coordinator on 127.0.0.1:0, read over real
//! HTTP. Shells are public and carry data only when auth is off; parts are reads like any
//! other and refuse a request without a key when auth is on. (The browser tests in
//! tests/tests/console.rs drive the pages themselves.)

use lull_coordinator::engine::unix_now;
use lull_coordinator::keys::{KeyMode, NewKey, Role};
use lull_coordinator::store::{KeyStore, SqliteStore, SyncMode};
use lull_coordinator::{Config, run};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A coordinator without local agents; with `viewer`, auth is on and a viewer key
    /// with that token exists (and an admin key).
    async fn start(viewer: Option<&NewKey>) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(key) = viewer {
            let store = SqliteStore::open(dir.path(), SyncMode::Normal)
                .await
                .expect("store");
            store.create_key(key, unix_now()).await.expect("key");
            // With auth on the coordinator refuses to start without an admin key.
            let admin = NewKey::generate("root", Role::Admin, KeyMode::Simple);
            store
                .create_key(&admin, unix_now())
                .await
                .expect("admin key");
        }
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
        config.auth = viewer.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            run(listener, config, token)
                .await
                .expect("coordinator runs");
        });
        Server {
            base,
            http: reqwest::Client::new(),
            stop,
            task,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, String, String) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("token", t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (status, kind, resp.text().await.expect("body"))
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("coordinator task");
    }
}

#[tokio::test]
async fn pages_render_with_their_data_when_auth_is_off() {
    let s = Server::start(None).await;
    let created = s
        .http
        .post(format!("{}/api/v1/tasks", s.base))
        .json(&json!({"code": "print('<b>not markup</b>')"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(created.status(), StatusCode::CREATED);
    let task_id = created.json::<Value>().await.expect("json")["task_id"].clone();

    for page in [
        "/ui",
        "/ui/submit",
        "/ui/tasks",
        "/ui/nodes",
        "/ui/operations",
    ] {
        let (status, kind, body) = s.get(page, None).await;
        assert_eq!(status, StatusCode::OK, "{page}: {body}");
        assert!(kind.starts_with("text/html"), "{page}: {kind}");
        assert!(body.contains(r#"data-auth="off""#), "{page}");
        assert!(body.contains("/ui/static/console.js"), "{page}");
    }
    // The first render is in the shell: the task's row, its code escaped on the detail.
    let (_, _, tasks) = s.get("/ui/tasks", None).await;
    assert!(
        tasks.contains(&format!(r#"data-task="{task_id}""#)),
        "{tasks}"
    );
    let (status, _, detail) = s.get(&format!("/ui/tasks/{task_id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        detail.contains("&#60;b&#62;not markup&#60;/b&#62;"),
        "{detail}"
    );
    assert!(!detail.contains("<b>not markup</b>"), "{detail}");

    let (status, kind, script) = s.get("/ui/static/console.js", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.starts_with("text/javascript"), "{kind}");
    assert!(script.contains("/ws/updates"));
    let (_, kind, _) = s.get("/ui/static/console.css", None).await;
    assert!(kind.starts_with("text/css"), "{kind}");

    // Without auth anyone may do anything.
    let (status, _, session) = s.get("/ui/part/session", None).await;
    assert_eq!(status, StatusCode::OK);
    let session: Value = serde_json::from_str(&session).expect("json");
    assert_eq!(session, json!({"auth": false, "role": "admin"}));

    // The overview draws two charts; parts are fragments, not pages.
    let (status, _, overview) = s.get("/ui/part/overview", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(overview.matches("<svg").count(), 2, "{overview}");
    assert!(!overview.contains("<html"));
    s.stop().await;
}

#[tokio::test]
async fn bad_part_queries_are_answered_with_a_detail() {
    let s = Server::start(None).await;
    let (status, kind, body) = s.get("/ui/part/tasks?status=bogus", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(kind.starts_with("application/json"));
    assert!(body.contains("unknown status"), "{body}");
    let (status, _, body) = s.get("/ui/part/tasks?nonsense=1", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _, body) = s.get("/ui/part/task/999", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("Task 999 not found"), "{body}");
    let (status, _, body) = s.get("/ui/part/task/abc", None).await;
    assert!(status.is_client_error(), "{status}: {body}");
    // The detail page of an unknown task is a page that says so.
    let (status, _, body) = s.get("/ui/tasks/999", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Task 999 not found"), "{body}");
    let (status, _, body) = s.get("/ui/tasks?status=bogus", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // Paging past the end is an empty page, not an error.
    let (status, _, body) = s.get("/ui/part/tasks?offset=5000", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("No tasks"), "{body}");
    s.stop().await;
}

#[tokio::test]
async fn with_auth_shells_are_public_and_empty_and_parts_need_a_key() {
    let viewer = NewKey::generate("viewer", Role::Viewer, KeyMode::Simple);
    let s = Server::start(Some(&viewer)).await;
    for page in ["/ui", "/ui/tasks", "/ui/nodes", "/ui/static/console.js"] {
        let (status, _, body) = s.get(page, None).await;
        assert_eq!(status, StatusCode::OK, "{page}: {body}");
    }
    let (_, _, shell) = s.get("/ui", None).await;
    assert!(shell.contains(r#"data-auth="on""#));
    assert!(
        !shell.contains("<svg"),
        "a public shell carries no data: {shell}"
    );

    for part in ["/ui/part/overview", "/ui/part/tasks", "/ui/part/session"] {
        let (status, _, body) = s.get(part, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{part}: {body}");
        assert!(body.contains("missing credentials"), "{body}");
        let (status, _, body) = s.get(part, Some(&viewer.token)).await;
        assert_eq!(status, StatusCode::OK, "{part}: {body}");
    }
    let (_, _, session) = s.get("/ui/part/session", Some(&viewer.token)).await;
    let session: Value = serde_json::from_str(&session).expect("json");
    assert_eq!(session, json!({"auth": true, "role": "viewer"}));
    // What the shells hide stays refused through the API: the viewer cannot submit.
    let refused = s
        .http
        .post(format!("{}/api/v1/tasks", s.base))
        .header("token", &viewer.token)
        .json(&json!({"code": "print(1)"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    s.stop().await;
}

#[tokio::test]
async fn the_task_list_pages_newest_first() {
    let s = Server::start(None).await;
    for n in 1..=3 {
        let created = s
            .http
            .post(format!("{}/api/v1/tasks", s.base))
            .json(&json!({"code": format!("print({n})")}))
            .send()
            .await
            .expect("submit");
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    let rows = |body: &str| -> Vec<String> {
        body.match_indices("data-task=\"")
            .map(|(i, m)| {
                body[i + m.len()..]
                    .split('"')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let (status, _, first) = s.get("/ui/part/tasks?limit=2", None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(rows(&first), ["3", "2"], "{first}");
    assert!(first.contains("1–2 of 3"), "{first}");
    assert!(
        first.contains(r#"data-page="/ui/part/tasks?offset=2&#38;limit=2""#),
        "{first}"
    );
    let (_, _, second) = s.get("/ui/part/tasks?offset=2&limit=2", None).await;
    assert_eq!(rows(&second), ["1"], "{second}");
    assert!(second.contains("3–3 of 3"), "{second}");
    assert!(
        second.contains(r#"data-page="/ui/part/tasks?offset=0&#38;limit=2""#),
        "{second}"
    );
    let (_, _, pending) = s.get("/ui/part/tasks?status=cancelled", None).await;
    assert!(rows(&pending).is_empty(), "{pending}");
    assert!(pending.contains("No cancelled tasks"), "{pending}");
    s.stop().await;
}
