//! A small HTTP/1 client for the children's APIs: `/metrics`, `/readyz`, `/v1/model`,
//! `/v1/recall`.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Bytes;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// One request: status and body, or `None` when the child does not answer within 5 s.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(
            body.unwrap_or("").to_owned(),
        )))
        .ok()?;
    let call = async {
        let resp = client().request(req).await.ok()?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .ok()
        .flatten()
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    request(addr, "GET", path, None).await
}

/// The values of metric `name` (all label sets) in a Prometheus text page.
pub fn metric<'a>(page: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    let name = name.to_owned();
    page.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name.as_str())?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (l, v) = r.split_once('}')?;
                (l, v)
            }
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        let v = value.trim();
        let v = match v {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            _ => v.parse().ok()?,
        };
        Some((labels, v))
    })
}

/// Sum of metric `name` over the label sets that contain `filter` (all when empty).
pub fn metric_sum(page: &str, name: &str, filter: &str) -> f64 {
    metric(page, name)
        .filter(|(l, _)| l.contains(filter))
        .map(|(_, v)| v)
        .sum()
}

/// `model_version` and `generation` of `GET /v1/model`.
pub async fn model(addr: SocketAddr) -> Option<(i64, u64)> {
    let (status, body) = get(addr, "/v1/model").await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((v["model_version"].as_i64()?, v["generation"].as_u64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_name_and_label() {
        let page = "# HELP x\ntowerstream_join_total{outcome=\"hit\"} 12\ntowerstream_join_total{outcome=\"miss\"} 3\ntowerstream_join_totally 9\ntowerstream_train_loss NaN\n";
        assert_eq!(metric_sum(page, "towerstream_join_total", ""), 15.0);
        assert_eq!(metric_sum(page, "towerstream_join_total", "\"hit\""), 12.0);
        assert!(metric_sum(page, "towerstream_train_loss", "").is_nan());
    }
}
