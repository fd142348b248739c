//! Training throughput: examples/s per mode and batch size, model-only and end to end (JSON
//! click events → parse → join → bounded channel → micro-batch → step), with the same model
//! and step in Python PyTorch (`benches/reference_step.py`, the venv's torch) as reference.
//!
//! `cargo bench --bench train [-- --json] [-- --quick]`. Under `cargo test` it runs a smoke
//! pass only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use towerstream::batch::{next_batch, Wait};
use towerstream::catalog::{Catalog, ItemFeatures, UserProfile};
use towerstream::config::{Config, JoinConfig, Mode};
use towerstream::event::{parse_event, Dense, Event, Id};
use towerstream::example::{Label, Origin, TrainingExample};
use towerstream::join::{JoinOutput, Joiner};
use towerstream::refresh::Mirror;
use towerstream::train::sampler::Rng;
use towerstream::train::{StepTimings, Trainer};

#[derive(Serialize, Clone)]
struct Row {
    benchmark: String,
    config: String,
    mode: String,
    batch: usize,
    examples: usize,
    seconds: f64,
    examples_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    phases_ms: Option<[f64; 4]>,
}

/// A synthetic population: profiles and catalogue features of the given sizes.
struct Population {
    users: Vec<(Id, Arc<UserProfile>)>,
    items: Vec<(Id, Arc<ItemFeatures>)>,
}

impl Population {
    fn new(users: usize, items: usize, rng: &mut Rng) -> Self {
        let users = (0..users)
            .map(|u| {
                let id = Id::new(format!("u{u}"));
                let p = UserProfile {
                    user_id: id.clone(),
                    gender: Some(["F", "M"][rng.below(2)].into()),
                    age: Some([1u8, 18, 25, 35, 45, 50, 56][rng.below(7)]),
                    occupation: Some(format!("{}", rng.below(21))),
                    zip: Some(format!("{:05}", rng.below(3439))),
                    dense: Dense::new(),
                    updated_ms: 0,
                };
                (id, Arc::new(p))
            })
            .collect();
        let items = (0..items)
            .map(|j| {
                let id = Id::new(format!("i{j}"));
                let genres = (0..1 + rng.below(3))
                    .map(|_| format!("g{}", rng.below(18)))
                    .collect();
                let f = ItemFeatures {
                    item_id: id.clone(),
                    category: None,
                    genres,
                    dense: Dense::new(),
                    updated_ms: 0,
                };
                (id, Arc::new(f))
            })
            .collect();
        Population { users, items }
    }

    fn examples(&self, n: usize, rng: &mut Rng) -> Vec<TrainingExample> {
        (0..n)
            .map(|i| {
                let (uid, p) = &self.users[rng.below(self.users.len())];
                let (iid, f) = &self.items[rng.below(self.items.len())];
                TrainingExample {
                    label: if i % 5 == 4 {
                        Label::ShownNotClicked
                    } else {
                        Label::Click { joined: true }
                    },
                    user_id: uid.clone(),
                    item_id: iid.clone(),
                    user: Some(p.clone()),
                    item: Some(f.clone()),
                    event_time_ms: i as i64,
                    dwell_ms: Some(30_000),
                    position: Some(1),
                    origin: Origin {
                        topic: 0,
                        partition: 0,
                        offset: i as i64,
                        epoch: 1,
                    },
                }
            })
            .collect()
    }

    fn catalog(&self) -> Catalog {
        let mut c = Catalog::default();
        for (id, f) in &self.items {
            c.apply_item(&towerstream::event::ItemEvent {
                event_id: format!("e-{id}"),
                event_time_ms: 0,
                item_id: id.clone(),
                op: towerstream::event::Op::Upsert,
                title: None,
                category: None,
                genres: f.genres.clone(),
                dense: Dense::new(),
            });
        }
        c
    }
}

struct Setup {
    name: &'static str,
    config: Config,
    population: Population,
}

fn setups(quick: bool) -> Vec<Setup> {
    let mut rng = Rng::new(1);
    // The article's configuration: ML-1M-sized vocabularies, 16-wide embeddings per feature,
    // towers [256, 128, 64], history of 50.
    let mut article = Config::default();
    for (k, v) in [
        ("user_id", 6041),
        ("item_id", 3707),
        ("gender", 3),
        ("age", 8),
        ("occupation", 22),
        ("zip", 3440),
        ("genres", 19),
    ] {
        article.features.capacity.insert(k.into(), v);
    }
    article.train.estimator_buckets = 1 << 16;
    // An otherwise idle machine: libtorch may use every core.
    article.train.threads = 0;
    let mut out = vec![Setup {
        name: "article (ML-1M vocab)",
        config: article,
        population: Population::new(6040, 3706, &mut rng),
    }];
    if !quick {
        out.push(Setup {
            name: "default (1M/500k rows)",
            config: Config {
                train: towerstream::config::TrainConfig {
                    threads: 0,
                    ..Config::default().train
                },
                ..Config::default()
            },
            population: Population::new(100_000, 50_000, &mut rng),
        });
    }
    out
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::InBatchSoftmax => "in_batch_softmax",
        Mode::SampledSoftmax => "sampled_softmax",
        Mode::PointwiseBce => "pointwise_bce",
        Mode::PairwiseBpr => "pairwise_bpr",
    }
}

/// Steps over pre-built examples (histories warmed first), timing only the steps.
fn model_only(s: &Setup, mode: Mode, batch: usize, budget: Duration) -> Row {
    let mut c = s.config.clone();
    c.train.mode = mode;
    c.train.batch_size = batch;
    let catalog = s.population.catalog();
    let mut t = Trainer::new(&c);
    let mut rng = Rng::new(2);
    let warm = s.population.examples(batch * 3, &mut rng);
    for b in warm.chunks(batch) {
        t.step(b, &catalog);
    }
    let data = s.population.examples(batch * 40, &mut rng);
    let (mut n, mut phases, mut steps) = (0usize, StepTimings::default(), 0usize);
    let started = Instant::now();
    for b in data.chunks(batch) {
        let r = t.step(b, &catalog);
        n += b.len();
        steps += 1;
        phases.encode += r.timings.encode;
        phases.forward += r.timings.forward;
        phases.backward += r.timings.backward;
        phases.update += r.timings.update;
        if started.elapsed() > budget {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let per = |x: f64| 1000.0 * x / steps as f64;
    Row {
        benchmark: "model only".into(),
        config: s.name.into(),
        mode: mode_name(mode).into(),
        batch,
        examples: n,
        seconds: secs,
        examples_per_second: n as f64 / secs,
        phases_ms: Some([
            per(phases.encode),
            per(phases.forward),
            per(phases.backward),
            per(phases.update),
        ]),
    }
}

/// JSON click events → parse → join → bounded channel → micro-batches → steps.
fn end_to_end(s: &Setup, batch: usize, n: usize) -> Row {
    let mut c = s.config.clone();
    c.train.batch_size = batch;
    let catalog = Arc::new(s.population.catalog());
    let mut rng = Rng::new(3);
    let events: Vec<Vec<u8>> = s
        .population
        .examples(n, &mut rng)
        .iter()
        .enumerate()
        .map(|(i, e)| {
            format!(
                r#"{{"type":"click","event_id":"c{i}","event_time_ms":{i},"user_id":"{}","item_id":"{}","dwell_ms":30000}}"#,
                e.user_id, e.item_id
            )
            .into_bytes()
        })
        .collect();
    let mut t = Trainer::new(&c);
    let warm = s.population.examples(batch * 3, &mut rng);
    for b in warm.chunks(batch) {
        t.step(b, &catalog);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<TrainingExample>(c.ingest.channel_capacity);
    let producer_catalog = catalog.clone();
    let started = Instant::now();
    rt.spawn(async move {
        let mut joiner = Joiner::new(JoinConfig::default(), false);
        let mut out = JoinOutput::default();
        for (i, bytes) in events.iter().enumerate() {
            let origin = Origin {
                topic: 0,
                partition: 0,
                offset: i as i64,
                epoch: 1,
            };
            if let Ok(Event::Click(click)) = parse_event(bytes, 65536) {
                joiner.on_click(click, origin, &producer_catalog, &mut out);
                for ex in out.examples.drain(..) {
                    if tx.send(ex).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stop = CancellationToken::new();
    let mut trained = 0usize;
    let (max_wait, idle) = (Duration::from_millis(50), Duration::from_secs(3600));
    loop {
        match rt.block_on(next_batch(&mut rx, batch, max_wait, idle, &stop)) {
            Wait::Batch(b) => {
                t.step(&b, &catalog);
                trained += b.len();
            }
            Wait::Idle => {}
            Wait::Closed => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Row {
        benchmark: "end to end (events → step)".into(),
        config: s.name.into(),
        mode: "in_batch_softmax".into(),
        batch,
        examples: trained,
        seconds: secs,
        examples_per_second: trained as f64 / secs,
        phases_ms: None,
    }
}

fn python_reference(batches: &[usize], steps: usize) -> Result<Vec<Row>, String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(format!("{root}/.venv/bin/python"))
        .arg(format!("{root}/benches/reference_step.py"))
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--batch")
        .args(batches.iter().map(|b| b.to_string()))
        .output()
        .map_err(|e| format!("cannot run the venv's python: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| e.to_string())?;
            Ok(Row {
                benchmark: "python pytorch reference (model only)".into(),
                config: "article (ML-1M vocab)".into(),
                mode: "in_batch_softmax".into(),
                batch: v["batch"].as_u64().unwrap_or(0) as usize,
                examples: (v["batch"].as_u64().unwrap_or(0) * v["steps"].as_u64().unwrap_or(0))
                    as usize,
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
                examples_per_second: v["examples_per_second"].as_f64().unwrap_or(0.0),
                phases_ms: None,
            })
        })
        .collect()
}

/// What a refresh costs the trainer thread, against the time of one step (issue: a refresh
/// may stall training for at most one step): the hand-off of the rows changed during one
/// refresh interval of training, and (once, at start) the full copy; plus what the refresher
/// thread then spends applying the delta and copying a frozen snapshot for the generation.
fn snapshot_cost(s: &Setup, batch: usize, interval: Duration) -> Row {
    let mut c = s.config.clone();
    c.train.batch_size = batch;
    let catalog = s.population.catalog();
    let mut t = Trainer::new(&c);
    let mut rng = Rng::new(4);
    let data = s.population.examples(batch * 8, &mut rng);
    let started = Instant::now();
    for b in data.chunks(batch) {
        t.step(b, &catalog);
    }
    let step_ms = started.elapsed().as_secs_f64() * 1000.0 / 8.0;
    let started = Instant::now();
    let mut mirror = Mirror::of(&mut t);
    let full_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (mut handoff_ms, mut rows, mut steps) = (0.0, 0usize, 0usize);
    // Refresher side: the first copy goes to fresh memory, later ones into the retired one.
    let (mut fresh_ms, mut reused_ms) = (0.0, 0.0);
    let mut spare = None;
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let data = s.population.examples(batch * 16, &mut rng);
        let started = Instant::now();
        for b in data.chunks(batch).cycle() {
            t.step(b, &catalog);
            steps += 1;
            if started.elapsed() >= interval {
                break;
            }
        }
        let started = Instant::now();
        let delta = t.take_delta().expect("tracking");
        handoff_ms += started.elapsed().as_secs_f64() * 1000.0;
        rows += delta.row_count();
        let started = Instant::now();
        mirror.apply(delta);
        spare = Some(std::hint::black_box(mirror.snapshot_into(spare.take())));
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if round == 0 {
            fresh_ms = ms;
        } else {
            reused_ms += ms / (ROUNDS - 1) as f64;
        }
    }
    let n = ROUNDS as f64;
    let handoff_ms = handoff_ms / n;
    Row {
        benchmark: format!(
            "refresh hand-off every {:.1} s: {handoff_ms:.1} ms ({} rows, {} steps) vs step \
             {step_ms:.1} ms; full copy once {full_ms:.1} ms; refresher apply+copy \
             {reused_ms:.1} ms ({fresh_ms:.1} ms into fresh memory)",
            interval.as_secs_f64(),
            rows / ROUNDS,
            steps / ROUNDS,
        ),
        config: s.name.into(),
        mode: "in_batch_softmax".into(),
        batch,
        examples: 0,
        seconds: handoff_ms / 1000.0,
        examples_per_second: 0.0,
        phases_ms: None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let refresh_interval = Duration::from_millis(Config::default().index.refresh_interval_ms);
    if args.iter().any(|a| a == "--snapshot-only") {
        for s in setups(false) {
            let r = snapshot_cost(&s, 1024, refresh_interval);
            println!("{:<22} {}", r.config, r.benchmark);
        }
        return;
    }
    let json = args.iter().any(|a| a == "--json");
    let quick = !benching || args.iter().any(|a| a == "--quick");
    let modes = [
        Mode::InBatchSoftmax,
        Mode::SampledSoftmax,
        Mode::PointwiseBce,
        Mode::PairwiseBpr,
    ];
    let batches: &[usize] = if benching { &[256, 1024, 4096] } else { &[64] };
    let budget = Duration::from_secs_f64(if benching { 3.0 } else { 0.01 });
    let mut rows = Vec::new();
    for s in setups(quick) {
        for mode in modes {
            for &b in batches {
                rows.push(model_only(&s, mode, b, budget));
            }
        }
        rows.push(snapshot_cost(
            &s,
            if benching { 1024 } else { 64 },
            if benching {
                refresh_interval
            } else {
                Duration::from_millis(10)
            },
        ));
        if s.name.starts_with("article") {
            for &b in batches {
                rows.push(end_to_end(
                    &s,
                    b,
                    if benching { (b * 30).max(60_000) } else { 256 },
                ));
            }
        }
    }
    if benching {
        match python_reference(batches, 30) {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("python reference skipped: {e}"),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        );
        return;
    }
    println!(
        "{:<38} {:<22} {:<17} {:>6} {:>12}   phases ms/step (encode forward backward update)",
        "benchmark", "config", "mode", "batch", "examples/s"
    );
    for r in &rows {
        let phases = r
            .phases_ms
            .map(|p| format!("{:7.2} {:7.2} {:7.2} {:7.2}", p[0], p[1], p[2], p[3]))
            .unwrap_or_default();
        println!(
            "{:<38} {:<22} {:<17} {:>6} {:>12.0}   {}",
            r.benchmark, r.config, r.mode, r.batch, r.examples_per_second, phases
        );
    }
}
