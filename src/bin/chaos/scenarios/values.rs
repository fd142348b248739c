//! Bad values: 10 % malformed events in the stream, non-finite and huge dense values in items
//! and profiles, the same in API requests, timestamps far in the future and the past, and
//! tombstones on the tables.

use anyhow::Result;
use towerstream::event::{Click, Dense, Event, Id, ItemEvent, Op, UserEvent};

use super::replicas::wait_ready;
use crate::book::{Kind, Sent, Topic};
use crate::http::{self, metric_sum};
use crate::produce::Rec;
use crate::report::Report;
use crate::stage::{Env, Settings, Stage};
use crate::traffic::{duplicate, now_ms, Slate, Traffic};

/// Malformed event-topic payloads, by label (what the dead letter's reason should say is up
/// to the service; each must come back from the dead-letter topic).
fn malformed(label: &'static str, n: u64) -> Option<Vec<u8>> {
    let t = now_ms();
    let long = "x".repeat(300);
    let text = match label {
        "truncated_json" => format!(r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":"#),
        "not_utf8" => return Some(vec![0xff, 0xfe, 0x00, 0x7b, 0x80]),
        "null_payload" => return None,
        "missing_user_id" => {
            format!(r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":{t},"item_id":"i1"}}"#)
        }
        "missing_type" => format!(r#"{{"event_id":"bad-{n}","event_time_ms":{t}}}"#),
        "time_is_a_string" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":"soon","user_id":"u1","item_id":"i1"}}"#
        ),
        "position_is_a_string" => format!(
            r#"{{"type":"impression","event_id":"bad-{n}","event_time_ms":{t},"user_id":"u1","item_id":"i1","impression_id":"bad-imp-{n}","request_id":"r","position":"3"}}"#
        ),
        "negative_time" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":-5,"user_id":"u1","item_id":"i1"}}"#
        ),
        "time_after_2286" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":10000000000000,"user_id":"u1","item_id":"i1"}}"#
        ),
        "oversize_user_id" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":{t},"user_id":"{long}","item_id":"i1"}}"#
        ),
        "oversize_payload" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":{t},"user_id":"u1","item_id":"i1","pad":"{}"}}"#,
            "p".repeat(70 * 1024)
        ),
        "unknown_type" => {
            format!(r#"{{"type":"purchase","event_id":"bad-{n}","event_time_ms":{t}}}"#)
        }
        "array_not_object" => "[1,2,3]".to_owned(),
        "huge_dwell" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":{t},"user_id":"u1","item_id":"i1","dwell_ms":1000000000000}}"#
        ),
        "id_is_an_object" => format!(
            r#"{{"type":"click","event_id":"bad-{n}","event_time_ms":{t},"user_id":{{"a":1}},"item_id":"i1"}}"#
        ),
        _ => format!(
            r#"{{"type":"impression","event_id":"bad-{n}","event_time_ms":{t},"user_id":"u1","item_id":"i1","impression_id":"bad-imp-{n}","request_id":"r","position":1.5}}"#
        ),
    };
    Some(text.into_bytes())
}

const MALFORMED: [&str; 16] = [
    "truncated_json",
    "not_utf8",
    "null_payload",
    "missing_user_id",
    "missing_type",
    "time_is_a_string",
    "position_is_a_string",
    "negative_time",
    "time_after_2286",
    "oversize_user_id",
    "oversize_payload",
    "unknown_type",
    "array_not_object",
    "huge_dwell",
    "id_is_an_object",
    "position_is_a_float",
];

fn malformed_rec(t: &Traffic, i: usize) -> Rec {
    let label = MALFORMED[i % MALFORMED.len()];
    Rec {
        topic: t.topics.events.clone(),
        key: Some(format!("bad-{i}")),
        payload: malformed(label, i as u64),
        partition: None,
        sent: Sent {
            kind: Kind::Malformed { label },
            topic: Topic::Event(0),
            duplicate: false,
            tag: None,
        },
    }
}

/// Slates with one malformed record after every nine valid ones.
fn dirty_stream(st: &Stage<'_>, events: usize, malformed_from: &mut usize) -> Vec<Rec> {
    let mut out = Vec::with_capacity(events);
    let mut valid = 0;
    while out.len() < events {
        let slate = st.traffic(|t| {
            t.slate(Slate {
                impressions: 3,
                click_prob: 0.7,
                time_ms: now_ms(),
                click_delay_ms: 50,
                partition: None,
            })
        });
        for r in slate {
            out.push(r);
            valid += 1;
            if valid % 9 == 0 {
                out.push(st.traffic(|t| malformed_rec(t, *malformed_from)));
                *malformed_from += 1;
            }
        }
    }
    out
}

fn item_with(id: &str, price: f64) -> Vec<u8> {
    Event::Item(ItemEvent {
        event_id: format!("{id}-price-{price:e}"),
        event_time_ms: now_ms(),
        item_id: Id::new(id),
        op: Op::Upsert,
        title: None,
        category: Some("g1".into()),
        genres: vec!["g1".into()],
        dense: Dense::from([("price".to_owned(), price)]),
    })
    .to_json()
}

fn user_with(id: &str, score: f64) -> Vec<u8> {
    Event::User(UserEvent {
        event_id: format!("{id}-score-{score:e}"),
        event_time_ms: now_ms(),
        user_id: Id::new(id),
        op: Op::Upsert,
        gender: Some("F".into()),
        age: Some(30),
        occupation: None,
        zip: None,
        dense: Dense::from([("score".to_owned(), score)]),
    })
    .to_json()
}

fn table(topic: &str, t: Topic, key: &str, payload: Option<Vec<u8>>, label: &'static str) -> Rec {
    Rec {
        topic: topic.to_owned(),
        key: Some(key.to_owned()),
        payload,
        partition: None,
        sent: Sent {
            kind: Kind::Table { label },
            topic: t,
            duplicate: false,
            tag: None,
        },
    }
}

/// Huge and non-finite-in-f32 dense values, an out-of-range JSON number, a click on the item
/// topic, and tombstones (five items, five users).
fn bad_tables(t: &Traffic) -> Vec<Rec> {
    let (items, users) = (&t.topics.items, &t.topics.users);
    let mut out = Vec::new();
    for (i, price) in [1e308, 1e308, 1e39, 1e39, -1e308].iter().enumerate() {
        let id = format!("i{i}");
        out.push(table(
            items,
            Topic::Items,
            &id,
            Some(item_with(&id, *price)),
            "nonfinite_item",
        ));
    }
    for (i, score) in [1e308, -1e39, 1e39].iter().enumerate() {
        let id = format!("u{i}");
        out.push(table(
            users,
            Topic::Users,
            &id,
            Some(user_with(&id, *score)),
            "nonfinite_user",
        ));
    }
    let beyond = br#"{"type":"item","event_id":"i9-beyond","event_time_ms":1,"item_id":"i9","op":"upsert","dense":{"price":1e400}}"#;
    out.push(table(
        items,
        Topic::Items,
        "i9",
        Some(beyond.to_vec()),
        "number_beyond_f64",
    ));
    let click = br#"{"type":"click","event_id":"click-on-items","event_time_ms":1,"user_id":"u1","item_id":"i1"}"#;
    out.push(table(
        items,
        Topic::Items,
        "i1",
        Some(click.to_vec()),
        "click_on_item_topic",
    ));
    for i in 20..25 {
        out.push(table(
            items,
            Topic::Items,
            &format!("i{i}"),
            None,
            "tombstone_item",
        ));
        out.push(table(
            users,
            Topic::Users,
            &format!("u{i}"),
            None,
            "tombstone_user",
        ));
    }
    out
}

/// A valid click with a strange timestamp, tagged for the report.
fn odd_click(t: &Traffic, n: u32, time_ms: i64, tag: &'static str) -> Rec {
    let mut r = t.click_rec(
        Click {
            event_id: format!("bad-values-{tag}-{n}"),
            event_time_ms: time_ms,
            user_id: Id::new(format!("u{}", 30 + n)),
            item_id: Id::new(format!("i{}", 30 + n)),
            impression_id: None,
            dwell_ms: None,
        },
        None,
    );
    r.sent.tag = Some(tag);
    r
}

/// Clicks by poisoned users on poisoned items.
fn poisoned_clicks(t: &Traffic, n: usize) -> Vec<Rec> {
    (0..n)
        .map(|k| {
            let mut r = t.click_rec(
                Click {
                    event_id: format!("bad-values-poisoned-{k}"),
                    event_time_ms: now_ms(),
                    user_id: Id::new(format!("u{}", k % 3)),
                    item_id: Id::new(format!("i{}", k % 5)),
                    impression_id: None,
                    dwell_ms: None,
                },
                None,
            );
            r.sent.tag = Some("click_on_nonfinite_item");
            r
        })
        .collect()
}

/// Recall requests carrying non-finite or out-of-range values: each must be a 400.
async fn api_checks(st: &mut Stage<'_>, addr: std::net::SocketAddr) {
    let bodies = [
        r#"{"user_id":"u5","features":{"dense":{"score":1e308}}}"#,
        r#"{"user_id":"u5","features":{"dense":{"score":-1e39}}}"#,
        r#"{"user_id":"u5","features":{"dense":{"score":1e400}}}"#,
        r#"{"user_id":"u5","features":{"age":300}}"#,
        r#"{"user_id":"u5","k":-1}"#,
    ];
    let mut statuses = Vec::new();
    for b in bodies {
        let s = http::request(addr, "POST", "/v1/recall", Some(b))
            .await
            .map_or(0, |r| r.0);
        statuses.push(s);
    }
    let all_400 = statuses.iter().all(|s| *s == 400);
    st.check(
        "API rejects non-finite and out-of-range values with 400",
        all_400,
        format!("statuses {statuses:?} for dense 1e308, -1e39, 1e400, age 300, k -1"),
    );
}

/// The model and its answers stay finite.
async fn finite_checks(st: &mut Stage<'_>, addr: std::net::SocketAddr, page: &str) {
    let loss = metric_sum(page, "towerstream_train_loss", "");
    st.check(
        "training loss stays finite",
        loss.is_finite(),
        format!("towerstream_train_loss {loss}"),
    );
    let mut bad_scores = 0;
    let mut answers = 0;
    for u in ["u1", "u5", "u40"] {
        if let Some((200, body)) = http::get(addr, &format!("/v1/recall/{u}?k=10")).await {
            answers += 1;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let items = v["items"].as_array().cloned().unwrap_or_default();
            bad_scores += items
                .iter()
                .filter(|i| !i["score"].as_f64().is_some_and(f64::is_finite))
                .count();
        }
    }
    st.check(
        "recall scores stay finite",
        answers == 3 && bad_scores == 0,
        format!("{answers} of 3 answered, {bad_scores} non-finite scores"),
    );
}

/// The whole scenario.
pub async fn bad_values(env: &Env) -> Result<Report> {
    let mut extra = Settings::default();
    extra.set(
        "features.dense",
        r#"[{entity = "item", name = "price"}, {entity = "user", name = "score"}]"#,
    );
    let mut st = Stage::new(env, "bad-values", 2, (100, 200), &extra).await?;
    st.publish_tables().await?;
    let bad = st.traffic(|t| bad_tables(t));
    st.send(bad).await?;
    let trainer = st.trainer().await?;
    let ready = wait_ready(trainer.addr, std::time::Duration::from_secs(60)).await;
    st.check(
        "trainer becomes ready",
        ready.is_some(),
        format!("{ready:?}"),
    );
    let events = env.pick(1500, 10_000);
    let mut m = 0;
    let first = dirty_stream(&st, events, &mut m);
    st.send(first).await?;
    let past = st.traffic(|t| {
        vec![
            odd_click(t, 0, 1, "past_1970"),
            odd_click(t, 1, 0, "past_1970"),
        ]
    });
    st.send(past).await?;
    let future = st.traffic(|t| vec![odd_click(t, 2, 9_999_999_999_999, "future_2286")]);
    st.send(future).await?;
    let mut second = dirty_stream(&st, events, &mut m);
    let dups: Vec<Rec> = second
        .iter()
        .filter(|r| matches!(r.sent.kind, Kind::Click { .. }))
        .take(10)
        .map(duplicate)
        .collect();
    second.extend(dups);
    second.extend(st.traffic(|t| poisoned_clicks(t, 300)));
    st.send(second).await?;
    let recover = st.wait_accounted(env.recover_timeout()).await;
    api_checks(&mut st, trainer.addr).await;
    let page = st.metrics(&trainer).await;
    finite_checks(&mut st, trainer.addr, &page).await;
    let (items, users) = st.traffic(|t| (t.world.items.len(), t.world.users.len()));
    let got_items = metric_sum(&page, "towerstream_catalog_items", "") as usize;
    let got_users = metric_sum(&page, "towerstream_catalog_users", "") as usize;
    st.check(
        "tombstones delete (5 items, 5 users)",
        got_items == items - 5 && got_users == users - 5,
        format!(
            "catalogue {got_items} items (expected {}), {got_users} users (expected {})",
            items - 5,
            users - 5
        ),
    );
    let expired = metric_sum(&page, "towerstream_join_total", "\"expired\"");
    st.check(
        "no impression leaves the 10-minute window during a seconds-long stream",
        expired == 0.0,
        format!("{expired} impressions expired (a far-future timestamp moved event time)"),
    );
    st.stop(trainer).await;
    let mut report = st.finish(recover).await?;
    let nonfinite: u64 = ["table:nonfinite_item", "table:nonfinite_user"]
        .iter()
        .filter_map(|k| report.tally.tagged.get(*k))
        .flat_map(|m| m.iter())
        .filter(|(outcome, _)| !outcome.starts_with("dead-lettered"))
        .map(|(_, n)| n)
        .sum();
    report.checks.push(crate::report::Check {
        name: "non-finite dense values in tables are dead-lettered".into(),
        pass: nonfinite == 0,
        detail: format!("{nonfinite} of 8 were applied"),
    });
    report.judge();
    Ok(report)
}
