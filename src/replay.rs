//! Replay: publishes a stream of events (a dataset or a synthetic stream) to the configured
//! topics in event-time order, at a given rate or as fast as the broker takes them.
//!
//! Items go to the item topic keyed by item id, profiles to the user topic keyed by user id,
//! impressions and clicks to the first event topic keyed by user id (so a user's impressions
//! and clicks share a partition and join in order).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use serde::Serialize;

use crate::config::KafkaConfig;
use crate::event::Event;
use crate::kafka::{produce_all, producer};

/// What a replay sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayStats {
    /// Events per topic.
    pub per_topic: BTreeMap<String, u64>,
    /// Events per type.
    pub per_type: BTreeMap<String, u64>,
    /// All events.
    pub events: u64,
    /// Wall time.
    pub seconds: f64,
}

impl ReplayStats {
    /// Events per second achieved.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// Where an event goes and under which key.
pub fn route<'a>(k: &'a KafkaConfig, e: &Event) -> (&'a str, String) {
    match e {
        Event::Item(i) => (&k.item_topic, i.item_id.to_string()),
        Event::User(u) => (&k.user_topic, u.user_id.to_string()),
        Event::Impression(i) => (event_topic(k), i.user_id.to_string()),
        Event::Click(c) => (event_topic(k), c.user_id.to_string()),
    }
}

fn event_topic(k: &KafkaConfig) -> &str {
    k.event_topics.first().map_or("events", String::as_str)
}

/// How events are written to the topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadShape {
    /// Towerstream's own JSON schema.
    #[default]
    Native,
    /// The example shop's own JSON ([`crate::mapping::shop`]), read through its `[mapping]`.
    Shop,
}

/// How to replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    /// Events per second (0: as fast as the broker acknowledges).
    pub rate: f64,
    /// Stamp each event with the wall-clock time it is sent instead of its recorded time, so
    /// a historical dataset looks live (freshness is measured from event time).
    pub restamp: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// The payloads' shape.
    pub shape: PayloadShape,
}

/// Publishes `events` (already in event-time order) in chunks that are acknowledged by the
/// broker before the next one goes out. `total` sizes the progress bar.
pub async fn replay(
    k: &KafkaConfig,
    events: impl IntoIterator<Item = Event>,
    total: Option<u64>,
    opts: ReplayOptions,
) -> Result<ReplayStats, KafkaError> {
    let ReplayOptions {
        rate,
        restamp,
        progress,
        shape,
    } = opts;
    let p = producer(k)?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "replay [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut stats = ReplayStats::default();
    let started = Instant::now();
    let chunk = if rate > 0.0 {
        ((rate / 20.0).ceil() as usize).clamp(1, 10_000)
    } else {
        10_000
    };
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        // Group the chunk by topic, keeping order within each topic.
        let mut by_topic: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        let mut n = 0;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for mut e in events.by_ref().take(chunk) {
            if restamp {
                e.set_event_time_ms(now_ms);
            }
            let (topic, key) = route(k, &e);
            *stats.per_type.entry(e.kind().to_owned()).or_insert(0) += 1;
            let payload = match shape {
                PayloadShape::Native => e.to_json(),
                PayloadShape::Shop => crate::mapping::shop::encode(&e),
            };
            by_topic.entry(topic).or_default().push((key, payload));
            n += 1;
        }
        // Tables first, so a chunk's items exist before its clicks are read.
        let order: Vec<&str> = by_topic
            .keys()
            .copied()
            .filter(|t| *t == k.item_topic || *t == k.user_topic)
            .chain(
                by_topic
                    .keys()
                    .copied()
                    .filter(|t| *t != k.item_topic && *t != k.user_topic),
            )
            .collect();
        for topic in order {
            if let Some(records) = by_topic.remove(topic) {
                *stats.per_topic.entry(topic.to_owned()).or_insert(0) += records.len() as u64;
                produce_all(&p, topic, records).await?;
            }
        }
        stats.events += n as u64;
        bar.inc(n as u64);
        if rate > 0.0 {
            let due = Duration::from_secs_f64(stats.events as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    bar.finish_and_clear();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}
