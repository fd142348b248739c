//! The main index's items by category and genre, so that a selective filter is answered
//! exactly over its own items instead of by walking the graph.
//!
//! usearch's filtered search keeps walking until it has `k` accepted results, so its cost
//! grows as the filter's share shrinks: at 100k items a filter passing 1 % of them takes
//! 21 ms (p50) where exact search over all 100k takes 1.2 ms, and a category with no items
//! walks the whole graph. With the keys of each facet at hand, a facet of at most
//! `index.filtered_exact_max` items is scored exactly over just those — the plan a vector
//! database's query planner makes from a filter's cardinality.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::ItemFeatures;

/// Main-index keys of every category and genre value, built with the main index and shared by
/// the deltas built on it (their own items are few and checked directly).
#[derive(Debug, Default)]
pub struct Facets {
    keys: HashMap<String, Vec<u64>>,
    exact_max: usize,
}

impl Facets {
    /// The facets of `items` (key = position); facets of at most `exact_max` items are
    /// searched exactly.
    pub fn new(items: &[Arc<ItemFeatures>], exact_max: usize) -> Facets {
        let mut keys: HashMap<String, Vec<u64>> = HashMap::new();
        for (i, f) in items.iter().enumerate() {
            let key = i as u64;
            if let Some(c) = &f.category {
                keys.entry(c.clone()).or_default().push(key);
            }
            for g in f.genres.iter().filter(|g| f.category.as_ref() != Some(*g)) {
                keys.entry(g.clone()).or_default().push(key);
            }
        }
        Facets { keys, exact_max }
    }

    /// The main keys of `facet` when it is small enough to search exactly (empty for a facet
    /// no main item has); `None` when the graph is the better plan.
    pub fn small(&self, facet: &str) -> Option<&[u64]> {
        match self.keys.get(facet) {
            None => Some(&[]),
            Some(k) if k.len() <= self.exact_max => Some(k),
            Some(_) => None,
        }
    }

    /// Items of `facet` in the main index.
    pub fn len_of(&self, facet: &str) -> usize {
        self.keys.get(facet).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, category: Option<&str>, genres: &[&str]) -> Arc<ItemFeatures> {
        ItemFeatures::for_test(id, category, genres)
    }

    #[test]
    fn small_facets_list_their_keys_and_large_ones_go_to_the_graph() {
        let items = vec![
            item("a", Some("g1"), &["g1", "g2"]),
            item("b", Some("g2"), &[]),
            item("c", None, &["g2"]),
        ];
        let f = Facets::new(&items, 2);
        assert_eq!(f.small("g1"), Some(&[0u64][..]));
        assert_eq!(
            f.len_of("g2"),
            3,
            "category and genre both count, once per item"
        );
        assert_eq!(f.small("g2"), None, "3 items > exact_max 2: the graph");
        assert_eq!(
            f.small("nothing"),
            Some(&[][..]),
            "no item: nothing to walk"
        );
    }
}
