//! Ranking metrics for one held-out target per user: Hit@K, Recall@K, Precision@K, NDCG@K, MRR.

use std::collections::BTreeMap;

/// The cut-offs reported by default (the article uses 100).
pub const DEFAULT_KS: [usize; 3] = [10, 50, 100];

/// MRR counts a target only within this many results (as a top-100 recall list would).
pub const MRR_CUTOFF: usize = 100;

/// Averages over users, by name (`recall@100`, `ndcg@10`, `mrr`, `users`), each with its
/// standard error over users under `<name>_se`.
pub type MetricTable = BTreeMap<String, f64>;

/// Summarises 0-based ranks of each user's target (`None`: not ranked at all, e.g. missed by
/// an ANN search). With one target per user Hit@K equals Recall@K.
pub fn summarize(ranks: &[Option<usize>], ks: &[usize]) -> MetricTable {
    let n = ranks.len().max(1) as f64;
    let mut t = MetricTable::new();
    // Mean and its standard error (sample standard deviation / √n) of a per-user value.
    let mut mean_se = |name: String, per_user: Vec<f64>| {
        let mean = per_user.iter().sum::<f64>() / n;
        let var = per_user.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        t.insert(format!("{name}_se"), (var / n).sqrt());
        t.insert(name, mean);
    };
    for &k in ks {
        let hit: Vec<f64> = ranks
            .iter()
            .map(|r| f64::from(u8::from(r.is_some_and(|r| r < k))))
            .collect();
        let ndcg: Vec<f64> = ranks
            .iter()
            .map(|r| match r {
                Some(r) if *r < k => 1.0 / ((r + 2) as f64).log2(),
                _ => 0.0,
            })
            .collect();
        let precision: Vec<f64> = hit.iter().map(|h| h / k as f64).collect();
        mean_se(format!("hit@{k}"), hit.clone());
        mean_se(format!("recall@{k}"), hit);
        mean_se(format!("precision@{k}"), precision);
        mean_se(format!("ndcg@{k}"), ndcg);
    }
    let rr: Vec<f64> = ranks
        .iter()
        .map(|r| match r {
            Some(r) if *r < MRR_CUTOFF => 1.0 / (r + 1) as f64,
            _ => 0.0,
        })
        .collect();
    mean_se("mrr".into(), rr);
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
        // Recall@10 of [1, 1, 0, 0]: sample sd √(1/3), se = √(1/3) / 2.
        assert!((t["recall@10_se"] - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }

    #[test]
    fn rank_skips_excluded_items() {
        let scores = [0.9, 0.1, 0.5, 0.7];
        assert_eq!(rank_of(&scores, 2, |_| false), 2);
        assert_eq!(rank_of(&scores, 2, |j| j == 0), 1);
        assert_eq!(rank_of(&scores, 0, |_| false), 0);
    }
}
