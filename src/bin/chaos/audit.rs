//! Accounting: the book (what was produced) against the trainers' ledgers (what the models
//! hold) and the dead-letter topic (what came back).
//!
//! Per click event id, over all positions it was sent to (a deliberate duplicate has two):
//! trained once, trained more than once, dead-lettered, or lost (neither). Duplicates whose
//! event id was trained exactly once were dropped as duplicates. Malformed records must come
//! back as dead letters. Impressions are checked against the truth: a clicked impression
//! trained as a shown-not-clicked negative is a false negative.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::book::{Book, Kind, Pos, Topic};
use crate::dlq::Letter;
use crate::trained::Counts;

/// The outcome of one accounting.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    /// Click event ids trained exactly once.
    pub trained_once: u64,
    /// Click event ids trained more than once.
    pub trained_more: u64,
    /// The most times one click was trained.
    pub max_times: u32,
    /// Click event ids dead-lettered, by reason.
    pub clicks_dead_lettered: BTreeMap<String, u64>,
    /// Click event ids neither trained nor dead-lettered.
    pub clicks_lost: u64,
    /// Deliberate duplicates whose event id was trained exactly once.
    pub dropped_duplicates: u64,
    /// Other records (malformed events, table records) dead-lettered, by reason.
    pub other_dead_lettered: BTreeMap<String, u64>,
    /// Malformed records neither dead-lettered nor trained.
    pub malformed_lost: u64,
    /// Malformed event-topic records that were trained (accepted as valid).
    pub malformed_trained: u64,
    /// Impressions trained as negatives that were in fact clicked.
    pub false_negatives: u64,
    /// Unclicked impressions trained as negatives.
    pub true_negatives: u64,
    /// Impressions trained as negatives more than once.
    pub negatives_twice: u64,
    /// Per tag (special clicks such as far-future timestamps): outcome → count.
    pub tagged: BTreeMap<String, BTreeMap<String, u64>>,
    /// A few lost click ids, for the log.
    pub lost_examples: Vec<String>,
    /// One dead letter's detail per reason.
    pub reason_details: BTreeMap<String, String>,
}

impl Tally {
    fn note_reason(&mut self, l: &Letter) {
        self.reason_details
            .entry(l.reason.clone())
            .or_insert_with(|| l.detail.chars().take(160).collect());
    }

    /// Clicks and malformed records lost.
    pub fn lost(&self) -> u64 {
        self.clicks_lost + self.malformed_lost
    }

    /// Everything dead-lettered, by reason.
    pub fn dead_lettered(&self) -> BTreeMap<String, u64> {
        let mut all = self.clicks_dead_lettered.clone();
        for (r, n) in &self.other_dead_lettered {
            *all.entry(r.clone()).or_insert(0) += n;
        }
        all
    }
}

fn source(pos: Pos, positive: u8) -> Option<(u16, i32, i64, u8)> {
    match pos.0 {
        Topic::Event(t) => Some((t, pos.1, pos.2, positive)),
        Topic::Items | Topic::Users => None,
    }
}

fn times(counts: &Counts, pos: Pos, positive: u8) -> u32 {
    source(pos, positive)
        .and_then(|s| counts.get(&s).copied())
        .unwrap_or(0)
}

/// Clicks delivered but neither trained nor dead-lettered yet: the trainer's true backlog.
pub fn backlog(book: &Book, counts: &Counts, dlq: &HashMap<Pos, Letter>) -> u64 {
    book.count_clicks(|positions| {
        positions
            .iter()
            .any(|p| times(counts, *p, 1) > 0 || dlq.contains_key(p))
    })
}

/// Every click accounted (trained at least once or dead-lettered) and every malformed record
/// back from the dead-letter topic (or trained).
pub fn all_accounted(book: &Book, counts: &Counts, dlq: &HashMap<Pos, Letter>) -> bool {
    let clicks_done = book.clicks().iter().all(|(_, positions)| {
        positions
            .iter()
            .any(|p| times(counts, *p, 1) > 0 || dlq.contains_key(p))
    });
    clicks_done
        && book.records().iter().all(|(pos, sent)| match sent.kind {
            Kind::Malformed { .. } => dlq.contains_key(pos) || times(counts, *pos, 1) > 0,
            _ => true,
        })
}

/// The full accounting.
pub fn tally(book: &Book, counts: &Counts, dlq: &HashMap<Pos, Letter>) -> Tally {
    let mut t = Tally::default();
    let records: HashMap<Pos, crate::book::Sent> = book.records().into_iter().collect();
    for (event_id, positions) in book.clicks() {
        let total: u32 = positions.iter().map(|p| times(counts, *p, 1)).sum();
        let letter = positions.iter().find_map(|p| dlq.get(p));
        let outcome = match (total, letter) {
            (1, _) => {
                t.trained_once += 1;
                t.dropped_duplicates += positions.len() as u64 - 1;
                "trained once".to_owned()
            }
            (n, _) if n > 1 => {
                t.trained_more += 1;
                t.max_times = t.max_times.max(n);
                "trained more than once".to_owned()
            }
            (_, Some(l)) => {
                t.note_reason(l);
                *t.clicks_dead_lettered.entry(l.reason.clone()).or_insert(0) += 1;
                format!("dead-lettered: {}", l.reason)
            }
            _ => {
                t.clicks_lost += 1;
                if t.lost_examples.len() < 5 {
                    t.lost_examples.push(event_id.clone());
                }
                "lost".to_owned()
            }
        };
        let tag = positions
            .iter()
            .find_map(|p| records.get(p).and_then(|s| s.tag));
        if let Some(tag) = tag {
            *t.tagged
                .entry(tag.to_owned())
                .or_default()
                .entry(outcome)
                .or_insert(0) += 1;
        }
    }
    for (pos, sent) in &records {
        match &sent.kind {
            Kind::Click { .. } => {}
            Kind::Impression { clicked } => {
                let n = times(counts, *pos, 0);
                if n > 0 && *clicked {
                    t.false_negatives += 1;
                } else if n > 0 {
                    t.true_negatives += 1;
                }
                if n > 1 {
                    t.negatives_twice += 1;
                }
            }
            Kind::Malformed { label } => {
                let outcome = if let Some(l) = dlq.get(pos) {
                    t.note_reason(l);
                    *t.other_dead_lettered.entry(l.reason.clone()).or_insert(0) += 1;
                    format!("dead-lettered: {}", l.reason)
                } else if times(counts, *pos, 1) > 0 {
                    t.malformed_trained += 1;
                    "trained".to_owned()
                } else {
                    t.malformed_lost += 1;
                    "lost".to_owned()
                };
                *t.tagged
                    .entry(format!("malformed:{label}"))
                    .or_default()
                    .entry(outcome)
                    .or_insert(0) += 1;
            }
            Kind::Table { label } => {
                let outcome = match dlq.get(pos) {
                    Some(l) => {
                        t.note_reason(l);
                        *t.other_dead_lettered.entry(l.reason.clone()).or_insert(0) += 1;
                        format!("dead-lettered: {}", l.reason)
                    }
                    None => "applied or ignored".to_owned(),
                };
                if *label != "item" && *label != "user" {
                    *t.tagged
                        .entry(format!("table:{label}"))
                        .or_default()
                        .entry(outcome)
                        .or_insert(0) += 1;
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::{Sent, Topic};

    fn click(book: &Book, id: &str, offset: i64, duplicate: bool) {
        book.sending();
        book.delivered(
            Sent {
                kind: Kind::Click {
                    event_id: id.into(),
                },
                topic: Topic::Event(0),
                duplicate,
                tag: None,
            },
            0,
            offset,
        );
    }

    #[test]
    fn every_click_lands_in_exactly_one_column() {
        let book = Book::default();
        click(&book, "once", 0, false);
        click(&book, "dup", 1, false);
        click(&book, "dup", 2, true);
        click(&book, "twice", 3, false);
        click(&book, "dead", 4, false);
        click(&book, "lost", 5, false);
        let counts: Counts = [((0, 0, 0, 1), 1), ((0, 0, 2, 1), 1), ((0, 0, 3, 1), 2)]
            .into_iter()
            .collect();
        let dlq = HashMap::from([(
            (Topic::Event(0), 0, 4),
            Letter {
                reason: "bad_json".into(),
                detail: String::new(),
            },
        )]);
        let t = tally(&book, &counts, &dlq);
        assert_eq!((t.trained_once, t.trained_more, t.clicks_lost), (2, 1, 1));
        assert_eq!(t.dropped_duplicates, 1);
        assert_eq!(t.clicks_dead_lettered["bad_json"], 1);
        assert_eq!(backlog(&book, &counts, &dlq), 1);
        assert!(!all_accounted(&book, &counts, &dlq));
    }
}
