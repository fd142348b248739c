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
    /// Click-to-impression join.
    pub join: JoinConfig,
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
    /// How often applied offsets are committed to the group.
    pub commit_interval_ms: u64,
    /// librdkafka statistics interval (consumer lag metrics); 0 disables.
    pub statistics_interval_ms: u64,
    /// Consumer session timeout.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties applied to every client (e.g. security settings).
    pub client: BTreeMap<String, String>,
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
            commit_interval_ms: 1000,
            statistics_interval_ms: 5000,
            session_timeout_ms: 10_000,
            client: BTreeMap::new(),
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
    /// Emit "shown but not clicked" negatives when an impression leaves the join window.
    pub emit_impression_negatives: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_event_bytes: 64 * 1024,
            channel_capacity: 16 * 1024,
            emit_impression_negatives: true,
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
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            window_ms: 10 * 60 * 1000,
            max_impressions: 1_000_000,
            dedup_capacity: 2_000_000,
        }
    }
}

impl Config {
    /// Loads defaults, then `path` (if given), then `TOWERSTREAM_*` environment variables,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
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
        figment = figment.merge(Env::prefixed("TOWERSTREAM_").split("__"));
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
        let i = &self.ingest;
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
        let j = &self.join;
        if j.window_ms <= 0 {
            return Err(invalid("join.window_ms", "must be positive"));
        }
        if j.max_impressions == 0 {
            return Err(invalid("join.max_impressions", "must be positive"));
        }
        if j.dedup_capacity == 0 {
            return Err(invalid("join.dedup_capacity", "must be positive"));
        }
        Ok(())
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
}
