//! The candidate pool negatives are sampled from: the active catalogue (or, without one, every
//! item clicked so far), with click counts for the popularity-shaped distributions, and an
//! alias table (Vose) for O(1) draws.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::{Catalog, ItemFeatures, SharedCatalog};
use crate::config::NegativeDistribution;
use crate::event::Id;

/// A small, fast, seedable generator (xorshift64*), enough for sampling negatives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Vose's alias table over non-negative weights.
#[derive(Debug, Clone, Default)]
struct Alias {
    prob: Vec<f64>,
    alias: Vec<usize>,
}

impl Alias {
    fn new(weights: &[f64]) -> Alias {
        let n = weights.len();
        let total: f64 = weights.iter().sum();
        if n == 0 || total <= 0.0 {
            return Alias {
                prob: vec![1.0; n],
                alias: (0..n).collect(),
            };
        }
        let mut prob: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut alias = vec![0; n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|i| prob[*i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            alias[s] = l;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        for i in large.into_iter().chain(small) {
            prob[i] = 1.0;
        }
        Alias { prob, alias }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let i = rng.below(self.prob.len());
        if rng.next_f64() < self.prob[i] {
            i
        } else {
            self.alias[i]
        }
    }
}

/// Items negatives are drawn from.
#[derive(Debug, Default)]
pub struct ItemPool {
    ids: Vec<Id>,
    features: Vec<Option<Arc<ItemFeatures>>>,
    index: HashMap<Id, usize>,
    clicks: HashMap<Id, u64>,
    total_clicks: u64,
    alias: Option<Alias>,
    /// Sum of the weights the alias table was built from.
    total_weight: f64,
    distribution: NegativeDistribution,
    catalog_version: Option<u64>,
}

impl ItemPool {
    /// An empty pool drawing with `distribution`.
    pub fn new(distribution: NegativeDistribution) -> Self {
        ItemPool {
            distribution,
            ..Default::default()
        }
    }

    /// Items in the pool.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there is nothing to sample.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Clicks counted so far (exactly once per trained click).
    pub fn total_clicks(&self) -> u64 {
        self.total_clicks
    }

    /// Clicks of one item.
    pub fn clicks(&self, id: &Id) -> u64 {
        self.clicks.get(id).copied().unwrap_or(0)
    }

    /// All click counts (checkpoints, popularity baselines).
    pub fn click_counts(&self) -> &HashMap<Id, u64> {
        &self.clicks
    }

    /// Click counts in pool order (candidates first, in sampling order), for checkpoints.
    pub fn state(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .ids
            .iter()
            .map(|id| (id.to_string(), self.clicks(id)))
            .collect();
        let mut rest: Vec<(String, u64)> = self
            .clicks
            .iter()
            .filter(|(id, _)| !self.index.contains_key(*id))
            .map(|(id, c)| (id.to_string(), *c))
            .collect();
        rest.sort();
        out.extend(rest);
        out
    }

    /// Restores [`Self::state`]. A click-driven pool gets its candidates back in the same
    /// order (their features return with their next click); a catalogue-driven pool re-syncs
    /// from the catalogue on the next step.
    pub fn restore(&mut self, state: Vec<(String, u64)>) {
        self.ids.clear();
        self.features.clear();
        self.index.clear();
        self.clicks.clear();
        self.catalog_version = None;
        self.total_clicks = 0;
        for (id, c) in state {
            let id = Id::new(id);
            if c > 0 {
                self.total_clicks += c;
                self.clicks.insert(id.clone(), c);
                self.index.insert(id.clone(), self.ids.len());
                self.ids.push(id);
                self.features.push(None);
            }
        }
        self.alias = None;
    }

    /// Counts a trained click; adds the item if the pool is click-driven.
    pub fn record_click(&mut self, id: &Id, features: Option<&Arc<ItemFeatures>>) {
        *self.clicks.entry(id.clone()).or_insert(0) += 1;
        self.total_clicks += 1;
        if self.catalog_version.is_none() {
            match self.index.get(id) {
                Some(&i) => {
                    if self.features[i].is_none() {
                        self.features[i] = features.cloned();
                    }
                }
                None => {
                    self.index.insert(id.clone(), self.ids.len());
                    self.ids.push(id.clone());
                    self.features.push(features.cloned());
                }
            }
        }
        if !matches!(self.distribution, NegativeDistribution::Uniform) {
            self.alias = None;
        }
    }

    /// Follows the catalogue when it has items (rebuilding only when it changed).
    pub fn sync(&mut self, catalog: &Catalog) {
        if catalog.item_count() == 0 || self.catalog_version == Some(catalog.version()) {
            return;
        }
        if !self.follow(catalog) {
            self.rebuild(catalog.items().cloned().collect(), catalog.version());
        }
    }

    /// Applies the catalogue's item changes since the pool's version in place (an update
    /// keeps its slot, a new item is appended, a deleted one's slot takes the last item):
    /// O(changes) instead of the O(N log N) rebuild, which at 1M items takes 0.75 s — once per
    /// step while items change. False when the journal does not reach back (rebuild).
    ///
    /// The order is then the order of the changes, not the sorted one of a rebuild; both are
    /// deterministic for one event sequence (a restart rebuilds, so it samples other negatives
    /// than an uninterrupted run would — the negatives are random either way).
    fn follow(&mut self, catalog: &Catalog) -> bool {
        let Some(since) = self.catalog_version else {
            return false;
        };
        let Some(changes) = catalog.item_changes_since(since) else {
            return false;
        };
        let mut changed = false;
        for id in changes {
            changed = true;
            match (catalog.item(id), self.index.get(id).copied()) {
                (Some(f), Some(i)) => self.features[i] = Some(f),
                (Some(f), None) => {
                    self.index.insert(id.clone(), self.ids.len());
                    self.ids.push(id.clone());
                    self.features.push(Some(f));
                }
                (None, Some(i)) => {
                    self.index.remove(id);
                    self.ids.swap_remove(i);
                    self.features.swap_remove(i);
                    if let Some(moved) = self.ids.get(i) {
                        self.index.insert(moved.clone(), i);
                    }
                }
                (None, None) => {}
            }
        }
        self.catalog_version = Some(catalog.version());
        if changed {
            self.alias = None;
        }
        true
    }

    /// [`Self::sync`] with the catalogue ingestion writes: its read lock is held only to see
    /// the version and copy the item pointers; sorting and indexing happen after, so a
    /// catalogue writer (and the recall requests queued behind it) wait as little as possible.
    pub fn sync_shared(&mut self, catalog: &SharedCatalog) {
        let (items, version) = {
            let c = catalog.read().unwrap_or_else(|p| p.into_inner());
            if c.item_count() == 0 || self.catalog_version == Some(c.version()) {
                return;
            }
            // Following the journal is O(changes): quick enough under the read lock.
            if self.follow(&c) {
                return;
            }
            (c.items().cloned().collect(), c.version())
        };
        self.rebuild(items, version);
    }

    fn rebuild(&mut self, mut items: Vec<Arc<ItemFeatures>>, version: u64) {
        self.catalog_version = Some(version);
        self.ids.clear();
        self.features.clear();
        self.index.clear();
        items.sort_by(|a, b| a.item_id.cmp(&b.item_id)); // deterministic sampling
        for it in items {
            self.index.insert(it.item_id.clone(), self.ids.len());
            self.ids.push(it.item_id.clone());
            self.features.push(Some(it));
        }
        self.alias = None;
    }

    fn weight(&self, i: usize) -> f64 {
        self.weight_of(&self.ids[i])
    }

    fn weight_of(&self, id: &Id) -> f64 {
        let c = self.clicks.get(id).copied().unwrap_or(0) as f64;
        match self.distribution {
            NegativeDistribution::Uniform => 1.0,
            NegativeDistribution::Popularity075 => (c + 1.0).powf(0.75),
            NegativeDistribution::LogPopularity => (c + 1.0).ln() + 1.0,
        }
    }

    /// Draws `k` items (with replacement); empty if the pool is.
    pub fn sample(&mut self, k: usize, rng: &mut Rng) -> Vec<(Id, Option<Arc<ItemFeatures>>)> {
        if self.ids.is_empty() {
            return Vec::new();
        }
        if matches!(self.distribution, NegativeDistribution::Uniform) {
            return (0..k)
                .map(|_| {
                    let i = rng.below(self.ids.len());
                    (self.ids[i].clone(), self.features[i].clone())
                })
                .collect();
        }
        self.build_alias();
        let alias = self.alias.as_ref().expect("built above");
        (0..k)
            .map(|_| {
                let i = alias.sample(rng);
                (self.ids[i].clone(), self.features[i].clone())
            })
            .collect()
    }

    fn build_alias(&mut self) {
        if self.alias.is_none() {
            let w: Vec<f64> = (0..self.ids.len()).map(|i| self.weight(i)).collect();
            self.total_weight = w.iter().sum();
            self.alias = Some(Alias::new(&w));
        }
    }

    /// The probability that one draw of [`Self::sample`] is `id` (the proposal `q` of the
    /// sampled-softmax correction). An item outside the pool gets the probability its click
    /// count would give it, so a positive's correction is never infinite; 0 for an empty pool.
    pub fn proposal(&mut self, id: &Id) -> f64 {
        if self.ids.is_empty() {
            return 0.0;
        }
        if matches!(self.distribution, NegativeDistribution::Uniform) {
            return 1.0 / self.ids.len() as f64;
        }
        self.build_alias();
        self.weight_of(id) / self.total_weight
    }

    /// Draws `k` items uniformly (mixed negatives), whatever the configured distribution.
    pub fn sample_uniform(&self, k: usize, rng: &mut Rng) -> Vec<(Id, Option<Arc<ItemFeatures>>)> {
        if self.ids.is_empty() {
            return Vec::new();
        }
        (0..k)
            .map(|_| {
                let i = rng.below(self.ids.len());
                (self.ids[i].clone(), self.features[i].clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_table_matches_weights() {
        let w = [1.0, 2.0, 7.0];
        let a = Alias::new(&w);
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..100_000 {
            counts[a.sample(&mut rng)] += 1;
        }
        for (c, w) in counts.iter().zip(w) {
            let p = *c as f64 / 100_000.0;
            assert!((p - w / 10.0).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn popularity_shapes_the_draws() {
        let mut pool = ItemPool::new(NegativeDistribution::Popularity075);
        for _ in 0..999 {
            pool.record_click(&Id::new("hot"), None);
        }
        pool.record_click(&Id::new("cold"), None);
        let mut rng = Rng::new(2);
        let hot = pool
            .sample(10_000, &mut rng)
            .iter()
            .filter(|(i, _)| i.as_str() == "hot")
            .count();
        // weights 1000^0.75 ≈ 177.8 vs 2^0.75 ≈ 1.68: hot ≈ 99%.
        assert!(hot > 9800, "{hot}");
        assert_eq!(pool.total_clicks(), 1000);
    }

    #[test]
    fn the_shared_catalogue_syncs_the_pool_like_the_plain_one_and_only_on_change() {
        use crate::event::{Dense, ItemEvent, Op};
        let item = |id: &str, op: Op| ItemEvent {
            event_id: format!("{id}-{op:?}"),
            event_time_ms: 1,
            item_id: Id::new(id),
            op,
            title: None,
            category: None,
            genres: Vec::new(),
            dense: Dense::new(),
        };
        let shared: SharedCatalog = Arc::default();
        let (mut a, mut b) = (
            ItemPool::new(NegativeDistribution::Uniform),
            ItemPool::new(NegativeDistribution::Uniform),
        );
        for (id, op) in [
            ("z", Op::Upsert),
            ("a", Op::Upsert),
            ("m", Op::Upsert),
            ("a", Op::Delete),
        ] {
            shared.write().unwrap().apply_item(&item(id, op));
            a.sync(&shared.read().unwrap());
            b.sync_shared(&shared);
            assert_eq!(a.ids, b.ids);
            assert_eq!(a.catalog_version, b.catalog_version);
        }
        // Followed change by change: z, a, m appended, a's slot taken by the last (m).
        assert_eq!(b.ids, [Id::new("z"), Id::new("m")]);
        // Unchanged catalogue: nothing rebuilt (the sampling tables stay).
        b.alias = Some(Alias::new(&[1.0, 1.0]));
        b.sync_shared(&shared);
        assert!(b.alias.is_some());
    }

    #[test]
    fn the_pool_follows_catalogue_changes_in_place_and_rebuilds_when_the_journal_is_short() {
        use crate::event::{Dense, ItemEvent, Op};
        let item = |id: String, op: Op, t: i64| ItemEvent {
            event_id: String::new(),
            event_time_ms: t,
            item_id: Id::new(id),
            op,
            title: None,
            category: Some(format!("c{t}")),
            genres: vec![],
            dense: Dense::new(),
        };
        let mut c = Catalog::default();
        let mut pool = ItemPool::new(NegativeDistribution::Uniform);
        let mut rng = Rng::new(3);
        for t in 0..2_000i64 {
            let id = format!("i{}", rng.below(300));
            let op = if rng.below(4) == 0 {
                Op::Delete
            } else {
                Op::Upsert
            };
            c.apply_item(&item(id, op, t));
            if t % 7 == 0 {
                pool.sync(&c);
            }
        }
        pool.sync(&c);
        // The same items, with the catalogue's current features, as a fresh rebuild has.
        let mut fresh = ItemPool::new(NegativeDistribution::Uniform);
        fresh.sync(&c);
        let mut followed = pool.ids.clone();
        followed.sort();
        assert_eq!(followed, fresh.ids);
        for (i, id) in pool.ids.iter().enumerate() {
            assert_eq!(pool.index[id], i);
            assert_eq!(pool.features[i], c.item(id));
        }
        // More changes than the journal keeps: the pool rebuilds, and is right again.
        let before = c.version();
        let mut far_behind = ItemPool::new(NegativeDistribution::Uniform);
        far_behind.sync(&c);
        for t in 0..(crate::catalog::ITEM_JOURNAL as i64 + 10) {
            c.apply_item(&item(format!("n{}", t % 500), Op::Upsert, 10_000 + t));
        }
        assert!(c.item_changes_since(before).is_none());
        far_behind.sync(&c);
        let mut fresh = ItemPool::new(NegativeDistribution::Uniform);
        fresh.sync(&c);
        assert_eq!(far_behind.ids, fresh.ids, "rebuilt: sorted");
        assert_eq!(far_behind.len(), c.item_count());
    }
}
