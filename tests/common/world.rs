//! A small trained model on the synthetic world, for serving tests.

use std::sync::Arc;

use towerstream::catalog::{Catalog, SharedCatalog};
use towerstream::config::Config;
use towerstream::event::Event;
use towerstream::synth::{World, WorldConfig};
use towerstream::train::sampler::Rng;
use towerstream::train::Trainer;

/// The world, its catalogue (with profiles) and a trainer after one pass.
pub struct Trained {
    pub world: World,
    pub catalog: SharedCatalog,
    pub trainer: Trainer,
    pub config: Config,
}

pub fn config() -> Config {
    let mut c = Config::default();
    c.train.batch_size = 256;
    c.train.lr_embedding = 0.05;
    c.train.lr_dense = 0.003;
    c.model.tower_dims = vec![64, 32];
    c.model.temperature = 0.1;
    c.features.history_len = 20;
    c.train.estimator_buckets = 1 << 12;
    c
}

/// The world's items and profiles as a catalogue.
pub fn catalog_of(world: &World) -> Catalog {
    let mut catalog = Catalog::default();
    for e in world.item_events().into_iter().chain(world.user_events()) {
        match e {
            Event::Item(i) => {
                catalog.apply_item(&i);
            }
            Event::User(u) => {
                catalog.apply_user(&u);
            }
            _ => {}
        }
    }
    catalog
}

/// Trains on `clicks` synthetic clicks.
pub fn trained(users: usize, items: usize, clicks: usize) -> Trained {
    let world = World::new(WorldConfig {
        users,
        items,
        zipf: 1.0,
        affinity: 8.0,
        ..WorldConfig::default()
    });
    let catalog = catalog_of(&world);
    let config = config();
    let mut trainer = Trainer::new(&config);
    let mut rng = Rng::new(3);
    let examples: Vec<_> = (0..clicks)
        .map(|n| {
            let (u, j) = world.sample_click(&mut rng);
            world.example(u, j, n as i64, n as i64)
        })
        .collect();
    for b in examples.chunks(config.train.batch_size) {
        trainer.step(b, &catalog);
    }
    Trained {
        world,
        catalog: Arc::new(std::sync::RwLock::new(catalog)),
        trainer,
        config,
    }
}
