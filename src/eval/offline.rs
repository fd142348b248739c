//! The article's protocol: leave the last interaction of each user out, train on the rest in
//! time order (one streaming pass, or more epochs), then rank every item for every user.
//!
//! During the first pass the run is also *prequential* (test-then-train): before a batch is
//! trained on, each of its clicks is ranked by the current model, so the curve of Recall@K
//! over the stream shows how fast the model learns.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::metrics::{rank_of, summarize, MetricTable};
use crate::catalog::{Catalog, ItemFeatures};
use crate::config::{Config, IndexConfig};
use crate::data::{Dataset, Interaction};
use crate::event::Id;
use crate::example::{Label, Origin, TrainingExample};
use crate::index::ItemIndex;
use crate::train::trainer::{ItemEntry, UserEntry};
use crate::train::Trainer;

/// Train and test parts of a leave-last-out split.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Everything but each user's last interaction, in time order.
    pub train: Vec<Interaction>,
    /// Each user's last interaction (users with at least two), in time order.
    pub test: Vec<Interaction>,
}

/// Splits time-ordered interactions: each user's last one (ties: the later in the input) is
/// the target; users with a single interaction only train.
pub fn leave_last_out(interactions: &[Interaction]) -> Split {
    let mut last: HashMap<&Id, usize> = HashMap::new();
    let mut count: HashMap<&Id, usize> = HashMap::new();
    for (i, x) in interactions.iter().enumerate() {
        last.insert(&x.user_id, i);
        *count.entry(&x.user_id).or_insert(0) += 1;
    }
    let held: HashSet<usize> = last
        .iter()
        .filter(|(u, _)| count[*u] >= 2)
        .map(|(_, &i)| i)
        .collect();
    let mut s = Split::default();
    for (i, x) in interactions.iter().enumerate() {
        if held.contains(&i) {
            s.test.push(x.clone());
        } else {
            s.train.push(x.clone());
        }
    }
    s
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Passes over the training part (1 = the single streaming pass).
    pub epochs: usize,
    /// Cut-offs to report.
    pub ks: Vec<usize>,
    /// K of the prequential Recall@K.
    pub prequential_k: usize,
    /// Also search an HNSW index (not only exact scoring).
    pub ann: bool,
    /// Show progress bars.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            epochs: 1,
            ks: super::metrics::DEFAULT_KS.to_vec(),
            prequential_k: 100,
            ann: true,
            progress: false,
        }
    }
}

/// One point of the prequential curve (per batch of the first pass).
#[derive(Debug, Clone, Serialize)]
pub struct PrequentialPoint {
    /// Training examples seen before this batch.
    pub examples: u64,
    /// Share of this batch's clicks whose item was in the user's top-K before training on it.
    pub recall: f64,
    /// Loss of the step on this batch.
    pub loss: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Dataset name.
    pub dataset: String,
    /// Users, items, interactions in the dataset.
    pub users: usize,
    /// Items in the catalogue.
    pub items: usize,
    /// Training interactions.
    pub train_interactions: usize,
    /// Users with a held-out target.
    pub test_users: usize,
    /// Passes over the training part.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Training examples processed (train interactions × epochs).
    pub examples: u64,
    /// Wall time of the training steps alone (no evaluation inside).
    pub train_seconds: f64,
    /// `examples / train_seconds`.
    pub examples_per_second: f64,
    /// Leave-last-out metrics, exact scoring over every item.
    pub exact: MetricTable,
    /// The same through the HNSW index (when enabled).
    pub ann: Option<MetricTable>,
    /// Baseline: items ranked by their training clicks (same exclusions).
    pub most_popular: MetricTable,
    /// K of the prequential curve.
    pub prequential_k: usize,
    /// Prequential Recall@K over the whole first pass.
    pub prequential_recall: f64,
    /// The prequential curve, one point per batch of the first pass.
    pub prequential: Vec<PrequentialPoint>,
}

/// A finished run: the report and what produced it (for exports).
pub struct Outcome {
    /// Metrics and timings.
    pub report: Report,
    /// The split used.
    pub split: Split,
    /// The trained model.
    pub trainer: Trainer,
    /// Catalogue and profiles.
    pub catalog: Catalog,
}

fn example(x: &Interaction, n: usize, catalog: &Catalog) -> TrainingExample {
    TrainingExample {
        label: Label::Click { joined: false },
        user_id: x.user_id.clone(),
        item_id: x.item_id.clone(),
        user: catalog.user(&x.user_id),
        item: catalog.item(&x.item_id),
        event_time_ms: x.time_ms,
        dwell_ms: None,
        position: None,
        origin: Origin {
            topic: 0,
            partition: 0,
            offset: n as i64,
            epoch: 0,
        },
    }
}

/// All catalogue items in id order, as tower inputs.
pub(super) fn item_entries(catalog: &Catalog) -> Vec<ItemEntry> {
    let mut items: Vec<Arc<ItemFeatures>> = catalog.items().cloned().collect();
    items.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    items
        .into_iter()
        .map(|f| (f.item_id.clone(), Some(f)))
        .collect()
}

/// A tensor's values as `f32`, row-major.
pub(super) fn to_vec(t: &tch::Tensor) -> Vec<f32> {
    let t = t.to_kind(tch::Kind::Float).contiguous().view([-1]);
    Vec::<f32>::try_from(&t).unwrap_or_default()
}

/// User vectors, item vectors and their score matrix (`users × items`, row-major), with the
/// popularity prior of `eval.popularity_prior` added to the scores.
fn score(
    trainer: &Trainer,
    users: &[UserEntry],
    items: &[ItemEntry],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let u = trainer.user_vectors(users);
    let v = trainer.item_vectors(items);
    let s = tch::no_grad(|| u.matmul(&v.tr()));
    let mut s = to_vec(&s);
    add_popularity_prior(trainer, items, &mut s);
    (to_vec(&u), to_vec(&v), s)
}

/// Adds `τ·β·log p̂(item)` to every row of `scores` (`users × items`), β =
/// `eval.popularity_prior`: ranking by `s/τ + β·log p̂` puts back the popularity the log-Q
/// correction took out of the learned score.
pub(super) fn add_popularity_prior(trainer: &Trainer, items: &[ItemEntry], scores: &mut [f32]) {
    let beta = trainer.config().eval.popularity_prior;
    if beta == 0.0 || items.is_empty() {
        return;
    }
    let tau = trainer.towers().temperature;
    let prior: Vec<f32> = (items.iter())
        .map(|(id, _)| {
            let p = trainer
                .estimator()
                .probability(crate::hash::stable_hash(id.as_bytes()));
            (tau * beta * f64::from(p).ln()) as f32
        })
        .collect();
    for row in scores.chunks_exact_mut(items.len()) {
        for (s, p) in row.iter_mut().zip(&prior) {
            *s += p;
        }
    }
}

fn bar(progress: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(what.to_owned());
    b
}

/// Runs the protocol on `dataset` with the model and training settings of `config`.
pub fn run(dataset: &Dataset, config: &Config, opts: &Options) -> Outcome {
    let catalog = dataset.catalog();
    let split = leave_last_out(&dataset.interactions);
    let mut trainer = Trainer::new(config);
    let items = item_entries(&catalog);
    let item_index: HashMap<&Id, usize> = items
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id, i))
        .collect();
    let batch = config.train.batch_size.max(1);
    let train: Vec<TrainingExample> = split
        .train
        .iter()
        .enumerate()
        .map(|(n, x)| example(x, n, &catalog))
        .collect();

    let mut train_seconds = 0.0;
    let mut curve = Vec::new();
    let (mut pre_hits, mut pre_total) = (0u64, 0u64);
    let mut seen: HashMap<Id, HashSet<usize>> = HashMap::new();
    let k = opts.prequential_k;
    for epoch in 0..opts.epochs.max(1) {
        // Each pass rebuilds histories from its own past: no later click leaks into them.
        trainer
            .histories()
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let b = bar(
            opts.progress,
            train.len() as u64,
            &format!("epoch {}", epoch + 1),
        );
        for (i, chunk) in train.chunks(batch).enumerate() {
            let mut recall = f64::NAN;
            if epoch == 0 && k > 0 {
                // Test, then train: rank each click with the model as it is now.
                let users: Vec<UserEntry> = chunk
                    .iter()
                    .map(|e| (e.user_id.clone(), e.user.clone()))
                    .collect();
                let (_, _, scores) = score(&trainer, &users, &items);
                let mut hits = 0u64;
                for (e, row) in chunk.iter().zip(scores.chunks_exact(items.len().max(1))) {
                    let Some(&target) = item_index.get(&e.item_id) else {
                        continue;
                    };
                    let past = seen.get(&e.user_id);
                    let r = rank_of(row, target, |j| past.is_some_and(|p| p.contains(&j)));
                    hits += u64::from(r < k);
                }
                for e in chunk {
                    if let Some(&j) = item_index.get(&e.item_id) {
                        seen.entry(e.user_id.clone()).or_default().insert(j);
                    }
                }
                pre_hits += hits;
                pre_total += chunk.len() as u64;
                recall = hits as f64 / chunk.len().max(1) as f64;
            }
            let started = Instant::now();
            let report = trainer.step(chunk, &catalog);
            train_seconds += started.elapsed().as_secs_f64();
            if epoch == 0 {
                curve.push(PrequentialPoint {
                    examples: (i * batch) as u64,
                    recall,
                    loss: report.loss,
                });
            }
            b.inc(chunk.len() as u64);
        }
        b.finish_and_clear();
    }

    // Leave-last-out: rank every item for each test user, excluding what they trained on —
    // except the target itself, which a user may consume again (repeats).
    let mut train_items: HashMap<&Id, HashSet<usize>> = HashMap::new();
    for x in &split.train {
        if let Some(&j) = item_index.get(&x.item_id) {
            train_items.entry(&x.user_id).or_default().insert(j);
        }
    }
    let users: Vec<UserEntry> = split
        .test
        .iter()
        .map(|x| (x.user_id.clone(), catalog.user(&x.user_id)))
        .collect();
    let (u, v, scores) = score(&trainer, &users, &items);
    let dim = v.len() / items.len().max(1);
    let none = HashSet::new();
    let mut exact_ranks = Vec::with_capacity(split.test.len());
    for (x, row) in split
        .test
        .iter()
        .zip(scores.chunks_exact(items.len().max(1)))
    {
        let past = train_items.get(&x.user_id).unwrap_or(&none);
        exact_ranks.push(
            item_index
                .get(&x.item_id)
                .map(|&t| rank_of(row, t, |j| past.contains(&j))),
        );
    }
    let mut clicks = vec![0f32; items.len()];
    for x in &split.train {
        if let Some(&j) = item_index.get(&x.item_id) {
            clicks[j] += 1.0;
        }
    }
    let popular_ranks: Vec<Option<usize>> = split
        .test
        .iter()
        .map(|x| {
            let past = train_items.get(&x.user_id).unwrap_or(&none);
            let t = *item_index.get(&x.item_id)?;
            Some(rank_of(&clicks, t, |j| past.contains(&j)))
        })
        .collect();
    let top = opts.ks.iter().copied().max().unwrap_or(100).max(100);
    let ann = opts.ann.then(|| {
        let index = ItemIndex::build(
            &v,
            dim,
            trainer.towers().similarity(),
            &IndexConfig::default(),
        );
        let ranks: Vec<Option<usize>> = split
            .test
            .iter()
            .zip(u.chunks_exact(dim.max(1)))
            .map(|(x, uv)| {
                let past = train_items.get(&x.user_id).unwrap_or(&none);
                let target = *item_index.get(&x.item_id)? as u64;
                let index = index.as_ref().ok()?;
                // Over-fetch and drop the user's past items afterwards: HNSW's filtered search
                // degrades when the filter rejects a large share of the graph.
                let hits = index.search(uv, top + past.len(), |_| true).ok()?;
                hits.iter()
                    .filter(|h| h.key == target || !past.contains(&(h.key as usize)))
                    .take(top)
                    .position(|h| h.key == target)
            })
            .collect();
        summarize(&ranks, &opts.ks)
    });
    let examples = (train.len() * opts.epochs.max(1)) as u64;
    let report = Report {
        dataset: dataset.name.clone(),
        users: dataset.users.len(),
        items: items.len(),
        train_interactions: split.train.len(),
        test_users: split.test.len(),
        epochs: opts.epochs.max(1),
        batch_size: batch,
        examples,
        train_seconds,
        examples_per_second: examples as f64 / train_seconds.max(1e-9),
        exact: summarize(&exact_ranks, &opts.ks),
        ann,
        most_popular: summarize(&popular_ranks, &opts.ks),
        prequential_k: k,
        prequential_recall: pre_hits as f64 / pre_total.max(1) as f64,
        prequential: curve,
    };
    Outcome {
        report,
        split,
        trainer,
        catalog,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(u: &str, i: &str, t: i64) -> Interaction {
        Interaction {
            user_id: Id::new(u),
            item_id: Id::new(i),
            time_ms: t,
        }
    }

    #[test]
    fn the_last_interaction_of_each_user_is_held_out() {
        let s = leave_last_out(&[
            x("a", "1", 1),
            x("b", "2", 2),
            x("a", "3", 3),
            x("c", "4", 4),
            x("b", "5", 5),
        ]);
        assert_eq!(s.test, vec![x("a", "3", 3), x("b", "5", 5)]);
        assert_eq!(
            s.train,
            vec![x("a", "1", 1), x("b", "2", 2), x("c", "4", 4)]
        );
    }
}
