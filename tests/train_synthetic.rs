//! Training on a synthetic stream whose ground truth is known (latent factors, Zipf
//! popularity): one streaming pass must beat the most-popular baseline clearly, and the
//! sampling-bias correction must help where in-batch negatives hurt.

use std::collections::HashSet;

use tch::Kind;
use towerstream::catalog::Catalog;
use towerstream::config::{Config, Mode};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::sampler::Rng;
use towerstream::train::Trainer;

const K: usize = 50;

struct Data {
    world: World,
    train: Vec<(usize, usize)>,
    holdout: Vec<(usize, usize)>,
}

fn data() -> Data {
    let world = World::new(WorldConfig {
        users: 800,
        items: 600,
        ..WorldConfig::default()
    });
    let mut rng = Rng::new(11);
    let train = (0..40_000).map(|_| world.sample_click(&mut rng)).collect();
    let holdout = (0..3_000).map(|_| world.sample_click(&mut rng)).collect();
    Data {
        world,
        train,
        holdout,
    }
}

fn config(mode: Mode, sbc: bool) -> Config {
    let mut c = Config::default();
    c.train.mode = mode;
    c.train.sbc_correction = sbc;
    c.train.batch_size = 256;
    c.train.estimator_buckets = 1 << 12;
    c.train.lr_embedding = 0.02;
    c.train.lr_dense = 0.003;
    c.model.tower_dims = vec![128, 64];
    c.model.temperature = 0.1;
    c.features.history_len = 20;
    c
}

fn train(d: &Data, c: &Config) -> Trainer {
    let mut t = Trainer::new(c);
    let mut catalog = Catalog::default();
    for e in d.world.item_events() {
        if let towerstream::event::Event::Item(i) = e {
            catalog.apply_item(&i);
        }
    }
    let examples: Vec<_> = d
        .train
        .iter()
        .enumerate()
        .map(|(n, (u, j))| d.world.example(*u, *j, 1_000 * n as i64, n as i64))
        .collect();
    for batch in examples.chunks(c.train.batch_size) {
        let r = t.step(batch, &catalog);
        assert!(r.skipped || r.loss.is_finite(), "loss {r:?}");
    }
    t
}

/// Recall@K of the model on held-out clicks, overall and on clicks of tail items.
fn recall(d: &Data, t: &Trainer, tail: &HashSet<usize>) -> (f64, f64) {
    let users: Vec<_> = d
        .world
        .users
        .iter()
        .map(|u| (u.id.clone(), Some(u.profile.clone())))
        .collect();
    let items: Vec<_> = d
        .world
        .items
        .iter()
        .map(|i| (i.id.clone(), Some(i.features.clone())))
        .collect();
    let scores = t.scores(&users, &items);
    let top = scores.topk(K as i64, 1, true, true).1.to_kind(Kind::Int64);
    let top: Vec<Vec<i64>> = (0..users.len() as i64)
        .map(|u| Vec::<i64>::try_from(top.get(u)).expect("row"))
        .collect();
    let (mut hits, mut tail_hits, mut tail_n) = (0usize, 0usize, 0usize);
    for (u, j) in &d.holdout {
        let hit = top[*u].contains(&(*j as i64));
        hits += usize::from(hit);
        if tail.contains(j) {
            tail_n += 1;
            tail_hits += usize::from(hit);
        }
    }
    (
        hits as f64 / d.holdout.len() as f64,
        tail_hits as f64 / tail_n.max(1) as f64,
    )
}

#[test]
fn one_streaming_pass_beats_most_popular_and_correction_helps_the_tail() {
    let d = data();
    // Most popular by training clicks.
    let mut counts = vec![0usize; d.world.items.len()];
    for (_, j) in &d.train {
        counts[*j] += 1;
    }
    let mut by_pop: Vec<usize> = (0..counts.len()).collect();
    by_pop.sort_by(|a, b| counts[*b].cmp(&counts[*a]));
    let popular: HashSet<usize> = by_pop[..K].iter().copied().collect();
    let pop_recall = d
        .holdout
        .iter()
        .filter(|(_, j)| popular.contains(j))
        .count() as f64
        / d.holdout.len() as f64;
    // Tail: items outside the 100 most clicked.
    let tail: HashSet<usize> = by_pop[100..].iter().copied().collect();

    let corrected = train(&d, &config(Mode::InBatchSoftmax, true));
    let uncorrected = train(&d, &config(Mode::InBatchSoftmax, false));
    let (r_c, tail_c) = recall(&d, &corrected, &tail);
    let (r_u, tail_u) = recall(&d, &uncorrected, &tail);
    eprintln!("Recall@{K}: most-popular {pop_recall:.4}, corrected {r_c:.4} (tail {tail_c:.4}), uncorrected {r_u:.4} (tail {tail_u:.4})");
    assert!(
        r_c > pop_recall * 1.15,
        "corrected {r_c} vs most-popular {pop_recall}"
    );
    assert!(
        tail_c > tail_u,
        "tail: corrected {tail_c} vs uncorrected {tail_u}"
    );
}

#[test]
fn every_mode_learns_on_the_synthetic_stream() {
    let d = data();
    let tail = HashSet::new();
    let mut counts = vec![0usize; d.world.items.len()];
    for (_, j) in &d.train {
        counts[*j] += 1;
    }
    let mut by_pop: Vec<usize> = (0..counts.len()).collect();
    by_pop.sort_by(|a, b| counts[*b].cmp(&counts[*a]));
    let popular: HashSet<usize> = by_pop[..K].iter().copied().collect();
    let pop_recall = d
        .holdout
        .iter()
        .filter(|(_, j)| popular.contains(j))
        .count() as f64
        / d.holdout.len() as f64;
    for mode in [Mode::SampledSoftmax, Mode::PairwiseBpr, Mode::PointwiseBce] {
        let t = train(&d, &config(mode, true));
        let (r, _) = recall(&d, &t, &tail);
        eprintln!("{mode:?}: Recall@{K} {r:.4} (most-popular {pop_recall:.4})");
        // Uniform sampled negatives teach affinity but not popularity; they must still be far
        // better than chance (K / items).
        assert!(
            r > 2.0 * K as f64 / d.world.items.len() as f64,
            "{mode:?}: {r}"
        );
    }
}
