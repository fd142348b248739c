//! The two towers: embedding tables → concat → MLP → (L2-normalised) vectors.
//!
//! Embedding tables are plain tensors outside autograd. A training step gathers only the rows
//! its batch touches into small leaf tensors ([`RowGather`]), so gradients and optimizer
//! updates cost O(rows used), not O(vocabulary) — the parameter-server pattern of Monolith and
//! Persia, on one machine. Serving indexes the full tables with the same code.

use rustc_hash::FxHashMap;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{HistoryPooling, ModelConfig, Similarity};
use crate::features::vocab::UNKNOWN_ROW;
use crate::features::{FeatureSpec, TowerInput};

/// Standard deviation of embedding initialisation.
pub const EMBEDDING_INIT_STD: f64 = 0.05;

/// Tower inputs as tensors on the model's device, with rows already mapped to the tables
/// they will index (local gathered rows in training, global rows in serving).
#[derive(Debug)]
pub struct TowerTensors {
    n: i64,
    single: Vec<(usize, Tensor)>,
    multi: Vec<(usize, Tensor, Tensor)>,
    dense: Option<Tensor>,
}

/// Maps global table rows to positions in per-table gathered leaves (training).
#[derive(Debug, Default)]
pub struct RowGather {
    // Fx: the ~60 lookups per example here are on the hot path; keys are not attacker-chosen.
    local: Vec<FxHashMap<i64, i64>>,
    rows: Vec<Vec<i64>>,
}

impl RowGather {
    /// A gather for `tables` tables.
    pub fn new(tables: usize) -> Self {
        RowGather {
            local: vec![FxHashMap::default(); tables],
            rows: vec![Vec::new(); tables],
        }
    }

    fn map(&mut self, table: usize, global: i64) -> i64 {
        let rows = &mut self.rows[table];
        *self.local[table].entry(global).or_insert_with(|| {
            rows.push(global);
            rows.len() as i64 - 1
        })
    }

    /// Global rows gathered per table, in local order.
    pub fn rows(&self) -> &[Vec<i64>] {
        &self.rows
    }
}

impl TowerTensors {
    /// Converts an input; with a gather, rows are remapped to gathered positions.
    pub fn new(input: &TowerInput, mut gather: Option<&mut RowGather>, device: Device) -> Self {
        let mut remap = |t: usize, v: &[i64]| -> Vec<i64> {
            match gather.as_deref_mut() {
                Some(g) => v.iter().map(|r| g.map(t, *r)).collect(),
                None => v.to_vec(),
            }
        };
        let n = input.n as i64;
        let single = input
            .single
            .iter()
            .map(|(t, v)| (*t, Tensor::from_slice(&remap(*t, v)).to(device)))
            .collect();
        let multi = input
            .multi
            .iter()
            .map(|(t, idx, mask, w)| {
                let w = *w as i64;
                (
                    *t,
                    Tensor::from_slice(&remap(*t, idx)).view([n, w]).to(device),
                    Tensor::from_slice(mask).view([n, w]).to(device),
                )
            })
            .collect();
        let dense = (input.dense_dim > 0).then(|| {
            Tensor::from_slice(&input.dense)
                .view([n, input.dense_dim as i64])
                .to(device)
        });
        TowerTensors {
            n,
            single,
            multi,
            dense,
        }
    }
}

/// The name of the first floating-point tensor of `named` holding a NaN or an infinity.
pub fn first_non_finite(named: &[(String, Tensor)]) -> Option<String> {
    tch::no_grad(|| {
        named
            .iter()
            .find(|(_, t)| t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0)
            .map(|(name, _)| name.clone())
    })
}

/// Attention weights `[n, w]` over a left-aligned history `e [n, w, d]` with `mask [n, w]`
/// (1 = an item): `softmax(e·q/√d + bias[age])` over the items, age 0 the newest. A row
/// without items gets all-zero weights (its pooled history is 0, like the mean's).
fn attention_weights(e: &Tensor, mask: &Tensor, query: &Tensor, age_bias: &Tensor) -> Tensor {
    let (n, w, d) = (e.size()[0], e.size()[1], e.size()[2]);
    let len = mask.sum_dim_intlist(1, true, Kind::Float);
    let position = Tensor::arange(w, (Kind::Float, e.device())).unsqueeze(0);
    let age = (&len - 1.0 - position)
        .clamp(0.0, (age_bias.size()[0] - 1) as f64)
        .to_kind(Kind::Int64);
    let bias = age_bias.index_select(0, &age.view([-1])).view([n, w]);
    let scores = e.matmul(&query.unsqueeze(1)).squeeze_dim(2) / (d as f64).sqrt() + bias;
    let present = mask.gt(0.0);
    let weights = scores
        .masked_fill(&present.logical_not(), -1e9)
        .softmax(1, Kind::Float)
        * mask;
    &weights
        / weights
            .sum_dim_intlist(1, true, Kind::Float)
            .clamp_min(1e-12)
}

/// The user and item towers and the embedding tables.
pub struct Towers {
    /// MLP parameters (trained by the dense optimizer; checkpointed by name).
    pub vs: nn::VarStore,
    user_mlp: Vec<nn::Linear>,
    item_mlp: Vec<nn::Linear>,
    /// One `[capacity, embedding_dim]` table per feature.
    pub tables: Vec<Tensor>,
    embedding_dim: i64,
    similarity: Similarity,
    /// Temperature τ.
    pub temperature: f64,
    device: Device,
    widths: (i64, i64, Vec<i64>),
    /// Attention pooling of the history: learned query `[e]` and bias per age `[len]`.
    history_attention: Option<(Tensor, Tensor)>,
}

fn mlp(path: nn::Path<'_>, input: i64, dims: &[i64], cfg: nn::LinearConfig) -> Vec<nn::Linear> {
    let mut layers = Vec::with_capacity(dims.len());
    let mut width = input;
    for (i, d) in dims.iter().enumerate() {
        layers.push(nn::linear(&path / i, width, *d, cfg));
        width = *d;
    }
    layers
}

/// libtorch's random generator is process-wide. Seeding and drawing happen under this lock, so
/// towers built at the same time in one process (a replica beside a trainer, parallel tests)
/// still get the weights their seed promises.
fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|p| p.into_inner())
}

impl Towers {
    /// Fresh towers for `spec` (deterministic for a seed).
    pub fn new(spec: &FeatureSpec, cfg: &ModelConfig, device: Device) -> Self {
        let _rng = global_rng();
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let e = cfg.embedding_dim;
        let (user_in, item_in) = (spec.user_input_width(e), spec.item_input_width(e));
        let user_mlp = mlp(
            vs.root() / "user",
            user_in,
            &cfg.tower_dims,
            Default::default(),
        );
        let item_mlp = mlp(
            vs.root() / "item",
            item_in,
            &cfg.tower_dims,
            Default::default(),
        );
        let tables = spec
            .tables()
            .iter()
            .map(|t| {
                let table = Tensor::randn([i64::from(t.capacity), e], (Kind::Float, device))
                    * EMBEDDING_INIT_STD;
                // The unknown row starts at zero: until id dropout (or a feature value
                // without a row) trains it, a cold id adds nothing rather than a random
                // vector to its tower's input.
                let _ = table.get(i64::from(UNKNOWN_ROW)).zero_();
                table
            })
            .collect();
        let history_attention = (cfg.history_pooling == HistoryPooling::Attention
            && spec.history_len() > 0)
            .then(|| {
                let p = vs.root() / "user_history";
                let query = p.var(
                    "query",
                    &[e],
                    nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.1,
                    },
                );
                let len = spec.history_len() as i64;
                (query, p.var("age_bias", &[len], nn::Init::Const(0.0)))
            });
        Towers {
            vs,
            user_mlp,
            item_mlp,
            history_attention,
            tables,
            embedding_dim: e,
            similarity: cfg.similarity,
            temperature: cfg.temperature,
            device,
            widths: (user_in, item_in, cfg.tower_dims.clone()),
        }
    }

    /// The device tensors live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Output dimension.
    pub fn output_dim(&self) -> i64 {
        self.user_mlp.last().map_or(0, |l| l.ws.size()[0])
    }

    /// Re-initialises rows of a table (ids evicted from the vocabulary).
    pub fn reset_rows(&mut self, table: usize, rows: &[i64]) {
        if rows.is_empty() {
            return;
        }
        let idx = Tensor::from_slice(rows).to(self.device);
        let fresh = {
            let _rng = global_rng();
            Tensor::randn(
                [rows.len() as i64, self.embedding_dim],
                (Kind::Float, self.device),
            ) * EMBEDDING_INIT_STD
        };
        let _ = self.tables[table].index_copy_(0, &idx, &fresh);
    }

    /// The towers' input: single features' rows, pooled multi-valued features (the user
    /// tower's only one is the history; `attention` pools it, else the mean) and dense values.
    fn embed(
        &self,
        x: &TowerTensors,
        tables: &[Tensor],
        attention: Option<&(Tensor, Tensor)>,
    ) -> Tensor {
        let mut parts = Vec::with_capacity(x.single.len() + x.multi.len() + 1);
        for (t, idx) in &x.single {
            parts.push(tables[*t].index_select(0, idx));
        }
        for (t, idx, mask) in &x.multi {
            let size = idx.size();
            let e = tables[*t].index_select(0, &idx.view([-1])).view([
                size[0],
                size[1],
                self.embedding_dim,
            ]);
            let weights = match attention {
                Some((query, age_bias)) => attention_weights(&e, mask, query, age_bias),
                None => mask / mask.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0),
            };
            parts.push((e * weights.unsqueeze(-1)).sum_dim_intlist(1, false, Kind::Float));
        }
        if let Some(d) = &x.dense {
            parts.push(d.shallow_clone());
        }
        if parts.is_empty() {
            return Tensor::zeros([x.n, 0], (Kind::Float, self.device));
        }
        Tensor::cat(&parts, 1)
    }

    fn head(&self, layers: &[nn::Linear], mut h: Tensor) -> Tensor {
        let last = layers.len().saturating_sub(1);
        for (i, l) in layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = h.relu();
            }
        }
        match self.similarity {
            Similarity::Cosine => {
                let norm = h.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
                h / norm
            }
            Similarity::Dot => h,
        }
    }

    /// User vectors `[n, d]`, indexing `tables` (gathered leaves or [`Self::tables`]).
    pub fn users(&self, x: &TowerTensors, tables: &[Tensor]) -> Tensor {
        let attention = self.history_attention.as_ref();
        self.head(&self.user_mlp, self.embed(x, tables, attention))
    }

    /// Item vectors `[n, d]`.
    pub fn items(&self, x: &TowerTensors, tables: &[Tensor]) -> Tensor {
        self.head(&self.item_mlp, self.embed(x, tables, None))
    }

    /// Serving: user vectors from full tables, without gradients.
    pub fn embed_users(&self, input: &TowerInput) -> Tensor {
        tch::no_grad(|| self.users(&TowerTensors::new(input, None, self.device), &self.tables))
    }

    /// Serving: item vectors from full tables, without gradients.
    pub fn embed_items(&self, input: &TowerInput) -> Tensor {
        tch::no_grad(|| self.items(&TowerTensors::new(input, None, self.device), &self.tables))
    }

    /// Gathers the rows a step uses into leaf tensors that require gradients.
    pub fn gather(&self, g: &RowGather) -> Vec<Tensor> {
        self.tables
            .iter()
            .zip(g.rows())
            .map(|(table, rows)| {
                let idx = Tensor::from_slice(rows).to(self.device);
                table.index_select(0, &idx).set_requires_grad(true)
            })
            .collect()
    }

    /// Every named tensor of the model (MLP variables and tables), for checkpoints.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (format!("mlp.{k}"), t))
            .collect();
        for (i, t) in self.tables.iter().enumerate() {
            v.push((format!("table.{i}"), t.shallow_clone()));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The name of the first tensor (as in [`Self::named_tensors`]) holding a NaN or an
    /// infinity, if any: such a model must not be checkpointed or served.
    pub fn first_non_finite(&self) -> Option<String> {
        first_non_finite(&self.named_tensors())
    }

    /// A deep copy for serving: same weights, no gradients, no draw from the global RNG.
    pub fn snapshot(&self) -> Towers {
        let vs = nn::VarStore::new(self.device);
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let (user_in, item_in, dims) = &self.widths;
        let user_mlp = mlp(vs.root() / "user", *user_in, dims, zero);
        let item_mlp = mlp(vs.root() / "item", *item_in, dims, zero);
        let history_attention = self.history_attention.as_ref().map(|(q, b)| {
            let p = vs.root() / "user_history";
            let zeros = nn::Init::Const(0.0);
            (
                p.var("query", &q.size(), zeros),
                p.var("age_bias", &b.size(), zeros),
            )
        });
        tch::no_grad(|| {
            let src = self.vs.variables();
            for (name, mut dst) in vs.variables() {
                if let Some(t) = src.get(&name) {
                    dst.copy_(t);
                }
            }
        });
        Towers {
            vs,
            user_mlp,
            item_mlp,
            history_attention,
            tables: self.tables.iter().map(|t| t.copy()).collect(),
            embedding_dim: self.embedding_dim,
            similarity: self.similarity,
            temperature: self.temperature,
            device: self.device,
            widths: self.widths.clone(),
        }
    }

    /// Overwrites every weight with `other`'s (same architecture), reusing this instance's
    /// memory: refreshing a retired serving copy costs a memcpy, not fresh pages.
    pub fn copy_from(&mut self, other: &Towers) {
        tch::no_grad(|| {
            let src = other.vs.variables();
            for (name, mut dst) in self.vs.variables() {
                if let Some(t) = src.get(&name) {
                    dst.copy_(t);
                }
            }
            for (dst, src) in self.tables.iter_mut().zip(&other.tables) {
                dst.copy_(src);
            }
        });
    }

    /// Copies of rows `rows` of table `table`: (indices, values `[rows, dim]`).
    pub fn copy_rows(&self, table: usize, rows: &[i64]) -> (Tensor, Tensor) {
        let idx = Tensor::from_slice(rows).to(self.device);
        let values = tch::no_grad(|| self.tables[table].index_select(0, &idx));
        (idx, values)
    }

    /// Copies of the MLP variables, by name.
    pub fn copy_dense(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| {
            self.vs
                .variables()
                .into_iter()
                .map(|(name, t)| (name, t.copy()))
                .collect()
        })
    }

    /// Overwrites MLP variables (by name) and table rows with values copied from another
    /// instance of the same architecture ([`Self::copy_dense`], [`Self::copy_rows`]).
    pub fn overwrite(&mut self, dense: &[(String, Tensor)], rows: &[Option<(Tensor, Tensor)>]) {
        tch::no_grad(|| {
            let mut mine = self.vs.variables();
            for (name, src) in dense {
                if let Some(dst) = mine.get_mut(name) {
                    dst.copy_(src);
                }
            }
            for (table, (idx, values)) in self
                .tables
                .iter_mut()
                .zip(rows)
                .filter_map(|(t, r)| r.as_ref().map(|r| (t, r)))
            {
                let _ = table.index_copy_(0, idx, values);
            }
        });
    }

    /// Width of every embedding table.
    pub fn embedding_dim(&self) -> i64 {
        self.embedding_dim
    }

    /// Cosine or dot.
    pub fn similarity(&self) -> Similarity {
        self.similarity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn attention_pools_only_the_present_items_and_favours_the_ages_it_learned() {
        let d = (Kind::Float, Device::Cpu);
        // Two users, width 3: [a, b, pad] and [pad, pad, pad].
        let e = Tensor::from_slice(&[
            1.0f32, 0.0, 0.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0,
        ])
        .view([2, 3, 2]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0, 0.0, 0.0]).view([2, 3]);
        let query = Tensor::zeros([2], d);
        // A large bias for age 0 (the newest item, b at position 1).
        let age_bias = Tensor::from_slice(&[5.0f32, 0.0, 0.0]);
        let w = attention_weights(&e, &mask, &query, &age_bias);
        let row = |i: i64| Vec::<f32>::try_from(w.get(i)).unwrap();
        let first = row(0);
        assert!((first.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{first:?}");
        assert_eq!(first[2], 0.0, "padding gets no weight");
        assert!(first[1] > 0.99, "the newest item dominates: {first:?}");
        assert_eq!(row(1), vec![0.0; 3], "no history, no weight (and no NaN)");
        // Without a bias and a zero query it is the mean.
        let mean = attention_weights(&e, &mask, &query, &Tensor::zeros([3], d));
        assert_eq!(
            Vec::<f32>::try_from(mean.get(0)).unwrap(),
            vec![0.5, 0.5, 0.0]
        );
    }

    #[test]
    fn attention_towers_snapshot_and_checkpoint_their_pooling_weights() {
        let mut c = Config::default();
        c.features.capacity.clear();
        c.features.default_capacity = 100;
        c.model.history_pooling = HistoryPooling::Attention;
        let spec = FeatureSpec::new(&c.features);
        let towers = Towers::new(&spec, &c.model, Device::Cpu);
        let names: Vec<String> = towers.named_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.iter().any(|n| n.contains("user_history.query")),
            "{names:?}"
        );
        let copy = towers.snapshot();
        let (a, b) = (&towers.history_attention, &copy.history_attention);
        let (Some((qa, _)), Some((qb, _))) = (a, b) else {
            panic!("the snapshot lost the attention weights")
        };
        assert!(qa.allclose(qb, 0.0, 0.0, false));
    }

    #[test]
    fn towers_built_at_the_same_time_still_follow_their_seed() {
        let mut c = Config::default();
        c.features.capacity.clear();
        c.features.default_capacity = 2000;
        let spec = FeatureSpec::new(&c.features);
        let reference = Towers::new(&spec, &c.model, Device::Cpu);
        let mut other = c.model.clone();
        other.seed += 1;
        let built: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let (spec, cfg) = (&spec, if i % 2 == 0 { &c.model } else { &other });
                    s.spawn(move || {
                        let t = Towers::new(spec, cfg, Device::Cpu);
                        Vec::<f32>::try_from(t.tables[0].view([-1])).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = Vec::<f32>::try_from(reference.tables[0].view([-1])).unwrap();
        for (i, t) in built.iter().enumerate() {
            assert_eq!(*t == expected, i % 2 == 0, "towers {i}");
        }
    }
}
