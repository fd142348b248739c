//! Online training of the two towers: features in, gradient steps out, checkpoints beside.
//!
//! * [`estimator`]: the SBC streaming frequency estimator (p̂ of an item among the positives).
//! * [`model`]: the towers and their embedding tables.
//! * [`loss`]: the article's objectives (in-batch softmax with correction, sampled softmax,
//!   BCE, BPR).
//! * [`objective`]: per mode, the columns, corrections and masks a step's loss is made of.
//! * [`memory_bank`]: recent positives' item vectors, extra in-batch negatives.
//! * [`optim`]: Adam/Adagrad with lazy row updates for embeddings.
//! * [`position`]: examination by slate position, to weight shown negatives.
//! * [`sampler`]: the catalogue pool that sampled negatives come from.
//! * [`trainer`]: one step on a micro-batch.
//! * [`changes`]: what steps changed since the last serving snapshot (incremental refresh).
//! * [`checkpoint`]: atomic checkpoints of everything a restart needs.
//! * [`ledger`]: an optional file of what every step trained on (audits, the fault harness).
//! * [`online`]: the loop from the ingestion channel to steps, acknowledgements, checkpoints.

pub mod changes;
pub mod checkpoint;
pub mod estimator;
pub mod ledger;
pub mod loss;
pub mod memory_bank;
pub mod model;
pub mod objective;
pub mod online;
pub mod optim;
pub mod position;
pub mod sampler;
pub mod trainer;

pub use trainer::{StepReport, StepTimings, Trainer};
