//! Exact search over a catalogue's *distinct* vectors.
//!
//! A large catalogue embeds to far fewer vectors than it has items: an item without an id
//! row of its own (never clicked, not admitted, beyond the id table's capacity) is its
//! features alone, and shares its tower input — hence its vector — with every item of the
//! same features ([`embed_catalogue`](crate::refresh::embed_catalogue) runs the tower once
//! per distinct input). At a million items in the freshness bench some 70k vectors stand for
//! the whole catalogue. Scoring those 70k and handing out their items best first is exact
//! search of the million — recall 1, no links to build or to go stale, so every model version
//! is served as soon as it is embedded — at the cost of a scan of the distinct vectors only.
//!
//! Items of one vector tie; they are returned in key order.

use super::scan::{every_hit, Best};
use super::Hit;

/// Groups a search keeps per result asked for before handing out their items: room for the
/// filter to turn down items (the user's history, an exclude list) without a second scan.
pub(super) const CANDIDATES_PER_K: usize = 2;

/// The vectors of a catalogue stored once per distinct vector, with the items of each.
pub struct GroupedVectors {
    dim: usize,
    /// Distinct vectors, row `g` being group `g`.
    vectors: Vec<f32>,
    /// The group of every item (key).
    group_of: Vec<u32>,
    /// Members of group `g`: `members[starts[g]..starts[g + 1]]`, keys ascending.
    starts: Vec<u32>,
    members: Vec<u32>,
}

impl GroupedVectors {
    /// Groups from distinct `vectors` (`groups × dim`) and the group of each item.
    /// `None` when an item names a group that is not there, or the row count is not whole.
    pub fn new(vectors: Vec<f32>, group_of: Vec<u32>, dim: usize) -> Option<GroupedVectors> {
        let dim = dim.max(1);
        if !vectors.len().is_multiple_of(dim) || u32::try_from(group_of.len()).is_err() {
            return None;
        }
        let groups = vectors.len() / dim;
        if group_of.iter().any(|&g| g as usize >= groups) {
            return None;
        }
        let (starts, members) = buckets(&group_of, groups);
        Some(GroupedVectors {
            dim,
            vectors,
            group_of,
            starts,
            members,
        })
    }

    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Items (keys `0..len`).
    pub fn len(&self) -> usize {
        self.group_of.len()
    }

    /// True without items.
    pub fn is_empty(&self) -> bool {
        self.group_of.is_empty()
    }

    /// Distinct vectors: what a search scans.
    pub fn groups(&self) -> usize {
        self.vectors.len() / self.dim
    }

    /// The distinct vectors, `groups × dim`.
    pub fn distinct_rows(&self) -> &[f32] {
        &self.vectors
    }

    /// The group (row of [`Self::distinct_rows`]) of every item.
    pub fn group_of(&self) -> &[u32] {
        &self.group_of
    }

    /// The vector of item `key`.
    pub fn row(&self, key: u64) -> Option<&[f32]> {
        let g = *self.group_of.get(usize::try_from(key).ok()?)? as usize;
        self.vectors.get(g * self.dim..(g + 1) * self.dim)
    }

    /// Every item's vector, row i = key i.
    pub fn rows(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len() * self.dim);
        for &g in &self.group_of {
            let g = g as usize;
            out.extend_from_slice(&self.vectors[g * self.dim..(g + 1) * self.dim]);
        }
        out
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        4 * (self.vectors.len() + self.group_of.len() + self.starts.len() + self.members.len())
    }

    /// Exact top-`k` among keys `keep` accepts: every distinct vector scored, then their
    /// accepted items handed out best first ([`Self::hand_out`]).
    pub fn search(&self, query: &[f32], k: usize, keep: impl Fn(u64) -> bool) -> Vec<Hit> {
        if k == 0 || query.len() != self.dim {
            return Vec::new();
        }
        let mut best = Best::new(CANDIDATES_PER_K * k);
        best.offer_rows(&self.vectors, self.dim, query, |g| g as u64, |_| true);
        self.hand_out_best(best, k, &keep, || {
            every_hit(&self.vectors, self.dim, query, |g| g as u64)
        })
    }

    /// The best `k` accepted items of the groups `best` kept; when the filter turns down so
    /// many of their items that fewer than `k` remain and `best` may have dropped groups,
    /// hands out from `every_group()` (every candidate group scored) instead.
    pub(super) fn hand_out_best(
        &self,
        best: Best,
        k: usize,
        keep: &impl Fn(u64) -> bool,
        every_group: impl FnOnce() -> Vec<Hit>,
    ) -> Vec<Hit> {
        let may_have_dropped = best.dropped();
        let mut kept = best.into_sorted();
        let hits = self.hand_out(&mut kept, k, keep);
        if hits.len() < k && may_have_dropped {
            return self.hand_out(&mut every_group(), k, keep);
        }
        hits
    }

    /// The best `k` accepted items of the groups in `scored` (key: group, score: its vector's
    /// score): groups taken best first, `k` at a time, four times more each round, so a
    /// selective filter still fills `k` without sorting every group up front.
    pub fn hand_out(&self, scored: &mut [Hit], k: usize, keep: &impl Fn(u64) -> bool) -> Vec<Hit> {
        let mut hits = Vec::with_capacity(k);
        let (mut from, mut take) = (0, k);
        while hits.len() < k && from < scored.len() {
            let best = top_in_place(&mut scored[from..], take);
            for group in &scored[from..from + best] {
                let g = group.key as usize;
                let (a, b) = (self.starts[g] as usize, self.starts[g + 1] as usize);
                for &key in &self.members[a..b] {
                    if keep(u64::from(key)) {
                        hits.push(Hit {
                            key: u64::from(key),
                            score: group.score,
                        });
                        if hits.len() == k {
                            return hits;
                        }
                    }
                }
            }
            from += best;
            take = take.saturating_mul(4);
        }
        hits
    }
}

/// The members of each of `count` buckets, given the bucket of every member (each below
/// `count`): bucket `b` holds `members[starts[b]..starts[b + 1]]`, in ascending order (a
/// counting sort).
pub(super) fn buckets(bucket_of: &[u32], count: usize) -> (Vec<u32>, Vec<u32>) {
    let mut starts = vec![0u32; count + 1];
    for &b in bucket_of {
        starts[b as usize + 1] += 1;
    }
    for b in 0..count {
        starts[b + 1] += starts[b];
    }
    let mut next = starts.clone();
    let mut members = vec![0u32; bucket_of.len()];
    for (m, &b) in bucket_of.iter().enumerate() {
        members[next[b as usize] as usize] = m as u32;
        next[b as usize] += 1;
    }
    (starts, members)
}

/// Moves the best `n` of `hits` to its front, best first (ties by key), and returns how many
/// that is (`n`, or fewer when `hits` is shorter).
fn top_in_place(hits: &mut [Hit], n: usize) -> usize {
    let order = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key));
    let n = n.min(hits.len());
    if n == 0 {
        return 0;
    }
    if n < hits.len() {
        hits.select_nth_unstable_by(n - 1, order);
    }
    hits[..n].sort_by(order);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::brute_force;
    use crate::index::scan::dot;
    use crate::index::tests::unit_vectors;
    use crate::train::sampler::Rng;

    /// `n` items over `groups` distinct unit vectors, the group of each drawn at random.
    fn catalogue(n: usize, groups: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = Rng::new(seed);
        let group_of = (0..n).map(|_| rng.below(groups) as u32).collect();
        (unit_vectors(groups, dim, seed + 1), group_of)
    }

    /// The scores of `hits`, and whether every hit beats or ties the exact k-th score.
    fn same_answer(exact: &[Hit], got: &[Hit]) -> bool {
        exact.len() == got.len()
            && exact
                .iter()
                .zip(got)
                .all(|(e, g)| (e.score - g.score).abs() < 1e-6)
    }

    #[test]
    fn answers_exactly_like_a_scan_of_every_item() {
        let dim = 16;
        for (n, groups, k) in [
            (5_000, 300, 100),
            (5_000, 20, 100),
            (300, 300, 50),
            (40, 3, 100),
        ] {
            let (vectors, group_of) = catalogue(n, groups, dim, n as u64 + groups as u64);
            let grouped = GroupedVectors::new(vectors, group_of, dim).expect("valid groups");
            let rows = grouped.rows();
            for q in 0..20 {
                let query = &rows[q * dim..(q + 1) * dim];
                let exact = brute_force(&rows, dim, query, k, |_| true);
                let got = grouped.search(query, k, |_| true);
                assert!(
                    same_answer(&exact, &got),
                    "{n} items / {groups} groups, query {q}"
                );
                let keys: std::collections::HashSet<u64> = got.iter().map(|h| h.key).collect();
                assert_eq!(keys.len(), got.len(), "an item returned twice");
                for h in &got {
                    let own = grouped.row(h.key).map(|v| dot(v, query));
                    assert!(own.is_some_and(|s| (s - h.score).abs() < 1e-5), "{h:?}");
                }
            }
        }
    }

    #[test]
    fn a_selective_filter_still_fills_k_with_the_best_accepted_items() {
        let dim = 8;
        let (vectors, group_of) = catalogue(20_000, 500, dim, 7);
        let grouped = GroupedVectors::new(vectors, group_of, dim).expect("valid groups");
        let rows = grouped.rows();
        // One item in 500 passes: the accepted ones are spread over many groups, most of
        // them far down the order.
        let keep = |key: u64| key % 500 == 3;
        let query = &rows[..dim];
        let exact = brute_force(&rows, dim, query, 30, keep);
        let got = grouped.search(query, 30, keep);
        assert_eq!(got.len(), 30);
        assert!(same_answer(&exact, &got));
        assert!(got.iter().all(|h| keep(h.key)));
        // Fewer accepted than k: all of them.
        let rare = |key: u64| key < 7;
        assert_eq!(grouped.search(query, 30, rare).len(), 7);
    }

    #[test]
    fn the_rows_come_back_in_item_order_and_bad_groups_are_refused() {
        let grouped =
            GroupedVectors::new(vec![1.0, 0.0, 0.0, 1.0], vec![1, 0, 1], 2).expect("valid groups");
        assert_eq!(grouped.rows(), vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(grouped.groups(), 2);
        assert_eq!(grouped.row(2), Some(&[0.0, 1.0][..]));
        assert_eq!(grouped.row(3), None);
        assert!(GroupedVectors::new(vec![0.0; 8], vec![0, 2], 4).is_none());
        assert!(GroupedVectors::new(vec![0.0; 7], vec![0], 4).is_none());
    }
}
