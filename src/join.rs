//! The click-to-impression join and event deduplication, in event time, with bounded memory.
//!
//! * An impression waits in the window until the watermark (the largest event time seen,
//!   minus `window_ms`) passes it, or until `max_impressions` pushes the oldest out. It then
//!   leaves: clicked ones are simply released; unclicked ones become a
//!   [`Label::ShownNotClicked`] negative when enabled.
//! * A click whose `impression_id` is in the window is a joined positive; otherwise it is
//!   still a positive, flagged unjoined. A click that arrives before its impression (possible
//!   across topics) is remembered, so the late impression is not mistaken for a negative.
//! * An event id seen within the window is a duplicate and is dropped.
//!
//! The joiner holds each waiting impression's [`Origin`]: its offset is not acknowledged
//! until the impression leaves, so a restart from the committed offsets rebuilds the window.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::catalog::Catalog;
use crate::config::JoinConfig;
use crate::event::{Click, Impression};
use crate::example::{Label, Origin, TrainingExample};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The event id was seen within the window; nothing else happened.
    Duplicate,
    /// An impression entered the window; its origin is held until it leaves.
    Held,
    /// A click was emitted as an example (joined or not).
    Emitted {
        /// Whether the click found its impression.
        joined: bool,
    },
}

/// Side effects of one call, to be carried out by the caller: examples to send, origins whose
/// hold ended without an example (acknowledge them), and join counters.
#[derive(Debug, Default)]
pub struct JoinOutput {
    /// Examples to hand to the trainer, in order.
    pub examples: Vec<TrainingExample>,
    /// Origins of impressions that left the window without producing an example.
    pub released: Vec<Origin>,
    /// Impressions that left the window unclicked (counted even when no negative is emitted).
    pub expired_unclicked: u64,
}

impl JoinOutput {
    /// Empties the buffers for reuse.
    pub fn clear(&mut self) {
        self.examples.clear();
        self.released.clear();
        self.expired_unclicked = 0;
    }
}

struct Waiting {
    impression: Impression,
    origin: Origin,
    clicked: bool,
}

/// Join and deduplication state. Single-threaded: owned by the ingest loop.
pub struct Joiner {
    config: JoinConfig,
    emit_negatives: bool,
    waiting: HashMap<String, Waiting>,
    /// Impression ids in arrival order, with their event time.
    waiting_order: VecDeque<(i64, String)>,
    seen: HashSet<String>,
    seen_order: VecDeque<(i64, String)>,
    /// Impression ids clicked before the impression itself arrived.
    early_clicks: HashSet<String>,
    early_order: VecDeque<(i64, String)>,
    max_event_time_ms: i64,
}

impl Joiner {
    /// An empty window.
    pub fn new(config: JoinConfig, emit_negatives: bool) -> Self {
        Joiner {
            config,
            emit_negatives,
            waiting: HashMap::new(),
            waiting_order: VecDeque::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            early_clicks: HashSet::new(),
            early_order: VecDeque::new(),
            max_event_time_ms: i64::MIN,
        }
    }

    /// Impressions waiting in the window.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Event ids remembered for deduplication.
    pub fn remembered_ids(&self) -> usize {
        self.seen.len()
    }

    /// The current watermark: events older than this have left the window.
    pub fn watermark_ms(&self) -> i64 {
        self.max_event_time_ms.saturating_sub(self.config.window_ms)
    }

    /// Takes in an impression.
    pub fn on_impression(
        &mut self,
        imp: Impression,
        origin: Origin,
        catalog: &Catalog,
        out: &mut JoinOutput,
    ) -> Disposition {
        self.advance(imp.event_time_ms, catalog, out);
        if !self.remember(&imp.event_id, imp.event_time_ms)
            || self.waiting.contains_key(&imp.impression_id)
        {
            return Disposition::Duplicate;
        }
        let clicked = self.early_clicks.remove(&imp.impression_id);
        self.waiting_order
            .push_back((imp.event_time_ms, imp.impression_id.clone()));
        self.waiting.insert(
            imp.impression_id.clone(),
            Waiting {
                impression: imp,
                origin,
                clicked,
            },
        );
        while self.waiting.len() > self.config.max_impressions {
            self.expire_front(catalog, out);
        }
        Disposition::Held
    }

    /// Takes in a click, emitting a positive example unless it is a duplicate.
    pub fn on_click(
        &mut self,
        click: Click,
        origin: Origin,
        catalog: &Catalog,
        out: &mut JoinOutput,
    ) -> Disposition {
        self.advance(click.event_time_ms, catalog, out);
        if !self.remember(&click.event_id, click.event_time_ms) {
            return Disposition::Duplicate;
        }
        let mut position = None;
        if let Some(imp_id) = &click.impression_id {
            match self.waiting.get_mut(imp_id) {
                Some(w)
                    if w.impression.user_id == click.user_id
                        && w.impression.item_id == click.item_id =>
                {
                    w.clicked = true;
                    position = Some(w.impression.position);
                }
                Some(_) => {} // same impression id, different user/item: not this click's
                None => {
                    if self.early_clicks.insert(imp_id.clone()) {
                        self.early_order
                            .push_back((click.event_time_ms, imp_id.clone()));
                        if self.early_order.len() > self.config.max_impressions {
                            if let Some((_, old)) = self.early_order.pop_front() {
                                self.early_clicks.remove(&old);
                            }
                        }
                    }
                }
            }
        }
        let joined = position.is_some();
        out.examples.push(TrainingExample {
            label: Label::Click { joined },
            user: catalog.user(&click.user_id),
            item: catalog.item(&click.item_id),
            user_id: click.user_id,
            item_id: click.item_id,
            event_time_ms: click.event_time_ms,
            dwell_ms: click.dwell_ms,
            position,
            origin,
        });
        Disposition::Emitted { joined }
    }

    /// Records an event id; false if it was already seen inside the window.
    fn remember(&mut self, event_id: &str, time_ms: i64) -> bool {
        if self.seen.contains(event_id) {
            return false;
        }
        self.seen.insert(event_id.to_owned());
        self.seen_order.push_back((time_ms, event_id.to_owned()));
        if self.seen_order.len() > self.config.dedup_capacity {
            if let Some((_, old)) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Moves the watermark to `time_ms` and lets everything older than the window leave.
    fn advance(&mut self, time_ms: i64, catalog: &Catalog, out: &mut JoinOutput) {
        if time_ms <= self.max_event_time_ms {
            return;
        }
        self.max_event_time_ms = time_ms;
        let watermark = self.watermark_ms();
        while self
            .waiting_order
            .front()
            .is_some_and(|(t, _)| *t < watermark)
        {
            self.expire_front(catalog, out);
        }
        while let Some((t, _)) = self.seen_order.front() {
            if *t >= watermark {
                break;
            }
            if let Some((_, id)) = self.seen_order.pop_front() {
                self.seen.remove(&id);
            }
        }
        while let Some((t, _)) = self.early_order.front() {
            if *t >= watermark {
                break;
            }
            if let Some((_, id)) = self.early_order.pop_front() {
                self.early_clicks.remove(&id);
            }
        }
    }

    fn expire_front(&mut self, catalog: &Catalog, out: &mut JoinOutput) {
        let Some((_, imp_id)) = self.waiting_order.pop_front() else {
            return;
        };
        let Some(w) = self.waiting.remove(&imp_id) else {
            return;
        };
        if w.clicked {
            out.released.push(w.origin);
            return;
        }
        out.expired_unclicked += 1;
        if !self.emit_negatives {
            out.released.push(w.origin);
            return;
        }
        let imp = w.impression;
        out.examples.push(TrainingExample {
            label: Label::ShownNotClicked,
            user: catalog.user(&imp.user_id),
            item: catalog.item(&imp.item_id),
            user_id: imp.user_id,
            item_id: imp.item_id,
            event_time_ms: imp.event_time_ms,
            dwell_ms: None,
            position: Some(imp.position),
            origin: w.origin,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Id;

    fn origin(offset: i64) -> Origin {
        Origin {
            topic: 0,
            partition: 0,
            offset,
            epoch: 1,
        }
    }

    fn imp(id: &str, t: i64, item: &str) -> Impression {
        Impression {
            event_id: format!("ev-{id}"),
            event_time_ms: t,
            user_id: Id::new("u"),
            item_id: Id::new(item),
            impression_id: id.into(),
            request_id: "r".into(),
            position: 2,
            surface: None,
        }
    }

    fn click(ev: &str, t: i64, item: &str, imp: Option<&str>) -> Click {
        Click {
            event_id: ev.into(),
            event_time_ms: t,
            user_id: Id::new("u"),
            item_id: Id::new(item),
            impression_id: imp.map(Into::into),
            dwell_ms: Some(10),
        }
    }

    fn joiner(window_ms: i64, max: usize) -> Joiner {
        Joiner::new(
            JoinConfig {
                window_ms,
                max_impressions: max,
                dedup_capacity: 100,
            },
            true,
        )
    }

    #[test]
    fn click_joins_its_impression_and_clicked_impressions_are_released() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        assert_eq!(
            j.on_impression(imp("i1", 0, "a"), origin(0), &c, &mut out),
            Disposition::Held
        );
        let d = j.on_click(click("c1", 100, "a", Some("i1")), origin(1), &c, &mut out);
        assert_eq!(d, Disposition::Emitted { joined: true });
        assert_eq!(out.examples[0].position, Some(2));
        out.clear();
        // Watermark passes the impression: clicked, so released without a negative.
        j.on_click(click("c2", 2000, "b", None), origin(2), &c, &mut out);
        assert_eq!(out.released, vec![origin(0)]);
        assert_eq!(out.examples.len(), 1);
        assert_eq!(out.examples[0].label, Label::Click { joined: false });
    }

    #[test]
    fn unclicked_impression_becomes_a_negative_when_it_expires() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        j.on_impression(imp("i1", 0, "a"), origin(0), &c, &mut out);
        j.on_impression(imp("i2", 1500, "b"), origin(1), &c, &mut out);
        assert_eq!(out.examples.len(), 1);
        assert_eq!(out.examples[0].label, Label::ShownNotClicked);
        assert_eq!(out.examples[0].origin, origin(0));
        assert_eq!(out.expired_unclicked, 1);
        assert_eq!(j.waiting(), 1);
    }

    #[test]
    fn late_click_is_unjoined_and_duplicates_are_dropped() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        j.on_impression(imp("i1", 0, "a"), origin(0), &c, &mut out);
        j.on_impression(imp("i2", 5000, "b"), origin(1), &c, &mut out);
        let d = j.on_click(click("c1", 5100, "a", Some("i1")), origin(2), &c, &mut out);
        assert_eq!(d, Disposition::Emitted { joined: false });
        let d = j.on_click(click("c1", 5100, "a", Some("i1")), origin(3), &c, &mut out);
        assert_eq!(d, Disposition::Duplicate);
        let d = j.on_impression(imp("i2", 5000, "b"), origin(4), &c, &mut out);
        assert_eq!(d, Disposition::Duplicate);
    }

    #[test]
    fn click_before_its_impression_prevents_a_false_negative() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        j.on_click(click("c1", 10, "a", Some("i1")), origin(0), &c, &mut out);
        j.on_impression(imp("i1", 5, "a"), origin(1), &c, &mut out);
        out.clear();
        j.on_click(click("c2", 5000, "z", None), origin(2), &c, &mut out);
        assert_eq!(out.released, vec![origin(1)]);
        assert_eq!(out.expired_unclicked, 0);
    }

    #[test]
    fn capacity_bounds_the_window() {
        let (c, mut j, mut out) = (
            Catalog::default(),
            joiner(1_000_000, 3),
            JoinOutput::default(),
        );
        for i in 0..10 {
            j.on_impression(imp(&format!("i{i}"), i, "a"), origin(i), &c, &mut out);
        }
        assert_eq!(j.waiting(), 3);
        assert_eq!(out.examples.len(), 7);
        assert!(j.remembered_ids() <= 100);
    }
}
