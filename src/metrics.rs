//! Prometheus metrics: one [`Registry`] per process (or per test), with typed handles per stage.
//!
//! Naming follows Prometheus conventions: `towerstream_` prefix, base units, `_total` on
//! counters, and no per-user or per-item labels (label values are bounded sets: topics,
//! partitions, event types, reasons).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::event::InvalidReason;

/// All metric handles of the process.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Ingestion (consume → validate → join → channel).
    pub ingest: IngestMetrics,
    /// Online training.
    pub train: TrainMetrics,
    /// Index generations and the recall API.
    pub serve: ServeMetrics,
    /// The generations topic (trainer publishing, replicas following).
    pub replication: ReplicationMetrics,
    /// 1 while a long-running worker runs, 0 once it stopped, by `worker` (see
    /// [`crate::health`]; a series appears when its worker starts).
    pub worker_up: IntGaugeVec,
}

/// Metrics of the generations topic: the trainer's publishing and a replica's following.
#[derive(Clone)]
pub struct ReplicationMetrics {
    /// Generations published to the topic, by kind (`full`, `delta`).
    pub published: IntCounterVec,
    /// Bytes published, by kind.
    pub published_bytes: IntCounterVec,
    /// Generations that could not be published (the next one is sent in full).
    pub publish_errors: IntCounter,
    /// Time to encode and publish one generation.
    pub publish_seconds: Histogram,
    /// Generations a replica received, by kind.
    pub received: IntCounterVec,
    /// Messages a replica could not use (gap, incompatible model, bad record), by reason.
    pub rejected: IntCounterVec,
    /// Trainer publish → replica serving, per generation.
    pub delay_seconds: Histogram,
    /// A replica's own work on one message: decoding it, applying it and serving it. When
    /// this exceeds the time between messages the replica falls behind.
    pub apply_seconds: Histogram,
    /// Consumer errors a replica's context follower logged and went on after, by `source`
    /// (`events`, `tables`).
    pub consumer_errors: IntCounterVec,
}

impl ReplicationMetrics {
    fn register(r: &Registry) -> Self {
        let m = ReplicationMetrics {
            published: counter_vec(
                r,
                "towerstream_replication_published_total",
                "Generations published to the generations topic, by kind",
                &["kind"],
            ),
            published_bytes: counter_vec(
                r,
                "towerstream_replication_published_bytes_total",
                "Bytes published to the generations topic, by kind",
                &["kind"],
            ),
            publish_errors: counter(
                r,
                "towerstream_replication_publish_errors_total",
                "Generations that could not be published (the next one goes out in full)",
            ),
            publish_seconds: histogram(
                r,
                "towerstream_replication_publish_duration_seconds",
                "Encoding and publishing one generation",
                prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
            ),
            received: counter_vec(
                r,
                "towerstream_replication_received_total",
                "Generations a serving replica received, by kind",
                &["kind"],
            ),
            rejected: counter_vec(
                r,
                "towerstream_replication_rejected_total",
                "Generation messages a replica could not use, by reason",
                &["reason"],
            ),
            delay_seconds: histogram(
                r,
                "towerstream_replication_delay_seconds",
                "From the trainer publishing a generation to a replica serving it",
                prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets"),
            ),
            apply_seconds: histogram(
                r,
                "towerstream_replication_apply_duration_seconds",
                "A replica's work on one generation message: decoding, applying and serving it",
                prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
            ),
            consumer_errors: counter_vec(
                r,
                "towerstream_replica_consumer_errors_total",
                "Kafka consumer errors a replica's context follower logged and went on after, by source",
                &["source"],
            ),
        };
        for source in ["events", "tables"] {
            m.consumer_errors.with_label_values(&[source]);
        }
        for kind in ["full", "delta"] {
            m.published.with_label_values(&[kind]);
            m.published_bytes.with_label_values(&[kind]);
            m.received.with_label_values(&[kind]);
        }
        for reason in ["gap", "incompatible", "corrupt"] {
            m.rejected.with_label_values(&[reason]);
        }
        m
    }
}

/// Metrics of index generations and serving.
#[derive(Clone)]
pub struct ServeMetrics {
    /// Number of the generation being served.
    pub generation: IntGauge,
    /// Model step of the generation being served.
    pub generation_model_step: IntGauge,
    /// Unix time (seconds) the served generation was published.
    pub generation_published: Gauge,
    /// Generations published.
    pub generations: IntCounter,
    /// Time to embed the catalogue and build the index.
    pub build_seconds: Histogram,
    /// Time to publish (swap) a built generation.
    pub swap_seconds: Histogram,
    /// Time the trainer thread spends handing a model update to the refresher.
    pub handoff_seconds: Histogram,
    /// Vectors in the served index.
    pub index_vectors: IntGauge,
    /// Vectors searched exactly on top of the main index (delta generations).
    pub index_delta_vectors: IntGauge,
    /// Distinct item-tower inputs among the served main items: what the embedding pass ran.
    pub index_distinct_inputs: IntGauge,
    /// Generations published as a delta on an earlier main index.
    pub delta_generations: IntCounter,
    /// Generations not published because their model held a NaN or an infinity.
    pub generations_refused: IntCounter,
    /// Memory of the served index.
    pub index_bytes: IntGauge,
    /// Recall@100 of the served graph against exact search of the same model version, as
    /// last probed (`index.large_catalog = relink`).
    pub index_recall: Gauge,
    /// Candidates per result the served graph's searches ask for (deeper than
    /// `index.expansion_per_k` while the shared links are stale).
    pub index_search_depth: Gauge,
    /// Times the shared links were rebuilt (`index.large_catalog = relink`), by cause.
    pub relinks: IntCounterVec,
    /// Recall request latency.
    pub request_seconds: Histogram,
    /// Compute of a recall by stage (`user_tower`, `search`), on its slot of the blocking
    /// pool: what a request costs apart from waiting.
    pub recall_stage_seconds: HistogramVec,
    /// Requests by HTTP status.
    pub requests: IntCounterVec,
    /// Event time of a sampled click → swap of the first generation trained on it.
    pub freshness_seconds: Histogram,
    /// Rolling prequential Recall@K (served top-K checked before training on a click).
    pub prequential_recall: Gauge,
    /// Clicks checked prequentially.
    pub prequential_clicks: IntCounter,
    /// ... of which the item was in the served top-K.
    pub prequential_hits: IntCounter,
}

impl ServeMetrics {
    fn register(r: &Registry) -> Self {
        let published = float_gauge(
            r,
            "towerstream_generation_published_timestamp_seconds",
            "Unix time the served generation was published (age = time() - this)",
        );
        ServeMetrics {
            generation: gauge(r, "towerstream_generation", "Number of the generation being served"),
            generation_model_step: gauge(
                r,
                "towerstream_generation_model_step",
                "Training step of the model in the served generation",
            ),
            generation_published: published,
            generations: counter(r, "towerstream_generations_total", "Generations published"),
            build_seconds: histogram(
                r,
                "towerstream_generation_build_duration_seconds",
                "Embedding the catalogue and building the index",
                prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets"),
            ),
            swap_seconds: histogram(
                r,
                "towerstream_generation_swap_duration_seconds",
                "Publishing a built generation",
                prometheus::exponential_buckets(1e-6, 4.0, 10).expect("valid buckets"),
            ),
            handoff_seconds: histogram(
                r,
                "towerstream_model_handoff_duration_seconds",
                "Trainer-thread time to hand a model update (changed rows) to the refresher",
                prometheus::exponential_buckets(0.0001, 2.0, 14).expect("valid buckets"),
            ),
            index_vectors: gauge(r, "towerstream_index_vectors", "Vectors in the served index"),
            index_delta_vectors: gauge(
                r,
                "towerstream_index_delta_vectors",
                "Vectors searched exactly on top of the main HNSW index (changed or new items)",
            ),
            index_distinct_inputs: gauge(
                r,
                "towerstream_index_distinct_inputs",
                "Distinct item-tower inputs among the served main items (the rows the last embedding pass ran; items without an id row of their own share one per feature combination)",
            ),
            delta_generations: counter(
                r,
                "towerstream_delta_generations_total",
                "Generations published as changes on top of an earlier main index",
            ),
            generations_refused: counter(
                r,
                "towerstream_generations_refused_total",
                "Generations neither served nor shipped because their model held NaN or infinite values",
            ),
            index_bytes: gauge(r, "towerstream_index_memory_bytes", "Memory of the served index"),
            index_recall: float_gauge(r, "towerstream_index_recall", "Recall@100 of the served index against exact search of the same model version: probed for walked links, 1 for a scan"),
            index_search_depth: float_gauge(r, "towerstream_index_search_depth_per_k", "Candidates per result the served graph's searches ask for (deeper while shared links are stale)"),
            relinks: counter_vec(
                r,
                "towerstream_index_relinks_total",
                "Rebuilds of the HNSW links shared by model versions, by cause (first, recall, changes, spread)",
                &["cause"],
            ),
            request_seconds: histogram(
                r,
                "towerstream_recall_request_duration_seconds",
                "Recall request latency",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
            ),
            recall_stage_seconds: histogram_vec(
                r,
                "towerstream_recall_stage_seconds",
                "Compute of a recall by stage (user_tower, search)",
                &["stage"],
                prometheus::exponential_buckets(0.00001, 2.0, 16).expect("valid buckets"),
            ),
            requests: counter_vec(
                r,
                "towerstream_recall_requests_total",
                "Recall requests by HTTP status",
                &["status"],
            ),
            freshness_seconds: histogram(
                r,
                "towerstream_freshness_seconds",
                "From a sampled click's event time to the swap of the first generation trained on it",
                vec![0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0],
            ),
            prequential_recall: float_gauge(r, "towerstream_prequential_recall", "Rolling share of sampled clicks whose item was in the served top-K before training on them"),
            prequential_clicks: counter(
                r,
                "towerstream_prequential_clicks_total",
                "Clicks checked against the served top-K before training",
            ),
            prequential_hits: counter(
                r,
                "towerstream_prequential_hits_total",
                "Checked clicks whose item was in the served top-K",
            ),
        }
    }
}

/// Metrics of the online trainer.
#[derive(Clone)]
pub struct TrainMetrics {
    /// Optimizer steps.
    pub steps: IntCounter,
    /// Examples consumed by steps, by label.
    pub examples: IntCounterVec,
    /// Loss of the last step.
    pub loss: Gauge,
    /// Step wall time (encode, forward, backward, update).
    pub step_seconds: Histogram,
    /// Training throughput over the last reporting window.
    pub examples_per_second: Gauge,
    /// Embedding rows in use, by feature.
    pub vocab_rows: IntGaugeVec,
    /// Ids admitted into a vocabulary, by feature.
    pub vocab_admissions: IntGaugeVec,
    /// Rows reused after eviction, by feature.
    pub vocab_evictions: IntGaugeVec,
    /// Global step of the model.
    pub global_step: IntGauge,
    /// Checkpoints written.
    pub checkpoints: IntCounter,
    /// Checkpoint write time.
    pub checkpoint_seconds: Histogram,
    /// Steps thrown away because their loss or gradients were not finite.
    pub nonfinite_steps: IntCounter,
    /// Checkpoints refused because the model held a non-finite value.
    pub checkpoints_refused: IntCounter,
    /// Global step of the last checkpoint.
    pub checkpoint_step: IntGauge,
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl TrainMetrics {
    fn register(r: &Registry) -> Self {
        let loss = float_gauge(
            r,
            "towerstream_train_loss",
            "Loss of the last training step",
        );
        let eps = float_gauge(
            r,
            "towerstream_train_examples_per_second",
            "Training throughput over the last reporting window",
        );
        TrainMetrics {
            steps: counter(r, "towerstream_train_steps_total", "Optimizer steps"),
            examples: counter_vec(
                r,
                "towerstream_train_examples_total",
                "Examples consumed by training steps, by label",
                &["label"],
            ),
            loss,
            step_seconds: histogram(
                r,
                "towerstream_train_step_duration_seconds",
                "Training step wall time",
                prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
            ),
            examples_per_second: eps,
            vocab_rows: gauge_vec(
                r,
                "towerstream_vocab_rows",
                "Embedding rows in use",
                &["feature"],
            ),
            vocab_admissions: gauge_vec(
                r,
                "towerstream_vocab_admissions",
                "Ids admitted into the vocabulary so far",
                &["feature"],
            ),
            vocab_evictions: gauge_vec(
                r,
                "towerstream_vocab_evictions",
                "Rows reused after evicting an expired id so far",
                &["feature"],
            ),
            global_step: gauge(
                r,
                "towerstream_train_global_step",
                "Global step of the model",
            ),
            checkpoints: counter(r, "towerstream_checkpoints_total", "Checkpoints written"),
            checkpoint_seconds: histogram(
                r,
                "towerstream_checkpoint_duration_seconds",
                "Checkpoint write time",
                prometheus::exponential_buckets(0.01, 2.0, 12).expect("valid buckets"),
            ),
            checkpoint_step: gauge(
                r,
                "towerstream_checkpoint_step",
                "Global step of the last checkpoint",
            ),
            nonfinite_steps: counter(
                r,
                "towerstream_train_nonfinite_steps_total",
                "Training steps skipped because their loss or gradients were NaN or infinite (weights unchanged)",
            ),
            checkpoints_refused: counter(
                r,
                "towerstream_checkpoints_refused_total",
                "Checkpoints not written because the model held a NaN or infinite value",
            ),
        }
    }
}

/// Metrics of the ingestion stage.
#[derive(Clone)]
pub struct IngestMetrics {
    /// Events consumed, by topic and type (`malformed` when unparseable).
    pub events_consumed: IntCounterVec,
    /// Rejected events, by reason.
    pub events_invalid: IntCounterVec,
    /// Events written to the dead-letter topic.
    pub dead_lettered: IntCounter,
    /// Failed dead-letter writes (retried until they succeed).
    pub dead_letter_errors: IntCounter,
    /// Schema fetches that found the registry unavailable (retried; the record waits).
    pub schema_registry_errors: IntCounter,
    /// Consumer lag from librdkafka statistics, by topic and partition.
    pub consumer_lag: IntGaugeVec,
    /// Click join outcomes: `hit`, `miss`, and impressions `expired` unclicked.
    pub join: IntCounterVec,
    /// Events dropped because their event id was seen inside the window.
    pub duplicates: IntCounter,
    /// Impressions currently held in the join window.
    pub join_window_impressions: IntGauge,
    /// Paused partitions sought back because the stash was full.
    pub stash_rewinds: IntCounter,
    /// Revoked partitions whose resume point could travel neither in the commit metadata nor
    /// through the handover topic.
    pub handover_overflows: IntCounter,
    /// Resume points written to the handover topic (too large for commit metadata).
    pub handover_records: IntCounter,
    /// Consumer errors of the ingest loop, by source (`events`, `tables`).
    pub consumer_errors: IntCounterVec,
    /// Examples dropped untrained because their partition was revoked before their step (the
    /// partition's next owner re-reads them from the commit made at revocation).
    pub revoked_examples: IntCounter,
    /// Training examples handed to the trainer, by label.
    pub examples: IntCounterVec,
    /// Examples waiting in the bounded channel.
    pub channel_depth: IntGauge,
    /// 1 while consumption is paused because the channel is full.
    pub paused: IntGauge,
    /// How often consumption paused for backpressure.
    pub pauses: IntCounter,
    /// Offset commits to the consumer group.
    pub commits: IntCounter,
    /// Partition assignments and revocations.
    pub rebalances: IntCounterVec,
    /// Active catalogue items.
    pub catalog_items: IntGauge,
    /// Known user profiles.
    pub catalog_users: IntGauge,
    /// Table changes ignored as older than the stored version, by table.
    pub catalog_stale: IntCounterVec,
    /// Dead letters being written or waiting for a writer.
    pub dead_letters_pending: IntGauge,
    /// Dead letters a dry run logged instead of writing.
    pub dead_letter_dry_run: IntCounter,
    /// Messages deleted by retention before a checkpoint's resume point was read, by topic.
    pub retention_gap: IntCounterVec,
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let m = Gauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl IngestMetrics {
    fn register(r: &Registry) -> Self {
        let m = IngestMetrics {
            events_consumed: counter_vec(
                r,
                "towerstream_events_consumed_total",
                "Events consumed from Kafka, by topic and event type",
                &["topic", "type"],
            ),
            events_invalid: counter_vec(
                r,
                "towerstream_events_invalid_total",
                "Events rejected by validation, by reason",
                &["reason"],
            ),
            dead_lettered: counter(
                r,
                "towerstream_dead_letter_total",
                "Events written to the dead-letter topic",
            ),
            dead_letter_errors: counter(
                r,
                "towerstream_dead_letter_errors_total",
                "Failed dead-letter writes (retried)",
            ),
            schema_registry_errors: counter(
                r,
                "towerstream_schema_registry_errors_total",
                "Schema fetches that found the registry unavailable (retried while the record waits)",
            ),
            consumer_lag: gauge_vec(
                r,
                "towerstream_consumer_lag_messages",
                "Consumer lag per partition, from librdkafka statistics",
                &["topic", "partition"],
            ),
            join: counter_vec(
                r,
                "towerstream_join_total",
                "Click/impression join outcomes: hit, miss, expired (impression left the window unclicked)",
                &["outcome"],
            ),
            duplicates: counter(
                r,
                "towerstream_duplicate_events_total",
                "Events dropped as duplicates of an event id seen inside the window",
            ),
            stash_rewinds: counter(
                r,
                "towerstream_ingest_stash_rewinds_total",
                "Paused partitions sought back to a message because the stash of messages received while paused was full",
            ),
            handover_overflows: counter(
                r,
                "towerstream_handover_overflows_total",
                "Revoked partitions whose resume point could travel neither in the commit metadata nor through the handover topic (the next owner may train the difference again)",
            ),
            handover_records: counter(
                r,
                "towerstream_handover_records_total",
                "Resume points of revoked partitions written to the handover topic because they were too large for commit metadata",
            ),
            consumer_errors: {
                let m = counter_vec(
                    r,
                    "towerstream_ingest_consumer_errors_total",
                    "Consumer errors of the trainer's ingest loop, by source (events, tables); a fatal one stops ingestion",
                    &["source"],
                );
                for s in ["events", "tables"] {
                    m.with_label_values(&[s]);
                }
                m
            },
            revoked_examples: counter(
                r,
                "towerstream_revoked_examples_total",
                "Examples dropped untrained because their partition was revoked first (its next owner re-reads them)",
            ),
            join_window_impressions: gauge(
                r,
                "towerstream_join_window_impressions",
                "Impressions held in the join window",
            ),
            examples: counter_vec(
                r,
                "towerstream_examples_emitted_total",
                "Training examples handed to the trainer, by label",
                &["label"],
            ),
            channel_depth: gauge(
                r,
                "towerstream_channel_depth",
                "Examples waiting in the bounded ingest-to-trainer channel",
            ),
            paused: gauge(
                r,
                "towerstream_ingest_paused",
                "1 while consumption is paused because the trainer lags",
            ),
            pauses: counter(
                r,
                "towerstream_ingest_pauses_total",
                "Times consumption paused for backpressure",
            ),
            commits: counter(
                r,
                "towerstream_offset_commits_total",
                "Offset commits to the consumer group",
            ),
            rebalances: counter_vec(
                r,
                "towerstream_rebalances_total",
                "Partition assignment changes, by kind (assign, revoke)",
                &["kind"],
            ),
            catalog_items: gauge(r, "towerstream_catalog_items", "Active catalogue items"),
            catalog_users: gauge(r, "towerstream_catalog_users", "Known user profiles"),
            catalog_stale: counter_vec(
                r,
                "towerstream_catalog_stale_updates_total",
                "Item/user changes ignored because a newer version (or deletion) is stored, by table",
                &["table"],
            ),
            dead_letters_pending: gauge(
                r,
                "towerstream_dead_letters_pending",
                "Dead letters being written or waiting for a writer (consumption pauses at ingest.max_pending_dead_letters)",
            ),
            dead_letter_dry_run: counter(
                r,
                "towerstream_dead_letter_dry_run_total",
                "Dead letters a dry run (towerstream ingest) logged instead of writing",
            ),
            retention_gap: counter_vec(
                r,
                "towerstream_retention_gap_messages_total",
                "Messages deleted by retention before the model read them (checkpoint resume point below the log start), by topic",
                &["topic"],
            ),
        };
        for table in ["items", "users"] {
            m.catalog_stale.with_label_values(&[table]);
        }
        for reason in InvalidReason::ALL {
            m.events_invalid.with_label_values(&[reason.as_str()]);
        }
        for outcome in ["hit", "miss", "expired"] {
            m.join.with_label_values(&[outcome]);
        }
        m
    }
}

impl Metrics {
    /// Creates a fresh registry with every towerstream metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new("towerstream_build_info", "Build information"),
            &["version"],
        )
        .expect("valid metric definition");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry
            .register(Box::new(info))
            .expect("metric registered once");
        let ingest = IngestMetrics::register(&registry);
        let train = TrainMetrics::register(&registry);
        let serve = ServeMetrics::register(&registry);
        let replication = ReplicationMetrics::register(&registry);
        let worker_up = gauge_vec(
            &registry,
            "towerstream_worker_up",
            "1 while the worker runs, 0 once it stopped (error, panic, unrequested return or shutdown)",
            &["worker"],
        );
        Metrics {
            registry,
            ingest,
            train,
            serve,
            replication,
            worker_up,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
