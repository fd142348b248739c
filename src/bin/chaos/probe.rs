//! Watching consumer lag while a scenario runs, two ways: the trainers' own gauge
//! (`towerstream_consumer_lag_messages`, from librdkafka statistics) and the group's committed
//! offsets against the partitions' end offsets, read from the broker. The second is the truth
//! the first should match (it includes held impressions, which pin the committed offset).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::http;

/// Largest lags seen.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Lag {
    /// Largest sum over partitions of the trainers' lag gauge.
    pub gauge: i64,
    /// Largest sum over partitions of (end offset − committed offset).
    pub committed: i64,
    /// Samples where the gauge read 0 on every partition while the committed lag was over 100.
    pub gauge_zero_while_behind: u32,
    /// Largest number of delivered clicks not yet trained nor dead-lettered (from the book
    /// and the ledgers: the backlog in clicks, which held impressions do not inflate).
    pub backlog: u64,
}

/// A running probe.
pub struct Probe {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<Lag>>,
    task: tokio::task::JoinHandle<()>,
}

/// Where the trainers listen now (scenarios update it on every restart).
pub type Targets = Arc<Mutex<Vec<SocketAddr>>>;

impl Probe {
    /// Polls every 500 ms until [`Probe::finish`].
    pub fn start(
        brokers: &str,
        group: &str,
        topic: &str,
        partitions: i32,
        targets: Targets,
    ) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(Lag::default()));
        let consumer: Option<Arc<BaseConsumer>> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .ok()
            .map(Arc::new);
        let (s, m, topic) = (stop.clone(), max.clone(), topic.to_owned());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let addrs = targets.lock().map(|t| t.clone()).unwrap_or_default();
                let (mut gauge, mut series) = (0i64, 0usize);
                for a in addrs {
                    if let Some((200, page)) = http::get(a, "/metrics").await {
                        let lag: Vec<f64> =
                            http::metric(&page, "towerstream_consumer_lag_messages")
                                .map(|(_, v)| v)
                                .collect();
                        series += lag.len();
                        gauge += lag.iter().sum::<f64>() as i64;
                    }
                }
                let committed = match &consumer {
                    Some(c) => {
                        let (c, t) = (c.clone(), topic.clone());
                        tokio::task::spawn_blocking(move || committed_lag(&c, &t, partitions))
                            .await
                            .ok()
                            .flatten()
                    }
                    None => None,
                };
                if let Ok(mut m) = m.lock() {
                    m.gauge = m.gauge.max(gauge);
                    if let Some(c) = committed {
                        m.committed = m.committed.max(c);
                        if series > 0 && gauge == 0 && c > 100 {
                            m.gauge_zero_while_behind += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Probe { stop, max, task }
    }

    /// Stops polling; the largest lags seen.
    pub async fn finish(self) -> Lag {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.max.lock().map(|m| *m).unwrap_or_default()
    }
}

fn committed_lag(c: &BaseConsumer, topic: &str, partitions: i32) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(2)).ok()?;
    let mut lag = 0;
    for e in got.elements() {
        let (low, high) = c
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(2))
            .ok()?;
        let committed = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - committed).max(0);
    }
    Some(lag)
}
