//! A serving replica (`towerstream serve`): the recall API without training, fed by Kafka only.
//!
//! ```text
//!  item/user topics ──▶ TableReader ──▶ Catalog ─────────────────┐
//!  event topics ──▶ parse ──▶ Joiner ──▶ clicks ──▶ Histories ──────┼──▶ recall API
//!  generations topic ──▶ Follower (own tower copy, own index) ──▶ Served ┘
//! ```
//!
//! A replica reads every partition of every topic (assigned, nothing committed), so any replica
//! answers for any user and replicas scale out behind a plain load balancer. Click histories
//! are rebuilt from the event topics' retention, through the same join (deduplication
//! included) the trainer uses, so a replica's answer equals the trainer's for the same
//! generation. Generations are followed only once the histories have caught up with the event
//! topics' end offsets at start, so `/readyz` turns ready when the catalogue and the histories
//! are current and a generation is served.
//!
//! Consumer errors (a broker down, a topic deleted) are logged, counted and waited out —
//! librdkafka recovers from them by itself — so the catalogue and the histories resume after
//! a broker restart; only a fatal error stops the context follower. Both followers and the
//! API register in the replica's [`Health`], so `/healthz` fails and `towerstream serve`
//! exits once one of them stopped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::example::{Label, Origin};
use crate::features::history::{Histories, SharedHistories};
use crate::generations::Follower;
use crate::health::{self, Health};
use crate::ingest::pipeline::{wall_clock_ms, EventPipeline};
use crate::ingest::tables::{self, BootstrapError, TableReader, TableRecord};
use crate::join::{JoinOutput, Joiner};
use crate::kafka;
use crate::mapping::Decoder;
use crate::metrics::{IngestMetrics, Metrics, ReplicationMetrics};
use crate::refresh::Served;
use crate::serve::api;
use crate::serve::{Context, ServeState};

/// Failures that keep a replica from starting.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Kafka clients could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The tables could not be read up to date.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// The API could not bind.
    #[error(transparent)]
    Listen(#[from] api::ListenError),
    /// The configuration cannot work (e.g. its `[mapping]`).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The follower thread could not be started.
    #[error("cannot start the generations follower: {0}")]
    Thread(std::io::Error),
}

/// A running replica.
pub struct Replica {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The served generation.
    pub served: Arc<Served>,
    /// Catalogue and profiles.
    pub catalog: SharedCatalog,
    /// Users' recent clicks.
    pub histories: SharedHistories,
    /// Metrics.
    pub metrics: Metrics,
    /// Its workers: the context follower, the generations follower, the API.
    pub health: Health,
    stop: CancellationToken,
    api_stop: CancellationToken,
    context: JoinHandle<Result<(), KafkaError>>,
    follower: JoinHandle<()>,
    api: JoinHandle<std::io::Result<()>>,
}

/// Bootstraps the catalogue, then follows the tables, the event topics and the generations
/// topic, and serves the API.
pub async fn start(config: &Config, metrics: &Metrics) -> Result<Replica, ReplicaError> {
    let catalog: SharedCatalog = Arc::default();
    catalog
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .set_deletion_memory(config.ingest.max_remembered_deletions);
    let histories = Histories::shared(
        config.features.history_len,
        config.features.max_users_with_history,
    );
    let served = Arc::new(Served::default());
    let stop = CancellationToken::new();
    let health = Health::new(metrics);

    let mut tables = TableReader::new(&config.kafka)?;
    let decoder = config.decoder()?;
    let apply = |msg: &rdkafka::message::BorrowedMessage<'_>| {
        apply_table_message(config, &decoder, &catalog, msg, &metrics.ingest)
    };
    let stall = Duration::from_secs(config.kafka.bootstrap_timeout_secs);
    let wait = tables::SchemaWait {
        decoder: &decoder,
        errors: &metrics.ingest.schema_registry_errors,
        item_topic: &config.kafka.item_topic,
    };
    tables.bootstrap(stall, None, wait, apply).await?;
    let events = events_consumer(config)?;
    let caught_up = events.caught_up.clone();
    // The trainer's own event transform (decode, time rules, join, dedup), without negatives:
    // a replica's histories see exactly the clicks the trainer's do.
    let pipeline = EventPipeline::new(
        Joiner::new(config.join.clone(), false),
        catalog.clone(),
        decoder.clone(),
        metrics.ingest.clone(),
    );
    let context = tokio::spawn(health.register(health::CONTEXT).watch(follow_context(
        config.clone(),
        tables,
        events,
        pipeline,
        histories.clone(),
        metrics.clone(),
        stop.clone(),
    )));

    // The topic may not exist yet when replicas start before the trainer.
    kafka::ensure_topics(
        &config.kafka,
        &[kafka::generations_topic_spec(&config.replication)],
    )
    .await?;
    let follower = Follower::new(
        config,
        catalog.clone(),
        served.clone(),
        Some(metrics.clone()),
    );
    let (fstop, nice) = (stop.clone(), config.index.nice);
    let (worker, rt) = (
        health.register(health::GENERATIONS),
        tokio::runtime::Handle::current(),
    );
    let done = crate::priority::spawn("towerstream-follow", nice, move || {
        worker.run(|| {
            let caught_up = rt.block_on(async {
                tokio::select! {
                    _ = caught_up.cancelled() => true,
                    _ = fstop.cancelled() => false,
                }
            });
            if !caught_up {
                return Ok(());
            }
            tracing::info!("click histories caught up");
            follower.run(fstop)
        })
    })
    .map_err(ReplicaError::Thread)?;
    let follower = tokio::spawn(async move {
        let _ = done.await; // its end is in `health`
    });

    let state = ServeState {
        served: served.clone(),
        ctx: Context {
            catalog: catalog.clone(),
            histories: histories.clone(),
            default_k: config.serve.default_k,
        },
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let api = api::start(state, &config.serve).await?;
    let addr = api.addr;
    tracing::info!(%addr, "replica API listening");
    Ok(Replica {
        addr,
        served,
        catalog,
        histories,
        metrics: metrics.clone(),
        health,
        stop,
        api_stop: api.stop,
        context,
        follower,
        api: api.task,
    })
}

impl Replica {
    /// Stops the API, then the followers.
    pub async fn shutdown(self) -> Result<(), KafkaError> {
        self.health.shutting_down();
        self.api_stop.cancel();
        let _ = self.api.await;
        self.stop.cancel();
        let _ = self.follower.await;
        self.context
            .await
            .unwrap_or_else(|e| Err(KafkaError::Subscription(e.to_string())))
    }
}

fn apply_table_message(
    config: &Config,
    decoder: &Decoder,
    catalog: &SharedCatalog,
    msg: &impl Message,
    m: &IngestMetrics,
) {
    let record = TableRecord::of(msg);
    // Malformed table records are the trainer's to dead-letter; a replica skips them.
    let max_future = config.join.max_future_ms;
    if let Ok(change) = tables::decode_checked(&config.kafka, record, decoder, max_future) {
        tables::apply(catalog, &change, m);
    }
}

/// A consumer assigned to every partition of the event topics from the beginning of their
/// retention (no group membership, no commits: every replica sees every click).
fn events_consumer(config: &Config) -> Result<Events, KafkaError> {
    let k = &config.kafka;
    let consumer: StreamConsumer = kafka::client_config(k)
        .set(
            "group.id",
            format!("{}.events", config.replication.replica_group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for topic in &k.event_topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
                let (low, high) =
                    consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))?;
                if high > low {
                    ends.insert((t.name().to_owned(), p.id()), high);
                }
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(Events {
        consumer,
        ends,
        caught_up: CancellationToken::new(),
    })
}

/// The event topics as a replica reads them.
struct Events {
    consumer: StreamConsumer,
    /// End offset at start of each non-empty partition not yet read up to it.
    ends: HashMap<(String, i32), i64>,
    /// Cancelled once every partition was read up to its end offset at start.
    caught_up: CancellationToken,
}

/// Logs and counts a consumer error of `source` (`events`, `tables`); the error back only when
/// it is fatal, so the follower stops on that alone.
fn consumer_error(
    metrics: &ReplicationMetrics,
    source: &str,
    e: KafkaError,
) -> Result<(), KafkaError> {
    metrics.consumer_errors.with_label_values(&[source]).inc();
    if kafka::consumer_error_is_fatal(&e) {
        tracing::error!(source, error = %e, "fatal consumer error; the replica stops following");
        return Err(e);
    }
    tracing::warn!(source, error = %e, "consumer error; librdkafka retries");
    Ok(())
}

/// Index of a configured event topic.
fn topic_index(config: &Config, topic: &str) -> Option<u16> {
    let i = config.kafka.event_topics.iter().position(|t| t == topic)?;
    u16::try_from(i).ok()
}

/// Keeps the catalogue and the click histories current until `stop` (or a fatal consumer
/// error).
async fn follow_context(
    config: Config,
    tables: TableReader,
    mut events: Events,
    mut pipeline: EventPipeline,
    histories: SharedHistories,
    metrics: Metrics,
    stop: CancellationToken,
) -> Result<(), KafkaError> {
    let mut out = JoinOutput::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if events.ends.is_empty() && !events.caught_up.is_cancelled() {
            events.caught_up.cancel();
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                // Only lets idle partitions' dedup ids go; no negatives are emitted here.
                out.clear();
                pipeline.tick(wall_clock_ms(), &mut out);
            }
            msg = tables.recv() => match msg {
                Ok(msg) => {
                    let wait = tables::SchemaWait {
                        decoder: pipeline.decoder(),
                        errors: &metrics.ingest.schema_registry_errors,
                        item_topic: &config.kafka.item_topic,
                    };
                    wait.wait(&msg).await;
                    apply_table_message(
                        &config,
                        pipeline.decoder(),
                        pipeline.catalog(),
                        &msg,
                        &metrics.ingest,
                    );
                }
                Err(e) => consumer_error(&metrics.replication, "tables", e)?,
            },
            msg = events.consumer.recv() => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        consumer_error(&metrics.replication, "events", e)?;
                        continue;
                    }
                };
                if !events.ends.is_empty() {
                    let key = (msg.topic().to_owned(), msg.partition());
                    if events.ends.get(&key).is_some_and(|end| msg.offset() + 1 >= *end) {
                        events.ends.remove(&key);
                    }
                }
                let Some(topic) = topic_index(&config, msg.topic()) else {
                    continue;
                };
                let origin = Origin {
                    topic,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    epoch: 0,
                };
                out.clear();
                if !pipeline.await_schema(topic, msg.payload(), &stop).await {
                    return Ok(());
                }
                // Rejected events are the trainer's to dead-letter; a replica skips them.
                pipeline.handle(origin, msg.payload(), wall_clock_ms(), &mut out);
                let mut clicks = out
                    .examples
                    .iter()
                    .filter(|e| matches!(e.label, Label::Click { .. }))
                    .peekable();
                if clicks.peek().is_some() {
                    let mut h = histories.write().unwrap_or_else(|p| p.into_inner());
                    for e in clicks {
                        h.push(&e.user_id, &e.item_id, e.event_time_ms);
                    }
                }
            }
        }
    }
}
