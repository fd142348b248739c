//! Ingestion: Kafka events in, validated and joined [`TrainingExample`]s out, at least once.
//!
//! ```text
//!  item/user topics ──▶ TableReader ──▶ Catalog (shared)
//!  event topics ──▶ consumer ──▶ EventPipeline ──▶ outbox ──▶ bounded channel ──▶ trainer
//!                     │  ▲          │ bad                                        │
//!                     │  └ pause ◀──┼── channel full                             │ ack(origins)
//!                     │             ▼                                            ▼
//!                     │       DeadLetterSink ─────────── ack ────────────▶ OffsetTracker
//!                     └──────── store + commit applied offsets ◀────────────────┘
//! ```
//!
//! The loop owns the [`pipeline::EventPipeline`] (parse, time rules, join — the same one a
//! replica runs) and the consumer. When the trainer lags, the channel is full or the dead-letter
//! sink is at its bound, the assigned partitions are paused (the consumer keeps polling, so it
//! stays in the group) and resumed once the outbox drains: memory stays bounded by the channel,
//! the outbox of one message's examples, the stash (sought back beyond the channel's capacity),
//! the dead letters in flight, and the joiner's window. Rebalances reach the loop through
//! [`context::IngestContext::take_rebalance`] before the next message.

pub mod context;
pub mod dead_letter;
pub mod handover;
pub mod offsets;
pub mod pipeline;
pub mod retention;
pub mod sample;
pub mod tables;
pub mod thread;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::SharedCatalog;
use crate::config::{Config, KafkaConfig};
use crate::event::EventError;
use crate::example::{Origin, TrainingExample};
use crate::health::{self, Health};
use crate::join::{Disposition, JoinOutput, Joiner};
use crate::kafka::{client_config, producer};
use crate::mapping::Decoder;
use crate::metrics::{IngestMetrics, Metrics};
use context::IngestContext;
use dead_letter::DeadLetterSink;
use offsets::{OffsetTracker, PartitionKey, ResumeMap, ResumePoint};
use pipeline::{wall_clock_ms, EventPipeline, Outcome};
use tables::{BootstrapError, TableChange, TableReader, TableRecord};

/// Ingestion failures that stop the stage (bad events never do).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Creating or using a Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The catalogue/profile topics could not be read up to date.
    #[error(transparent)]
    Bootstrap(BootstrapError),
    /// Retention deleted messages past a checkpoint's resume point and
    /// `kafka.on_retention_gap` is `fail`.
    #[error("{0}")]
    RetentionGap(String),
    /// The configuration cannot work (e.g. its `[mapping]`).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The loop's own thread could not be started.
    #[error("starting the ingest thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Options beyond the configuration file.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Checkpointed resume points; partitions found here start from them.
    pub resume: ResumeMap,
    /// Overrides `kafka.bootstrap_timeout_secs` (the longest the table bootstrap may go
    /// without progress).
    pub bootstrap_timeout: Option<Duration>,
    /// Start partitions without a resume point from the beginning of the topic instead of
    /// the group's committed offset (a model without a checkpoint has seen nothing, whatever
    /// an earlier run committed).
    pub from_beginning: bool,
    /// The catalogue to fill (a new one when absent), so other stages can hold it first.
    pub catalog: Option<SharedCatalog>,
    /// Where the loop registers as [`crate::health::INGEST`], so its end is seen (by default
    /// a registry of its own, which nobody reads).
    pub health: Health,
    /// A dry run (`towerstream ingest`): consume in the group `<kafka.group_id>.dry-run`,
    /// commit nothing and write no dead letters (they are logged and counted instead).
    pub dry_run: bool,
    /// Periodic commits publish the newest checkpoint's offsets ([`Acker::checkpointed`])
    /// instead of what was applied, so the group's commit never holds a click that only steps
    /// after the checkpoint trained (a crash loses those steps). Revocations still commit
    /// what was applied, with its resume point, for the next owner.
    pub commit_at_checkpoints: bool,
}

/// The points of `resume` (keyed by topic name) keyed by the index of their topic in `topics`;
/// points of other topics are left out.
fn keyed<'r>(
    topics: &'r [String],
    resume: &'r ResumeMap,
) -> impl Iterator<Item = (PartitionKey, &'r ResumePoint)> + 'r {
    resume.iter().filter_map(|((name, p), r)| {
        let t = topics.iter().position(|x| x == name)?;
        Some(((u16::try_from(t).ok()?, *p), r))
    })
}

/// The consumer group of a dry run: apart from the production group, whose offsets it must
/// not move.
pub fn dry_run_group(k: &KafkaConfig) -> String {
    format!("{}.dry-run", k.group_id)
}

/// Acknowledges applied examples and reports committable positions. Cheap to clone.
#[derive(Clone)]
pub struct Acker {
    tracker: Arc<OffsetTracker>,
    topics: Arc<Vec<String>>,
    revoked: prometheus::IntCounter,
}

impl Acker {
    /// Marks the examples with these origins as applied to the model.
    pub fn ack(&self, origins: &[Origin]) -> offsets::AckOutcome {
        self.tracker.ack(origins)
    }

    /// Starts a step: drops the examples whose partition was revoked since they were consumed
    /// (counted; their next owner re-reads them) and returns a guard to hold until the rest are
    /// acknowledged, so no revocation commits in between.
    pub fn begin_step(&self, batch: &mut Vec<TrainingExample>) -> std::sync::MutexGuard<'_, ()> {
        let guard = self.tracker.begin_step();
        let before = batch.len();
        batch.retain(|e| self.tracker.is_current(&e.origin));
        let dropped = before - batch.len();
        if dropped > 0 {
            self.revoked.inc_by(dropped as u64);
            tracing::info!(
                dropped,
                "examples of revoked partitions dropped before their step"
            );
        }
        guard
    }

    /// A checkpoint holding `resume` was written: with [`IngestOptions::commit_at_checkpoints`]
    /// its offsets are what the ingest loop commits from now on.
    pub fn checkpointed(&self, resume: &ResumeMap) {
        self.tracker
            .checkpointed(keyed(&self.topics, resume).map(|(key, r)| (key, r.offset)));
    }

    /// Per partition (topic name, partition) the first offset not yet applied.
    pub fn applied_offsets(&self) -> Vec<(String, i32, i64)> {
        self.tracker
            .applied_offsets()
            .into_iter()
            .filter_map(|((t, p), o)| self.topics.get(usize::from(t)).map(|n| (n.clone(), p, o)))
            .collect()
    }

    /// Exact resume points to store in a checkpoint.
    pub fn resume_points(&self) -> ResumeMap {
        self.tracker.resume_points(&self.topics)
    }

    /// References still outstanding (examples in flight plus held impressions).
    pub fn outstanding(&self) -> u64 {
        self.tracker.outstanding()
    }
}

/// What a running ingestion stage gives its consumer.
pub struct IngestHandle {
    /// The bounded stream of examples.
    pub examples: mpsc::Receiver<TrainingExample>,
    /// Acknowledgements back to Kafka.
    pub acker: Acker,
    /// Catalogue and profiles (read-only for everyone but the ingest loop).
    pub catalog: SharedCatalog,
    /// The loop; resolves after shutdown with the final commit done.
    pub task: tokio::task::JoinHandle<Result<(), IngestError>>,
}

/// Starts ingestion: reads the tables up to date, subscribes to the event topics and runs the
/// loop until `shutdown` is cancelled (or the receiver is dropped).
pub async fn spawn(
    config: &Config,
    metrics: &Metrics,
    options: IngestOptions,
    shutdown: CancellationToken,
) -> Result<IngestHandle, IngestError> {
    let k = &config.kafka;
    let topics = Arc::new(k.event_topics.clone());
    let m = metrics.ingest.clone();

    let resume: HashMap<PartitionKey, ResumePoint> = keyed(&topics, &options.resume)
        .map(|(key, r)| (key, r.clone()))
        .collect();
    let tracker = Arc::new(OffsetTracker::with_resume(resume.clone()));
    if options.commit_at_checkpoints {
        tracker.commit_at_checkpoints();
    }

    let catalog: SharedCatalog = options.catalog.clone().unwrap_or_default();
    catalog
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .set_deletion_memory(config.ingest.max_remembered_deletions);
    let dead_letters = if options.dry_run {
        DeadLetterSink::dry_run(&k.dead_letter_topic, tracker.clone(), m.clone())
    } else {
        DeadLetterSink::new(
            producer(k)?,
            &k.dead_letter_topic,
            config.ingest.max_pending_dead_letters,
            tracker.clone(),
            m.clone(),
        )
    };
    let mut tables = TableReader::new(k)?;
    let decoder = config.decoder()?;
    let applier = TableApplier {
        kafka: k,
        catalog: &catalog,
        metrics: &m,
        dead_letters: &dead_letters,
        decoder: &decoder,
        max_future_ms: config.join.max_future_ms,
    };
    let timeout = options
        .bootstrap_timeout
        .unwrap_or(Duration::from_secs(k.bootstrap_timeout_secs));
    applier.bootstrap(&mut tables, timeout).await?;

    retention::check(k, &options.resume, &m)?;
    let context = IngestContext::new(
        topics.to_vec(),
        tracker.clone(),
        m.clone(),
        &resume,
        options.from_beginning,
    )
    .with_commits(!options.dry_run)
    .with_handover_log(handover::HandoverLog::new(k)?);
    let group = if options.dry_run {
        dry_run_group(k)
    } else {
        k.group_id.clone()
    };
    let consumer = event_consumer(k, &group, &topics, context)?;

    let (tx, rx) = mpsc::channel(config.ingest.channel_capacity);
    m.channel_depth.set(0);
    let ingest = IngestLoop {
        consumer,
        tables,
        tx,
        state: LoopState {
            pipeline: EventPipeline::new(
                Joiner::new(config.join.clone(), config.emits_shown_negatives()),
                catalog.clone(),
                decoder,
                m.clone(),
            ),
            catalog: catalog.clone(),
            tracker: tracker.clone(),
            dead_letters,
            resume: resume.into_iter().map(|(k, r)| (k, vec![r])).collect(),
            capacity: config.ingest.channel_capacity,
            outbox: VecDeque::new(),
            stash: VecDeque::new(),
            rewound: HashMap::new(),
            out: JoinOutput::default(),
            max_future_ms: config.join.max_future_ms,
            commit_every: Duration::from_millis(k.commit_interval_ms),
            consumed: ConsumedCounters::new(&m, &topics),
            topics: topics.clone(),
            metrics: m,
            paused: false,
            last_commit: BTreeMap::new(),
            kafka: k.clone(),
            commits: !options.dry_run,
        },
    };
    let worker = options.health.register(health::INGEST);
    // On a thread of its own, so request handling on the process's runtime cannot starve it.
    let task = thread::spawn_on_own_thread(worker.watch(ingest.run(shutdown)))?;
    Ok(IngestHandle {
        examples: rx,
        acker: Acker {
            tracker,
            topics,
            revoked: metrics.ingest.revoked_examples.clone(),
        },
        catalog,
        task,
    })
}

/// Applies table-topic messages to the catalogue (bootstrap and steady state).
struct TableApplier<'a> {
    kafka: &'a KafkaConfig,
    catalog: &'a SharedCatalog,
    metrics: &'a IngestMetrics,
    dead_letters: &'a DeadLetterSink,
    decoder: &'a Decoder,
    max_future_ms: i64,
}

impl TableApplier<'_> {
    /// Reads the table topics up to their end offsets into the catalogue before any event is
    /// consumed (waiting for the schema registry when the item topic needs it).
    async fn bootstrap(
        &self,
        tables: &mut TableReader,
        timeout: Duration,
    ) -> Result<(), IngestError> {
        let schema_wait = tables::SchemaWait {
            decoder: self.decoder,
            errors: &self.metrics.schema_registry_errors,
            item_topic: &self.kafka.item_topic,
        };
        tables
            .bootstrap(timeout, Some(self.dead_letters), schema_wait, |msg| {
                self.apply(msg)
            })
            .await
            .map_err(IngestError::Bootstrap)?;
        tracing::info!(
            items = self.catalog.read().map(|c| c.item_count()).unwrap_or(0),
            "catalogue bootstrapped"
        );
        Ok(())
    }

    fn apply(&self, msg: &impl Message) {
        let record = TableRecord::of(msg);
        let change = tables::decode_checked(self.kafka, record, self.decoder, self.max_future_ms);
        let kind = change.as_ref().map_or("malformed", TableChange::kind);
        self.metrics
            .events_consumed
            .with_label_values(&[msg.topic(), kind])
            .inc();
        match change {
            Ok(change) => {
                tables::apply(self.catalog, &change, self.metrics);
            }
            Err(err) => {
                self.metrics
                    .events_invalid
                    .with_label_values(&[err.reason.as_str()])
                    .inc();
                self.dead_letters.reject(msg, &err, None);
            }
        }
    }
}

/// The group consumer of the event topics: offsets stored and committed by hand (after
/// training, see [`OffsetTracker`]), statistics for the lag gauges.
fn event_consumer(
    k: &KafkaConfig,
    group: &str,
    topics: &[String],
    context: IngestContext,
) -> Result<StreamConsumer<IngestContext>, IngestError> {
    let consumer: StreamConsumer<IngestContext> = client_config(k)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set(
            "statistics.interval.ms",
            k.statistics_interval_ms.to_string(),
        )
        .create_with_context(context)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

/// Pre-resolved `events_consumed` handles: [topic][type], type order as in `KINDS`.
struct ConsumedCounters(Vec<[prometheus::IntCounter; 5]>);

const KINDS: [&str; 5] = ["impression", "click", "item", "user", "malformed"];

impl ConsumedCounters {
    fn new(m: &IngestMetrics, topics: &[String]) -> Self {
        ConsumedCounters(
            topics
                .iter()
                .map(|t| KINDS.map(|k| m.events_consumed.with_label_values(&[t.as_str(), k])))
                .collect(),
        )
    }

    fn inc(&self, topic: u16, kind: &str) {
        let i = KINDS.iter().position(|k| *k == kind).unwrap_or(4);
        if let Some(row) = self.0.get(usize::from(topic)) {
            row[i].inc();
        }
    }
}

/// True when one of the partition's resume points says `o` was applied already.
fn applied(resume: &HashMap<PartitionKey, Vec<ResumePoint>>, o: &Origin) -> bool {
    resume
        .get(&(o.topic, o.partition))
        .is_some_and(|points| points.iter().any(|r| r.already_applied(o.offset)))
}

/// A message received while paused, kept (with the epoch of its receipt) until resumed.
/// librdkafka drops prefetched messages of paused partitions, so this usually holds what a
/// rebalance hands over before the new partitions are paused too; beyond the channel's
/// capacity the partition is sought back instead (`LoopState::stash_or_rewind`).
struct Stashed {
    msg: rdkafka::message::OwnedMessage,
    topic: u16,
    epoch: u32,
}

/// Most messages taken from librdkafka's queue per wake-up before yielding to the other
/// branches (shutdown, commits, table updates).
const BURST: usize = 256;

struct IngestLoop {
    consumer: StreamConsumer<IngestContext>,
    tables: TableReader,
    tx: mpsc::Sender<TrainingExample>,
    state: LoopState,
}

/// Everything the loop mutates; kept apart from the clients whose futures it awaits.
struct LoopState {
    pipeline: EventPipeline,
    catalog: SharedCatalog,
    tracker: Arc<OffsetTracker>,
    dead_letters: DeadLetterSink,
    /// Per partition, points saying which offsets are applied already (any of them).
    resume: HashMap<PartitionKey, Vec<ResumePoint>>,
    capacity: usize,
    outbox: VecDeque<TrainingExample>,
    stash: VecDeque<Stashed>,
    /// Partitions sought back to this offset because the stash was full: copies at or above it
    /// still queued from before the seek are dropped until the offset arrives again.
    rewound: HashMap<PartitionKey, i64>,
    out: JoinOutput,
    max_future_ms: i64,
    commit_every: Duration,
    consumed: ConsumedCounters,
    topics: Arc<Vec<String>>,
    metrics: IngestMetrics,
    paused: bool,
    /// The offsets of the last periodic commit that went through (an unchanged set is not
    /// committed again).
    last_commit: BTreeMap<PartitionKey, i64>,
    kafka: KafkaConfig,
    /// False in a dry run: nothing is committed.
    commits: bool,
}

impl IngestLoop {
    async fn run(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let IngestLoop {
            consumer,
            tables,
            tx,
            mut state,
        } = self;
        let mut fatal: Option<KafkaError> = None;
        let mut commit_tick = tokio::time::interval(state.commit_every);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !state.drain_outbox(&tx) {
                break; // the trainer is gone
            }
            let backlog = !state.outbox.is_empty();
            // A full dead-letter sink pauses consumption too, until the broker takes them.
            let sink_full = state.dead_letters.is_full();
            let full = backlog || sink_full;
            state.set_paused(&consumer, full);
            state.apply_rebalance(consumer.context());
            if !full {
                if let Some(s) = state.stash.pop_front() {
                    if !state
                        .pipeline
                        .await_schema(s.topic, s.msg.payload(), &shutdown)
                        .await
                    {
                        break;
                    }
                    state.process(s.topic, s.epoch, &s.msg);
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = commit_tick.tick() => {
                    state.tick_joiner();
                    state.store_and_commit(&consumer, CommitMode::Async);
                    state.metrics.channel_depth.set((state.capacity - tx.capacity()) as i64);
                }
                _ = state.dead_letters.room(), if sink_full && !backlog => {}
                permit = tx.reserve(), if backlog => match permit {
                    Ok(p) => {
                        if let Some(ex) = state.outbox.pop_front() {
                            p.send(ex);
                        }
                    }
                    Err(_) => break,
                },
                msg = tables.recv(), if !sink_full => match msg {
                    Ok(msg) => {
                        let wait = tables::SchemaWait {
                            decoder: state.pipeline.decoder(),
                            errors: &state.metrics.schema_registry_errors,
                            item_topic: &state.kafka.item_topic,
                        };
                        wait.wait(&msg).await;
                        TableApplier {
                        kafka: &state.kafka,
                        catalog: &state.catalog,
                        metrics: &state.metrics,
                        dead_letters: &state.dead_letters,
                        decoder: state.pipeline.decoder(),
                        max_future_ms: state.max_future_ms,
                    }.apply(&msg)
                    }
                    Err(e) => {
                        state.metrics.consumer_errors.with_label_values(&["tables"]).inc();
                        if crate::kafka::consumer_error_is_fatal(&e) {
                            fatal = Some(e);
                            break;
                        }
                        tracing::warn!(error = %e, "table consumer error");
                    }
                },
                msg = consumer.recv() => match msg {
                    Ok(msg) => {
                        // A rebalance runs inside `recv`: apply it before this message.
                        state.apply_rebalance(consumer.context());
                        let Some(topic) = consumer.context().topic_index(msg.topic()) else {
                            continue;
                        };
                        let Some(epoch) = state.tracker.epoch((topic, msg.partition())) else {
                            continue; // revoked since it was fetched; the next owner reads it
                        };
                        if full {
                            state.stash_or_rewind(&consumer, msg, topic, epoch);
                            continue;
                        }
                        if state.stale_copy(topic, &msg) {
                            continue;
                        }
                        if !state.pipeline.await_schema(topic, msg.payload(), &shutdown).await {
                            break;
                        }
                        state.process(topic, epoch, &msg);
                        drop(msg);
                        // Take what is already queued without another trip through select!.
                        for _ in 0..BURST {
                            if !state.drain_outbox(&tx)
                                || !state.outbox.is_empty()
                                || state.dead_letters.is_full()
                            {
                                break;
                            }
                            let Some(Ok(msg)) = consumer.recv().now_or_never() else {
                                break;
                            };
                            state.apply_rebalance(consumer.context());
                            let key = consumer.context().topic_index(msg.topic()).and_then(|t| {
                                state.tracker.epoch((t, msg.partition())).map(|e| (t, e))
                            });
                            if let Some((topic, epoch)) = key {
                                if !state.stale_copy(topic, &msg)
                                    && state.pipeline.await_schema(topic, msg.payload(), &shutdown).await
                                {
                                    state.process(topic, epoch, &msg);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        state.metrics.consumer_errors.with_label_values(&["events"]).inc();
                        if crate::kafka::consumer_error_is_fatal(&e) {
                            fatal = Some(e);
                            break;
                        }
                        // Transient (broker down, coordinator moving): librdkafka recovers.
                        tracing::warn!(error = %e, "consumer error");
                    }
                },
            }
        }
        // Examples still in the outbox were never handed over: their offsets stay pending.
        state.store_and_commit(&consumer, CommitMode::Sync);
        if let Some(e) = fatal {
            tracing::error!(error = %e, "fatal consumer error: ingestion stops");
            return Err(IngestError::Kafka(e));
        }
        consumer.unsubscribe();
        tracing::info!(
            outstanding = state.tracker.outstanding(),
            "ingest stopped; applied offsets committed"
        );
        Ok(())
    }
}

impl LoopState {
    /// Moves outbox examples into the channel while it has room; false if it is closed.
    fn drain_outbox(&mut self, tx: &mpsc::Sender<TrainingExample>) -> bool {
        while let Some(ex) = self.outbox.pop_front() {
            match tx.try_send(ex) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ex)) => {
                    self.outbox.push_front(ex);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Pauses or resumes the whole assignment. After an assignment change both are applied
    /// again: new partitions must be paused too, and librdkafka keeps an application's pause
    /// on a partition across revocation and re-assignment, so one that was paused when it was
    /// revoked comes back paused even though the loop resumed (an empty assignment) since
    /// (the fault harness's broker-restart stall: nothing consumed after the re-join).
    fn set_paused(&mut self, consumer: &StreamConsumer<IngestContext>, pause: bool) {
        let changed = consumer.context().take_assignment_changed();
        if pause == self.paused && !changed {
            return;
        }
        let assignment = match consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read assignment");
                return;
            }
        };
        let result = if pause {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, "pause/resume failed");
        }
        if pause && !self.paused {
            self.metrics.pauses.inc();
            tracing::debug!("channel full: pausing consumption");
        }
        self.paused = pause;
        self.metrics.paused.set(i64::from(pause));
    }

    fn already_applied(&self, o: &Origin) -> bool {
        applied(&self.resume, o)
    }

    /// Applies what rebalances changed since the last message: the join state, outbox and stash
    /// of revoked partitions are forgotten (nothing of them is emitted or acknowledged; their
    /// next owner re-reads them from the commit made at revocation), and resume points handed
    /// over with newly assigned partitions are used to skip what their last owner applied.
    fn apply_rebalance(&mut self, ctx: &IngestContext) {
        let Some(handover) = ctx.take_rebalance() else {
            return;
        };
        if !handover.revoked.is_empty() {
            self.pipeline.revoke(&handover.revoked);
            self.rewound.retain(|k, _| !handover.revoked.contains(k));
            let tracker = &self.tracker;
            let before = self.outbox.len();
            self.outbox.retain(|e| tracker.is_current(&e.origin));
            self.metrics
                .revoked_examples
                .inc_by((before - self.outbox.len()) as u64);
            self.stash
                .retain(|s| tracker.epoch((s.topic, s.msg.partition())) == Some(s.epoch));
            self.metrics
                .join_window_impressions
                .set(self.pipeline.joiner().waiting() as i64);
        }
        for (key, points) in handover.resume {
            self.resume.insert(key, points);
        }
    }

    /// Keeps a message received while paused — in the stash while it holds fewer than the
    /// channel's capacity, else by seeking its partition back to it, so it is fetched again
    /// after the resume. Memory stays bounded whatever librdkafka delivers after a pause.
    fn stash_or_rewind(
        &mut self,
        consumer: &StreamConsumer<IngestContext>,
        msg: rdkafka::message::BorrowedMessage<'_>,
        topic: u16,
        epoch: u32,
    ) {
        let key = (topic, msg.partition());
        if self.rewound.get(&key).is_some_and(|o| msg.offset() >= *o) {
            return; // will be fetched again from the rewound offset
        }
        if self.stash.len() < self.capacity {
            self.stash.push_back(Stashed {
                msg: msg.detach(),
                topic,
                epoch,
            });
            return;
        }
        let offset = Offset::Offset(msg.offset());
        match consumer.seek(msg.topic(), msg.partition(), offset, Duration::from_secs(1)) {
            Ok(()) => {
                self.metrics.stash_rewinds.inc();
                self.rewound.insert(key, msg.offset());
            }
            Err(e) => {
                // Never drop: over the bound rather than lose the message.
                tracing::warn!(error = %e, "cannot seek back a paused partition; stashing over the bound");
                self.stash.push_back(Stashed {
                    msg: msg.detach(),
                    topic,
                    epoch,
                });
            }
        }
    }

    /// True for a copy queued before its partition was sought back (see `stash_or_rewind`).
    fn stale_copy(&mut self, topic: u16, msg: &impl Message) -> bool {
        let key = (topic, msg.partition());
        match self.rewound.get(&key) {
            Some(o) if msg.offset() > *o => true,
            Some(_) => {
                self.rewound.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Dead-letters a consumed message (or, when it was applied before the checkpoint, only
    /// accounts for it).
    fn reject(&mut self, msg: &impl Message, origin: Origin, err: &EventError) {
        self.metrics
            .events_invalid
            .with_label_values(&[err.reason.as_str()])
            .inc();
        if self.already_applied(&origin) {
            self.tracker.open(origin, 0);
            return;
        }
        self.tracker.open(origin, 1);
        self.dead_letters.reject(msg, err, Some(origin));
    }

    /// Handles one event-topic message: the shared [`EventPipeline`], then dead letters,
    /// counters and references.
    fn process(&mut self, topic: u16, epoch: u32, msg: &impl Message) {
        let origin = Origin {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            epoch,
        };
        self.out.clear();
        let (kind, outcome) =
            self.pipeline
                .handle(origin, msg.payload(), wall_clock_ms(), &mut self.out);
        self.consumed.inc(topic, kind);
        let mut refs = 0u32;
        match outcome {
            Outcome::Rejected(err) => {
                self.reject(msg, origin, &err);
                return;
            }
            Outcome::Joined(Disposition::Duplicate) => self.metrics.duplicates.inc(),
            Outcome::Joined(Disposition::Held) => refs += 1,
            Outcome::Joined(Disposition::Emitted { joined }) => {
                let outcome = if joined { "hit" } else { "miss" };
                self.metrics.join.with_label_values(&[outcome]).inc();
            }
            Outcome::Table => {}
        }
        refs += self.absorb(Some(origin));
        self.tracker.open(origin, refs);
        self.ack_released();
    }

    /// Moves idle shards' clocks on (see [`Joiner::tick`]) and hands on what left the window.
    fn tick_joiner(&mut self) {
        self.out.clear();
        self.pipeline.tick(wall_clock_ms(), &mut self.out);
        self.absorb(None);
        self.ack_released();
    }

    /// Queues the join output's examples (skipping those applied before the checkpoint) and
    /// returns how many belong to the message at `origin` (references it must be opened with).
    fn absorb(&mut self, origin: Option<Origin>) -> u32 {
        if self.out.expired_unclicked > 0 {
            self.metrics
                .join
                .with_label_values(&["expired"])
                .inc_by(self.out.expired_unclicked);
        }
        let mut refs = 0;
        for ex in self.out.examples.drain(..) {
            let skip = applied(&self.resume, &ex.origin);
            if Some(ex.origin) == origin {
                if !skip {
                    refs += 1;
                }
            } else if skip {
                // An expired impression whose negative was trained before the restart.
                self.out.released.push(ex.origin);
            }
            if !skip {
                self.metrics
                    .examples
                    .with_label_values(&[ex.label.as_str()])
                    .inc();
                self.outbox.push_back(ex);
            }
        }
        refs
    }

    /// Acknowledges the origins of impressions that left the window without an example.
    fn ack_released(&mut self) {
        if !self.out.released.is_empty() {
            self.tracker.ack(&self.out.released);
            self.out.released.clear();
        }
        self.metrics
            .join_window_impressions
            .set(self.pipeline.joiner().waiting() as i64);
    }

    /// Commits every partition's applied offset when any of them moved (or always, on a
    /// synchronous final commit). A failed commit is retried by the next one.
    fn store_and_commit(&mut self, consumer: &StreamConsumer<IngestContext>, mode: CommitMode) {
        let offsets = self.tracker.offsets_to_commit();
        let moved = offsets != self.last_commit;
        if !self.commits || (!moved && matches!(mode, CommitMode::Async)) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (&(t, p), &offset) in &offsets {
            if let Some(name) = self.topics.get(usize::from(t)) {
                let _ = tpl.add_partition_offset(name, p, Offset::Offset(offset));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                self.metrics.commits.inc();
                self.last_commit = offsets;
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
        }
    }
}
