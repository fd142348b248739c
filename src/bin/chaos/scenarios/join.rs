//! Four partitions, one of them minutes behind in event time, with impressions and clicks to
//! join: per-partition event time is what Kafka Streams and Flink users expect, so the lagging
//! partition must join as well as the others.

use std::collections::BTreeMap;

use anyhow::Result;
use towerstream::event::{Click, Id};

use crate::book::{Kind, Topic};
use crate::http::metric_sum;
use crate::produce::Rec;
use crate::report::Report;
use crate::stage::{Env, Settings, Stage};
use crate::traffic::{duplicate, now_ms, Slate};

/// How far the lagging partition is behind (beyond the default 10-minute join window).
const LAG_MS: i64 = 15 * 60 * 1000;
/// Event time between two requests (simulated: the stream covers many minutes).
const STEP_MS: i64 = 250;
const LAGGING: i32 = 3;

/// The stream: slates pinned to a random partition, partition 3 stamped `LAG_MS` earlier;
/// each click comes 1–30 s (event time) after its slate, in its partition's time order, and
/// 3 % of the clicks are re-sent a second later; then one click per partition far enough
/// ahead to close every window.
fn stream(st: &Stage<'_>, requests: usize, window_ms: i64) -> (Vec<Vec<Rec>>, usize) {
    let t0 = now_ms() - 3 * 3600 * 1000;
    let mut last = [0i64; 4];
    let mut pending: [Vec<(i64, Rec)>; 4] = Default::default();
    let mut joinable = 0;
    let mut batches = Vec::with_capacity(requests * 2);
    for k in 0..requests {
        let (p, time, delay, slate) = st.traffic(|t| {
            let p = t.below(4);
            let time = t0 + k as i64 * STEP_MS - if p as i32 == LAGGING { LAG_MS } else { 0 };
            let delay = 1000 + t.below(29_000) as i64;
            let slate = t.slate(Slate {
                impressions: 4,
                click_prob: 0.5,
                time_ms: time,
                click_delay_ms: delay,
                partition: Some(p as i32),
            });
            (p, time, delay, slate)
        });
        last[p] = time;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut pending[p])
            .into_iter()
            .partition(|(t, _)| *t <= time);
        pending[p] = later;
        batches.extend(due.into_iter().map(|(_, r)| vec![r]));
        let (clicks, impressions): (Vec<Rec>, Vec<Rec>) = slate
            .into_iter()
            .partition(|r| matches!(r.sent.kind, Kind::Click { .. }));
        batches.push(impressions);
        for c in clicks {
            joinable += 1;
            if st.traffic(|t| t.unit()) < 0.03 {
                pending[p].push((time + delay + 1000, duplicate(&c)));
            }
            pending[p].push((time + delay, c));
        }
    }
    for p in &mut pending {
        p.sort_by_key(|(t, _)| *t);
        batches.extend(p.drain(..).map(|(_, r)| vec![r]));
    }
    for (p, t) in last.iter().enumerate() {
        let flush = st.traffic(|tr| {
            let user = tr.world.users[p].id.clone();
            tr.click_rec(
                Click {
                    event_id: format!("lagging-partition-flush-{p}"),
                    event_time_ms: t + window_ms + 60_000,
                    user_id: user,
                    item_id: Id::new("i0"),
                    impression_id: None,
                    dwell_ms: None,
                },
                Some(p as i32),
            )
        });
        batches.push(vec![flush]);
    }
    (batches, joinable)
}

/// Clicked impressions trained as negatives, per partition.
fn false_negatives(st: &mut Stage<'_>) -> BTreeMap<i32, (u64, u64)> {
    let (counts, _) = st.counts();
    let mut per: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for ((topic, p, o), sent) in st.book.records() {
        let Kind::Impression { clicked: true } = sent.kind else {
            continue;
        };
        let Topic::Event(t) = topic else { continue };
        let e = per.entry(p).or_default();
        e.1 += 1;
        if counts.get(&(t, p, o, 0)).is_some_and(|n| *n > 0) {
            e.0 += 1;
        }
    }
    per
}

/// One partition 15 minutes behind the others in event time: half of the stream as a backlog,
/// half live. Point-wise mode, the one that trains shown-not-clicked negatives: a clicked
/// impression expiring early would show as a false negative.
pub async fn lagging_partition(env: &Env) -> Result<Report> {
    let mut extra = Settings::default();
    extra.string("train.mode", "pointwise_bce");
    let mut st = Stage::new(env, "lagging-partition", 4, (400, 400), &extra).await?;
    st.publish_tables().await?;
    let window = st.config.join.window_ms;
    let (mut batches, joinable) = stream(&st, env.pick(2000, 8000), window);
    // The first half waits in the topic (a backlog the trainer catches up on, partitions
    // delivered block by block); the second half arrives live.
    let live = batches.split_off(batches.len() / 2);
    st.send(batches.into_iter().flatten().collect()).await?;
    let trainer = st.trainer().await?;
    st.paced(live, env.pick(3000.0, 5000.0)).await;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    let page = st.metrics(&trainer).await;
    let hit = metric_sum(&page, "towerstream_join_total", "\"hit\"");
    let miss = metric_sum(&page, "towerstream_join_total", "\"miss\"");
    let expired = metric_sum(&page, "towerstream_join_total", "\"expired\"");
    st.stop(trainer).await;
    let per = false_negatives(&mut st);
    let fneg: u64 = per.values().map(|v| v.0).sum();
    let breakdown: Vec<String> = per
        .iter()
        .map(|(p, (f, n))| {
            let lag = if *p == LAGGING { " (lagging)" } else { "" };
            format!("p{p}{lag} {f} of {n}")
        })
        .collect();
    st.check(
        "every click with an impression joins",
        hit as usize >= joinable,
        format!(
            "joined {hit} of {joinable} joinable clicks; unjoined {miss} (4 flush clicks have no impression)"
        ),
    );
    st.check(
        "no clicked impression becomes a negative",
        fneg == 0,
        format!(
            "{fneg} false negatives; clicked impressions trained as negatives per partition: {}",
            breakdown.join(", ")
        ),
    );
    st.note(format!(
        "impressions that left the window unclicked (metric): {expired}; window {window} ms, lag of p{LAGGING} {LAG_MS} ms"
    ));
    let mut report = st.finish(recover).await?;
    let t = &report.tally;
    report.notes.push(format!(
        "unclicked impressions trained as negatives: {}, negatives trained twice: {}",
        t.true_negatives, t.negatives_twice
    ));
    Ok(report)
}
