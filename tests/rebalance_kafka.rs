//! Rebalances against the real broker: a second trainer joins the group (partitions move away
//! and, eagerly, come back), then leaves (its partitions are handed back). Whatever moves, each
//! click produced while both run is trained by exactly one of them, and neither model trains a
//! click twice: the revoking owner waits for its step, commits what it applied with a resume
//! point, and forgets the partition's join state; the next owner skips what was applied —
//! also when a long join window makes the resume point too large for commit metadata and it
//! travels through the handover topic instead.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use towerstream::app::{start_training, Training};
use towerstream::config::Config;
use towerstream::metrics::Metrics;
use towerstream::train::ledger::surviving;
use towerstream::train::online::{Hooks, Stop};

fn config(base: &Config, dir: &Path) -> Config {
    let mut c = base.clone();
    c.train.batch_size = 16;
    c.train.max_wait_ms = 50;
    c.model.tower_dims = vec![16, 8];
    c.join.window_ms = 2_000;
    c.checkpoint.dir = dir.join("checkpoints");
    c.checkpoint.ledger = dir.join("ledger.jsonl");
    c.checkpoint.every_secs = 0;
    c
}

/// One phase of traffic: requests of one impression each, every third one clicked; returns
/// the number of clicks.
async fn phase(c: &Config, from: usize, n: usize) -> u64 {
    let mut records = Vec::new();
    let mut clicks = 0;
    for r in from..from + n {
        let (user, item, t) = (
            format!("u{}", r % 10),
            format!("i{}", r % 7),
            100 * r as i64,
        );
        let imp = format!("imp{r}");
        records.push((
            Some(user.clone()),
            impression_json(&imp, t, &user, &item, 0),
            None,
        ));
        if r % 3 == 0 {
            let ev = format!("c{r}");
            records.push((
                Some(user.clone()),
                click_json(&ev, t + 50, &user, &item, Some(&imp)),
                None,
            ));
            clicks += 1;
        }
    }
    produce(c, &c.kafka.event_topics[0], &records).await;
    clicks
}

fn clicks_trained(m: &Metrics) -> f64 {
    ["click_joined", "click_unjoined"]
        .iter()
        .map(|l| metric_or_zero(m, "towerstream_train_examples_total", &[("label", l)]))
        .sum()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn trainer(c: &Config, stop: &Stop, m: &Metrics) -> Training {
    let (hooks, catalog, health) = (Hooks::default(), Default::default(), Default::default());
    start_training(c, m, stop.clone(), hooks, catalog, &health)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_moved_away_and_handed_back_train_each_click_once() {
    let base = unique_config("rebalance");
    create_topics(&base, 4).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, mut cb) = (config(&base, dir_a.path()), config(&base, dir_b.path()));
    // B joins to share the work: from the group's commits, not from the beginning.
    cb.kafka.fresh_start = towerstream::config::FreshStart::Committed;
    let (ma, mb) = (Metrics::new(), Metrics::new());
    let (stop_a, stop_b) = (Stop::default(), Stop::default());

    let a = trainer(&ca, &stop_a, &ma).await;
    let mut expected = phase(&ca, 0, 120).await;
    wait_until("A trains phase 1", || {
        clicks_trained(&ma) >= expected as f64
    })
    .await;

    // B joins: A's partitions are revoked (eagerly: all of them) and split between the two.
    let b = trainer(&cb, &stop_b, &mb).await;
    let rebalanced =
        |m: &Metrics| metric_or_zero(m, "towerstream_rebalances_total", &[("kind", "assign")]);
    wait_until("B gets partitions", || rebalanced(&mb) >= 1.0).await;
    let before_b = clicks_trained(&mb);
    let phase2 = phase(&ca, 120, 120).await;
    expected += phase2;
    wait_until("phase 2 trained", || {
        clicks_trained(&ma) + clicks_trained(&mb) - before_b >= expected as f64
    })
    .await;

    // B leaves: its partitions are handed back to A with B's resume points.
    stop_b.graceful.cancel();
    b.task.await.unwrap().unwrap();
    let phase3 = phase(&ca, 240, 120).await;
    expected += phase3;
    wait_until("phase 3 trained", || {
        clicks_trained(&ma) + clicks_trained(&mb) - before_b >= expected as f64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a duplicate would arrive now
    stop_a.graceful.cancel();
    a.task.await.unwrap().unwrap();

    let read = |c: &Config| surviving(&std::fs::read_to_string(&c.checkpoint.ledger).unwrap());
    let (la, lb) = (read(&ca), read(&cb));
    let positives = |l: &HashMap<(u16, i32, i64, u8), u32>| {
        l.iter()
            .filter(|(k, _)| k.3 == 1)
            .map(|(k, n)| (*k, *n))
            .collect::<HashMap<_, _>>()
    };
    let (pa, pb) = (positives(&la), positives(&lb));
    let twice = |p: &HashMap<(u16, i32, i64, u8), u32>| p.iter().filter(|(_, n)| **n > 1).count();
    assert_eq!(twice(&pa), 0, "clicks A trained twice");
    assert_eq!(twice(&pb), 0, "clicks B trained twice");
    // Every click in exactly one of the two models, whichever owned its partition when.
    let in_both = pa.keys().filter(|k| pb.contains_key(k)).count();
    let union = pa.len() + pb.keys().filter(|k| !pa.contains_key(k)).count();
    assert_eq!(union as u64, expected, "every click trained by A or B");
    assert_eq!(in_both, 0, "clicks trained by both A and B");
    let late_in_a = metric_value(&ma, "towerstream_duplicate_events_total", &[]);
    assert_eq!(
        late_in_a, 0.0,
        "A re-read nothing it had to drop as a duplicate"
    );
}

/// Milliseconds since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_point_too_large_for_commit_metadata_is_handed_over_through_the_topic() {
    let base = unique_config("rebalance-handover");
    create_topics(&base, 2).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut ca, mut cb) = (config(&base, dir_a.path()), config(&base, dir_b.path()));
    for c in [&mut ca, &mut cb] {
        // An hour-long window: every impression stays held (unapplied) while its click is
        // trained, so a partition's resume point lists thousands of offsets (> 4 KB).
        c.join.window_ms = 3_600_000;
        c.train.batch_size = 64;
    }
    cb.kafka.fresh_start = towerstream::config::FreshStart::Committed;
    let (ma, mb) = (Metrics::new(), Metrics::new());
    let (stop_a, stop_b) = (Stop::default(), Stop::default());

    let a = trainer(&ca, &stop_a, &ma).await;
    let (requests, start) = (8_000usize, now_ms() - 600_000);
    let mut records = Vec::with_capacity(2 * requests);
    for r in 0..requests {
        let (user, item, t) = (
            format!("u{}", r % 10),
            format!("i{}", r % 7),
            start + 10 * r as i64,
        );
        let (imp, partition) = (format!("imp{r}"), Some((r % 2) as i32));
        records.push((
            Some(user.clone()),
            impression_json(&imp, t, &user, &item, 0),
            partition,
        ));
        let click = click_json(&format!("c{r}"), t + 5, &user, &item, Some(&imp));
        records.push((Some(user), click, partition));
    }
    produce(&ca, &ca.kafka.event_topics[0], &records).await;
    wait_until("A trains every click", || {
        clicks_trained(&ma) >= requests as f64
    })
    .await;

    // B joins: eagerly, both partitions are revoked from A and one moves to B, with a resume
    // point of ~4,000 applied clicks among ~4,000 held impressions.
    let b = trainer(&cb, &stop_b, &mb).await;
    let clicks_read = |m: &Metrics| {
        metric_or_zero(
            m,
            "towerstream_events_consumed_total",
            &[("topic", &ca.kafka.event_topics[0]), ("type", "click")],
        )
    };
    wait_until("B re-reads its partition", || {
        clicks_read(&mb) >= (requests / 2) as f64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // B's steps on what it re-read
    stop_b.graceful.cancel();
    b.task.await.unwrap().unwrap();
    stop_a.graceful.cancel();
    a.task.await.unwrap().unwrap();

    let read = |c: &Config| surviving(&std::fs::read_to_string(&c.checkpoint.ledger).unwrap());
    let (la, lb) = (read(&ca), read(&cb));
    let in_both = la.keys().filter(|k| k.3 == 1 && lb.contains_key(k)).count();
    assert_eq!(in_both, 0, "clicks trained by both A and B");
    let handed = metric_value(&ma, "towerstream_handover_records_total", &[]);
    assert!(
        handed >= 1.0,
        "A wrote its large resume points to the handover topic"
    );
    assert_eq!(
        metric_value(&ma, "towerstream_handover_overflows_total", &[]),
        0.0,
        "no resume point was lost"
    );
}
