//! Checks on serving replicas: ready, following the trainer's generation, answering as the
//! trainer does.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::http;
use crate::stage::Stage;

/// Waits until `GET /readyz` answers 200; how long it took.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if matches!(http::get(addr, "/readyz").await, Some((200, _))) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Waits until the replica serves the trainer's model version and the trainer's version
/// stopped moving; `(trainer, replica)` versions at the end.
pub async fn wait_following(
    trainer: SocketAddr,
    replica: SocketAddr,
    timeout: Duration,
) -> (Option<i64>, Option<i64>, bool) {
    let started = Instant::now();
    let mut last = (None, None);
    while started.elapsed() < timeout {
        let t = http::model(trainer).await.map(|m| m.0);
        let r = http::model(replica).await.map(|m| m.0);
        last = (t, r);
        if t.is_some() && t == r {
            return (t, r, true);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (last.0, last.1, false)
}

/// The recalled item ids of `user` (top 20).
async fn recall(addr: SocketAddr, user: &str) -> Option<Vec<String>> {
    let (status, body) = http::get(addr, &format!("/v1/recall/{user}?k=20")).await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(
        v["items"]
            .as_array()?
            .iter()
            .filter_map(|i| i["item_id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Records the replica checks: ready, same model version as the trainer, same answers for
/// a few users (a frozen catalogue or history would show here).
pub async fn check_replica(st: &mut Stage<'_>, trainer: SocketAddr, replica: SocketAddr) {
    let ready = wait_ready(replica, Duration::from_secs(60)).await;
    st.check(
        "replica /readyz is 200",
        ready.is_some(),
        match ready {
            Some(d) => format!(
                "ready {:.1} s after the stream was accounted",
                d.as_secs_f64()
            ),
            None => "not ready within 60 s".into(),
        },
    );
    let (t, r, ok) = wait_following(trainer, replica, Duration::from_secs(60)).await;
    st.check(
        "replica serves the trainer's model version",
        ok,
        format!("trainer {t:?}, replica {r:?}"),
    );
    let users: Vec<String> = st.traffic(|tr| {
        (0..5)
            .map(|i| tr.world.users[i * 7 % tr.world.users.len()].id.to_string())
            .collect()
    });
    let (same, waited, why) = wait_same_answers(trainer, replica, &users, ANSWER_WAIT).await;
    st.check(
        "replica answers as the trainer (top 20)",
        same == users.len(),
        match why {
            None => format!(
                "identical for {same} of {} users, {:.1} s after the versions matched",
                users.len(),
                waited.as_secs_f64()
            ),
            Some(why) => format!(
                "identical for {same} of {} users after {:.0} s: {why}",
                users.len(),
                waited.as_secs_f64()
            ),
        },
    );
}

/// How long a replica may take, once it serves the trainer's version, to answer as the
/// trainer does: its catalogue and click histories come from its own consumers, which after a
/// broker restart reconnect on librdkafka's backoff (up to 10 s) and then catch up.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Compares the trainer's and the replica's top 20 for `users` until they agree for all or
/// `timeout` passes: how many agreed last, after how long, and (when they never all agreed)
/// what differed, so a failure tells a lagging catalogue from diverged histories.
async fn wait_same_answers(
    trainer: SocketAddr,
    replica: SocketAddr,
    users: &[String],
    timeout: Duration,
) -> (usize, Duration, Option<String>) {
    let started = Instant::now();
    loop {
        let mut same = 0;
        let mut first_diff = None;
        for u in users {
            let a = recall(trainer, u).await;
            let b = recall(replica, u).await;
            if a.is_some() && a == b {
                same += 1;
            } else if first_diff.is_none() {
                first_diff = Some(describe_difference(u, a.as_deref(), b.as_deref()));
            }
        }
        let Some(diff) = first_diff else {
            return (same, started.elapsed(), None);
        };
        if started.elapsed() >= timeout {
            let (t, r) = (catalog_items(trainer).await, catalog_items(replica).await);
            let why = format!("{diff}; catalogue items trainer {t:?}, replica {r:?}");
            return (same, started.elapsed(), Some(why));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One user's two answers in a line: which items only one side recalled.
fn describe_difference(user: &str, a: Option<&[String]>, b: Option<&[String]>) -> String {
    let (Some(a), Some(b)) = (a, b) else {
        return format!(
            "user {user}: trainer answered {}, replica {}",
            a.is_some(),
            b.is_some()
        );
    };
    let only = |x: &[String], y: &[String]| -> Vec<String> {
        x.iter().filter(|i| !y.contains(i)).cloned().collect()
    };
    format!(
        "user {user}: only the trainer recalled {:?}, only the replica {:?} (same set, other order: {})",
        only(a, b),
        only(b, a),
        only(a, b).is_empty() && only(b, a).is_empty()
    )
}

/// The `towerstream_catalog_items` gauge of a child.
async fn catalog_items(addr: SocketAddr) -> Option<f64> {
    let (_, page) = http::get(addr, "/metrics").await?;
    Some(http::metric_sum(&page, "towerstream_catalog_items", ""))
}
