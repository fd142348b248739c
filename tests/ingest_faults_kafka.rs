//! Ingestion against the real broker when the data or the broker surprise it: tombstones and
//! out-of-order versions on the tables, a dead-letter topic that refuses writes, a checkpoint
//! that retention overtook, a table bootstrap that stalls, the dry run, and the replication
//! factor of created topics.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use towerstream::config::{Config, RetentionGapPolicy};
use towerstream::event::Id;
use towerstream::ingest::dead_letter::headers;
use towerstream::ingest::offsets::{ResumeMap, ResumePoint};
use towerstream::ingest::{dry_run_group, spawn, IngestError, IngestHandle, IngestOptions};
use towerstream::kafka::{client_config, ensure_topics, topic_specs};
use towerstream::metrics::Metrics;

const T0: i64 = 1_700_000_000_000;
const WAIT: Duration = Duration::from_secs(30);

fn admin(c: &Config) -> AdminClient<DefaultClientContext> {
    client_config(&c.kafka).create().expect("admin client")
}

fn admin_opts() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)))
}

/// Creates `topic` (one partition) with the `cleanup.policy=delete` of a plain stream, so it
/// takes what a compacted topic refuses (keyless records) and DeleteRecords.
async fn create_uncompacted(c: &Config, topic: &str) {
    let t = NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "delete");
    for r in admin(c).create_topics([&t], &admin_opts()).await.unwrap() {
        r.expect("create topic");
    }
}

/// Creates the dead-letter topic so that the broker refuses every dead letter: it takes no
/// record above 100 bytes.
async fn create_refusing_dead_letter_topic(c: &Config) {
    let dlq = &c.kafka.dead_letter_topic;
    let topic = NewTopic::new(dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "100");
    for r in admin(c)
        .create_topics([&topic], &admin_opts())
        .await
        .unwrap()
    {
        r.expect("create the dead-letter topic");
    }
}

/// Produces a tombstone (null payload) with `key` to `topic`.
async fn tombstone(c: &Config, topic: &str, key: Option<&str>) {
    let producer: FutureProducer = towerstream::kafka::producer(&c.kafka).expect("producer");
    let mut r = FutureRecord::<str, [u8]>::to(topic);
    if let Some(k) = key {
        r = r.key(k);
    }
    producer
        .send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce tombstone");
}

/// An item upsert with genre `genre` at event time `t`, keyed by its id.
fn item_at(id: &str, genre: &str, t: i64) -> (Option<String>, Vec<u8>, Option<i32>) {
    let json = format!(
        r#"{{"type":"item","event_id":"{id}-{t}","event_time_ms":{t},"item_id":"{id}","op":"upsert","genres":["{genre}"]}}"#
    );
    (Some(id.to_owned()), json.into_bytes(), None)
}

fn has_item(h: &IngestHandle, id: &str) -> bool {
    h.catalog.read().unwrap().item(&Id::new(id)).is_some()
}

/// Polls `cond` until it holds (fails after `WAIT`).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// High watermark of partition 0 of `topic`.
fn high_watermark(c: &Config, topic: &str) -> i64 {
    let consumer: BaseConsumer = client_config(&c.kafka).create().expect("consumer");
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks")
        .1
}

/// Deletes the records of partition 0 of `topic` before `offset` (as retention would).
async fn delete_before(c: &Config, topic: &str, offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    let result = admin(c)
        .delete_records(&tpl, &admin_opts())
        .await
        .expect("delete records");
    for e in result.elements() {
        assert!(e.error().is_ok(), "delete records: {:?}", e.error());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_deletes_its_item_and_older_versions_do_not_come_back() {
    let mut c = unique_config("tombstone");
    c.serve.listen = "127.0.0.1:0".into();
    c.replication.topic = format!("gen-{}", c.kafka.group_id);
    // A compacted topic refuses keyless records; a table topic that is not compacted does not.
    create_uncompacted(&c, &c.kafka.user_topic).await;
    create_topics(&c, 1).await;
    let items = c.kafka.item_topic.clone();
    let now = now_ms();
    produce(
        &c,
        &items,
        &[item_at("a", "x", now), item_at("b", "x", now)],
    )
    .await;
    tombstone(&c, &items, Some("a")).await;

    // Bootstrap: the tombstone deleted `a`.
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let h = spawn(&c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .unwrap();
    assert!(!has_item(&h, "a") && has_item(&h, "b"));

    // Steady state: an older version of `a` arrives after its tombstone (a replay, a slower
    // producer) and stays deleted; a tombstone for `b` deletes it.
    produce(&c, &items, &[item_at("a", "old", now - 3_600_000)]).await;
    tombstone(&c, &items, Some("b")).await;
    eventually("b deleted", || !has_item(&h, "b")).await;
    assert!(
        !has_item(&h, "a"),
        "an older upsert resurrected a deleted item"
    );
    let stale = metric_value(
        &metrics,
        "towerstream_catalog_stale_updates_total",
        &[("table", "items")],
    );
    assert_eq!(stale, 1.0);
    assert_eq!(
        metric_value(&metrics, "towerstream_catalog_items", &[]),
        0.0
    );
    for reason in ["bad_json", "bad_key"] {
        let n = metric_value(
            &metrics,
            "towerstream_events_invalid_total",
            &[("reason", reason)],
        );
        assert_eq!(n, 0.0, "{reason}");
    }

    // A tombstone without a key names nothing to delete: it is the one dead letter.
    tombstone(&c, &c.kafka.user_topic, None).await;
    let dlq = read_dead_letters(&c, 1, WAIT).await;
    assert_eq!(dlq[0].headers[headers::REASON], "bad_key");
    assert_eq!(dlq[0].headers[headers::TOPIC], c.kafka.user_topic);
    assert_eq!(dlq[0].headers[headers::OFFSET], "0");
    assert_eq!(
        metric_value(&metrics, "towerstream_dead_letter_total", &[]),
        1.0
    );
    shutdown.cancel();
    h.task.await.unwrap().unwrap();

    // A serving replica reads the same tables to the same catalogue.
    let rm = Metrics::new();
    let replica = towerstream::replica::start(&c, &rm).await.unwrap();
    {
        let catalog = replica.catalog.read().unwrap();
        assert_eq!(catalog.item_count(), 0, "a and b were deleted");
    }
    let stale = metric_value(
        &rm,
        "towerstream_catalog_stale_updates_total",
        &[("table", "items")],
    );
    assert_eq!(
        stale, 1.0,
        "the older version of a is ignored by the replica too"
    );
    produce(&c, &items, &[item_at("d", "x", now)]).await;
    tombstone(&c, &items, Some("d")).await;
    produce(&c, &items, &[item_at("e", "x", now)]).await;
    let has = |id: &str| replica.catalog.read().unwrap().item(&Id::new(id)).is_some();
    eventually("e arrives at the replica", || has("e")).await;
    assert!(!has("d"), "the replica applied the tombstone of d");
    replica.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_dead_letter_topic_pauses_ingestion_at_the_cap_and_loses_nothing() {
    let mut c = unique_config("dlq-cap");
    c.ingest.max_pending_dead_letters = 3;
    create_refusing_dead_letter_topic(&c).await;
    create_topics(&c, 1).await;
    let dlq = c.kafka.dead_letter_topic.clone();
    let ev = c.kafka.event_topics[0].clone();
    let bad: Vec<_> = (0..20)
        .map(|i| {
            (
                None,
                format!("not json {i} {}", "x".repeat(300)).into_bytes(),
                None,
            )
        })
        .collect();
    produce(&c, &ev, &bad).await;
    let good: Vec<_> = (0..10)
        .map(|i| {
            let item = format!("item-{i}");
            (
                None,
                click_json(&format!("c{i}"), T0 + i, "u", &item, None),
                None,
            )
        })
        .collect();
    produce(&c, &ev, &good).await;

    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut h = spawn(&c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .unwrap();
    let paused = || metric_value(&metrics, "towerstream_ingest_paused", &[]) == 1.0;
    eventually("paused for the dead-letter sink", paused).await;
    eventually("dead-letter writes retried", || {
        metric_value(&metrics, "towerstream_dead_letter_errors_total", &[]) >= 6.0
    })
    .await;
    // Exactly the cap is in flight, and nothing past it was taken from the topic.
    assert_eq!(
        metric_value(&metrics, "towerstream_dead_letters_pending", &[]),
        3.0
    );
    let malformed = metric_value(
        &metrics,
        "towerstream_events_consumed_total",
        &[("topic", ev.as_str()), ("type", "malformed")],
    );
    assert_eq!(malformed, 3.0);
    assert!(
        h.examples.try_recv().is_err(),
        "no click past the refused letters"
    );
    assert!(paused());

    // The broker takes them again: every dead letter is written, every click arrives.
    let raise =
        AlterConfig::new(ResourceSpecifier::Topic(&dlq)).set("max.message.bytes", "1048588");
    for r in admin(&c)
        .alter_configs([&raise], &admin_opts())
        .await
        .unwrap()
    {
        r.expect("raise max.message.bytes");
    }
    let written = read_dead_letters(&c, 20, Duration::from_secs(90)).await;
    let mut offsets: Vec<i64> = written
        .iter()
        .map(|d| d.headers[headers::OFFSET].parse().unwrap())
        .collect();
    offsets.sort();
    assert_eq!(offsets, (0..20).collect::<Vec<i64>>());
    let clicks = recv_n(&mut h, 10, WAIT).await;
    h.acker
        .ack(&clicks.iter().map(|e| e.origin).collect::<Vec<_>>());
    eventually("sink drained", || {
        metric_value(&metrics, "towerstream_dead_letters_pending", &[]) == 0.0
    })
    .await;
    shutdown.cancel();
    h.task.await.unwrap().unwrap();
    assert_eq!(committed(&c, 1), vec![30]);
}

/// A checkpoint that resumes partition 0 at offset 2 having applied nothing past it.
fn resume_at_2(c: &Config) -> ResumeMap {
    ResumeMap::from([(
        (c.kafka.event_topics[0].clone(), 0),
        ResumePoint {
            offset: 2,
            consumed_until: 3,
            unapplied: Vec::new(),
        },
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_point_that_retention_overtook_is_reported_and_can_stop_the_start() {
    let mut c = unique_config("retention-gap");
    create_topics(&c, 1).await;
    let ev = c.kafka.event_topics[0].clone();
    let clicks: Vec<_> = (0..10)
        .map(|i| {
            (
                None,
                click_json(&format!("c{i}"), T0 + i, "u", &format!("i{i}"), None),
                None,
            )
        })
        .collect();
    produce(&c, &ev, &clicks).await;
    // Retention deleted offsets 0..6; the checkpoint applied 2 and resumes at 2, so 3, 4
    // and 5 are lost.
    delete_before(&c, &ev, 6).await;

    c.kafka.on_retention_gap = RetentionGapPolicy::Fail;
    let options = IngestOptions {
        resume: resume_at_2(&c),
        ..Default::default()
    };
    let metrics = Metrics::new();
    let err = match spawn(&c, &metrics, options, CancellationToken::new()).await {
        Err(e) => e,
        Ok(_) => panic!("started over a retention gap with on_retention_gap = fail"),
    };
    assert!(matches!(err, IngestError::RetentionGap(_)), "{err}");
    let msg = err.to_string();
    for part in [
        format!("{ev}/0"),
        "offset 2".into(),
        "starts at 6".into(),
        "3 messages".into(),
        "kafka.on_retention_gap".into(),
    ] {
        assert!(msg.contains(&part), "{part:?} missing in: {msg}");
    }
    let lost = metric_value(
        &metrics,
        "towerstream_retention_gap_messages_total",
        &[("topic", ev.as_str())],
    );
    assert_eq!(lost, 3.0);

    // `warn` goes on from the log start, having counted the loss.
    c.kafka.on_retention_gap = RetentionGapPolicy::Warn;
    let options = IngestOptions {
        resume: resume_at_2(&c),
        ..Default::default()
    };
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut h = spawn(&c, &metrics, options, shutdown.clone())
        .await
        .unwrap();
    let got = recv_n(&mut h, 4, WAIT).await;
    let offsets: Vec<i64> = got.iter().map(|e| e.origin.offset).collect();
    assert_eq!(offsets, vec![6, 7, 8, 9]);
    let lost = metric_value(
        &metrics,
        "towerstream_retention_gap_messages_total",
        &[("topic", ev.as_str())],
    );
    assert_eq!(lost, 3.0);
    shutdown.cancel();
    h.acker
        .ack(&got.iter().map(|e| e.origin).collect::<Vec<_>>());
    h.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_bootstrap_is_not_fooled_by_an_emptied_table_or_a_transaction_marker() {
    let mut c = unique_config("bootstrap");
    c.kafka.bootstrap_timeout_secs = 2;
    create_uncompacted(&c, &c.kafka.item_topic).await;
    create_topics(&c, 1).await;
    let items = c.kafka.item_topic.clone();
    // An emptied table (retention or DeleteRecords took every record): nothing to wait for.
    produce(&c, &items, &[item_at("a", "x", 1), item_at("b", "x", 1)]).await;
    delete_before(&c, &items, 2).await;
    let shutdown = CancellationToken::new();
    let h = spawn(
        &c,
        &Metrics::new(),
        IngestOptions::default(),
        shutdown.clone(),
    )
    .await
    .expect("an emptied table topic bootstraps at once");
    shutdown.cancel();
    h.task.await.unwrap().unwrap();

    // A transactional producer's commit marker takes the last offset; a reader never receives
    // it as a message, yet the table is read up to date.
    let txn: FutureProducer = client_config(&c.kafka)
        .set("transactional.id", format!("{}-txn", c.kafka.group_id))
        .create()
        .expect("transactional producer");
    txn.init_transactions(Duration::from_secs(20)).unwrap();
    txn.begin_transaction().unwrap();
    let (key, payload, _) = item_at("c", "x", 2);
    txn.send(
        FutureRecord::to(&items)
            .key(key.as_deref().unwrap())
            .payload(&payload),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    txn.commit_transaction(Duration::from_secs(20)).unwrap();
    // The coordinator writes the commit marker after `commit_transaction` returns, and a
    // read_committed watermark (librdkafka's default) stays at the last stable offset until
    // then: wait for it rather than race it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while high_watermark(&c, &items) < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        high_watermark(&c, &items),
        4,
        "2 deleted, 1 record, 1 commit marker"
    );
    let shutdown = CancellationToken::new();
    let h = spawn(
        &c,
        &Metrics::new(),
        IngestOptions::default(),
        shutdown.clone(),
    )
    .await
    .expect("a table ending in a commit marker bootstraps");
    assert!(has_item(&h, "c"));
    shutdown.cancel();
    h.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_table_bootstrap_fails_naming_the_key() {
    let mut c = unique_config("bootstrap-stall");
    c.kafka.bootstrap_timeout_secs = 2;
    c.ingest.max_pending_dead_letters = 1;
    create_refusing_dead_letter_topic(&c).await;
    create_topics(&c, 1).await;
    let items = c.kafka.item_topic.clone();
    produce(&c, &items, &[item_at("a", "x", 1)]).await;
    // Malformed table records while the dead-letter topic refuses them: the bootstrap waits
    // for the sink, makes no progress, and says so naming the key.
    let bad: Vec<_> = (0..3)
        .map(|i| {
            (
                Some(format!("k{i}")),
                format!("bad {i} {}", "x".repeat(300)).into_bytes(),
                None,
            )
        })
        .collect();
    produce(&c, &items, &bad).await;
    let err = match spawn(
        &c,
        &Metrics::new(),
        IngestOptions::default(),
        CancellationToken::new(),
    )
    .await
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bootstrap finished while its dead letters are refused"),
    };
    assert!(err.contains("`kafka.bootstrap_timeout_secs`"), "{err}");
    assert!(
        err.contains(&format!("{items}/0 read up to offset 2 of 4")),
        "{err}"
    );
    assert!(err.contains("dead-letter topic"), "{err}");
}

/// `towerstream ingest` on `c` (configured by `--set` alone) until its progress log reports
/// `examples` examples, then SIGTERM; its exit status and stdout.
fn dry_run_binary(c: &Config, examples: u64) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead, BufReader};

    let k = &c.kafka;
    let sets = [
        format!("kafka.brokers={}", k.brokers),
        format!("kafka.group_id={}", k.group_id),
        format!("kafka.event_topics=[\"{}\"]", k.event_topics[0]),
        format!("kafka.item_topic={}", k.item_topic),
        format!("kafka.user_topic={}", k.user_topic),
        format!("kafka.dead_letter_topic={}", k.dead_letter_topic),
        format!("kafka.handover_topic={}", k.handover_topic),
        format!("kafka.commit_interval_ms={}", k.commit_interval_ms),
    ];
    let mut args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".into(), s.clone()])
        .collect();
    args.push("ingest".into());
    let mut cmd = towerstream_command(&args);
    let mut child = cmd.spawn().expect("spawn towerstream ingest");
    let (tx, lines) = std::sync::mpsc::channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            eprintln!("[ingest] {line}");
            let _ = tx.send(line);
        }
    });
    let want = format!("examples={examples} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("no progress line with every example in time");
        if line.contains("ingest progress") && line.contains(&want) {
            break;
        }
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: a signal to the child this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = child
        .wait_with_output()
        .expect("wait for towerstream ingest");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_commits_nothing_and_writes_no_dead_letters() {
    let c = unique_config("dry-run");
    create_topics(&c, 1).await;
    let ev = c.kafka.event_topics[0].clone();
    let events = vec![
        (None, click_json("c0", T0, "u", "a", None), None),
        (None, b"{broken".to_vec(), None),
        (None, click_json("c1", T0 + 1, "u", "b", None), None),
    ];
    produce(&c, &ev, &events).await;

    let run = c.clone();
    let (status, stdout) = tokio::task::spawn_blocking(move || dry_run_binary(&run, 2))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stdout.contains("2 examples, 1 invalid events (dry run: not dead-lettered)"),
        "{stdout}"
    );
    assert_eq!(high_watermark(&c, &c.kafka.dead_letter_topic), 0);
    assert_eq!(
        committed(&c, 1),
        vec![-1],
        "the production group is untouched"
    );
    let mut dry = c.clone();
    dry.kafka.group_id = dry_run_group(&c.kafka);
    assert_eq!(
        committed(&dry, 1),
        vec![-1],
        "nor does the dry run commit its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_take_the_configured_replication_factor() {
    let mut c = unique_config("replication");
    c.replication.topic = format!("gen-{}", c.kafka.group_id);
    let probe: BaseConsumer = client_config(&c.kafka).create().unwrap();
    let brokers = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap()
        .brokers()
        .len() as i32;
    // More replicas than brokers: the broker refuses, which shows the value reaches it.
    c.kafka.replication_factor = brokers + 1;
    let err = ensure_topics(&c.kafka, &topic_specs(&c.kafka, 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("replication"), "{err}");
    // -1: the broker's default.replication.factor.
    c.kafka.replication_factor = -1;
    let mut specs = topic_specs(&c.kafka, 1);
    specs.push(towerstream::kafka::generations_topic_spec(&c.replication));
    ensure_topics(&c.kafka, &specs).await.unwrap();
    let md = probe
        .fetch_metadata(Some(&c.replication.topic), Duration::from_secs(10))
        .unwrap();
    let replicas = md.topics()[0].partitions()[0].replicas().len();
    assert!(replicas >= 1);
}
