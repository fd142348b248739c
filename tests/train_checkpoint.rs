//! Checkpoints reproduce the model exactly and survive torn writes.

use std::fs;

use towerstream::catalog::Catalog;
use towerstream::config::Config;
use towerstream::ingest::offsets::{ResumeMap, ResumePoint};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::checkpoint::{list, load, load_latest, save, CheckpointError};
use towerstream::train::sampler::Rng;
use towerstream::train::Trainer;

fn catalog(w: &World) -> Catalog {
    let mut c = Catalog::default();
    for e in w.item_events() {
        if let towerstream::event::Event::Item(i) = e {
            c.apply_item(&i);
        }
    }
    c
}

fn setup() -> (World, Config, Vec<towerstream::example::TrainingExample>) {
    let world = World::new(WorldConfig {
        users: 50,
        items: 80,
        ..WorldConfig::default()
    });
    let mut c = Config::default();
    c.train.batch_size = 32;
    c.train.mixed_negatives = 8;
    c.model.tower_dims = vec![32, 16];
    c.features.capacity.insert("user_id".into(), 1000);
    c.features.capacity.insert("item_id".into(), 1000);
    let mut rng = Rng::new(5);
    let examples = (0..640)
        .map(|n| {
            let (u, j) = world.sample_click(&mut rng);
            world.example(u, j, n, n)
        })
        .collect();
    (world, c, examples)
}

fn vectors(t: &Trainer, w: &World) -> (tch::Tensor, tch::Tensor) {
    let users: Vec<_> = w
        .users
        .iter()
        .map(|u| (u.id.clone(), Some(u.profile.clone())))
        .collect();
    let items: Vec<_> = w
        .items
        .iter()
        .map(|i| (i.id.clone(), Some(i.features.clone())))
        .collect();
    (t.user_vectors(&users), t.item_vectors(&items))
}

#[test]
fn round_trip_reproduces_predictions_and_training_exactly() {
    let (world, config, examples) = setup();
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog(&world);
    let mut a = Trainer::new(&config);
    let (first, rest) = examples.split_at(320);
    for batch in first.chunks(32) {
        a.step(batch, &catalog);
    }
    let resume: ResumeMap = [(
        ("ev".to_owned(), 2),
        ResumePoint {
            offset: 10,
            consumed_until: 14,
            unapplied: vec![10, 12],
        },
    )]
    .into();
    let path = save(&a, &resume, dir.path(), 3).unwrap();
    let (mut b, resume_b) = load(&path, &config).unwrap();
    assert_eq!(resume_b, resume);
    assert_eq!(b.global_step(), a.global_step());
    assert_eq!(b.pool().total_clicks(), 320);

    let (ua, va) = vectors(&a, &world);
    let (ub, vb) = vectors(&b, &world);
    assert!(ua.equal(&ub), "user vectors differ after restore");
    assert!(va.equal(&vb), "item vectors differ after restore");

    // Optimizer state, estimator, histories and sampler state came back too: training on from
    // both gives bit-identical models.
    for batch in rest.chunks(32) {
        let ra = a.step(batch, &catalog);
        let rb = b.step(batch, &catalog);
        assert_eq!(ra.loss.to_bits(), rb.loss.to_bits());
    }
    let (ua, va) = vectors(&a, &world);
    let (ub, vb) = vectors(&b, &world);
    assert!(
        ua.equal(&ub) && va.equal(&vb),
        "continued training diverged"
    );
}

#[test]
fn torn_checkpoints_are_skipped_and_old_ones_pruned() {
    let (_, config, examples) = setup();
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::default();
    let mut t = Trainer::new(&config);
    for (i, batch) in examples.chunks(32).take(5).enumerate() {
        t.step(batch, &catalog);
        save(&t, &ResumeMap::new(), dir.path(), 3).unwrap();
        assert!(list(dir.path()).unwrap().len() <= 3, "after save {i}");
    }
    let found = list(dir.path()).unwrap();
    assert_eq!(
        found.iter().map(|f| f.step).collect::<Vec<_>>(),
        vec![5, 4, 3]
    );

    // Truncate the newest: the restart falls back to the one before.
    let newest = &found[0].path;
    let tensors = newest.join("tensors.ot");
    let len = fs::metadata(&tensors).unwrap().len();
    fs::write(&tensors, vec![0u8; (len / 2) as usize]).unwrap();
    assert!(matches!(
        load(newest, &config),
        Err(CheckpointError::Corrupt { .. })
    ));
    let (restored, _, from) = load_latest(dir.path(), &config).unwrap().unwrap();
    assert_eq!(from.step, 4);
    assert_eq!(restored.global_step(), 4);

    // A directory without a manifest (a crash before the rename) is not a checkpoint.
    fs::create_dir_all(dir.path().join("step-000000000099")).unwrap();
    assert_eq!(list(dir.path()).unwrap()[0].step, 5);

    // A different architecture is refused, naming what differs.
    let mut other = config.clone();
    other.model.tower_dims = vec![8];
    let Err(err) = load(&found[1].path, &other) else {
        panic!("a checkpoint of another architecture was loaded");
    };
    let err = err.to_string();
    assert!(err.contains("tower_dims"), "{err}");
}

#[test]
fn a_model_holding_nan_is_never_checkpointed_nor_restored() {
    let (_, config, examples) = setup();
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::default();
    let metrics = towerstream::metrics::Metrics::new();
    let mut t = Trainer::new(&config).with_metrics(metrics.train.clone());
    for batch in examples.chunks(32).take(5) {
        t.step(batch, &catalog);
    }
    let good = save(&t, &ResumeMap::new(), dir.path(), 3).unwrap();

    // One NaN in one embedding row (the weights are shared with the trainer's).
    let table = t.towers().tables[1].shallow_clone();
    let _ = table.get(2).fill_(f64::NAN);
    let Err(err) = save(&t, &ResumeMap::new(), dir.path(), 3) else {
        panic!("a NaN model was checkpointed");
    };
    assert!(
        matches!(&err, CheckpointError::NonFinite { tensor, .. } if tensor == "table.1"),
        "{err}"
    );
    assert!(err.to_string().contains("NaN or infinite"), "{err}");
    assert_eq!(metrics.train.checkpoints_refused.get(), 1);
    // The good checkpoint of the same step was neither replaced nor pruned.
    let found = list(dir.path()).unwrap();
    assert_eq!((found.len(), &found[0].path), (1, &good));
    let (restored, _) = load(&good, &config).unwrap();
    assert_eq!(restored.towers().first_non_finite(), None);

    // A poisoned checkpoint on disk (written before this guard) is skipped at restart.
    let poisoned = dir.path().join("step-000000000006");
    fs::create_dir_all(&poisoned).unwrap();
    for f in ["state.json", "MANIFEST.json"] {
        fs::copy(good.join(f), poisoned.join(f)).unwrap();
    }
    let mut tensors = tch::Tensor::load_multi(good.join("tensors.ot")).unwrap();
    let _ = tch::no_grad(|| tensors[0].1.fill_(f64::INFINITY));
    let refs: Vec<(&str, &tch::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::Tensor::save_multi(&refs, poisoned.join("tensors.ot")).unwrap();
    assert!(matches!(
        load(&poisoned, &config),
        Err(CheckpointError::NonFinite { .. })
    ));
    let (_, _, from) = load_latest(dir.path(), &config).unwrap().unwrap();
    assert_eq!(from.path, good);
}
