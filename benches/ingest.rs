//! Ingestion throughput: decode + validate + join in process (one core) for towerstream's own
//! JSON and for the same stream in a shop's own JSON read through a `[mapping]` (nested
//! fields, an action field, RFC 3339 times), and end to end from the local Kafka broker
//! through the consumer, joiner and channel.
//!
//! `cargo bench --bench ingest [-- --json] [-- --events N]`. Under `cargo test` (no `--bench`
//! argument) it runs a tiny smoke pass so the harness stays honest without taking time.

use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use towerstream::catalog::Catalog;
use towerstream::config::{Config, JoinConfig};
use towerstream::event::{parse_event, Event, EventError};
use towerstream::example::Origin;
use towerstream::ingest::{spawn, IngestOptions};
use towerstream::join::{JoinOutput, Joiner};
use towerstream::kafka::{ensure_topics, producer, topic_specs};
use towerstream::mapping::registry::{frame, message_indexes, Registered, SchemaRegistry};
use towerstream::mapping::Decoder;
use towerstream::metrics::Metrics;

#[derive(Serialize)]
struct Row {
    benchmark: String,
    events: usize,
    seconds: f64,
    events_per_second: f64,
}

/// A realistic mix: slates of 10 impressions, ~1 click per slate, 1% duplicates.
fn stream(n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    let mut t = 1_700_000_000_000i64;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut req = 0u64;
    while out.len() < n {
        req += 1;
        let user = next() % 50_000;
        let slate: Vec<u64> = (0..10).map(|_| next() % 100_000).collect();
        for (pos, item) in slate.iter().enumerate() {
            t += 3;
            out.push(format!(
                r#"{{"type":"impression","event_id":"imp-{req}-{pos}","event_time_ms":{t},"user_id":{user},"item_id":{item},"impression_id":"imp-{req}-{pos}","request_id":"req-{req}","position":{pos},"surface":"home"}}"#
            ).into_bytes());
        }
        let pos = (next() % 10) as usize;
        t += 500;
        let click = format!(
            r#"{{"type":"click","event_id":"clk-{req}","event_time_ms":{t},"user_id":{user},"item_id":{},"impression_id":"imp-{req}-{pos}","dwell_ms":{}}}"#,
            slate[pos],
            next() % 60_000
        )
        .into_bytes();
        if next() % 100 == 0 {
            out.push(click.clone());
        }
        out.push(click);
    }
    out.truncate(n);
    out
}

/// The same events as the example shop's tracker writes them (other names, nested objects,
/// one action field, RFC 3339 times: `towerstream::mapping::shop`).
fn shop_events(native: &[Vec<u8>]) -> Vec<Vec<u8>> {
    native
        .iter()
        .map(|bytes| {
            let e = parse_event(bytes, usize::MAX).expect("bench stream is valid");
            towerstream::mapping::shop::encode(&e)
        })
        .collect()
}

fn shop_decoder() -> Decoder {
    let config = Config::from_toml(towerstream::mapping::shop::MAPPING_TOML)
        .expect("the example mapping loads");
    config.decoder().expect("the example mapping compiles")
}

/// The mapping of `schemas/examples/mapped/tracking-event.avsc` records (and, with
/// `format = "protobuf"`, of `tracking_event.proto` messages).
const AVRO_MAPPING: &str = include_str!("../schemas/examples/mapped/tracking-mapping.toml");

const AVRO_SCHEMA: &str = include_str!("../schemas/examples/mapped/tracking-event.avsc");

/// The same events as Avro records in the Confluent wire format (schema id 1).
fn avro_events(native: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use apache_avro::types::Value as Avro;
    let schema = apache_avro::Schema::parse_str(AVRO_SCHEMA).expect("the example schema");
    let some = |v: Avro| Avro::Union(1, Box::new(v));
    let none = || Avro::Union(0, Box::new(Avro::Null));
    native
        .iter()
        .map(|bytes| {
            let e = parse_event(bytes, usize::MAX).expect("bench stream is valid");
            let (action, user, item, imp, slot) = match &e {
                Event::Impression(i) => (
                    "view",
                    &i.user_id,
                    &i.item_id,
                    some(Avro::String(i.impression_id.clone())),
                    some(Avro::Int(i.position as i32)),
                ),
                Event::Click(c) => (
                    "click",
                    &c.user_id,
                    &c.item_id,
                    c.impression_id
                        .clone()
                        .map_or_else(none, |s| some(Avro::String(s))),
                    none(),
                ),
                other => panic!("bench stream holds impressions and clicks: {other:?}"),
            };
            let value = Avro::Record(vec![
                ("action".into(), Avro::String(action.into())),
                ("event_uuid".into(), Avro::String(e.event_id().into())),
                (
                    "user_id".into(),
                    Avro::Long(user.as_str().parse().unwrap_or(0)),
                ),
                ("sku".into(), Avro::String(item.as_str().into())),
                (
                    "occurred_at".into(),
                    Avro::TimestampMillis(e.event_time_ms()),
                ),
                ("impression".into(), imp),
                ("slot".into(), slot),
            ]);
            let datum = apache_avro::to_avro_datum(&schema, value).expect("a record of it");
            frame(1, &datum)
        })
        .collect()
}

/// A decoder of `format` records whose schema 1 is `schema`, as if fetched: the benchmark
/// measures decoding, not the registry.
fn registered_decoder(format: &str, schema: Registered) -> Decoder {
    let toml = AVRO_MAPPING.replace("format = \"avro\"", &format!("format = {format:?}"));
    // Nothing is fetched: the schema is inserted below.
    let config = Config::from_toml(&toml).expect("the mapping loads");
    let decoder = config.decoder().expect("the mapping compiles");
    if let Some(r) = decoder.registry() {
        r.insert(1, schema);
    }
    decoder
}

const PROTO: &str = include_str!("../schemas/examples/mapped/tracking_event.proto");

/// The same events as Protobuf messages of `tracking_event.proto` (schema id 1).
fn proto_events(native: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value as P};
    let Ok(Registered::Protobuf(file)) = SchemaRegistry::compile_proto(PROTO) else {
        panic!("the example .proto compiles");
    };
    let desc = file.messages().next().expect("TrackingEvent");
    let ts_desc = desc
        .get_field_by_name("occurred_at")
        .and_then(|f| f.kind().as_message().cloned())
        .expect("a Timestamp");
    native
        .iter()
        .map(|bytes| {
            let e = parse_event(bytes, usize::MAX).expect("bench stream is valid");
            let mut m = DynamicMessage::new(desc.clone());
            let (action, user, item) = match &e {
                Event::Impression(i) => {
                    m.set_field_by_name("impression", P::String(i.impression_id.clone()));
                    m.set_field_by_name("slot", P::I32(i.position as i32));
                    ("view", &i.user_id, &i.item_id)
                }
                Event::Click(c) => {
                    if let Some(imp) = &c.impression_id {
                        m.set_field_by_name("impression", P::String(imp.clone()));
                    }
                    ("click", &c.user_id, &c.item_id)
                }
                other => panic!("bench stream holds impressions and clicks: {other:?}"),
            };
            m.set_field_by_name("action", P::String(action.into()));
            m.set_field_by_name("event_uuid", P::String(e.event_id().into()));
            m.set_field_by_name("user_id", P::I64(user.as_str().parse().unwrap_or(0)));
            m.set_field_by_name("sku", P::String(item.as_str().into()));
            let mut ts = DynamicMessage::new(ts_desc.clone());
            ts.set_field_by_name("seconds", P::I64(e.event_time_ms() / 1000));
            ts.set_field_by_name(
                "nanos",
                P::I32((e.event_time_ms() % 1000) as i32 * 1_000_000),
            );
            m.set_field_by_name("occurred_at", P::Message(ts));
            let mut body = message_indexes(0);
            body.extend(m.encode_to_vec());
            frame(1, &body)
        })
        .collect()
}

/// Decoding alone (bytes to a validated event), one core.
fn decode_only(
    name: &str,
    events: &[Vec<u8>],
    decode: impl Fn(&[u8]) -> Result<Event, EventError>,
) -> Row {
    let start = Instant::now();
    for bytes in events {
        std::hint::black_box(decode(bytes).expect("bench stream is valid"));
    }
    let seconds = start.elapsed().as_secs_f64();
    Row {
        benchmark: format!("decode+validate, {name}, 1 core"),
        events: events.len(),
        seconds,
        events_per_second: events.len() as f64 / seconds,
    }
}

fn in_process(
    name: &str,
    events: &[Vec<u8>],
    decode: impl Fn(&[u8]) -> Result<Event, EventError>,
) -> Row {
    let catalog = Catalog::default();
    let mut joiner = Joiner::new(JoinConfig::default(), true);
    let mut out = JoinOutput::default();
    let mut emitted = 0usize;
    let start = Instant::now();
    for (i, bytes) in events.iter().enumerate() {
        let origin = Origin {
            topic: 0,
            partition: 0,
            offset: i as i64,
            epoch: 1,
        };
        match decode(bytes) {
            Ok(Event::Impression(imp)) => {
                joiner.on_impression(imp, origin, &catalog, &mut out);
            }
            Ok(Event::Click(c)) => {
                joiner.on_click(c, origin, &catalog, &mut out);
            }
            Ok(_) => {}
            Err(e) => panic!("bench stream is valid: {e}"),
        }
        emitted += out.examples.len();
        out.clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(emitted);
    Row {
        benchmark: format!("decode+validate+join, {name}, in process, 1 core"),
        events: events.len(),
        seconds,
        events_per_second: events.len() as f64 / seconds,
    }
}

async fn end_to_end(events: &[Vec<u8>]) -> Result<Vec<Row>, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis();
    let mut c = Config::default();
    c.kafka.brokers =
        std::env::var("TS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    c.kafka.group_id = format!("bench-{stamp}");
    c.kafka.event_topics = vec![format!("bench-events-{stamp}")];
    c.kafka.item_topic = format!("bench-items-{stamp}");
    c.kafka.user_topic = format!("bench-users-{stamp}");
    c.kafka.dead_letter_topic = format!("bench-dlq-{stamp}");
    let partitions = 4;
    tokio::time::timeout(
        Duration::from_secs(20),
        ensure_topics(&c.kafka, &topic_specs(&c.kafka, partitions)),
    )
    .await
    .map_err(|_| "no broker answered within 20 s (start one with scripts/kafka start)".to_owned())?
    .map_err(|e| e.to_string())?;

    let p: FutureProducer = producer(&c.kafka).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let topic = c.kafka.event_topics[0].clone();
    let records = events
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("{}", i % 997), e.clone()));
    towerstream::kafka::produce_all(&p, &topic, records)
        .await
        .map_err(|e| e.to_string())?;
    let produce_s = start.elapsed().as_secs_f64();

    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let mut h = spawn(&c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .map_err(|e| e.to_string())?;
    let consumed = || {
        metrics
            .ingest
            .events_consumed
            .with_label_values(&[topic.as_str(), "impression"])
            .get()
            + metrics
                .ingest
                .events_consumed
                .with_label_values(&[topic.as_str(), "click"])
                .get()
    };
    let mut batch = Vec::with_capacity(1024);
    // The last events may emit no example (impressions still in the window), so waiting on
    // the channel alone can outlast the stream: poll briefly, and call it a stall only when
    // nothing was consumed for 20 s.
    let (mut last, mut progress) = (0u64, Instant::now());
    while consumed() < events.len() as u64 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            h.examples.recv_many(&mut batch, 1024),
        )
        .await
        {
            Ok(0) => return Err("channel closed".into()),
            Ok(_) => {
                let origins: Vec<Origin> = batch.drain(..).map(|e| e.origin).collect();
                h.acker.ack(&origins);
            }
            Err(_) => {}
        }
        let now = consumed();
        if now > last {
            (last, progress) = (now, Instant::now());
        } else if progress.elapsed() > Duration::from_secs(20) {
            return Err(format!("stalled after {now} events"));
        }
    }
    let consume_s = start.elapsed().as_secs_f64();
    shutdown.cancel();
    while let Ok(ex) = h.examples.try_recv() {
        h.acker.ack(&[ex.origin]);
    }
    let _ = h.task.await;
    let _ = towerstream::kafka::delete_topics(
        &c.kafka,
        &[
            &topic,
            &c.kafka.item_topic,
            &c.kafka.user_topic,
            &c.kafka.dead_letter_topic,
        ],
    )
    .await;
    Ok(vec![
        Row {
            benchmark: format!("produce to local broker ({partitions} partitions)"),
            events: events.len(),
            seconds: produce_s,
            events_per_second: events.len() as f64 / produce_s,
        },
        Row {
            benchmark: "end to end: broker -> consume -> parse -> join -> channel -> ack".into(),
            events: events.len(),
            seconds: consume_s,
            events_per_second: events.len() as f64 / consume_s,
        },
    ])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let json = args.iter().any(|a| a == "--json");
    let n = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let events = stream(n);
    let shop = shop_events(&events);
    let avro = avro_events(&events);
    let proto = proto_events(&events);
    let decoder = shop_decoder();
    let avro_schema = apache_avro::Schema::parse_str(AVRO_SCHEMA).expect("the example schema");
    let avro_schema = towerstream::mapping::AvroSchema::new(avro_schema).expect("resolvable");
    let avro_decoder = registered_decoder("avro", Registered::Avro(avro_schema));
    let proto_schema = SchemaRegistry::compile_proto(PROTO).expect("the example .proto");
    let proto_decoder = registered_decoder("protobuf", proto_schema);
    let proto_mapped = |b: &[u8]| proto_decoder.decode(0, b);
    let native = |b: &[u8]| parse_event(b, 64 * 1024);
    let mapped = |b: &[u8]| decoder.decode(0, b);
    let avro_mapped = |b: &[u8]| avro_decoder.decode(0, b);
    let mut rows = vec![
        decode_only("native JSON", &events, native),
        decode_only("shop JSON through [mapping]", &shop, mapped),
        decode_only(
            "Avro (registry framing) through [mapping]",
            &avro,
            avro_mapped,
        ),
        decode_only(
            "Protobuf (registry framing) through [mapping]",
            &proto,
            proto_mapped,
        ),
        in_process("native JSON", &events, native),
        in_process("shop JSON through [mapping]", &shop, mapped),
        in_process("Avro through [mapping]", &avro, avro_mapped),
        in_process("Protobuf through [mapping]", &proto, proto_mapped),
    ];
    if benching {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        match rt.block_on(end_to_end(&events[..n.min(400_000)])) {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("end-to-end benchmark skipped: {e}"),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        );
    } else {
        println!(
            "{:<70} {:>10} {:>9} {:>14}",
            "benchmark", "events", "seconds", "events/s"
        );
        for r in &rows {
            println!(
                "{:<70} {:>10} {:>9.3} {:>14.0}",
                r.benchmark, r.events, r.seconds, r.events_per_second
            );
        }
    }
}
