//! Inverted lists over a catalogue's distinct vectors, redone for every model version.
//!
//! HNSW links are chosen for the vectors of one model version; an online model moves every
//! vector a little with each step, the links go stale, and recall falls between rebuilds
//! that take a minute at a million items (probed recall@100 0.6–0.86 in the freshness bench,
//! whatever the search depth: items that got a vector of their own after the links were built
//! are reachable only through the node they shared). Here the vectors are split into about
//! √n / 4 lists by spherical k-means — warm-started from the previous version's centroids, so a
//! couple of Lloyd iterations on a sample follow the drift — and every vector is assigned to
//! its nearest centroid with one matrix product: a fraction of a second per version, so the
//! lists are never older than the vectors. A search scores the centroids, scans the vectors of
//! the best lists exactly, and hands out their items best first (the inverted-file index of
//! FAISS; ByteDance's Streaming VQ re-assigns items to clusters as they stream in).
//!
//! How many lists a search scans follows the index's depth: `per_k / LISTS_PER_DEPTH` of them
//! (at the default depth of 2, 1/16 of the lists; at the deepest, 16, half), tuned by the
//! recall probe each version gets before it is served.

use tch::Tensor;

use super::grouped::{buckets, CANDIDATES_PER_K};
use super::scan::{every_hit, Best};
use super::{GroupedVectors, Hit};

/// At search depth `d` (candidates per result), `d / LISTS_PER_DEPTH` of the lists are scanned
/// for a top [`TUNED_K`].
pub const LISTS_PER_DEPTH: f64 = 32.0;

/// The `k` the recall probe tunes the depth at (its top 100).
pub const TUNED_K: usize = 100;

/// Lists are `√n / LIST_SHARE`: the assignment costs `n × lists × dim` multiply-adds, 2.7 s
/// per version at √n lists and 380k vectors on one core of this machine, and a search scans
/// the same share of the vectors at a given depth however many lists there are (at the
/// default depth the probed recall@100 was 0.99–1.0 with √n lists in the freshness bench).
/// Fewer, longer lists keep the share scanned and cost a quarter to assign.
const LIST_SHARE: f64 = 4.0;

/// Lloyd iterations of a start without centroids, and of each later version (warm start).
const COLD_ITERATIONS: usize = 8;
const WARM_ITERATIONS: usize = 2;

/// Vectors per list the centroids are fitted on (a sample; every vector is then assigned).
const SAMPLE_PER_LIST: usize = 64;

/// Rows assigned per matrix product (bounds the `rows × lists` score matrix in memory).
const ASSIGN_CHUNK: i64 = 32_768;

/// A catalogue's distinct vectors split into lists around centroids.
pub struct ClusteredVectors {
    grouped: GroupedVectors,
    /// `lists × dim`.
    centroids: Vec<f32>,
    /// Groups of list `l`: `members[starts[l]..starts[l + 1]]`.
    starts: Vec<u32>,
    members: Vec<u32>,
    /// The distinct vectors in `members` order, so a list is scanned as one contiguous block
    /// (through `members` every row would be a cache miss of its own).
    by_list: Vec<f32>,
}

impl ClusteredVectors {
    /// Clusters `grouped`'s distinct vectors into about √n / 4 lists, starting from `previous`
    /// centroids (`lists × dim`, a former version's) when their width matches.
    pub fn build(grouped: GroupedVectors, previous: Option<&[f32]>) -> ClusteredVectors {
        let dim = grouped.dim();
        let n = grouped.groups();
        if n == 0 {
            return ClusteredVectors {
                grouped,
                centroids: Vec::new(),
                starts: vec![0],
                members: Vec::new(),
                by_list: Vec::new(),
            };
        }
        let lists = ((n as f64).sqrt() / LIST_SHARE).round() as usize;
        let lists = lists.clamp(1, 4096).min(n);
        let _guard = tch::no_grad_guard();
        let x = Tensor::from_slice(grouped.distinct_rows()).view([n as i64, dim as i64]);
        let warm = previous.filter(|c| c.len() == lists * dim);
        let (mut centroids, iterations) = match warm {
            Some(c) => (
                Tensor::from_slice(c).view([lists as i64, dim as i64]),
                WARM_ITERATIONS,
            ),
            None => (spread_rows(&x, lists), COLD_ITERATIONS),
        };
        let sample = spread_rows(&x, (lists * SAMPLE_PER_LIST).min(n));
        for _ in 0..iterations {
            centroids = lloyd_step(&sample, &centroids);
        }
        let list_of = assign(&x, &centroids).to_kind(tch::Kind::Int);
        let list_of: Vec<i32> = Vec::try_from(&list_of).unwrap_or_default();
        let list_of: Vec<u32> = list_of.iter().map(|&l| l as u32).collect();
        let centroids: Vec<f32> =
            Vec::try_from(centroids.contiguous().view([-1])).unwrap_or_default();
        let (starts, members) = buckets(&list_of, lists);
        ClusteredVectors::assemble(grouped, centroids, starts, members)
    }

    /// Lists and their groups as sent to a replica: `centroids` (`lists × dim`) and the list
    /// of every group. `None` when they do not fit `grouped`.
    pub fn from_parts(
        grouped: GroupedVectors,
        centroids: Vec<f32>,
        list_of_group: &[u32],
    ) -> Option<ClusteredVectors> {
        let dim = grouped.dim();
        let lists = centroids.len() / dim.max(1);
        if lists * dim != centroids.len()
            || list_of_group.len() != grouped.groups()
            || list_of_group.iter().any(|&l| l as usize >= lists)
        {
            return None;
        }
        let (starts, members) = buckets(list_of_group, lists);
        Some(ClusteredVectors::assemble(
            grouped, centroids, starts, members,
        ))
    }

    fn assemble(
        grouped: GroupedVectors,
        centroids: Vec<f32>,
        starts: Vec<u32>,
        members: Vec<u32>,
    ) -> ClusteredVectors {
        let (dim, rows) = (grouped.dim(), grouped.distinct_rows());
        let mut by_list = Vec::with_capacity(members.len() * dim);
        for &g in &members {
            let g = g as usize;
            by_list.extend_from_slice(&rows[g * dim..(g + 1) * dim]);
        }
        ClusteredVectors {
            grouped,
            centroids,
            starts,
            members,
            by_list,
        }
    }

    /// The distinct vectors and their items.
    pub fn grouped(&self) -> &GroupedVectors {
        &self.grouped
    }

    /// The centroids, `lists × dim`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Lists.
    pub fn lists(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// The list of every group (row of the distinct vectors).
    pub fn list_of_group(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.grouped.groups()];
        for l in 0..self.lists() {
            for &g in &self.members[self.starts[l] as usize..self.starts[l + 1] as usize] {
                out[g as usize] = l as u32;
            }
        }
        out
    }

    /// Lists scanned for a top `k` at `per_k` candidates per result: `per_k / LISTS_PER_DEPTH`
    /// of them for the top [`TUNED_K`] the probe tunes the depth for, proportionally more for a
    /// larger `k` (a top 1000 from the lists that hold a top 100 finds about half of it).
    pub fn lists_scanned(&self, per_k: f64, k: usize) -> usize {
        let lists = self.lists();
        let share = per_k / LISTS_PER_DEPTH * (k as f64 / TUNED_K as f64).max(1.0);
        ((lists as f64 * share).ceil() as usize).clamp(1, lists.max(1))
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.grouped.memory_bytes()
            + 4 * (self.centroids.len()
                + self.starts.len()
                + self.members.len()
                + self.by_list.len())
    }

    /// Top-`k` among keys `keep` accepts, scanning the vectors of the lists whose centroids
    /// score best (`per_k` and `k` say how many, see [`Self::lists_scanned`]). When the
    /// filter leaves
    /// fewer than `k` items in them, every distinct vector is scanned instead (exact), so a
    /// filter never returns fewer than the catalogue has.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        per_k: f64,
        keep: impl Fn(u64) -> bool,
    ) -> Vec<Hit> {
        let dim = self.grouped.dim();
        if k == 0 || query.len() != dim {
            return Vec::new();
        }
        let mut lists = every_hit(&self.centroids, dim, query, |l| l as u64);
        let scanned = self.lists_scanned(per_k, k).min(lists.len());
        if scanned < lists.len() {
            lists.select_nth_unstable_by(scanned - 1, |a, b| b.score.total_cmp(&a.score));
        }
        let lists = &lists[..scanned];
        let mut best = Best::new(CANDIDATES_PER_K * k);
        for list in lists {
            let (rows, members) = self.list(list.key as usize);
            best.offer_rows(rows, dim, query, |i| u64::from(members[i]), |_| true);
        }
        let hits = self.grouped.hand_out_best(best, k, &keep, || {
            let mut every = Vec::new();
            for list in lists {
                let (rows, members) = self.list(list.key as usize);
                every.extend(every_hit(rows, dim, query, |i| u64::from(members[i])));
            }
            every
        });
        if hits.len() < k && scanned < self.lists() {
            return self.grouped.search(query, k, keep);
        }
        hits
    }

    /// The vectors of list `l` and their groups.
    fn list(&self, l: usize) -> (&[f32], &[u32]) {
        let (a, b) = (self.starts[l] as usize, self.starts[l + 1] as usize);
        let dim = self.grouped.dim();
        (&self.by_list[a * dim..b * dim], &self.members[a..b])
    }
}

/// `count` rows of `x` spread evenly over it (the initial centroids, and the fitting sample).
fn spread_rows(x: &Tensor, count: usize) -> Tensor {
    let n = x.size()[0];
    let count = (count as i64).clamp(1, n.max(1));
    let picks: Vec<i64> = (0..count).map(|i| i * n / count).collect();
    x.index_select(0, &Tensor::from_slice(&picks))
}

/// The nearest centroid (by inner product) of every row of `x`.
fn assign(x: &Tensor, centroids: &Tensor) -> Tensor {
    let t = centroids.tr();
    let parts: Vec<Tensor> = x
        .split(ASSIGN_CHUNK, 0)
        .iter()
        .map(|chunk| chunk.matmul(&t).argmax(1, false))
        .collect();
    Tensor::cat(&parts, 0)
}

/// One iteration of spherical k-means on `sample`: each centroid becomes the normalised sum
/// of the rows nearest to it (an empty list keeps its centroid).
fn lloyd_step(sample: &Tensor, centroids: &Tensor) -> Tensor {
    let lists = centroids.size()[0];
    let nearest = assign(sample, centroids);
    let sums = centroids.zeros_like().index_add(0, &nearest, sample);
    let counts = nearest.bincount::<Tensor>(None, lists).unsqueeze(1);
    let norms = sums
        .norm_scalaropt_dim(2, [1].as_slice(), true)
        .clamp_min(1e-12);
    sums.divide(&norms).where_self(&counts.gt(0), centroids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::brute_force;
    use crate::train::sampler::Rng;

    /// `n` unit vectors around `centres` random centres (embedding-like: clustered, noisy).
    fn clustered(n: usize, centres: usize, dim: usize, noise: f32, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut gauss = || (rng.next_f64() as f32 - 0.5) * 2.0;
        let c: Vec<f32> = (0..centres * dim).map(|_| gauss()).collect();
        let mut v = Vec::with_capacity(n * dim);
        for i in 0..n {
            let centre = &c[(i % centres) * dim..(i % centres + 1) * dim];
            let row: Vec<f32> = centre.iter().map(|x| x + noise * gauss()).collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.extend(row.iter().map(|x| x / norm));
        }
        v
    }

    fn grouped(rows: Vec<f32>, dim: usize) -> GroupedVectors {
        let n = (rows.len() / dim) as u32;
        GroupedVectors::new(rows, (0..n).collect(), dim).expect("one group per row")
    }

    /// Recall@k of the lists against a scan of every vector, over `queries` of the rows.
    fn recall(c: &ClusteredVectors, rows: &[f32], dim: usize, k: usize, per_k: f64) -> f64 {
        let (mut found, mut wanted) = (0, 0);
        for q in (0..rows.len() / dim).step_by(97).take(40) {
            let query = &rows[q * dim..(q + 1) * dim];
            let exact = brute_force(rows, dim, query, k, |_| true);
            let kth = exact.last().map_or(f32::MIN, |h| h.score);
            let got = c.search(query, k, per_k, |_| true);
            found += got.iter().filter(|h| h.score >= kth - 1e-6).count().min(k);
            wanted += exact.len();
        }
        found as f64 / wanted as f64
    }

    #[test]
    fn scanning_more_lists_finds_more_and_all_of_them_is_exact() {
        let dim = 16;
        let rows = clustered(20_000, 200, dim, 0.6, 5);
        let c = ClusteredVectors::build(grouped(rows.clone(), dim), None);
        assert_eq!(c.lists(), 35);
        let shallow = recall(&c, &rows, dim, 100, 2.0);
        let deep = recall(&c, &rows, dim, 100, 16.0);
        let all = recall(&c, &rows, dim, 100, LISTS_PER_DEPTH);
        assert!(shallow <= deep, "{shallow} then {deep}");
        assert!(deep >= 0.95, "half the lists found {deep}");
        assert!(all > 0.9999, "every list scanned found {all}");
    }

    #[test]
    fn a_larger_k_scans_more_lists() {
        let dim = 16;
        let rows = clustered(20_000, 200, dim, 0.6, 5);
        let c = ClusteredVectors::build(grouped(rows.clone(), dim), None);
        // At depth 2, 1/16 of the 35 lists hold about 1,700 vectors: half of a top 1000 (0.55
        // when only the vectors scanned followed k, 2 × k of them).
        let deep_enough = recall(&c, &rows, dim, 1000, 2.0);
        assert!(deep_enough >= 0.95, "recall@1000 {deep_enough}");
    }

    #[test]
    fn warm_started_lists_follow_vectors_that_moved() {
        let dim = 16;
        let before = clustered(20_000, 40, dim, 0.6, 5);
        let first = ClusteredVectors::build(grouped(before, dim), None);
        // The next version moved every vector (another draw of the noise around new
        // centres): lists fitted to the old vectors lose recall; warm-started ones do not.
        let after = clustered(20_000, 40, dim, 0.6, 9);
        let stale = ClusteredVectors::from_parts(
            grouped(after.clone(), dim),
            first.centroids().to_vec(),
            &first.list_of_group(),
        )
        .expect("same shapes");
        let fresh = ClusteredVectors::build(grouped(after.clone(), dim), Some(first.centroids()));
        let (stale_recall, fresh_recall) = (
            recall(&stale, &after, dim, 100, 8.0),
            recall(&fresh, &after, dim, 100, 8.0),
        );
        assert!(
            fresh_recall >= 0.95,
            "warm-started lists found {fresh_recall}"
        );
        assert!(
            stale_recall < 0.5,
            "lists of the old version found {stale_recall}"
        );
    }

    #[test]
    fn sent_lists_answer_like_the_built_ones_and_bad_parts_are_refused() {
        let dim = 8;
        let rows = clustered(3_000, 30, dim, 0.5, 3);
        let built = ClusteredVectors::build(grouped(rows.clone(), dim), None);
        let sent = ClusteredVectors::from_parts(
            grouped(rows.clone(), dim),
            built.centroids().to_vec(),
            &built.list_of_group(),
        )
        .expect("same shapes");
        for q in [0, 500, 2999] {
            let query = &rows[q * dim..(q + 1) * dim];
            assert_eq!(
                built.search(query, 50, 2.0, |_| true),
                sent.search(query, 50, 2.0, |_| true)
            );
        }
        let lists = built.lists() as u32;
        assert!(
            ClusteredVectors::from_parts(grouped(rows.clone(), dim), vec![0.0; 7], &[]).is_none()
        );
        assert!(ClusteredVectors::from_parts(
            grouped(rows, dim),
            built.centroids().to_vec(),
            &vec![lists; 3_000]
        )
        .is_none());
    }

    #[test]
    fn a_filter_the_scanned_lists_cannot_fill_falls_back_to_every_vector() {
        let dim = 8;
        let rows = clustered(5_000, 50, dim, 0.3, 4);
        let c = ClusteredVectors::build(grouped(rows.clone(), dim), None);
        let keep = |key: u64| key % 1000 == 1;
        let got = c.search(&rows[..dim], 5, 2.0, keep);
        let exact = brute_force(&rows, dim, &rows[..dim], 5, keep);
        assert_eq!(got.len(), 5);
        assert_eq!(
            got.iter().map(|h| h.key).collect::<Vec<_>>(),
            exact.iter().map(|h| h.key).collect::<Vec<_>>()
        );
    }
}
