//! The table reader: follows the compacted `item` and `user` topics from the beginning, like a
//! Kafka Streams global table, so every instance holds the whole catalogue and all profiles.
//!
//! [`TableReader::bootstrap`] reads up to the high watermarks before the event consumer starts,
//! so the first clicks already see the catalogue that was published before them.
//!
//! [`decode`] turns one table record into a [`TableChange`] (or the reason it is rejected) and
//! [`apply`] applies it: both the trainer's ingestion and a serving replica go through these
//! two, so they read the tables alike. A record is a JSON item or user event, or a tombstone
//! (null payload, how a compacted topic deletes a key): the key is the id (as
//! [`replay`](crate::replay) produces them), the topic says whether an item or a user is
//! deleted, and the record's timestamp is the deletion's event time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::dead_letter::DeadLetterSink;
use crate::catalog::{Applied, Catalog, SharedCatalog};
use crate::config::KafkaConfig;
use crate::event::{Event, EventError, Id, InvalidReason, MAX_ID_LEN};
use crate::kafka::client_config;
use crate::mapping::{Decoder, Table};
use crate::metrics::IngestMetrics;

/// One change to the catalogue or the profiles.
#[derive(Debug, Clone, PartialEq)]
pub enum TableChange {
    /// An item or user event (upsert or delete, with its own event time).
    Event(Event),
    /// A tombstone on the item topic: the item with this id is deleted.
    DeleteItem {
        /// The record's key.
        id: Id,
        /// The record's timestamp, when it has one.
        time_ms: Option<i64>,
    },
    /// A tombstone on the user topic: the profile with this id is deleted.
    DeleteUser {
        /// The record's key.
        id: Id,
        /// The record's timestamp, when it has one.
        time_ms: Option<i64>,
    },
}

impl TableChange {
    /// The change an event makes, if it is an item or user event.
    pub fn from_event(event: Event) -> Option<TableChange> {
        matches!(event, Event::Item(_) | Event::User(_)).then_some(TableChange::Event(event))
    }

    /// Refuses a change stamped more than `max_future_ms` ahead of `now_ms` (0: no limit):
    /// with changes applied in event-time order, one far-future stamp would freeze its entry
    /// against every later update.
    pub fn check_future(&self, max_future_ms: i64, now_ms: i64) -> Result<(), EventError> {
        let time = match self {
            TableChange::Event(e) => Some(e.event_time_ms()),
            TableChange::DeleteItem { time_ms, .. } | TableChange::DeleteUser { time_ms, .. } => {
                *time_ms
            }
        };
        match time {
            Some(t) if max_future_ms > 0 && t > now_ms.saturating_add(max_future_ms) => {
                Err(EventError {
                    reason: crate::event::InvalidReason::FutureTime,
                    detail: format!(
                        "`event_time_ms` {t} is more than join.max_future_ms ({max_future_ms} ms) ahead of the wall clock"
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Which table it changes (the metric label).
    pub fn table(&self) -> &'static str {
        match self {
            TableChange::Event(Event::User(_)) | TableChange::DeleteUser { .. } => "users",
            _ => "items",
        }
    }

    /// `events_consumed` type label.
    pub fn kind(&self) -> &'static str {
        match self {
            TableChange::Event(e) => e.kind(),
            TableChange::DeleteItem { .. } => "item",
            TableChange::DeleteUser { .. } => "user",
        }
    }
}

/// One table record as read from Kafka.
#[derive(Debug, Clone, Copy)]
pub struct TableRecord<'a> {
    /// Topic it was read from.
    pub topic: &'a str,
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record value; `None` is a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Record timestamp (ms since the epoch), when it has one.
    pub timestamp_ms: Option<i64>,
}

impl<'a> TableRecord<'a> {
    /// The parts of a consumed message.
    pub fn of(msg: &'a impl Message) -> TableRecord<'a> {
        TableRecord {
            topic: msg.topic(),
            key: msg.key(),
            payload: msg.payload(),
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }
}

/// How the table readers wait for the schema of a binary record before decoding it: the
/// decoder that knows the table formats, and the counter of failed fetches.
#[derive(Clone, Copy)]
pub struct SchemaWait<'a> {
    /// The decoder (its registry and the tables' formats).
    pub decoder: &'a Decoder,
    /// `towerstream_schema_registry_errors_total`.
    pub errors: &'a prometheus::IntCounter,
    /// The item topic's name (the rest is the user topic).
    pub item_topic: &'a str,
}

impl SchemaWait<'_> {
    /// Waits until the schema `msg` needs is known (see [`Decoder::await_schema`]).
    pub async fn wait(&self, msg: &impl Message) {
        let table = if msg.topic() == self.item_topic {
            Table::Items
        } else {
            Table::Users
        };
        let source = crate::mapping::Source::Table(table);
        self.decoder
            .await_schema(source, msg.payload(), None, self.errors)
            .await;
    }
}

/// [`decode`], then refuses a change stamped more than `max_future_ms` ahead of the wall
/// clock ([`TableChange::check_future`]): what the trainer and replicas both apply.
pub fn decode_checked(
    k: &KafkaConfig,
    record: TableRecord<'_>,
    decoder: &Decoder,
    max_future_ms: i64,
) -> Result<TableChange, EventError> {
    let change = decode(k, record, decoder)?;
    change.check_future(max_future_ms, super::pipeline::wall_clock_ms())?;
    Ok(change)
}

/// Decodes a record of the item or user topic of `k` with `decoder` (towerstream's item and
/// user events, or the `[mapping]`'s `items` / `users`).
pub fn decode(
    k: &KafkaConfig,
    record: TableRecord<'_>,
    decoder: &Decoder,
) -> Result<TableChange, EventError> {
    let Some(payload) = record.payload else {
        return tombstone(k, record);
    };
    let table = if record.topic == k.user_topic {
        Table::Users
    } else {
        Table::Items
    };
    match decoder.decode_table(table, payload, record.timestamp_ms)? {
        e @ (Event::Item(_) | Event::User(_)) => Ok(TableChange::Event(e)),
        other => Err(EventError {
            reason: InvalidReason::WrongTopic,
            detail: format!("a {} event on table topic {}", other.kind(), record.topic),
        }),
    }
}

fn tombstone(k: &KafkaConfig, record: TableRecord<'_>) -> Result<TableChange, EventError> {
    let bad_key = |detail: String| EventError {
        reason: InvalidReason::BadKey,
        detail,
    };
    let key = record.key.ok_or_else(|| {
        bad_key("a tombstone (null payload) without a key: the key names the id to delete".into())
    })?;
    let id = std::str::from_utf8(key)
        .map_err(|_| bad_key("the key of a tombstone is not UTF-8".into()))?;
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(bad_key(format!(
            "the key of a tombstone is {} bytes; an id has 1..={MAX_ID_LEN}",
            id.len()
        )));
    }
    let (id, time_ms) = (Id::new(id), record.timestamp_ms);
    if record.topic == k.item_topic {
        Ok(TableChange::DeleteItem { id, time_ms })
    } else if record.topic == k.user_topic {
        Ok(TableChange::DeleteUser { id, time_ms })
    } else {
        Err(EventError {
            reason: InvalidReason::WrongTopic,
            detail: format!(
                "a tombstone on {}, which is not a table topic",
                record.topic
            ),
        })
    }
}

/// Applies a change to the catalogue (other events are ignored).
pub fn apply_change(c: &mut Catalog, change: &TableChange) -> Applied {
    match change {
        TableChange::Event(Event::Item(e)) => c.apply_item(e),
        TableChange::Event(Event::User(e)) => c.apply_user(e),
        TableChange::Event(Event::Impression(_) | Event::Click(_)) => Applied::Unchanged,
        TableChange::DeleteItem { id, time_ms } => c.delete_item(id, *time_ms),
        TableChange::DeleteUser { id, time_ms } => c.delete_user(id, *time_ms),
    }
}

/// Applies a change under the write lock, counting stale ones and updating the size gauges.
pub fn apply(catalog: &SharedCatalog, change: &TableChange, m: &IngestMetrics) -> Applied {
    let mut c = catalog.write().unwrap_or_else(|p| p.into_inner());
    let applied = apply_change(&mut c, change);
    if applied == Applied::Stale {
        m.catalog_stale.with_label_values(&[change.table()]).inc();
    }
    m.catalog_items.set(c.item_count() as i64);
    m.catalog_users.set(c.user_count() as i64);
    applied
}

/// Why the tables could not be read up to date at start.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Nothing arrived for the configured time while partitions were still behind.
    #[error(
        "table bootstrap made no progress for {secs} s (`kafka.bootstrap_timeout_secs`) with \
         {behind}; raise the key if the broker is slow, else check the table topics"
    )]
    Stalled {
        /// The configured time.
        secs: u64,
        /// The partitions still behind and where they stand.
        behind: String,
    },
}

/// How long the bootstrap waits for a message before it looks at the consumer's position.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Consumer of the table topics, assigned (not subscribed) to all their partitions.
pub struct TableReader {
    consumer: StreamConsumer,
    /// High watermark per (topic, partition) at bootstrap time.
    targets: HashMap<(String, i32), i64>,
}

impl TableReader {
    /// Creates the consumer and assigns every partition of the table topics from the start.
    pub fn new(k: &KafkaConfig) -> Result<TableReader, KafkaError> {
        let consumer: StreamConsumer = client_config(k)
            .set("group.id", format!("{}.tables", k.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut targets = HashMap::new();
        for topic in [&k.item_topic, &k.user_topic] {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in md.topics() {
                if t.error().is_some() {
                    tracing::warn!(
                        topic = t.name(),
                        "table topic not available; starting empty"
                    );
                    continue;
                }
                for p in t.partitions() {
                    tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
                    let (low, high) =
                        consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))?;
                    // Empty, or emptied by retention or DeleteRecords: nothing to wait for.
                    if high > low {
                        targets.insert((t.name().to_owned(), p.id()), high);
                    }
                }
            }
        }
        consumer.assign(&tpl)?;
        Ok(TableReader { consumer, targets })
    }

    /// True while some partition has not reached its bootstrap high watermark.
    pub fn bootstrapping(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Next table message.
    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        self.consumer.recv().await
    }

    /// Reads until every partition reached its bootstrap high watermark, applying each
    /// message with `apply`. It fails only when nothing arrives for `stall` while partitions are
    /// still behind, so a large catalogue that keeps arriving has all the time it needs. With
    /// `gate`, it waits while that dead-letter sink is full (that wait counts as no progress).
    pub async fn bootstrap(
        &mut self,
        stall: Duration,
        gate: Option<&DeadLetterSink>,
        schemas: SchemaWait<'_>,
        mut apply: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<(), BootstrapError> {
        let mut positions: HashMap<(String, i32), i64> = HashMap::new();
        let mut progress = Instant::now();
        while self.bootstrapping() {
            let next = async {
                if let Some(sink) = gate {
                    sink.room().await;
                }
                self.consumer.recv().await
            };
            let Ok(msg) = tokio::time::timeout(IDLE_CHECK.min(stall), next).await else {
                // Transaction markers take offsets but never arrive as messages: a partition
                // whose last records are markers is done once the consumer's position is there.
                if self.reached_by_position() {
                    progress = Instant::now();
                } else if progress.elapsed() >= stall {
                    return Err(self.stalled(stall, &positions, gate));
                }
                continue;
            };
            let msg = msg?;
            // A binary record waits for its schema (the registry being down is not a stall
            // of the topic: the wait restarts the stall clock).
            schemas.wait(&msg).await;
            progress = Instant::now();
            apply(&msg);
            let key = (msg.topic().to_owned(), msg.partition());
            if self
                .targets
                .get(&key)
                .is_some_and(|high| msg.offset() + 1 >= *high)
            {
                self.targets.remove(&key);
            }
            positions.insert(key, msg.offset() + 1);
        }
        Ok(())
    }

    /// Drops the targets the consumer's position reached; true if there were any.
    fn reached_by_position(&mut self) -> bool {
        let Ok(tpl) = self.consumer.position() else {
            return false;
        };
        let before = self.targets.len();
        for e in tpl.elements() {
            let key = (e.topic().to_owned(), e.partition());
            if let (Offset::Offset(at), Some(high)) = (e.offset(), self.targets.get(&key)) {
                if at >= *high {
                    self.targets.remove(&key);
                }
            }
        }
        self.targets.len() < before
    }

    fn stalled(
        &self,
        stall: Duration,
        positions: &HashMap<(String, i32), i64>,
        gate: Option<&DeadLetterSink>,
    ) -> BootstrapError {
        let mut behind: Vec<String> = self
            .targets
            .iter()
            .map(|((t, p), high)| {
                let at = positions.get(&(t.clone(), *p)).copied().unwrap_or(0);
                format!("{t}/{p} read up to offset {at} of {high}")
            })
            .collect();
        behind.sort();
        let mut behind = behind.join(", ");
        if let Some(sink) = gate.filter(|s| s.is_full()) {
            behind.push_str(&format!(
                " (waiting for the dead-letter topic to take {} letters)",
                sink.in_flight() + sink.queued()
            ));
        }
        BootstrapError::Stalled {
            secs: stall.as_secs(),
            behind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(
        topic: &'a str,
        key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
    ) -> TableRecord<'a> {
        TableRecord {
            topic,
            key,
            payload,
            timestamp_ms: Some(77),
        }
    }

    fn reason(r: Result<TableChange, EventError>) -> &'static str {
        r.map_or_else(|e| e.reason.as_str(), |c| panic!("accepted: {c:?}"))
    }

    #[test]
    fn a_tombstone_deletes_the_id_in_its_key_from_its_topic_table() {
        let k = KafkaConfig::default();
        let item = decode(
            &k,
            record(&k.item_topic, Some(b"42"), None),
            &Decoder::native(1024),
        )
        .unwrap();
        assert_eq!(
            item,
            TableChange::DeleteItem {
                id: Id::new("42"),
                time_ms: Some(77)
            }
        );
        let user = decode(
            &k,
            record(&k.user_topic, Some(b"u1"), None),
            &Decoder::native(1024),
        )
        .unwrap();
        assert_eq!((user.table(), user.kind()), ("users", "user"));
        // An empty payload is not a tombstone (Kafka's delete marker is a null value).
        let empty = decode(
            &k,
            record(&k.item_topic, Some(b"42"), Some(b"")),
            &Decoder::native(1024),
        );
        assert_eq!(reason(empty), "bad_json");
    }

    #[test]
    fn a_tombstone_without_a_usable_key_is_rejected_with_a_reason() {
        let k = KafkaConfig::default();
        let err = decode(
            &k,
            record(&k.item_topic, None, None),
            &Decoder::native(1024),
        )
        .unwrap_err();
        assert_eq!(err.reason, InvalidReason::BadKey);
        assert!(err.detail.contains("without a key"), "{}", err.detail);
        for key in [&b"\xff\xfe"[..], b"", &[b'x'; MAX_ID_LEN + 1]] {
            assert_eq!(
                reason(decode(
                    &k,
                    record(&k.user_topic, Some(key), None),
                    &Decoder::native(1024)
                )),
                "bad_key"
            );
        }
        assert_eq!(
            reason(decode(
                &k,
                record("other", Some(b"1"), None),
                &Decoder::native(1024)
            )),
            "wrong_topic"
        );
    }

    #[test]
    fn events_on_table_topics_decode_as_before() {
        let k = KafkaConfig::default();
        let item =
            br#"{"type":"item","event_id":"e","event_time_ms":5,"item_id":"a","op":"delete"}"#;
        let change = decode(
            &k,
            record(&k.item_topic, Some(b"a"), Some(item)),
            &Decoder::native(1024),
        )
        .unwrap();
        let mut c = Catalog::default();
        assert_eq!(apply_change(&mut c, &change), Applied::Unchanged);
        let click =
            br#"{"type":"click","event_id":"c","event_time_ms":5,"user_id":"u","item_id":"a"}"#;
        let wrong = decode(
            &k,
            record(&k.item_topic, None, Some(click)),
            &Decoder::native(1024),
        );
        assert_eq!(reason(wrong), "wrong_topic");
        assert_eq!(
            reason(decode(
                &k,
                record(&k.item_topic, None, Some(item)),
                &Decoder::native(8)
            )),
            "oversize"
        );
    }

    #[test]
    fn a_far_future_change_is_refused_before_it_can_freeze_its_entry() {
        let k = KafkaConfig::default();
        let item = |t: i64| {
            format!(
                r#"{{"type":"item","event_id":"e","event_time_ms":{t},"item_id":"a","op":"upsert"}}"#
            )
        };
        let now = 1_764_600_000_000;
        let ok = item(now + 1000);
        let c = decode(
            &k,
            record(&k.item_topic, Some(b"a"), Some(ok.as_bytes())),
            &Decoder::native(4096),
        )
        .unwrap();
        assert!(c.check_future(600_000, now).is_ok());
        let bad = item(9_999_999_999_999);
        let c = decode(
            &k,
            record(&k.item_topic, Some(b"a"), Some(bad.as_bytes())),
            &Decoder::native(4096),
        )
        .unwrap();
        let err = c.check_future(600_000, now).unwrap_err();
        assert_eq!(err.reason, crate::event::InvalidReason::FutureTime);
        assert!(c.check_future(0, now).is_ok(), "0 turns the rule off");
    }
}
