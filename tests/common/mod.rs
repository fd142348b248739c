//! Shared test helpers: the real local Kafka broker (`scripts/kafka start`) and a small trained
//! model ([`world`]).
#![allow(dead_code)]

pub mod world;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use towerstream::config::Config;
use towerstream::example::TrainingExample;
use towerstream::ingest::IngestHandle;
use towerstream::kafka::{client_config, ensure_topics, topic_specs};

/// Broker address: `TS_KAFKA_BROKERS` (set by scripts/env.sh) or the script's default.
pub fn brokers() -> String {
    std::env::var("TS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// A config whose topics and group are unique to this test run.
pub fn unique_config(test: &str) -> Config {
    static N: AtomicU32 = AtomicU32::new(0);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let id = format!("{test}-{stamp}-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut c = Config::default();
    c.kafka.brokers = brokers();
    c.kafka.group_id = format!("g-{id}");
    c.kafka.event_topics = vec![format!("ev-{id}")];
    c.kafka.item_topic = format!("items-{id}");
    c.kafka.user_topic = format!("users-{id}");
    c.kafka.dead_letter_topic = format!("dlq-{id}");
    c.kafka.handover_topic = format!("handover-{id}");
    c.kafka.commit_interval_ms = 100;
    c.kafka.statistics_interval_ms = 500;
    c.kafka.session_timeout_ms = 6000;
    c
}

/// A whole-service config for small worlds: unique topics, small towers and batches, a fast
/// refresh, an ephemeral API port, checkpoints in `dir`.
pub fn service_config(test: &str, dir: &std::path::Path) -> Config {
    let mut c = unique_config(test);
    c.train.batch_size = 64;
    c.train.max_wait_ms = 50;
    c.model.tower_dims = vec![32, 16];
    c.index.refresh_interval_ms = 300;
    c.serve.listen = "127.0.0.1:0".into();
    c.checkpoint.dir = dir.to_owned();
    c
}

/// Creates the topics and publishes the tables of a 50-user, 80-item synthetic world.
pub async fn small_world(c: &Config) -> towerstream::synth::World {
    create_topics(c, 2).await;
    let world = towerstream::synth::World::new(towerstream::synth::WorldConfig {
        users: 50,
        items: 80,
        ..Default::default()
    });
    produce_world(c, &world).await;
    world
}

/// Creates the config's topics, failing loudly when no broker runs.
pub async fn create_topics(c: &Config, partitions: i32) {
    let probe: BaseConsumer = client_config(&c.kafka).create().expect("client");
    if let Err(e) = probe.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "no Kafka broker at {} ({e}); run the tests with scripts/test, which starts one",
            c.kafka.brokers
        );
    }
    ensure_topics(&c.kafka, &topic_specs(&c.kafka, partitions))
        .await
        .expect("create topics");
}

/// Produces (key, payload) pairs to `topic`, optionally to an explicit partition, in order
/// (the producer is idempotent) and without waiting between them, and waits until the broker
/// has every one.
pub async fn produce(c: &Config, topic: &str, records: &[(Option<String>, Vec<u8>, Option<i32>)]) {
    let producer: FutureProducer = towerstream::kafka::producer(&c.kafka).expect("producer");
    let mut pending = Vec::new();
    for (key, payload, partition) in records {
        loop {
            let mut r = FutureRecord::<String, Vec<u8>>::to(topic).payload(payload);
            if let Some(k) = key {
                r = r.key(k);
            }
            if let Some(p) = partition {
                r = r.partition(*p);
            }
            match producer.send_result(r) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                // librdkafka's queue is full: let what is in flight land, then retry.
                Err((_, _)) if !pending.is_empty() => {
                    for d in pending.drain(..) {
                        d.await
                            .expect("delivery")
                            .map_err(|(e, _)| e)
                            .expect("produce");
                    }
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    for d in pending {
        d.await
            .expect("delivery")
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

/// HTTP/1 client for the service's API.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<hyper::body::Bytes>,
>;

/// A new API client.
pub fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// One request; the status and the JSON body (a string when the body is not JSON).
pub async fn http(
    client: &HttpClient,
    method: &str,
    url: String,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.unwrap_or("").to_owned(),
        )))
        .unwrap();
    let resp = client.request(req).await.expect("HTTP request");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    )
}

/// Wall-clock now in Unix ms.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A catalogue upsert or delete stamped now, as a record for [`produce`].
pub fn item_event(
    id: &str,
    op: towerstream::event::Op,
    genres: Vec<String>,
) -> (Option<String>, Vec<u8>, Option<i32>) {
    use towerstream::event::{Dense, Event, Id, ItemEvent};
    let e = Event::Item(ItemEvent {
        event_id: format!("{id}-{op:?}"),
        event_time_ms: now_ms(),
        item_id: Id::new(id),
        op,
        title: None,
        category: genres.first().cloned(),
        genres,
        dense: Dense::new(),
    });
    (Some(id.to_owned()), e.to_json(), None)
}

/// Publishes the catalogue change both service tests make: a new item `fresh-item` (genre
/// `g1`) and the deletion of `i0`.
pub async fn add_fresh_item_delete_i0(c: &Config) {
    let change = [
        item_event(
            "fresh-item",
            towerstream::event::Op::Upsert,
            vec!["g1".into()],
        ),
        item_event("i0", towerstream::event::Op::Delete, vec![]),
    ];
    produce(c, &c.kafka.item_topic, &change).await;
}

/// Publishes a synthetic world's items and profiles to the config's table topics.
pub async fn produce_world(c: &Config, world: &towerstream::synth::World) {
    let records = |events: Vec<towerstream::event::Event>| -> Vec<_> {
        events
            .into_iter()
            .map(|e| (Some(e.event_id().to_owned()), e.to_json(), None))
            .collect()
    };
    produce(c, &c.kafka.item_topic, &records(world.item_events())).await;
    produce(c, &c.kafka.user_topic, &records(world.user_events())).await;
}

/// Click examples (no impressions in these streams: all unjoined) the service trained.
pub fn trained_clicks(m: &towerstream::metrics::Metrics) -> f64 {
    metric_value(
        m,
        "towerstream_train_examples_total",
        &[("label", "click_unjoined")],
    )
}

/// A click event as JSON.
pub fn click_json(event_id: &str, t: i64, user: &str, item: &str, imp: Option<&str>) -> Vec<u8> {
    let imp = imp.map_or("null".to_owned(), |i| format!("\"{i}\""));
    format!(
        r#"{{"type":"click","event_id":"{event_id}","event_time_ms":{t},"user_id":"{user}","item_id":"{item}","impression_id":{imp}}}"#
    )
    .into_bytes()
}

/// An impression event as JSON.
pub fn impression_json(imp: &str, t: i64, user: &str, item: &str, position: u32) -> Vec<u8> {
    format!(
        r#"{{"type":"impression","event_id":"ev-{imp}","event_time_ms":{t},"user_id":"{user}","item_id":"{item}","impression_id":"{imp}","request_id":"r-{imp}","position":{position}}}"#
    )
    .into_bytes()
}

/// Receives `n` examples (or fails after `timeout`).
pub async fn recv_n(h: &mut IngestHandle, n: usize, timeout: Duration) -> Vec<TrainingExample> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h.examples.recv()).await {
            Ok(Some(ex)) => out.push(ex),
            Ok(None) => panic!("channel closed after {} of {n} examples", out.len()),
            Err(_) => panic!("timed out after {} of {n} examples", out.len()),
        }
    }
    out
}

/// Receives until nothing arrives for `quiet`.
pub async fn recv_until_quiet(h: &mut IngestHandle, quiet: Duration) -> Vec<TrainingExample> {
    let mut out = Vec::new();
    while let Ok(Some(ex)) = tokio::time::timeout(quiet, h.examples.recv()).await {
        out.push(ex);
    }
    out
}

/// A dead-letter record as read back.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `n` records of the dead-letter topic from the beginning (fails after `timeout`).
pub async fn read_dead_letters(c: &Config, n: usize, timeout: Duration) -> Vec<DeadLetter> {
    let consumer: StreamConsumer = client_config(&c.kafka)
        .set("group.id", format!("{}-dlq-reader", c.kafka.group_id))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&c.kafka.dead_letter_topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} dead letters", out.len()))
            .expect("dead-letter consumer");
        let mut headers = HashMap::new();
        if let Some(h) = msg.headers() {
            for hdr in h.iter() {
                headers.insert(
                    hdr.key.to_owned(),
                    String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out.push(DeadLetter {
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    // Nothing beyond the expected records.
    if let Ok(Ok(extra)) = tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await
    {
        panic!(
            "unexpected extra dead letter: {:?}",
            String::from_utf8_lossy(extra.payload().unwrap_or_default())
        );
    }
    out
}

/// The group's committed offset of every event-topic partition.
pub fn committed(c: &Config, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = client_config(&c.kafka)
        .set("group.id", &c.kafka.group_id)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&c.kafka.event_topics[0], p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

/// The value of a counter or gauge with exactly these labels (among others).
/// [`metric_value`], or 0 when the series was never written (labelled series appear on first use).
pub fn metric_or_zero(
    m: &towerstream::metrics::Metrics,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let present = m.registry.gather().iter().any(|f| {
        f.name() == name
            && f.get_metric().iter().any(|x| {
                labels.iter().all(|(k, v)| {
                    x.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
    });
    if present {
        metric_value(m, name, labels)
    } else {
        0.0
    }
}

pub fn metric_value(m: &towerstream::metrics::Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::proto::MetricType;
    for fam in m.registry.gather() {
        if fam.name() != name {
            continue;
        }
        for metric in fam.get_metric() {
            let ok = labels.iter().all(|(k, v)| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if ok {
                return match fam.get_field_type() {
                    MetricType::COUNTER => metric.get_counter().get_value(),
                    _ => metric.get_gauge().get_value(),
                };
            }
        }
    }
    panic!("metric {name} {labels:?} not found")
}

/// The `towerstream` binary with `args`, piped output, info logs without colour, and none of
/// the test runner's `TOWERSTREAM_*` variables (only the arguments configure the child).
pub fn towerstream_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Command {
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_towerstream"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOWERSTREAM_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Link builds the refresher started, whatever the cause (`towerstream_index_relinks_total`).
pub fn relinks(m: &towerstream::metrics::ServeMetrics) -> u64 {
    ["first", "recall", "changes", "spread"]
        .iter()
        .map(|cause| m.relinks.with_label_values(&[cause]).get())
        .sum()
}
