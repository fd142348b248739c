//! A shop's own event schema, through the real local broker: nested JSON with its own field
//! names, one "action" field for views and clicks and ISO-8601 times, read through a
//! `[mapping]` — joined and handed to training like native events, the malformed ones
//! dead-lettered naming the shop's field, its catalogue feed read as items, and `check-config --sample` showing both before
//! anything trains.

mod common;

use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use towerstream::config::Config;
use towerstream::example::Label;
use towerstream::ingest::dead_letter::headers;
use towerstream::ingest::{spawn, IngestOptions};
use towerstream::metrics::Metrics;

const WAIT: Duration = Duration::from_secs(30);

/// The mapping of `schemas/examples/shop-event.json`.
const MAPPING: &str = r#"
[mapping.default]
kind = { field = "/action", click = ["click"], impression = ["view"] }
event_id = "/meta/event_uuid"
user_id = "/user/id"
item_id = "/product/sku"
event_time = "/occurred_at"
time_format = "rfc3339"
impression_id = "/meta/impression"
request_id = "/meta/page_view"
position = "/slot"

[mapping.items]
id = "/sku"
category = "/category/name"
genres = "/tags"
"#;

fn shop_event(
    action: &str,
    id: &str,
    user: &str,
    sku: &str,
    at: &str,
    impression: &str,
) -> Vec<u8> {
    format!(
        r#"{{"action": "{action}", "meta": {{"event_uuid": "{id}", "impression": "{impression}",
            "page_view": "pv-1"}}, "user": {{"id": {user}}}, "product": {{"sku": "{sku}"}},
            "occurred_at": "{at}", "slot": 2}}"#
    )
    .into_bytes()
}

/// A view of A-1 and of B-2, a click on the first, a click without a user and an action the
/// mapping does not name.
fn shop_stream() -> Vec<Vec<u8>> {
    vec![
        shop_event("view", "e1", "7", "A-1", "2023-11-14T22:13:21Z", "imp-1"),
        shop_event("view", "e2", "7", "B-2", "2023-11-14T22:13:21.005Z", "imp-2"),
        shop_event("click", "e3", "7", "A-1", "2023-11-14T23:13:22+01:00", "imp-1"),
        br#"{"action": "click", "meta": {"event_uuid": "e4"}, "user": {}, "product": {"sku": "A-1"},
            "occurred_at": "2023-11-14T22:13:23Z"}"#
            .to_vec(),
        shop_event("add_to_cart", "e5", "7", "A-1", "2023-11-14T22:13:24Z", "imp-1"),
    ]
}

fn mapped_config(test: &str) -> Config {
    let mut c = unique_config(test);
    let mapped = Config::from_toml(MAPPING).expect("the mapping parses");
    c.mapping = mapped.mapping;
    c.join.window_ms = 5000;
    c
}

async fn produce_shop_stream(c: &Config) {
    create_topics(c, 1).await;
    let catalogue = br#"{"sku": "A-1", "category": {"name": "mugs"}, "tags": ["gift"]}"#;
    produce(
        c,
        &c.kafka.item_topic,
        &[(Some("A-1".into()), catalogue.to_vec(), None)],
    )
    .await;
    let records: Vec<_> = shop_stream()
        .into_iter()
        .map(|p| (Some("7".to_owned()), p, None))
        .collect();
    produce(c, &c.kafka.event_topics[0], &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shops_own_events_are_joined_through_the_mapping_and_bad_ones_name_its_fields() {
    let c = mapped_config("mapping");
    c.validate().expect("a valid mapping");
    produce_shop_stream(&c).await;

    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut h = spawn(&c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .unwrap();
    let got = recv_n(&mut h, 1, WAIT).await;
    let extra = recv_until_quiet(&mut h, Duration::from_millis(1500)).await;
    assert!(extra.is_empty(), "unexpected extra examples: {extra:?}");
    let e = &got[0];
    // The click found its impression (by the shop's impression id): a joined positive with
    // the slot the view was shown in.
    assert_eq!(e.label, Label::Click { joined: true });
    assert_eq!((e.user_id.as_str(), e.item_id.as_str()), ("7", "A-1"));
    assert_eq!(e.origin.offset, 2);
    assert_eq!(e.position, Some(2));
    assert_eq!(e.event_time_ms, 1_700_000_002_000);
    // Its features come from the shop's catalogue feed, read through `[mapping.items]`.
    let item = e.item.as_ref().expect("the item's features");
    assert_eq!(item.category.as_deref(), Some("mugs"));
    assert_eq!(item.genres, vec!["gift"]);

    let dlq = read_dead_letters(&c, 2, WAIT).await;
    let reason = |offset: &str| {
        let d = dlq
            .iter()
            .find(|d| d.headers[headers::OFFSET] == offset)
            .unwrap_or_else(|| panic!("no dead letter for offset {offset}: {dlq:?}"));
        (
            d.headers[headers::REASON].clone(),
            d.headers[headers::DETAIL].clone(),
        )
    };
    let (r, detail) = reason("3");
    assert_eq!(r, "missing_field");
    assert!(detail.contains("`/user/id`"), "{detail}");
    let (r, detail) = reason("4");
    assert_eq!(r, "unknown_type");
    assert!(
        detail.contains("add_to_cart") && detail.contains("/action"),
        "{detail}"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_shows_what_the_mapping_makes_of_the_topics_newest_events() {
    let c = mapped_config("mapping-sample");
    produce_shop_stream(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("towerstream.toml");
    let text = format!(
        "[kafka]\nbrokers = {:?}\nevent_topics = [{:?}]\ngroup_id = {:?}\n{MAPPING}",
        c.kafka.brokers, c.kafka.event_topics[0], c.kafka.group_id
    );
    std::fs::write(&path, text).unwrap();
    let args = [
        "--config",
        path.to_str().unwrap(),
        "check-config",
        "--sample",
        "10",
    ];
    let out = towerstream_command(&args).output().expect("check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded: Vec<&str> = stdout.lines().filter(|l| l.contains("→")).collect();
    assert_eq!(decoded.len(), 5, "{stdout}");
    assert!(decoded[0].contains(r#""type":"impression""#), "{stdout}");
    assert!(decoded[2].contains(r#""type":"click""#), "{stdout}");
    assert!(
        decoded[2].contains(r#""event_time_ms":1700000002000"#),
        "{stdout}"
    );
    assert!(decoded[3].contains("dead letter missing_field"), "{stdout}");
    assert!(decoded[4].contains("dead letter unknown_type"), "{stdout}");
    // The sample is read without a group: the production group has committed nothing.
    assert_eq!(
        committed(&c, 1),
        vec![-1],
        "check-config moved the group's offsets"
    );
}
