//! Features: from users, items and histories to embedding-table rows and dense values.
//!
//! [`FeatureSpec`] says which features the towers read; it encodes a list of users or items
//! into a [`TowerInput`] (plain vectors of table rows, masks and dense values). Rows come from
//! a [`Rows`] resolver: [`TrainRows`] admits new ids into the dynamic [`vocab::Vocab`]s (and
//! reports reused rows to re-initialise), [`ServeRows`] only looks them up.

pub mod history;
pub mod vocab;

use crate::catalog::{ItemFeatures, UserProfile};
use crate::config::{DenseFeature, Entity, FeaturesConfig, ItemFeature, Transform, UserFeature};
use crate::event::{Dense, Id};
use vocab::{Lookup, Vocab, VocabParams, UNKNOWN_ROW};

/// One embedding table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Feature name (`user_id`, `genres`, ...).
    pub name: String,
    /// Rows.
    pub capacity: u32,
}

/// Tower inputs for `n` entities, as plain vectors (see [`crate::train::model`] for tensors).
#[derive(Debug, Clone, Default)]
pub struct TowerInput {
    /// Entities encoded.
    pub n: usize,
    /// Single-valued features: (table, one row per entity).
    pub single: Vec<(usize, Vec<i64>)>,
    /// Multi-valued features, mean-pooled over unmasked entries: (table, rows `n × width`
    /// row-major, mask `n × width`, width).
    pub multi: Vec<(usize, Vec<i64>, Vec<f32>, usize)>,
    /// Dense values, `n × dense_dim` row-major.
    pub dense: Vec<f32>,
    /// Dense features per entity.
    pub dense_dim: usize,
}

/// Resolves an id of a table to its row.
pub trait Rows {
    /// The row of `key` in `table` (training resolvers may admit it).
    fn row(&mut self, table: usize, key: &str) -> u32;
    /// The row of `key` in `table` without admitting or touching it.
    fn peek(&self, table: usize, key: &str) -> u32;
    /// The row of a user or item *id* (the features a cold entity lacks): [`Rows::row`], or,
    /// under id dropout in training, sometimes the unknown row, so that row learns what a
    /// cold id is served with.
    fn id_row(&mut self, table: usize, key: &str) -> u32 {
        self.row(table, key)
    }
}

/// Training-time resolver: admits, touches, and collects rows to re-initialise.
pub struct TrainRows<'a> {
    vocabs: &'a mut [Vocab],
    /// Event time used for TTLs.
    pub now_ms: i64,
    /// (table, row) pairs reused from evicted ids: re-initialise before use.
    pub resets: Vec<(usize, u32)>,
    /// (table, row) pairs given to a new id (admitted or reused).
    pub assigned: Vec<(usize, u32)>,
    /// Id dropout: true when this id lookup should use the unknown row (`train.id_dropout`).
    drop_id: Option<Box<dyn FnMut() -> bool + 'a>>,
}

impl<'a> TrainRows<'a> {
    /// A resolver over the space's vocabularies.
    pub fn new(vocabs: &'a mut [Vocab]) -> Self {
        TrainRows {
            vocabs,
            now_ms: 0,
            resets: Vec::new(),
            assigned: Vec::new(),
            drop_id: None,
        }
    }

    /// Id dropout: each id lookup for which `drop` says true uses the unknown row (the id is
    /// still admitted and touched, so it keeps its own row for the next time).
    pub fn with_id_dropout(mut self, drop: impl FnMut() -> bool + 'a) -> Self {
        self.drop_id = Some(Box::new(drop));
        self
    }
}

impl Rows for TrainRows<'_> {
    fn row(&mut self, table: usize, key: &str) -> u32 {
        let lookup = self.vocabs[table].lookup(key, self.now_ms);
        match lookup {
            Lookup::Evicted(row) => {
                self.resets.push((table, row));
                self.assigned.push((table, row));
            }
            Lookup::Admitted(row) => self.assigned.push((table, row)),
            Lookup::Hit(_) | Lookup::Unknown => {}
        }
        lookup.row()
    }

    fn peek(&self, table: usize, key: &str) -> u32 {
        self.vocabs[table].get(key)
    }

    fn id_row(&mut self, table: usize, key: &str) -> u32 {
        let row = self.row(table, key);
        match self.drop_id.as_mut().map(|drop| drop()) {
            Some(true) => UNKNOWN_ROW,
            _ => row,
        }
    }
}

/// Serving-time resolver: lookups only; unknown ids map to the unknown row.
pub struct ServeRows<'a>(pub &'a [Vocab]);

impl Rows for ServeRows<'_> {
    fn row(&mut self, table: usize, key: &str) -> u32 {
        self.0[table].get(key)
    }

    fn peek(&self, table: usize, key: &str) -> u32 {
        self.0[table].get(key)
    }
}

/// A user to encode.
pub struct UserRef<'a> {
    /// The id.
    pub id: &'a Id,
    /// Profile, when known.
    pub profile: Option<&'a UserProfile>,
    /// Recent clicked items, oldest first (at most `history_len` are used).
    pub history: Vec<&'a Id>,
}

/// An item to encode.
pub struct ItemRef<'a> {
    /// The id.
    pub id: &'a Id,
    /// Catalogue features, when known.
    pub features: Option<&'a ItemFeatures>,
}

/// Which features the towers read, and their tables.
#[derive(Debug, Clone)]
pub struct FeatureSpec {
    user: Vec<(UserFeature, usize)>,
    item: Vec<(ItemFeature, usize)>,
    dense_user: Vec<DenseFeature>,
    dense_item: Vec<DenseFeature>,
    history_len: usize,
    item_id_table: usize,
    tables: Vec<TableInfo>,
}

fn user_name(f: UserFeature) -> &'static str {
    match f {
        UserFeature::UserId => "user_id",
        UserFeature::Gender => "gender",
        UserFeature::Age => "age",
        UserFeature::Occupation => "occupation",
        UserFeature::Zip => "zip",
    }
}

fn item_name(f: ItemFeature) -> &'static str {
    match f {
        ItemFeature::ItemId => "item_id",
        ItemFeature::Category => "category",
        ItemFeature::Genres => "genres",
    }
}

fn dense_value(spec: &DenseFeature, values: Option<&Dense>) -> f32 {
    match values.and_then(|d| d.get(&spec.name)) {
        None => 0.0,
        Some(x) => {
            let t = match spec.transform {
                Transform::Identity => *x,
                Transform::Log1p => x.max(0.0).ln_1p(),
            };
            ((t - spec.mean) / spec.std) as f32
        }
    }
}

impl FeatureSpec {
    /// The spec of a configuration (validated: `item` contains `item_id`).
    pub fn new(cfg: &FeaturesConfig) -> Self {
        let mut tables = Vec::new();
        let mut table = |name: &str| {
            let capacity = cfg
                .capacity
                .get(name)
                .copied()
                .unwrap_or(cfg.default_capacity);
            tables.push(TableInfo {
                name: name.to_owned(),
                capacity,
            });
            tables.len() - 1
        };
        let user: Vec<(UserFeature, usize)> = cfg
            .user
            .iter()
            .map(|f| (*f, table(user_name(*f))))
            .collect();
        let item: Vec<(ItemFeature, usize)> = cfg
            .item
            .iter()
            .map(|f| (*f, table(item_name(*f))))
            .collect();
        let item_id_table = item
            .iter()
            .find(|(f, _)| *f == ItemFeature::ItemId)
            .map_or(0, |(_, t)| *t);
        FeatureSpec {
            user,
            item,
            dense_user: cfg
                .dense
                .iter()
                .filter(|d| d.entity == Entity::User)
                .cloned()
                .collect(),
            dense_item: cfg
                .dense
                .iter()
                .filter(|d| d.entity == Entity::Item)
                .cloned()
                .collect(),
            history_len: cfg.history_len,
            item_id_table,
            tables,
        }
    }

    /// Fresh vocabularies for every table.
    pub fn vocabs(&self, cfg: &FeaturesConfig) -> Vec<Vocab> {
        self.tables
            .iter()
            .map(|t| {
                Vocab::new(VocabParams {
                    capacity: t.capacity,
                    min_count: cfg.min_count,
                    ttl_ms: cfg.ttl_ms,
                })
            })
            .collect()
    }

    /// The embedding tables, in index order.
    pub fn tables(&self) -> &[TableInfo] {
        &self.tables
    }

    /// Index of the item-id table (shared by the history feature).
    pub fn item_id_table(&self) -> usize {
        self.item_id_table
    }

    /// Tables the user tower reads: its own features' and, with histories, the item-id table.
    pub fn user_tables(&self) -> Vec<usize> {
        let mut tables: Vec<usize> = self.user.iter().map(|(_, t)| *t).collect();
        if self.history_len > 0 {
            tables.push(self.item_id_table);
        }
        tables.sort_unstable();
        tables.dedup();
        tables
    }

    /// History length used.
    pub fn history_len(&self) -> usize {
        self.history_len
    }

    /// Width of the user tower's input for embedding width `e`.
    pub fn user_input_width(&self, e: i64) -> i64 {
        let history = i64::from(self.history_len > 0);
        (self.user.len() as i64 + history) * e + self.dense_user.len() as i64
    }

    /// Width of the item tower's input for embedding width `e`.
    pub fn item_input_width(&self, e: i64) -> i64 {
        self.item.len() as i64 * e + self.dense_item.len() as i64
    }

    /// Encodes users (history entries resolve through the item-id table, never admitted).
    pub fn encode_users(&self, users: &[UserRef<'_>], rows: &mut dyn Rows) -> TowerInput {
        let n = users.len();
        let mut single: Vec<(usize, Vec<i64>)> = self
            .user
            .iter()
            .map(|(_, t)| (*t, Vec::with_capacity(n)))
            .collect();
        for u in users {
            for ((f, table), (_, out)) in self.user.iter().zip(single.iter_mut()) {
                let p = u.profile;
                let row = match f {
                    UserFeature::UserId => rows.id_row(*table, u.id.as_str()),
                    UserFeature::Gender => p
                        .and_then(|p| p.gender.as_deref())
                        .map_or(UNKNOWN_ROW, |v| rows.row(*table, v)),
                    UserFeature::Age => p
                        .and_then(|p| p.age)
                        .map_or(UNKNOWN_ROW, |a| rows.row(*table, &a.to_string())),
                    UserFeature::Occupation => p
                        .and_then(|p| p.occupation.as_deref())
                        .map_or(UNKNOWN_ROW, |v| rows.row(*table, v)),
                    UserFeature::Zip => p
                        .and_then(|p| p.zip.as_deref())
                        .map_or(UNKNOWN_ROW, |v| rows.row(*table, v)),
                };
                out.push(i64::from(row));
            }
        }
        let mut multi = Vec::new();
        if self.history_len > 0 {
            let w = self.history_len;
            let mut idx = vec![0i64; n * w];
            let mut mask = vec![0f32; n * w];
            for (i, u) in users.iter().enumerate() {
                let skip = u.history.len().saturating_sub(w);
                for (j, item) in u.history.iter().skip(skip).enumerate() {
                    let row = rows.peek(self.item_id_table, item.as_str());
                    // Items that lost their row (evicted) are masked rather than mislabelled.
                    if row != UNKNOWN_ROW {
                        idx[i * w + j] = i64::from(row);
                        mask[i * w + j] = 1.0;
                    }
                }
            }
            multi.push((self.item_id_table, idx, mask, w));
        }
        let dense_dim = self.dense_user.len();
        let mut dense = Vec::with_capacity(n * dense_dim);
        for u in users {
            for d in &self.dense_user {
                dense.push(dense_value(d, u.profile.map(|p| &p.dense)));
            }
        }
        TowerInput {
            n,
            single,
            multi,
            dense,
            dense_dim,
        }
    }

    /// Encodes items.
    pub fn encode_items(&self, items: &[ItemRef<'_>], rows: &mut dyn Rows) -> TowerInput {
        let n = items.len();
        let mut single = Vec::new();
        let mut multi = Vec::new();
        for (f, table) in &self.item {
            match f {
                ItemFeature::ItemId => single.push((
                    *table,
                    items
                        .iter()
                        .map(|it| i64::from(rows.id_row(*table, it.id.as_str())))
                        .collect(),
                )),
                ItemFeature::Category => single.push((
                    *table,
                    items
                        .iter()
                        .map(|it| {
                            it.features
                                .and_then(|f| f.category.as_deref())
                                .map_or(0, |c| i64::from(rows.row(*table, c)))
                        })
                        .collect(),
                )),
                ItemFeature::Genres => {
                    let w = items
                        .iter()
                        .map(|it| it.features.map_or(0, |f| f.genres.len()))
                        .max()
                        .unwrap_or(0)
                        .max(1);
                    let mut idx = vec![0i64; n * w];
                    let mut mask = vec![0f32; n * w];
                    for (i, it) in items.iter().enumerate() {
                        for (j, g) in it.features.iter().flat_map(|f| f.genres.iter()).enumerate() {
                            idx[i * w + j] = i64::from(rows.row(*table, g));
                            mask[i * w + j] = 1.0;
                        }
                    }
                    multi.push((*table, idx, mask, w));
                }
            }
        }
        let dense_dim = self.dense_item.len();
        let mut dense = Vec::with_capacity(n * dense_dim);
        for it in items {
            for d in &self.dense_item {
                dense.push(dense_value(d, it.features.map(|f| &f.dense)));
            }
        }
        TowerInput {
            n,
            single,
            multi,
            dense,
            dense_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_profiles_histories_and_genres() {
        let cfg = FeaturesConfig {
            history_len: 3,
            ..FeaturesConfig::default()
        };
        let spec = FeatureSpec::new(&cfg);
        let mut vocabs = spec.vocabs(&cfg);
        let (a, b) = (Id::new("a"), Id::new("b"));
        let feats = ItemFeatures {
            item_id: a.clone(),
            category: None,
            genres: vec!["x".into(), "y".into()],
            dense: Dense::new(),
            updated_ms: 0,
        };
        let mut rows = TrainRows::new(&mut vocabs);
        let items = spec.encode_items(
            &[
                ItemRef {
                    id: &a,
                    features: Some(&feats),
                },
                ItemRef {
                    id: &b,
                    features: None,
                },
            ],
            &mut rows,
        );
        assert_eq!(items.single[0].1, vec![1, 2]);
        let (_, idx, mask, w) = &items.multi[0];
        assert_eq!((*w, &mask[..]), (2, &[1.0, 1.0, 0.0, 0.0][..]));
        assert_ne!(idx[0], idx[1]);
        drop(rows);

        let u = Id::new("u");
        let users = spec.encode_users(
            &[UserRef {
                id: &u,
                profile: None,
                history: vec![&b, &a, &Id::new("never")],
            }],
            &mut ServeRows(&vocabs),
        );
        // Unknown user → row 0; history [b, a, never] → rows [2, 1, masked].
        assert_eq!(users.single[0].1, vec![0]);
        let (t, idx, mask, _) = &users.multi[0];
        assert_eq!(*t, spec.item_id_table());
        assert_eq!(
            (&idx[..], &mask[..]),
            (&[2, 1, 0][..], &[1.0, 1.0, 0.0][..])
        );
    }

    /// Every value an event may carry, standardised by every configuration that validates,
    /// is finite in f32 (the bounds of `event::MAX_DENSE_ABS` and `MIN_DENSE_STD`).
    #[test]
    fn accepted_dense_values_stay_finite_in_f32_under_the_extreme_valid_configurations() {
        use crate::event::{MAX_DENSE_ABS, MIN_DENSE_STD};
        for transform in [Transform::Identity, Transform::Log1p] {
            for mean in [-MAX_DENSE_ABS, 0.0, MAX_DENSE_ABS] {
                let mut cfg = crate::config::Config::default();
                cfg.features.dense = vec![DenseFeature {
                    entity: Entity::Item,
                    name: "x".into(),
                    transform,
                    mean,
                    std: MIN_DENSE_STD,
                }];
                cfg.validate().expect("an extreme but valid configuration");
                for x in [-MAX_DENSE_ABS, -1.0, 0.0, 1e-300, MAX_DENSE_ABS] {
                    let v = dense_value(
                        &cfg.features.dense[0],
                        Some(&Dense::from([("x".into(), x)])),
                    );
                    assert!(v.is_finite(), "{transform:?} mean {mean:e} x {x:e}: {v}");
                }
            }
        }
    }
}
