//! Generations over Kafka: how one trainer feeds any number of serving replicas.
//!
//! ```text
//!  towerstream train                                   towerstream serve (× N)
//!  refresher ── Generation ──▶ Publisher ──▶ generations topic ──▶ Follower ──▶ Served ──▶ API
//!     (user tower: full every full_every_secs,       (1 partition,   (own tower copy,
//!      changed rows in between; item vectors)         time-retained)  own index)
//! ```
//!
//! The topic is the only link: a replica needs nothing from the trainer's machine, starts from
//! the newest full message, and serves exactly the trainer's model version and item vectors.
//! The catalogue, profiles and click histories a request needs come from the same Kafka topics
//! the trainer reads (see [`crate::replica`]).

pub mod follow;
pub mod publish;
pub mod wire;

pub use follow::{FollowError, Follower};
pub use publish::{PublishError, PublishQueue, Publisher};
pub use wire::GenerationMessage;
