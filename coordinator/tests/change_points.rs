//! Seed 000's `POST /api/deployment/task/change_points` over real HTTP: every code of its
//! envelope, with auth on (simple and signed keys, every refusal) and off.

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

const PATH: &str = "/api/deployment/task/change_points";

struct Server {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    admin: NewKey,
    signed: NewKey,
    viewer: NewKey,
    _dir: tempfile::TempDir,
}

/// The headers a call carries.
#[derive(Clone, Default)]
struct Headers {
    token: Option<String>,
    /// Signs with this secret (and sends `timestamp`), offset from now by `skew_ms`.
    secret: Option<String>,
    skew_ms: i64,
    version: Option<&'static str>,
}

impl Headers {
    fn seed(token: &str) -> Headers {
        Headers {
            token: Some(token.into()),
            version: Some("1.0.0"),
            ..Headers::default()
        }
    }

    fn signed(key: &NewKey) -> Headers {
        Headers {
            secret: key.secret.clone(),
            ..Headers::seed(&key.token)
        }
    }
}

impl Server {
    async fn start(auth: bool) -> Server {
        Server::start_with(auth, |_| {}).await
    }

    async fn start_with(auth: bool, tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), SyncMode::Normal)
            .await
            .expect("store");
        let admin = NewKey::generate("root", Role::Admin, KeyMode::Simple);
        let signed = NewKey::generate("signer", Role::Submitter, KeyMode::Signed);
        let viewer = NewKey::generate("eyes", Role::Viewer, KeyMode::Simple);
        for key in [&admin, &signed, &viewer] {
            store.create_key(key, unix_now()).await.expect("key");
        }
        drop(store);
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
        config.auth = auth;
        config.max_body_bytes = 4096;
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
            admin,
            signed,
            viewer,
            _dir: dir,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        h: &Headers,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = &h.token {
            req = req.header("token", token);
        }
        if let Some(version) = h.version {
            req = req.header("version", version);
        }
        let ts = ((unix_now() * 1000.0) as i64 + h.skew_ms).to_string();
        req = req.header("timestamp", &ts);
        let sign_str = h
            .secret
            .as_deref()
            .map(|s| signing::sign(s, &ts, method.as_str(), path, body.as_bytes()))
            .unwrap_or_default();
        req = req.header("sign_str", sign_str);
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn change(&self, h: &Headers, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, PATH, h, &body.to_string()).await
    }

    /// Submits as admin; answers the task id.
    async fn submit(&self, body: Value) -> i64 {
        let (status, answer) = self
            .send(
                Method::POST,
                "/api/v1/tasks",
                &Headers::seed(&self.admin.token),
                &body.to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        answer["task_id"].as_i64().expect("task_id")
    }

    async fn task(&self, task_id: i64) -> Value {
        let path = format!("/api/v1/tasks/{task_id}");
        let (status, answer) = self
            .send(Method::GET, &path, &Headers::seed(&self.admin.token), "")
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task");
    }
}

/// Asserts the seed's envelope with `code` and `status`; answers its message.
fn envelope(answer: &(StatusCode, Value), status: StatusCode, code: &str) -> String {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["data"].is_null() && body.get("data").is_some(),
        "{body}"
    );
    let message = body["message"].as_str().expect("message").to_string();
    assert!(!message.is_empty());
    assert!(
        body.get("detail").is_none(),
        "the seed envelope, not {{detail}}: {body}"
    );
    message
}

#[tokio::test]
async fn change_points_succeeds_with_the_seeds_envelope_for_simple_and_signed_keys() {
    let s = Server::start(true).await;
    let task = s.submit(json!({"code": "print(1)"})).await;
    let answer = s
        .change(
            &Headers::seed(&s.admin.token),
            json!({"task_id": task, "points": 3}),
        )
        .await;
    assert_eq!(answer.0, StatusCode::OK);
    assert_eq!(
        answer.1,
        json!({"code": "0000", "message": "success", "data": null})
    );
    assert_eq!(s.task(task).await["points"], 3);

    // A signed submitter key, signing the body it sends.
    let answer = s
        .change(
            &Headers::signed(&s.signed),
            json!({"task_id": task, "points": 2}),
        )
        .await;
    assert_eq!(answer.1["code"], "0000", "{}", answer.1);
    let got = s.task(task).await;
    assert_eq!(got["points"], 2);
    assert_eq!(got["status"], "pending", "no node yet: it waits");
    // Submitting with points works too, and /status shows them.
    let multi = s.submit(json!({"code": "print(2)", "points": 4})).await;
    let (_, status) = s
        .send(
            Method::GET,
            &format!("/status/{multi}"),
            &Headers::seed(&s.admin.token),
            "",
        )
        .await;
    assert_eq!(status["points"], 4, "{status}");
    assert_eq!(status["runs"], json!([]), "{status}");
    s.shutdown().await;
}

#[tokio::test]
async fn every_refused_credential_has_its_code_and_status() {
    let s = Server::start(true).await;
    let task = s.submit(json!({"code": "print(1)"})).await;
    let body = json!({"task_id": task, "points": 2});

    let none = Headers {
        version: Some("1.0.0"),
        ..Headers::default()
    };
    let m = envelope(
        &s.change(&none, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "1001",
    );
    assert!(m.contains("missing credentials"), "{m}");

    let unknown = Headers::seed("lull_not-a-key");
    envelope(
        &s.change(&unknown, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "1002",
    );

    let mut forged = Headers::signed(&s.signed);
    forged.secret = Some("not-the-secret".into());
    let m = envelope(
        &s.change(&forged, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "1003",
    );
    assert!(m.contains("bad signature"), "{m}");
    let unsigned = Headers::seed(&s.signed.token);
    let m = envelope(
        &s.change(&unsigned, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "1003",
    );
    assert!(m.contains("sign_str"), "{m}");

    let mut stale = Headers::signed(&s.signed);
    stale.skew_ms = -10 * 60 * 1000;
    let m = envelope(
        &s.change(&stale, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "1004",
    );
    assert!(m.contains("stale timestamp"), "{m}");

    let viewer = Headers::seed(&s.viewer.token);
    let m = envelope(
        &s.change(&viewer, body.clone()).await,
        StatusCode::FORBIDDEN,
        "1005",
    );
    assert!(m.contains("role viewer"), "{m}");

    // None of these changed anything.
    assert_eq!(s.task(task).await["points"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn every_bad_request_and_task_state_has_its_code_and_status() {
    let s = Server::start(true).await;
    let admin = Headers::seed(&s.admin.token);
    let task = s.submit(json!({"code": "print(1)"})).await;

    let mut versionless = admin.clone();
    versionless.version = None;
    let m = envelope(
        &s.change(&versionless, json!({"task_id": task, "points": 2}))
            .await,
        StatusCode::BAD_REQUEST,
        "1006",
    );
    assert!(m.contains("version"), "{m}");
    let mut future = admin.clone();
    future.version = Some("2.0.0");
    envelope(
        &s.change(&future, json!({"task_id": task, "points": 2}))
            .await,
        StatusCode::BAD_REQUEST,
        "1007",
    );

    let malformed = s.send(Method::POST, PATH, &admin, "{\"task_id\": ").await;
    envelope(&malformed, StatusCode::BAD_REQUEST, "2001");
    let empty = s.send(Method::POST, PATH, &admin, "").await;
    envelope(&empty, StatusCode::BAD_REQUEST, "2001");
    for bad in [
        json!({"task_id": task}),
        json!({"points": 2}),
        json!({"task_id": "one", "points": 2}),
        json!({"task_id": task, "points": 2.5}),
        json!({"task_id": task, "points": 2, "extra": true}),
        json!([task, 2]),
    ] {
        envelope(
            &s.change(&admin, bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "2002",
        );
    }
    let huge = json!({"task_id": task, "points": 2, "pad": "x".repeat(5000)}).to_string();
    envelope(
        &s.send(Method::POST, PATH, &admin, &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "2003",
    );
    for points in [0_i64, -1, 65, 1_000_000_000_000] {
        let m = envelope(
            &s.change(&admin, json!({"task_id": task, "points": points}))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "2004",
        );
        assert!(m.contains("points must be between 1 and 64"), "{m}");
    }

    let m = envelope(
        &s.change(&admin, json!({"task_id": 999_999, "points": 2}))
            .await,
        StatusCode::NOT_FOUND,
        "3001",
    );
    assert!(m.contains("999999"), "{m}");
    let (status, _) = s
        .send(
            Method::POST,
            &format!("/api/v1/tasks/{task}/cancel"),
            &admin,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let m = envelope(
        &s.change(&admin, json!({"task_id": task, "points": 2}))
            .await,
        StatusCode::CONFLICT,
        "3002",
    );
    assert!(m.contains("cancelled"), "{m}");

    let wrong_method = s.send(Method::GET, PATH, &admin, "").await;
    envelope(&wrong_method, StatusCode::METHOD_NOT_ALLOWED, "4005");
    s.shutdown().await;
}

#[tokio::test]
async fn with_auth_off_the_seed_headers_are_accepted_unchecked_but_version_is_required() {
    let s = Server::start(false).await;
    let task = s.submit(json!({"code": "print(1)"})).await;
    // Any token, any timestamp, an empty sign_str: not checked without auth.
    let mut anyone = Headers::seed("YOUR_API_TOKEN");
    anyone.skew_ms = -365 * 24 * 3600 * 1000;
    let answer = s
        .change(&anyone, json!({"task_id": task, "points": 5}))
        .await;
    assert_eq!(
        answer.1,
        json!({"code": "0000", "message": "success", "data": null})
    );
    assert_eq!(s.task(task).await["points"], 5);
    anyone.version = None;
    envelope(
        &s.change(&anyone, json!({"task_id": task, "points": 2}))
            .await,
        StatusCode::BAD_REQUEST,
        "1006",
    );
    assert_eq!(s.task(task).await["points"], 5);
    s.shutdown().await;
}

#[tokio::test]
async fn a_key_over_its_rate_limit_gets_4029_with_retry_after() {
    // A budget of one request, refilled once every 1,000 s: the second request is over it.
    let s = Server::start_with(true, |c| c.rate_limit = RateLimit::new(0.001, 1.0)).await;
    let body = json!({"task_id": 1, "points": 2}).to_string();
    // The first is within the budget (and refused for the viewer's role).
    let first = s
        .send(Method::POST, PATH, &Headers::seed(&s.viewer.token), &body)
        .await;
    envelope(&first, StatusCode::FORBIDDEN, "1005");
    let resp = s
        .http
        .post(format!("{}{PATH}", s.base))
        .header("content-type", "application/json")
        .header("token", &s.viewer.token)
        .header("version", "1.0.0")
        .header("timestamp", ((unix_now() * 1000.0) as i64).to_string())
        .header("sign_str", "")
        .body(body)
        .send()
        .await
        .expect("request");
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header in seconds");
    assert!(retry_after >= 1, "{retry_after}");
    let status = resp.status();
    let answer = (status, resp.json::<Value>().await.expect("json"));
    envelope(&answer, StatusCode::TOO_MANY_REQUESTS, "4029");
    s.shutdown().await;
}
