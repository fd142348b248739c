//! Avro events with a real schema registry (Apicurio Registry, started by `scripts/registry`,
//! at `TS_SCHEMA_REGISTRY_URL`) through the real local broker: records in the Confluent wire
//! format are decoded with the registered schema and mapped like JSON ones; records that are
//! not framed, or name a schema the registry does not have, are dead-lettered as
//! `bad_encoding`; and while the registry cannot be reached the records wait — none is
//! dead-lettered — and train once it is back.

mod common;

use std::time::Duration;

use apache_avro::types::Value as Avro;
use common::*;
use tokio_util::sync::CancellationToken;
use towerstream::config::Config;
use towerstream::example::Label;
use towerstream::ingest::dead_letter::headers;
use towerstream::ingest::{spawn, IngestOptions};
use towerstream::mapping::registry::{frame, message_indexes, Registered, SchemaRegistry};
use towerstream::metrics::Metrics;

const WAIT: Duration = Duration::from_secs(30);
const T0: i64 = 1_700_000_000_000;

/// A shop's tracking event, as its producers register it.
const SCHEMA: &str = include_str!("../schemas/examples/mapped/tracking-event.avsc");

/// Its mapping (Avro; `format` is switched to `protobuf` for the `.proto` test).
const MAPPING: &str = include_str!("../schemas/examples/mapped/tracking-mapping.toml");

/// `mapping.schema_registry_url` of the tracking mapping (set again per test).
const MAPPING_URL_LINE: &str = "schema_registry_url = \"http://127.0.0.1:28081/apis/ccompat/v7\"";

fn registry_url() -> String {
    std::env::var("TS_SCHEMA_REGISTRY_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:28081/apis/ccompat/v7".into())
}

fn avro_config(test: &str, registry: &str) -> Config {
    let mut c = unique_config(test);
    c.mapping = Config::from_toml(MAPPING).expect("mapping").mapping;
    c.mapping.schema_registry_url = registry.to_owned();
    c.mapping.schema_registry_timeout_ms = 1000;
    c.join.window_ms = 5000;
    c.validate().expect("a valid mapping");
    c
}

/// Registers `schema` (a `.proto` file with `protobuf`) under a subject of this test's topic in
/// the registry `scripts/registry` starts, and returns its id.
async fn register_as(c: &Config, schema: &str, protobuf: bool) -> u32 {
    let registry = SchemaRegistry::new(&registry_url(), Duration::from_secs(10));
    let subject = format!("{}-value", c.kafka.event_topics[0]);
    registry
        .register(&subject, schema, protobuf)
        .await
        .expect("the registry takes the schema")
}

/// Registers the Avro schema; returns its id and the schema.
async fn register(c: &Config) -> (u32, apache_avro::Schema) {
    let id = register_as(c, SCHEMA, false).await;
    (id, apache_avro::Schema::parse_str(SCHEMA).unwrap())
}

fn record(
    schema: &apache_avro::Schema,
    id: u32,
    action: &str,
    event: &str,
    at: i64,
    impression: &str,
) -> Vec<u8> {
    let some = |v: Avro| Avro::Union(1, Box::new(v));
    let value = Avro::Record(vec![
        ("action".into(), Avro::String(action.into())),
        ("event_uuid".into(), Avro::String(event.into())),
        ("user_id".into(), Avro::Long(7)),
        ("sku".into(), Avro::String("A-1".into())),
        ("occurred_at".into(), Avro::TimestampMillis(at)),
        ("impression".into(), some(Avro::String(impression.into()))),
        ("slot".into(), some(Avro::Int(2))),
    ]);
    frame(
        id,
        &apache_avro::to_avro_datum(schema, value).expect("a record of the schema"),
    )
}

const PROTO: &str = include_str!("../schemas/examples/mapped/tracking_event.proto");

fn proto_record(
    file: &prost_reflect::FileDescriptor,
    id: u32,
    action: &str,
    event: &str,
    at: i64,
    impression: &str,
) -> Vec<u8> {
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value as P};
    let desc = file.messages().next().expect("TrackingEvent");
    let mut m = DynamicMessage::new(desc.clone());
    m.set_field_by_name("action", P::String(action.into()));
    m.set_field_by_name("event_uuid", P::String(event.into()));
    m.set_field_by_name("user_id", P::I64(7));
    m.set_field_by_name("sku", P::String("A-1".into()));
    let ts_desc = desc
        .get_field_by_name("occurred_at")
        .and_then(|f| f.kind().as_message().cloned())
        .expect("a Timestamp field");
    let mut ts = DynamicMessage::new(ts_desc);
    ts.set_field_by_name("seconds", P::I64(at / 1000));
    ts.set_field_by_name("nanos", P::I32((at % 1000) as i32 * 1_000_000));
    m.set_field_by_name("occurred_at", P::Message(ts));
    m.set_field_by_name("impression", P::String(impression.into()));
    if action == "view" {
        m.set_field_by_name("slot", P::I32(2));
    }
    let mut body = message_indexes(0);
    body.extend(m.encode_to_vec());
    frame(id, &body)
}

/// Produces `records` (keyed by the user) and runs ingestion until the first example, which
/// must be the joined click of user 7 on A-1 at `at`; returns it with the stop token.
async fn first_click(
    c: &Config,
    records: Vec<Vec<u8>>,
    at: i64,
) -> (towerstream::example::TrainingExample, CancellationToken) {
    let records: Vec<_> = records
        .into_iter()
        .map(|p| (Some("7".to_owned()), p, None))
        .collect();
    produce(c, &c.kafka.event_topics[0], &records).await;
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut h = spawn(c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .unwrap();
    let got = recv_n(&mut h, 1, WAIT).await;
    let e = got[0].clone();
    assert_eq!(e.label, Label::Click { joined: true });
    assert_eq!((e.user_id.as_str(), e.item_id.as_str()), ("7", "A-1"));
    assert_eq!((e.event_time_ms, e.position), (at, Some(2)));
    (e, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_messages_are_decoded_with_the_registered_proto_file() {
    let mut c = avro_config("proto", &registry_url());
    for m in c.mapping.default.iter_mut() {
        m.format = Some(towerstream::mapping::PayloadFormat::Protobuf);
    }
    create_topics(&c, 1).await;
    let id = register_as(&c, PROTO, true).await;
    let Ok(Registered::Protobuf(file)) = SchemaRegistry::compile_proto(PROTO) else {
        panic!("the example .proto compiles");
    };
    let records = vec![
        proto_record(&file, id, "view", "e1", T0 + 1000, "imp-1"),
        proto_record(&file, id, "click", "e2", T0 + 2250, "imp-1"),
        frame(id, &[0, 0xff, 0xff]), // not a message of the schema
    ];
    let (_, shutdown) = first_click(&c, records, T0 + 2250).await;
    let dlq = read_dead_letters(&c, 1, WAIT).await;
    assert_eq!(dlq[0].headers[headers::REASON], "bad_encoding");
    assert!(
        dlq[0].headers[headers::DETAIL].contains("TrackingEvent"),
        "{:?}",
        dlq[0].headers
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_are_decoded_with_the_registered_schema_and_bad_ones_dead_lettered() {
    let c = avro_config("avro", &registry_url());
    create_topics(&c, 1).await;
    let (id, schema) = register(&c).await;
    let records = vec![
        record(&schema, id, "view", "e1", T0 + 1000, "imp-1"),
        record(&schema, id, "click", "e2", T0 + 2000, "imp-1"),
        br#"{"action": "click"}"#.to_vec(), // JSON on an Avro topic: not framed
        frame(u32::MAX - 7, b"\x02\x04"),   // a schema the registry does not have
        frame(id, b"\x0a"),                 // truncated datum
    ];
    let (_, shutdown) = first_click(&c, records, T0 + 2000).await;
    let dlq = read_dead_letters(&c, 3, WAIT).await;
    for d in &dlq {
        assert_eq!(
            d.headers[headers::REASON],
            "bad_encoding",
            "{:?}",
            d.headers
        );
    }
    let detail = |offset: &str| {
        dlq.iter()
            .find(|d| d.headers[headers::OFFSET] == offset)
            .map(|d| d.headers[headers::DETAIL].clone())
            .unwrap_or_default()
    };
    assert!(detail("2").contains("magic byte"), "{}", detail("2"));
    assert!(
        detail("3").contains("not in the registry"),
        "{}",
        detail("3")
    );
    assert!(detail("4").contains("Avro datum"), "{}", detail("4"));
    shutdown.cancel();
}

const PRODUCT: &str = include_str!("../schemas/examples/mapped/product.avsc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avro_catalogue_feed_is_read_through_the_items_mapping() {
    let mut c = avro_config("avro-items", &registry_url());
    let items = r#"
        [mapping.items]
        format = "avro"
        id = "/sku"
        title = "/name"
        category = "/category"
        genres = "/tags"
        event_time = "/updated_at"
        deleted = { field = "/status", values = ["ARCHIVED"] }
    "#;
    c.mapping.items = Config::from_toml(&format!("[mapping]\n{MAPPING_URL_LINE}\n{items}"))
        .expect("the items mapping")
        .mapping
        .items;
    c.validate().expect("valid");
    create_topics(&c, 1).await;
    let registry = SchemaRegistry::new(&registry_url(), Duration::from_secs(10));
    let product_id = registry
        .register(&format!("{}-value", c.kafka.item_topic), PRODUCT, false)
        .await
        .expect("the registry takes the product schema");
    let product = apache_avro::Schema::parse_str(PRODUCT).unwrap();
    let entry = |sku: &str, status: &str| {
        let value = Avro::Record(vec![
            ("sku".into(), Avro::String(sku.into())),
            (
                "name".into(),
                Avro::Union(1, Box::new(Avro::String("Mug".into()))),
            ),
            (
                "category".into(),
                Avro::Union(1, Box::new(Avro::String("kitchen".into()))),
            ),
            (
                "tags".into(),
                Avro::Array(vec![Avro::String("gift".into())]),
            ),
            (
                "status".into(),
                Avro::Enum(u32::from(status == "ARCHIVED"), status.into()),
            ),
            ("updated_at".into(), Avro::TimestampMillis(T0)),
        ]);
        frame(
            product_id,
            &apache_avro::to_avro_datum(&product, value).unwrap(),
        )
    };
    produce(
        &c,
        &c.kafka.item_topic,
        &[
            (Some("A-1".into()), entry("A-1", "ACTIVE"), None),
            (Some("B-2".into()), entry("B-2", "ARCHIVED"), None),
        ],
    )
    .await;
    let (id, schema) = register(&c).await;
    let records = vec![
        record(&schema, id, "view", "e1", T0 + 1000, "imp-1"),
        record(&schema, id, "click", "e2", T0 + 2000, "imp-1"),
    ];
    let (e, shutdown) = first_click(&c, records, T0 + 2000).await;
    let item = e
        .item
        .as_ref()
        .expect("the item's features, from the Avro feed");
    assert_eq!(item.category.as_deref(), Some("kitchen"));
    assert_eq!(item.genres, vec!["gift"]);
    shutdown.cancel();
}

/// Forwards `port` to the registry once `after` has passed; until then nothing listens there.
fn registry_back_after(port: u16, after: Duration) {
    let target = registry_url()
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the proxy port is free again");
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_registry_is_unreachable_records_wait_and_none_is_dead_lettered() {
    // A port where nothing listens for the first seconds, then the real registry behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = registry_url();
    let path = path.splitn(4, '/').nth(3).unwrap_or_default().to_owned();
    let c = avro_config("avro-outage", &format!("http://127.0.0.1:{port}/{path}"));
    create_topics(&c, 1).await;
    let (id, schema) = register(&c).await;
    let records = vec![
        (
            Some("7".to_owned()),
            record(&schema, id, "view", "e1", T0 + 1000, "imp-1"),
            None,
        ),
        (
            Some("7".to_owned()),
            record(&schema, id, "click", "e2", T0 + 2000, "imp-1"),
            None,
        ),
    ];
    produce(&c, &c.kafka.event_topics[0], &records).await;

    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let mut h = spawn(&c, &metrics, IngestOptions::default(), shutdown.clone())
        .await
        .unwrap();
    let outage = Duration::from_secs(4);
    registry_back_after(port, outage);
    let early = recv_until_quiet(&mut h, Duration::from_secs(3)).await;
    assert!(early.is_empty(), "trained without its schema: {early:?}");
    assert!(
        metric_value(&metrics, "towerstream_schema_registry_errors_total", &[]) >= 1.0,
        "the failed fetches are counted"
    );
    let got = recv_n(&mut h, 1, WAIT).await;
    assert_eq!(got[0].label, Label::Click { joined: true });
    // Nothing was dead-lettered for the outage.
    assert!(read_dead_letters(&c, 0, Duration::from_secs(5))
        .await
        .is_empty());
    shutdown.cancel();
}
