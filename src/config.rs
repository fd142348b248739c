//! Service configuration: one TOML file, overridden by `TOWERSTREAM_*` environment variables.
//!
//! Every key has a default, so an empty file is a working local setup. Environment variables
//! name a key path with `__` between levels: `TOWERSTREAM_KAFKA__BROKERS=host:9092` sets
//! `kafka.brokers`. [`Config::validate`] turns a bad value into an error naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::event::{MAX_DENSE_ABS, MIN_DENSE_STD};

/// A configuration problem, always naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is present but unusable.
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `join.window_ms`.
        key: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The file or an environment variable does not parse into the expected shape.
    #[error("configuration error: {0}")]
    Load(#[from] Box<figment::Error>),
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and topics.
    pub kafka: KafkaConfig,
    /// Parsing, validation and the hand-off channel.
    pub ingest: IngestConfig,
    /// Where towerstream's fields live in the user's own events (`[mapping.default]`,
    /// `[mapping.topics."name"]`); absent: the event topics carry towerstream's schema.
    pub mapping: crate::mapping::MappingConfig,
    /// Click-to-impression join.
    pub join: JoinConfig,
    /// Input features and vocabularies.
    pub features: FeaturesConfig,
    /// Tower architecture.
    pub model: ModelConfig,
    /// The online training loop, loss and optimizer.
    pub train: TrainConfig,
    /// Checkpoints.
    pub checkpoint: CheckpointConfig,
    /// Index generations.
    pub index: IndexConfig,
    /// The HTTP API.
    pub serve: ServeConfig,
    /// Online (prequential) evaluation.
    pub eval: EvalConfig,
    /// Shipping generations to serving replicas over Kafka (`train` / `serve`).
    pub replication: ReplicationConfig,
}

/// The generations topic between a trainer (`towerstream train`) and its serving replicas
/// (`towerstream serve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Topic the trainer publishes generations to (one partition: one ordered log per model).
    pub topic: String,
    /// Publish generations to `topic` from `run` too (`train` always does).
    pub publish: bool,
    /// A full model (every row in use) is published at least this often; the messages in
    /// between carry only the rows changed since the previous one. A new replica starts from
    /// the latest full message, so this bounds how much it replays.
    pub full_every_secs: u64,
    /// At most one generation is published per this many ms; generations in between are
    /// skipped (their changed rows go with the next one). Every message carries the item
    /// vectors of a new main index (items × output dim × 4 bytes), so this bounds the topic's
    /// bandwidth; 0 publishes every generation.
    pub min_interval_ms: u64,
    /// Bytes per Kafka record; larger generations are split into chunks (stay below the
    /// broker's `message.max.bytes`, 1 MiB by default).
    pub chunk_bytes: usize,
    /// `retention.ms` of the topic when towerstream creates it (must keep at least two full
    /// messages). A replica starts from the newest full message, so older ones only cost disk:
    /// at a million items the topic takes about 30 MB/s, 18 GB per 10 minutes.
    pub retention_ms: u64,
    /// Consumer group prefix of replicas (each replica reads every message; the group only
    /// names the client in broker tools, nothing is committed).
    pub replica_group_id: String,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            topic: "towerstream.generations".into(),
            publish: false,
            full_every_secs: 60,
            min_interval_ms: 1000,
            chunk_bytes: 512 * 1024,
            retention_ms: 600_000,
            replica_group_id: "towerstream-replica".into(),
        }
    }
}

/// Online evaluation: before a sampled click is trained on, is its item in the user's top-K of
/// the served generation?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// K of the prequential Recall@K.
    pub prequential_k: usize,
    /// Check every n-th trained click (0 disables).
    pub prequential_every: u64,
    /// The gauge averages the last this many checked clicks.
    pub prequential_window: usize,
    /// Offline evaluation only (`towerstream eval`): rank by `s/τ + β·log p̂(item)` with this
    /// β, adding the estimator's popularity back to the log-Q-corrected score. A measurement
    /// of whether serving should do the same; the API does not (yet).
    pub popularity_prior: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            prequential_k: 100,
            prequential_every: 200,
            prequential_window: 500,
            popularity_prior: 0.0,
        }
    }
}

/// Storage precision of indexed vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats.
    F16,
    /// 8-bit integers.
    I8,
}

/// How a catalogue above `index.exact_max_items` follows the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LargeCatalog {
    /// Keep the HNSW links across model versions and embed the catalogue again for each
    /// version (seconds); relink in the background when the measured recall drifts below
    /// `index.relink_below_recall` or catalogue changes pile up. Replicas receive the links
    /// once per relink and each version's vectors.
    Relink,
    /// Split the distinct vectors into about √n / 4 lists around centroids for every model
    /// version (spherical k-means warm-started from the previous version's centroids, then
    /// one matrix product assigning every vector: a fraction of a second) and scan the lists
    /// whose centroids score best, as many as the probed recall asks for. Nothing built in
    /// the background, nothing goes stale. Replicas receive the centroids and the list of
    /// each distinct vector with every version.
    #[default]
    Clusters,
    /// Rebuild the HNSW graph (links and vectors) for a model version, one build at a time:
    /// the served model is one to two build times old (minutes at a million items), and a
    /// replica receives the whole graph with each new one.
    Rebuild,
}

/// How item vectors are indexed and refreshed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// A new generation every this many ms.
    pub refresh_interval_ms: u64,
    /// ... or as soon as this many catalogue changes accumulated (0: only on the interval).
    pub refresh_on_changes: usize,
    /// Catalogues up to this size are searched exactly (brute force over fresh vectors, no
    /// build). A larger catalogue is searched as `large_catalog` says, unless its items embed
    /// to at most `exact_max_distinct` distinct vectors.
    pub exact_max_items: usize,
    /// A catalogue above `exact_max_items` whose items embed to at most this many *distinct*
    /// vectors (items without an id row of their own share one per feature combination) is
    /// searched exactly over those (recall 1, nothing to build). Every request scans them
    /// all: at 1,000 requests/s, 100k of them took 2–4 ms a request on the 2-core bench
    /// machine against 0.15 ms for the lists, so the lists take over early.
    pub exact_max_distinct: usize,
    /// Vector precision in the HNSW index.
    pub quantization: Quantization,
    /// HNSW connectivity (M).
    pub connectivity: usize,
    /// HNSW expansion while building (efConstruction).
    pub expansion_add: usize,
    /// HNSW expansion while searching (ef).
    pub expansion_search: usize,
    /// The search depth follows the request: ef is at least this multiple of `k`. usearch
    /// searches at least `k` deep by itself, but at ef = k the last results are often wrong
    /// (`cargo bench --bench serve`, 100k items: recall@1000 0.919 at 1 × k, 0.983 at 2 × k).
    pub expansion_per_k: f64,
    /// A category or genre filter that at most this many items pass is searched exactly over
    /// those items; a larger one walks the graph with the filter (which slows as the share of
    /// passing items shrinks).
    pub filtered_exact_max: usize,
    /// Items embedded per item-tower call while building.
    pub embed_batch: usize,
    /// How a catalogue of more than `exact_max_items` distinct vectors follows the model.
    pub large_catalog: LargeCatalog,
    /// `clusters` and `relink`: the recall@100 against exact search of the same version each
    /// probed generation is tuned to (more lists scanned, deeper walks); with `relink` the
    /// links are also rebuilt in the background once the recall at the base depth is below it.
    pub relink_below_recall: f64,
    /// `clusters`, `relink`: queries (items' own vectors) probed per generation to measure
    /// that recall.
    pub recall_probes: usize,
    /// `clusters`, `relink`: while the probe falls short, searches are deepened (doubling the
    /// candidates per result, up to this multiple of `k`; lists scanned are `depth / 32` of
    /// them) until it reaches `relink_below_recall`, and made shallower again once half the
    /// depth does; `expansion_per_k` disables it.
    pub max_expansion_per_k: f64,
    /// `relink`: items changed or added since the links were built, as a share of the linked
    /// ones, above which the links are rebuilt (changed items are searched exactly meanwhile).
    pub relink_above_changed: f64,
    /// Every n-th trained click is timed from its event time to the first generation that
    /// includes it (freshness histogram); 0 disables.
    pub freshness_sample_every: u64,
    /// Added to the nice value of the refresher and index builds (0..=19).
    pub nice: i32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            refresh_interval_ms: 2000,
            refresh_on_changes: 1000,
            exact_max_items: 100_000,
            exact_max_distinct: 20_000,
            quantization: Quantization::F32,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 128,
            expansion_per_k: 2.0,
            filtered_exact_max: 20_000,
            embed_batch: 8192,
            large_catalog: LargeCatalog::Clusters,
            relink_below_recall: 0.95,
            recall_probes: 8,
            max_expansion_per_k: 16.0,
            relink_above_changed: 0.05,
            nice: 5,
            freshness_sample_every: 16,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Listen address.
    pub listen: String,
    /// `k` when a request gives none.
    pub default_k: usize,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest a request may take (queue and compute; 408 after it).
    pub request_timeout_ms: u64,
    /// Recall requests computed at once, on the blocking pool (0: one per core).
    pub max_concurrent_recalls: usize,
    /// Recall requests waiting for a slot; beyond them requests are shed at once (503 with
    /// `Retry-After`).
    pub max_queued_recalls: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:8080".into(),
            default_k: 100,
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 2000,
            max_concurrent_recalls: 0,
            max_queued_recalls: 64,
        }
    }
}

/// Kafka connection, topics and consumer behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Consumer group of the trainer(s).
    pub group_id: String,
    /// Topics carrying impressions and clicks (any mix; key by user id to keep a user's
    /// impressions and clicks in order on one partition).
    pub event_topics: Vec<String>,
    /// Catalogue topic (log-compacted, keyed by item id); read in full by every instance.
    pub item_topic: String,
    /// Profile topic (log-compacted, keyed by user id); read in full by every instance.
    pub user_topic: String,
    /// Where malformed events go, with the reason in headers.
    pub dead_letter_topic: String,
    /// Log-compacted topic carrying the resume points of revoked partitions that are too
    /// large for commit metadata (a long join window holding thousands of impressions); the
    /// commit then points at the record. Shared by every group, keyed by group and partition.
    pub handover_topic: String,
    /// How often offsets are committed to the group: the applied ones when ingesting alone, the
    /// newest checkpoint's when a trainer checkpoints.
    pub commit_interval_ms: u64,
    /// librdkafka statistics interval (consumer lag metrics); 0 disables.
    pub statistics_interval_ms: u64,
    /// Consumer session timeout.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties applied to every client (e.g. security settings).
    pub client: BTreeMap<String, String>,
    /// Reading the tables at start fails when no record arrived for this long while some
    /// partition is still behind (a large catalogue that keeps arriving never times out).
    pub bootstrap_timeout_secs: u64,
    /// Replication factor of the topics towerstream creates (all of them, the generations
    /// topic included); -1 takes the broker's `default.replication.factor`.
    pub replication_factor: i32,
    /// What to do when a checkpoint's resume point lies below a partition's log start
    /// (retention deleted messages the model never saw): log an error and go on from the log
    /// start (`warn`), or refuse to start (`fail`). Either way it is counted.
    pub on_retention_gap: RetentionGapPolicy,
    /// Where a model without a checkpoint starts each partition: the beginning of the topic
    /// (`beginning`: it has seen nothing, whatever the group committed), or the group's
    /// committed offset (`committed`: a further trainer joining the group to share the work,
    /// skipping what the previous owner applied).
    pub fresh_start: FreshStart,
}

/// Where a model without a checkpoint starts reading (`kafka.fresh_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreshStart {
    /// From the beginning of every partition's retention.
    #[default]
    Beginning,
    /// From the group's committed offsets (the beginning where there is none).
    Committed,
}

/// Reaction to a resume point that retention already deleted (`kafka.on_retention_gap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionGapPolicy {
    /// Log an error, count the lost messages, continue from the log start.
    #[default]
    Warn,
    /// Refuse to start, naming the partitions and the messages lost.
    Fail,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:19092".into(),
            group_id: "towerstream".into(),
            event_topics: vec!["towerstream.events".into()],
            item_topic: "towerstream.items".into(),
            user_topic: "towerstream.users".into(),
            dead_letter_topic: "towerstream.dead-letter".into(),
            handover_topic: "towerstream.handover".into(),
            commit_interval_ms: 1000,
            statistics_interval_ms: 5000,
            session_timeout_ms: 10_000,
            client: BTreeMap::new(),
            bootstrap_timeout_secs: 60,
            replication_factor: -1,
            on_retention_gap: RetentionGapPolicy::Warn,
            fresh_start: FreshStart::Beginning,
        }
    }
}

/// Parsing and hand-off to the trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Payloads larger than this are dead-lettered as `oversize`.
    pub max_event_bytes: usize,
    /// Capacity of the bounded example channel; when full, consumption pauses.
    pub channel_capacity: usize,
    /// Emit "shown but not clicked" negatives when an impression leaves the join window —
    /// in `pointwise_bce` mode, the only one that trains on them (see
    /// [`Config::emits_shown_negatives`]); the other modes would only spend batch slots on them.
    pub emit_impression_negatives: bool,
    /// Most dead letters being written at once; at this many, consumption pauses until the
    /// broker takes them (a refused dead letter is retried, never dropped).
    pub max_pending_dead_letters: usize,
    /// Deletions per table (items, users) whose event time is remembered, so an older upsert
    /// arriving later does not bring the entry back; the oldest is forgotten first.
    pub max_remembered_deletions: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_event_bytes: 64 * 1024,
            channel_capacity: 16 * 1024,
            emit_impression_negatives: true,
            max_pending_dead_letters: 1000,
            max_remembered_deletions: 100_000,
        }
    }
}

/// The click-to-impression join and deduplication window (event time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// How long an impression waits for its click, and how long event ids are remembered
    /// for deduplication, in event-time ms.
    pub window_ms: i64,
    /// Most impressions held at once; the oldest leaves early beyond this.
    pub max_impressions: usize,
    /// Most event ids remembered for deduplication.
    pub dedup_capacity: usize,
    /// Events stamped more than this far ahead of the wall clock are dead-lettered
    /// (`future_time`), ms; 0 accepts any time.
    pub max_future_ms: i64,
    /// Events stamped more than this far behind the newest event of their partition are
    /// dead-lettered (`too_late`), ms; 0 accepts any lateness.
    pub allowed_lateness_ms: i64,
    /// An input partition without events for this long (wall time) no longer holds its
    /// shard's watermark back, and a silent shard's clock follows the wall clock, ms.
    pub idle_timeout_ms: i64,
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            window_ms: 10 * 60 * 1000,
            max_impressions: 1_000_000,
            dedup_capacity: 2_000_000,
            max_future_ms: 10 * 60 * 1000,
            allowed_lateness_ms: 24 * 60 * 60 * 1000,
            idle_timeout_ms: 60 * 1000,
        }
    }
}

/// A sparse user feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserFeature {
    /// The user id itself.
    UserId,
    /// Profile gender.
    Gender,
    /// Profile age (as a category).
    Age,
    /// Profile occupation.
    Occupation,
    /// Profile postal code.
    Zip,
}

/// A sparse item feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemFeature {
    /// The item id itself (also the table of the history feature).
    ItemId,
    /// Catalogue category.
    Category,
    /// Catalogue genres, mean-pooled.
    Genres,
}

/// Which entity a dense feature belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// From the user profile's `dense` map.
    User,
    /// From the item's `dense` map.
    Item,
}

/// Transformation applied before standardisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// x
    #[default]
    Identity,
    /// ln(1 + max(x, 0))
    Log1p,
}

/// A dense (numeric) feature: `(transform(x) − mean) / std`, 0 when missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseFeature {
    /// Whose `dense` map it comes from.
    pub entity: Entity,
    /// Key in that map.
    pub name: String,
    /// Transformation before standardisation.
    #[serde(default)]
    pub transform: Transform,
    /// Mean after transformation (finite, within ±[`MAX_DENSE_ABS`]).
    #[serde(default)]
    pub mean: f64,
    /// Standard deviation after transformation (at least [`MIN_DENSE_STD`]: with the events'
    /// own bound, every standardised value is then finite in f32).
    #[serde(default = "one")]
    pub std: f64,
}

fn one() -> f64 {
    1.0
}

/// Features and vocabularies (the article's MovieLens set by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Sparse user features.
    pub user: Vec<UserFeature>,
    /// Sparse item features; must include `item_id`.
    pub item: Vec<ItemFeature>,
    /// Dense features.
    pub dense: Vec<DenseFeature>,
    /// Length of the "recent clicked items" history (0 disables it).
    pub history_len: usize,
    /// Most users whose history is kept (least recently active dropped first).
    pub max_users_with_history: usize,
    /// Embedding rows per feature (including the unknown row), by feature name.
    pub capacity: BTreeMap<String, u32>,
    /// Rows for features not named in `capacity`.
    pub default_capacity: u32,
    /// Sightings before an id gets its own row.
    pub min_count: u32,
    /// A full vocabulary reuses rows unseen for longer than this (event time).
    pub ttl_ms: i64,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        FeaturesConfig {
            user: vec![
                UserFeature::UserId,
                UserFeature::Gender,
                UserFeature::Age,
                UserFeature::Occupation,
                UserFeature::Zip,
            ],
            item: vec![ItemFeature::ItemId, ItemFeature::Genres],
            dense: Vec::new(),
            history_len: 10,
            max_users_with_history: 1_000_000,
            capacity: BTreeMap::from([
                ("user_id".to_owned(), 1_000_000),
                ("item_id".to_owned(), 500_000),
                ("zip".to_owned(), 100_000),
            ]),
            default_capacity: 10_000,
            min_count: 1,
            ttl_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// How scores are computed from tower outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    /// L2-normalised outputs, inner product (= cosine).
    #[default]
    Cosine,
    /// Raw inner product.
    Dot,
}

/// Tower architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Embedding width of every sparse feature.
    pub embedding_dim: i64,
    /// MLP widths of both towers; the last is the output dimension.
    pub tower_dims: Vec<i64>,
    /// Cosine or dot.
    pub similarity: Similarity,
    /// Temperature τ: scores are divided by it.
    pub temperature: f64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Seed of weight initialisation and sampling.
    pub seed: u64,
    /// How the user tower pools the history of clicked items.
    pub history_pooling: HistoryPooling,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            embedding_dim: 16,
            tower_dims: vec![256, 128, 64],
            similarity: Similarity::Cosine,
            temperature: 0.2,
            device: "cpu".into(),
            seed: 42,
            history_pooling: HistoryPooling::Mean,
        }
    }
}

/// Weight of shown-not-clicked negatives (`train.shown_weighting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownWeighting {
    /// Every shown negative counts fully.
    #[default]
    None,
    /// Weighted by the examination probability of its position, estimated from the
    /// click-through rate by position (see `train::position`).
    Examination,
}

/// Pooling of the history feature (`model.history_pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryPooling {
    /// The mean of the items' embeddings (order-blind).
    #[default]
    Mean,
    /// Attention with recency: weights `softmax(e·q/√d + bias[age])` with a learned query
    /// `q` and a learned bias per age (0 = the newest click), so recent and telling clicks
    /// count more.
    Attention,
}

/// The training objective (the article's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// List-wise in-batch softmax with sampling-bias correction (YoutubeSBC).
    #[default]
    InBatchSoftmax,
    /// Point-wise binary cross-entropy with sampled and shown-not-clicked negatives (DSSM).
    PointwiseBce,
    /// List-wise softmax over k sampled negatives per positive (YoutubeDNN).
    SampledSoftmax,
    /// Pair-wise BPR with one sampled negative per positive (FacebookDSSM).
    PairwiseBpr,
}

/// Distribution of sampled negatives over the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeDistribution {
    /// Every item equally likely.
    #[default]
    Uniform,
    /// ∝ clicks^0.75 (word2vec).
    Popularity075,
    /// ∝ ln(1 + clicks).
    LogPopularity,
}

/// Optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam (lazy on embedding rows).
    #[default]
    Adam,
    /// Adagrad.
    Adagrad,
}

/// Reward weight of a positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reward {
    /// Every positive weighs 1.
    #[default]
    None,
    /// 1 + ln(1 + dwell seconds).
    LogDwell,
}

/// The online training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Objective.
    pub mode: Mode,
    /// Examples per step.
    pub batch_size: usize,
    /// Longest wait for a batch to fill after its first example (ms).
    pub max_wait_ms: u64,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate of the MLPs.
    pub lr_dense: f64,
    /// Learning rate of the embedding rows.
    pub lr_embedding: f64,
    /// Subtract log p̂ from in-batch logits (YoutubeSBC).
    pub sbc_correction: bool,
    /// Strength of the log-Q corrections (in-batch: `log p̂`; sampled softmax: `log k·q`):
    /// logits move by `−strength · log q`. 1 is the full correction of the papers: the
    /// learned score then estimates `log p(item | user)`, popularity included; without it a
    /// softmax over click-sampled negatives learns the score minus `log p̂` and under-serves
    /// popular items.
    pub logq_strength: f64,
    /// In-batch softmax: leave out of a row's negatives the batch's other positives *of the
    /// same user* (items the user clicked are not negatives for them). A stream in time
    /// order comes in sessions — on MovieLens a batch of 128 holds 4–5 users — so most of a
    /// row's in-batch negatives are the user's own clicks. Off by measurement: masking them
    /// lost on ML-100K and gained nothing elsewhere (README, ablations).
    pub mask_same_user: bool,
    /// Extra uniformly sampled negatives per in-batch step (mixed negative sampling, Yi et
    /// al. 2019): the in-batch columns are the clicked items, so the long tail never appears
    /// as a negative without them. 256 by measurement (README, ablations).
    pub mixed_negatives: usize,
    /// Sampled negatives per positive (point-wise and sampled-softmax modes).
    pub sampled_negatives: usize,
    /// Point-wise mode: weight of a shown-not-clicked negative — `none` (1) or
    /// `examination`, the estimated probability that its slate position was looked at.
    pub shown_weighting: ShownWeighting,
    /// In-batch mode: the item vectors of this many recent positives are kept and added to
    /// every step's softmax as further negatives (cross-batch negatives); 0 disables.
    pub memory_bank: usize,
    /// Probability that a training example reads its user id and item id through the shared
    /// unknown row instead of their own rows (id dropout): the unknown row then learns what a
    /// cold user or an item without a row is served with. 0 disables (the row stays zero).
    pub id_dropout: f64,
    /// Distribution of sampled negatives.
    pub negative_distribution: NegativeDistribution,
    /// Reward weighting of positives.
    pub reward: Reward,
    /// Estimator buckets per hash (H).
    pub estimator_buckets: usize,
    /// Estimator hash functions (m).
    pub estimator_hashes: usize,
    /// Estimator learning rate (α).
    pub estimator_alpha: f32,
    /// libtorch intra-op threads (0: libtorch's default, one per core). One is the default:
    /// when the trainer shares the cores with serving, ingestion or a broker, libtorch's
    /// OpenMP workers wait on each other whenever one is preempted (measured on 2 cores with
    /// one other busy process: 1,083 examples/s with 2 threads against 30,537 with 1).
    pub threads: usize,
    /// Added to the nice value of the training thread and its libtorch workers (0..=19; higher
    /// yields the CPU to recall requests sooner).
    pub nice: i32,
    /// Largest global L2 norm of a step's gradients (the MLPs' and the touched embedding
    /// rows' together); larger ones are scaled down to it before the optimizer step. 0 turns
    /// clipping off (the default: Adam's per-parameter scaling already bounds each update, and
    /// non-finite steps are skipped regardless).
    pub clip_grad_norm: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: Mode::InBatchSoftmax,
            batch_size: 128,
            max_wait_ms: 200,
            optimizer: OptimizerKind::Adam,
            lr_dense: 1e-3,
            lr_embedding: 1e-2,
            sbc_correction: true,
            logq_strength: 1.0,
            mask_same_user: false,
            mixed_negatives: 256,
            sampled_negatives: 10,
            memory_bank: 0,
            shown_weighting: ShownWeighting::None,
            id_dropout: 0.0,
            negative_distribution: NegativeDistribution::Uniform,
            reward: Reward::None,
            estimator_buckets: 1 << 20,
            estimator_hashes: 2,
            estimator_alpha: 0.01,
            threads: 1,
            nice: 10,
            clip_grad_norm: 0.0,
        }
    }
}

/// Checkpoints of model, estimator, vocabularies, histories and Kafka offsets together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory of checkpoints (`step-<n>/` inside).
    pub dir: std::path::PathBuf,
    /// Write one every this many steps (0: never by steps).
    pub every_steps: u64,
    /// Write one every this many seconds (0: never by time).
    pub every_secs: u64,
    /// How many to keep.
    pub keep: usize,
    /// Append the source position of every trained example to this JSON-lines file (empty:
    /// off). Synced before each checkpoint; see `towerstream::train::ledger`.
    pub ledger: std::path::PathBuf,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: "var/checkpoints".into(),
            every_steps: 0,
            every_secs: 60,
            keep: 3,
            ledger: std::path::PathBuf::new(),
        }
    }
}

/// One `section.key=value` override as a TOML line; a value that is not TOML becomes a string.
fn override_toml(o: &str) -> Result<String, ConfigError> {
    let Some((key, value)) = o.split_once('=') else {
        return Err(invalid("--set", format!("{o:?} is not key=value")));
    };
    let key = key.trim();
    let valid_key = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if !valid_key {
        return Err(invalid(
            "--set",
            format!("{key:?} is not a key path like serve.listen"),
        ));
    }
    let value = value.trim();
    let line = format!("{key} = {value}");
    if Figment::from(Toml::string(&line))
        .extract::<figment::value::Dict>()
        .is_ok()
    {
        return Ok(line);
    }
    Ok(format!(
        "{key} = {}",
        serde_json::Value::String(value.to_owned())
    ))
}

impl Config {
    /// Whether ingestion emits shown-not-clicked negatives: asked for
    /// (`ingest.emit_impression_negatives`) and trained on (`train.mode = pointwise_bce`).
    /// The list-wise and pair-wise modes take their negatives from the batch and the pool;
    /// emitting shown negatives for them filled most of an impression-heavy batch with
    /// examples the step then dropped (11 positives in a batch of 256 at 4 % clicks).
    pub fn emits_shown_negatives(&self) -> bool {
        self.ingest.emit_impression_negatives && self.train.mode == Mode::PointwiseBce
    }

    /// Loads defaults, then `path` (if given), then `TOWERSTREAM_*` environment variables,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(path, &[])
    }

    /// [`Config::load`], then `overrides` on top: `section.key=value` pairs (command-line
    /// `--set`), the value read as a TOML value (`true`, `3`, `["a", "b"]`) or else as a string.
    pub fn load_with(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file(path));
        }
        // TOWERSTREAM_CONFIG names the file (the `--config` flag), it is not a key.
        figment = figment.merge(
            Env::prefixed("TOWERSTREAM_")
                .ignore(&["config"])
                .split("__"),
        );
        for o in overrides {
            figment = figment.merge(Toml::string(&override_toml(o)?));
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string over the defaults (no environment), then validates.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The event topics' decoder: towerstream's schema, or the `[mapping]` where one is set.
    pub fn decoder(&self) -> Result<crate::mapping::Decoder, ConfigError> {
        crate::mapping::Decoder::new(
            &self.mapping,
            &self.kafka.event_topics,
            self.ingest.max_event_bytes,
        )
    }

    /// Checks every value that serde's types cannot, naming the key of the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        if k.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if k.event_topics.is_empty() {
            return Err(invalid("kafka.event_topics", "needs at least one topic"));
        }
        let mut all: Vec<(&str, &str)> = k
            .event_topics
            .iter()
            .map(|t| ("kafka.event_topics", t.as_str()))
            .collect();
        all.push(("kafka.item_topic", &k.item_topic));
        all.push(("kafka.user_topic", &k.user_topic));
        all.push(("kafka.dead_letter_topic", &k.dead_letter_topic));
        all.push(("kafka.handover_topic", &k.handover_topic));
        all.push(("replication.topic", &self.replication.topic));
        for (i, (key, topic)) in all.iter().enumerate() {
            if !valid_topic_name(topic) {
                return Err(invalid(
                    key,
                    format!("{topic:?} is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"),
                ));
            }
            if all[..i].iter().any(|(_, t)| t == topic) {
                return Err(invalid(
                    key,
                    format!("topic {topic:?} is used for two purposes"),
                ));
            }
        }
        if !(10..=600_000).contains(&k.commit_interval_ms) {
            return Err(invalid(
                "kafka.commit_interval_ms",
                "must be in 10..=600000",
            ));
        }
        if k.statistics_interval_ms > 600_000 {
            return Err(invalid(
                "kafka.statistics_interval_ms",
                "must be at most 600000",
            ));
        }
        if !(1000..=300_000).contains(&k.session_timeout_ms) {
            return Err(invalid(
                "kafka.session_timeout_ms",
                "must be in 1000..=300000",
            ));
        }
        if !(1..=86_400).contains(&k.bootstrap_timeout_secs) {
            return Err(invalid(
                "kafka.bootstrap_timeout_secs",
                "must be in 1..=86400",
            ));
        }
        if !(k.replication_factor == -1
            || (1..=i32::from(i16::MAX)).contains(&k.replication_factor))
        {
            return Err(invalid(
                "kafka.replication_factor",
                "must be -1 (the broker's default.replication.factor) or in 1..=32767",
            ));
        }
        let i = &self.ingest;
        if !(1..=1_000_000).contains(&i.max_pending_dead_letters) {
            return Err(invalid(
                "ingest.max_pending_dead_letters",
                "must be in 1..=1000000",
            ));
        }
        if i.max_remembered_deletions > 100_000_000 {
            return Err(invalid(
                "ingest.max_remembered_deletions",
                "must be at most 100000000",
            ));
        }
        if !(64..=16 * 1024 * 1024).contains(&i.max_event_bytes) {
            return Err(invalid(
                "ingest.max_event_bytes",
                "must be in 64..=16777216",
            ));
        }
        if !(1..=10_000_000).contains(&i.channel_capacity) {
            return Err(invalid(
                "ingest.channel_capacity",
                "must be in 1..=10000000",
            ));
        }
        let r = &self.replication;
        if r.full_every_secs == 0 {
            return Err(invalid("replication.full_every_secs", "must be positive"));
        }
        if r.min_interval_ms > 3_600_000 {
            return Err(invalid(
                "replication.min_interval_ms",
                "must be at most 3600000",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&r.chunk_bytes) {
            return Err(invalid(
                "replication.chunk_bytes",
                "must be in 1024..=67108864",
            ));
        }
        if r.retention_ms < 2_000 * r.full_every_secs {
            return Err(invalid(
                "replication.retention_ms",
                "must keep at least two full messages (>= 2000 x replication.full_every_secs)",
            ));
        }
        if r.replica_group_id.trim().is_empty() {
            return Err(invalid("replication.replica_group_id", "must not be empty"));
        }
        let j = &self.join;
        if j.window_ms <= 0 {
            return Err(invalid("join.window_ms", "must be positive"));
        }
        if j.max_impressions == 0 {
            return Err(invalid("join.max_impressions", "must be positive"));
        }
        for (key, v) in [
            ("join.max_future_ms", j.max_future_ms),
            ("join.allowed_lateness_ms", j.allowed_lateness_ms),
        ] {
            if v < 0 {
                return Err(invalid(key, "must not be negative (0 turns the rule off)"));
            }
        }
        if j.idle_timeout_ms <= 0 {
            return Err(invalid("join.idle_timeout_ms", "must be positive"));
        }
        if j.dedup_capacity == 0 {
            return Err(invalid("join.dedup_capacity", "must be positive"));
        }
        self.decoder()?;
        self.validate_training()
    }

    fn validate_training(&self) -> Result<(), ConfigError> {
        let f = &self.features;
        if !f.item.contains(&ItemFeature::ItemId) {
            return Err(invalid("features.item", "must include item_id"));
        }
        if f.user.is_empty() && f.history_len == 0 {
            return Err(invalid(
                "features.user",
                "the user tower needs a feature or a history",
            ));
        }
        for (name, cap) in &f.capacity {
            if *cap < 2 {
                return Err(invalid(
                    &format!("features.capacity.{name}"),
                    "must be at least 2",
                ));
            }
        }
        if f.default_capacity < 2 {
            return Err(invalid("features.default_capacity", "must be at least 2"));
        }
        if f.history_len > 1000 {
            return Err(invalid("features.history_len", "must be at most 1000"));
        }
        for (i, d) in f.dense.iter().enumerate() {
            // With these bounds and the events' own (|x| ≤ MAX_DENSE_ABS), every standardised
            // value is finite in f32: a tiny std or a huge mean would make it inf.
            if !(d.std.is_finite() && d.std >= MIN_DENSE_STD) {
                return Err(invalid(
                    &format!("features.dense[{i}].std"),
                    format!("must be finite and at least {MIN_DENSE_STD:e}"),
                ));
            }
            if !(d.mean.is_finite() && d.mean.abs() <= MAX_DENSE_ABS) {
                return Err(invalid(
                    &format!("features.dense[{i}].mean"),
                    format!("must be finite and within ±{MAX_DENSE_ABS:e}"),
                ));
            }
        }
        let m = &self.model;
        if !(1..=1024).contains(&m.embedding_dim) {
            return Err(invalid("model.embedding_dim", "must be in 1..=1024"));
        }
        if m.tower_dims.is_empty() || m.tower_dims.iter().any(|d| !(1..=8192).contains(d)) {
            return Err(invalid("model.tower_dims", "needs 1+ widths in 1..=8192"));
        }
        if !(m.temperature.is_finite() && m.temperature > 0.0) {
            return Err(invalid("model.temperature", "must be positive"));
        }
        if parse_device(&m.device).is_none() {
            return Err(invalid(
                "model.device",
                format!("{:?} is not `cpu` or `cuda:N`", m.device),
            ));
        }
        let t = &self.train;
        if !(2..=1 << 20).contains(&t.batch_size) {
            return Err(invalid("train.batch_size", "must be in 2..=1048576"));
        }
        for (key, lr) in [
            ("train.lr_dense", t.lr_dense),
            ("train.lr_embedding", t.lr_embedding),
        ] {
            if !(lr.is_finite() && lr > 0.0 && lr < 10.0) {
                return Err(invalid(key, "must be in (0, 10)"));
            }
        }
        if !(t.clip_grad_norm.is_finite() && t.clip_grad_norm >= 0.0) {
            return Err(invalid(
                "train.clip_grad_norm",
                "must be finite and at least 0 (0 turns clipping off)",
            ));
        }
        if t.memory_bank > 1 << 20 {
            return Err(invalid("train.memory_bank", "must be at most 1048576"));
        }
        if !(0.0..=2.0).contains(&t.logq_strength) {
            return Err(invalid("train.logq_strength", "must be in [0, 2]"));
        }
        if !(0.0..1.0).contains(&t.id_dropout) {
            return Err(invalid("train.id_dropout", "must be in [0, 1)"));
        }
        if matches!(t.mode, Mode::PointwiseBce | Mode::SampledSoftmax) && t.sampled_negatives == 0 {
            return Err(invalid(
                "train.sampled_negatives",
                "must be positive for this mode",
            ));
        }
        if t.estimator_buckets == 0 || t.estimator_buckets > 1 << 28 {
            return Err(invalid(
                "train.estimator_buckets",
                "must be in 1..=268435456",
            ));
        }
        if !(1..=16).contains(&t.estimator_hashes) {
            return Err(invalid("train.estimator_hashes", "must be in 1..=16"));
        }
        if !(t.estimator_alpha > 0.0 && t.estimator_alpha <= 1.0) {
            return Err(invalid("train.estimator_alpha", "must be in (0, 1]"));
        }
        if self.checkpoint.keep == 0 {
            return Err(invalid("checkpoint.keep", "must be at least 1"));
        }
        let i = &self.index;
        if !(100..=3_600_000).contains(&i.refresh_interval_ms) {
            return Err(invalid(
                "index.refresh_interval_ms",
                "must be in 100..=3600000",
            ));
        }
        if !(2..=256).contains(&i.connectivity) {
            return Err(invalid("index.connectivity", "must be in 2..=256"));
        }
        if i.expansion_add == 0 {
            return Err(invalid("index.expansion_add", "must be positive"));
        }
        if i.expansion_search == 0 {
            return Err(invalid("index.expansion_search", "must be positive"));
        }
        if !(0.0..=1.0).contains(&i.relink_below_recall) {
            return Err(invalid("index.relink_below_recall", "must be in 0..=1"));
        }
        if !(i.relink_above_changed > 0.0 && i.relink_above_changed.is_finite()) {
            return Err(invalid(
                "index.relink_above_changed",
                "must be a positive share",
            ));
        }
        if !(1.0..=16.0).contains(&i.expansion_per_k) {
            return Err(invalid("index.expansion_per_k", "must be in 1..=16"));
        }
        if !(i.expansion_per_k..=64.0).contains(&i.max_expansion_per_k) {
            return Err(invalid(
                "index.max_expansion_per_k",
                "must be in index.expansion_per_k..=64",
            ));
        }
        if i.embed_batch == 0 {
            return Err(invalid("index.embed_batch", "must be positive"));
        }
        // Raising priority (negative values) needs privileges the service should not have.
        if !(0..=19).contains(&i.nice) {
            return Err(invalid("index.nice", "must be in 0..=19"));
        }
        if !(0..=19).contains(&self.train.nice) {
            return Err(invalid("train.nice", "must be in 0..=19"));
        }
        let e = &self.eval;
        if !(1..=1000).contains(&e.prequential_k) {
            return Err(invalid("eval.prequential_k", "must be in 1..=1000"));
        }
        if e.prequential_window == 0 {
            return Err(invalid("eval.prequential_window", "must be positive"));
        }
        let s = &self.serve;
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "serve.listen",
                format!("{:?} is not an address like 127.0.0.1:8080", s.listen),
            ));
        }
        if !(1..=1000).contains(&s.default_k) {
            return Err(invalid("serve.default_k", "must be in 1..=1000"));
        }
        if s.max_body_bytes < 256 {
            return Err(invalid("serve.max_body_bytes", "must be at least 256"));
        }
        if s.request_timeout_ms == 0 {
            return Err(invalid("serve.request_timeout_ms", "must be positive"));
        }
        Ok(())
    }
}

/// Parses `cpu` / `cuda:N` / `cuda`.
pub fn parse_device(s: &str) -> Option<tch::Device> {
    match s {
        "cpu" => Some(tch::Device::Cpu),
        "cuda" => Some(tch::Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda),
    }
}

fn valid_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENSE_PRICE_STD_TINY: &str =
        "[[features.dense]]\nentity = \"item\"\nname = \"price\"\nstd = 1e-300";
    const DENSE_PRICE_MEAN_NAN: &str =
        "[[features.dense]]\nentity = \"item\"\nname = \"price\"\nmean = nan";
    const DENSE_PRICE_MEAN_HUGE: &str =
        "[[features.dense]]\nentity = \"item\"\nname = \"price\"\nmean = 1e300";

    #[test]
    fn documented_example_file_matches_the_defaults() {
        let text = include_str!("../deploy/towerstream.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_values_override_defaults() {
        let c =
            Config::from_toml("[join]\nwindow_ms = 5000\n[kafka]\nevent_topics = [\"a\", \"b\"]\n")
                .unwrap();
        assert_eq!(c.join.window_ms, 5000);
        assert_eq!(c.kafka.event_topics, vec!["a", "b"]);
        assert_eq!(c.ingest, IngestConfig::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[join]\nwindow_ms = 0", "join.window_ms"),
            ("[kafka]\nevent_topics = []", "kafka.event_topics"),
            ("[kafka]\nitem_topic = \"bad topic\"", "kafka.item_topic"),
            (
                "[kafka]\ndead_letter_topic = \"towerstream.items\"",
                "kafka.dead_letter_topic",
            ),
            ("[ingest]\nchannel_capacity = 0", "ingest.channel_capacity"),
            (
                "[ingest]\nmax_pending_dead_letters = 0",
                "ingest.max_pending_dead_letters",
            ),
            (
                "[ingest]\nmax_remembered_deletions = 1000000000",
                "ingest.max_remembered_deletions",
            ),
            (
                "[kafka]\nbootstrap_timeout_secs = 0",
                "kafka.bootstrap_timeout_secs",
            ),
            (
                "[kafka]\nreplication_factor = 0",
                "kafka.replication_factor",
            ),
            ("[kafka]\non_retention_gap = \"ignore\"", "on_retention_gap"),
            ("[model]\ndevice = \"tpu\"", "model.device"),
            ("[model]\ntemperature = -1.0", "model.temperature"),
            ("[features]\nitem = [\"genres\"]", "features.item"),
            ("[train]\nestimator_alpha = 0.0", "train.estimator_alpha"),
            ("[train]\nclip_grad_norm = -1.0", "train.clip_grad_norm"),
            ("[train]\nclip_grad_norm = inf", "train.clip_grad_norm"),
            (DENSE_PRICE_STD_TINY, "features.dense[0].std"),
            (DENSE_PRICE_MEAN_NAN, "features.dense[0].mean"),
            (DENSE_PRICE_MEAN_HUGE, "features.dense[0].mean"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
    }

    #[test]
    fn unknown_and_mistyped_keys_are_errors_naming_the_key() {
        let err = Config::from_toml("[join]\nwindow = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("window"), "{err}");
        let err = Config::from_toml("[join]\nwindow_ms = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("window_ms"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's own test API
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ts.toml", "[kafka]\nbrokers = \"file:1\"\n")?;
            jail.set_env("TOWERSTREAM_KAFKA__BROKERS", "env:2");
            jail.set_env("TOWERSTREAM_JOIN__WINDOW_MS", "1234");
            let c = Config::load(Some(Path::new("ts.toml"))).expect("loads");
            assert_eq!(c.kafka.brokers, "env:2");
            assert_eq!(c.join.window_ms, 1234);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's own test API
    fn command_line_overrides_environment_and_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ts.toml", "[serve]\nlisten = \"file:1\"\n")?;
            jail.set_env("TOWERSTREAM_SERVE__DEFAULT_K", "7");
            jail.set_env("TOWERSTREAM_CONFIG", "ts.toml");
            let c = Config::load_with(
                Some(Path::new("ts.toml")),
                &[
                    "serve.listen=0.0.0.0:9000".into(),
                    "serve.default_k = 9".into(),
                    "kafka.event_topics=[\"a\", \"b\"]".into(),
                    "replication.publish=true".into(),
                ],
            )
            .expect("loads");
            assert_eq!(c.serve.listen, "0.0.0.0:9000");
            assert_eq!(c.serve.default_k, 9);
            assert_eq!(c.kafka.event_topics, vec!["a", "b"]);
            assert!(c.replication.publish);
            for (bad, key) in [
                ("serve.default_k=many", "default_k"),
                ("no-equals-sign", "--set"),
                ("serve..listen=x", "--set"),
                ("replication.chunk_bytes=10", "replication.chunk_bytes"),
                ("replication.topic=towerstream.items", "replication.topic"),
            ] {
                let err = Config::load_with(None, &[bad.into()])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(key), "{bad:?} gave {err}");
            }
            Ok(())
        });
    }
}
