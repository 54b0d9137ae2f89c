//! API keys at the HTTP edge: a real coordinator on 127.0.0.1:0 with auth on, driven over
//! real HTTP with keys of every role, simple and signed.

use lull_coordinator::engine::unix_now;
use lull_coordinator::keys::{KeyMode, NewKey, Role};
use lull_coordinator::rate_limit::RateLimit;
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
    /// token, secret, an exact timestamp (to send the very same request twice)
    SignedAt(&'a str, &'a str, &'a str),
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
        Server::start_with(|_| {}).await
    }

    /// Auth on, no local agents, then `tweak` (rate limits, CORS, timeouts, auth off).
    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
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
        tweak(&mut config);
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
            Cred::SignedAt(t, secret, ts) => {
                let sig = signing::sign(secret, ts, method.as_str(), path, bytes.as_bytes());
                req.header("token", t)
                    .header("timestamp", ts)
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

// -----------------------------------------------------------------------------------------------
// Rate limits, replays, CORS, ownership, the feed's query credentials, body size, timeouts
// -----------------------------------------------------------------------------------------------

fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_key_past_its_budget_gets_429_with_retry_after_and_agents_are_not_starved() {
    // Three requests at once, then one every ~17 minutes: nothing refills during the test.
    let s = Server::start_with(|c| {
        c.rate_limit = RateLimit::new(0.001, 3.0);
    })
    .await;
    let (_, viewer, _) = s.key("viewer", "simple").await;
    let (_, other_viewer, _) = s.key("viewer", "simple").await;
    let (_, agent, _) = s.key("agent", "simple").await;
    for _ in 0..3 {
        let a = s
            .call(Method::GET, "/stats", Cred::Token(&viewer), None)
            .await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    }
    let refused = s
        .http
        .get(format!("{}/stats", s.base))
        .header("token", &viewer)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&refused).expect("Retry-After in whole seconds");
    assert!(wait >= 1, "{wait}");
    let body: Value = refused.json().await.expect("JSON body");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("rate limit"), "{detail}");
    // Every route counts against the same key, reads and writes alike.
    let a = s
        .call(Method::GET, "/api/v1/nodes", Cred::Token(&viewer), None)
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    // Another key has its own budget...
    let a = s
        .call(Method::GET, "/stats", Cred::Token(&other_viewer), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    // ...and agent keys a separate, higher one (the default: 1000/s, burst 2000).
    for _ in 0..30 {
        let a = s
            .call(
                Method::POST,
                "/internal/heartbeat",
                Cred::Token(&agent),
                Some(&heartbeat()),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    }
    // Open endpoints are never limited.
    for _ in 0..10 {
        let a = s.call(Method::GET, "/health", Cred::None, None).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn no_rate_limit_with_auth_off_or_a_zero_limit() {
    let tiny = RateLimit::new(0.001, 1.0);
    let off = Server::start_with(|c| {
        c.auth = false;
        c.rate_limit = tiny;
        c.agent_rate_limit = tiny;
    })
    .await;
    for _ in 0..20 {
        let a = off.call(Method::GET, "/stats", Cred::None, None).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    off.shutdown().await;
    let zero = Server::start_with(|c| c.rate_limit = RateLimit::new(0.0, 1.0)).await;
    for _ in 0..20 {
        let a = zero
            .call(Method::GET, "/stats", Cred::Token(&zero.admin), None)
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    zero.shutdown().await;
}

#[tokio::test]
async fn an_exact_replay_of_a_signed_request_is_refused() {
    let s = Server::start().await;
    let (_, token, secret) = s.key("submitter", "signed").await;
    let secret = secret.expect("secret");
    let ts = ((unix_now() * 1000.0) as i64).to_string();
    let body = task_body();
    let first = s
        .call(
            Method::POST,
            "/api/v1/tasks",
            Cred::SignedAt(&token, &secret, &ts),
            Some(&body),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = s
        .call(
            Method::POST,
            "/api/v1/tasks",
            Cred::SignedAt(&token, &secret, &ts),
            Some(&body),
        )
        .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert_eq!(again.detail(), "replayed request");
    // The replay submitted nothing: one task only.
    let list = s
        .call(Method::GET, "/api/v1/tasks", Cred::Token(&s.admin), None)
        .await;
    assert_eq!(list.body["total"], json!(1), "{:?}", list.body);
    // The same millisecond with another request is a different signature: accepted.
    let other = s
        .call(
            Method::GET,
            "/api/v1/tasks",
            Cred::SignedAt(&token, &secret, &ts),
            None,
        )
        .await;
    assert_eq!(other.status, StatusCode::OK, "{:?}", other.body);
    s.shutdown().await;
}

async fn preflight(s: &Server, origin: &str) -> reqwest::Response {
    s.http
        .request(Method::OPTIONS, format!("{}/api/v1/tasks", s.base))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "token,content-type")
        .send()
        .await
        .expect("preflight")
}

fn allowed_origin(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins_when_auth_is_on() {
    let console = "https://console.example:8443";
    let s = Server::start_with(|c| c.cors_origins = vec![console.to_string()]).await;
    let ok = preflight(&s, console).await;
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(allowed_origin(&ok).as_deref(), Some(console));
    let headers = ok
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        headers.contains("token") && headers.contains("sign_str"),
        "{headers}"
    );
    let evil = preflight(&s, "https://evil.example").await;
    assert_eq!(allowed_origin(&evil), None);
    // The actual request: the allowed origin is echoed, never `*`; others get nothing.
    for (origin, expected) in [(console, Some(console)), ("https://evil.example", None)] {
        let resp = s
            .http
            .get(format!("{}/stats", s.base))
            .header("origin", origin)
            .header("token", &s.admin)
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(allowed_origin(&resp).as_deref(), expected, "{origin}");
    }
    s.shutdown().await;

    // No --cors-origin: same-origin only, no cross-origin grant to anybody.
    let none = Server::start().await;
    assert_eq!(allowed_origin(&preflight(&none, console).await), None);
    none.shutdown().await;

    // Auth off: the development default, any origin.
    let open = Server::start_with(|c| c.auth = false).await;
    assert_eq!(
        allowed_origin(&preflight(&open, "https://anywhere.example").await).as_deref(),
        Some("*")
    );
    // ... but not to the agents' routes, even then: no web page gets a heartbeat or a result
    // past its browser's preflight.
    for path in [
        "/internal/heartbeat",
        "/internal/result",
        "/internal/results",
        "/internal/task",
    ] {
        let resp = open
            .http
            .request(Method::OPTIONS, format!("{}{path}", open.base))
            .header("origin", "https://anywhere.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .expect("preflight");
        assert_eq!(allowed_origin(&resp), None, "{path}");
        assert!(!resp.status().is_success(), "{path}: {}", resp.status());
    }
    open.shutdown().await;
}

/// Leases the oldest pending task by hand (`/get_task`) and completes it.
async fn complete_next(s: &Server, agent: &str, result: &str) -> i64 {
    let lease = s
        .call(Method::GET, "/get_task", Cred::Token(agent), None)
        .await;
    assert_eq!(lease.status, StatusCode::OK, "{:?}", lease.body);
    let task_id = lease.body["task_id"].as_i64().expect("a task to lease");
    let done = s
        .call(
            Method::POST,
            "/submit_result",
            Cred::Token(agent),
            Some(&json!({"task_id": task_id, "result": result, "run_id": lease.body["run_id"]})),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    task_id
}

#[tokio::test]
async fn submitters_see_and_act_on_only_their_own_tasks() {
    let s = Server::start().await;
    let (_, alice, _) = s.key("submitter", "simple").await;
    let (_, bob, _) = s.key("submitter", "simple").await;
    let (_, viewer, _) = s.key("viewer", "simple").await;
    let (_, agent, _) = s.key("agent", "simple").await;
    let submit = |token: String, path: &'static str| {
        let s = &s;
        async move {
            let a = s
                .call(Method::POST, path, Cred::Token(&token), Some(&task_body()))
                .await;
            assert!(a.status.is_success(), "{:?}", a.body);
            a.body["task_id"].as_i64().expect("task_id")
        }
    };
    let alice_done = submit(alice.clone(), "/submit").await;
    let bob_done = submit(bob.clone(), "/api/v1/tasks").await;
    assert_eq!(complete_next(&s, &agent, "a").await, alice_done);
    assert_eq!(complete_next(&s, &agent, "b").await, bob_done);
    let alice_pending = submit(alice.clone(), "/api/v1/tasks").await;
    let bob_pending = submit(bob.clone(), "/submit").await;

    // Lists and results: her own only, totals included.
    let list = s
        .call(Method::GET, "/api/v1/tasks", Cred::Token(&alice), None)
        .await;
    let ids: Vec<i64> = list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["task_id"].as_i64())
        .collect();
    assert_eq!(ids, vec![alice_done, alice_pending], "{:?}", list.body);
    assert_eq!(list.body["total"], json!(2));
    let results = s
        .call(Method::GET, "/results", Cred::Token(&alice), None)
        .await;
    assert_eq!(results.body["total"], json!(1), "{:?}", results.body);
    assert_eq!(results.body["results"][0]["task_id"], json!(alice_done));
    assert_eq!(results.body["results"][0]["result"], json!("a"));
    let waited = s
        .call(
            Method::GET,
            &format!("/api/v1/tasks/wait?ids={alice_done}"),
            Cred::Token(&alice),
            None,
        )
        .await;
    assert_eq!(
        waited.body["items"][0]["result"],
        json!("a"),
        "{:?}",
        waited.body
    );

    // Bob's tasks do not exist for her: the same 404 as an unknown task.
    for (path, id) in [
        (format!("/status/{bob_done}"), bob_done),
        (format!("/api/v1/tasks/{bob_done}"), bob_done),
        // Waiting for one is no way around it, finished or not.
        (format!("/api/v1/tasks/{bob_done}?wait=5"), bob_done),
        (format!("/api/v1/tasks/{bob_pending}?wait=5"), bob_pending),
        (format!("/api/v1/tasks/{bob_pending}/explain"), bob_pending),
        // Nor is waiting for several, hers among them.
        (
            format!("/api/v1/tasks/wait?ids={alice_done},{bob_done}&wait=5"),
            bob_done,
        ),
        ("/status/999".to_string(), 999),
    ] {
        let a = s.call(Method::GET, &path, Cred::Token(&alice), None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {:?}", a.body);
        assert_eq!(a.detail(), format!("Task {id} not found"), "{path}");
    }
    let cancel = s
        .call(
            Method::POST,
            &format!("/api/v1/tasks/{bob_pending}/cancel"),
            Cred::Token(&alice),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::NOT_FOUND, "{:?}", cancel.body);
    // Her own she may read and cancel.
    let own = s
        .call(
            Method::GET,
            &format!("/status/{alice_done}"),
            Cred::Token(&alice),
            None,
        )
        .await;
    assert_eq!(own.body["result"], json!("a"));
    let cancel = s
        .call(
            Method::POST,
            &format!("/api/v1/tasks/{alice_pending}/cancel"),
            Cred::Token(&alice),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::OK, "{:?}", cancel.body);

    // Bob's pending task was not touched; viewers and admins see everything.
    for token in [&viewer, &s.admin] {
        let st = s
            .call(
                Method::GET,
                &format!("/status/{bob_pending}"),
                Cred::Token(token),
                None,
            )
            .await;
        assert_eq!(st.body["status"], json!("pending"), "{:?}", st.body);
        let list = s
            .call(Method::GET, "/api/v1/tasks", Cred::Token(token), None)
            .await;
        assert_eq!(list.body["total"], json!(4), "{:?}", list.body);
        let results = s
            .call(Method::GET, "/results", Cred::Token(token), None)
            .await;
        assert_eq!(results.body["total"], json!(2), "{:?}", results.body);
    }
    s.shutdown().await;
}

fn ws_url(s: &Server, query: &str) -> String {
    format!("{}/ws/updates{query}", s.base.replace("http://", "ws://"))
}

/// The handshake's HTTP status: 101 when upgraded, else the refusal's, with its detail.
async fn ws_status(s: &Server, query: &str) -> (StatusCode, String) {
    match tokio_tungstenite::connect_async(ws_url(s, query)).await {
        Ok((_, response)) => (response.status(), String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .unwrap_or(Value::Null);
            (
                response.status(),
                body["detail"].as_str().unwrap_or_default().to_string(),
            )
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn the_live_feed_takes_credentials_in_its_query() {
    let s = Server::start().await;
    let (_, viewer, _) = s.key("viewer", "simple").await;
    let (_, signed, secret) = s.key("viewer", "signed").await;
    let secret = secret.expect("secret");
    let (_, agent, _) = s.key("agent", "simple").await;

    let (status, detail) = ws_status(&s, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{detail}");
    assert!(detail.contains("?token="), "{detail}");
    let (status, _) = ws_status(&s, "?token=lull_nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, detail) = ws_status(&s, &format!("?token={agent}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{detail}");

    // A simple key: the token alone, and events arrive.
    let (mut socket, response) = tokio_tungstenite::connect_async(ws_url(
        &s,
        &format!("?events=task_created&token={viewer}"),
    ))
    .await
    .expect("handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let created = s
        .call(
            Method::POST,
            "/submit",
            Cred::Token(&s.admin),
            Some(&task_body()),
        )
        .await;
    let task_id = created.body["task_id"].as_i64().expect("task_id");
    let message = tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut socket),
    )
    .await
    .expect("an event in time")
    .expect("a message")
    .expect("a frame");
    let event: Value = serde_json::from_str(message.to_text().expect("text")).expect("JSON");
    assert_eq!(event["event"], json!("task_created"));
    assert_eq!(event["data"]["task_id"], json!(task_id));
    drop(socket);

    // A submitter's feed carries its own tasks only: the admin's task, submitted first,
    // never reaches it.
    let (_, alice, _) = s.key("submitter", "simple").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url(
        &s,
        &format!("?events=task_created&token={alice}"),
    ))
    .await
    .expect("handshake");
    s.call(
        Method::POST,
        "/submit",
        Cred::Token(&s.admin),
        Some(&task_body()),
    )
    .await;
    let hers = s
        .call(
            Method::POST,
            "/submit",
            Cred::Token(&alice),
            Some(&task_body()),
        )
        .await;
    let message = tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut socket),
    )
    .await
    .expect("an event in time")
    .expect("a message")
    .expect("a frame");
    let event: Value = serde_json::from_str(message.to_text().expect("text")).expect("JSON");
    assert_eq!(event["data"]["task_id"], hers.body["task_id"], "{event}");
    drop(socket);

    // A signed key: timestamp and sign_str in the query too, signed over the path with
    // its query minus sign_str.
    let ts = ((unix_now() * 1000.0) as i64).to_string();
    let unsigned = format!("/ws/updates?events=task_completed&token={signed}&timestamp={ts}");
    let sig = signing::sign(&secret, &ts, "GET", &unsigned, b"");
    let query = format!("?events=task_completed&token={signed}&timestamp={ts}&sign_str={sig}");
    let (status, detail) = ws_status(&s, &query).await;
    assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS, "{detail}");
    // The very same URL again is a replay.
    let (status, detail) = ws_status(&s, &query).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(detail, "replayed request");
    // A signature over something else, or none at all, is refused.
    let wrong = signing::sign(&secret, &ts, "GET", "/ws/updates", b"");
    let (status, detail) = ws_status(
        &s,
        &format!("?events=task_completed&token={signed}&timestamp={ts}&sign_str={wrong}"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bad signature"), "{detail}");
    let (status, detail) = ws_status(&s, &format!("?token={signed}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(detail.contains("missing timestamp"), "{detail}");

    // Only the feed reads credentials from the query: tokens stay out of other URLs.
    let a = s
        .call(
            Method::GET,
            &format!("/stats?token={viewer}"),
            Cred::None,
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    s.shutdown().await;
}

#[tokio::test]
async fn an_oversized_body_is_413_with_a_detail() {
    for auth in [false, true] {
        let s = Server::start_with(|c| {
            c.auth = auth;
            c.max_body_bytes = 1024;
        })
        .await;
        let (_, signed, secret) = s.key("submitter", "signed").await;
        let secret = secret.expect("secret");
        let big = json!({"code": format!("print('{}')", "x".repeat(4096))});
        let creds = [
            Cred::Token(&s.admin),
            Cred::Signed(&signed, &secret, 0, false),
        ];
        for cred in creds {
            for path in ["/submit", "/api/v1/tasks"] {
                let a = s.call(Method::POST, path, cred, Some(&big)).await;
                assert_eq!(
                    a.status,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "{path}: {:?}",
                    a.body
                );
                assert!(a.detail().contains("too large"), "{path}: {:?}", a.body);
            }
        }
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_slow_client_is_cut_off_but_long_polls_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start_with(|c| {
        c.auth = false;
        c.request_timeout = Duration::from_secs(1);
    })
    .await;
    // Headers promise a body that never comes.
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /submit HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"code\": ",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: the server must answer on its own (1 s), long before this gives up.
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = stream.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            let complete = text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, body)| body.ends_with('}'));
            if n == 0 || complete {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server never answered the slow request");
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("{\"detail\":"), "{text}");

    // The agents' long-poll waits as long as it asked (2 s > the 1 s timeout).
    let hb = s
        .call(
            Method::POST,
            "/internal/heartbeat",
            Cred::None,
            Some(&heartbeat()),
        )
        .await;
    assert_eq!(hb.status, StatusCode::OK, "{:?}", hb.body);
    let pull = s
        .call(
            Method::GET,
            "/internal/task?node_id=n1&wait=2",
            Cred::None,
            None,
        )
        .await;
    assert_eq!(pull.status, StatusCode::OK, "{:?}", pull.body);
    // So does a task read with ?wait=.
    let created = s
        .call(Method::POST, "/submit", Cred::None, Some(&task_body()))
        .await;
    let task_id = created.body["task_id"].as_i64().expect("task_id");
    let waited = s
        .call(
            Method::GET,
            &format!("/api/v1/tasks/{task_id}?wait=2"),
            Cred::None,
            None,
        )
        .await;
    assert_eq!(waited.status, StatusCode::OK, "{:?}", waited.body);
    s.shutdown().await;
}
