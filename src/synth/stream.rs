//! A synthetic event stream with ground truth at every moment: drifting tastes, items that
//! arrive over time, and impressions with position bias whose clicks follow the true affinity.
//!
//! * Each user's taste at time `t` rotates from their latent `a` toward a second direction `b`:
//!   `taste(t) = cos θ · a + sin θ · b`, `θ = 2π · t / drift_period` (no drift when 0).
//! * A share of the catalogue is held back and arrives at uniformly spread times (an item
//!   upsert on the item topic), so new items with zero clicks appear mid-stream.
//! * Each request shows a slate drawn from the world's click distribution at `t` (a decent
//!   production recommender); the item at position `p` is examined with probability
//!   `1 / (1 + p)^position_bias` and, if examined, clicked with probability
//!   `exp(affinity · (cos − 1))` — the true affinity of user and item.
//! * [`Stream::best_items`] is the truth: the items a user most likely clicks at time `t`.

use serde::{Deserialize, Serialize};

use super::{gaussian, World, WorldConfig};
use crate::event::{Click, Event, Impression, ItemEvent};
use crate::train::sampler::Rng;

/// Shape of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// Users, items, latent dimensions, popularity and affinity, seed.
    pub world: WorldConfig,
    /// Requests (slates shown).
    pub requests: usize,
    /// Items per slate.
    pub slate: usize,
    /// Examination probability at position `p` is `1 / (1 + p)^position_bias`.
    pub position_bias: f64,
    /// Event time of the first request (ms since the epoch).
    pub start_ms: i64,
    /// Time between requests (ms).
    pub request_interval_ms: i64,
    /// A full turn of every user's taste takes this long (ms); 0 disables drift.
    pub drift_period_ms: i64,
    /// Share of items that are not in the catalogue at the start and arrive during the stream.
    pub new_item_share: f64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            world: WorldConfig::default(),
            requests: 10_000,
            slate: 10,
            position_bias: 1.0,
            start_ms: 1_700_000_000_000,
            request_interval_ms: 100,
            drift_period_ms: 4 * 3_600_000,
            new_item_share: 0.1,
        }
    }
}

/// The generator and its truth.
pub struct Stream {
    /// Configuration.
    pub config: StreamConfig,
    /// The world (users, items, popularity).
    pub world: World,
    /// Per user, the direction their taste drifts toward (unit, orthogonal to the latent).
    drift: Vec<Vec<f64>>,
    /// Per item, when it enters the catalogue (ms).
    pub available_from: Vec<i64>,
}

/// What [`Stream::events`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Item upserts (initial catalogue and arrivals).
    pub items: usize,
    /// User profiles.
    pub users: usize,
    /// Impressions.
    pub impressions: usize,
    /// Clicks.
    pub clicks: usize,
}

impl Stream {
    /// Builds the world and the schedule (deterministic for the seed).
    pub fn new(config: StreamConfig) -> Stream {
        let world = World::new(config.world.clone());
        let mut rng = Rng::new(config.world.seed ^ 0x5eed_57ea);
        let drift = world
            .users
            .iter()
            .map(|u| {
                // Gram–Schmidt: a random direction orthogonal to the user's latent.
                let r: Vec<f64> = (0..u.latent.len()).map(|_| gaussian(&mut rng)).collect();
                let dot: f64 = r.iter().zip(&u.latent).map(|(a, b)| a * b).sum();
                let o: Vec<f64> = r.iter().zip(&u.latent).map(|(a, b)| a - dot * b).collect();
                let n = o.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                o.into_iter().map(|x| x / n).collect()
            })
            .collect();
        let end = config.start_ms + config.request_interval_ms * config.requests as i64;
        let available_from = (0..world.items.len())
            .map(|_| {
                if rng.next_f64() < config.new_item_share {
                    config.start_ms + (rng.next_f64() * (end - config.start_ms) as f64) as i64
                } else {
                    config.start_ms - 1
                }
            })
            .collect();
        Stream {
            config,
            world,
            drift,
            available_from,
        }
    }

    /// The drift's phase θ at `time_ms` (0 without drift).
    pub fn phase(&self, time_ms: i64) -> f64 {
        if self.config.drift_period_ms <= 0 {
            return 0.0;
        }
        2.0 * std::f64::consts::PI * (time_ms - self.config.start_ms) as f64
            / self.config.drift_period_ms as f64
    }

    /// User `u`'s taste at `time_ms` (unit vector).
    pub fn taste(&self, u: usize, time_ms: i64) -> Vec<f64> {
        let a = &self.world.users[u].latent;
        if self.config.drift_period_ms <= 0 {
            return a.clone();
        }
        let (s, c) = self.phase(time_ms).sin_cos();
        a.iter()
            .zip(&self.drift[u])
            .map(|(x, y)| c * x + s * y)
            .collect()
    }

    fn cosines(&self, taste: &[f64]) -> Vec<f64> {
        self.world
            .items
            .iter()
            .map(|it| it.latent.iter().zip(taste).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// Log click propensity of every item for user `u` at `time_ms` (−∞ for items not yet
    /// in the catalogue).
    pub fn logits(&self, u: usize, time_ms: i64) -> Vec<f64> {
        self.logits_of_taste(&self.taste(u, time_ms), time_ms)
    }

    /// [`Self::logits`] of any taste vector (an estimate of one, say) at `time_ms`.
    pub fn logits_of_taste(&self, taste: &[f64], time_ms: i64) -> Vec<f64> {
        let c = &self.world.config;
        self.cosines(taste)
            .into_iter()
            .zip(&self.world.items)
            .zip(&self.available_from)
            .map(|((cos, it), &from)| {
                if from > time_ms {
                    f64::NEG_INFINITY
                } else {
                    c.popularity_weight * it.popularity.ln() + c.affinity * cos
                }
            })
            .collect()
    }

    /// The truth: the `k` items user `u` most likely clicks at `time_ms`, best first.
    pub fn best_items(&self, u: usize, time_ms: i64, k: usize) -> Vec<usize> {
        let l = self.logits(u, time_ms);
        let mut idx: Vec<usize> = (0..l.len()).filter(|&j| l[j].is_finite()).collect();
        idx.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
        idx.truncate(k);
        idx
    }

    /// Every event in time order: the initial catalogue and profiles, then per request its
    /// impressions and clicks, with arriving items upserted when they arrive.
    pub fn events(&self) -> (Vec<Event>, Counts) {
        let cfg = &self.config;
        let mut rng = Rng::new(cfg.world.seed ^ 0x0e1e_0e1e);
        let mut out = Vec::new();
        let mut counts = Counts::default();
        let all_items = self.world.item_events();
        let item_event = |j: usize, t: i64| match &all_items[j] {
            Event::Item(e) => Event::Item(ItemEvent {
                event_time_ms: t,
                ..e.clone()
            }),
            other => other.clone(),
        };
        let mut arrivals: Vec<(i64, usize)> = Vec::new();
        for (j, &from) in self.available_from.iter().enumerate() {
            if from < cfg.start_ms {
                if let Event::Item(e) = &all_items[j] {
                    out.push(Event::Item(ItemEvent {
                        event_time_ms: from,
                        ..e.clone()
                    }));
                    counts.items += 1;
                }
            } else {
                arrivals.push((from, j));
            }
        }
        arrivals.sort();
        for e in self.world.user_events() {
            if let Event::User(mut u) = e {
                u.event_time_ms = cfg.start_ms - 1;
                out.push(Event::User(u));
                counts.users += 1;
            }
        }
        let mut next_arrival = 0;
        let affinity = cfg.world.affinity;
        for r in 0..cfg.requests {
            let t = cfg.start_ms + r as i64 * cfg.request_interval_ms;
            while next_arrival < arrivals.len() && arrivals[next_arrival].0 <= t {
                let (at, j) = arrivals[next_arrival];
                out.push(item_event(j, at));
                counts.items += 1;
                next_arrival += 1;
            }
            let u = rng.below(self.world.users.len());
            let taste = self.taste(u, t);
            let cos = self.cosines(&taste);
            let logits = self.logits(u, t);
            // Gumbel top-k: a slate sampled without replacement from softmax(logits).
            let mut keyed: Vec<(f64, usize)> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(j, l)| (l - (-rng.next_f64().max(1e-300).ln()).ln(), j))
                .collect();
            let take = cfg.slate.min(keyed.len());
            if take == 0 {
                continue;
            }
            keyed.select_nth_unstable_by(take - 1, |a, b| b.0.total_cmp(&a.0));
            keyed.truncate(take);
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            let user = &self.world.users[u];
            for (p, &(_, j)) in keyed.iter().enumerate() {
                let imp = format!("r{r}-p{p}");
                out.push(Event::Impression(Impression {
                    event_id: format!("imp-{imp}"),
                    event_time_ms: t,
                    user_id: user.id.clone(),
                    item_id: self.world.items[j].id.clone(),
                    impression_id: imp.clone(),
                    request_id: format!("r{r}"),
                    position: p as u32,
                    surface: Some("synthetic".into()),
                }));
                counts.impressions += 1;
                let examined = 1.0 / (1.0 + p as f64).powf(cfg.position_bias);
                let relevance = (affinity * (cos[j] - 1.0)).exp();
                if rng.next_f64() < examined * relevance {
                    out.push(Event::Click(Click {
                        event_id: format!("click-{imp}"),
                        event_time_ms: t + 1 + p as i64,
                        user_id: user.id.clone(),
                        item_id: self.world.items[j].id.clone(),
                        impression_id: Some(imp),
                        dwell_ms: None,
                    }));
                    counts.clicks += 1;
                }
            }
        }
        // Clicks come a few ms after their impression; a stable sort keeps everything else
        // in generation order.
        out.sort_by_key(|e| e.event_time_ms());
        (out, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> StreamConfig {
        StreamConfig {
            world: WorldConfig {
                users: 50,
                items: 80,
                ..WorldConfig::default()
            },
            requests: 2000,
            ..StreamConfig::default()
        }
    }

    #[test]
    fn the_stream_is_deterministic_ordered_and_consistent() {
        let (a, ca) = Stream::new(small()).events();
        let (b, cb) = Stream::new(small()).events();
        assert_eq!(ca, cb);
        assert_eq!(
            a.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
            b.iter().map(|e| e.to_json()).collect::<Vec<_>>()
        );
        assert!(a
            .windows(2)
            .all(|w| w[0].event_time_ms() <= w[1].event_time_ms()));
        assert_eq!(ca.items, 80, "every item is upserted once");
        assert!(ca.clicks > 100 && ca.clicks < ca.impressions);
        // No impression of an item before it arrived.
        let mut arrived = std::collections::HashSet::new();
        for e in &a {
            match e {
                Event::Item(i) => {
                    arrived.insert(i.item_id.clone());
                }
                Event::Impression(i) => assert!(arrived.contains(&i.item_id)),
                _ => {}
            }
        }
    }

    #[test]
    fn clicks_are_position_biased_and_tastes_drift() {
        let s = Stream::new(small());
        let (events, _) = s.events();
        let mut by_pos = [0usize; 10];
        let positions: std::collections::HashMap<String, u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Impression(i) => Some((i.impression_id.clone(), i.position)),
                _ => None,
            })
            .collect();
        for e in &events {
            if let Event::Click(c) = e {
                by_pos[positions[c.impression_id.as_deref().unwrap()] as usize] += 1;
            }
        }
        assert!(by_pos[0] > 2 * by_pos[9], "{by_pos:?}");
        let t0 = s.config.start_ms;
        let half = t0 + s.config.drift_period_ms / 2;
        let (now, later) = (s.best_items(0, t0, 10), s.best_items(0, half, 10));
        assert_ne!(now, later, "half a drift period turns the taste around");
        assert!(
            s.taste(0, t0)
                .iter()
                .zip(s.taste(0, half))
                .map(|(a, b)| a * b)
                .sum::<f64>()
                < -0.99
        );
    }
}
