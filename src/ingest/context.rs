//! The librdkafka consumer context: rebalance handling and statistics.
//!
//! On assignment each partition gets a fresh epoch in the [`OffsetTracker`] and, on the first
//! assignment after a restart, is positioned at its checkpointed [`ResumePoint`]. On
//! revocation the tracker waits for the training step in progress (so nothing of the partition
//! is trained after this point, see [`OffsetTracker::revoke_all`]), the partition's applied
//! offset is committed synchronously before it is handed over, and the ingest loop is told to
//! forget the partition's join state ([`IngestContext::take_rebalance`]); any later
//! acknowledgement for it is stale. Statistics feed the lag gauge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::handover::HandoverLog;
use super::offsets::{OffsetTracker, PartitionKey, ResumePoint};
use crate::metrics::IngestMetrics;

/// What rebalances changed, for the ingest loop ([`IngestContext::take_rebalance`]).
#[derive(Debug, Default)]
pub struct Handover {
    /// Partitions revoked: forget their join state and in-flight messages.
    pub revoked: Vec<PartitionKey>,
    /// What to skip in newly assigned partitions (an offset any of the points says was applied):
    /// their previous owners' commits and what this model applied before it lost them.
    pub resume: Vec<(PartitionKey, Vec<ResumePoint>)>,
}

/// Consumer context of the event-topic consumer.
pub struct IngestContext {
    topics: Vec<String>,
    tracker: Arc<OffsetTracker>,
    metrics: IngestMetrics,
    /// Resume points not used for seeking yet (each is used on its first assignment).
    pending_seeks: Mutex<HashMap<PartitionKey, i64>>,
    /// Start other partitions at the beginning on their first assignment.
    from_beginning: bool,
    /// Partitions assigned at least once.
    seen: Mutex<std::collections::HashSet<PartitionKey>>,
    assignment_changed: AtomicBool,
    /// Partitions revoked since the ingest loop last looked.
    revoked: Mutex<Vec<PartitionKey>>,
    /// What to skip in newly assigned partitions: resume points committed by their previous
    /// owners and what this model applied before it lost them.
    handed_over: Mutex<Vec<(PartitionKey, Vec<ResumePoint>)>>,
    revoked_pending: AtomicBool,
    /// False in a dry run: a revoked partition's offset is not committed.
    commits: bool,
    /// Where resume points too large for commit metadata go (and come back from).
    handover: Option<HandoverLog>,
}

impl IngestContext {
    /// A context for `topics` (index order = [`Origin::topic`](crate::example::Origin)).
    pub fn new(
        topics: Vec<String>,
        tracker: Arc<OffsetTracker>,
        metrics: IngestMetrics,
        resume: &HashMap<PartitionKey, ResumePoint>,
        from_beginning: bool,
    ) -> Self {
        IngestContext {
            topics,
            tracker,
            metrics,
            pending_seeks: Mutex::new(resume.iter().map(|(k, r)| (*k, r.offset)).collect()),
            from_beginning,
            seen: Mutex::default(),
            assignment_changed: AtomicBool::new(false),
            revoked: Mutex::default(),
            handed_over: Mutex::default(),
            revoked_pending: AtomicBool::new(false),
            commits: true,
            handover: None,
        }
    }

    /// Ships resume points too large for commit metadata through `log`.
    pub fn with_handover_log(mut self, log: HandoverLog) -> Self {
        self.handover = Some(log);
        self
    }

    /// Whether revoked partitions' applied offsets are committed (false for a dry run).
    pub fn with_commits(mut self, commits: bool) -> Self {
        self.commits = commits;
        self
    }

    /// Index of a configured event topic.
    pub fn topic_index(&self, topic: &str) -> Option<u16> {
        self.topics
            .iter()
            .position(|t| t == topic)
            .and_then(|i| u16::try_from(i).ok())
    }

    /// True once after each rebalance (the ingest loop re-applies a pause).
    pub fn take_assignment_changed(&self) -> bool {
        self.assignment_changed.swap(false, Ordering::AcqRel)
    }

    /// Partitions revoked, and resume points handed over with assigned partitions, since the
    /// last call (cheap when there are none). The ingest loop applies them before the next
    /// message.
    pub fn take_rebalance(&self) -> Option<Handover> {
        if !self.revoked_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(Handover {
            revoked: std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner())),
            resume: std::mem::take(
                &mut *self.handed_over.lock().unwrap_or_else(|p| p.into_inner()),
            ),
        })
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut seeks = self.pending_seeks.lock().unwrap_or_else(|p| p.into_inner());
        let mut handover = Vec::new();
        let elems: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        // Logged at info: a rebalance is rare, and where one stalls the log must show how far
        // it got (assigned, revoked, the commit on revoke).
        tracing::info!(partitions = ?elems, "partitions assigned");
        for (topic, partition) in elems {
            let Some(t) = self.topic_index(&topic) else {
                continue;
            };
            self.tracker.assign((t, partition));
            let first = self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((t, partition));
            if first && self.from_beginning && !seeks.contains_key(&(t, partition)) {
                let _ = tpl.set_partition_offset(&topic, partition, Offset::Beginning);
            }
            let seek = seeks.remove(&(t, partition));
            if seek.is_none() && !(first && self.from_beginning) {
                handover.push((t, topic.clone(), partition));
            }
            if let Some(offset) = seek {
                if let Err(e) = tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                {
                    tracing::error!(%topic, partition, offset, error = %e, "cannot seek to resume point");
                } else {
                    tracing::info!(%topic, partition, offset, "resuming partition from checkpoint");
                }
            }
            self.metrics.rebalances.with_label_values(&["assign"]).inc();
        }
        drop(seeks);
        self.read_handover(consumer, &handover);
        self.assignment_changed.store(true, Ordering::Release);
    }

    /// Reads the resume points the previous owners committed with these partitions (see
    /// `on_revoke`), for the ingest loop to skip what they applied already.
    fn read_handover(&self, consumer: &BaseConsumer<Self>, parts: &[(u16, String, i32)]) {
        if parts.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (_, topic, partition) in parts {
            tpl.add_partition(topic, *partition);
        }
        let committed = consumer
            .committed_offsets(tpl, std::time::Duration::from_secs(10))
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read committed offsets; skipping only what this model applied");
            })
            .ok();
        let mut found = Vec::new();
        for (t, topic, partition) in parts {
            let key = (*t, *partition);
            let elem = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, *partition));
            let offset = elem.as_ref().and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let mut points = Vec::new();
            if let (Some(e), Some(offset)) = (&elem, offset) {
                let point = match &self.handover {
                    Some(log) if HandoverLog::is_pointer(e.metadata()) => {
                        log.read(topic, *partition, offset, e.metadata())
                    }
                    _ => ResumePoint::from_commit_metadata(offset, e.metadata()),
                };
                if let Some(point) = point {
                    tracing::info!(%topic, partition, offset, consumed_until = point.consumed_until, "partition handed over with a resume point");
                    points.push(point);
                }
            }
            // What this model itself applied (a failed commit on revoke — the coordinator was
            // down — leaves an older commit, and the re-read must not train it again).
            if let Some(mut ours) = self.tracker.carried(key) {
                ours.offset = ours.offset.min(offset.unwrap_or(0));
                points.push(ours);
            }
            found.push((key, points));
        }
        self.handed_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(found);
        self.revoked_pending.store(true, Ordering::Release);
    }

    /// The commit metadata that hands `point` over: the point itself when it fits, else a
    /// pointer to its record on the handover topic; `None` (counted) when neither works.
    fn handover_metadata(
        &self,
        topic: &str,
        partition: i32,
        point: &ResumePoint,
    ) -> Option<String> {
        if point.consumed_until <= point.offset {
            return None;
        }
        if let Some(m) = point.to_commit_metadata() {
            return Some(m);
        }
        let written = match &self.handover {
            Some(log) if self.commits => log.write(topic, partition, point).map_err(|e| {
                tracing::warn!(%topic, partition, error = %e, "cannot write the handover record");
            }),
            _ => Err(()),
        };
        match written {
            Ok(Some(pointer)) => {
                self.metrics.handover_records.inc();
                Some(pointer)
            }
            _ => {
                self.metrics.handover_overflows.inc();
                tracing::warn!(
                    %topic, partition, offset = point.offset, consumed_until = point.consumed_until,
                    "resume point too large for commit metadata and not on the handover topic; the next owner may train up to the difference again"
                );
                None
            }
        }
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut keys = Vec::new();
        for e in tpl.elements() {
            let Some(t) = self.topic_index(e.topic()) else {
                continue;
            };
            self.metrics.rebalances.with_label_values(&["revoke"]).inc();
            self.metrics
                .consumer_lag
                .remove_label_values(&[e.topic(), &e.partition().to_string()])
                .ok();
            keys.push((t, e.partition(), e.topic().to_owned()));
        }
        let pairs: Vec<PartitionKey> = keys.iter().map(|(t, p, _)| (*t, *p)).collect();
        tracing::info!(partitions = ?pairs, "partitions revoked");
        // Waits for a step in progress: afterwards every example of these partitions is either
        // acknowledged (inside the committable offset) or stale (dropped untrained).
        let offsets = self.tracker.revoke_all(&pairs);
        let mut commit = TopicPartitionList::new();
        for ((_, partition, topic), point) in keys.iter().zip(offsets) {
            let Some(point) = point else { continue };
            if commit
                .add_partition_offset(topic, *partition, Offset::Offset(point.offset))
                .is_err()
            {
                continue;
            }
            // What above the committed offset is applied already travels with the commit, so
            // the next owner skips it instead of training it twice.
            if let Some(m) = self.handover_metadata(topic, *partition, &point) {
                if let Some(mut e) = commit.find_partition(topic, *partition) {
                    e.set_metadata(m);
                }
            }
        }
        if commit.count() > 0 && self.commits {
            // Blocking here is the point: the next owner must start after what we applied.
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => self.metrics.commits.inc(),
                Err(e) => {
                    tracing::warn!(error = %e, "commit on revoke failed; the next owner re-reads from the last commit")
                }
            }
        }
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(pairs);
        self.revoked_pending.store(true, Ordering::Release);
        self.assignment_changed.store(true, Ordering::Release);
    }
}

impl ClientContext for IngestContext {
    /// Lag = the partition's high watermark minus what the ingest loop has *processed* (not
    /// what librdkafka fetched or what was last committed: after a reconnect, or while
    /// paused with a full local queue, those read 0 with thousands of events still waiting).
    /// A statistics report that does not know the high watermark leaves the gauge as it is.
    fn stats(&self, stats: Statistics) {
        for (name, topic) in &stats.topics {
            let Some(t) = self.topic_index(name) else {
                continue;
            };
            for (p, part) in &topic.partitions {
                if *p < 0 || !part.desired || part.hi_offset < 0 {
                    continue;
                }
                let position = self
                    .tracker
                    .consumed_until((t, *p))
                    .or((part.committed_offset >= 0).then_some(part.committed_offset));
                let Some(position) = position else { continue };
                self.metrics
                    .consumer_lag
                    .with_label_values(&[name.as_str(), &p.to_string()])
                    .set((part.hi_offset - position).max(0));
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping assignment");
                self.on_revoke(consumer, tpl);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
    }
}
