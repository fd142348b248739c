//! The dead-letter sink: malformed events go to a topic with their original bytes, their
//! source position and the reason, and are retried until the broker has them. Only then is
//! the source offset acknowledged, so a dead letter is never lost.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::offsets::OffsetTracker;
use crate::event::EventError;
use crate::example::Origin;
use crate::metrics::IngestMetrics;

/// Header names on dead-letter records.
pub mod headers {
    /// Reason class (`bad_json`, `missing_field`, ...).
    pub const REASON: &str = "towerstream.reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "towerstream.detail";
    /// Source topic.
    pub const TOPIC: &str = "towerstream.source.topic";
    /// Source partition (decimal).
    pub const PARTITION: &str = "towerstream.source.partition";
    /// Source offset (decimal).
    pub const OFFSET: &str = "towerstream.source.offset";
}

/// Where a rejected message came from.
#[derive(Debug, Clone)]
pub struct Source {
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Writes dead letters; cheap to clone.
#[derive(Clone)]
pub struct DeadLetterSink {
    producer: FutureProducer,
    topic: Arc<str>,
    tracker: Arc<OffsetTracker>,
    metrics: IngestMetrics,
}

impl DeadLetterSink {
    /// A sink writing to `topic`; acknowledgements go to `tracker`.
    pub fn new(
        producer: FutureProducer,
        topic: &str,
        tracker: Arc<OffsetTracker>,
        metrics: IngestMetrics,
    ) -> Self {
        DeadLetterSink {
            producer,
            topic: Arc::from(topic),
            tracker,
            metrics,
        }
    }

    /// Dead-letters a consumed message as it is (key, payload, position).
    pub fn reject(&self, msg: &impl rdkafka::Message, error: &EventError, origin: Option<Origin>) {
        self.send(
            msg.key().map(<[u8]>::to_vec),
            msg.payload().unwrap_or_default().to_vec(),
            Source {
                topic: msg.topic().to_owned(),
                partition: msg.partition(),
                offset: msg.offset(),
            },
            error,
            origin,
        );
    }

    /// Sends one dead letter in the background, retrying with backoff until it is written,
    /// then acknowledges `origin` (event topics; `None` for table topics, which are re-read).
    pub fn send(
        &self,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        source: Source,
        error: &EventError,
        origin: Option<Origin>,
    ) {
        let this = self.clone();
        let reason = error.reason.as_str();
        let detail = error.detail.clone();
        tokio::spawn(async move {
            let partition = source.partition.to_string();
            let offset = source.offset.to_string();
            let mut backoff = Duration::from_millis(100);
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: headers::REASON,
                        value: Some(reason),
                    })
                    .insert(Header {
                        key: headers::DETAIL,
                        value: Some(detail.as_str()),
                    })
                    .insert(Header {
                        key: headers::TOPIC,
                        value: Some(source.topic.as_str()),
                    })
                    .insert(Header {
                        key: headers::PARTITION,
                        value: Some(partition.as_str()),
                    })
                    .insert(Header {
                        key: headers::OFFSET,
                        value: Some(offset.as_str()),
                    });
                let mut record = FutureRecord::<[u8], [u8]>::to(&this.topic)
                    .payload(&payload)
                    .headers(headers);
                if let Some(k) = &key {
                    record = record.key(k);
                }
                match this.producer.send(record, Duration::from_secs(10)).await {
                    Ok(_) => break,
                    Err((e, _)) => {
                        this.metrics.dead_letter_errors.inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "dead-letter write failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            this.metrics.dead_lettered.inc();
            if let Some(o) = origin {
                this.tracker.ack(&[o]);
            }
        });
    }
}
