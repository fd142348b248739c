//! The librdkafka consumer context: rebalance handling and statistics.
//!
//! On assignment each partition gets a fresh epoch in the [`OffsetTracker`] and, on the first
//! assignment after a restart, is positioned at its checkpointed [`ResumePoint`]. On
//! revocation the partition's applied offset is committed synchronously before it is handed
//! over, and any later acknowledgement for it is stale. Statistics feed the lag gauge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::offsets::{OffsetTracker, PartitionKey, ResumePoint};
use crate::metrics::IngestMetrics;

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
    /// False in a dry run: a revoked partition's offset is not committed.
    commits: bool,
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
            commits: true,
        }
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

    fn on_assign(&self, tpl: &mut TopicPartitionList) {
        let mut seeks = self.pending_seeks.lock().unwrap_or_else(|p| p.into_inner());
        let elems: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
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
            if let Some(offset) = seeks.remove(&(t, partition)) {
                if let Err(e) = tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                {
                    tracing::error!(%topic, partition, offset, error = %e, "cannot seek to resume point");
                } else {
                    tracing::info!(%topic, partition, offset, "resuming partition from checkpoint");
                }
            }
            self.metrics.rebalances.with_label_values(&["assign"]).inc();
        }
        self.assignment_changed.store(true, Ordering::Release);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut commit = TopicPartitionList::new();
        for e in tpl.elements() {
            let Some(t) = self.topic_index(e.topic()) else {
                continue;
            };
            self.metrics.rebalances.with_label_values(&["revoke"]).inc();
            self.metrics
                .consumer_lag
                .remove_label_values(&[e.topic(), &e.partition().to_string()])
                .ok();
            if let Some(offset) = self.tracker.revoke((t, e.partition())) {
                let _ =
                    commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(offset));
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
        self.assignment_changed.store(true, Ordering::Release);
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        for (name, topic) in &stats.topics {
            if self.topic_index(name).is_none() {
                continue;
            }
            for (p, part) in &topic.partitions {
                if *p < 0 || !part.desired || part.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[name.as_str(), &p.to_string()])
                    .set(part.consumer_lag);
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
                self.on_assign(tpl);
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
