//! One training step on a micro-batch, for every mode, and the state it updates: towers,
//! optimizer, vocabularies, histories, the frequency estimator and the negative pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::changes::{CatchUp, ChangeLog};
use super::estimator::{EstimatorParams, FrequencyEstimator};
use super::memory_bank::MemoryBank;
use super::model::{RowGather, TowerTensors, Towers};
use super::objective::Objective;
use super::optim::{self, Optimizer};
use super::position::PositionBias;
use super::sampler::{ItemPool, Rng};
use crate::catalog::{Catalog, ItemFeatures, SharedCatalog, UserProfile};
use crate::config::{parse_device, Config, Mode, ShownWeighting};
use crate::event::Id;
use crate::example::{Label, TrainingExample};
use crate::features::history::{Histories, SharedHistories};
use crate::features::vocab::Vocab;
use crate::features::{FeatureSpec, ItemRef, ServeRows, TowerInput, TrainRows, UserRef};
use crate::hash::stable_hash;
use crate::metrics::TrainMetrics;

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Loss value (NaN when the step was skipped).
    pub loss: f64,
    /// Positives in the batch.
    pub positives: usize,
    /// All examples in the batch.
    pub examples: usize,
    /// True when the weights were not updated: the batch could not form a loss (e.g. one
    /// positive in in-batch mode) or the step was [`nonfinite`](Self::nonfinite). Its clicks
    /// still entered histories, counts and the estimator.
    pub skipped: bool,
    /// True when the loss or a gradient was NaN or infinite: the step was thrown away before
    /// the optimizer (no weight, embedding row or optimizer state changed).
    pub nonfinite: bool,
    /// Global L2 norm of the gradients before clipping (NaN when no backward pass ran).
    pub grad_norm: f64,
    /// Where the step's time went.
    pub timings: StepTimings,
}

impl StepReport {
    /// The report passed to hooks when no batch arrived.
    pub fn idle() -> StepReport {
        StepReport {
            loss: f64::NAN,
            positives: 0,
            examples: 0,
            skipped: true,
            nonfinite: false,
            grad_norm: f64::NAN,
            timings: StepTimings::default(),
        }
    }

    /// True for [`Self::idle`] reports.
    pub fn is_idle(&self) -> bool {
        self.examples == 0
    }
}

/// Wall time of a step's phases, in seconds (for profiling; see `benches/train.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepTimings {
    /// Histories, estimator, sampling, vocabulary lookups, building index tensors.
    pub encode: f64,
    /// Gathering rows, both towers, the loss.
    pub forward: f64,
    /// Autograd.
    pub backward: f64,
    /// Optimizer updates (dense and rows).
    pub update: f64,
}

/// The trainable state and the step.
pub struct Trainer {
    pub(crate) config: Config,
    pub(crate) spec: FeatureSpec,
    pub(crate) vocabs: Vec<Vocab>,
    /// Shared with serving, which reads the freshest history of a user.
    pub(crate) histories: SharedHistories,
    pub(crate) towers: Towers,
    pub(crate) optim: Optimizer,
    pub(crate) estimator: FrequencyEstimator,
    pub(crate) pool: ItemPool,
    pub(crate) rng: Rng,
    pub(crate) step: i64,
    pub(crate) examples_trained: u64,
    /// Event times of the positives of the last step (freshness sampling).
    last_positive_times: Vec<i64>,
    metrics: Option<TrainMetrics>,
    /// What changed since the last serving snapshot (when a refresher follows this trainer).
    changes: Option<ChangeLog>,
    /// Recent positives' item vectors, extra in-batch negatives (`train.memory_bank`).
    bank: MemoryBank,
    /// Click-through by slate position (weights of shown negatives).
    positions: PositionBias,
}

/// A user (with profile) to embed at serving time.
pub type UserEntry = (Id, Option<Arc<UserProfile>>);
/// An item (with features) to embed at serving time.
pub type ItemEntry = (Id, Option<Arc<ItemFeatures>>);

fn read(h: &SharedHistories) -> std::sync::RwLockReadGuard<'_, Histories> {
    h.read().unwrap_or_else(|p| p.into_inner())
}

/// Counts a batch's impressions by position, then weighs each shown negative by the
/// examination of its position (`train.shown_weighting`), or 1.
fn shown_weights(
    positions: &mut PositionBias,
    weighting: ShownWeighting,
    positives: &[&TrainingExample],
    shown: &[&TrainingExample],
) -> Vec<f32> {
    if weighting == ShownWeighting::None {
        return vec![1.0; shown.len()];
    }
    for e in positives
        .iter()
        .filter(|e| e.label == Label::Click { joined: true })
    {
        if let Some(p) = e.position {
            positions.observe(p, true);
        }
    }
    for e in shown {
        if let Some(p) = e.position {
            positions.observe(p, false);
        }
    }
    shown
        .iter()
        .map(|e| e.position.map_or(1.0, |p| positions.examination(p)))
        .collect()
}

impl Trainer {
    /// A fresh model for `config` (validated).
    pub fn new(config: &Config) -> Trainer {
        let device = parse_device(&config.model.device).unwrap_or(Device::Cpu);
        if config.train.threads > 0 {
            tch::set_num_threads(config.train.threads as i32);
        }
        let spec = FeatureSpec::new(&config.features);
        let vocabs = spec.vocabs(&config.features);
        let towers = Towers::new(&spec, &config.model, device);
        let params = towers.vs.trainable_variables();
        let t = &config.train;
        let optim = Optimizer::new(
            t.optimizer,
            t.lr_dense,
            t.lr_embedding,
            &params,
            &towers.tables,
        );
        Trainer {
            histories: Histories::shared(
                config.features.history_len,
                config.features.max_users_with_history,
            ),
            estimator: FrequencyEstimator::new(EstimatorParams {
                buckets: t.estimator_buckets,
                hashes: t.estimator_hashes,
                alpha: t.estimator_alpha,
            }),
            pool: ItemPool::new(t.negative_distribution),
            bank: MemoryBank::new(t.memory_bank),
            positions: PositionBias::default(),
            rng: Rng::new(config.model.seed),
            config: config.clone(),
            spec,
            vocabs,
            towers,
            optim,
            step: 0,
            examples_trained: 0,
            last_positive_times: Vec::new(),
            metrics: None,
            changes: None,
        }
    }

    /// Reports to these metrics from now on.
    pub fn with_metrics(mut self, m: TrainMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Starts (or restarts) recording what each step changes, for [`Self::take_delta`]. Take
    /// the full copy the deltas apply to right after this call.
    pub fn track_changes(&mut self) {
        self.changes = Some(ChangeLog::new(self.towers.tables.len()));
    }

    /// True once [`Self::track_changes`] was called.
    pub fn is_tracking_changes(&self) -> bool {
        self.changes.is_some()
    }

    /// What changed since tracking started or the previous delta (`None` when not tracking).
    /// Costs O(rows changed), not O(table size).
    pub fn take_delta(&mut self) -> Option<CatchUp> {
        let step = self.step;
        let (towers, vocabs) = (&self.towers, &self.vocabs);
        self.changes.as_mut().map(|c| c.drain(step, towers, vocabs))
    }

    /// Global step (steps taken, including skipped ones).
    pub fn global_step(&self) -> i64 {
        self.step
    }

    /// Examples consumed so far.
    pub fn examples_trained(&self) -> u64 {
        self.examples_trained
    }

    /// The negative pool (click counts, candidates).
    pub fn pool(&self) -> &ItemPool {
        &self.pool
    }

    /// The frequency estimator.
    pub fn estimator(&self) -> &FrequencyEstimator {
        &self.estimator
    }

    /// The towers.
    pub fn towers(&self) -> &Towers {
        &self.towers
    }

    /// The vocabularies, one per table.
    pub fn vocabs(&self) -> &[Vocab] {
        &self.vocabs
    }

    /// Event times of the positives the last step trained on.
    pub fn last_positive_times(&self) -> &[i64] {
        &self.last_positive_times
    }

    /// The feature spec.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// Users' recent clicks.
    pub fn histories(&self) -> SharedHistories {
        Arc::clone(&self.histories)
    }

    /// The metrics it reports to, if any.
    pub(crate) fn metrics(&self) -> Option<&TrainMetrics> {
        self.metrics.as_ref()
    }

    /// The configuration the trainer was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serving-side encoding of users with their current histories.
    pub fn encode_users(&self, users: &[UserEntry]) -> TowerInput {
        let histories = read(&self.histories);
        let refs: Vec<UserRef<'_>> = users
            .iter()
            .map(|(id, p)| UserRef {
                id,
                profile: p.as_deref(),
                history: histories.get(id).collect(),
            })
            .collect();
        self.spec.encode_users(&refs, &mut ServeRows(&self.vocabs))
    }

    /// Serving-side encoding of items.
    pub fn encode_items(&self, items: &[ItemEntry]) -> TowerInput {
        let refs: Vec<ItemRef<'_>> = items
            .iter()
            .map(|(id, f)| ItemRef {
                id,
                features: f.as_deref(),
            })
            .collect();
        self.spec.encode_items(&refs, &mut ServeRows(&self.vocabs))
    }

    /// User vectors `[n, d]` (no gradients).
    pub fn user_vectors(&self, users: &[UserEntry]) -> Tensor {
        self.towers.embed_users(&self.encode_users(users))
    }

    /// Item vectors `[n, d]` (no gradients).
    pub fn item_vectors(&self, items: &[ItemEntry]) -> Tensor {
        self.towers.embed_items(&self.encode_items(items))
    }

    /// One step on a micro-batch.
    pub fn step(&mut self, batch: &[TrainingExample], catalog: &Catalog) -> StepReport {
        let started = Instant::now();
        self.pool.sync(catalog);
        self.train(batch, started)
    }

    /// [`Self::step`] with the catalogue ingestion keeps writing (the online loop): its read
    /// lock is held only while the negative pool catches up, never across the forward,
    /// backward and optimizer passes. With std's writer-preferring `RwLock`, a lock held for a
    /// whole step would make each catalogue write wait for the step, and every recall request
    /// queue behind that writer.
    pub fn step_shared(
        &mut self,
        batch: &[TrainingExample],
        catalog: &SharedCatalog,
    ) -> StepReport {
        let started = Instant::now();
        self.pool.sync_shared(catalog);
        self.train(batch, started)
    }

    fn train(&mut self, batch: &[TrainingExample], started: Instant) -> StepReport {
        self.last_positive_times.clear();
        self.last_positive_times.extend(
            batch
                .iter()
                .filter(|e| e.label.is_positive())
                .map(|e| e.event_time_ms),
        );
        let report = self.step_inner(batch);
        if report.nonfinite {
            tracing::warn!(
                step = self.step,
                loss = report.loss,
                grad_norm = report.grad_norm,
                examples = batch.len(),
                "non-finite loss or gradients: step skipped, weights unchanged"
            );
        }
        self.step += 1;
        self.examples_trained += batch.len() as u64;
        if let Some(m) = &self.metrics {
            m.steps.inc();
            for e in batch {
                m.examples.with_label_values(&[e.label.as_str()]).inc();
            }
            if !report.skipped {
                m.loss.set(report.loss);
            }
            if report.nonfinite {
                m.nonfinite_steps.inc();
            }
            m.step_seconds.observe(started.elapsed().as_secs_f64());
            m.global_step.set(self.step);
            for (t, v) in self.spec.tables().iter().zip(&self.vocabs) {
                m.vocab_rows
                    .with_label_values(&[t.name.as_str()])
                    .set(v.len() as i64);
                m.vocab_admissions
                    .with_label_values(&[t.name.as_str()])
                    .set(v.admissions() as i64);
                m.vocab_evictions
                    .with_label_values(&[t.name.as_str()])
                    .set(v.evictions() as i64);
            }
        }
        report
    }

    /// One step: the batch's positives (and, point-wise, its shown negatives) with their
    /// histories, the estimator fed, negatives sampled, features encoded, loss, backward,
    /// and the update — or a skipped step (nothing to contrast) or a discarded one (non-finite
    /// loss or gradient).
    fn step_inner(&mut self, batch: &[TrainingExample]) -> StepReport {
        let t0 = Instant::now();
        let mode = self.config.train.mode;
        let positives: Vec<&TrainingExample> =
            batch.iter().filter(|e| e.label.is_positive()).collect();
        let shown: Vec<&TrainingExample> = match mode {
            Mode::PointwiseBce => batch
                .iter()
                .filter(|e| e.label == Label::ShownNotClicked)
                .collect(),
            _ => Vec::new(),
        };
        let b = positives.len();
        let skipped = StepReport {
            loss: f64::NAN,
            positives: b,
            examples: batch.len(),
            skipped: true,
            nonfinite: false,
            grad_norm: f64::NAN,
            timings: StepTimings::default(),
        };
        let (pos_history, shown_history) = self.histories_of(&positives, &shown);
        let item_keys = self.observe_positives(&positives);
        if b == 0 || !self.has_negatives(b) {
            return skipped;
        }
        let sampled = self.sample_negatives(b);
        let users: Vec<UserRef<'_>> = positives
            .iter()
            .chain(shown.iter())
            .zip(pos_history.iter().chain(shown_history.iter()))
            .map(|(e, h)| UserRef {
                id: &e.user_id,
                profile: e.user.as_deref(),
                history: h.iter().collect(),
            })
            .collect();
        let items: Vec<ItemRef<'_>> = positives
            .iter()
            .chain(shown.iter())
            .map(|e| ItemRef {
                id: &e.item_id,
                features: e.item.as_deref(),
            })
            .chain(sampled.iter().map(|(id, f)| ItemRef {
                id,
                features: f.as_deref(),
            }))
            .collect();
        let now_ms = batch.iter().map(|e| e.event_time_ms).max().unwrap_or(0);
        let (user_in, item_in) = self.encode(&users, &items, now_ms);

        let device = self.towers.device();
        let mut gather = RowGather::new(self.towers.tables.len());
        let ut = TowerTensors::new(&user_in, Some(&mut gather), device);
        let it = TowerTensors::new(&item_in, Some(&mut gather), device);
        let t1 = Instant::now();
        let leaves = self.towers.gather(&gather);
        let u = self.towers.users(&ut, &leaves);
        let v = self.towers.items(&it, &leaves);
        self.bank.prepare();
        let t = &self.config.train;
        let shown_weights =
            shown_weights(&mut self.positions, t.shown_weighting, &positives, &shown);
        let loss = Objective {
            config: t,
            positives: &positives,
            item_keys: &item_keys,
            shown: &shown,
            shown_weights: &shown_weights,
            sampled: &sampled,
            tau: self.towers.temperature,
            device,
        }
        .loss(mode, &u, &v, &self.estimator, &mut self.pool, &self.bank);
        if mode == Mode::InBatchSoftmax {
            self.bank.push(&v.narrow(0, 0, b as i64), &item_keys);
        }
        let loss_value = loss.double_value(&[]);
        let t2 = Instant::now();
        // A non-finite loss or gradient would reach every weight it touches and stay there:
        // such a step is thrown away before the optimizer sees it.
        let nonfinite = |grad_norm: f64| StepReport {
            nonfinite: true,
            loss: loss_value,
            grad_norm,
            ..skipped
        };
        if !loss_value.is_finite() {
            return nonfinite(f64::NAN);
        }
        loss.backward();
        let t3 = Instant::now();
        let grad_norm = match self.update(&leaves, &gather) {
            Ok(norm) => norm,
            Err(norm) => return nonfinite(norm),
        };
        let t4 = Instant::now();
        StepReport {
            loss: loss_value,
            skipped: false,
            grad_norm,
            timings: StepTimings {
                encode: (t1 - t0).as_secs_f64(),
                forward: (t2 - t1).as_secs_f64(),
                backward: (t3 - t2).as_secs_f64(),
                update: (t4 - t3).as_secs_f64(),
            },
            ..skipped
        }
    }

    /// Each example's history as of its event time (a click before it enters, a shown
    /// negative — emitted when it left the join window — without the clicks that came after
    /// its impression); then the positives' clicks enter the shared histories.
    ///
    /// Worked out on a copy of the batch's users: recall requests read the shared histories,
    /// and a write lock held by this (low-priority) thread across the whole batch made them
    /// wait for it to be scheduled again (up to 8 ms at 1,000 requests/s).
    fn histories_of(
        &self,
        positives: &[&TrainingExample],
        shown: &[&TrainingExample],
    ) -> (Vec<Vec<Id>>, Vec<Vec<Id>>) {
        let mut histories = {
            let shared = self.histories.read().unwrap_or_else(|p| p.into_inner());
            shared.of_users(positives.iter().chain(shown).map(|e| &e.user_id))
        };
        let as_of = |h: &Histories, e: &TrainingExample| -> Vec<Id> {
            h.get_before(&e.user_id, e.event_time_ms).cloned().collect()
        };
        let mut pos_history: Vec<Vec<Id>> = Vec::with_capacity(positives.len());
        for e in positives {
            pos_history.push(as_of(&histories, e));
            histories.push(&e.user_id, &e.item_id, e.event_time_ms);
        }
        let shown_history = shown.iter().map(|e| as_of(&histories, e)).collect();
        let mut shared = self.histories.write().unwrap_or_else(|p| p.into_inner());
        for e in positives {
            shared.push(&e.user_id, &e.item_id, e.event_time_ms);
        }
        (pos_history, shown_history)
    }

    /// Feeds the positives to the estimator, the negative pool and the change log; returns
    /// their item keys.
    ///
    /// The estimator's clock is the stream of positives (one tick each), so p̂ does not depend
    /// on how the stream happened to be cut into batches. The keys are hashed once here for
    /// the estimator, the objective's masks and the memory bank.
    fn observe_positives(&mut self, positives: &[&TrainingExample]) -> Vec<i64> {
        let item_keys: Vec<i64> = (positives.iter())
            .map(|e| stable_hash(e.item_id.as_bytes()) as i64)
            .collect();
        for (e, key) in positives.iter().zip(&item_keys) {
            self.estimator.observe(*key as u64);
            self.pool.record_click(&e.item_id, e.item.as_ref());
            if let Some(c) = self.changes.as_mut() {
                c.click(&e.item_id);
            }
        }
        item_keys
    }

    /// Whether `b` positives have a column to be contrasted with. In-batch softmax has the
    /// batch's other positives, the mixed negatives and the bank — so at a trickle, one click
    /// per batch, it still trains when mixed negatives are on; the other modes sample the pool.
    fn has_negatives(&self, b: usize) -> bool {
        match self.config.train.mode {
            Mode::InBatchSoftmax => {
                b >= 2
                    || (self.config.train.mixed_negatives > 0 && !self.pool.is_empty())
                    || !self.bank.is_empty()
            }
            _ => !self.pool.is_empty(),
        }
    }

    /// Negative items for `b` positives, per mode (they follow the positives' items in every
    /// item list).
    fn sample_negatives(&mut self, b: usize) -> Vec<(Id, Option<Arc<ItemFeatures>>)> {
        let t = &self.config.train;
        match t.mode {
            Mode::InBatchSoftmax => self.pool.sample_uniform(t.mixed_negatives, &mut self.rng),
            Mode::SampledSoftmax | Mode::PointwiseBce => {
                self.pool.sample(b * t.sampled_negatives, &mut self.rng)
            }
            Mode::PairwiseBpr => self.pool.sample(b, &mut self.rng),
        }
    }

    /// The towers' inputs for `users` and `items`, assigning table rows to new ids (with id
    /// dropout) and resetting the rows whose ids expired (TTLs use `now_ms`, the batch's
    /// latest event time); every row assigned or reset goes to the change log.
    fn encode(
        &mut self,
        users: &[UserRef<'_>],
        items: &[ItemRef<'_>],
        now_ms: i64,
    ) -> (TowerInput, TowerInput) {
        let (p_drop, rng) = (self.config.train.id_dropout, &mut self.rng);
        let mut rows = TrainRows::new(&mut self.vocabs);
        if p_drop > 0.0 {
            rows = rows.with_id_dropout(move || rng.next_f64() < p_drop);
        }
        rows.now_ms = now_ms;
        let user_in = self.spec.encode_users(users, &mut rows);
        let item_in = self.spec.encode_items(items, &mut rows);
        if let Some(c) = self.changes.as_mut() {
            for (table, row) in &rows.assigned {
                c.assigned(*table, *row);
            }
        }
        let mut by_table: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for (table, row) in rows.resets {
            by_table.entry(table).or_default().push(i64::from(row));
        }
        for (table, rows) in &by_table {
            self.towers.reset_rows(*table, rows);
            self.optim.reset_rows(*table, rows);
            if let Some(c) = self.changes.as_mut() {
                c.rows(*table, rows);
            }
        }
        (user_in, item_in)
    }

    /// Clips the gradients and steps the optimizer over the dense weights and the gathered
    /// rows; `Ok(norm)`, or `Err(norm)` with the gradients discarded when the norm is not
    /// finite.
    fn update(&mut self, leaves: &[Tensor], gather: &RowGather) -> Result<f64, f64> {
        let params = self.towers.vs.trainable_variables();
        let grad_norm = optim::grad_norm(params.iter().chain(leaves));
        if !grad_norm.is_finite() {
            optim::discard_grads(&params);
            return Err(grad_norm);
        }
        let clip = self.config.train.clip_grad_norm;
        if clip > 0.0 && grad_norm > clip {
            optim::scale_grads(params.iter().chain(leaves), clip / grad_norm);
        }
        self.optim
            .step(&params, &mut self.towers.tables, gather.rows(), leaves);
        if let Some(c) = self.changes.as_mut() {
            for (table, rows) in gather.rows().iter().enumerate() {
                c.rows(table, rows);
            }
        }
        Ok(grad_norm)
    }

    /// Dot-product scores `[users, items]` for evaluation helpers.
    pub fn scores(&self, users: &[UserEntry], items: &[ItemEntry]) -> Tensor {
        let u = self.user_vectors(users);
        let v = self.item_vectors(items);
        tch::no_grad(|| u.matmul(&v.tr())).to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DenseFeature, Entity, Transform};
    use crate::event::Dense;
    use crate::example::Origin;

    fn config() -> Config {
        let mut c = Config::default();
        c.features.capacity.clear();
        c.features.default_capacity = 64;
        c.features.dense = vec![DenseFeature {
            entity: Entity::Item,
            name: "price".into(),
            transform: Transform::Identity,
            mean: 0.0,
            std: 1.0,
        }];
        c.model.tower_dims = vec![16, 8];
        c.train.estimator_buckets = 1 << 10;
        c
    }

    fn item(i: usize, price: f64) -> Arc<ItemFeatures> {
        Arc::new(ItemFeatures {
            item_id: Id::new(format!("i{i}")),
            category: None,
            genres: vec![format!("g{}", i % 3)],
            dense: Dense::from([("price".to_owned(), price)]),
            updated_ms: 0,
        })
    }

    /// Eight clicks of users u0..u7 on items `first..first + 8`, one of them (if any) with
    /// `poisoned` as its price: built directly, as if it had bypassed validation.
    fn batch(first: usize, poisoned: Option<f64>) -> Vec<TrainingExample> {
        (0..8)
            .map(|k| {
                let i = first + k;
                let price = if k == 3 { poisoned } else { None };
                TrainingExample {
                    label: Label::Click { joined: false },
                    user_id: Id::new(format!("u{k}")),
                    item_id: Id::new(format!("i{i}")),
                    user: None,
                    item: Some(item(i, price.unwrap_or(i as f64 / 10.0))),
                    event_time_ms: 1,
                    dwell_ms: None,
                    position: None,
                    origin: Origin {
                        topic: 0,
                        partition: 0,
                        offset: i as i64,
                        epoch: 0,
                    },
                }
            })
            .collect()
    }

    fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v = t.towers.named_tensors();
        v.extend(t.optim.named_tensors());
        v.into_iter().map(|(n, t)| (n, t.copy())).collect()
    }

    #[test]
    fn a_step_with_a_non_finite_loss_or_gradient_is_skipped_and_changes_no_weight() {
        use crate::config::Similarity::{Cosine, Dot};
        // inf as f32 or NaN: a NaN loss. With raw inner products, 1e20 gives a finite loss
        // whose gradients overflow: the backward pass ran, the optimizer must not.
        for (similarity, price, finite_loss) in [
            (Cosine, 1e308, false),
            (Cosine, f64::NAN, false),
            (Dot, 1e20, true),
        ] {
            let case = format!("{similarity:?} {price:e}");
            let mut c = config();
            c.model.similarity = similarity;
            let metrics = crate::metrics::Metrics::new().train;
            let mut t = Trainer::new(&c).with_metrics(metrics.clone());
            let catalog = Catalog::default();
            for first in [0, 8, 0, 8] {
                let r = t.step(&batch(first, None), &catalog);
                assert!(!r.skipped && r.loss.is_finite(), "{case}: {r:?}");
            }
            let (before, optimizer_steps) = (weights(&t), t.optim.steps());
            let r = t.step(&batch(0, Some(price)), &catalog);
            assert!(r.nonfinite && r.skipped, "{case}: {r:?}");
            assert_eq!(r.loss.is_finite(), finite_loss, "{case}: {r:?}");
            assert_eq!(t.optim.steps(), optimizer_steps, "{case}");
            for ((name, a), (_, b)) in before.iter().zip(&weights(&t)) {
                assert!(a.equal(b), "{case}: {name} changed");
            }
            assert_eq!(metrics.nonfinite_steps.get(), 1, "{case}");
            assert!(metrics.loss.get().is_finite(), "{case}");
            // Nothing of the thrown-away step lingers (no gradient left to add to the next).
            let r = t.step(&batch(8, None), &catalog);
            assert!(!r.skipped && r.loss.is_finite(), "{case}: {r:?}");
            assert_eq!(t.towers.first_non_finite(), None, "{case}");
        }
    }

    #[test]
    fn a_batch_of_one_click_trains_against_the_mixed_negatives() {
        // A trickle: one click per batch, no other positive to contrast it with. The mixed
        // negatives (on by default) are its columns.
        let catalog = Catalog::default();
        let mut t = Trainer::new(&config());
        assert!(!t.step(&batch(0, None), &catalog).skipped, "fills the pool");
        let one = &batch(0, None)[..1];
        let before = weights(&t);
        let r = t.step(one, &catalog);
        assert!(!r.skipped && r.loss.is_finite(), "{r:?}");
        let changed = before
            .iter()
            .zip(&weights(&t))
            .any(|((_, a), (_, b))| !a.equal(b));
        assert!(changed, "a lone click moved no weight");
        // Without mixed negatives (and no bank) there is nothing to contrast it with.
        let mut c = config();
        c.train.mixed_negatives = 0;
        let mut bare = Trainer::new(&c);
        assert!(!bare.step(&batch(0, None), &catalog).skipped);
        assert!(bare.step(one, &catalog).skipped);
    }

    #[test]
    fn gradient_clipping_scales_the_gradients_before_the_optimizer() {
        let mut clipped = config();
        // Far below Adam's ε (1e-8): the update g / (|g| + ε) then shrinks with the gradient,
        // where unclipped it is ≈ ±1 per weight whatever the gradient's scale.
        clipped.train.clip_grad_norm = 1e-12;
        let catalog = Catalog::default();
        let (mut a, mut b) = (Trainer::new(&config()), Trainer::new(&clipped));
        let start = weights(&a);
        let (ra, rb) = (
            a.step(&batch(0, None), &catalog),
            b.step(&batch(0, None), &catalog),
        );
        // Same model, same batch: the same gradients before clipping, reported unclipped.
        assert_eq!(ra.grad_norm, rb.grad_norm);
        assert!(ra.grad_norm > 1e-6, "{ra:?}");
        let moved = |t: &Trainer| -> f64 {
            t.towers
                .named_tensors()
                .iter()
                .zip(&start)
                .map(|((_, p), (_, q))| (p - q).abs().sum(Kind::Double).double_value(&[]))
                .sum()
        };
        let (ma, mb) = (moved(&a), moved(&b));
        assert!(mb > 0.0 && mb < ma * 1e-3, "unclipped {ma}, clipped {mb}");
    }
}
