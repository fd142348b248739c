//! A closed-loop HTTP load generator for `POST /v1/recall` (`towerstream bench`, the serve
//! benchmark): `connections` clients each send the next request as soon as the previous one
//! answered, cycling through the given users, for a fixed time.

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
