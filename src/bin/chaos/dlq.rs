//! Following the dead-letter topic: which source positions came back, and why.
//!
//! A background task reads the topic from the beginning and files each record under the
//! source position its headers name (`towerstream.source.*`), with its reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use towerstream::ingest::dead_letter::headers;

use crate::book::{Pos, Topic};
use crate::traffic::Topics;

/// One dead letter as read back.
#[derive(Debug, Clone)]
pub struct Letter {
    /// `towerstream.reason`.
    pub reason: String,
    /// `towerstream.detail`.
    pub detail: String,
}

#[derive(Default)]
struct State {
    by_pos: HashMap<Pos, Letter>,
    /// Records read (dead letters for the same position more than once count each time).
    read: u64,
    /// Dead letters whose headers name no known position.
    unplaced: u64,
    next_offset: i64,
}

/// The follower; cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    state: Arc<Mutex<State>>,
    consumer: Arc<StreamConsumer>,
    topic: String,
}

impl DeadLetters {
    /// Starts following `topic` (the scenario's `kafka.dead_letter_topic`).
    pub fn follow(brokers: &str, topic: &str, topics: Topics) -> anyhow::Result<DeadLetters> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("chaos-dlq-reader-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let this = DeadLetters {
            state: Arc::default(),
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
        };
        let task = this.clone();
        tokio::spawn(async move { task.run(topics).await });
        Ok(this)
    }

    async fn run(self, topics: Topics) {
        loop {
            let msg = match self.consumer.recv().await {
                Ok(m) => m,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut h: HashMap<&str, String> = HashMap::new();
            if let Some(hs) = msg.headers() {
                for hdr in hs.iter() {
                    h.insert(
                        hdr.key,
                        String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            let topic = h.get(headers::TOPIC).and_then(|t| {
                if *t == topics.events {
                    Some(Topic::Event(0))
                } else if *t == topics.items {
                    Some(Topic::Items)
                } else if *t == topics.users {
                    Some(Topic::Users)
                } else {
                    None
                }
            });
            let partition = h.get(headers::PARTITION).and_then(|p| p.parse().ok());
            let offset = h.get(headers::OFFSET).and_then(|o| o.parse().ok());
            let letter = Letter {
                reason: h.get(headers::REASON).cloned().unwrap_or_default(),
                detail: h.get(headers::DETAIL).cloned().unwrap_or_default(),
            };
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.read += 1;
            s.next_offset = msg.offset() + 1;
            match (topic, partition, offset) {
                (Some(t), Some(p), Some(o)) => {
                    s.by_pos.insert((t, p, o), letter);
                }
                _ => s.unplaced += 1,
            }
        }
    }

    /// Dead letters by source position, so far.
    pub fn snapshot(&self) -> HashMap<Pos, Letter> {
        self.lock().by_pos.clone()
    }

    /// Records read and those naming no known position.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.read, s.unplaced)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until everything in the topic now has been read (or `timeout` passes).
    pub async fn catch_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let high = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_watermarks(&topic, 0, Duration::from_secs(10))
                .map(|(_, h)| h)
        })
        .await
        .ok()
        .and_then(Result::ok);
        let Some(high) = high else { return false };
        while self.lock().next_offset < high {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}
