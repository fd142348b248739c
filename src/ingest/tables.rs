//! The table reader: follows the compacted `item` and `user` topics from the beginning, like a
//! Kafka Streams global table, so every instance holds the whole catalogue and all profiles.
//!
//! [`TableReader::bootstrap`] reads up to the high watermarks before the event consumer starts,
//! so the first clicks already see the catalogue that was published before them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::client_config;

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
                    let (_, high) =
                        consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))?;
                    if high > 0 {
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
    /// message with `apply`; fails after `timeout`.
    pub async fn bootstrap(
        &mut self,
        timeout: Duration,
        mut apply: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        while self.bootstrapping() {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, self.consumer.recv()).await {
                Ok(m) => m?,
                Err(_) => {
                    return Err(KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    ))
                }
            };
            apply(&msg);
            let key = (msg.topic().to_owned(), msg.partition());
            if self
                .targets
                .get(&key)
                .is_some_and(|high| msg.offset() + 1 >= *high)
            {
                self.targets.remove(&key);
            }
        }
        Ok(())
    }
}
