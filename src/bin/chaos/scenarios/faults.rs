//! Faults under load: the trainer killed (-9) and restarted, the broker stopped and restarted,
//! a second trainer joining and leaving the group, a replica killed and restarted.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::replicas::{check_replica, wait_ready};
use crate::report::Report;
use crate::stage::{Env, Settings, Stage};
use crate::traffic::{now_ms, Slate};

fn mixed() -> Slate {
    Slate {
        impressions: 3,
        click_prob: 0.7,
        time_ms: now_ms(),
        click_delay_ms: 50,
        partition: None,
    }
}

async fn sleep_secs(s: f64) {
    tokio::time::sleep(Duration::from_secs_f64(s)).await;
}

/// Five `kill -9` of the trainer at random points under load, each followed by a restart.
/// Exact resume (checkpointed resume points) should train nothing twice.
pub async fn kill9(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "kill9", 4, (300, 400), &Settings::default()).await?;
    st.twice_is_failure = false;
    st.publish_tables().await?;
    let mut trainer = st.trainer().await?;
    let stream = st.background(env.pick(2000.0, 4000.0), |t| t.slate(mixed()));
    for _ in 0..5 {
        let wait = st.traffic(|t| env.pick(2.0, 5.0) + t.unit() * env.pick(3.0, 10.0));
        sleep_secs(wait).await;
        st.kill(trainer).await;
        trainer = st.trainer().await?;
    }
    sleep_secs(env.pick(3.0, 10.0)).await;
    stream.stop().await;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    st.stop(trainer).await;
    let restored = st.restored().remove(0);
    st.note(format!(
        "restored steps per start: {restored:?} (0: no checkpoint yet, from the beginning)"
    ));
    let mut report = st.finish(recover).await?;
    let twice = report.tally.trained_more;
    report.notes.push(format!(
        "exact resume across 5 kills: {twice} clicks trained more than once (goal 0; not failing the scenario)"
    ));
    Ok(report)
}

/// The broker stopped mid-stream and started again; the trainer (`train`) and a replica
/// must recover on their own.
pub async fn broker_restart(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "broker-restart", 2, (200, 300), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.start("trainer", "train", Vec::new()).await?;
    let replica = st.start("replica", "serve", Vec::new()).await?;
    let stream = st.background(env.pick(1000.0, 2000.0), |t| t.slate(mixed()));
    sleep_secs(env.pick(4.0, 10.0)).await;
    let down = Instant::now();
    env.broker.stop().await?;
    sleep_secs(env.pick(5.0, 15.0)).await;
    env.broker.start().await?;
    let outage = down.elapsed().as_secs_f64();
    // New catalogue entries after the restart: a replica whose table follower stopped misses them.
    let fresh: Vec<_> = st.traffic(|t| {
        (0..3)
            .map(|i| fresh_item(t, &format!("fresh-after-restart-{i}")))
            .collect()
    });
    st.producer.send_all(fresh);
    sleep_secs(env.pick(5.0, 10.0)).await;
    stream.stop().await;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    st.note(format!(
        "broker down for {outage:.1} s (stop, pause, start until a produce succeeds)"
    ));
    check_replica(&mut st, trainer.addr, replica.addr).await;
    let mut replica = replica;
    let mut trainer = trainer;
    for p in [&mut trainer, &mut replica] {
        if let Some(e) = p.exited() {
            st.note(format!("{} had exited on its own: {}", e.name, e.short()));
        }
    }
    st.stop(replica).await;
    st.stop(trainer).await;
    st.finish(recover).await
}

fn fresh_item(t: &mut crate::traffic::Traffic, id: &str) -> crate::produce::Rec {
    use towerstream::event::{Dense, Event, Id, ItemEvent, Op};
    let e = Event::Item(ItemEvent {
        event_id: format!("{id}-upsert"),
        event_time_ms: now_ms(),
        item_id: Id::new(id),
        op: Op::Upsert,
        title: None,
        category: Some("g1".into()),
        genres: vec!["g1".into()],
        dense: Dense::new(),
    });
    crate::traffic::table_rec(
        &t.topics.items,
        crate::book::Topic::Items,
        id.to_owned(),
        e.to_json(),
        "item",
    )
}

/// A second trainer joins the group (partitions move to it) and leaves again (they come
/// back). Counted across both trainers' ledgers.
pub async fn rebalance(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "rebalance", 4, (300, 400), &Settings::default()).await?;
    st.publish_tables().await?;
    let a = st.trainer().await?;
    let stream = st.background(env.pick(1500.0, 3000.0), |t| t.slate(mixed()));
    sleep_secs(env.pick(4.0, 10.0)).await;
    let b_ledger = st.dir.join("ledger-b.jsonl");
    let sets = vec![
        format!("checkpoint.dir={}", st.dir.join("checkpoints-b").display()),
        format!("checkpoint.ledger={}", b_ledger.display()),
        // A trainer joining to share the work starts where the group is, not from scratch.
        "kafka.fresh_start=committed".into(),
    ];
    st.follow_ledger(b_ledger);
    let b = st.start("trainer-b", "run", sets).await?;
    sleep_secs(env.pick(8.0, 20.0)).await;
    let page_b = st.metrics(&b).await;
    let b_assigned = crate::http::metric_sum(&page_b, "towerstream_rebalances_total", "assign");
    st.stop(b).await;
    sleep_secs(env.pick(5.0, 10.0)).await;
    stream.stop().await;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    let page_a = st.metrics(&a).await;
    st.note(format!(
        "trainer A: {} partition assignments, {} revocations, {} events dropped as duplicates \
         (none were sent: re-reads after the hand-back); trainer B: {} assignments",
        crate::http::metric_sum(&page_a, "towerstream_rebalances_total", "assign"),
        crate::http::metric_sum(&page_a, "towerstream_rebalances_total", "revoke"),
        crate::http::metric_sum(&page_a, "towerstream_duplicate_events_total", ""),
        b_assigned
    ));
    st.stop(a).await;
    let (_, per) = st.counts();
    let twice_within: Vec<usize> = per
        .iter()
        .map(|c| {
            let mut by_click = std::collections::HashMap::new();
            for ((t, p, o, pos), n) in c {
                if *pos == 1 {
                    *by_click.entry((*t, *p, *o)).or_insert(0u32) += n;
                }
            }
            by_click.values().filter(|n| **n > 1).count()
        })
        .collect();
    let both = per[0]
        .keys()
        .filter(|k| k.3 == 1 && per[1].contains_key(k))
        .count();
    st.note(format!(
        "clicks trained twice within A: {}, within B: {}; trained by both A and B: {both} \
         (B has no checkpoint and starts from the group's commits, kafka.fresh_start = committed)",
        twice_within[0], twice_within[1]
    ));
    st.finish(recover).await
}

/// A replica killed (-9) while the trainer publishes, restarted at once: it must become ready
/// again and serve the trainer's generation.
pub async fn replica_restart(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "replica-restart", 2, (200, 300), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.start("trainer", "train", Vec::new()).await?;
    let replica = st.start("replica", "serve", Vec::new()).await?;
    let stream = st.background(env.pick(800.0, 2000.0), |t| t.slate(mixed()));
    let first = wait_ready(replica.addr, Duration::from_secs(60)).await;
    st.note(format!(
        "first replica ready after {:?} s",
        first.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0)
    ));
    sleep_secs(env.pick(3.0, 10.0)).await;
    st.kill(replica).await;
    let restarted = Instant::now();
    let replica = st.start("replica", "serve", Vec::new()).await?;
    let again = wait_ready(replica.addr, Duration::from_secs(60)).await;
    st.check(
        "restarted replica becomes ready",
        again.is_some(),
        match again {
            Some(_) => format!(
                "ready {:.1} s after the restart",
                restarted.elapsed().as_secs_f64()
            ),
            None => "not ready within 60 s".into(),
        },
    );
    sleep_secs(env.pick(5.0, 10.0)).await;
    stream.stop().await;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    check_replica(&mut st, trainer.addr, replica.addr).await;
    st.stop(replica).await;
    st.stop(trainer).await;
    st.finish(recover).await
}
