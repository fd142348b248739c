//! A synthetic world with known ground truth, for tests, benchmarks and demos.
//!
//! Users and items have latent vectors; the probability that user `u` clicks item `j` is
//! `p(j | u) ∝ pop_j^β · exp(γ · cos(u, j))`, with Zipf popularity `pop_j ∝ 1 / rank^s`.
//! Observable features are derived from the latents (an item's genres are its strongest latent
//! dimensions; a user's occupation is theirs), so a model can generalise from features to
//! unseen ids. Everything is deterministic for a seed.

pub mod stream;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{ItemFeatures, UserProfile};
use crate::event::{Click, Dense, Event, Id, ItemEvent, Op, UserEvent};
use crate::example::{Label, Origin, TrainingExample};
use crate::train::sampler::Rng;

/// Shape of the world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// Latent dimensions (also the number of genres).
    pub dim: usize,
    /// Zipf exponent of item popularity.
    pub zipf: f64,
    /// Weight β of popularity in click probabilities.
    pub popularity_weight: f64,
    /// Strength γ of personal affinity.
    pub affinity: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            users: 1000,
            items: 500,
            dim: 8,
            zipf: 1.0,
            popularity_weight: 1.0,
            affinity: 5.0,
            seed: 7,
        }
    }
}

/// A synthetic user.
#[derive(Debug, Clone)]
pub struct User {
    /// Id (`u<n>`).
    pub id: Id,
    /// Unit latent vector.
    pub latent: Vec<f64>,
    /// Observable profile.
    pub profile: Arc<UserProfile>,
}

/// A synthetic item.
#[derive(Debug, Clone)]
pub struct Item {
    /// Id (`i<n>`).
    pub id: Id,
    /// Unit latent vector.
    pub latent: Vec<f64>,
    /// Zipf popularity (unnormalised).
    pub popularity: f64,
    /// Observable features.
    pub features: Arc<ItemFeatures>,
}

/// The world: users, items and their click distributions.
pub struct World {
    /// Configuration.
    pub config: WorldConfig,
    /// Users.
    pub users: Vec<User>,
    /// Items, index = popularity rank (0 is the most popular).
    pub items: Vec<Item>,
    /// Per user, the cumulative click distribution over items.
    cdf: Vec<Vec<f64>>,
}

fn gaussian(rng: &mut Rng) -> f64 {
    // Box–Muller.
    let u1 = rng.next_f64().max(1e-12);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn unit(rng: &mut Rng, d: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..d).map(|_| gaussian(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / n).collect()
}

fn top_dims(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
    idx.truncate(k);
    idx
}

impl World {
    /// Builds the world for `config`.
    pub fn new(config: WorldConfig) -> World {
        let mut rng = Rng::new(config.seed);
        let d = config.dim.max(2);
        let items: Vec<Item> = (0..config.items)
            .map(|j| {
                let latent = unit(&mut rng, d);
                let id = Id::new(format!("i{j}"));
                let genres = top_dims(&latent, 2)
                    .into_iter()
                    .map(|g| format!("g{g}"))
                    .collect();
                Item {
                    features: Arc::new(ItemFeatures {
                        item_id: id.clone(),
                        category: Some(format!("g{}", top_dims(&latent, 1)[0])),
                        genres,
                        dense: Dense::new(),
                        updated_ms: 0,
                    }),
                    id,
                    latent,
                    popularity: 1.0 / ((j + 1) as f64).powf(config.zipf),
                }
            })
            .collect();
        let users: Vec<User> = (0..config.users)
            .map(|i| {
                let latent = unit(&mut rng, d);
                let id = Id::new(format!("u{i}"));
                let profile = UserProfile {
                    user_id: id.clone(),
                    gender: Some(if latent[0] >= 0.0 { "F" } else { "M" }.to_owned()),
                    age: Some((18.0 + 20.0 * (latent[1] + 1.0)) as u8),
                    occupation: Some(format!("o{}", top_dims(&latent, 1)[0])),
                    zip: Some(format!("z{}", top_dims(&latent, 2)[1])),
                    dense: Dense::new(),
                    updated_ms: 0,
                };
                User {
                    id,
                    latent,
                    profile: Arc::new(profile),
                }
            })
            .collect();
        let mut world = World {
            config,
            users,
            items,
            cdf: Vec::new(),
        };
        world.cdf = (0..world.users.len())
            .map(|u| {
                let logits = world.logits(u);
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = logits
                    .iter()
                    .map(|l| {
                        acc += (l - max).exp();
                        acc
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= acc;
                }
                cdf
            })
            .collect();
        world
    }

    /// `log p(j | u)` up to a constant, for every item.
    pub fn logits(&self, user: usize) -> Vec<f64> {
        let u = &self.users[user].latent;
        self.items
            .iter()
            .map(|it| {
                let cos: f64 = u.iter().zip(&it.latent).map(|(a, b)| a * b).sum();
                self.config.popularity_weight * it.popularity.ln() + self.config.affinity * cos
            })
            .collect()
    }

    /// The `k` items the user is most likely to click (the ground truth ranking).
    pub fn best_items(&self, user: usize, k: usize) -> Vec<usize> {
        let l = self.logits(user);
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
        idx.truncate(k);
        idx
    }

    /// Draws a click: a uniform user and an item from `p(· | user)`.
    pub fn sample_click(&self, rng: &mut Rng) -> (usize, usize) {
        let u = rng.below(self.users.len());
        let x = rng.next_f64();
        let cdf = &self.cdf[u];
        let j = cdf.partition_point(|c| *c < x).min(cdf.len() - 1);
        (u, j)
    }

    /// A click as a training example (as ingestion would produce it).
    pub fn example(&self, user: usize, item: usize, time_ms: i64, offset: i64) -> TrainingExample {
        TrainingExample {
            label: Label::Click { joined: false },
            user_id: self.users[user].id.clone(),
            item_id: self.items[item].id.clone(),
            user: Some(self.users[user].profile.clone()),
            item: Some(self.items[item].features.clone()),
            event_time_ms: time_ms,
            dwell_ms: None,
            position: None,
            origin: Origin {
                topic: 0,
                partition: 0,
                offset,
                epoch: 0,
            },
        }
    }

    /// The catalogue as `item` events.
    pub fn item_events(&self) -> Vec<Event> {
        self.items
            .iter()
            .map(|it| {
                Event::Item(ItemEvent {
                    event_id: format!("item-{}", it.id),
                    event_time_ms: 0,
                    item_id: it.id.clone(),
                    op: Op::Upsert,
                    title: None,
                    category: it.features.category.clone(),
                    genres: it.features.genres.clone(),
                    dense: Dense::new(),
                })
            })
            .collect()
    }

    /// The profiles as `user` events.
    pub fn user_events(&self) -> Vec<Event> {
        self.users
            .iter()
            .map(|u| {
                let p = &u.profile;
                Event::User(UserEvent {
                    event_id: format!("user-{}", u.id),
                    event_time_ms: 0,
                    user_id: u.id.clone(),
                    op: Op::Upsert,
                    gender: p.gender.clone(),
                    age: p.age,
                    occupation: p.occupation.clone(),
                    zip: p.zip.clone(),
                    dense: Dense::new(),
                })
            })
            .collect()
    }

    /// A click as an event.
    pub fn click_event(&self, user: usize, item: usize, time_ms: i64, n: u64) -> Event {
        Event::Click(Click {
            event_id: format!("click-{n}"),
            event_time_ms: time_ms,
            user_id: self.users[user].id.clone(),
            item_id: self.items[item].id.clone(),
            impression_id: None,
            dwell_ms: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_follow_popularity_and_affinity() {
        let w = World::new(WorldConfig::default());
        let mut rng = Rng::new(1);
        let mut counts = vec![0usize; w.items.len()];
        for _ in 0..50_000 {
            counts[w.sample_click(&mut rng).1] += 1;
        }
        // Head items are clicked far more than tail items.
        let head: usize = counts[..10].iter().sum();
        let tail: usize = counts[400..].iter().sum();
        assert!(head > 3 * tail, "head {head} tail {tail}");
        // The same seed gives the same world.
        let w2 = World::new(WorldConfig::default());
        assert_eq!(w.items[3].features.genres, w2.items[3].features.genres);
    }
}
