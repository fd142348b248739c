//! What the scenarios send: a synthetic world's tables, clicks, and slates of impressions with
//! the clicks on them (the truth of which impression was clicked stays in the book).
//!
//! Event ids carry the scenario's name, so two scenarios never share one. Records are keyed by
//! user id (a user's impressions and clicks share a partition and stay in order) unless a
//! scenario pins the partition.

use towerstream::event::{Click, Event, Impression};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::sampler::Rng;

use crate::book::{Kind, Sent, Topic};
use crate::produce::Rec;

/// Wall-clock now in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Topic names of a scenario.
#[derive(Debug, Clone)]
pub struct Topics {
    /// The event topic.
    pub events: String,
    /// The catalogue.
    pub items: String,
    /// The profiles.
    pub users: String,
}

/// A stream generator over a small synthetic world.
pub struct Traffic {
    /// The world (users `u<n>`, items `i<n>`).
    pub world: World,
    /// Topic names.
    pub topics: Topics,
    rng: Rng,
    prefix: String,
    n: u64,
}

/// Options of one slate.
#[derive(Debug, Clone, Copy)]
pub struct Slate {
    /// Impressions shown.
    pub impressions: usize,
    /// Chance that one of them is clicked.
    pub click_prob: f64,
    /// Event time of the impressions.
    pub time_ms: i64,
    /// Event time from the impressions to the click.
    pub click_delay_ms: i64,
    /// Explicit partition for all of it.
    pub partition: Option<i32>,
}

impl Traffic {
    /// A world of `users` × `items` for the scenario `prefix`.
    pub fn new(prefix: &str, topics: Topics, users: usize, items: usize, seed: u64) -> Traffic {
        Traffic {
            world: World::new(WorldConfig {
                users,
                items,
                seed,
                ..WorldConfig::default()
            }),
            topics,
            rng: Rng::new(seed ^ 0x5eed),
            prefix: prefix.to_owned(),
            n: 0,
        }
    }

    /// A uniform draw in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    /// A uniform draw in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng.next_f64()
    }

    fn next_id(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    /// The catalogue and the profiles as table records.
    pub fn tables(&self) -> Vec<Rec> {
        let items = self.world.item_events().into_iter().map(|e| {
            let key = match &e {
                Event::Item(i) => i.item_id.to_string(),
                _ => String::new(),
            };
            table_rec(&self.topics.items, Topic::Items, key, e.to_json(), "item")
        });
        let users = self.world.user_events().into_iter().map(|e| {
            let key = match &e {
                Event::User(u) => u.user_id.to_string(),
                _ => String::new(),
            };
            table_rec(&self.topics.users, Topic::Users, key, e.to_json(), "user")
        });
        items.chain(users).collect()
    }

    /// One click on an item drawn from the user's taste, without an impression.
    pub fn click(&mut self, time_ms: i64, partition: Option<i32>) -> Rec {
        let (u, j) = self.world.sample_click(&mut self.rng);
        let n = self.next_id();
        let click = Click {
            event_id: format!("{}-c{n}", self.prefix),
            event_time_ms: time_ms,
            user_id: self.world.users[u].id.clone(),
            item_id: self.world.items[j].id.clone(),
            impression_id: None,
            dwell_ms: None,
        };
        self.click_rec(click, partition)
    }

    /// A click record (the book learns its event id).
    pub fn click_rec(&self, click: Click, partition: Option<i32>) -> Rec {
        Rec {
            topic: self.topics.events.clone(),
            key: Some(click.user_id.to_string()),
            partition,
            sent: Sent {
                kind: Kind::Click {
                    event_id: click.event_id.clone(),
                },
                topic: Topic::Event(0),
                duplicate: false,
                tag: None,
            },
            payload: Some(Event::Click(click).to_json()),
        }
    }

    /// A slate of impressions for one user, then (maybe) a click on one of them.
    pub fn slate(&mut self, s: Slate) -> Vec<Rec> {
        let (u, clicked_item) = self.world.sample_click(&mut self.rng);
        let n = self.next_id();
        let clicked_slot =
            (self.rng.next_f64() < s.click_prob).then(|| self.rng.below(s.impressions.max(1)));
        let user = self.world.users[u].id.clone();
        let mut recs = Vec::with_capacity(s.impressions + 1);
        let mut click = None;
        for slot in 0..s.impressions {
            let item = if Some(slot) == clicked_slot {
                clicked_item
            } else {
                self.rng.below(self.world.items.len())
            };
            let imp = Impression {
                event_id: format!("{}-i{n}-{slot}", self.prefix),
                event_time_ms: s.time_ms,
                user_id: user.clone(),
                item_id: self.world.items[item].id.clone(),
                impression_id: format!("{}-imp{n}-{slot}", self.prefix),
                request_id: format!("{}-r{n}", self.prefix),
                position: slot as u32,
                surface: None,
            };
            if Some(slot) == clicked_slot {
                click = Some(Click {
                    event_id: format!("{}-c{n}", self.prefix),
                    event_time_ms: s.time_ms + s.click_delay_ms,
                    user_id: user.clone(),
                    item_id: imp.item_id.clone(),
                    impression_id: Some(imp.impression_id.clone()),
                    dwell_ms: Some(1000 + self.rng.below(30_000) as u64),
                });
            }
            recs.push(Rec {
                topic: self.topics.events.clone(),
                key: Some(user.to_string()),
                partition: s.partition,
                sent: Sent {
                    kind: Kind::Impression {
                        clicked: Some(slot) == clicked_slot,
                    },
                    topic: Topic::Event(0),
                    duplicate: false,
                    tag: None,
                },
                payload: Some(Event::Impression(imp).to_json()),
            });
        }
        if let Some(c) = click {
            recs.push(self.click_rec(c, s.partition));
        }
        recs
    }
}

/// The same record again, flagged as a deliberate duplicate.
pub fn duplicate(rec: &Rec) -> Rec {
    let mut r = rec.clone();
    r.sent.duplicate = true;
    r
}

/// A table record labelled for the report.
pub fn table_rec(topic: &str, t: Topic, key: String, payload: Vec<u8>, label: &'static str) -> Rec {
    Rec {
        topic: topic.to_owned(),
        key: Some(key),
        payload: Some(payload),
        partition: None,
        sent: Sent {
            kind: Kind::Table { label },
            topic: t,
            duplicate: false,
            tag: None,
        },
    }
}
