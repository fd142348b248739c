//! A step's objective per mode: which item columns each user is scored against, the
//! corrections of their logits, and the masks and weights that keep a positive from being
//! trained as its own negative. The losses themselves are in [`super::loss`].
//!
//! | mode | columns | correction | masked / weight 0 |
//! |---|---|---|---|
//! | in-batch softmax | the batch's positives, mixed uniform negatives, the memory bank | `log min(1, b·p̂)`; mixed `log(M/N)`; bank `log(size·p̂)` per copy | the same item as the row's positive; other positives of the row's user (`mask_same_user`) |
//! | sampled softmax | the positive, then k sampled | `log(k·q)` under the sampler | a sample equal to the positive |
//! | BPR | the positive and one sampled | — | a sample equal to the positive |
//! | point-wise BCE | positives (1), shown (0, weighted by examination if asked), k sampled (0) | — | a sample equal to the positive |
//!
//! Every correction is scaled by `train.logq_strength` and off with `sbc_correction = false`.

use std::sync::Arc;

use tch::{Device, Tensor};

use super::estimator::FrequencyEstimator;
use super::loss;
use super::memory_bank::MemoryBank;
use super::sampler::ItemPool;
use crate::catalog::ItemFeatures;
use crate::config::{Mode, Reward, TrainConfig};
use crate::event::Id;
use crate::example::TrainingExample;
use crate::hash::stable_hash;

/// What one step scores: its examples and the negatives drawn for it.
pub(crate) struct Objective<'a> {
    /// Training settings.
    pub config: &'a TrainConfig,
    /// The batch's positives (rows of `u` and the first columns of `v`, in this order).
    pub positives: &'a [&'a TrainingExample],
    /// `stable_hash` of each positive's item id (the estimator's keys), in the same order.
    pub item_keys: &'a [i64],
    /// Shown-not-clicked examples (point-wise mode), after the positives in `u` and `v`.
    pub shown: &'a [&'a TrainingExample],
    /// The weight of each shown example (`train.shown_weighting`).
    pub shown_weights: &'a [f32],
    /// Sampled negatives, after the positives and shown items in `v`.
    pub sampled: &'a [(Id, Option<Arc<ItemFeatures>>)],
    /// Temperature.
    pub tau: f64,
    /// Where the tensors live.
    pub device: Device,
}

fn reward(r: Reward, e: &TrainingExample) -> f32 {
    match r {
        Reward::None => 1.0,
        Reward::LogDwell => 1.0 + (e.dwell_ms.unwrap_or(0) as f32 / 1000.0).ln_1p(),
    }
}

impl Objective<'_> {
    /// The loss of `mode` for user vectors `u` and item vectors `v`.
    pub fn loss(
        &self,
        mode: Mode,
        u: &Tensor,
        v: &Tensor,
        estimator: &FrequencyEstimator,
        pool: &mut ItemPool,
        bank: &MemoryBank,
    ) -> Tensor {
        match mode {
            Mode::InBatchSoftmax => self.in_batch(u, v, estimator, pool, bank),
            Mode::SampledSoftmax => self.sampled_softmax(u, v, pool),
            Mode::PairwiseBpr => self.pairwise(u, v),
            Mode::PointwiseBce => self.pointwise(u, v),
        }
    }

    fn strength(&self) -> f32 {
        if self.config.sbc_correction {
            self.config.logq_strength as f32
        } else {
            0.0
        }
    }

    fn tensor<T: tch::kind::Element>(&self, values: &[T]) -> Tensor {
        Tensor::from_slice(values).to(self.device)
    }

    /// YoutubeSBC: every positive against the batch's other positives, the mixed negatives
    /// and the memory bank's recent item vectors (constants, no gradient).
    fn in_batch(
        &self,
        u: &Tensor,
        v: &Tensor,
        estimator: &FrequencyEstimator,
        pool: &ItemPool,
        bank: &MemoryBank,
    ) -> Tensor {
        let (b, strength) = (self.positives.len(), self.strength());
        let mut keys: Vec<i64> = Vec::with_capacity(b + self.sampled.len() + bank.len());
        let mut log_q: Vec<f32> = Vec::with_capacity(keys.capacity());
        for key in self.item_keys {
            keys.push(*key);
            log_q.push(strength * estimator.in_batch(*key as u64, b).ln());
        }
        // Drawn with replacement: an item's expected number of copies is M/N, which may
        // exceed 1 in a small catalogue (each copy is corrected by it, like the bank's).
        let q_mixed = self.sampled.len() as f32 / pool.len().max(1) as f32;
        for (id, _) in self.sampled {
            keys.push(stable_hash(id.as_bytes()) as i64);
            log_q.push(strength * q_mixed.ln());
        }
        // The bank holds one column per recent positive, so a popular item fills many of
        // them: each copy is corrected by the item's expected number of copies, `size·p̂`
        // (uncapped, as a sampled softmax's `k·q`), or popular items are pushed down once
        // per copy.
        for key in bank.keys() {
            keys.push(*key);
            log_q.push(strength * estimator.expected(*key as u64, bank.len()).ln());
        }
        let columns = match bank.vectors() {
            Some(old) => Tensor::cat(&[v.shallow_clone(), old.to(self.device)], 0),
            None => v.shallow_clone(),
        };
        let keys = self.tensor(&keys);
        let mut mask = loss::accidental_hits(&keys.narrow(0, 0, b as i64), &keys);
        if self.config.mask_same_user {
            mask = mask.logical_or(&self.same_user(columns.size()[0]));
        }
        let r: Vec<f32> = (self.positives.iter())
            .map(|e| reward(self.config.reward, e))
            .collect();
        loss::in_batch_softmax(
            u,
            &columns,
            &self.tensor(&log_q),
            &mask,
            &self.tensor(&r),
            self.tau,
        )
    }

    /// YoutubeDNN: the positive against its k samples, corrected by their expected counts.
    fn sampled_softmax(&self, u: &Tensor, v: &Tensor, pool: &mut ItemPool) -> Tensor {
        let (b, k) = (self.positives.len(), self.config.sampled_negatives);
        let strength = f64::from(self.strength());
        let expected = |q: f64| (strength * (k as f64 * q).ln()) as f32;
        let mut log_q = Vec::with_capacity(b * (1 + k));
        for (i, e) in self.positives.iter().enumerate() {
            log_q.push(expected(pool.proposal(&e.item_id)));
            for (id, _) in &self.sampled[i * k..(i + 1) * k] {
                log_q.push(expected(pool.proposal(id)));
            }
        }
        let (b, k, d) = (b as i64, k as i64, u.size()[1]);
        loss::sampled_softmax(
            u,
            &v.narrow(0, 0, b),
            &v.narrow(0, b, b * k).view([b, k, d]),
            &self.tensor(&log_q).view([b, 1 + k]),
            &self.tensor(&self.sampled_hits()).view([b, k]),
            self.tau,
        )
    }

    /// FacebookDSSM: the positive against one sample.
    fn pairwise(&self, u: &Tensor, v: &Tensor) -> Tensor {
        let b = self.positives.len() as i64;
        loss::pairwise_bpr(
            u,
            &v.narrow(0, 0, b),
            &v.narrow(0, b, b),
            &self.tensor(&self.not_hits()),
            self.tau,
        )
    }

    /// DSSM: positives labelled 1, shown and sampled items 0.
    fn pointwise(&self, u: &Tensor, v: &Tensor) -> Tensor {
        let (b, s) = (self.positives.len(), self.shown.len());
        let k = self.config.sampled_negatives as i64;
        let repeated = u
            .narrow(0, 0, b as i64)
            .repeat_interleave_self_int(k, 0, None);
        let users = Tensor::cat(&[u.shallow_clone(), repeated], 0);
        let mut labels = vec![0f32; b + s + self.sampled.len()];
        labels[..b].fill(1.0);
        let mut weights = vec![1f32; b];
        weights.extend((0..s).map(|i| self.shown_weights.get(i).copied().unwrap_or(1.0)));
        weights.extend(self.not_hits());
        loss::pointwise_bce(
            &users,
            v,
            &self.tensor(&labels),
            &self.tensor(&weights),
            self.tau,
        )
    }

    /// `[B, N]`: true where column `j < B` is another positive of row `i`'s user.
    fn same_user(&self, n: i64) -> Tensor {
        let b = self.positives.len();
        let users: Vec<i64> = (self.positives.iter())
            .map(|e| stable_hash(e.user_id.as_bytes()) as i64)
            .collect();
        let users = self.tensor(&users);
        let same = loss::accidental_hits(&users, &users);
        if n == b as i64 {
            return same;
        }
        let rest = Tensor::zeros([b as i64, n - b as i64], (tch::Kind::Bool, self.device));
        Tensor::cat(&[same, rest], 1)
    }

    /// Accidental hits of the sampled negatives: entry `i·k + j` is true when the `j`-th
    /// sample drawn for positive `i` is that positive's item.
    fn sampled_hits(&self) -> Vec<bool> {
        let k = (self.sampled.len() / self.positives.len().max(1)).max(1);
        (self.sampled.iter().enumerate())
            .map(|(n, (id, _))| self.positives.get(n / k).is_some_and(|e| e.item_id == *id))
            .collect()
    }

    /// Weight 1 for a sample that is a negative, 0 for an accidental hit.
    fn not_hits(&self) -> Vec<f32> {
        self.sampled_hits()
            .iter()
            .map(|h| f32::from(u8::from(!h)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::{Label, Origin};

    fn click(user: &str, item: &str) -> TrainingExample {
        TrainingExample {
            label: Label::Click { joined: false },
            user_id: Id::new(user),
            item_id: Id::new(item),
            user: None,
            item: None,
            event_time_ms: 1,
            dwell_ms: None,
            position: None,
            origin: Origin {
                topic: 0,
                partition: 0,
                offset: 0,
                epoch: 0,
            },
        }
    }

    #[test]
    fn same_user_masks_a_rows_other_clicks_of_its_user_and_nothing_beyond_the_batch() {
        let config = TrainConfig::default();
        let clicks = [click("a", "x"), click("a", "y"), click("b", "z")];
        let positives: Vec<&TrainingExample> = clicks.iter().collect();
        let objective = Objective {
            config: &config,
            positives: &positives,
            item_keys: &[],
            shown: &[],
            shown_weights: &[],
            sampled: &[],
            tau: 0.2,
            device: Device::Cpu,
        };
        let mask = objective.same_user(5);
        let rows: Vec<Vec<bool>> = (0..3)
            .map(|i| (0..5).map(|j| mask.int64_value(&[i, j]) != 0).collect())
            .collect();
        assert_eq!(
            rows,
            [
                [false, true, false, false, false],
                [true, false, false, false, false],
                [false, false, false, false, false],
            ]
        );
    }
}
