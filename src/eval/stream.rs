//! Evaluating on an event stream — impressions and clicks as a topic carries them (what
//! `towerstream gen` writes) — through the service's own event pipeline.
//!
//! Every line goes through [`EventPipeline`] exactly as a consumed message would: parsing,
//! validation, the time rules, the per-partition join, and the shown-not-clicked negatives of
//! the configured mode; table events update the catalogue as they arrive. The examples are
//! cut into batches of `train.batch_size` in arrival order and trained test-then-train: before
//! a batch is trained on, each of its clicks is ranked among the items then in the catalogue
//! (the user's earlier clicks excluded, as the API does by default). Prequential Recall@K is
//! the share of clicks found in the top K.
//!
//! For a stream from the generator (its `<file>.world.json` beside it), the truth is scored
//! the same way: the generator's click propensities at the click's time, ranked with the same
//! exclusions. The gap between the two says how much of what is learnable was learned.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::metrics::rank_of;
use super::offline::{add_popularity_prior, item_entries, to_vec};
use crate::catalog::{Catalog, SharedCatalog};
use crate::config::Config;
use crate::event::Id;
use crate::example::{Origin, TrainingExample};
use crate::ingest::pipeline::EventPipeline;
use crate::join::{JoinOutput, Joiner};
use crate::metrics::Metrics;
use crate::synth::stream::{Stream, StreamConfig};
use crate::train::trainer::UserEntry;
use crate::train::Trainer;

/// What a prequential run over a stream measured.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    /// Lines read.
    pub events: usize,
    /// Lines the pipeline refused (malformed, outside the time rules).
    pub rejected: usize,
    /// Training examples the pipeline emitted (clicks and, in point-wise mode, shown ones).
    pub examples: u64,
    /// Steps trained.
    pub steps: u64,
    /// Positives per step (the batch's share spent on clicks).
    pub positives_per_step: f64,
    /// Clicks ranked before being trained on.
    pub clicks: u64,
    /// K of the recall.
    pub k: usize,
    /// Prequential Recall@K of the model.
    pub recall: f64,
    /// Its standard error (binomial).
    pub recall_se: f64,
    /// Prequential Recall@K of the generator's truth, when known.
    pub truth_recall: Option<f64>,
    /// Prequential Recall@K of the informed observer, when the truth is known: the generator's
    /// item vectors, popularity and each user's starting taste, with the drift estimated from
    /// the user's earlier clicks (see [`Truth::observer_hit`]) — a bound on what a model that
    /// learns everything but the drift could reach.
    pub observer_recall: Option<f64>,
    /// Prequential Recall@K of the most clicked items so far (the same exclusions).
    pub popular_recall: f64,
    /// Training examples per second (steps alone).
    pub examples_per_second: f64,
    /// The same three recalls over the last quarter of the clicks: where the one pass has
    /// arrived, without the cold start that the whole-stream average carries.
    pub late: LateRecall,
    /// The learning curve: the three recalls over each tenth of the clicks, in stream order.
    pub curve: Vec<CurvePoint>,
}

/// Recall@K of the model, the truth and most-popular over a stretch of the clicks.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CurvePoint {
    /// Clicks ranked up to the end of the stretch (from the start of the stream).
    pub clicks_upto: u64,
    /// The model's Recall@K over the stretch.
    pub model: f64,
    /// The truth's, when known.
    pub truth: Option<f64>,
    /// The informed observer's, when the truth is known.
    pub observer: Option<f64>,
    /// Most-popular's.
    pub popular: f64,
}

/// Recall@K over the last quarter of the clicks, with the model's standard error.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LateRecall {
    /// The recalls.
    pub recall: CurvePoint,
    /// Standard error of the model's (binomial).
    pub se: f64,
}

/// The lines of an events file (JSON lines), and the generator's configuration when a
/// `<file>.world.json` lies beside it.
pub fn load(path: &Path) -> std::io::Result<(Vec<Vec<u8>>, Option<StreamConfig>)> {
    let text = std::fs::read(path)?;
    let lines = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect();
    let world = path.with_extension("world.json");
    let truth = std::fs::read(&world)
        .ok()
        .and_then(|b| serde_json::from_slice::<StreamConfig>(&b).ok());
    Ok((lines, truth))
}

/// True when `path` looks like an events file rather than an interactions dataset.
pub fn is_events_file(path: &Path) -> bool {
    path.is_file() && path.with_extension("world.json").is_file()
        || std::fs::read(path)
            .ok()
            .and_then(|b| {
                let first = b.split(|c| *c == b'\n').next()?.to_vec();
                let v: serde_json::Value = serde_json::from_slice(&first).ok()?;
                Some(v.get("type").is_some())
            })
            .unwrap_or(false)
}

/// The generator's truth, by id.
struct Truth {
    stream: Stream,
    users: HashMap<Id, usize>,
    items: HashMap<Id, usize>,
}

impl Truth {
    fn new(config: StreamConfig) -> Truth {
        let stream = Stream::new(config);
        let users = (stream.world.users.iter().enumerate())
            .map(|(i, u)| (u.id.clone(), i))
            .collect();
        let items = (stream.world.items.iter().enumerate())
            .map(|(j, it)| (it.id.clone(), j))
            .collect();
        Truth {
            stream,
            users,
            items,
        }
    }

    /// Whether the truth ranks the click's item in its top `k`, excluding `past`.
    fn hit(&self, e: &TrainingExample, past: Option<&HashSet<Id>>, k: usize) -> bool {
        let (Some(&u), Some(&target)) = (self.users.get(&e.user_id), self.items.get(&e.item_id))
        else {
            return false;
        };
        let logits: Vec<f32> = (self.stream.logits(u, e.event_time_ms).iter())
            .map(|l| *l as f32)
            .collect();
        let excluded = |j: usize| {
            past.is_some_and(|p| p.contains(&self.stream.world.items[j].id))
                || !logits[j].is_finite()
        };
        rank_of(&logits, target, excluded) < k
    }

    /// Whether the informed observer ranks the click's item in its top `k`, excluding `past`.
    ///
    /// The observer knows what the generator knows except where each user's taste drifts to:
    /// item vectors, popularity, arrivals, the user's starting taste `a` and the drift's
    /// clock. Taste at `t` is `cos θ · a + sin θ · b` with `b` a random direction orthogonal
    /// to `a`; the observer scores with its expectation, `b` estimated from the user's
    /// `earlier` clicks (each click's item vector minus its part along `a`, weighted by
    /// `sin θ` of its time, normalised and shrunk by `n / (n + 2)`; zero before any click).
    fn observer_hit(
        &self,
        e: &TrainingExample,
        past: Option<&HashSet<Id>>,
        earlier: &[(Id, i64)],
        k: usize,
    ) -> bool {
        let (Some(&u), Some(&target)) = (self.users.get(&e.user_id), self.items.get(&e.item_id))
        else {
            return false;
        };
        let s = &self.stream;
        let a = &s.world.users[u].latent;
        let mut b = vec![0.0; a.len()];
        for (id, t) in earlier {
            let Some(&j) = self.items.get(id) else {
                continue;
            };
            let x = &s.world.items[j].latent;
            let along: f64 = x.iter().zip(a).map(|(x, a)| x * a).sum();
            let w = s.phase(*t).sin();
            for ((b, x), a) in b.iter_mut().zip(x).zip(a) {
                *b += w * (x - along * a);
            }
        }
        let norm = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let n = earlier.len() as f64;
        let shrink = if norm > 0.0 {
            n / (n + 2.0) / norm
        } else {
            0.0
        };
        let (sin, cos) = s.phase(e.event_time_ms).sin_cos();
        let taste: Vec<f64> = (a.iter().zip(&b))
            .map(|(a, b)| cos * a + sin * shrink * b)
            .collect();
        let logits: Vec<f32> = (s.logits_of_taste(&taste, e.event_time_ms).iter())
            .map(|l| *l as f32)
            .collect();
        let excluded = |j: usize| {
            past.is_some_and(|p| p.contains(&s.world.items[j].id)) || !logits[j].is_finite()
        };
        rank_of(&logits, target, excluded) < k
    }
}

/// The hits of one prequential run, click by click (model, truth, popular).
#[derive(Default)]
struct Tally {
    hits: Vec<[bool; 4]>,
}

impl Tally {
    fn record(&mut self, model: bool, truth: bool, popular: bool, observer: bool) {
        self.hits.push([model, truth, popular, observer]);
    }

    /// The recalls over `hits[from..to]`.
    fn stretch(&self, from: usize, to: usize, with_truth: bool) -> CurvePoint {
        let part = &self.hits[from..to];
        let n = part.len().max(1) as f64;
        let share = |i: usize| part.iter().filter(|h| h[i]).count() as f64 / n;
        CurvePoint {
            clicks_upto: to as u64,
            model: share(0),
            truth: with_truth.then(|| share(1)),
            observer: with_truth.then(|| share(3)),
            popular: share(2),
        }
    }

    fn curve(&self, with_truth: bool) -> Vec<CurvePoint> {
        let n = self.hits.len();
        (1..=10)
            .map(|d| self.stretch(n * (d - 1) / 10, n * d / 10, with_truth))
            .filter(|p| p.clicks_upto > 0)
            .collect()
    }

    fn late(&self, with_truth: bool) -> LateRecall {
        let n = self.hits.len();
        let recall = self.stretch(n - n / 4, n, with_truth);
        let m = (n / 4).max(1) as f64;
        LateRecall {
            recall,
            se: (recall.model * (1.0 - recall.model) / m).sqrt(),
        }
    }
}

/// Runs the stream through the pipeline and trains on it test-then-train (see the module doc).
pub fn run(
    lines: &[Vec<u8>],
    truth: Option<StreamConfig>,
    config: &Config,
    k: usize,
) -> StreamReport {
    let truth = truth.map(Truth::new);
    let catalog = SharedCatalog::default();
    let metrics = Metrics::new();
    let mut pipeline = EventPipeline::new(
        Joiner::new(config.join.clone(), config.emits_shown_negatives()),
        catalog.clone(),
        // Datasets arrive in towerstream's own schema.
        crate::mapping::Decoder::native(config.ingest.max_event_bytes),
        metrics.ingest.clone(),
    );
    let mut trainer = Trainer::new(config);
    let batch = config.train.batch_size.max(1);
    let (mut pending, mut out) = (Vec::new(), JoinOutput::default());
    let (mut rejected, mut examples, mut steps, mut positives) = (0usize, 0u64, 0u64, 0u64);
    let (mut tally, mut seen, mut clicks) = (Tally::default(), History::default(), HashMap::new());
    let mut train_seconds = 0.0;
    let mut step = |batch_examples: &[TrainingExample], trainer: &mut Trainer| {
        let c = catalog.read().unwrap_or_else(|p| p.into_inner());
        let judged = Judge {
            trainer,
            catalog: &c,
            truth: truth.as_ref(),
            k,
        };
        judged.test(batch_examples, &mut seen, &mut clicks, &mut tally);
        let started = Instant::now();
        trainer.step(batch_examples, &c);
        train_seconds += started.elapsed().as_secs_f64();
        steps += 1;
        positives += batch_examples
            .iter()
            .filter(|e| e.label.is_positive())
            .count() as u64;
    };
    for (n, line) in lines.iter().enumerate() {
        let origin = Origin {
            topic: 0,
            partition: 0,
            offset: n as i64,
            epoch: 0,
        };
        out.clear();
        // The event's own time as "now": a file has no wall clock, and no line is in the future.
        let (_, outcome) = pipeline.handle(origin, Some(line), i64::MAX / 4, &mut out);
        rejected += usize::from(matches!(
            outcome,
            crate::ingest::pipeline::Outcome::Rejected(_)
        ));
        examples += out.examples.len() as u64;
        pending.append(&mut out.examples);
        while pending.len() >= batch {
            let rest = pending.split_off(batch);
            step(&pending, &mut trainer);
            pending = rest;
        }
    }
    // The end of the stream: what is still in the window leaves it.
    out.clear();
    pipeline.tick(i64::MAX / 2, &mut out);
    examples += out.examples.len() as u64;
    pending.append(&mut out.examples);
    for chunk in pending.chunks(batch) {
        step(chunk, &mut trainer);
    }
    let whole = tally.stretch(0, tally.hits.len(), truth.is_some());
    let (n, p) = (tally.hits.len(), whole.model);
    StreamReport {
        events: lines.len(),
        rejected,
        examples,
        steps,
        positives_per_step: positives as f64 / steps.max(1) as f64,
        clicks: n as u64,
        k,
        recall: p,
        recall_se: (p * (1.0 - p) / n.max(1) as f64).sqrt(),
        truth_recall: whole.truth,
        observer_recall: whole.observer,
        popular_recall: whole.popular,
        examples_per_second: examples as f64 / f64::max(train_seconds, 1e-9),
        late: tally.late(truth.is_some()),
        curve: tally.curve(truth.is_some()),
    }
}

/// Each user's clicks so far: the set the rankings exclude, and in order with their times.
#[derive(Default)]
struct History {
    items: HashMap<Id, HashSet<Id>>,
    timeline: HashMap<Id, Vec<(Id, i64)>>,
}

/// Ranks a batch's clicks before it is trained on.
struct Judge<'a> {
    trainer: &'a Trainer,
    catalog: &'a Catalog,
    truth: Option<&'a Truth>,
    k: usize,
}

impl Judge<'_> {
    fn test(
        &self,
        batch: &[TrainingExample],
        seen: &mut History,
        clicks: &mut HashMap<Id, f32>,
        tally: &mut Tally,
    ) {
        let positives: Vec<&TrainingExample> =
            batch.iter().filter(|e| e.label.is_positive()).collect();
        if positives.is_empty() {
            return;
        }
        let items = item_entries(self.catalog);
        let index: HashMap<&Id, usize> = (items.iter().enumerate())
            .map(|(j, (id, _))| (id, j))
            .collect();
        let users: Vec<UserEntry> = (positives.iter())
            .map(|e| (e.user_id.clone(), e.user.clone()))
            .collect();
        let mut scores = to_vec(&self.trainer.scores(&users, &items));
        add_popularity_prior(self.trainer, &items, &mut scores);
        let popularity: Vec<f32> = (items.iter())
            .map(|(id, _)| clicks.get(id).copied().unwrap_or(0.0))
            .collect();
        for (e, row) in positives
            .iter()
            .zip(scores.chunks_exact(items.len().max(1)))
        {
            let past = seen.items.get(&e.user_id);
            let (model, popular) = index.get(&e.item_id).map_or((false, false), |&target| {
                let excluded = |j: usize| past.is_some_and(|p| p.contains(&items[j].0));
                (
                    rank_of(row, target, excluded) < self.k,
                    rank_of(&popularity, target, excluded) < self.k,
                )
            });
            let truth = self.truth.is_some_and(|t| t.hit(e, past, self.k));
            let earlier = seen.timeline.get(&e.user_id).map_or(&[][..], Vec::as_slice);
            let observer = (self.truth).is_some_and(|t| t.observer_hit(e, past, earlier, self.k));
            tally.record(model, truth, popular, observer);
        }
        for e in positives {
            (seen.items.entry(e.user_id.clone()).or_default()).insert(e.item_id.clone());
            (seen.timeline.entry(e.user_id.clone()).or_default())
                .push((e.item_id.clone(), e.event_time_ms));
            *clicks.entry(e.item_id.clone()).or_default() += 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::WorldConfig;

    #[test]
    fn the_observer_is_the_truth_without_drift_and_falls_behind_it_when_tastes_turn() {
        let stream = |drift_period_ms| StreamConfig {
            world: WorldConfig {
                users: 100,
                items: 150,
                ..WorldConfig::default()
            },
            requests: 3_000,
            drift_period_ms,
            ..StreamConfig::default()
        };
        let mut service = Config::default();
        service.train.batch_size = 64;
        let scored = |config: StreamConfig| {
            let (events, _) = Stream::new(config.clone()).events();
            let lines: Vec<Vec<u8>> = events.iter().map(|e| e.to_json()).collect();
            run(&lines, Some(config), &service, 20)
        };
        // Without drift the observer knows every taste: the same ranking as the truth.
        let still = scored(stream(0));
        assert_eq!(still.observer_recall, still.truth_recall);
        // One full turn over the 300 s of the stream: where a taste went is only known from
        // the user's clicks, so the observer falls behind the truth, and still beats counting.
        let turning = scored(stream(300_000));
        let (truth, observer) = (
            turning.truth_recall.unwrap(),
            turning.observer_recall.unwrap(),
        );
        assert!(truth > observer + 0.02, "{truth} {observer}");
        assert!(
            observer > turning.popular_recall,
            "{observer} {}",
            turning.popular_recall
        );
    }

    #[test]
    fn the_curve_cuts_the_clicks_into_tenths_and_the_late_recall_is_the_last_quarter() {
        let mut t = Tally::default();
        // 40 clicks: the model misses the first 20 and finds the last 20; the truth finds all.
        for i in 0..40 {
            t.record(i >= 20, true, i % 2 == 0, true);
        }
        let curve = t.curve(true);
        assert_eq!(curve.len(), 10);
        assert_eq!(curve[0].clicks_upto, 4);
        assert_eq!(curve[9].clicks_upto, 40);
        assert_eq!(curve[4].model, 0.0);
        assert_eq!(curve[5].model, 1.0);
        assert_eq!(curve[3].popular, 0.5);
        assert_eq!(curve[0].truth, Some(1.0));
        let late = t.late(true);
        assert_eq!((late.recall.model, late.recall.clicks_upto), (1.0, 40));
        assert_eq!(late.se, 0.0);
        assert_eq!(t.late(false).recall.truth, None);
        // Fewer clicks than tenths: no empty stretch is reported.
        let mut few = Tally::default();
        few.record(true, false, false, false);
        assert_eq!(few.curve(false).len(), 1);
    }

    #[test]
    fn a_generated_stream_is_joined_and_scored_click_by_click_against_its_truth() {
        let config = StreamConfig {
            world: WorldConfig {
                users: 200,
                items: 150,
                ..WorldConfig::default()
            },
            requests: 3_000,
            ..StreamConfig::default()
        };
        let (events, counts) = Stream::new(config.clone()).events();
        let lines: Vec<Vec<u8>> = events.iter().map(|e| e.to_json()).collect();
        let mut service = Config::default();
        service.train.batch_size = 64;
        let r = run(&lines, Some(config), &service, 20);
        assert_eq!((r.events, r.rejected), (lines.len(), 0));
        // Every click joined its impression and was ranked once, before it was trained on.
        assert_eq!(r.clicks, counts.clicks as u64);
        // In-batch mode trains on clicks only.
        assert_eq!(r.examples, counts.clicks as u64);
        assert!(
            r.positives_per_step > 0.9 * 64.0,
            "{}",
            r.positives_per_step
        );
        // The truth knows every taste: it beats counting clicks, which beats chance (20/150).
        let truth = r.truth_recall.unwrap();
        assert!(
            truth > r.popular_recall + 0.1,
            "{truth} {}",
            r.popular_recall
        );
        assert!(r.popular_recall > 0.2, "{}", r.popular_recall);
        // The curve's tenths average to the whole-stream recall.
        let n = r.clicks as f64;
        let mut from = 0;
        let mut mean = 0.0;
        for p in &r.curve {
            mean += p.model * (p.clicks_upto - from) as f64 / n;
            from = p.clicks_upto;
        }
        assert!((mean - r.recall).abs() < 1e-9, "{mean} {}", r.recall);
        assert_eq!(r.late.recall.clicks_upto, r.clicks);
    }
}
