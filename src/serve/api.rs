//! The HTTP API (axum): recall, model info, metrics, health and readiness.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/recall` | [`RecallRequest`] → [`RecallResponse`](super::RecallResponse) |
//! | `GET /v1/recall/{user_id}?k=&category=&include_clicked=` | the same for a stored user |
//! | `GET /v1/model` | version, step, catalogue size, generation age |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while every worker runs, 503 naming the ones that stopped |
//! | `GET /readyz` | 200 once a generation is served, 503 before or once a worker stopped |
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status for the caller's mistakes (bad JSON,
//! bad `k`, oversize body: 413), 503 before the first generation, 503 with `Retry-After` when
//! the recall slots and their queue are full (see [`super::admission`]), and 408 when a
//! request's `serve.request_timeout_ms` passes while it waits or computes. The schema is
//! `schemas/openapi.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;

use super::admission::{Admission, Refusal};
use super::{recall_timed, RecallError, RecallRequest, RecallResponse, ServeState};
use crate::config::ServeConfig;

/// A JSON error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: msg.into() })).into_response()
}

/// Query string of `GET /v1/recall/{user_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallQuery {
    k: Option<usize>,
    category: Option<String>,
    #[serde(default)]
    include_clicked: bool,
}

/// `GET /v1/model`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model version (training step of the served snapshot).
    pub model_version: i64,
    /// Generation number.
    pub generation: u64,
    /// Items in the index.
    pub catalog_size: usize,
    /// Seconds since the generation was published.
    pub generation_age_seconds: f64,
    /// Seconds it took to embed and index.
    pub build_seconds: f64,
    /// Bytes of the index.
    pub index_memory_bytes: usize,
    /// Items searched exactly on top of the main HNSW index (changed or new since it was
    /// built; large catalogues only).
    pub delta_items: usize,
}

/// The router's state: what recall needs, and the admission in front of it.
#[derive(Clone)]
struct Api {
    serve: ServeState,
    admission: Arc<Admission>,
    timeout: Duration,
}

/// Why a recall produced no answer.
enum Failed {
    Recall(RecallError),
    Refused(Refusal),
}

/// Admits the request, then computes it on the blocking pool within its deadline. A
/// computation that outlives the deadline is answered 408 and finishes in the background,
/// still holding its slot, so the slots keep bounding the CPU spent on recall.
async fn compute(api: &Api, req: RecallRequest) -> Result<RecallResponse, Failed> {
    let deadline = tokio::time::Instant::now() + api.timeout;
    let permit = api
        .admission
        .admit(deadline)
        .await
        .map_err(Failed::Refused)?;
    let Some(generation) = api.serve.served.load() else {
        return Err(Failed::Recall(RecallError::NotReady));
    };
    let (ctx, stages) = (
        api.serve.ctx.clone(),
        api.serve.metrics.serve.recall_stage_seconds.clone(),
    );
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let (response, took) = recall_timed(&generation, &ctx, &req)?;
        if let Some(took) = took {
            for (stage, t) in [("user_tower", took.user_tower), ("search", took.search)] {
                stages.with_label_values(&[stage]).observe(t.as_secs_f64());
            }
        }
        Ok(response)
    });
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(r)) => r.map_err(Failed::Recall),
        Ok(Err(join)) => Err(Failed::Recall(RecallError::Internal(join.to_string()))),
        Err(_) => Err(Failed::Refused(Refusal::TimedOut)),
    }
}

async fn answer(api: &Api, req: RecallRequest) -> Response {
    let started = Instant::now();
    let state = &api.serve;
    let (status, resp) = match compute(api, req).await {
        Ok(r) => (StatusCode::OK, Json(r).into_response()),
        Err(Failed::Refused(Refusal::Overloaded)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            (
                [(header::RETRY_AFTER, "1")],
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "overloaded: {} recalls computing and {} waiting (serve.max_concurrent_recalls, serve.max_queued_recalls); retry",
                        api.admission.in_flight(),
                        api.admission.queued()
                    ),
                ),
            )
                .into_response(),
        ),
        Err(Failed::Refused(Refusal::TimedOut)) => (
            StatusCode::REQUEST_TIMEOUT,
            error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "no answer within serve.request_timeout_ms = {} ms",
                    api.timeout.as_millis()
                ),
            ),
        ),
        Err(Failed::Recall(e)) => recall_error(e),
    };
    let m = &state.metrics.serve;
    m.request_seconds.observe(started.elapsed().as_secs_f64());
    m.requests.with_label_values(&[status.as_str()]).inc();
    resp
}

fn recall_error(e: RecallError) -> (StatusCode, Response) {
    match e {
        RecallError::BadRequest(m) => (StatusCode::BAD_REQUEST, error(StatusCode::BAD_REQUEST, m)),
        e @ RecallError::NotReady => (
            StatusCode::SERVICE_UNAVAILABLE,
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        ),
        e => {
            tracing::error!(error = %e, "recall failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            )
        }
    }
}

fn rejected(state: &ServeState, status: StatusCode, msg: String) -> Response {
    state
        .metrics
        .serve
        .requests
        .with_label_values(&[status.as_str()])
        .inc();
    error(status, msg)
}

async fn post_recall(
    State(api): State<Api>,
    body: Result<Json<RecallRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) => answer(&api, req).await,
        Err(r) => {
            let status = match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                _ => StatusCode::BAD_REQUEST,
            };
            rejected(&api.serve, status, r.body_text())
        }
    }
}

async fn get_recall(
    State(api): State<Api>,
    Path(user_id): Path<String>,
    query: Result<Query<RecallQuery>, QueryRejection>,
) -> Response {
    match query {
        Ok(Query(q)) => {
            let req = RecallRequest {
                user_id: Some(user_id),
                k: q.k,
                category: q.category,
                include_clicked: q.include_clicked,
                ..Default::default()
            };
            answer(&api, req).await
        }
        Err(r) => rejected(&api.serve, StatusCode::BAD_REQUEST, r.body_text()),
    }
}

async fn model(State(state): State<ServeState>) -> Response {
    match state.served.load() {
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model generation is being served yet",
        ),
        Some(g) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            Json(ModelInfo {
                model_version: g.model.step,
                generation: g.number,
                catalog_size: g.catalog_size(),
                generation_age_seconds: (now - g.published_unix).max(0.0),
                build_seconds: g.build_seconds,
                index_memory_bytes: g.index.memory_bytes(),
                delta_items: g.delta_len(),
            })
            .into_response()
        }
    }
}

async fn metrics(State(state): State<ServeState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /healthz`: every worker and its state; 503 once one stopped unexpectedly, so a
/// liveness probe restarts a process whose training or following died.
#[derive(Debug, Serialize, Deserialize)]
pub struct HealthBody {
    /// `ok`, or `failing` once a worker stopped.
    pub status: String,
    /// The failures, as one message (only when failing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every registered worker: its `state` (`running`, `stopped`, `failed`) and, when failed,
    /// the `reason`.
    pub workers: serde_json::Value,
}

/// The failures as one message, `None` while every worker runs.
fn failing(state: &ServeState) -> Option<String> {
    let failures = state.health.failures();
    (!failures.is_empty()).then(|| {
        failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

async fn healthz(State(state): State<ServeState>) -> Response {
    let error = failing(&state);
    let status = match error {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = HealthBody {
        status: if error.is_none() { "ok" } else { "failing" }.into(),
        error,
        workers: serde_json::to_value(state.health.workers()).unwrap_or_default(),
    };
    (status, Json(body)).into_response()
}

async fn readyz(State(state): State<ServeState>) -> Response {
    if let Some(e) = failing(&state) {
        return error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    match state.served.load() {
        Some(g) => {
            Json(serde_json::json!({"status": "ready", "generation": g.number})).into_response()
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first generation",
        ),
    }
}

/// The router with every route, the body limit, recall admission and the request timeout.
pub fn router(state: ServeState, config: &ServeConfig) -> Router {
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let api = Api {
        serve: state.clone(),
        admission: Arc::new(Admission::new(
            config.max_concurrent_recalls,
            config.max_queued_recalls,
        )),
        timeout,
    };
    let recall_routes = Router::new()
        .route("/v1/recall", post(post_recall))
        .route("/v1/recall/{user_id}", get(get_recall))
        .with_state(api);
    Router::new()
        .route("/v1/model", get(model))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(recall_routes)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // The recall routes answer 408 themselves; this bounds every other route too.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout + Duration::from_millis(100),
        ))
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The API could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The configured address.
    pub addr: String,
    /// Cause.
    pub source: std::io::Error,
}

/// A running API server.
pub struct Running {
    /// Where it listens (the real port when `serve.listen` asked for port 0).
    pub addr: std::net::SocketAddr,
    /// Cancel to stop accepting and finish the requests in flight.
    pub stop: tokio_util::sync::CancellationToken,
    /// The server task.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `config.listen` and serves `state` on it until [`Running::stop`].
pub async fn start(state: ServeState, config: &ServeConfig) -> Result<Running, ListenError> {
    let failed = |source| ListenError {
        addr: config.listen.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = state.health.register(crate::health::API);
    let task = tokio::spawn(worker.watch(serve(listener, router(state, config), stop.clone())));
    Ok(Running { addr, stop, task })
}
