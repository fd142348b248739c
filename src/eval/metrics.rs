//! Ranking metrics for one held-out target per user: Hit@K, Recall@K, Precision@K, NDCG@K, MRR.

use std::collections::BTreeMap;

/// The cut-offs reported by default (the article uses 100).
pub const DEFAULT_KS: [usize; 3] = [10, 50, 100];

/// MRR counts a target only within this many results (as a top-100 recall list would).
pub const MRR_CUTOFF: usize = 100;

/// Averages over users, by name (`recall@100`, `ndcg@10`, `mrr`, `users`).
pub type MetricTable = BTreeMap<String, f64>;

/// Summarises 0-based ranks of each user's target (`None`: not ranked at all, e.g. missed by
/// an ANN search). With one target per user Hit@K equals Recall@K.
pub fn summarize(ranks: &[Option<usize>], ks: &[usize]) -> MetricTable {
    let n = ranks.len().max(1) as f64;
    let mut t = MetricTable::new();
    for &k in ks {
        let hits = ranks.iter().filter(|r| r.is_some_and(|r| r < k)).count() as f64;
        let ndcg: f64 = ranks
            .iter()
            .flatten()
            .filter(|&&r| r < k)
            .map(|&r| 1.0 / ((r + 2) as f64).log2())
            .sum();
        t.insert(format!("hit@{k}"), hits / n);
        t.insert(format!("recall@{k}"), hits / n);
        t.insert(format!("precision@{k}"), hits / n / k as f64);
        t.insert(format!("ndcg@{k}"), ndcg / n);
    }
    let mrr: f64 = ranks
        .iter()
        .flatten()
        .filter(|&&r| r < MRR_CUTOFF)
        .map(|&r| 1.0 / (r + 1) as f64)
        .sum();
    t.insert("mrr".into(), mrr / n);
    t.insert("users".into(), ranks.len() as f64);
    t
}

/// 0-based rank of `target` among `scores`, skipping `excluded` indices: the number of
/// candidates scoring strictly higher.
pub fn rank_of(scores: &[f32], target: usize, excluded: impl Fn(usize) -> bool) -> usize {
    let s = scores[target];
    scores
        .iter()
        .enumerate()
        .filter(|&(j, &x)| j != target && x > s && !excluded(j))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_known_ranks() {
        // Ranks 0, 4, 60, missed.
        let t = summarize(&[Some(0), Some(4), Some(60), None], &[10, 100]);
        assert_eq!(t["recall@10"], 0.5);
        assert_eq!(t["recall@100"], 0.75);
        assert_eq!(t["precision@10"], 0.05);
        let ndcg10 = (1.0 + 1.0 / 6f64.log2()) / 4.0;
        assert!((t["ndcg@10"] - ndcg10).abs() < 1e-12);
        let mrr = (1.0 + 0.2 + 1.0 / 61.0) / 4.0;
        assert!((t["mrr"] - mrr).abs() < 1e-12);
        assert_eq!(t["users"], 4.0);
    }

    #[test]
    fn rank_skips_excluded_items() {
        let scores = [0.9, 0.1, 0.5, 0.7];
        assert_eq!(rank_of(&scores, 2, |_| false), 2);
        assert_eq!(rank_of(&scores, 2, |j| j == 0), 1);
        assert_eq!(rank_of(&scores, 0, |_| false), 0);
    }
}
