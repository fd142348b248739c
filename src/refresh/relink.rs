//! A new model version over the same main items, and the recall probe that sets how deep
//! its searches go.
//!
//! Above `index.exact_max_items` (outside `rebuild`), a new model costs one embedding pass
//! over the catalogue ([`reembed`]) instead of a graph build; [`main_index`] then scans the
//! distinct vectors while they are few, splits them into lists for this version
//! (`clusters`), or walks the links an earlier version built (`relink`, [`SharedGraph`]:
//! HNSW links over item positions, scored with the vectors of whichever version searches
//! them).
//!
//! Lists and links are approximate. Lists are probed before they are served; links, whose
//! probe is slow, after the swap on a thread of their own ([`probe_and_tune`]): recall@100
//! against exact search of the same vectors, and searches go deeper while it falls short. The
//! links were chosen for the vectors of the version they were built with; as the towers move
//! on, a walk finds fewer of the true neighbours, and the refresher rebuilds them in the
//! background when the recall drops below `index.relink_below_recall` at the base depth, or
//! when the items changed since the links were built (searched exactly on top, see
//! [`with_changes`](super::with_changes)) exceed `index.relink_above_changed` of them.
//!
//! [`SharedGraph`]: crate::index::SharedGraph

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::{embed_catalogue, embed_items, main_index, FrozenModel, Generation, WithoutLinks};
use crate::config::IndexConfig;
use crate::index::{Hit, IndexError, ItemIndex};

/// Results compared per probe: the recall the README and the goal speak of.
pub const PROBE_K: usize = 100;

/// Why the links are rebuilt (the `cause` label of `towerstream_index_relinks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelinkCause {
    /// No links yet (start, or the catalogue grew past `exact_max_items`).
    First,
    /// The probed recall fell below `index.relink_below_recall`.
    Recall,
    /// Too many items changed since the links were built.
    Changes,
    /// Too many items that shared a node (one vector when linked) have moved apart: the model
    /// now tells them apart, so the graph should too.
    Spread,
}

impl RelinkCause {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RelinkCause::First => "first",
            RelinkCause::Recall => "recall",
            RelinkCause::Changes => "changes",
            RelinkCause::Spread => "spread",
        }
    }
}

/// `base`'s items embedded with `model`: the main items as a main index of their own
/// ([`main_index`]: their distinct vectors scanned while few, else `base`'s links walked with
/// the new vectors, else every item scanned until links are built), the items changed since
/// the main set was taken (`base`'s delta) searched exactly on top, and `base`'s hidden items
/// still hidden — the catalogue at `base.catalog_version`, which the caller brings up to date
/// with [`with_changes`](super::with_changes). Dropping `base`'s changes here would serve
/// deleted items again under a catalogue version that says they are gone.
pub fn reembed(
    base: &Generation,
    model: Arc<FrozenModel>,
    config: &IndexConfig,
) -> Result<Generation, IndexError> {
    let started = Instant::now();
    let (main, changed) = base.items.split_at(base.main_len);
    let main_pass = embed_catalogue(&model, main, config.embed_batch);
    tracing::debug!(
        distinct = main_pass.distinct_inputs(),
        embed_s = started.elapsed().as_secs_f64(),
        "main items embedded"
    );
    let distinct_inputs = main_pass.distinct_inputs();
    let delta = embed_items(&model, changed, config.embed_batch);
    let similarity = model.towers.similarity();
    let index = main_index(
        main_pass,
        Some(&base.index),
        WithoutLinks::Scan,
        similarity,
        config,
    )?;
    Ok(Generation {
        number: 0,
        model,
        main_len: base.main_len,
        items: base.items.clone(),
        keys: base.keys.clone(),
        index: Arc::new(index),
        facets: base.facets.clone(),
        delta,
        hidden: base.hidden.clone(),
        catalog_version: base.catalog_version,
        published_unix: 0.0,
        build_seconds: started.elapsed().as_secs_f64(),
        distinct_inputs: Some(distinct_inputs),
    })
}

/// What one probe of a generation's shared links measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Recall@[`PROBE_K`] at `index.expansion_per_k`: how stale the links are (what decides a
    /// relink).
    pub at_base: f64,
    /// Recall@[`PROBE_K`] at `depth_per_k`, what the generation serves now.
    pub served: f64,
    /// The depth chosen: the shallowest tried (doubling from the base, at most
    /// `index.max_expansion_per_k`) that reaches `index.relink_below_recall`, else the deepest.
    pub depth_per_k: f64,
}

/// Probes the shared links of `index` (a generation's main index) and sets the search depth
/// it serves at (see [`Probe`]): the
/// exact answers of `config.recall_probes` queries are computed once and compared with walks
/// at the base depth, the depth `index` serves at, and, moving one step a probe, one level deeper
/// (recall short of the target) or shallower (the target met). Stale links so cost deeper
/// searches, not wrong answers, until the relink they ask for lands. `None` for an index
/// without shared links or without probes.
pub fn probe_and_tune(index: &ItemIndex, config: &IndexConfig) -> Option<Probe> {
    let samples = ProbeSamples::of(index, config.recall_probes)?;
    let base = config.expansion_per_k;
    let max = config.max_expansion_per_k.max(base);
    let target = config.relink_below_recall;
    let at_base = samples.recall(index, base)?;
    let mut depth = index.expansion_per_k().clamp(base, max);
    let mut served = if depth == base {
        at_base
    } else {
        samples.recall(index, depth)?
    };
    if served < target {
        // Deeper until the target is met or the cap reached: a few doublings at most.
        while served < target && depth < max {
            depth = (depth * 2.0).min(max);
            served = samples.recall(index, depth)?;
        }
    } else if depth > base {
        let shallower = (depth / 2.0).max(base);
        let r = samples.recall(index, shallower)?;
        if r >= target {
            (depth, served) = (shallower, r);
        }
    }
    index.set_expansion_per_k(depth);
    index.set_probed_recall(served);
    Some(Probe {
        at_base,
        served,
        depth_per_k: depth,
    })
}

/// Probe queries with their exact answers: the vectors of main items spread evenly over the
/// catalogue (an item's neighbourhood is what a user near it is shown).
struct ProbeSamples {
    queries: Vec<Vec<f32>>,
    exact: Vec<Vec<Hit>>,
    k: usize,
}

impl ProbeSamples {
    fn of(index: &ItemIndex, probes: usize) -> Option<ProbeSamples> {
        let len = index.len();
        if !index.is_probed() || probes == 0 || len == 0 {
            return None;
        }
        let k = PROBE_K.min(len);
        let stride = (len / probes).max(1);
        let queries: Vec<Vec<f32>> = (0..len)
            .step_by(stride)
            .take(probes)
            .filter_map(|p| index.row(p as u64))
            .collect();
        let exact = queries
            .iter()
            .map(|q| index.exact_search(q, k))
            .collect::<Result<_, _>>()
            .ok()?;
        Some(ProbeSamples { queries, exact, k })
    }

    /// Recall of `index`'s walks at `per_k` candidates per result.
    fn recall(&self, index: &ItemIndex, per_k: f64) -> Option<f64> {
        let (mut found, mut wanted) = (0usize, 0usize);
        for (query, exact) in self.queries.iter().zip(&self.exact) {
            let got = index.search_at_depth(query, self.k, per_k, |_| true).ok()?;
            found += found_of(exact, &got);
            wanted += exact.len();
        }
        (wanted > 0).then(|| found as f64 / wanted as f64)
    }
}

/// How many of `got` belong in the exact top `exact.len()`: a hit counts when it is one of the
/// exact hits or scores as high as the exact k-th (items tied with it are as right as the
/// ones exact search happened to keep — an untrained item tower gives thousands of items the
/// same vector, and counting keys alone read recall 0.01 for a graph that found them).
fn found_of(exact: &[Hit], got: &[Hit]) -> usize {
    let Some(kth) = exact.last().map(|h| h.score) else {
        return 0;
    };
    let keys: HashSet<u64> = exact.iter().map(|h| h.key).collect();
    let tol = 1e-5 * kth.abs().max(1.0);
    got.iter()
        .filter(|h| keys.contains(&h.key) || h.score >= kth - tol)
        .count()
        .min(exact.len())
}

/// Whether the links `g` walks (probed at `recall`, at the base depth) are due for a rebuild,
/// and why. `None`
/// for a generation without shared links: there is nothing to rebuild, and the refresher
/// links such a catalogue first anyway.
pub fn relink_due(
    g: &Generation,
    recall: Option<f64>,
    config: &IndexConfig,
) -> Option<RelinkCause> {
    let links = g.index.shared_graph()?;
    if recall.is_some_and(|r| r < config.relink_below_recall) {
        return Some(RelinkCause::Recall);
    }
    let share = |n: usize| n as f64 > config.relink_above_changed * g.main_len.max(1) as f64;
    if share(g.delta_len() + g.hidden.len()) {
        return Some(RelinkCause::Changes);
    }
    // An untrained item tower gives every item one vector (a single node); as it learns, the
    // items spread and are found only through their old node: a scan of the group, exact but
    // slow, which the recall probe cannot see.
    let vectors = g.index.vector_table()?;
    if share(links.spread_members(vectors)) {
        return Some(RelinkCause::Spread);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::SharedGraph;
    use crate::train::sampler::Rng;

    fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut v: Vec<f32> = (0..n * dim).map(|_| rng.next_f64() as f32 - 0.5).collect();
        for row in v.chunks_exact_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[test]
    fn stale_links_are_searched_deeper_until_the_probe_meets_the_target_and_fresh_ones_shallower() {
        let (n, dim) = (4000, 16);
        let config = IndexConfig {
            connectivity: 8,
            expansion_search: 16,
            expansion_per_k: 1.0,
            max_expansion_per_k: 16.0,
            relink_below_recall: 0.95,
            recall_probes: 16,
            ..IndexConfig::default()
        };
        let old = unit_vectors(n, dim, 1);
        let links = Arc::new(SharedGraph::build(&old, dim, &config).unwrap());
        // The model moved on: each item's vector is half its old one, half something new, so
        // the old links are a poor map of the new neighbourhoods.
        let new: Vec<f32> = old
            .iter()
            .zip(unit_vectors(n, dim, 2))
            .map(|(a, b)| a + b)
            .collect();
        let stale = ItemIndex::linked(links.clone(), new.clone(), dim, &config).unwrap();
        let first = probe_and_tune(&stale, &config).unwrap();
        assert!(first.at_base < 0.95, "{first:?}");
        assert!(
            first.depth_per_k > 1.0 && first.served > first.at_base,
            "{first:?}"
        );
        assert_eq!(stale.expansion_per_k(), first.depth_per_k);
        // Probing again keeps a depth that meets the target (or the cap).
        let again = probe_and_tune(&stale, &config).unwrap();
        eprintln!("stale links: {first:?} then {again:?}");
        assert!(
            again.served >= 0.95 || again.depth_per_k == 16.0,
            "{again:?}"
        );
        // Links built for the vectors searched: one step shallower per probe, back to the base.
        let fresh_links = Arc::new(SharedGraph::build(&new, dim, &config).unwrap());
        let fresh = ItemIndex::linked(fresh_links, new, dim, &config).unwrap();
        fresh.set_expansion_per_k(again.depth_per_k);
        let mut depth = again.depth_per_k;
        for _ in 0..5 {
            let p = probe_and_tune(&fresh, &config).unwrap();
            assert!(p.depth_per_k <= depth, "{p:?}");
            depth = p.depth_per_k;
        }
        assert!(depth < again.depth_per_k, "{depth}");
    }

    fn hits(h: &[(u64, f32)]) -> Vec<Hit> {
        h.iter().map(|&(key, score)| Hit { key, score }).collect()
    }

    #[test]
    fn an_item_tied_with_the_exact_kth_counts_as_found() {
        let exact = hits(&[(0, 0.9), (1, 0.5), (2, 0.5)]);
        // 5 ties with the third; 6 scores lower and is a miss.
        assert_eq!(found_of(&exact, &hits(&[(0, 0.9), (5, 0.5), (6, 0.4)])), 2);
        assert_eq!(found_of(&exact, &hits(&[(2, 0.5), (1, 0.5), (0, 0.9)])), 3);
        assert_eq!(found_of(&[], &hits(&[(1, 0.5)])), 0);
    }
}
