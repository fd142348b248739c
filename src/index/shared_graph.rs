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

/// A graph over item positions `0..len`, searched with any version's vectors.
pub struct SharedGraph {
    graph: Index,
    dim: usize,
    len: usize,
}

impl SharedGraph {
    /// Links `vectors` (`n × dim`, row i = position i) with one writer.
    pub fn build(vectors: &[f32], dim: usize, c: &IndexConfig) -> Result<SharedGraph, IndexError> {
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
        let n = vectors.len() / dim.max(1);
        graph
            .reserve_capacity_and_threads(n.max(1), SEARCH_THREADS)
            .map_err(err)?;
        let query = vec![0f32; dim];
        let _scope = Scope::enter(vectors, dim, &query);
        for i in 0..n as u64 {
            graph.add(i, &i.to_le_bytes()).map_err(err)?;
        }
        Ok(SharedGraph { graph, dim, len: n })
    }

    /// The links as bytes, for replicas: [`Self::from_bytes`] in another process gives the
    /// same graph, so a replica walking it with the same vectors answers exactly as the trainer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IndexError> {
        let mut buf = vec![0u8; self.graph.serialized_length()];
        self.graph.save_to_buffer(&mut buf).map_err(err)?;
        Ok(buf)
    }

    /// Links from [`Self::to_bytes`], searched with `dim`-wide vectors. usearch does not store a
    /// custom metric, so it is set again here; `expansion_search` is this process's.
    pub fn from_bytes(
        bytes: &[u8],
        dim: usize,
        c: &IndexConfig,
    ) -> Result<SharedGraph, IndexError> {
        let mut graph = Index::restore_from_buffer(bytes).map_err(err)?;
        if graph.dimensions() != 8 {
            return Err(IndexError(format!(
                "links of {}-byte nodes, expected 8 (positions)",
                graph.dimensions()
            )));
        }
        graph.change_metric::<u8>(Box::new(distance));
        let len = graph.size();
        graph
            .reserve_capacity_and_threads(len.max(1), SEARCH_THREADS)
            .map_err(err)?;
        graph.change_expansion_search(c.expansion_search);
        Ok(SharedGraph { graph, dim, len })
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
        let _scope = Scope::enter(vectors, self.dim, query);
        let m = self
            .graph
            .filtered_search(&QUERY.to_le_bytes(), depth.max(k), keep)
            .map_err(err)?;
        let mut hits = super::to_hits(&m.keys, &m.distances);
        hits.truncate(k);
        Ok(hits)
    }

    /// Bytes of the graph (links and 8-byte payloads).
    pub fn memory_bytes(&self) -> usize {
        self.graph.memory_usage()
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
