//! The last few messages of each event topic, read without joining a consumer group (nothing
//! is committed, nothing dead-lettered): `towerstream check-config --sample N` shows what the
//! decoder makes of them before anything is trained.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::client_config;

/// One message read back.
#[derive(Debug, Clone)]
pub struct SampledMessage {
    /// Index into `kafka.event_topics`.
    pub topic: u16,
    /// Its name.
    pub topic_name: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The payload (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
}

/// Up to `per_topic` of the newest messages of every event topic (spread over its
/// partitions), waiting at most `timeout` for the broker. Blocking: call it off the runtime.
pub fn newest_messages(
    k: &KafkaConfig,
    per_topic: usize,
    timeout: Duration,
) -> Result<Vec<SampledMessage>, KafkaError> {
    let consumer: BaseConsumer = client_config(k)
        .set("group.id", format!("{}.check-config", k.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    let mut wanted = 0usize;
    for name in &k.event_topics {
        let meta = consumer.fetch_metadata(Some(name), timeout)?;
        let partitions: Vec<i32> = meta
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let per_partition = per_topic.div_ceil(partitions.len().max(1)) as i64;
        for p in &partitions {
            let (low, high) = consumer.fetch_watermarks(name, *p, timeout)?;
            let from = (high - per_partition).max(low);
            wanted += (high - from) as usize;
            assignment.add_partition_offset(name, *p, Offset::Offset(from))?;
        }
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < wanted && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let Some(topic) = k.event_topics.iter().position(|t| t == msg.topic()) else {
            continue;
        };
        out.push(SampledMessage {
            topic: topic as u16,
            topic_name: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            payload: msg.payload().map(<[u8]>::to_vec),
        });
    }
    out.sort_by_key(|m| (m.topic, m.partition, m.offset));
    let mut per: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    out.retain(|m| {
        let n = per.entry(m.topic).or_default();
        *n += 1;
        *n <= per_topic
    });
    Ok(out)
}
