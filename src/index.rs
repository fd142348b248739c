//! The index of one generation, keyed by position in the generation's item list: the vectors
//! themselves searched exactly (no build cost: what keeps mid-size catalogues fresh), a
//! `usearch` HNSW graph built once by a single writer and then only searched, or a
//! [`SharedGraph`] linked for an earlier model version and searched with this version's
//! vectors (a new model is an embedding pass away, not a rebuild: what keeps large catalogues
//! fresh), or the distinct vectors of a large catalogue searched exactly ([`GroupedVectors`]:
//! as fresh as exact search, at the cost of a scan of far fewer vectors than items).
//!
//! usearch's concurrent `add` can leave nodes unreachable (usearch #735), so every add happens
//! on the building thread before the index is shared; searches are safe concurrently.

pub mod clusters;
pub mod grouped;
pub mod scan;
pub mod shared_graph;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

pub use clusters::ClusteredVectors;
pub use grouped::GroupedVectors;
pub use shared_graph::SharedGraph;

use scan::dot;

use crate::config::{IndexConfig, Quantization, Similarity};

/// Index failures (usearch reports C++ exceptions as strings).
#[derive(Debug, thiserror::Error)]
#[error("usearch: {0}")]
pub struct IndexError(String);

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

impl From<&str> for IndexError {
    fn from(message: &str) -> IndexError {
        IndexError(message.to_string())
    }
}

/// Concurrent searches an index supports (search contexts reserved at build time).
pub const SEARCH_THREADS: usize = 64;

/// A scored hit: position in the generation's item list and similarity (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Key (position).
    pub key: u64,
    /// Cosine similarity or inner product.
    pub score: f32,
}

enum Backend {
    /// Brute force over the vectors.
    Exact(Vec<f32>),
    /// Brute force over the distinct vectors, their items handed out best first.
    Grouped(GroupedVectors),
    /// The distinct vectors in lists around centroids; the best lists scanned.
    Clustered(ClusteredVectors),
    /// HNSW graph.
    Hnsw(Index),
    /// Links shared with other generations, scored with this generation's vectors.
    Linked {
        /// The links (positions only).
        graph: Arc<SharedGraph>,
        /// This version's vectors, row i = position i.
        vectors: Vec<f32>,
    },
}

/// An immutable index of item vectors.
pub struct ItemIndex {
    backend: Backend,
    dim: usize,
    len: usize,
    /// How many candidates a graph search asks for per result: `index.expansion_per_k`, or
    /// deeper for shared links whose probed recall fell short (the refresher tunes it on the
    /// served generation, hence atomic: f64 bits).
    depth_per_k: AtomicU64,
    /// Recall@100 the last probe measured at the depth served (f64 bits; NaN: not probed).
    probed_recall: AtomicU64,
}

fn options(dim: usize, similarity: Similarity, c: &IndexConfig) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        // Tower outputs are already L2-normalised for cosine, so inner product is cosine.
        metric: match similarity {
            Similarity::Cosine | Similarity::Dot => MetricKind::IP,
        },
        quantization: match c.quantization {
            Quantization::F32 => ScalarKind::F32,
            Quantization::F16 => ScalarKind::F16,
            Quantization::I8 => ScalarKind::I8,
        },
        connectivity: c.connectivity,
        expansion_add: c.expansion_add,
        expansion_search: c.expansion_search,
        multi: false,
    }
}

impl ItemIndex {
    /// Builds an index over `vectors` (`n × dim`, row i gets key i).
    pub fn build(
        vectors: &[f32],
        dim: usize,
        similarity: Similarity,
        c: &IndexConfig,
    ) -> Result<ItemIndex, IndexError> {
        let ann = Index::new(&options(dim, similarity, c)).map_err(err)?;
        let n = vectors.len() / dim.max(1);
        // Each concurrent search needs a context reserved up front.
        ann.reserve_capacity_and_threads(n.max(1), SEARCH_THREADS)
            .map_err(err)?;
        for (i, v) in vectors.chunks_exact(dim).enumerate() {
            ann.add(i as u64, v).map_err(err)?;
        }
        Ok(ItemIndex {
            backend: Backend::Hnsw(ann),
            dim,
            len: n,
            depth_per_k: AtomicU64::new(c.expansion_per_k.to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        })
    }

    /// The serialized HNSW graph (with its vectors), `None` for an exact index.
    pub fn graph_bytes(&self) -> Option<Result<Vec<u8>, IndexError>> {
        match &self.backend {
            // Linked links need this version's vectors: replicas get the vectors and search
            // them exactly until links travel too.
            Backend::Exact(_)
            | Backend::Grouped(_)
            | Backend::Clustered(_)
            | Backend::Linked { .. } => None,
            Backend::Hnsw(ann) => {
                let mut buf = vec![0u8; ann.serialized_length()];
                Some(ann.save_to_buffer(&mut buf).map(|_| buf).map_err(err))
            }
        }
    }

    /// An HNSW index from [`Self::graph_bytes`] of another process: the same graph, so the
    /// same answers, without the build. `expansion_search` is this process's.
    pub fn from_graph_bytes(
        bytes: &[u8],
        dim: usize,
        c: &IndexConfig,
    ) -> Result<ItemIndex, IndexError> {
        let ann = Index::restore_from_buffer(bytes).map_err(err)?;
        if ann.dimensions() != dim {
            return Err(IndexError(format!(
                "graph of {}-d vectors, expected {dim}",
                ann.dimensions()
            )));
        }
        let len = ann.size();
        ann.reserve_capacity_and_threads(len.max(1), SEARCH_THREADS)
            .map_err(err)?;
        ann.change_expansion_search(c.expansion_search);
        Ok(ItemIndex {
            backend: Backend::Hnsw(ann),
            dim,
            len,
            depth_per_k: AtomicU64::new(c.expansion_per_k.to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        })
    }

    /// An index over `vectors` (`n × dim`, this model version's) that walks `graph`, linked
    /// for the same positions by an earlier version. Fails when the sizes disagree.
    pub fn linked(
        graph: Arc<SharedGraph>,
        vectors: Vec<f32>,
        dim: usize,
        c: &IndexConfig,
    ) -> Result<ItemIndex, IndexError> {
        let len = vectors.len() / dim.max(1);
        if len != graph.len() || len * dim != vectors.len() {
            return Err(IndexError(format!(
                "{} floats of {dim}-d vectors for a graph of {} positions",
                vectors.len(),
                graph.len()
            )));
        }
        Ok(ItemIndex {
            backend: Backend::Linked { graph, vectors },
            dim,
            len,
            depth_per_k: AtomicU64::new(c.expansion_per_k.to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        })
    }

    /// What searches walk: `"exact"` (every item scanned), `"distinct"` (the distinct vectors
    /// scanned), `"lists"` (the best lists of distinct vectors scanned), `"hnsw"` or
    /// `"linked"` (links of an earlier version walked with these vectors).
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Exact(_) => "exact",
            Backend::Grouped(_) => "distinct",
            Backend::Clustered(_) => "lists",
            Backend::Hnsw(_) => "hnsw",
            Backend::Linked { .. } => "linked",
        }
    }

    /// The distinct vectors of a [`Self::grouped`] or [`Self::clustered`] index.
    pub fn grouped_vectors(&self) -> Option<&GroupedVectors> {
        match &self.backend {
            Backend::Grouped(g) => Some(g),
            Backend::Clustered(c) => Some(c.grouped()),
            _ => None,
        }
    }

    /// The lists of a [`Self::clustered`] index.
    pub fn clustered_vectors(&self) -> Option<&ClusteredVectors> {
        match &self.backend {
            Backend::Clustered(c) => Some(c),
            _ => None,
        }
    }

    /// True for an index whose recall the refresher probes and whose depth it tunes: links
    /// walked with a newer model's vectors, or lists.
    pub fn is_probed(&self) -> bool {
        matches!(self.backend, Backend::Linked { .. } | Backend::Clustered(_))
    }

    /// The vector of item `key`.
    pub fn row(&self, key: u64) -> Option<Vec<f32>> {
        let mut buf = Vec::new();
        self.row_in(key, &mut buf)
            .ok()
            .flatten()
            .map(<[f32]>::to_vec)
    }

    /// The vector of item `key`, borrowed from the index, or read into `buf` for an HNSW graph
    /// (which keeps its vectors inside); `None` for a key the index does not hold.
    fn row_in<'a>(
        &'a self,
        key: u64,
        buf: &'a mut Vec<f32>,
    ) -> Result<Option<&'a [f32]>, IndexError> {
        let Ok(key) = usize::try_from(key) else {
            return Ok(None);
        };
        Ok(match &self.backend {
            Backend::Exact(v) | Backend::Linked { vectors: v, .. } => {
                v.get(key * self.dim..(key + 1) * self.dim)
            }
            Backend::Grouped(g) => g.row(key as u64),
            Backend::Clustered(c) => c.grouped().row(key as u64),
            Backend::Hnsw(ann) => {
                buf.resize(self.dim, 0.0);
                (ann.get(key as u64, buf).map_err(err)? > 0).then_some(&buf[..])
            }
        })
    }

    /// The shared links of a [`Self::linked`] index.
    pub fn shared_graph(&self) -> Option<&Arc<SharedGraph>> {
        match &self.backend {
            Backend::Linked { graph, .. } => Some(graph),
            _ => None,
        }
    }

    /// An exact index: the vectors (`n × dim`) searched by brute force.
    pub fn exact(vectors: Vec<f32>, dim: usize) -> ItemIndex {
        let len = vectors.len() / dim.max(1);
        ItemIndex {
            backend: Backend::Exact(vectors),
            dim,
            len,
            depth_per_k: AtomicU64::new(1f64.to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    /// An exact index over grouped vectors (see [`GroupedVectors`]).
    pub fn grouped(vectors: GroupedVectors) -> ItemIndex {
        ItemIndex {
            dim: vectors.dim(),
            len: vectors.len(),
            backend: Backend::Grouped(vectors),
            depth_per_k: AtomicU64::new(1f64.to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    /// An index over grouped vectors split into lists (see [`ClusteredVectors`]), searched
    /// at `per_k` to start with (the depth a probe chose for the previous version).
    pub fn clustered(vectors: ClusteredVectors, per_k: f64) -> ItemIndex {
        ItemIndex {
            dim: vectors.grouped().dim(),
            len: vectors.grouped().len(),
            backend: Backend::Clustered(vectors),
            depth_per_k: AtomicU64::new(per_k.max(1.0).to_bits()),
            probed_recall: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    /// Distinct vectors an exact index scans per search (`None` for a graph): the items of an
    /// exact index, the groups of a grouped one.
    pub fn scanned_vectors(&self) -> Option<usize> {
        match &self.backend {
            Backend::Exact(_) => Some(self.len),
            Backend::Grouped(g) => Some(g.groups()),
            Backend::Hnsw(_) | Backend::Linked { .. } | Backend::Clustered(_) => None,
        }
    }

    /// Every vector, row `i` being key `i` (HNSW: as stored, i.e. after quantization).
    pub fn vectors(&self) -> Result<Vec<f32>, IndexError> {
        match &self.backend {
            Backend::Exact(v) | Backend::Linked { vectors: v, .. } => Ok(v.clone()),
            Backend::Grouped(g) => Ok(g.rows()),
            Backend::Clustered(c) => Ok(c.grouped().rows()),
            Backend::Hnsw(ann) => {
                let mut out = vec![0f32; self.len * self.dim];
                for (key, row) in out.chunks_exact_mut(self.dim.max(1)).enumerate() {
                    ann.get(key as u64, row).map_err(err)?;
                }
                Ok(out)
            }
        }
    }

    /// The vectors as stored in memory, row `i` being key `i` (`None` for an HNSW index,
    /// which keeps them inside the graph, and a grouped one, which keeps each once).
    pub fn vector_table(&self) -> Option<&[f32]> {
        match &self.backend {
            Backend::Exact(v) | Backend::Linked { vectors: v, .. } => Some(v),
            Backend::Hnsw(_) | Backend::Grouped(_) | Backend::Clustered(_) => None,
        }
    }

    /// HNSW connectivity (`None` for an exact index).
    pub fn connectivity(&self) -> Option<usize> {
        match &self.backend {
            Backend::Exact(_)
            | Backend::Grouped(_)
            | Backend::Clustered(_)
            | Backend::Linked { .. } => None,
            Backend::Hnsw(ann) => Some(ann.connectivity()),
        }
    }

    /// True for a brute-force index (over every item or over the distinct vectors).
    pub fn is_exact(&self) -> bool {
        matches!(self.backend, Backend::Exact(_) | Backend::Grouped(_))
    }

    /// Vectors indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes used by the graph and vectors.
    pub fn memory_bytes(&self) -> usize {
        match &self.backend {
            Backend::Exact(v) => std::mem::size_of_val(v.as_slice()),
            Backend::Grouped(g) => g.memory_bytes(),
            Backend::Clustered(c) => c.memory_bytes(),
            Backend::Hnsw(ann) => ann.memory_usage(),
            Backend::Linked { graph, vectors } => {
                graph.memory_bytes() + std::mem::size_of_val(vectors.as_slice())
            }
        }
    }

    /// Top-`k` among keys `keep` accepts (approximate for HNSW).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        self.search_at_depth(query, k, self.expansion_per_k(), keep)
    }

    /// [`Self::search`] asking a graph for `per_k × k` candidates instead of the index's own
    /// depth (the refresher's recall probe tries depths without changing what is served).
    pub fn search_at_depth(
        &self,
        query: &[f32],
        k: usize,
        per_k: f64,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let depth = ((k as f64 * per_k).ceil() as usize).max(k);
        match &self.backend {
            Backend::Exact(v) => Ok(brute_force(v, self.dim, query, k, keep)),
            Backend::Grouped(g) => Ok(g.search(query, k, keep)),
            Backend::Clustered(c) => Ok(c.search(query, k, per_k, keep)),
            Backend::Hnsw(ann) => {
                let m = ann.filtered_search(query, depth, keep).map_err(err)?;
                let mut hits = to_hits(&m.keys, &m.distances);
                hits.truncate(k);
                Ok(hits)
            }
            // usearch searches max(ef, wanted) deep, so asking for more than k and keeping the
            // best k is how the depth follows k without touching the shared ef.
            Backend::Linked { graph, vectors } => {
                graph.filtered_search(vectors, query, k, depth, keep)
            }
        }
    }

    /// Exact top-`k` among `candidates` that `keep` accepts: for a filter known to pass few
    /// keys (a small facet), cheaper than a filtered graph walk, which keeps going until it has
    /// `k` accepted results.
    pub fn search_among(
        &self,
        query: &[f32],
        k: usize,
        candidates: &[u64],
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut best = scan::Best::new(k);
        let mut buf = Vec::new();
        for &key in candidates.iter().filter(|key| keep(**key)) {
            if let Some(v) = self.row_in(key, &mut buf)? {
                best.push(Hit {
                    key,
                    score: dot(v, query),
                });
            }
        }
        Ok(best.into_sorted())
    }

    /// Candidates a graph search asks for per result (`index.expansion_per_k` unless tuned).
    pub fn expansion_per_k(&self) -> f64 {
        f64::from_bits(self.depth_per_k.load(Ordering::Relaxed))
    }

    /// Sets the candidates per result of this index's searches, at least 1 (benchmarks
    /// compare depths on one graph; the refresher deepens shared links whose recall fell).
    pub fn set_expansion_per_k(&self, per_k: f64) {
        self.depth_per_k
            .store(per_k.max(1.0).to_bits(), Ordering::Relaxed);
    }

    /// Recall@100 the last probe of this index measured at the depth it serves.
    pub fn probed_recall(&self) -> Option<f64> {
        let r = f64::from_bits(self.probed_recall.load(Ordering::Relaxed));
        (!r.is_nan()).then_some(r)
    }

    /// Records what a probe measured (see [`Self::probed_recall`]).
    pub fn set_probed_recall(&self, recall: f64) {
        self.probed_recall
            .store(recall.to_bits(), Ordering::Relaxed);
    }

    /// Exact top-`k` (brute force), for checking the approximation.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Exact(v) | Backend::Linked { vectors: v, .. } => {
                Ok(brute_force(v, self.dim, query, k, |_| true))
            }
            Backend::Grouped(g) => Ok(g.search(query, k, |_| true)),
            Backend::Clustered(c) => Ok(c.grouped().search(query, k, |_| true)),
            Backend::Hnsw(ann) => {
                let m = ann.exact_search(query, k).map_err(err)?;
                Ok(to_hits(&m.keys, &m.distances))
            }
        }
    }
}

fn to_hits(keys: &[u64], distances: &[f32]) -> Vec<Hit> {
    // usearch's IP distance is 1 − ⟨a, b⟩.
    keys.iter()
        .zip(distances)
        .map(|(k, d)| Hit {
            key: *k,
            score: 1.0 - d,
        })
        .collect()
}

/// Exact top-`k` of `query` against `vectors` (`n × dim`), among keys `keep` accepts.
pub fn brute_force(
    vectors: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
    keep: impl Fn(u64) -> bool,
) -> Vec<Hit> {
    if k == 0 {
        return Vec::new();
    }
    let mut best = scan::Best::new(k);
    best.offer_rows(vectors, dim, query, |i| i as u64, keep);
    best.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::sampler::Rng;

    pub(super) fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut v = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let row: Vec<f32> = (0..dim).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.extend(row.iter().map(|x| x / norm));
        }
        v
    }

    #[test]
    fn a_shipped_graph_answers_exactly_like_the_original() {
        let dim = 16;
        let v = unit_vectors(3000, dim, 4);
        let c = IndexConfig {
            connectivity: 8,
            expansion_search: 16, // low: approximate answers, which must still agree
            ..IndexConfig::default()
        };
        let built = ItemIndex::build(&v, dim, Similarity::Cosine, &c).unwrap();
        let bytes = built.graph_bytes().unwrap().unwrap();
        let copy = ItemIndex::from_graph_bytes(&bytes, dim, &c).unwrap();
        assert_eq!(copy.len(), 3000);
        assert_eq!(copy.vectors().unwrap(), built.vectors().unwrap());
        for q in v.chunks_exact(dim).step_by(97) {
            assert_eq!(
                copy.search(q, 20, |k| k % 3 != 0).unwrap(),
                built.search(q, 20, |k| k % 3 != 0).unwrap()
            );
        }
        assert_eq!(copy.connectivity(), Some(8));
        assert!(ItemIndex::exact(v, dim).graph_bytes().is_none());
        assert!(ItemIndex::from_graph_bytes(&bytes[..100], dim, &c).is_err());
        assert!(ItemIndex::from_graph_bytes(&bytes, 8, &c).is_err());
    }

    #[test]
    fn finds_itself_and_respects_the_filter() {
        let dim = 16;
        let v = unit_vectors(500, dim, 1);
        let idx = ItemIndex::build(&v, dim, Similarity::Cosine, &IndexConfig::default()).unwrap();
        assert_eq!(idx.len(), 500);
        let q = &v[7 * dim..8 * dim];
        let hits = idx.search(q, 5, |_| true).unwrap();
        assert_eq!(hits[0].key, 7);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        let hits = idx.search(q, 5, |k| k != 7).unwrap();
        assert!(hits.iter().all(|h| h.key != 7));
        let exact = brute_force(&v, dim, q, 5, |k| k != 7);
        assert_eq!(exact[0].key, hits[0].key);
        // The exact backend answers the same as brute force, filter included.
        let flat = ItemIndex::exact(v.clone(), dim);
        assert!(flat.is_exact());
        let got: Vec<u64> = flat
            .search(q, 5, |k| k != 7)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect();
        let want: Vec<u64> = exact.iter().map(|h| h.key).collect();
        assert_eq!(got, want);
        assert_eq!(flat.memory_bytes(), 500 * dim * 4);
    }

    /// Share of the exact top-`k` (among `keep`) that the index returns.
    fn recall_at(
        idx: &ItemIndex,
        v: &[f32],
        dim: usize,
        k: usize,
        keep: &dyn Fn(u64) -> bool,
    ) -> (f64, f64) {
        let (mut found, mut overlap, mut want) = (0, 0, 0);
        for q in v.chunks_exact(dim).step_by(211).take(10) {
            let hits = idx.search(q, k, keep).unwrap();
            let exact: std::collections::HashSet<u64> = brute_force(v, dim, q, k, keep)
                .iter()
                .map(|h| h.key)
                .collect();
            want += exact.len();
            found += hits.len();
            overlap += hits.iter().filter(|h| exact.contains(&h.key)).count();
        }
        (found as f64 / want as f64, overlap as f64 / want as f64)
    }

    #[test]
    fn the_search_depth_follows_k_and_selective_filters_still_fill_k() {
        // Uniform vectors in 48 dimensions: a hard graph, so the depth shows.
        let dim = 48;
        let v = unit_vectors(6000, dim, 9);
        let c = IndexConfig {
            connectivity: 4,
            expansion_search: 16,
            ..IndexConfig::default()
        };
        let idx = ItemIndex::build(&v, dim, Similarity::Cosine, &c).unwrap();
        idx.set_expansion_per_k(1.0);
        let (_, at_k) = recall_at(&idx, &v, dim, 400, &|_| true);
        idx.set_expansion_per_k(4.0);
        let (_, deeper) = recall_at(&idx, &v, dim, 400, &|_| true);
        eprintln!("recall@400: depth k {at_k:.3}, 4k {deeper:.3}");
        assert!(deeper > at_k + 0.02, "{at_k} {deeper}");
        // One item in a hundred passes: the k = 20 results are still found, and are the right ones.
        let (returned, recall) = recall_at(&idx, &v, dim, 20, &|key| key % 100 == 7);
        eprintln!("filtered: returned {returned:.3}, recall {recall:.3}");
        assert_eq!(returned, 1.0);
        assert!(recall > 0.9, "{recall}");
    }
}
