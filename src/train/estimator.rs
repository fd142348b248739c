//! Streaming frequency estimation (Yi et al., RecSys 2019, Algorithms 2 and 3).
//!
//! For each item `y` seen at time `t`, with `m` hash functions into `H` buckets:
//! `B[h(y)] ← (1 − α)·B[h(y)] + α·(t − A[h(y)])`, then `A[h(y)] ← t`. The estimated
//! probability of `y` is `p̂ = 1 / max_k B_k[h_k(y)]` (collisions only shorten observed gaps, so
//! the largest gap is the least biased).
//!
//! **The clock is the stream of positives** ([`FrequencyEstimator::observe`] ticks once per
//! positive), so `p̂` is the probability that a positive is `y`, whatever the batch sizes.
//! The paper's clock is the training step with a fixed batch size; a streaming batch holds
//! anything from one click (a trickle) to thousands (a burst), and a step clock would make
//! `p̂` follow the traffic's rhythm instead of the item's popularity. The probability that `y`
//! is among a batch of `b` positives is then `min(1, b·p̂)` ([`FrequencyEstimator::in_batch`]).
//!
//! Two deviations from the paper, both for the items a streaming system is for:
//! * a bucket's first observed gap initialises `B` directly instead of being averaged into
//!   `B = 0` (faster warm-up);
//! * **a prior for items without an estimate.** The paper's `B = 0` start reports `p̂ = 1` for
//!   an item not seen twice — no correction at all, as if it were the most popular item. Here
//!   such an item gets the *mean gap over all positives* (an EMA of every observed gap), which
//!   is the number of items in circulation, so a fresh item counts as an average one: `E[1/p]`
//!   over positives is the support size. An item seen once long ago gets the time since,
//!   when that is longer. Before any gap is known the prior is `1/t`.

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::hash::stable_hash;

/// Estimator parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EstimatorParams {
    /// Buckets per hash function (H).
    pub buckets: usize,
    /// Hash functions (m); 1 is Algorithm 2, more is Algorithm 3.
    pub hashes: usize,
    /// Learning rate α of the gap average.
    pub alpha: f32,
}

/// The estimator state: `A` (last step seen) and `B` (average gap) per hash and bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrequencyEstimator {
    params: EstimatorParams,
    /// Last step each bucket was seen at; −1 before the first sighting.
    last_step: Vec<i64>,
    /// Average gap in positives; 0 until the second sighting.
    gap: Vec<f32>,
    /// Positives observed ([`Self::observe`]): the clock.
    clock: i64,
    /// EMA of every observed gap (all items, first hash function): the prior gap.
    mean_gap: f32,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser: decorrelates the m hash functions derived from one FNV hash.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FrequencyEstimator {
    /// A fresh estimator. Panics on zero buckets or hashes (rejected by config validation).
    pub fn new(params: EstimatorParams) -> Self {
        assert!(
            params.buckets > 0 && params.hashes > 0,
            "estimator needs H, m > 0"
        );
        let n = params.buckets * params.hashes;
        FrequencyEstimator {
            params,
            last_step: vec![-1; n],
            gap: vec![0.0; n],
            clock: 0,
            mean_gap: 0.0,
        }
    }

    /// The parameters.
    pub fn params(&self) -> EstimatorParams {
        self.params
    }

    fn slot(&self, key: u64, k: usize) -> usize {
        let h = mix(key.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        k * self.params.buckets + (h % self.params.buckets as u64) as usize
    }

    /// Positives observed so far.
    pub fn clock(&self) -> i64 {
        self.clock
    }

    /// Records one positive of `key`: the clock ticks, then the item's gap is updated.
    pub fn observe(&mut self, key: u64) {
        self.clock += 1;
        self.update(key, self.clock);
    }

    /// Records that `key` occurred at time `step` of an explicit clock (tests and callers with
    /// a clock of their own; the trainer uses [`Self::observe`]).
    pub fn update(&mut self, key: u64, step: i64) {
        let alpha = self.params.alpha;
        self.clock = self.clock.max(step);
        for k in 0..self.params.hashes {
            let s = self.slot(key, k);
            let last = self.last_step[s];
            if last >= 0 && step > last {
                let delta = (step - last) as f32;
                if k == 0 {
                    self.mean_gap = if self.mean_gap == 0.0 {
                        delta
                    } else {
                        (1.0 - alpha) * self.mean_gap + alpha * delta
                    };
                }
                self.gap[s] = if self.gap[s] == 0.0 {
                    delta
                } else {
                    (1.0 - alpha) * self.gap[s] + alpha * delta
                };
            }
            if step > last {
                self.last_step[s] = step;
            }
        }
    }

    /// p̂(key): 1 / the largest average gap over the hash functions; for an item without
    /// one, 1 / the prior gap (see the module doc). Always in `(0, 1]`.
    pub fn probability(&self, key: u64) -> f32 {
        let (mut max_gap, mut last_seen) = (0.0f32, -1i64);
        for k in 0..self.params.hashes {
            let s = self.slot(key, k);
            max_gap = max_gap.max(self.gap[s]);
            last_seen = last_seen.max(self.last_step[s]);
        }
        if max_gap == 0.0 {
            let prior = if self.mean_gap > 0.0 {
                self.mean_gap
            } else {
                self.clock as f32
            };
            let since = if last_seen >= 0 {
                (self.clock - last_seen) as f32
            } else {
                0.0
            };
            max_gap = prior.max(since);
        }
        1.0 / max_gap.max(1.0)
    }

    /// The expected number of copies of `key` among `positives` positives: `n·p̂` (the
    /// correction of a column drawn with replacement, like a sampled softmax's `k·q`).
    pub fn expected(&self, key: u64, positives: usize) -> f32 {
        positives as f32 * self.probability(key)
    }

    /// The probability that `key` is among `positives` positives of one batch: `min(1, b·p̂)`.
    pub fn in_batch(&self, key: u64, positives: usize) -> f32 {
        self.expected(key, positives).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(params: EstimatorParams, target: u64, steps: i64, others: &[u64]) -> f32 {
        let mut e = FrequencyEstimator::new(params);
        for t in 0..steps {
            if t % 50 == 0 {
                e.update(target, t);
            }
            // Every other item occurs every 3 steps: frequent collisions shorten gaps.
            for (i, o) in others.iter().enumerate() {
                if (t + i as i64) % 3 == 0 {
                    e.update(*o, t);
                }
            }
        }
        e.probability(target)
    }

    #[test]
    fn an_item_every_50_steps_is_estimated_at_0_02() {
        let params = EstimatorParams {
            buckets: 1 << 16,
            hashes: 1,
            alpha: 0.01,
        };
        let p = run(params, stable_hash(b"item-42"), 20_000, &[]);
        assert!((p - 0.02).abs() / 0.02 < 0.10, "p̂ = {p}");
    }

    #[test]
    fn multi_hash_beats_single_hash_under_forced_collisions() {
        let target = stable_hash(b"target");
        let single_params = EstimatorParams {
            buckets: 64,
            hashes: 1,
            alpha: 0.01,
        };
        let multi_params = EstimatorParams {
            buckets: 64,
            hashes: 4,
            alpha: 0.01,
        };
        // Busy items chosen to share the target's bucket under the first hash function (the
        // one both estimators use): the single-hash estimate cannot escape the collision.
        let probe = FrequencyEstimator::new(single_params);
        let others: Vec<u64> = (0..)
            .map(|i| stable_hash(format!("busy-{i}").as_bytes()))
            .filter(|k| probe.slot(*k, 0) == probe.slot(target, 0))
            .take(2)
            .collect();
        let single = run(single_params, target, 20_000, &others);
        let multi = run(multi_params, target, 20_000, &others);
        let err = |p: f32| (p - 0.02).abs();
        assert!(
            single > 0.1,
            "the collision makes the target look frequent: {single}"
        );
        assert!(err(multi) < err(single), "multi {multi} vs single {single}");
        assert!(
            err(multi) / 0.02 < 0.10,
            "multi-hash recovers the true rate: {multi}"
        );
    }

    #[test]
    fn an_unseen_item_is_corrected_like_an_average_item_not_like_the_most_popular() {
        let mut e = FrequencyEstimator::new(EstimatorParams {
            buckets: 1 << 16,
            hashes: 2,
            alpha: 0.01,
        });
        assert_eq!(e.probability(1), 1.0, "nothing seen: p̂ = 1/t = 1");
        // 100 items clicked uniformly: each gap is about 100 positives.
        let items: Vec<u64> = (0..100u64).map(|i| stable_hash(&i.to_le_bytes())).collect();
        for round in 0..50 {
            for (i, key) in items.iter().enumerate() {
                if (i + round) % 2 == 0 || round > 10 {
                    e.observe(*key);
                }
            }
        }
        let fresh = stable_hash(b"fresh item");
        let p = e.probability(fresh);
        assert!(
            (p - 0.01).abs() < 0.003,
            "a fresh item gets the mean rate, 1/100: {p}"
        );
        // Seen once, then not for 1,000 positives: rarer than average.
        e.observe(fresh);
        for _ in 0..10 {
            for key in &items {
                e.observe(*key);
            }
        }
        let p = e.probability(fresh);
        assert!(p < 0.0015, "seen once 1,000 positives ago: {p}");
    }

    #[test]
    fn the_clock_is_the_positive_stream_not_the_batch() {
        // An item that is one positive in 20, arriving in batches of 1 to 200 positives.
        let mut e = FrequencyEstimator::new(EstimatorParams {
            buckets: 1 << 16,
            hashes: 1,
            alpha: 0.01,
        });
        let target = stable_hash(b"target");
        let mut n = 0u64;
        for batch in 0..400 {
            let size = if batch % 2 == 0 { 1 } else { 200 };
            for _ in 0..size {
                n += 1;
                let key = if n.is_multiple_of(20) {
                    target
                } else {
                    stable_hash(&n.to_le_bytes())
                };
                e.observe(key);
            }
        }
        let p = e.probability(target);
        assert!((p - 0.05).abs() / 0.05 < 0.1, "p̂ = {p}, truth 0.05");
        assert!((e.in_batch(target, 10) - 0.5).abs() < 0.05);
        assert_eq!(e.in_batch(target, 1000), 1.0);
    }
}
