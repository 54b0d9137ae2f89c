//! API keys at the HTTP edge: a real coordinator on 127.0.0.1:0 with auth on, driven over
//! real HTTP with keys of every role, simple and signed.

use lull_coordinator::engine::unix_now;
use lull_coordinator::keys::{KeyMode, NewKey, Role};
use lull_coordinator::store::{KeyStore, SqliteStore, SyncMode};
use lull_coordinator::{Config, run};
use lull_shared::signing;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    admin: String,
    _dir: tempfile::TempDir,
}

/// How a request presents its key.
#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    Token(&'a str),
    Bearer(&'a str),
    /// token, secret, timestamp offset in ms, tamper with the signature
    Signed(&'a str, &'a str, i64, bool),
}

struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn detail(&self) -> String {
        self.body["detail"].as_str().unwrap_or_default().to_string()
    }
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        // The first admin key is made the way an operator would: straight in the store.
        let store = SqliteStore::open(dir.path(), SyncMode::Normal)
            .await
            .expect("store");
        let admin = NewKey::generate("root", Role::Admin, KeyMode::Simple);
        store
            .create_key(&admin, unix_now())
            .await
            .expect("admin key");
        drop(store);
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
        config.auth = true;
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
            admin: admin.token,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        cred: Cred<'_>,
        body: Option<&Value>,
    ) -> Answer {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .body(bytes.clone());
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        req = match cred {
            Cred::None => req,
            Cred::Token(t) => req.header("token", t),
            Cred::Bearer(t) => req.header("authorization", format!("Bearer {t}")),
            Cred::Signed(t, secret, offset, tamper) => {
                let ts = ((unix_now() * 1000.0) as i64 + offset).to_string();
                let mut sig = signing::sign(secret, &ts, method.as_str(), path, bytes.as_bytes());
                if tamper {
                    sig = signing::sign(
                        "not-the-secret",
                        &ts,
                        method.as_str(),
                        path,
                        bytes.as_bytes(),
                    );
                }
                req.header("token", t)
                    .header("timestamp", ts)
                    .header("version", "1.0.0")
                    .header("sign_str", sig)
            }
        };
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body }
    }

    /// Creates a key through the admin API; answers (id, token, secret).
    async fn key(&self, role: &str, mode: &str) -> (i64, String, Option<String>) {
        let a = self
            .call(
                Method::POST,
                "/api/v1/keys",
                Cred::Token(&self.admin),
                Some(&json!({"role": role, "mode": mode, "name": format!("{role}-{mode}")})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        (
            a.body["id"].as_i64().expect("id"),
            a.body["token"].as_str().expect("token").to_string(),
            a.body["secret"].as_str().map(str::to_string),
        )
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task");
    }
}

fn task_body() -> Value {
    json!({"code": "print(1)"})
}

fn heartbeat() -> Value {
    json!({"node_id": "n1", "status": "idle", "resources": {"cpu_cores": 1.0, "memory_mb": 512.0}})
}

#[tokio::test]
async fn open_endpoints_and_missing_or_unknown_credentials() {
    let s = Server::start().await;
    assert_eq!(
        s.call(Method::GET, "/health", Cred::None, None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        s.call(Method::GET, "/", Cred::None, None).await.status,
        StatusCode::OK
    );
    let a = s.call(Method::GET, "/api/v1/tasks", Cred::None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.detail().contains("missing credentials"), "{}", a.detail());
    let a = s
        .call(Method::GET, "/api/v1/tasks", Cred::Token("lull_nope"), None)
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.detail().contains("unknown API key"), "{}", a.detail());
    let a = s
        .call(
            Method::GET,
            "/api/v1/tasks",
            Cred::Bearer("lull_nope"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    s.shutdown().await;
}

#[tokio::test]
async fn each_role_against_each_endpoint_group() {
    let s = Server::start().await;
    let (_, submitter, _) = s.key("submitter", "simple").await;
    let (_, agent, _) = s.key("agent", "simple").await;
    let (_, viewer, _) = s.key("viewer", "simple").await;
    let admin = s.admin.clone();
    let task = Some(task_body());
    let hb = Some(heartbeat());
    // (token, method, path, body, expected status)
    let cases: Vec<(&str, Method, &str, Option<Value>, StatusCode)> = vec![
        // submitter: tasks and reads, not the agent protocol, not admin
        (
            &submitter,
            Method::POST,
            "/api/v1/tasks",
            task.clone(),
            StatusCode::CREATED,
        ),
        (
            &submitter,
            Method::GET,
            "/api/v1/tasks",
            None,
            StatusCode::OK,
        ),
        (
            &submitter,
            Method::POST,
            "/internal/heartbeat",
            hb.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            &submitter,
            Method::GET,
            "/api/v1/keys",
            None,
            StatusCode::FORBIDDEN,
        ),
        // agent: only /internal/*
        (
            &agent,
            Method::POST,
            "/internal/heartbeat",
            hb.clone(),
            StatusCode::OK,
        ),
        (
            &agent,
            Method::POST,
            "/api/v1/tasks",
            task.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            &agent,
            Method::GET,
            "/api/v1/tasks",
            None,
            StatusCode::FORBIDDEN,
        ),
        // viewer: reads only
        (&viewer, Method::GET, "/api/v1/nodes", None, StatusCode::OK),
        (&viewer, Method::GET, "/stats", None, StatusCode::OK),
        (
            &viewer,
            Method::POST,
            "/submit",
            task.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            &viewer,
            Method::POST,
            "/internal/heartbeat",
            hb.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/nodes/n1/drain",
            None,
            StatusCode::FORBIDDEN,
        ),
        // admin: everything
        (
            &admin,
            Method::POST,
            "/api/v1/tasks",
            task.clone(),
            StatusCode::CREATED,
        ),
        (
            &admin,
            Method::POST,
            "/internal/heartbeat",
            hb.clone(),
            StatusCode::OK,
        ),
        (&admin, Method::GET, "/api/v1/keys", None, StatusCode::OK),
    ];
    for (token, method, path, body, expected) in cases {
        // Both credential forms, for every case.
        for cred in [Cred::Token(token), Cred::Bearer(token)] {
            let a = s.call(method.clone(), path, cred, body.as_ref()).await;
            assert_eq!(a.status, expected, "{method} {path}: {:?}", a.body);
            if expected == StatusCode::FORBIDDEN {
                assert!(a.detail().starts_with("role "), "{}", a.detail());
                assert!(a.detail().contains("may"), "{}", a.detail());
            }
        }
    }
    let a = s
        .call(Method::POST, "/submit", Cred::Token(&viewer), task.as_ref())
        .await;
    assert!(a.detail().contains("viewer"), "{}", a.detail());
    s.shutdown().await;
}

#[tokio::test]
async fn signed_keys() {
    let s = Server::start().await;
    let (_, token, secret) = s.key("submitter", "signed").await;
    let secret = secret.expect("a signed key has a secret");
    let body = task_body();
    let good = s
        .call(
            Method::POST,
            "/api/v1/tasks",
            Cred::Signed(&token, &secret, 0, false),
            Some(&body),
        )
        .await;
    assert_eq!(good.status, StatusCode::CREATED, "{:?}", good.body);
    let with_query = s
        .call(
            Method::GET,
            "/api/v1/tasks?limit=5",
            Cred::Signed(&token, &secret, 0, false),
            None,
        )
        .await;
    assert_eq!(with_query.status, StatusCode::OK, "{:?}", with_query.body);

    let bad = s
        .call(
            Method::POST,
            "/api/v1/tasks",
            Cred::Signed(&token, &secret, 0, true),
            Some(&body),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(bad.detail().contains("bad signature"), "{}", bad.detail());

    for offset in [-301_000, 301_000] {
        let stale = s
            .call(
                Method::POST,
                "/api/v1/tasks",
                Cred::Signed(&token, &secret, offset, false),
                Some(&body),
            )
            .await;
        assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
        assert!(
            stale.detail().contains("stale timestamp"),
            "{}",
            stale.detail()
        );
    }

    // The token alone is not enough for a signed key.
    let unsigned = s
        .call(Method::GET, "/api/v1/tasks", Cred::Token(&token), None)
        .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    assert!(
        unsigned.detail().contains("missing timestamp"),
        "{}",
        unsigned.detail()
    );
    s.shutdown().await;
}

#[tokio::test]
async fn keys_api_and_revocation() {
    let s = Server::start().await;
    let (id, token, secret) = s.key("viewer", "simple").await;
    assert!(secret.is_none());
    assert_eq!(
        s.call(Method::GET, "/stats", Cred::Token(&token), None)
            .await
            .status,
        StatusCode::OK
    );

    let list = s
        .call(Method::GET, "/api/v1/keys", Cred::Token(&s.admin), None)
        .await;
    assert_eq!(list.status, StatusCode::OK);
    let keys = list.body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    let text = list.body.to_string();
    assert!(
        !text.contains(&token) && !text.contains("token") && !text.contains("secret"),
        "{text}"
    );

    let revoked = s
        .call(
            Method::DELETE,
            &format!("/api/v1/keys/{id}"),
            Cred::Token(&s.admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.body["revoked"], json!(true));
    let a = s
        .call(Method::GET, "/stats", Cred::Token(&token), None)
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.detail().contains("revoked"), "{}", a.detail());

    let missing = s
        .call(
            Method::DELETE,
            "/api/v1/keys/999",
            Cred::Token(&s.admin),
            None,
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let bad_role = s
        .call(
            Method::POST,
            "/api/v1/keys",
            Cred::Token(&s.admin),
            Some(&json!({"role": "root"})),
        )
        .await;
    assert_eq!(bad_role.status, StatusCode::UNPROCESSABLE_ENTITY);
    s.shutdown().await;
}

#[tokio::test]
async fn auth_off_by_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::new(dir.path().to_path_buf());
    config.local_agents = 0;
    assert!(!config.auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { run(listener, config, token).await.expect("runs") });
    let resp = reqwest::get(format!("{base}/api/v1/tasks"))
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    stop.cancel();
    task.await.expect("task");
}
