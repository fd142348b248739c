//! The click-to-impression join and event deduplication, in event time, with bounded memory.
//!
//! State is kept per **partition number** (a *shard*, as a Kafka Streams task): impressions and
//! clicks keyed alike (by user id, as `towerstream replay` does) land in the same partition
//! number of every event topic, so a shard holds a whole join. Each shard has its own event-time
//! clock, so a partition that lags minutes behind the others joins exactly as if it were on
//! time:
//!
//! * **Watermark.** Each input (topic, partition) tracks the largest event time it delivered; a
//!   shard's watermark is the minimum over its inputs that are not idle, minus `window_ms`. An
//!   input is idle after `idle_timeout_ms` of wall time without events; while a whole shard is
//!   idle its clock moves on with the wall clock ([`Joiner::tick`]), so the last impressions of a
//!   stream that goes silent still leave the window.
//! * **Time rules** ([`Joiner::admit`]): an event stamped more than `max_future_ms` ahead of the
//!   wall clock, or more than `allowed_lateness_ms` behind its input's clock, is refused (the
//!   caller dead-letters it as [`InvalidReason::FutureTime`] / [`InvalidReason::TooLate`]), so one
//!   bad timestamp can neither flush the window nor freeze time.
//! * An impression waits until its shard's watermark passes it, or until `max_impressions`
//!   pushes the oldest out. It then leaves: clicked ones are simply released; unclicked ones
//!   become a [`Label::ShownNotClicked`] negative when enabled.
//! * A click whose `impression_id` is waiting (in its shard, else in any shard this consumer
//!   holds) is a joined positive; otherwise it is still a positive, flagged unjoined. A click
//!   that arrives before its impression (possible across topics) is remembered, so the late
//!   impression is not mistaken for a negative.
//! * An event id seen within the window (of any shard) is a duplicate and is dropped.
//! * [`Joiner::revoke`] forgets everything that came from revoked partitions, emitting nothing:
//!   their offsets were never acknowledged, so whoever owns them next re-reads those events.
//!
//! The joiner holds each waiting impression's [`Origin`]: its offset is not acknowledged
//! until the impression leaves, so a restart from the committed offsets rebuilds the window.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::catalog::Catalog;
use crate::config::JoinConfig;
use crate::event::{Click, Impression, InvalidReason};
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

/// Why [`Joiner::admit`] refused an event's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeViolation {
    /// [`InvalidReason::FutureTime`] or [`InvalidReason::TooLate`].
    pub reason: InvalidReason,
    /// By how much the limit was exceeded, ms.
    pub by_ms: i64,
}

impl TimeViolation {
    /// The dead-letter detail.
    pub fn detail(&self, event_time_ms: i64) -> String {
        match self.reason {
            InvalidReason::FutureTime => format!(
                "`event_time_ms` {event_time_ms} is {} ms beyond join.max_future_ms ahead of the wall clock",
                self.by_ms
            ),
            _ => format!(
                "`event_time_ms` {event_time_ms} is {} ms beyond join.allowed_lateness_ms behind its partition's clock",
                self.by_ms
            ),
        }
    }
}

struct Waiting {
    impression: Impression,
    origin: Origin,
    clicked: bool,
}

/// One input (topic) of a shard: its event-time clock and when it last delivered.
#[derive(Debug, Clone, Copy)]
struct Input {
    max_time_ms: i64,
    last_wall_ms: i64,
}

/// The join state of one partition number.
struct Shard {
    waiting: HashMap<String, Waiting>,
    /// Impression ids in arrival order, with their event time.
    waiting_order: VecDeque<(i64, String)>,
    /// Event id → topic index it came on.
    seen: HashMap<String, u16>,
    seen_order: VecDeque<(i64, String)>,
    /// Impression ids clicked before the impression itself arrived → the click's topic.
    early_clicks: HashMap<String, u16>,
    early_order: VecDeque<(i64, String)>,
    inputs: BTreeMap<u16, Input>,
    /// Event-time clock: the watermark plus the window. Never moves back.
    clock_ms: i64,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            waiting: HashMap::new(),
            waiting_order: VecDeque::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            early_clicks: HashMap::new(),
            early_order: VecDeque::new(),
            inputs: BTreeMap::new(),
            clock_ms: i64::MIN,
        }
    }
}

impl Shard {
    fn last_wall_ms(&self) -> i64 {
        self.inputs
            .values()
            .map(|i| i.last_wall_ms)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// The clock the inputs allow now: the slowest input that is not idle (all inputs when all
    /// are idle), never moving back.
    fn recompute_clock(&mut self, now_wall_ms: i64, idle_ms: i64) {
        let active = self
            .inputs
            .values()
            .filter(|i| now_wall_ms.saturating_sub(i.last_wall_ms) < idle_ms)
            .map(|i| i.max_time_ms)
            .min();
        let candidate = active.or_else(|| self.inputs.values().map(|i| i.max_time_ms).max());
        if let Some(c) = candidate {
            self.clock_ms = self.clock_ms.max(c);
        }
    }

    fn forget_seen_before(&mut self, watermark: i64) {
        while self.seen_order.front().is_some_and(|(t, _)| *t < watermark) {
            if let Some((_, id)) = self.seen_order.pop_front() {
                self.seen.remove(&id);
            }
        }
        while self
            .early_order
            .front()
            .is_some_and(|(t, _)| *t < watermark)
        {
            if let Some((_, id)) = self.early_order.pop_front() {
                self.early_clicks.remove(&id);
            }
        }
    }

    /// Forgets what came from `topic` (a revoked topic-partition of this shard).
    fn purge_topic(&mut self, topic: u16) {
        self.waiting.retain(|_, w| w.origin.topic != topic);
        let waiting = &self.waiting;
        self.waiting_order
            .retain(|(_, id)| waiting.contains_key(id));
        self.seen.retain(|_, t| *t != topic);
        let seen = &self.seen;
        self.seen_order.retain(|(_, id)| seen.contains_key(id));
        self.early_clicks.retain(|_, t| *t != topic);
        let early = &self.early_clicks;
        self.early_order.retain(|(_, id)| early.contains_key(id));
        self.inputs.remove(&topic);
    }
}

/// Join and deduplication state. Single-threaded: owned by the ingest loop.
pub struct Joiner {
    config: JoinConfig,
    emit_negatives: bool,
    shards: BTreeMap<i32, Shard>,
    waiting_total: usize,
}

impl Joiner {
    /// An empty window.
    pub fn new(config: JoinConfig, emit_negatives: bool) -> Self {
        Joiner {
            config,
            emit_negatives,
            shards: BTreeMap::new(),
            waiting_total: 0,
        }
    }

    /// Impressions waiting in the window.
    pub fn waiting(&self) -> usize {
        self.waiting_total
    }

    /// Event ids remembered for deduplication.
    pub fn remembered_ids(&self) -> usize {
        self.shards.values().map(|s| s.seen.len()).sum()
    }

    /// The watermark of a partition's shard: events older than this have left its window
    /// (`i64::MIN` before its first event).
    pub fn watermark_ms(&self, partition: i32) -> i64 {
        self.shards.get(&partition).map_or(i64::MIN, |s| {
            s.clock_ms.saturating_sub(self.config.window_ms)
        })
    }

    /// Checks an event's time against the time rules before it is joined, and notes that its
    /// input delivered at `now_wall_ms`. A refused event must not be passed on.
    pub fn admit(
        &mut self,
        origin: Origin,
        event_time_ms: i64,
        now_wall_ms: i64,
    ) -> Result<(), TimeViolation> {
        let c = &self.config;
        if c.max_future_ms > 0 {
            let over = event_time_ms.saturating_sub(now_wall_ms.saturating_add(c.max_future_ms));
            if over > 0 {
                return Err(TimeViolation {
                    reason: InvalidReason::FutureTime,
                    by_ms: over,
                });
            }
        }
        let shard = self.shards.entry(origin.partition).or_default();
        let input = shard.inputs.entry(origin.topic).or_insert(Input {
            max_time_ms: i64::MIN,
            last_wall_ms: now_wall_ms,
        });
        if c.allowed_lateness_ms > 0 && input.max_time_ms > i64::MIN {
            let over = input
                .max_time_ms
                .saturating_sub(c.allowed_lateness_ms)
                .saturating_sub(event_time_ms);
            if over > 0 {
                return Err(TimeViolation {
                    reason: InvalidReason::TooLate,
                    by_ms: over,
                });
            }
        }
        input.last_wall_ms = now_wall_ms;
        Ok(())
    }

    /// Moves the clocks of idle shards on with the wall clock, so their impressions still
    /// leave the window when a stream goes quiet. Call every second or so.
    pub fn tick(&mut self, now_wall_ms: i64, catalog: &Catalog, out: &mut JoinOutput) {
        let idle = self.config.idle_timeout_ms;
        let partitions: Vec<i32> = self.shards.keys().copied().collect();
        for p in partitions {
            let Some(shard) = self.shards.get_mut(&p) else {
                continue;
            };
            let silent_for = now_wall_ms.saturating_sub(shard.last_wall_ms());
            if shard.inputs.is_empty() || silent_for < idle {
                continue;
            }
            let newest = shard.inputs.values().map(|i| i.max_time_ms).max();
            if let Some(t) = newest.filter(|t| *t > i64::MIN) {
                shard.clock_ms = shard.clock_ms.max(t.saturating_add(silent_for));
            }
            self.expire(p, catalog, out);
        }
    }

    /// Forgets everything that came from these revoked (topic index, partition) pairs, emitting
    /// and releasing nothing: their offsets stay unacknowledged, so the next owner (maybe this
    /// consumer again) re-reads those events.
    pub fn revoke(&mut self, partitions: &[(u16, i32)]) {
        for (topic, partition) in partitions {
            if let Some(shard) = self.shards.get_mut(partition) {
                shard.purge_topic(*topic);
                if shard.inputs.is_empty() {
                    self.shards.remove(partition);
                }
            }
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.waiting_total = self.shards.values().map(|s| s.waiting.len()).sum();
    }

    /// Takes in an impression.
    pub fn on_impression(
        &mut self,
        imp: Impression,
        origin: Origin,
        catalog: &Catalog,
        out: &mut JoinOutput,
    ) -> Disposition {
        self.advance(origin, imp.event_time_ms, catalog, out);
        if !self.remember(origin, &imp.event_id, imp.event_time_ms)
            || self
                .shards
                .values()
                .any(|s| s.waiting.contains_key(&imp.impression_id))
        {
            return Disposition::Duplicate;
        }
        let clicked = self.take_early_click(origin.partition, &imp.impression_id);
        let shard = self.shard(origin.partition);
        shard
            .waiting_order
            .push_back((imp.event_time_ms, imp.impression_id.clone()));
        shard.waiting.insert(
            imp.impression_id.clone(),
            Waiting {
                impression: imp,
                origin,
                clicked,
            },
        );
        self.waiting_total += 1;
        while self.waiting_total > self.config.max_impressions {
            let oldest = self
                .shards
                .iter()
                .filter_map(|(p, s)| s.waiting_order.front().map(|(t, _)| (*t, *p)))
                .min();
            match oldest {
                Some((_, p)) => self.expire_front(p, catalog, out),
                None => break,
            }
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
        self.advance(origin, click.event_time_ms, catalog, out);
        if !self.remember(origin, &click.event_id, click.event_time_ms) {
            return Disposition::Duplicate;
        }
        let mut position = None;
        if let Some(imp_id) = &click.impression_id {
            // Its own shard first; any other shard this consumer holds covers producers that
            // key impressions and clicks differently.
            let holder = if self
                .shards
                .get(&origin.partition)
                .is_some_and(|s| s.waiting.contains_key(imp_id))
            {
                Some(origin.partition)
            } else {
                self.shards
                    .iter()
                    .find(|(_, s)| s.waiting.contains_key(imp_id))
                    .map(|(p, _)| *p)
            };
            let found = holder
                .and_then(|p| self.shards.get_mut(&p))
                .and_then(|s| s.waiting.get_mut(imp_id));
            match found {
                Some(w)
                    if w.impression.user_id == click.user_id
                        && w.impression.item_id == click.item_id =>
                {
                    w.clicked = true;
                    position = Some(w.impression.position);
                }
                Some(_) => {} // same impression id, different user/item: not this click's
                None => self.remember_early_click(origin, imp_id, click.event_time_ms),
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

    fn shard(&mut self, partition: i32) -> &mut Shard {
        self.shards.entry(partition).or_default()
    }

    fn remember_early_click(&mut self, origin: Origin, imp_id: &str, time_ms: i64) {
        let cap = self.config.max_impressions;
        let shard = self.shard(origin.partition);
        if shard.early_clicks.contains_key(imp_id) {
            return;
        }
        shard.early_clicks.insert(imp_id.to_owned(), origin.topic);
        shard.early_order.push_back((time_ms, imp_id.to_owned()));
        let remembered: usize = self.shards.values().map(|s| s.early_clicks.len()).sum();
        if remembered > cap {
            let fullest = self.shards.values_mut().max_by_key(|s| s.early_order.len());
            if let Some((s, (_, old))) =
                fullest.and_then(|s| s.early_order.pop_front().map(|o| (s, o)))
            {
                s.early_clicks.remove(&old);
            }
        }
    }

    fn take_early_click(&mut self, partition: i32, imp_id: &str) -> bool {
        let own = self
            .shards
            .get_mut(&partition)
            .is_some_and(|s| s.early_clicks.remove(imp_id).is_some());
        let found = own
            || self
                .shards
                .values_mut()
                .any(|s| s.early_clicks.remove(imp_id).is_some());
        // The id stays in `early_order` until the watermark passes it; removing it there too
        // would cost a scan.
        found
    }

    /// Records an event id; false if it was already seen inside the window of any shard.
    fn remember(&mut self, origin: Origin, event_id: &str, time_ms: i64) -> bool {
        if self.shards.values().any(|s| s.seen.contains_key(event_id)) {
            return false;
        }
        let shard = self.shard(origin.partition);
        shard.seen.insert(event_id.to_owned(), origin.topic);
        shard.seen_order.push_back((time_ms, event_id.to_owned()));
        if self.remembered_ids() > self.config.dedup_capacity {
            let fullest = self.shards.values_mut().max_by_key(|s| s.seen_order.len());
            if let Some((s, (_, old))) =
                fullest.and_then(|s| s.seen_order.pop_front().map(|o| (s, o)))
            {
                s.seen.remove(&old);
            }
        }
        true
    }

    /// Notes an event's time on its input, moves its shard's clock, and lets everything older
    /// than the shard's window leave.
    fn advance(&mut self, origin: Origin, time_ms: i64, catalog: &Catalog, out: &mut JoinOutput) {
        let (idle, window) = (self.config.idle_timeout_ms, self.config.window_ms);
        let shard = self.shard(origin.partition);
        let input = shard.inputs.entry(origin.topic).or_insert(Input {
            max_time_ms: i64::MIN,
            last_wall_ms: i64::MIN,
        });
        if time_ms <= input.max_time_ms {
            return;
        }
        input.max_time_ms = time_ms;
        let now_wall = input.last_wall_ms;
        let before = shard.clock_ms;
        shard.recompute_clock(now_wall, idle);
        if shard.clock_ms != before {
            let watermark = shard.clock_ms.saturating_sub(window);
            shard.forget_seen_before(watermark);
            self.expire(origin.partition, catalog, out);
        }
    }

    /// Lets every impression of a shard older than its watermark leave, and forgets old ids.
    fn expire(&mut self, partition: i32, catalog: &Catalog, out: &mut JoinOutput) {
        let Some(shard) = self.shards.get_mut(&partition) else {
            return;
        };
        let watermark = shard.clock_ms.saturating_sub(self.config.window_ms);
        shard.forget_seen_before(watermark);
        while self
            .shards
            .get(&partition)
            .and_then(|s| s.waiting_order.front())
            .is_some_and(|(t, _)| *t < watermark)
        {
            self.expire_front(partition, catalog, out);
        }
    }

    fn expire_front(&mut self, partition: i32, catalog: &Catalog, out: &mut JoinOutput) {
        let Some(shard) = self.shards.get_mut(&partition) else {
            return;
        };
        let Some((_, imp_id)) = shard.waiting_order.pop_front() else {
            return;
        };
        let Some(w) = shard.waiting.remove(&imp_id) else {
            return;
        };
        self.waiting_total = self.waiting_total.saturating_sub(1);
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
                ..JoinConfig::default()
            },
            true,
        )
    }

    fn at(partition: i32, offset: i64) -> Origin {
        Origin {
            partition,
            ..origin(offset)
        }
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

    #[test]
    fn a_lagging_partition_keeps_its_own_clock() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        let now = 1_000_000;
        // Partition 0 is on time; partition 1 lags ten minutes behind it.
        for (i, t) in [(0, now), (1, now + 500)] {
            j.admit(at(0, i), t, now).unwrap();
            j.on_impression(imp(&format!("p0-{i}"), t, "a"), at(0, i), &c, &mut out);
        }
        let late = now - 600_000;
        j.admit(at(1, 0), late, now).unwrap();
        assert_eq!(
            j.on_impression(imp("p1", late, "b"), at(1, 0), &c, &mut out),
            Disposition::Held
        );
        assert!(
            out.examples.is_empty(),
            "the lagging impression did not expire on arrival"
        );
        j.admit(at(1, 1), late + 300, now).unwrap();
        let d = j.on_click(
            click("c", late + 300, "b", Some("p1")),
            at(1, 1),
            &c,
            &mut out,
        );
        assert_eq!(d, Disposition::Emitted { joined: true });
        assert_eq!(j.watermark_ms(1), late + 300 - 1000);
        assert_eq!(j.watermark_ms(0), now + 500 - 1000);
    }

    #[test]
    fn time_rules_refuse_far_future_and_far_late_events() {
        let mut j = joiner(1000, 10);
        let now = 1_764_600_000_000;
        let limit = JoinConfig::default().max_future_ms;
        assert!(j.admit(at(0, 0), now + limit, now).is_ok());
        let v = j.admit(at(0, 1), 9_999_999_999_999, now).unwrap_err();
        assert_eq!(v.reason, InvalidReason::FutureTime);
        // A 2286 stamp never reached the clock: the next on-time event is not "late".
        let (c, mut out) = (Catalog::default(), JoinOutput::default());
        j.on_click(click("c0", now, "a", None), at(0, 0), &c, &mut out);
        assert!(j.admit(at(0, 2), now - 1000, now).is_ok());
        let day = JoinConfig::default().allowed_lateness_ms;
        let v = j.admit(at(0, 3), now - day - 1, now).unwrap_err();
        assert_eq!((v.reason, v.by_ms), (InvalidReason::TooLate, 1));
        // Lateness is per partition: another partition may be a day behind this one.
        assert!(j.admit(at(1, 0), now - day - 1, now).is_ok());
    }

    #[test]
    fn a_silent_shard_lets_its_impressions_go_after_the_idle_timeout() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        let (t, wall) = (5_000, 1_000_000);
        j.admit(at(0, 0), t, wall).unwrap();
        j.on_impression(imp("i", t, "a"), at(0, 0), &c, &mut out);
        let idle = JoinConfig::default().idle_timeout_ms;
        j.tick(wall + idle - 1, &c, &mut out);
        assert!(out.examples.is_empty(), "not idle yet");
        j.tick(wall + idle, &c, &mut out);
        assert_eq!(out.examples.len(), 1);
        assert_eq!(out.examples[0].label, Label::ShownNotClicked);
        assert_eq!(j.waiting(), 0);
    }

    #[test]
    fn revoke_forgets_a_partition_without_emitting() {
        let (c, mut j, mut out) = (Catalog::default(), joiner(1000, 10), JoinOutput::default());
        j.on_impression(imp("i0", 0, "a"), at(0, 0), &c, &mut out);
        j.on_impression(imp("i1", 0, "a"), at(1, 0), &c, &mut out);
        j.on_click(click("c1", 10, "a", Some("i1")), at(1, 1), &c, &mut out);
        out.clear();
        j.revoke(&[(0, 1)]);
        assert_eq!(j.waiting(), 1);
        assert!(out.examples.is_empty() && out.released.is_empty());
        // Handed back and re-read: the same events are new again, not duplicates.
        let d = j.on_impression(imp("i1", 0, "a"), at(1, 0), &c, &mut out);
        assert_eq!(d, Disposition::Held);
        let d = j.on_click(click("c1", 10, "a", Some("i1")), at(1, 1), &c, &mut out);
        assert_eq!(d, Disposition::Emitted { joined: true });
        // Partition 0 was not revoked: its impression is still a duplicate.
        let d = j.on_impression(imp("i0", 0, "a"), at(0, 0), &c, &mut out);
        assert_eq!(d, Disposition::Duplicate);
    }
}
