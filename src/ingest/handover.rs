//! The handover topic: resume points too large for commit metadata travel through a
//! log-compacted topic, and the commit points at the record.
//!
//! A revoked partition's [`ResumePoint`] names what above the committed offset was applied
//! already, so the next owner does not train it twice. It normally rides in the commit's
//! metadata, which brokers cap at 4 KB (`offset.metadata.max.bytes`): about 2,900 offsets. A
//! long join window holds more impressions than that per partition, and the point then goes
//! to `kafka.handover_topic` instead (keyed by group, topic and partition, so compaction keeps
//! the latest of each), with commit metadata `ts1h;<partition>;<offset>` pointing at the
//! record. The next owner reads that one record back; a record that is missing, compacted
//! away or for another commit is ignored (the next owner then re-trains what it cannot skip,
//! as without a handover — counted in `towerstream_handover_overflows_total`).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::ResumePoint;
use crate::config::KafkaConfig;
use crate::kafka::client_config;

/// How long a rebalance waits for the handover record to be written or read.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of commit metadata that points at a handover record.
const POINTER_PREFIX: &str = "ts1h;";

/// Writes and reads the resume points of one consumer group on the handover topic.
pub struct HandoverLog {
    kafka: KafkaConfig,
    producer: FutureProducer,
}

/// Why a resume point could not be written to the handover topic.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The producer or the broker refused the record.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The delivery report never came (the producer was dropped).
    #[error("no delivery report")]
    Canceled,
}

impl HandoverLog {
    /// A log on `kafka.handover_topic` for `kafka.group_id`.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, rdkafka::error::KafkaError> {
        let mut c = client_config(kafka);
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set(
                "message.timeout.ms",
                HANDOVER_TIMEOUT.as_millis().to_string(),
            );
        Ok(HandoverLog {
            kafka: kafka.clone(),
            producer: c.create()?,
        })
    }

    fn key(&self, topic: &str, partition: i32) -> String {
        format!("{}/{topic}/{partition}", self.kafka.group_id)
    }

    /// Writes `point` (the resume point of `topic`/`partition`, committed at `point.offset`)
    /// and returns the commit metadata that points at it. Blocks until the broker has it: the
    /// rebalance callback must not hand the partition over before.
    pub fn write(
        &self,
        topic: &str,
        partition: i32,
        point: &ResumePoint,
    ) -> Result<Option<String>, HandoverError> {
        let Some(encoded) = point.encode() else {
            return Ok(None);
        };
        let key = self.key(topic, partition);
        let payload = format!("{};{encoded}", point.offset);
        let record = FutureRecord::to(&self.kafka.handover_topic)
            .key(&key)
            .payload(&payload);
        let delivery = self.producer.send_result(record).map_err(|(e, _)| e)?;
        // The delivery report is completed by the producer's own polling thread, so blocking
        // this (rebalance callback) thread on it cannot deadlock.
        let (at_partition, at_offset) = match futures::executor::block_on(delivery) {
            Ok(Ok(d)) => (d.partition, d.offset),
            Ok(Err((e, _))) => return Err(e.into()),
            Err(_) => return Err(HandoverError::Canceled),
        };
        Ok(Some(format!("{POINTER_PREFIX}{at_partition};{at_offset}")))
    }

    /// True when commit metadata points at a handover record rather than carrying the point.
    pub fn is_pointer(metadata: &str) -> bool {
        metadata.starts_with(POINTER_PREFIX)
    }

    /// The resume point a commit of `topic`/`partition` at `offset` points at with `metadata`,
    /// when the record is there and belongs to that commit.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        metadata: &str,
    ) -> Option<ResumePoint> {
        let mut parts = metadata.strip_prefix(POINTER_PREFIX)?.split(';');
        let at_partition: i32 = parts.next()?.parse().ok()?;
        let at_offset: i64 = parts.next()?.parse().ok()?;
        let record = self
            .fetch(at_partition, at_offset)
            .map_err(|e| tracing::warn!(%topic, partition, error = %e, "cannot read the handover record"))
            .ok()??;
        if record.0 != self.key(topic, partition) {
            tracing::warn!(%topic, partition, at_offset, "handover record compacted away");
            return None;
        }
        let (committed, encoded) = record.1.split_once(';')?;
        if committed.parse::<i64>().ok()? != offset {
            tracing::warn!(%topic, partition, offset, "handover record is for another commit");
            return None;
        }
        ResumePoint::from_commit_metadata(offset, encoded)
    }

    /// The (key, payload) of the handover record at `at_partition`/`at_offset`, or of the next
    /// one when it was compacted away; `None` when there is none within the timeout.
    fn fetch(
        &self,
        at_partition: i32,
        at_offset: i64,
    ) -> Result<Option<(String, String)>, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = client_config(&self.kafka)
            .set(
                "group.id",
                format!("{}.handover-reader", self.kafka.group_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.kafka.handover_topic,
            at_partition,
            Offset::Offset(at_offset),
        )?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        while Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message?;
            if message.offset() < at_offset {
                continue;
            }
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            return Ok(Some((text(message.key()), text(message.payload()))));
        }
        Ok(None)
    }
}
