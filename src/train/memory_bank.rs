//! Cross-batch negatives (Wang et al., SIGIR 2021; Merlin Models' cached negatives): the item
//! vectors of the last `train.memory_bank` positives, kept as constants and appended to the
//! in-batch softmax as further negatives.
//!
//! A streaming batch is small when traffic is thin (a trickle trains batches of a few clicks),
//! and an in-batch softmax over a handful of columns learns little per click. The bank gives
//! every step up to `capacity` more negatives for the cost of a matrix product, drawn from the
//! same stream of positives (so the estimator's correction applies to them too). Its vectors
//! are a few steps old; the paper finds that harmless once the embeddings drift slowly, which
//! is why the bank is small. It is not checkpointed: after a restart it refills within
//! `capacity / batch` steps.

use std::collections::VecDeque;

use tch::Tensor;

/// The most recent positives' item vectors and their estimator keys.
#[derive(Debug)]
pub struct MemoryBank {
    capacity: usize,
    /// One `[n, d]` block per step, oldest first (detached).
    blocks: VecDeque<(Tensor, Vec<i64>)>,
    len: usize,
    /// All blocks concatenated, built on demand.
    cached: Option<(Tensor, Vec<i64>)>,
}

impl MemoryBank {
    /// A bank of at most `capacity` vectors (0: off).
    pub fn new(capacity: usize) -> Self {
        MemoryBank {
            capacity,
            blocks: VecDeque::new(),
            len: 0,
            cached: None,
        }
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a step's positive item vectors `[n, d]` (detached here) with their keys, dropping
    /// the oldest blocks beyond the capacity.
    pub fn push(&mut self, vectors: &Tensor, keys: &[i64]) {
        if self.capacity == 0 || keys.is_empty() {
            return;
        }
        let keep = keys.len().min(self.capacity);
        let skip = keys.len() - keep;
        let block = vectors.narrow(0, skip as i64, keep as i64).detach().copy();
        self.blocks.push_back((block, keys[skip..].to_vec()));
        self.len += keep;
        while self.len > self.capacity {
            match self.blocks.pop_front() {
                Some((_, k)) => self.len -= k.len(),
                None => break,
            }
        }
        self.cached = None;
    }

    fn cache(&mut self) {
        if self.cached.is_none() && !self.blocks.is_empty() {
            let tensors: Vec<&Tensor> = self.blocks.iter().map(|(t, _)| t).collect();
            let keys = self
                .blocks
                .iter()
                .flat_map(|(_, k)| k.iter().copied())
                .collect();
            self.cached = Some((Tensor::cat(&tensors, 0), keys));
        }
    }

    /// Readies [`Self::vectors`] and [`Self::keys`] after pushes (call before reading).
    pub fn prepare(&mut self) {
        self.cache();
    }

    /// The vectors `[len, d]`, oldest first (after [`Self::prepare`]).
    pub fn vectors(&self) -> Option<&Tensor> {
        self.cached.as_ref().map(|(t, _)| t)
    }

    /// Their keys (`stable_hash` of the item id), in the same order.
    pub fn keys(&self) -> &[i64] {
        self.cached.as_ref().map_or(&[], |(_, k)| k.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn keeps_the_most_recent_vectors_up_to_its_capacity() {
        let mut bank = MemoryBank::new(6);
        for step in 0..4i64 {
            let v = Tensor::full([3, 2], step as f64, (Kind::Float, Device::Cpu));
            bank.push(&v, &[step * 10, step * 10 + 1, step * 10 + 2]);
        }
        bank.prepare();
        assert_eq!(
            bank.keys(),
            [20, 21, 22, 30, 31, 32],
            "the newest two steps"
        );
        let v = bank.vectors().unwrap();
        assert_eq!(v.size(), [6, 2]);
        assert_eq!(
            (v.double_value(&[0, 0]), v.double_value(&[5, 1])),
            (2.0, 3.0)
        );
        let mut off = MemoryBank::new(0);
        off.push(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu)), &[1, 2]);
        off.prepare();
        assert!(off.is_empty() && off.vectors().is_none());
    }
}
