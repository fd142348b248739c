//! Links that outlive model versions (`index.large_catalog = relink`).
//!
//! Above `index.exact_max_items` a generation's main index is a [`SharedGraph`]: HNSW links
//! over item positions, scored with the vectors of whichever model version searches them. A
//! new model version then costs one embedding pass over the catalogue ([`reembed`]) instead of
//! a graph build, so the served model stays seconds behind the trainer at a million items.
//!
//! The links were chosen for the vectors of the version they were built with; as the towers
//! move on, a walk finds fewer of the true neighbours. Every generation probes its own recall
//! against exact search of the same vectors ([`probe_recall`]), and the refresher rebuilds the
//! links in the background when it drops below `index.relink_below_recall`, or when the items
//! changed since the links were built (searched exactly on top, see
//! [`with_changes`](super::with_changes)) exceed `index.relink_above_changed` of them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::{embed_items, Generation, ModelSnapshot};
use crate::config::IndexConfig;
use crate::index::{brute_force, Hit, IndexError, ItemIndex};

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

/// `base`'s items embedded with `model`, walking `base`'s links: the main items as the linked
/// index, the items changed since it was linked (`base`'s delta) searched exactly on top, and
/// `base`'s hidden items still hidden — the catalogue at `base.catalog_version`, which the
/// caller brings up to date with [`with_changes`](super::with_changes). Dropping `base`'s
/// changes here would serve deleted items again under a catalogue version that says they are
/// gone. `None` when `base` holds no shared links.
pub fn reembed(
    base: &Generation,
    model: Arc<ModelSnapshot>,
    config: &IndexConfig,
) -> Option<Result<Generation, IndexError>> {
    let graph = base.index.shared_graph()?.clone();
    let started = Instant::now();
    let (main, changed) = base.items.split_at(base.main_len);
    let vectors = embed_items(&model, main, config.embed_batch);
    let delta = embed_items(&model, changed, config.embed_batch);
    let dim = model.towers.output_dim() as usize;
    let index = match ItemIndex::linked(graph, vectors, dim, config) {
        Ok(i) => i,
        Err(e) => return Some(Err(e)),
    };
    Some(Ok(Generation {
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
    }))
}

/// Recall@[`PROBE_K`] of `g`'s main index against exact search of the same vectors, over
/// `probes` queries: the vectors of main items spread evenly over the catalogue (an item's
/// neighbourhood is what a user near it is shown). `None` for an exact index or no probes.
pub fn probe_recall(g: &Generation, probes: usize) -> Option<f64> {
    let index = &g.index;
    if index.shared_graph().is_none() || probes == 0 || g.main_len == 0 {
        return None;
    }
    let vectors = index.vector_table()?;
    let dim = index.dim();
    let k = PROBE_K.min(g.main_len);
    let stride = (g.main_len / probes).max(1);
    let (mut found, mut wanted) = (0usize, 0usize);
    for position in (0..g.main_len).step_by(stride).take(probes) {
        let query = &vectors[position * dim..(position + 1) * dim];
        let exact = brute_force(vectors, dim, query, k, |_| true);
        let got = index.search(query, k, |_| true).ok()?;
        found += found_of(&exact, &got);
        wanted += exact.len();
    }
    (wanted > 0).then(|| found as f64 / wanted as f64)
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

/// Whether the links `g` walks (probed at `recall`) are due for a rebuild, and why. `None`
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
