//! Uneven traffic against one trainer with the default batching (1024 examples, 200 ms wait):
//! a trickle, bursts separated by idle periods, a single event, a steady high rate.

use std::time::Duration;

use anyhow::Result;

use crate::book::Kind;
use crate::produce::Rec;
use crate::report::Report;
use crate::stage::{Env, Settings, Stage};
use crate::traffic::{duplicate, now_ms, Slate};

/// A slate of `impressions` shown now, clicked with probability `click_prob`.
fn slate_now(impressions: usize, click_prob: f64) -> Slate {
    Slate {
        impressions,
        click_prob,
        time_ms: now_ms(),
        click_delay_ms: 50,
        partition: None,
    }
}

/// 1–5 clicks per second, one at a time.
pub async fn trickle(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "trickle", 1, (100, 200), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.trainer().await?;
    let n = env.pick(25, 200);
    for _ in 0..n {
        let rec = st.traffic(|t| t.click(now_ms(), None));
        st.producer.send(rec);
        let gap = st.traffic(|t| 0.2 + 0.8 * t.unit());
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
    }
    let recover = st.wait_accounted(env.recover_timeout()).await;
    st.stop(trainer).await;
    st.finish(recover).await
}

/// Bursts sent as fast as possible, idle periods between them; each burst re-sends a few
/// clicks of the previous one (same event id: duplicates to drop).
pub async fn bursts(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "bursts", 2, (200, 300), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.trainer().await?;
    let (count, size, idle) = (env.pick(3, 6), env.pick(400, 3000), env.pick(4, 15));
    let mut previous_clicks: Vec<Rec> = Vec::new();
    for b in 0..count {
        if b > 0 {
            tokio::time::sleep(Duration::from_secs(idle)).await;
        }
        let mut burst: Vec<Rec> = previous_clicks.iter().take(5).map(duplicate).collect();
        while burst.len() < size {
            burst.extend(st.traffic(|t| t.slate(slate_now(3, 0.7))));
        }
        previous_clicks = burst
            .iter()
            .filter(|r| matches!(r.sent.kind, Kind::Click { .. }) && !r.sent.duplicate)
            .cloned()
            .collect();
        st.send(burst).await?;
    }
    let recover = st.wait_accounted(env.recover_timeout()).await;
    st.stop(trainer).await;
    st.finish(recover).await
}

/// One click, then silence: it must still be trained.
pub async fn single(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "single", 1, (50, 80), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.trainer().await?;
    let rec = st.traffic(|t| t.click(now_ms(), None));
    st.send(vec![rec]).await?;
    let recover = st
        .wait_accounted(Duration::from_secs(env.pick(30, 60)))
        .await;
    // Silence after it, so a click trained only because more traffic came cannot pass.
    tokio::time::sleep(Duration::from_secs(env.pick(2, 10))).await;
    st.stop(trainer).await;
    st.finish(recover).await
}

/// 10,000 events/s (slates of two impressions, clicked 80 % of the time) for a while.
pub async fn steady(env: &Env) -> Result<Report> {
    let mut st = Stage::new(env, "steady", 4, (1000, 2000), &Settings::default()).await?;
    st.publish_tables().await?;
    let trainer = st.trainer().await?;
    let rate = 10_000.0;
    let seconds = env.pick(4.0, 30.0);
    let mut batches = Vec::new();
    let mut n = 0usize;
    while (n as f64) < rate * seconds {
        let b = st.traffic(|t| t.slate(slate_now(2, 0.8)));
        n += b.len();
        batches.push(b);
    }
    let started = std::time::Instant::now();
    st.paced(batches, rate).await;
    let took = started.elapsed().as_secs_f64();
    st.note(format!(
        "sent {n} events in {took:.1} s ({:.0}/s)",
        n as f64 / took
    ));
    let recover = st.wait_accounted(env.recover_timeout()).await;
    let page = st.metrics(&trainer).await;
    let eps = crate::http::metric_sum(&page, "towerstream_train_examples_per_second", "");
    st.note(format!("trainer's last examples/s gauge {eps:.0}"));
    st.stop(trainer).await;
    st.finish(recover).await
}
