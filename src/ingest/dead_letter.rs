//! The dead-letter sink: malformed events go to a topic with their original bytes, their
//! source position and the reason, and are retried until the broker has them. Only then is
//! the source offset acknowledged, so a dead letter is never lost. A fixed number of writes is
//! in flight at a time ([`DeadLetterSink::is_full`] is the ingest loop's signal to pause), so a
//! broker that refuses dead letters stops ingestion instead of growing memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;

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
///
/// At most `max_pending` writes are in flight, each retried with backoff until the broker has
/// it. A letter beyond that waits in a queue for the next free writer, and [`DeadLetterSink::is_full`]
/// (Self::is_full) turns true, so the ingest loop pauses consumption: while the broker refuses
/// dead letters, ingestion stops instead of piling up letters (the queue only holds what
/// callers sent between two checks of `is_full`).
#[derive(Clone)]
pub struct DeadLetterSink {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` in a dry run: letters are logged and counted, not written.
    producer: Option<FutureProducer>,
    topic: Arc<str>,
    tracker: Arc<OffsetTracker>,
    metrics: IngestMetrics,
    max_pending: usize,
    state: Mutex<Pending>,
    room: Notify,
}

#[derive(Default)]
struct Pending {
    /// Writer tasks running (each owns one letter at a time).
    in_flight: usize,
    /// Letters waiting for a writer.
    queue: VecDeque<Letter>,
}

struct Letter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    source: Source,
    reason: &'static str,
    detail: String,
    origin: Option<Origin>,
}

impl DeadLetterSink {
    /// A sink writing to `topic` with at most `max_pending` writes in flight (at least one);
    /// acknowledgements go to `tracker`.
    pub fn new(
        producer: FutureProducer,
        topic: &str,
        max_pending: usize,
        tracker: Arc<OffsetTracker>,
        metrics: IngestMetrics,
    ) -> Self {
        Self::build(Some(producer), topic, max_pending, tracker, metrics)
    }

    /// A sink for a dry run: rejected messages are logged and counted, nothing is written, and
    /// their origins are acknowledged at once.
    pub fn dry_run(topic: &str, tracker: Arc<OffsetTracker>, metrics: IngestMetrics) -> Self {
        Self::build(None, topic, 1, tracker, metrics)
    }

    fn build(
        producer: Option<FutureProducer>,
        topic: &str,
        max_pending: usize,
        tracker: Arc<OffsetTracker>,
        metrics: IngestMetrics,
    ) -> Self {
        DeadLetterSink {
            inner: Arc::new(Inner {
                producer,
                topic: Arc::from(topic),
                tracker,
                metrics,
                max_pending: max_pending.max(1),
                state: Mutex::default(),
                room: Notify::new(),
            }),
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
    /// Never blocks and never drops the letter; see [`is_full`](Self::is_full).
    pub fn send(
        &self,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        source: Source,
        error: &EventError,
        origin: Option<Origin>,
    ) {
        let letter = Letter {
            key,
            payload,
            source,
            reason: error.reason.as_str(),
            detail: error.detail.clone(),
            origin,
        };
        let Some(producer) = self.inner.producer.clone() else {
            self.skip(letter);
            return;
        };
        let start = {
            let mut s = self.inner.lock();
            if s.in_flight < self.inner.max_pending {
                s.in_flight += 1;
                Some(letter)
            } else {
                s.queue.push_back(letter);
                None
            }
        };
        self.inner.update_gauge();
        if let Some(letter) = start {
            tokio::spawn(self.inner.clone().write_all(producer, letter));
        }
    }

    /// True while `max_pending` writes are in flight: callers should stop producing letters
    /// (pause consumption) until [`room`](Self::room) resolves.
    pub fn is_full(&self) -> bool {
        self.inner.lock().in_flight >= self.inner.max_pending
    }

    /// Resolves once fewer than `max_pending` writes are in flight.
    pub async fn room(&self) {
        loop {
            let notified = self.inner.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_full() {
                return;
            }
            notified.await;
        }
    }

    /// Writes in flight.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Letters waiting for a free writer.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    fn skip(&self, letter: Letter) {
        tracing::warn!(
            reason = letter.reason,
            detail = %letter.detail,
            topic = %letter.source.topic,
            partition = letter.source.partition,
            offset = letter.source.offset,
            "dry run: not writing a dead letter"
        );
        self.inner.metrics.dead_letter_dry_run.inc();
        if let Some(o) = letter.origin {
            self.inner.tracker.ack(&[o]);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauge(&self) {
        let s = self.lock();
        self.metrics
            .dead_letters_pending
            .set((s.in_flight + s.queue.len()) as i64);
    }

    /// One writer: writes `letter`, then queued letters, until the queue is empty.
    async fn write_all(self: Arc<Self>, producer: FutureProducer, mut letter: Letter) {
        loop {
            self.write(&producer, &letter).await;
            self.metrics.dead_lettered.inc();
            if let Some(o) = letter.origin {
                self.tracker.ack(&[o]);
            }
            // Taking the next letter and leaving are decided under the lock `send` takes,
            // so a letter queued meanwhile always finds a writer.
            let next = {
                let mut s = self.lock();
                let next = s.queue.pop_front();
                if next.is_none() {
                    s.in_flight -= 1;
                }
                next
            };
            self.update_gauge();
            match next {
                Some(l) => letter = l,
                None => break,
            }
        }
        self.room.notify_waiters();
    }

    /// Retries with backoff until the broker has the letter.
    async fn write(&self, producer: &FutureProducer, letter: &Letter) {
        let partition = letter.source.partition.to_string();
        let offset = letter.source.offset.to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: headers::REASON,
                    value: Some(letter.reason),
                })
                .insert(Header {
                    key: headers::DETAIL,
                    value: Some(letter.detail.as_str()),
                })
                .insert(Header {
                    key: headers::TOPIC,
                    value: Some(letter.source.topic.as_str()),
                })
                .insert(Header {
                    key: headers::PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: headers::OFFSET,
                    value: Some(offset.as_str()),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
                .payload(&letter.payload)
                .headers(headers);
            if let Some(k) = &letter.key {
                record = record.key(k);
            }
            match producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    self.metrics.dead_letter_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "dead-letter write failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KafkaConfig;
    use crate::event::InvalidReason;
    use crate::metrics::Metrics;
    use futures::FutureExt as _;

    /// A real producer whose every write fails: its records exceed its `message.max.bytes`.
    fn refusing_producer() -> FutureProducer {
        crate::kafka::client_config(&KafkaConfig::default())
            .set("message.max.bytes", "1000")
            .create()
            .expect("producer")
    }

    #[tokio::test]
    async fn at_most_max_pending_writes_are_in_flight_and_the_sink_reports_full() {
        let metrics = Metrics::new();
        let tracker = Arc::new(OffsetTracker::new());
        let epoch = tracker.assign((0, 0));
        let sink = DeadLetterSink::new(
            refusing_producer(),
            "dlq",
            3,
            tracker.clone(),
            metrics.ingest.clone(),
        );
        let error = EventError {
            reason: InvalidReason::BadJson,
            detail: "test".into(),
        };
        for offset in 0..5 {
            let origin = Origin {
                topic: 0,
                partition: 0,
                offset,
                epoch,
            };
            tracker.open(origin, 1);
            assert_eq!(sink.is_full(), offset >= 3, "offset {offset}");
            let source = Source {
                topic: "events".into(),
                partition: 0,
                offset,
            };
            sink.send(None, vec![b'x'; 2000], source, &error, Some(origin));
        }
        // Let the writers fail and retry a few times.
        for _ in 0..500 {
            if metrics.ingest.dead_letter_errors.get() >= 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            metrics.ingest.dead_letter_errors.get() >= 6,
            "writes are retried"
        );
        assert_eq!((sink.in_flight(), sink.queued()), (3, 2));
        assert!(sink.is_full());
        assert!(sink.room().now_or_never().is_none(), "no room while full");
        assert_eq!(metrics.ingest.dead_letters_pending.get(), 5);
        assert_eq!(metrics.ingest.dead_lettered.get(), 0);
        assert_eq!(
            tracker.outstanding(),
            5,
            "nothing acknowledged before it is written"
        );
    }

    #[tokio::test]
    async fn a_dry_run_writes_nothing_and_acknowledges_at_once() {
        let metrics = Metrics::new();
        let tracker = Arc::new(OffsetTracker::new());
        let epoch = tracker.assign((0, 0));
        let sink = DeadLetterSink::dry_run("dlq", tracker.clone(), metrics.ingest.clone());
        let origin = Origin {
            topic: 0,
            partition: 0,
            offset: 0,
            epoch,
        };
        tracker.open(origin, 1);
        let error = EventError {
            reason: InvalidReason::BadJson,
            detail: "test".into(),
        };
        let source = Source {
            topic: "events".into(),
            partition: 0,
            offset: 0,
        };
        sink.send(None, b"{".to_vec(), source, &error, Some(origin));
        assert_eq!(tracker.outstanding(), 0);
        assert_eq!(metrics.ingest.dead_letter_dry_run.get(), 1);
        assert_eq!((sink.in_flight(), sink.is_full()), (0, false));
    }
}
