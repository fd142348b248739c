//! Producing with an exact record of where every record landed.
//!
//! A `ThreadedProducer` whose delivery callback writes each record's partition and offset into
//! the [`Book`]. The producer is idempotent (a retry after a broker restart cannot write a
//! record twice, which would be a click the book does not know) and waits up to five minutes
//! for the broker, so a broker outage only delays delivery.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;

use crate::book::{Book, Sent};

/// One record to produce.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Topic name.
    pub topic: String,
    /// Key (user or item id); tombstones need one.
    pub key: Option<String>,
    /// Payload; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Explicit partition (else the key's hash decides).
    pub partition: Option<i32>,
    /// What the book should remember about it.
    pub sent: Sent,
}

/// Delivery callbacks into the book.
pub struct Recorder {
    book: Book,
}

impl ClientContext for Recorder {}

impl ProducerContext for Recorder {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sent>) {
        match result {
            Ok(msg) => self.book.delivered(*sent, msg.partition(), msg.offset()),
            Err((e, _)) => {
                eprintln!("[chaos] a record was not delivered: {e}");
                self.book.failed();
            }
        }
    }
}

/// The harness's producer.
pub struct Producer {
    inner: ThreadedProducer<Recorder>,
    book: Book,
}

impl Producer {
    /// A producer to `brokers` recording into `book`.
    pub fn new(brokers: &str, book: Book) -> Result<Producer, KafkaError> {
        let inner = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .set("queue.buffering.max.messages", "1000000")
            .create_with_context(Recorder { book: book.clone() })?;
        Ok(Producer { inner, book })
    }

    /// Hands `rec` to librdkafka, waiting while its queue is full.
    pub fn send(&self, rec: Rec) {
        self.book.sending();
        let mut record = BaseRecord::with_opaque_to(&rec.topic, Box::new(rec.sent));
        if let Some(k) = &rec.key {
            record = record.key(k.as_str());
        }
        if let Some(p) = &rec.payload {
            record = record.payload(p.as_slice());
        }
        if let Some(p) = rec.partition {
            record = record.partition(p);
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    eprintln!("[chaos] produce failed at once: {e}");
                    self.book.failed();
                    return;
                }
            }
        }
    }

    /// Sends every record.
    pub fn send_all(&self, recs: impl IntoIterator<Item = Rec>) {
        for r in recs {
            self.send(r);
        }
    }

    /// Waits until every record handed over has a delivery report (or `timeout` passes).
    pub async fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.book.in_flight() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            let _ = self.inner.flush(Duration::from_millis(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// Sends `batches` at `rate` records per second, one batch (a request: a slate and its
/// click, say) at a time, pacing in 10 ms slices so a high rate stays smooth.
pub async fn paced(producer: &Producer, batches: impl IntoIterator<Item = Vec<Rec>>, rate: f64) {
    let started = Instant::now();
    let mut sent = 0u64;
    for batch in batches {
        sent += batch.len() as u64;
        producer.send_all(batch);
        let due = Duration::from_secs_f64(sent as f64 / rate.max(1e-6));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            if wait >= Duration::from_millis(10) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
