//! An HNSW graph that outlives model versions: the graph stores only each item's position
//! (8 bytes per node), and a custom usearch metric reads the vectors from a table the caller
//! passes with each search. A new model version brings a new table — embedding the catalogue,
//! seconds at 1M items — and keeps the links; they are rebuilt in the background only when
//! the recall they give has drifted.
//!
//! This is the candidate of the freshness issue ("keep the HNSW links and swap in each
//! version's vectors"), measured by `cargo bench --bench serve -- --shared-graph`: how much
//! recall a graph linked for one version keeps when searched with the vectors of a later one,
//! and what the indirect metric costs per search.
//!
//! The metric is one closure for the graph's lifetime, so the table and the query reach it
//! through this thread's [`Scope`]: usearch computes every distance of a search or an add on
//! the calling thread, and the scope is set for exactly that call.

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use super::{err, Hit, IndexError, SEARCH_THREADS};
use crate::config::IndexConfig;

/// The position that stands for the query in a search.
const QUERY: u64 = u64::MAX;

thread_local! {
    /// The vectors (row-major, `dim` wide) and query of the search or add running on this
    /// thread; null outside one.
    static SCOPE: Cell<(*const f32, usize, usize, *const f32)> =
        const { Cell::new((std::ptr::null(), 0, 0, std::ptr::null())) };
}

/// Sets this thread's table and query for one usearch call, and clears them after it.
struct Scope;

impl Scope {
    fn enter(table: &[f32], dim: usize, query: &[f32]) -> Scope {
        SCOPE.with(|s| {
            s.set((
                table.as_ptr(),
                table.len() / dim.max(1),
                dim,
                query.as_ptr(),
            ))
        });
        Scope
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        SCOPE.with(|s| s.set((std::ptr::null(), 0, 0, std::ptr::null())));
    }
}

fn position(payload: *const u8) -> u64 {
    // SAFETY: usearch hands the metric pointers to stored or query vectors of the index's
    // 8 dimensions (one byte each), which is how positions are stored and queried.
    let bytes = unsafe { std::slice::from_raw_parts(payload, 8) };
    u64::from_le_bytes(bytes.try_into().unwrap_or([0xff; 8]))
}

/// Inner-product distance `1 − ⟨a, b⟩` between two positions (or a position and the query).
fn distance(a: *const u8, b: *const u8) -> f32 {
    SCOPE.with(|s| {
        let (table, rows, dim, query) = s.get();
        if table.is_null() {
            return 1.0; // outside a scope (never, by construction): a neutral distance
        }
        let row = |p: u64| -> Option<&[f32]> {
            if p == QUERY {
                // SAFETY: the scope's query is `dim` long and outlives the call.
                Some(unsafe { std::slice::from_raw_parts(query, dim) })
            } else if (p as usize) < rows {
                // SAFETY: in bounds of the scope's table, which outlives the call.
                Some(unsafe { std::slice::from_raw_parts(table.add(p as usize * dim), dim) })
            } else {
                None
            }
        };
        match (row(position(a)), row(position(b))) {
            (Some(x), Some(y)) => 1.0 - super::dot(x, y),
            _ => 2.0,
        }
    })
}

/// Width of the grid that decides which vectors are one node (per component, unit vectors):
/// far below the distance between items a model tells apart, far above float noise.
const SAME_VECTOR: f32 = 1e-4;

/// Score margin within which members of a later node may still beat the k-th hit collected
/// (members sit within [`SAME_VECTOR`] of their node in each component).
const MEMBER_SLACK: f32 = 1e-3;

/// A graph over item positions `0..len`, searched with any version's vectors.
///
/// Items whose vectors were the same when the links were built share one node: the
/// representative is linked, the others are its members, scored one by one when it is found.
/// A catalogue has many such items (never-clicked ones share the id table's unknown row and
/// differ only by a few shared features), and HNSW links near-duplicates to each other and to
/// little else, so without this the graph falls apart into islands — probed recall@100 0.02 at
/// 150k items in the freshness bench.
pub struct SharedGraph {
    graph: Index,
    dim: usize,
    len: usize,
    /// Representative position → the other positions it stands for.
    members: HashMap<u64, Vec<u64>>,
}

/// What [`SharedGraph::to_bytes`] writes.
#[derive(Serialize, Deserialize)]
struct Stored {
    graph: Vec<u8>,
    len: u64,
    members: Vec<(u64, Vec<u64>)>,
}

/// The grid cell of a vector: equal for vectors the same up to [`SAME_VECTOR`].
fn cell(row: &[f32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for x in row {
        ((x / SAME_VECTOR).round() as i64).hash(&mut h);
    }
    h.finish()
}

/// An empty graph of 8-byte position payloads, measured by [`distance`].
fn new_graph(c: &IndexConfig) -> Result<Index, IndexError> {
    let mut graph = Index::new(&IndexOptions {
        dimensions: 8,
        metric: MetricKind::L2sq, // replaced below; only the storage width matters
        quantization: ScalarKind::U8,
        connectivity: c.connectivity,
        expansion_add: c.expansion_add,
        expansion_search: c.expansion_search,
        multi: false,
    })
    .map_err(err)?;
    graph.change_metric::<u8>(Box::new(distance));
    Ok(graph)
}

impl SharedGraph {
    /// Links `vectors` (`n × dim`, row i = position i) with one writer, one node per distinct
    /// vector.
    pub fn build(vectors: &[f32], dim: usize, c: &IndexConfig) -> Result<SharedGraph, IndexError> {
        let graph = new_graph(c)?;
        let n = vectors.len() / dim.max(1);
        let mut node_of_cell: HashMap<u64, u64> = HashMap::new();
        let mut members: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut nodes = Vec::new();
        for (i, row) in vectors.chunks_exact(dim.max(1)).enumerate() {
            match node_of_cell.entry(cell(row)) {
                Entry::Occupied(e) => members.entry(*e.get()).or_default().push(i as u64),
                Entry::Vacant(e) => {
                    e.insert(i as u64);
                    nodes.push(i as u64);
                }
            }
        }
        graph
            .reserve_capacity_and_threads(nodes.len().max(1), SEARCH_THREADS)
            .map_err(err)?;
        let query = vec![0f32; dim];
        let _scope = Scope::enter(vectors, dim, &query);
        for i in nodes {
            graph.add(i, &i.to_le_bytes()).map_err(err)?;
        }
        Ok(SharedGraph {
            graph,
            dim,
            len: n,
            members,
        })
    }

    /// The links as bytes, for replicas: [`Self::from_bytes`] in another process gives the
    /// same graph, so a replica walking it with the same vectors answers exactly as the trainer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IndexError> {
        let mut graph = vec![0u8; self.graph.serialized_length()];
        self.graph.save_to_buffer(&mut graph).map_err(err)?;
        let mut members: Vec<(u64, Vec<u64>)> =
            self.members.iter().map(|(k, v)| (*k, v.clone())).collect();
        members.sort_unstable();
        let stored = Stored {
            graph,
            len: self.len as u64,
            members,
        };
        postcard::to_stdvec(&stored).map_err(|e| IndexError(format!("encoding links: {e}")))
    }

    /// Links from [`Self::to_bytes`], searched with `dim`-wide vectors. usearch does not store a
    /// custom metric, so it is set again here; `expansion_search` is this process's.
    pub fn from_bytes(
        bytes: &[u8],
        dim: usize,
        c: &IndexConfig,
    ) -> Result<SharedGraph, IndexError> {
        let stored: Stored =
            postcard::from_bytes(bytes).map_err(|e| IndexError(format!("decoding links: {e}")))?;
        let mut graph = Index::restore_from_buffer(&stored.graph).map_err(err)?;
        if graph.dimensions() != 8 {
            return Err(IndexError(format!(
                "links of {}-byte nodes, expected 8 (positions)",
                graph.dimensions()
            )));
        }
        graph.change_metric::<u8>(Box::new(distance));
        graph
            .reserve_capacity_and_threads(graph.size().max(1), SEARCH_THREADS)
            .map_err(err)?;
        graph.change_expansion_search(c.expansion_search);
        let len = stored.len as usize;
        let members: HashMap<u64, Vec<u64>> = stored.members.into_iter().collect();
        let counted = graph.size() + members.values().map(Vec::len).sum::<usize>();
        if counted != len {
            return Err(IndexError(format!(
                "links of {counted} positions for {len} items"
            )));
        }
        Ok(SharedGraph {
            graph,
            dim,
            len,
            members,
        })
    }

    /// Positions linked.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty graph.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Top-`k` of `query` among the positions, scored with `vectors` (this version's table,
    /// `len × dim`), searching at least `depth` deep.
    pub fn search(
        &self,
        vectors: &[f32],
        query: &[f32],
        k: usize,
        depth: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.filtered_search(vectors, query, k, depth, |_| true)
    }

    /// [`Self::search`] among the positions `keep` accepts.
    pub fn filtered_search(
        &self,
        vectors: &[f32],
        query: &[f32],
        k: usize,
        depth: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        if vectors.len() != self.len * self.dim || query.len() != self.dim {
            return Err(IndexError(format!(
                "a table of {} floats and a {}-d query for {} positions of {} dimensions",
                vectors.len(),
                query.len(),
                self.len,
                self.dim
            )));
        }
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let row = |p: u64| &vectors[p as usize * self.dim..(p as usize + 1) * self.dim];
        let members = |p: u64| self.members.get(&p).map_or(&[][..], Vec::as_slice);
        let accept = |p: u64| keep(p) || members(p).iter().any(|&m| keep(m));
        let found = {
            let _scope = Scope::enter(vectors, self.dim, query);
            self.graph
                .filtered_search(&QUERY.to_le_bytes(), depth.max(k), accept)
                .map_err(err)?
        };
        // Nodes come best first; each stands for itself and its members, all scored with this
        // version's vectors. Later nodes cannot beat what is collected by more than the slack.
        let mut hits: Vec<Hit> = Vec::new();
        let mut lowest = f32::INFINITY;
        for (&node, &d) in found.keys.iter().zip(&found.distances) {
            if hits.len() >= k && 1.0 - d < lowest - MEMBER_SLACK {
                break;
            }
            for p in std::iter::once(node).chain(members(node).iter().copied()) {
                if keep(p) {
                    let score = super::dot(query, row(p));
                    lowest = lowest.min(score);
                    hits.push(Hit { key: p, score });
                }
            }
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key)));
        hits.truncate(k);
        Ok(hits)
    }

    /// Bytes of the graph (links and 8-byte payloads) and of the member lists.
    pub fn memory_bytes(&self) -> usize {
        self.graph.memory_usage() + 8 * (self.len - self.graph.size()) + 48 * self.members.len()
    }

    /// Members whose vector (in `vectors`, this version's table) has left its node's: items
    /// the model told apart since the links were built, reachable only through the old node.
    pub fn spread_members(&self, vectors: &[f32]) -> usize {
        if vectors.len() != self.len * self.dim {
            return 0;
        }
        let row = |p: u64| &vectors[p as usize * self.dim..(p as usize + 1) * self.dim];
        self.members
            .iter()
            .map(|(&node, members)| {
                let home = cell(row(node));
                members.iter().filter(|&&m| cell(row(m)) != home).count()
            })
            .sum()
    }

    /// Nodes linked: distinct vectors when the links were built.
    pub fn nodes(&self) -> usize {
        self.graph.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{brute_force, tests::unit_vectors};

    fn recall(graph: &SharedGraph, v: &[f32], dim: usize, k: usize) -> f64 {
        let mut overlap = 0;
        let queries: Vec<&[f32]> = v.chunks_exact(dim).step_by(97).take(20).collect();
        for q in &queries {
            let want: std::collections::HashSet<u64> = brute_force(v, dim, q, k, |_| true)
                .iter()
                .map(|h| h.key)
                .collect();
            let got = graph.search(v, q, k, 2 * k).unwrap();
            overlap += got.iter().filter(|h| want.contains(&h.key)).count();
        }
        overlap as f64 / (queries.len() * k) as f64
    }

    /// Tie-aware recall@k over `queries`: a hit counts when it scores at least the exact k-th.
    fn recall_with_ties(graph: &SharedGraph, v: &[f32], dim: usize, k: usize) -> f64 {
        let mut found = 0;
        let queries: Vec<&[f32]> = v.chunks_exact(dim).step_by(397).take(25).collect();
        for q in &queries {
            let kth = brute_force(v, dim, q, k, |_| true)[k - 1].score;
            let got = graph.search(v, q, k, 2 * k).unwrap();
            found += got.iter().filter(|h| h.score >= kth - 1e-5).count();
        }
        found as f64 / (queries.len() * k) as f64
    }

    /// Never-clicked items share the id table's unknown row, so a catalogue holds a few hundred
    /// distinct vectors, each for hundreds of items, equal up to float noise (the freshness
    /// bench at 150k: probed recall 0.02). HNSW links such near-duplicates to each other and
    /// to little else; one node per distinct vector keeps the graph whole. (Linked one node per
    /// item, this catalogue gave 0.946 at 20k items and falls further as the groups grow.)
    #[test]
    fn a_catalogue_of_near_duplicate_vectors_is_still_found() {
        let (dim, n) = (16, 20_000);
        let distinct = unit_vectors(150, dim, 8);
        let noise = unit_vectors(n, dim, 9);
        let v: Vec<f32> = (0..n)
            .flat_map(|i| {
                let row = &distinct[(i * 7919 % 150) * dim..][..dim];
                let jitter = &noise[i * dim..][..dim];
                row.iter()
                    .zip(jitter)
                    .map(|(a, b)| a + 1e-6 * b)
                    .collect::<Vec<f32>>()
            })
            .collect();
        let graph = SharedGraph::build(&v, dim, &IndexConfig::default()).unwrap();
        // 150 distinct vectors; a few straddle a grid line and take two nodes.
        assert_eq!(graph.len(), n);
        assert!(
            (150..200).contains(&graph.nodes()),
            "{} nodes",
            graph.nodes()
        );
        let r = recall_with_ties(&graph, &v, dim, 100);
        assert!(r > 0.99, "recall@100 {r}");
        // Members come back with their own scores, and a filter applies to each of them.
        let q = &v[3 * dim..4 * dim];
        let hits = graph.search(&v, q, 100, 200).unwrap();
        assert!(hits.iter().any(|h| h.key == 3));
        let odd = graph
            .filtered_search(&v, q, 100, 200, |p| p % 2 == 1)
            .unwrap();
        assert_eq!(odd.len(), 100);
        assert!(odd.iter().all(|h| h.key % 2 == 1));
        // Nothing spread yet; moving every odd item away from its group spreads half of them.
        assert_eq!(graph.spread_members(&v), 0);
        let mut moved = v.clone();
        for (i, row) in moved
            .chunks_exact_mut(dim)
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
        {
            row.copy_from_slice(&noise[i * dim..][..dim]);
        }
        let spread = graph.spread_members(&moved);
        assert!((9_000..=11_000).contains(&spread), "{spread}");
        // And they travel with the links.
        let copy =
            SharedGraph::from_bytes(&graph.to_bytes().unwrap(), dim, &IndexConfig::default())
                .unwrap();
        assert_eq!(copy.search(&v, q, 100, 200).unwrap(), hits);
    }

    #[test]
    fn a_graph_linked_for_one_version_answers_with_the_vectors_of_another() {
        let dim = 16;
        let v0 = unit_vectors(3000, dim, 5);
        let graph = SharedGraph::build(&v0, dim, &IndexConfig::default()).unwrap();
        assert_eq!(graph.len(), 3000);
        // Its own version: finds each item first, with its score.
        let q = &v0[11 * dim..12 * dim];
        let hits = graph.search(&v0, q, 5, 64).unwrap();
        assert_eq!(hits[0].key, 11);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(recall(&graph, &v0, dim, 20) > 0.95);
        // A later version: every vector moved a little. The links still lead to the new
        // neighbours, scored with the new vectors.
        let noise = unit_vectors(3000, dim, 6);
        let mut v1: Vec<f32> = v0.iter().zip(&noise).map(|(a, b)| a + 0.3 * b).collect();
        for row in v1.chunks_exact_mut(dim) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= n);
        }
        let q1 = &v1[11 * dim..12 * dim];
        let hits = graph.search(&v1, q1, 5, 64).unwrap();
        assert_eq!(hits[0].key, 11);
        assert!(
            (hits[0].score - 1.0).abs() < 1e-4,
            "scored with the new vectors"
        );
        assert!(recall(&graph, &v1, dim, 20) > 0.9);
        // A table of the wrong size is refused, not read out of bounds.
        assert!(graph.search(&v1[..dim * 10], q1, 5, 64).is_err());
        // The links travel: restored in another index they walk to the same answers.
        let copy =
            SharedGraph::from_bytes(&graph.to_bytes().unwrap(), dim, &IndexConfig::default())
                .unwrap();
        assert_eq!(copy.len(), 3000);
        assert_eq!(
            copy.search(&v1, q1, 20, 64).unwrap(),
            graph.search(&v1, q1, 20, 64).unwrap()
        );
        assert!(SharedGraph::from_bytes(&[1, 2, 3], dim, &IndexConfig::default()).is_err());
    }
}
