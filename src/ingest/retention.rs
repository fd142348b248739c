//! Resume points that retention overtook: a checkpoint says "go on at offset 1200", but the
//! partition's log now starts at 5000, so messages the model never saw are gone.
//!
//! Kafka would silently fall back to `auto.offset.reset` (`earliest`). [`check`] looks at every
//! resume point before the consumer subscribes and makes the loss visible: an error log naming
//! the partition, the offsets and the number of messages lost, a counter
//! (`towerstream_retention_gap_messages_total`), and, with `kafka.on_retention_gap = "fail"`,
//! a refusal to start.
//!
//! The default is `warn`: the messages are gone either way, and refusing to start would turn a
//! data loss into an outage (a restart loop until someone edits the configuration). Teams that
//! can recover the data elsewhere (a mirror, a backup) choose `fail` to stop and decide.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

use super::offsets::{ResumeMap, ResumePoint};
use super::IngestError;
use crate::config::{KafkaConfig, RetentionGapPolicy};
use crate::kafka::client_config;
use crate::metrics::IngestMetrics;

/// A resume point below its partition's log start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionGap {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Where the checkpoint resumes.
    pub resume_offset: i64,
    /// The partition's first offset still on the broker.
    pub log_start: i64,
    /// Messages deleted that the model had not applied.
    pub lost: i64,
}

impl std::fmt::Display for RetentionGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}: the checkpoint resumes at offset {} but the log starts at {} ({} messages deleted by retention before they were trained on)",
            self.topic, self.partition, self.resume_offset, self.log_start, self.lost
        )
    }
}

/// Messages in `point.offset..log_start` the model had not applied: those after what it had
/// consumed, and those it had consumed but not applied.
pub fn lost_messages(point: &ResumePoint, log_start: i64) -> i64 {
    if log_start <= point.offset {
        return 0;
    }
    let unread = (log_start - point.offset.max(point.consumed_until)).max(0);
    let unapplied = point
        .unapplied
        .iter()
        .filter(|o| **o >= point.offset && **o < log_start.min(point.consumed_until))
        .count() as i64;
    unread + unapplied
}

/// The resume points whose partition's log starts after them.
pub fn find_gaps(k: &KafkaConfig, resume: &ResumeMap) -> Result<Vec<RetentionGap>, KafkaError> {
    if resume.is_empty() {
        return Ok(Vec::new());
    }
    let consumer: BaseConsumer = client_config(k).create()?;
    let mut gaps = Vec::new();
    for ((topic, partition), point) in resume {
        let (low, _) = consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))?;
        if low > point.offset {
            gaps.push(RetentionGap {
                topic: topic.clone(),
                partition: *partition,
                resume_offset: point.offset,
                log_start: low,
                lost: lost_messages(point, low),
            });
        }
    }
    Ok(gaps)
}

/// Finds the gaps, logs and counts each, and fails when the policy says so.
pub fn check(k: &KafkaConfig, resume: &ResumeMap, m: &IngestMetrics) -> Result<(), IngestError> {
    let gaps = find_gaps(k, resume)?;
    for g in &gaps {
        tracing::error!(
            topic = %g.topic,
            partition = g.partition,
            resume_offset = g.resume_offset,
            log_start = g.log_start,
            lost = g.lost,
            policy = ?k.on_retention_gap,
            "retention deleted messages the model never trained on (kafka.on_retention_gap)"
        );
        m.retention_gap
            .with_label_values(&[g.topic.as_str()])
            .inc_by(g.lost.max(0) as u64);
    }
    if gaps.is_empty() || k.on_retention_gap == RetentionGapPolicy::Warn {
        return Ok(());
    }
    let list: Vec<String> = gaps.iter().map(ToString::to_string).collect();
    Err(IngestError::RetentionGap(format!(
        "{}; refusing to start because `kafka.on_retention_gap` is \"fail\" (set it to \"warn\" to continue from the log start)",
        list.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_counts_only_what_was_not_applied() {
        let p = ResumePoint {
            offset: 10,
            consumed_until: 20,
            unapplied: vec![10, 14, 18],
        };
        assert_eq!(lost_messages(&p, 10), 0);
        assert_eq!(lost_messages(&p, 5), 0);
        assert_eq!(
            lost_messages(&p, 15),
            2,
            "10 and 14 were consumed but not applied"
        );
        assert_eq!(lost_messages(&p, 20), 3);
        assert_eq!(lost_messages(&p, 25), 3 + 5, "20..25 were never read");
        let nothing_consumed = ResumePoint {
            offset: 10,
            consumed_until: 10,
            unapplied: Vec::new(),
        };
        assert_eq!(lost_messages(&nothing_consumed, 30), 20);
    }
}
