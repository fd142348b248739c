//! Streaming frequency estimation (Yi et al., RecSys 2019, Algorithms 2 and 3).
//!
//! For each item `y` seen at global step `t`, with `m` hash functions into `H` buckets:
//! `B[h(y)] ← (1 − α)·B[h(y)] + α·(t − A[h(y)])`, then `A[h(y)] ← t`. The estimated
//! probability that `y` lands in a batch is `p̂ = 1 / max_k B_k[h_k(y)]` (collisions only
//! shorten observed gaps, so the largest gap is the least biased).
//!
//! One deviation from the paper, for faster warm-up: a bucket's first observed gap
//! initialises `B` directly instead of being averaged into `B = 0`. A bucket never seen twice
//! has no estimate and reports `p̂ = 1` (no correction).

use serde::{Deserialize, Serialize};

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
    /// Average gap in steps; 0 until the second sighting.
    gap: Vec<f32>,
}

/// 64-bit FNV-1a, stable across runs and platforms (estimator state is checkpointed).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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

    /// Records that `key` occurred at global step `step`. Call once per distinct item per
    /// batch (the estimate is "probability of being in a batch").
    pub fn update(&mut self, key: u64, step: i64) {
        let alpha = self.params.alpha;
        for k in 0..self.params.hashes {
            let s = self.slot(key, k);
            let last = self.last_step[s];
            if last >= 0 && step > last {
                let delta = (step - last) as f32;
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

    /// p̂(key): 1 / the largest average gap over the hash functions; 1 when unknown.
    pub fn probability(&self, key: u64) -> f32 {
        let max_gap = (0..self.params.hashes)
            .map(|k| self.gap[self.slot(key, k)])
            .fold(0.0f32, f32::max);
        if max_gap <= 1.0 {
            1.0
        } else {
            1.0 / max_gap
        }
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
    fn unseen_items_are_not_corrected() {
        let e = FrequencyEstimator::new(EstimatorParams {
            buckets: 8,
            hashes: 2,
            alpha: 0.01,
        });
        assert_eq!(e.probability(1), 1.0);
    }
}
