//! Kafka plumbing shared by every stage: client configuration, topic creation, producers.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{KafkaConfig, ReplicationConfig};

/// A topic to create if missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Log-compacted (tables) rather than time-retained (streams).
    pub compacted: bool,
    /// `retention.ms` when not the broker's default.
    pub retention_ms: Option<u64>,
}

/// The generations topic: one partition (one ordered log per model), time-retained.
pub fn generations_topic_spec(r: &ReplicationConfig) -> TopicSpec {
    TopicSpec {
        name: r.topic.clone(),
        partitions: 1,
        compacted: false,
        retention_ms: Some(r.retention_ms),
    }
}

/// The topics a deployment uses: event topics with `partitions` partitions, compacted
/// catalogue and profile tables, the dead-letter topic and the compacted handover topic.
pub fn topic_specs(k: &KafkaConfig, partitions: i32) -> Vec<TopicSpec> {
    let mut specs: Vec<TopicSpec> = k
        .event_topics
        .iter()
        .map(|t| TopicSpec {
            name: t.clone(),
            partitions,
            compacted: false,
            retention_ms: None,
        })
        .collect();
    for (name, compacted) in [
        (&k.item_topic, true),
        (&k.user_topic, true),
        (&k.dead_letter_topic, false),
        (&k.handover_topic, true),
    ] {
        specs.push(TopicSpec {
            name: name.clone(),
            partitions: 1,
            compacted,
            retention_ms: None,
        });
    }
    specs
}

/// Client properties common to every client: brokers plus `kafka.client` overrides.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, value) in &k.client {
        c.set(key, value);
    }
    c
}

/// True when a consumer error leaves the consumer unusable, so the loop reading it must stop.
///
/// librdkafka recovers from everything else by itself — a broker down or restarting, a
/// leader moving, a topic deleted and created again — and reports those errors only so the
/// application knows; a consumer that stops on them freezes at the first broker restart.
/// Fatal errors are the ones librdkafka marks so (e.g. a fenced static group member).
pub fn consumer_error_is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::MessageConsumptionFatal(_))
        || e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// A producer with durable, idempotent delivery (dead letters, replay, generations).
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = client_config(k);
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    c.create()
}

/// Produces every `(key, payload)` to `topic` as fast as the client allows and waits until
/// the broker has them all. When librdkafka's local queue is full, it waits for the messages
/// in flight and retries, instead of failing.
pub async fn produce_all(
    p: &FutureProducer,
    topic: &str,
    records: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<(), KafkaError> {
    async fn settle(
        pending: &mut Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<(), KafkaError> {
        for f in pending.drain(..) {
            f.await
                .map_err(|_| KafkaError::Canceled)?
                .map_err(|(e, _)| e)?;
        }
        Ok(())
    }
    let mut pending = Vec::new();
    for (key, payload) in records {
        loop {
            match p.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    settle(&mut pending).await?;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    settle(&mut pending).await
}

/// Creates the topics that do not exist yet, with `kafka.replication_factor` replicas (-1: the
/// broker's `default.replication.factor`). Existing topics are left as they are.
pub async fn ensure_topics(k: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(k).create()?;
    let retention: Vec<Option<String>> = specs
        .iter()
        .map(|s| s.retention_ms.map(|ms| ms.to_string()))
        .collect();
    let topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(s, retention)| {
            let replication = TopicReplication::Fixed(k.replication_factor);
            let mut t = NewTopic::new(&s.name, s.partitions, replication);
            if s.compacted {
                t = t.set("cleanup.policy", "compact");
            }
            if let Some(ms) = retention {
                t = t.set("retention.ms", ms);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic = %name, error = %code, "topic creation failed"),
                )
            }
        }
    }
    Ok(())
}

/// Deletes topics (tests and demos that want a clean slate). Missing topics are fine.
pub async fn delete_topics(k: &KafkaConfig, names: &[&str]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(k).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin.delete_topics(names, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fatal_consumer_errors_stop_a_consumer_loop() {
        use RDKafkaErrorCode as C;
        for transient in [
            KafkaError::MessageConsumption(C::BrokerTransportFailure),
            KafkaError::MessageConsumption(C::AllBrokersDown),
            KafkaError::MessageConsumption(C::UnknownTopicOrPartition),
            KafkaError::MessageConsumption(C::UnknownPartition),
            KafkaError::MessageConsumption(C::OperationTimedOut),
            KafkaError::PartitionEOF(0),
        ] {
            assert!(!consumer_error_is_fatal(&transient), "{transient}");
        }
        for fatal in [
            KafkaError::MessageConsumptionFatal(C::Fenced),
            KafkaError::MessageConsumption(C::Fatal),
        ] {
            assert!(consumer_error_is_fatal(&fatal), "{fatal}");
        }
    }
}
