//! HTTP load generators for `POST /v1/recall` (`towerstream bench`, the serve benchmark),
//! cycling through the given users for a fixed time:
//!
//! * closed loop ([`recall_load`]): `connections` clients each send the next request as soon
//!   as the previous one answered — the most a server does, but a slow answer also delays
//!   the requests behind it, so the tail it reports is too kind (coordinated omission);
//! * open loop ([`open_loop`]): requests leave at a fixed rate whatever the answers do, and
//!   each latency is measured from the moment the request was *meant* to leave — what users
//!   arriving at that rate see, queueing included.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests answered otherwise, or failed.
    pub errors: u64,
    /// Length of the run.
    pub seconds: f64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    /// Median latency of successful requests (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Slowest request (ms).
    pub max_ms: f64,
}

/// The `p` quantile (0..=1) of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sends recall requests for `users` (cycled) with `k` to `base` (e.g. `http://127.0.0.1:8080`)
/// from `connections` concurrent clients for `seconds`.
pub async fn recall_load(
    base: &str,
    users: &[String],
    k: usize,
    seconds: f64,
    connections: usize,
) -> LoadReport {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let url = format!("{}/v1/recall", base.trim_end_matches('/'));
    let users: std::sync::Arc<Vec<String>> = std::sync::Arc::new(users.to_vec());
    let connections = connections.max(1);
    let mut tasks = Vec::new();
    for w in 0..connections {
        let (client, url, users) = (client.clone(), url.clone(), users.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            let mut i = w;
            while Instant::now() < deadline {
                let user = users
                    .get(i % users.len().max(1))
                    .cloned()
                    .unwrap_or_default();
                let body = serde_json::json!({"user_id": user, "k": k}).to_string();
                let Ok(req) = hyper::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                else {
                    errors += 1;
                    break;
                };
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(resp) => {
                        let _ = resp.into_body().collect().await;
                        errors += 1;
                    }
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                i += connections;
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0u64);
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    LoadReport {
        ok: all.len() as u64,
        errors,
        seconds,
        requests_per_second: all.len() as f64 / seconds.max(1e-9),
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().copied().unwrap_or(0.0),
    }
}

/// What an open-loop run measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoopReport {
    /// Target arrival rate (requests/s).
    pub rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    /// Shed: 503 (overloaded or not ready).
    pub shed: u64,
    /// Timed out: 408.
    pub timed_out: u64,
    /// Any other status, or no answer.
    pub errors: u64,
    /// Length of the run (until the last answer).
    pub seconds: f64,
    /// Latency of the 200s from their intended send time (ms): median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// The 99th percentile of the 200s sent in each [`WINDOW_SECONDS`] of the run, in order:
    /// whether the tail is spread over the run or comes from one stretch of it.
    pub p99_by_window_ms: Vec<f64>,
}

/// Length of the windows of [`OpenLoopReport::p99_by_window_ms`].
pub const WINDOW_SECONDS: f64 = 10.0;

/// Sends recall requests for `users` (cycled) with `k` to `base` at `rate` per second for
/// `seconds`, each on its own task at its scheduled time, and waits for every answer.
pub async fn open_loop(
    base: &str,
    users: &[String],
    k: usize,
    rate: f64,
    seconds: f64,
) -> OpenLoopReport {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/v1/recall", base.trim_end_matches('/'));
    let total = (rate * seconds).round().max(1.0) as u64;
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let intended = started + Duration::from_secs_f64(i as f64 / rate.max(1e-9));
        tokio::time::sleep_until(intended).await;
        let user = users
            .get(i as usize % users.len().max(1))
            .cloned()
            .unwrap_or_default();
        let body = serde_json::json!({"user_id": user, "k": k}).to_string();
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let req = hyper::Request::post(&url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)));
            let status = match req {
                Ok(req) => match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        status
                    }
                    Err(_) => 0,
                },
                Err(_) => 0,
            };
            let sent_at = (intended - started).as_secs_f64();
            (status, intended.elapsed().as_secs_f64() * 1000.0, sent_at)
        });
    }
    let (mut lat, mut r) = (
        Vec::new(),
        OpenLoopReport {
            rate,
            sent: total,
            ok: 0,
            shed: 0,
            timed_out: 0,
            errors: 0,
            seconds: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            p99_by_window_ms: Vec::new(),
        },
    );
    let mut windows: Vec<Vec<f64>> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((200, ms, sent_at)) => {
                r.ok += 1;
                lat.push(ms);
                let w = (sent_at / WINDOW_SECONDS) as usize;
                if windows.len() <= w {
                    windows.resize_with(w + 1, Vec::new);
                }
                windows[w].push(ms);
            }
            Ok((503, ..)) => r.shed += 1,
            Ok((408, ..)) => r.timed_out += 1,
            _ => r.errors += 1,
        }
    }
    r.p99_by_window_ms = windows
        .into_iter()
        .map(|mut w| {
            w.sort_by(f64::total_cmp);
            percentile(&w, 0.99)
        })
        .collect();
    r.seconds = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    r.p50_ms = percentile(&lat, 0.5);
    r.p99_ms = percentile(&lat, 0.99);
    r.p999_ms = percentile(&lat, 0.999);
    r.max_ms = lat.last().copied().unwrap_or(0.0);
    r
}
