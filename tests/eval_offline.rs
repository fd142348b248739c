//! Offline evaluation on a synthetic world whose structure is known: personal affinity the
//! model can learn beyond popularity.

mod common;

use towerstream::data::{Dataset, Format};
use towerstream::eval::{offline, report};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::sampler::Rng;

/// The world as a generic CSV dataset (interactions, users, items).
fn write_world(dir: &std::path::Path, clicks: usize) -> World {
    let world = World::new(WorldConfig {
        users: 300,
        items: 200,
        affinity: 8.0,
        ..WorldConfig::default()
    });
    let mut rng = Rng::new(5);
    let mut inter = String::from("user_id,item_id,time_ms\n");
    for n in 0..clicks {
        let (u, j) = world.sample_click(&mut rng);
        inter.push_str(&format!(
            "{},{},{}\n",
            world.users[u].id,
            world.items[j].id,
            1_000 + n
        ));
    }
    std::fs::write(dir.join("interactions.csv"), inter).unwrap();
    let mut users = String::from("user_id,gender,age,occupation,zip\n");
    for u in &world.users {
        let p = &u.profile;
        users.push_str(&format!(
            "{},{},{},{},{}\n",
            u.id,
            p.gender.as_deref().unwrap_or(""),
            p.age.unwrap_or(0),
            p.occupation.as_deref().unwrap_or(""),
            p.zip.as_deref().unwrap_or("")
        ));
    }
    std::fs::write(dir.join("users.csv"), users).unwrap();
    let mut items = String::from("item_id,genres\n");
    for i in &world.items {
        items.push_str(&format!("{},{}\n", i.id, i.features.genres.join("|")));
    }
    std::fs::write(dir.join("items.csv"), items).unwrap();
    world
}

#[test]
fn a_streaming_pass_learns_more_than_popularity_and_the_report_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    write_world(dir.path(), 30_000);
    let data = Dataset::load(dir.path(), Format::Auto).unwrap();
    assert_eq!(data.interactions.len(), 30_000);
    let mut config = common::world::config();
    config.train.batch_size = 128;
    let opts = offline::Options {
        ks: vec![10, 50],
        ..Default::default()
    };
    let o = offline::run(&data, &config, &opts);
    let r = &o.report;
    assert_eq!(r.test_users, 300);
    assert_eq!(r.train_interactions, 30_000 - 300);
    let (model, popular) = (r.exact["recall@10"], r.most_popular["recall@10"]);
    assert!(
        model > popular + 0.05,
        "personal affinity should beat popularity: model {model:.3}, popular {popular:.3}"
    );
    // The model learns while streaming: the prequential recall of the last quarter of the pass
    // beats the first quarter's.
    let q = r.prequential.len() / 4;
    let mean = |pts: &[offline::PrequentialPoint]| {
        pts.iter().map(|p| p.recall).sum::<f64>() / pts.len() as f64
    };
    let (early, late) = (mean(&r.prequential[..q]), mean(&r.prequential[3 * q..]));
    assert!(
        late > early + 0.05,
        "prequential early {early:.3} late {late:.3}"
    );
    // HNSW on 200 items finds what exact scoring finds.
    let ann = r.ann.as_ref().unwrap();
    assert!(
        (ann["recall@50"] - r.exact["recall@50"]).abs() < 0.02,
        "ann {ann:?} exact {:?}",
        r.exact
    );
    // Metrics are internally consistent.
    assert!(r.exact["recall@10"] <= r.exact["recall@50"]);
    assert!((r.exact["precision@10"] * 10.0 - r.exact["recall@10"]).abs() < 1e-9);

    let out = tempfile::tempdir().unwrap();
    report::export(out.path(), &data, &o).unwrap();
    let lines = |f: &str| {
        std::fs::read_to_string(out.path().join(f))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines("test.csv"), 301);
    assert_eq!(lines("train.csv"), 30_000 - 300 + 1);
    assert_eq!(lines("user_vectors.csv"), 301);
    assert_eq!(lines("item_vectors.csv"), 201);
    let svg = out.path().join("curve.svg");
    report::plot_svg(r, &svg).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert!(report::summary(r).contains("popular"));
}
