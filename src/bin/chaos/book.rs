//! The harness's own book of everything it produced: each record's position (from the
//! delivery report) and what it was, and per click event id every position it was sent to.
//!
//! The book is the ground truth the trainers' ledgers and the dead-letter topic are checked
//! against ([`crate::audit`]). It lives behind a mutex because librdkafka's delivery callback
//! thread writes it while scenarios read it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which topic a position is on: an event topic by its index in `kafka.event_topics` (the
/// index the trainer's ledger uses), or one of the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Topic {
    /// `kafka.event_topics[i]`.
    Event(u16),
    /// `kafka.item_topic`.
    Items,
    /// `kafka.user_topic`.
    Users,
}

/// A record's position.
pub type Pos = (Topic, i32, i64);

/// What a produced record was.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A click the model must learn from, by event id.
    Click { event_id: String },
    /// An impression; `clicked` is the truth (a click on it was produced too).
    Impression { clicked: bool },
    /// A catalogue or profile record (valid or not), labelled for the report.
    Table { label: &'static str },
    /// A malformed event-topic record: it must come back from the dead-letter topic.
    Malformed { label: &'static str },
}

/// A record waiting for its delivery report.
#[derive(Debug, Clone)]
pub struct Sent {
    /// What it is.
    pub kind: Kind,
    /// Where it went.
    pub topic: Topic,
    /// A deliberate re-send of an earlier event id.
    pub duplicate: bool,
    /// Special label of a valid record whose fate the report lists apart (e.g. `future_time`).
    pub tag: Option<&'static str>,
}

#[derive(Debug, Default)]
struct Inner {
    at: HashMap<Pos, Sent>,
    clicks: HashMap<String, Vec<Pos>>,
    counts: Produced,
    failed: u64,
    in_flight: u64,
}

/// Counts of what was delivered, by kind.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Produced {
    /// Distinct click event ids.
    pub clicks: u64,
    /// Deliberate re-sends of a click's event id.
    pub duplicates: u64,
    /// Impressions.
    pub impressions: u64,
    /// Table records, malformed records and anything else.
    pub other: u64,
}

/// The shared book.
#[derive(Debug, Default, Clone)]
pub struct Book(Arc<Mutex<Inner>>);

impl Book {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record was handed to the producer.
    pub fn sending(&self) {
        self.lock().in_flight += 1;
    }

    /// The broker has `sent` at `partition`/`offset`.
    pub fn delivered(&self, sent: Sent, partition: i32, offset: i64) {
        let mut b = self.lock();
        b.in_flight -= 1;
        let pos = (sent.topic, partition, offset);
        match &sent.kind {
            Kind::Click { event_id } => {
                let positions = b.clicks.entry(event_id.clone()).or_default();
                positions.push(pos);
                if positions.len() == 1 {
                    b.counts.clicks += 1;
                } else {
                    b.counts.duplicates += 1;
                }
            }
            Kind::Impression { .. } => b.counts.impressions += 1,
            Kind::Table { .. } | Kind::Malformed { .. } => b.counts.other += 1,
        }
        b.at.insert(pos, sent);
    }

    /// The producer gave up on a record (it never reached the broker).
    pub fn failed(&self) {
        let mut b = self.lock();
        b.in_flight -= 1;
        b.failed += 1;
    }

    /// Records handed over but not yet reported.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }

    /// Records the producer gave up on.
    pub fn failures(&self) -> u64 {
        self.lock().failed
    }

    /// What was delivered so far.
    pub fn produced(&self) -> Produced {
        self.lock().counts.clone()
    }

    /// Every click event id with its positions.
    pub fn clicks(&self) -> Vec<(String, Vec<Pos>)> {
        self.lock()
            .clicks
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Click event ids for which `accounted(positions)` is false.
    pub fn count_clicks(&self, accounted: impl Fn(&[Pos]) -> bool) -> u64 {
        self.lock()
            .clicks
            .values()
            .filter(|p| !accounted(p))
            .count() as u64
    }

    /// Every delivered record with its position.
    pub fn records(&self) -> Vec<(Pos, Sent)> {
        self.lock()
            .at
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
}
