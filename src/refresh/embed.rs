//! The embedding pass: the catalogue through a snapshot's item tower.
//!
//! Every new model version embeds the whole catalogue, and at a million items that pass is
//! what keeps the served model behind the trainer (the forward pass is 95 % of it). Items
//! whose tower inputs are identical get identical vectors, and a large catalogue has many:
//! an item without an id row of its own (never clicked, not admitted by `min_count`, or
//! beyond the id table's capacity — half of a million-item catalogue at the default 500k
//! rows) is its category, genres and dense values alone. [`embed_items`] therefore runs the
//! tower once per distinct input and copies the vector to every item that shares it: exact,
//! and as cheap as the number of distinct inputs.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHasher};

use super::FrozenModel;
use crate::catalog::ItemFeatures;
use crate::features::{ItemRef, ServeRows, TowerInput};
use crate::index::GroupedVectors;

/// Embeds `items` with the snapshot's item tower, `batch` at a time, into one `n × d` buffer.
pub fn embed_items(model: &FrozenModel, items: &[Arc<ItemFeatures>], batch: usize) -> Vec<f32> {
    embed_catalogue(model, items, batch).into_rows()
}

/// The vectors of an embedding pass: one per distinct tower input, and which one each item
/// has.
pub struct Embedding {
    /// `distinct_inputs × d`, in order of first appearance.
    distinct: Vec<f32>,
    /// The row in `distinct` of every item; `None` when every item had an input of its own
    /// (`distinct` is then in item order).
    of_item: Option<Vec<u32>>,
    dim: usize,
}

impl Embedding {
    /// Distinct tower inputs among the items: the rows the tower ran on
    /// (`towerstream_index_distinct_inputs`).
    pub fn distinct_inputs(&self) -> usize {
        self.distinct.len() / self.dim.max(1)
    }

    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Items embedded.
    pub fn len(&self) -> usize {
        self.of_item
            .as_ref()
            .map_or_else(|| self.distinct_inputs(), Vec::len)
    }

    /// True when no item was embedded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every item's vector, `n × d` in item order.
    pub fn into_rows(self) -> Vec<f32> {
        let Some(of_item) = self.of_item else {
            return self.distinct;
        };
        let dim = self.dim;
        let mut out = Vec::with_capacity(of_item.len() * dim);
        for &u in &of_item {
            out.extend_from_slice(&self.distinct[u as usize * dim..(u as usize + 1) * dim]);
        }
        out
    }

    /// The vectors kept once per distinct input, with the items of each (no copy per item).
    pub fn into_grouped(self) -> Option<GroupedVectors> {
        let n = self.len() as u32;
        let of_item = self.of_item.unwrap_or_else(|| (0..n).collect());
        GroupedVectors::new(self.distinct, of_item, self.dim)
    }
}

/// Embeds `items`, running the tower once per distinct input.
pub fn embed_catalogue(
    model: &FrozenModel,
    items: &[Arc<ItemFeatures>],
    batch: usize,
) -> Embedding {
    let batch = batch.max(1);
    let distinct = DistinctInputs::of(model, items, batch);
    let vectors = embed_each(model, &distinct.items, batch);
    let all_own = distinct.items.len() == items.len();
    Embedding {
        distinct: vectors,
        // Nothing shared: the vectors are already in item order.
        of_item: (!all_own).then_some(distinct.of_item),
        dim: model.towers.output_dim() as usize,
    }
}

/// Every item in `items` through the tower, in order.
fn embed_each(model: &FrozenModel, items: &[Arc<ItemFeatures>], batch: usize) -> Vec<f32> {
    let dim = model.towers.output_dim() as usize;
    let mut out = Vec::with_capacity(items.len() * dim);
    for chunk in items.chunks(batch) {
        let input = encode(model, chunk);
        let v = model
            .towers
            .embed_items(&input)
            .to_kind(tch::Kind::Float)
            .contiguous();
        let flat: Vec<f32> = Vec::try_from(v.view([-1])).unwrap_or_default();
        out.extend_from_slice(&flat);
    }
    out
}

fn encode(model: &FrozenModel, chunk: &[Arc<ItemFeatures>]) -> TowerInput {
    let refs: Vec<ItemRef<'_>> = chunk
        .iter()
        .map(|f| ItemRef {
            id: &f.item_id,
            features: Some(f),
        })
        .collect();
    model
        .spec
        .encode_items(&refs, &mut ServeRows(&model.vocabs))
}

/// The catalogue's distinct tower inputs: one representative item each, and which one every
/// item maps to.
struct DistinctInputs {
    /// One item per distinct input, in order of first appearance.
    items: Vec<Arc<ItemFeatures>>,
    /// Per item of the catalogue, the index of its input in `items`.
    of_item: Vec<u32>,
}

impl DistinctInputs {
    fn of(model: &FrozenModel, items: &[Arc<ItemFeatures>], batch: usize) -> DistinctInputs {
        let mut found = DistinctInputs {
            items: Vec::new(),
            of_item: Vec::with_capacity(items.len()),
        };
        // The inputs found so far, flattened (`starts[u]..starts[u + 1]` is input u), and the
        // first input seen with each hash. A second input with the same hash is kept as
        // distinct without an entry: a collision costs one forward row, never a wrong vector.
        let (mut keys, mut starts) = (Vec::<u64>::new(), vec![0usize]);
        let mut by_hash: FxHashMap<u64, u32> = FxHashMap::default();
        let mut key = Vec::new();
        for chunk in items.chunks(batch) {
            let input = encode(model, chunk);
            for (i, item) in chunk.iter().enumerate() {
                input_key(&input, i, &mut key);
                let mut h = FxHasher::default();
                key.hash(&mut h);
                let hash = h.finish();
                let same = by_hash
                    .get(&hash)
                    .copied()
                    .filter(|&u| keys[starts[u as usize]..starts[u as usize + 1]] == key[..]);
                let u = match same {
                    Some(u) => u,
                    None => {
                        let u = found.items.len() as u32;
                        by_hash.entry(hash).or_insert(u);
                        keys.extend_from_slice(&key);
                        starts.push(keys.len());
                        found.items.push(item.clone());
                        u
                    }
                };
                found.of_item.push(u);
            }
        }
        found
    }
}

/// Writes entity `i`'s input into `key`: every single-valued row, the rows of every
/// multi-valued feature in order (masked entries left out, so the padding width of its chunk
/// does not matter), and the bits of its dense values.
fn input_key(input: &TowerInput, i: usize, key: &mut Vec<u64>) {
    key.clear();
    for (_, rows) in &input.single {
        key.push(rows[i] as u64);
    }
    for (_, rows, mask, width) in &input.multi {
        let (from, to) = (i * width, (i + 1) * width);
        key.extend(
            rows[from..to]
                .iter()
                .zip(&mask[from..to])
                .filter(|(_, m)| **m != 0.0)
                .map(|(r, _)| *r as u64),
        );
        key.push(u64::MAX); // ends the list: [a][b, c] is not [a, b][c]
    }
    let d = input.dense_dim;
    key.extend(
        input.dense[i * d..(i + 1) * d]
            .iter()
            .map(|x| u64::from(x.to_bits())),
    );
}

/// A model over item ids, categories and genres that knows categories `a`, `b` and genres
/// `x`, `y` and no item id, and 300 items `i0..` over them: 2 categories × 3 genre lists, so 6
/// distinct tower inputs.
#[cfg(test)]
pub(crate) fn six_inputs_fixture() -> (crate::config::Config, FrozenModel, Vec<Arc<ItemFeatures>>) {
    use crate::config::{Config, ItemFeature};
    let mut config = Config::default();
    config.features.item = vec![
        ItemFeature::ItemId,
        ItemFeature::Category,
        ItemFeature::Genres,
    ];
    let trainer = crate::train::Trainer::new(&config);
    let mut model = FrozenModel::of(&trainer);
    for (name, values) in [("category", ["a", "b"]), ("genres", ["x", "y"])] {
        let t = model
            .spec
            .tables()
            .iter()
            .position(|t| t.name == name)
            .expect(name);
        model.vocabs[t].assign(1, values[0]);
        model.vocabs[t].assign(2, values[1]);
    }
    let items = (0..300)
        .map(|i| {
            let genres: &[&str] = [&["x"][..], &["x", "y"], &[]][i % 3];
            ItemFeatures::for_test(&format!("i{i}"), Some(["a", "b"][i % 2]), genres)
        })
        .collect();
    (config, model, items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, category: Option<&str>, genres: &[&str]) -> Arc<ItemFeatures> {
        ItemFeatures::for_test(id, category, genres)
    }

    /// The pass with shared inputs gives every item the vector the tower gives it alone.
    #[test]
    fn items_sharing_an_input_get_the_vector_each_would_get_alone() {
        let (_, mut model, unknown) = six_inputs_fixture();
        // Two ids known to the model (rows of their own); every other id is unknown and so
        // shares the unknown row: those items differ by category and genres alone.
        let table = model.spec.item_id_table();
        model.vocabs[table].assign(1, "k1");
        model.vocabs[table].assign(2, "k2");
        let mut items = vec![item("k1", Some("a"), &["x"]), item("k2", Some("a"), &["x"])];
        items.extend(unknown);
        let distinct = DistinctInputs::of(&model, &items, 64);
        // k1, k2, and 2 categories × 3 genre lists for the unknown ids.
        assert_eq!(distinct.items.len(), 2 + 6);
        assert_eq!(embed_catalogue(&model, &items, 64).distinct_inputs(), 8);
        let shared = embed_items(&model, &items, 64);
        let alone = embed_each(&model, &items, 1);
        assert_eq!(shared.len(), alone.len());
        let worst = shared
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "largest difference {worst}");
    }

    #[test]
    fn genre_lists_split_differently_are_different_inputs() {
        let input = TowerInput {
            n: 2,
            single: vec![],
            multi: vec![
                (0, vec![1, 0, 2, 3], vec![1.0, 0.0, 1.0, 1.0], 2),
                (1, vec![2, 3, 0, 0], vec![1.0, 1.0, 0.0, 0.0], 2),
            ],
            dense: vec![],
            dense_dim: 0,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        input_key(&input, 0, &mut a);
        input_key(&input, 1, &mut b);
        assert_ne!(a, b);
    }
}
