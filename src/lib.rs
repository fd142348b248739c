//! # towerstream
//!
//! A streaming online-learning recall (candidate retrieval) system: impression and click events
//! arrive on Kafka, a two-tower model trains on them batch by batch, and a live ANN index of
//! item embeddings serves top-K candidates that are seconds behind the stream.
//!
//! The modules follow the data flow:
//!
//! | stage | module | owns |
//! |---|---|---|
//! | wire format | [`event`] | event types mirroring `schemas/`, parsing and validation |
//! | mapping | [`mapping`] | the user's own JSON events read as towerstream's (JSON Pointers per field) |
//! | sources | [`data`], [`synth`], [`replay`] | datasets and synthetic streams as events, published to Kafka |
//! | ingest | [`ingest`] | Kafka consumer, the event pipeline shared with replicas, dead letters, offsets, rebalances, backpressure |
//! | tables | [`catalog`] | catalogue and profile state from the item/user topics |
//! | join | [`join`] | click-to-impression join, deduplication, window |
//! | hand-off | [`example`] | the typed training example and its source position |
//! | batch | [`batch`] | micro-batches from the channel |
//! | features | [`features`] | feature spec, dynamic vocabularies, user histories |
//! | train | [`train`] | towers, losses, estimator, optimizer, the step, checkpoints |
//! | refresh | [`refresh`] | model deltas → mirror → snapshots → index generations, swapped atomically |
//! | index | [`index`] | the usearch HNSW index of a generation |
//! | serve | [`serve`] | recall queries and the HTTP API |
//! | ship | [`generations`] | generations over a Kafka topic: trainer publishes, replicas follow |
//! | replicate | [`replica`] | a serving replica: catalogue, histories and generations from Kafka |
//! | evaluate | [`eval`] | leave-last-out metrics, the prequential curve, reports |
//!
//! [`app`] wires them into one process (`run`, or `train` publishing generations);
//! [`replica`] is the `serve` process. Beside them: [`config`] (TOML + environment),
//! [`metrics`] (Prometheus), [`health`] (which workers run, for `/healthz` and the exit code),
//! [`kafka`] (clients, topics), [`hash`] (the stable hash checkpointed state relies on),
//! [`priority`] (training and refresh threads yield the CPU to requests).

pub mod app;
pub mod batch;
pub mod catalog;
pub mod config;
pub mod data;
pub mod eval;
pub mod event;
pub mod example;
pub mod features;
pub mod generations;
pub mod hash;
pub mod health;
pub mod index;
pub mod ingest;
pub mod join;
pub mod kafka;
pub mod mapping;
pub mod metrics;
pub mod priority;
pub mod refresh;
pub mod replay;
pub mod replica;
pub mod serve;
pub mod synth;
pub mod train;
