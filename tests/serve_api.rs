//! The HTTP API: validation (4xx with a JSON message), readiness, unknown users, and responses
//! that match `schemas/openapi.json`.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use common::world::{trained, Trained};
use towerstream::config::{IndexConfig, ServeConfig};
use towerstream::metrics::Metrics;
use towerstream::refresh::{build, FrozenModel, Served};
use towerstream::serve::api::router;
use towerstream::serve::{Context, ServeState};

fn openapi_schema(name: &str) -> jsonschema::Validator {
    let doc: Value = serde_json::from_str(include_str!("../schemas/openapi.json")).unwrap();
    // Component schemas refer to each other: resolve refs against the whole document.
    let mut schema = doc["components"]["schemas"][name].clone();
    schema["components"] = doc["components"].clone();
    jsonschema::validator_for(&schema).unwrap()
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/v1/recall")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

/// What the API serves from: `served`, the world's catalogue and the trainer's histories.
fn serve_state(t: &Trained, served: &Arc<Served>, metrics: &Metrics) -> ServeState {
    ServeState {
        served: served.clone(),
        ctx: Context {
            catalog: t.catalog.clone(),
            histories: t.trainer.histories(),
            default_k: 10,
        },
        metrics: metrics.clone(),
        health: Default::default(),
    }
}

/// Builds and serves generation 1 from the trained model.
fn publish_first_generation(t: &Trained, served: &Served, metrics: &Metrics) {
    let g = build(
        1,
        Arc::new(FrozenModel::of(&t.trainer)),
        &t.catalog,
        &IndexConfig::default(),
    )
    .unwrap();
    served.publish(g, Some(&metrics.serve));
}

#[tokio::test]
async fn validation_readiness_unknown_users_and_schema() {
    let t = trained(100, 150, 8_000);
    let served = Arc::new(Served::default());
    let metrics = Metrics::new();
    let state = serve_state(&t, &served, &metrics);
    let config = ServeConfig {
        max_body_bytes: 1024,
        ..ServeConfig::default()
    };
    let app = router(state, &config);

    // Before the first generation: alive, not ready, recall answers 503.
    assert_eq!(call(&app, get("/healthz")).await.0, StatusCode::OK);
    let (s, body) = call(&app, get("/readyz")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"].is_string());
    assert_eq!(
        call(&app, post(r#"{"user_id":"u1"}"#)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    publish_first_generation(&t, &served, &metrics);
    assert_eq!(call(&app, get("/readyz")).await.0, StatusCode::OK);

    // A known user, through both routes; responses match the OpenAPI schema.
    let response_schema = openapi_schema("RecallResponse");
    let (s, body) = call(&app, post(r#"{"user_id":"u1","k":5}"#)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 5);
    assert_eq!(body["cold_user"], false);
    assert!(response_schema.is_valid(&body), "{body}");
    let (s, body) = call(&app, get("/v1/recall/u1?k=3&include_clicked=true")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["items"].as_array().unwrap().len(), 3);

    // Bad requests: 4xx with a JSON message.
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post(r#"{"user_id":"u1","k":0}"#),
            StatusCode::BAD_REQUEST,
            "k must be",
        ),
        (
            post(r#"{"user_id":"u1","k":1001}"#),
            StatusCode::BAD_REQUEST,
            "k must be",
        ),
        (
            post(r#"{"user_id":"u1","k":"ten"}"#),
            StatusCode::BAD_REQUEST,
            "k",
        ),
        (post(r#"{"user_id": "u1""#), StatusCode::BAD_REQUEST, "EOF"),
        (
            post(r#"{"user":"u1"}"#),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            post("{}"),
            StatusCode::BAD_REQUEST,
            "user_id, features or history",
        ),
        (
            post(format!(
                r#"{{"user_id":"u1","exclude":["{}"]}}"#,
                "x".repeat(2000)
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
            "length limit",
        ),
        (
            Request::post("/v1/recall")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type",
        ),
        // Dense values that are inf as f32 (1e39) or beyond the events' bound: 400 naming them.
        (
            post(r#"{"user_id":"u1","features":{"dense":{"price":1e39}}}"#),
            StatusCode::BAD_REQUEST,
            "`features.dense.price` must be finite and within ±1e15",
        ),
        (
            post(r#"{"features":{"dense":{"ok":1.5,"spend":-1e308}}}"#),
            StatusCode::BAD_REQUEST,
            "`features.dense.spend`",
        ),
        (get("/v1/recall/u1?k=-3"), StatusCode::BAD_REQUEST, "k"),
        (
            get("/v1/recall/u1?colour=red"),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
    ];
    let error_schema = openapi_schema("Error");
    for (req, want, fragment) in cases {
        let uri = req.uri().to_string();
        let (s, body) = call(&app, req).await;
        assert_eq!(s, want, "{uri}: {body}");
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{uri}: no JSON error in {body}"));
        assert!(msg.contains(fragment), "{uri}: {msg:?} lacks {fragment:?}");
        assert!(error_schema.is_valid(&body));
    }

    // An unknown user with nothing known: popularity fallback, flagged, never an error.
    let (s, body) = call(&app, post(r#"{"user_id":"stranger","k":7}"#)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["cold_user"], true);
    assert_eq!(body["fallback"], "popularity");
    assert_eq!(body["items"].as_array().unwrap().len(), 7);
    // An unknown user with features: a model answer, flagged cold.
    let (s, body) = call(
        &app,
        post(r#"{"user_id":"stranger","features":{"gender":"F","age":30},"k":7}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (body["cold_user"].clone(), body["fallback"].clone()),
        (Value::Bool(true), Value::Null)
    );
    assert!(response_schema.is_valid(&body));
    // Dense values within the bound are answered.
    let (s, body) = call(
        &app,
        post(r#"{"user_id":"u1","features":{"dense":{"price":1e15}},"k":3}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Exclusions and category filters hold.
    let (_, body) = call(
        &app,
        post(r#"{"user_id":"u2","k":20,"exclude":["i0","i1","i2"],"category":"g3"}"#),
    )
    .await;
    let items = body["items"].as_array().unwrap();
    assert!(!items.is_empty());
    for it in items {
        let id = it["item_id"].as_str().unwrap();
        assert!(!["i0", "i1", "i2"].contains(&id));
        let j: usize = id[1..].parse().unwrap();
        let f = &t.world.items[j].features;
        assert!(
            f.category.as_deref() == Some("g3") || f.genres.iter().any(|g| g == "g3"),
            "{id}"
        );
    }

    // Model info and metrics.
    let (s, body) = call(&app, get("/v1/model")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["catalog_size"], 150);
    assert!(openapi_schema("ModelInfo").is_valid(&body));
    let (s, text) = call(&app, get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for name in [
        "towerstream_recall_request_duration_seconds",
        "towerstream_recall_requests_total{status=\"400\"}",
        "towerstream_generation 1",
        "towerstream_index_vectors 150",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    // Where the answered recalls' compute went, stage by stage.
    for stage in ["user_tower", "search"] {
        let count = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "towerstream_recall_stage_seconds_count{{stage=\"{stage}\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok());
        assert!(count.is_some_and(|n| n > 0), "{stage}: {count:?}");
    }
}

/// `/healthz` lists the workers; once one stopped unexpectedly it answers 503 naming it (and
/// `/readyz` fails too), while a worker stopped by a shutdown is no failure.
#[tokio::test]
async fn healthz_fails_naming_a_stopped_worker() {
    use towerstream::features::history::Histories;
    use towerstream::health::{self, Health};
    let metrics = Metrics::new();
    let health = Health::new(&metrics);
    let state = ServeState {
        served: Arc::new(Served::default()),
        ctx: Context {
            catalog: Arc::default(),
            histories: Histories::shared(10, 100),
            default_k: 10,
        },
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let app = router(state, &ServeConfig::default());
    let schema = openapi_schema("Health");
    let train = health.register(health::TRAIN);
    let _refresh = health.register(health::REFRESH);

    let (s, body) = call(&app, get("/healthz")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(schema.is_valid(&body), "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["workers"]["train"]["state"], "running");
    assert!(body.get("error").is_none(), "{body}");

    let _: Result<(), &str> = train.run(|| Err("checkpoint I/O at /data: disk full"));
    let (s, body) = call(&app, get("/healthz")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(schema.is_valid(&body), "{body}");
    assert_eq!(body["status"], "failing");
    assert_eq!(
        body["error"],
        "worker train stopped: checkpoint I/O at /data: disk full"
    );
    assert_eq!(body["workers"]["train"]["state"], "failed");
    assert_eq!(body["workers"]["refresh"]["state"], "running");
    let (s, body) = call(&app, get("/readyz")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(openapi_schema("Error").is_valid(&body), "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("worker train stopped"));
    let up = |w: &str| metrics.worker_up.with_label_values(&[w]).get();
    assert_eq!((up("train"), up("refresh")), (0, 1));
}

/// Past its slots and queue the API sheds (503 with `Retry-After`) instead of queueing, and a
/// request that cannot be answered within `serve.request_timeout_ms` gets a real 408 — while
/// its computation is stuck on the blocking pool, not only while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_retry_after_and_a_stuck_recall_times_out() {
    let t = trained(100, 150, 8_000);
    let served = Arc::new(Served::default());
    let metrics = Metrics::new();
    let histories = t.trainer.histories();
    let state = serve_state(&t, &served, &metrics);
    let config = ServeConfig {
        max_concurrent_recalls: 1,
        max_queued_recalls: 0,
        request_timeout_ms: 300,
        ..ServeConfig::default()
    };
    let app = router(state, &config);
    publish_first_generation(&t, &served, &metrics);
    assert_eq!(
        call(&app, post(r#"{"user_id":"u1"}"#)).await.0,
        StatusCode::OK
    );

    // Hold the histories: the next recall blocks inside its computation, holding the slot.
    // (On a thread of its own: the guard must not live across this test's awaits.)
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (taken, is_taken) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _held = histories.write().unwrap();
        taken.send(()).unwrap();
        released.recv().ok();
    });
    is_taken.recv().unwrap();
    let stuck = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post(r#"{"user_id":"u1"}"#)).await }
    });
    // The first request to take the slot (the spawned one, or a probe if it is quicker)
    // stays stuck inside its computation and is answered 408; every request while the slot
    // is held (and the queue holds none) is shed at once.
    let (mut shed, mut timed_out) = (0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while shed == 0 {
        let resp = app
            .clone()
            .oneshot(post(r#"{"user_id":"u2"}"#))
            .await
            .unwrap();
        match resp.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(resp.headers()["retry-after"], "1");
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                assert!(
                    body["error"].as_str().unwrap().contains("overloaded"),
                    "{body}"
                );
                shed += 1;
            }
            StatusCode::REQUEST_TIMEOUT => timed_out += 1,
            other => panic!("a probe got {other}"),
        }
        assert!(std::time::Instant::now() < deadline, "never shed");
    }
    let (s, body) = stuck.await.unwrap();
    match s {
        StatusCode::REQUEST_TIMEOUT => {
            assert!(body["error"]
                .as_str()
                .unwrap()
                .contains("request_timeout_ms"));
            timed_out += 1;
        }
        StatusCode::SERVICE_UNAVAILABLE => {} // a probe took the slot first
        other => panic!("the first request got {other}: {body}"),
    }
    assert_eq!(
        timed_out, 1,
        "exactly the request holding the slot times out"
    );
    // Released, the stuck computation finishes and frees its slot: answers come back.
    release.send(()).unwrap();
    holder.join().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while call(&app, post(r#"{"user_id":"u1"}"#)).await.0 != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let count = |status: &str| metrics.serve.requests.with_label_values(&[status]).get();
    assert!(
        count("503") >= 1 && count("408") == 1,
        "{} {}",
        count("503"),
        count("408")
    );
}
