//! A scenario's stage: its own topics, group, directory and configuration file; the producer
//! and its book; the dead-letter follower; the children it started; and the final accounting.
//!
//! Every scenario builds one [`Stage`], starts children through it (so their logs, exits and
//! API addresses are recorded), produces through it (so the book knows every record), and
//! ends with [`Stage::finish`] once its children are stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use towerstream::config::Config;
use towerstream::kafka;

use crate::audit::{self, Tally};
use crate::book::Book;
use crate::broker::Broker;
use crate::dlq::DeadLetters;
use crate::http;
use crate::probe::{Probe, Targets};
use crate::procs::{self, Exit, Proc, Spec};
use crate::produce::{self, Producer, Rec};
use crate::report::{Check, Report};
use crate::traffic::{Topics, Traffic};
use crate::trained::{self, Counts, LedgerFollower};

/// What every scenario shares: where the binary and the broker are, quick or full.
pub struct Env {
    /// The `towerstream` binary.
    pub bin: PathBuf,
    /// The harness's broker.
    pub broker: Broker,
    /// Directory of this run (one subdirectory per scenario).
    pub run_dir: PathBuf,
    /// Run id (part of every topic name).
    pub run_id: String,
    /// `--quick`.
    pub quick: bool,
}

impl Env {
    /// `quick` in quick runs, `full` otherwise.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// How long a scenario waits for everything to be accounted.
    pub fn recover_timeout(&self) -> Duration {
        Duration::from_secs(self.pick(60, 180))
    }
}

/// Configuration keys as `section.key` → TOML literal, rendered into the scenario's file.
#[derive(Debug, Clone, Default)]
pub struct Settings(BTreeMap<String, String>);

impl Settings {
    /// Sets `key` to the TOML literal `value`.
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// Sets a string value.
    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        let quoted = serde_json::Value::String(value.to_owned()).to_string();
        self.set(key, quoted)
    }

    fn render(&self) -> String {
        let mut sections: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        for (k, v) in &self.0 {
            let (section, key) = k.rsplit_once('.').unwrap_or(("", k));
            sections.entry(section).or_default().push((key, v));
        }
        let mut out = String::new();
        for (section, keys) in sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

/// A scenario in progress.
pub struct Stage<'e> {
    /// The shared environment.
    pub env: &'e Env,
    /// Scenario name.
    pub name: &'static str,
    /// Its directory (configuration, checkpoints, ledgers, logs).
    pub dir: PathBuf,
    /// Its configuration file.
    pub config_path: PathBuf,
    /// The configuration, as the children read it.
    pub config: Config,
    /// The record of everything produced.
    pub book: Book,
    /// The producer.
    pub producer: Arc<Producer>,
    /// The stream generator.
    pub traffic: Arc<Mutex<Traffic>>,
    /// The dead-letter follower.
    pub dlq: DeadLetters,
    /// Scenario-specific expectations.
    pub checks: Vec<Check>,
    /// Observations.
    pub notes: Vec<String>,
    /// Trained more than once fails the scenario.
    pub twice_is_failure: bool,
    /// Where the trainers listen (the lag probe reads their metrics).
    pub targets: Targets,
    ledgers: Ledgers,
    backlog: Option<Background>,
    logs: Vec<PathBuf>,
    exits: Vec<Exit>,
    started_count: BTreeMap<String, u32>,
    probe: Option<Probe>,
    started: Instant,
}

/// The trainers' ledgers, shared with the backlog sampler.
type Ledgers = Arc<Mutex<Vec<LedgerFollower>>>;

/// Polls every ledger; the counts merged.
fn merged(ledgers: &Ledgers) -> (Counts, Vec<Counts>) {
    let mut l = ledgers.lock().unwrap_or_else(|p| p.into_inner());
    let per: Vec<Counts> = l.iter_mut().map(|f| f.poll().clone()).collect();
    let mut all = Counts::new();
    for c in &per {
        trained::merge(&mut all, c);
    }
    (all, per)
}

/// Samples the backlog (clicks delivered, not yet accounted) every 500 ms; the largest is the
/// task's result.
fn sample_backlog(book: Book, ledgers: Ledgers, dlq: DeadLetters) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let mut max = 0;
        while !s.load(Ordering::Relaxed) {
            let (counts, _) = merged(&ledgers);
            max = max.max(audit::backlog(&book, &counts, &dlq.snapshot()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        max
    });
    Background { stop, task }
}

/// A stream produced in the background until stopped.
pub struct Background {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Background {
    /// Stops producing; the number of records handed over.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

impl<'e> Stage<'e> {
    /// Creates the scenario's topics (`partitions` per event topic), configuration and
    /// followers. `extra` overrides the harness defaults.
    pub async fn new(
        env: &'e Env,
        name: &'static str,
        partitions: i32,
        world: (usize, usize),
        extra: &Settings,
    ) -> anyhow::Result<Stage<'e>> {
        let dir = env.run_dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let id = format!("chaos-{}-{name}", env.run_id);
        let topics = Topics {
            events: format!("{id}-events"),
            items: format!("{id}-items"),
            users: format!("{id}-users"),
        };
        let mut s = Settings::default();
        s.string("kafka.brokers", &env.broker.brokers())
            .string("kafka.group_id", &id)
            .set(
                "kafka.event_topics",
                serde_json::json!([topics.events]).to_string(),
            )
            .string("kafka.item_topic", &topics.items)
            .string("kafka.user_topic", &topics.users)
            .string("kafka.dead_letter_topic", &format!("{id}-dead-letters"))
            .string("kafka.handover_topic", &format!("{id}-handover"))
            .set("kafka.commit_interval_ms", "200")
            .set("kafka.statistics_interval_ms", "500")
            .set("kafka.session_timeout_ms", "6000")
            .string("replication.topic", &format!("{id}-generations"))
            .set("replication.min_interval_ms", "500")
            .set("replication.full_every_secs", "10")
            .string("serve.listen", "127.0.0.1:0")
            .string("checkpoint.dir", &dir.join("checkpoints").to_string_lossy())
            .string(
                "checkpoint.ledger",
                &dir.join("ledger.jsonl").to_string_lossy(),
            )
            .set("checkpoint.every_secs", "2")
            .set("checkpoint.keep", "2")
            .set("model.tower_dims", "[64, 32]")
            .set("features.capacity.user_id", "20000")
            .set("features.capacity.item_id", "20000")
            .set("features.capacity.zip", "1000")
            .set("features.default_capacity", "1000")
            .set("train.estimator_buckets", "65536")
            .set("index.refresh_interval_ms", "1000");
        for (k, v) in &extra.0 {
            s.set(k, v.clone());
        }
        let text = s.render();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, &text)?;
        let config = Config::from_toml(&text).context("the scenario's configuration")?;
        let mut specs = kafka::topic_specs(&config.kafka, partitions);
        specs.push(kafka::generations_topic_spec(&config.replication));
        kafka::ensure_topics(&config.kafka, &specs)
            .await
            .context("creating the scenario's topics")?;
        let book = Book::default();
        let producer = Arc::new(Producer::new(&config.kafka.brokers, book.clone())?);
        let dlq = DeadLetters::follow(
            &config.kafka.brokers,
            &config.kafka.dead_letter_topic,
            topics.clone(),
        )?;
        let traffic = Traffic::new(name, topics, world.0, world.1, 7);
        let targets: Targets = Arc::default();
        let probe = Probe::start(
            &config.kafka.brokers,
            &config.kafka.group_id,
            &config.kafka.event_topics[0],
            partitions,
            targets.clone(),
        );
        let ledgers: Ledgers = Arc::new(Mutex::new(vec![LedgerFollower::new(
            config.checkpoint.ledger.clone(),
        )]));
        Ok(Stage {
            env,
            name,
            backlog: Some(sample_backlog(book.clone(), ledgers.clone(), dlq.clone())),
            ledgers,
            dir,
            config_path,
            config,
            book,
            producer,
            traffic: Arc::new(Mutex::new(traffic)),
            dlq,
            checks: Vec::new(),
            notes: Vec::new(),
            twice_is_failure: true,
            targets,
            logs: Vec::new(),
            exits: Vec::new(),
            started_count: BTreeMap::new(),
            probe: Some(probe),
            started: Instant::now(),
        })
    }

    /// Runs `f` on the traffic generator.
    pub fn traffic<T>(&self, f: impl FnOnce(&mut Traffic) -> T) -> T {
        let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut t)
    }

    /// Publishes the world's catalogue and profiles and waits for the broker.
    pub async fn publish_tables(&self) -> anyhow::Result<()> {
        let recs = self.traffic(|t| t.tables());
        self.send(recs).await
    }

    /// Produces `recs` and waits until the broker has them.
    pub async fn send(&self, recs: Vec<Rec>) -> anyhow::Result<()> {
        self.producer.send_all(recs);
        anyhow::ensure!(
            self.producer.settle(Duration::from_secs(120)).await,
            "records not delivered within 120 s"
        );
        Ok(())
    }

    /// Produces batches from `gen` at `rate` records/s in the background until stopped.
    pub fn background(
        &self,
        rate: f64,
        gen: impl Fn(&mut Traffic) -> Vec<Rec> + Send + 'static,
    ) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, producer, traffic) = (stop.clone(), self.producer.clone(), self.traffic.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            while !s.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    let batch = {
                        let mut t = traffic.lock().unwrap_or_else(|p| p.into_inner());
                        gen(&mut t)
                    };
                    sent += batch.len() as u64;
                    producer.send_all(batch);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        });
        Background { stop, task }
    }

    /// Produces `batches` at `rate` records/s, returning when all are handed over.
    pub async fn paced(&self, batches: Vec<Vec<Rec>>, rate: f64) {
        produce::paced(&self.producer, batches, rate).await;
    }

    fn next_name(&mut self, role: &str) -> String {
        let n = self.started_count.entry(role.to_owned()).or_insert(0);
        *n += 1;
        format!("{role}#{n}")
    }

    /// Starts `towerstream <command>` with the scenario's configuration plus `sets`. Trainers
    /// (`run`, `train`) are watched by the lag probe.
    pub async fn start(
        &mut self,
        role: &str,
        command: &str,
        sets: Vec<String>,
    ) -> anyhow::Result<Proc> {
        let name = self.next_name(role);
        let p = procs::start(Spec {
            bin: &self.env.bin,
            command,
            config: &self.config_path,
            sets,
            name,
            dir: &self.dir,
        })
        .await?;
        self.logs.push(p.log.clone());
        if command != "serve" {
            if let Ok(mut t) = self.targets.lock() {
                t.push(p.addr);
            }
        }
        Ok(p)
    }

    /// Starts a trainer (`towerstream run`) with the scenario's configuration.
    pub async fn trainer(&mut self) -> anyhow::Result<Proc> {
        self.start("trainer", "run", Vec::new()).await
    }

    /// Per ledger, the step each run restored.
    pub fn restored(&self) -> Vec<Vec<i64>> {
        let l = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().map(|f| f.restored().to_vec()).collect()
    }

    /// Follows one more ledger (a second trainer's).
    pub fn follow_ledger(&mut self, path: PathBuf) {
        let mut l = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        l.push(LedgerFollower::new(path));
    }

    fn untarget(&self, p: &Proc) {
        if let Ok(mut t) = self.targets.lock() {
            t.retain(|a| *a != p.addr);
        }
    }

    /// Graceful stop (SIGTERM), recording the exit.
    pub async fn stop(&mut self, p: Proc) -> Exit {
        self.untarget(&p);
        let e = p.term(Duration::from_secs(60)).await;
        self.exits.push(e.clone());
        e
    }

    /// `kill -9`, recording the exit.
    pub async fn kill(&mut self, p: Proc) -> Exit {
        self.untarget(&p);
        let e = p.kill9().await;
        self.exits.push(e.clone());
        e
    }

    /// The trainers' counts so far (all ledgers merged), and per ledger.
    pub fn counts(&mut self) -> (Counts, Vec<Counts>) {
        merged(&self.ledgers)
    }

    /// Waits until every click is trained or dead-lettered (and every malformed record is
    /// back); the time it took, or `None` at the timeout.
    pub async fn wait_accounted(&mut self, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            if self.book.in_flight() == 0 {
                let (counts, _) = self.counts();
                if audit::all_accounted(&self.book, &counts, &self.dlq.snapshot()) {
                    return Some(started.elapsed());
                }
            }
            if started.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A trainer's metrics page.
    pub async fn metrics(&self, p: &Proc) -> String {
        match http::get(p.addr, "/metrics").await {
            Some((200, page)) => page,
            _ => String::new(),
        }
    }

    /// Records an expectation.
    pub fn check(&mut self, name: &str, pass: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.to_owned(),
            pass,
            detail: detail.into(),
        });
    }

    /// Records an observation.
    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// The final accounting, once every child is stopped.
    pub async fn finish(mut self, recover: Option<Duration>) -> anyhow::Result<Report> {
        let mut lag = match self.probe.take() {
            Some(p) => p.finish().await,
            None => Default::default(),
        };
        if let Some(b) = self.backlog.take() {
            lag.backlog = b.stop().await;
        }
        let _ = self.producer.settle(Duration::from_secs(30)).await;
        if !self.dlq.catch_up(Duration::from_secs(30)).await {
            self.note("the dead-letter topic could not be read to its end");
        }
        let mut counts = Counts::new();
        {
            let mut ledgers = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            for l in ledgers.iter_mut() {
                match l.settle() {
                    Ok(c) => trained::merge(&mut counts, &c),
                    Err(e) => anyhow::bail!("harness bug: {e}"),
                }
            }
        }
        for log in &self.logs {
            if let Some(e) = procs::final_error(log) {
                let name = log
                    .file_name()
                    .map(|n| n.to_string_lossy().replace(".stderr.log", ""));
                self.notes
                    .push(format!("{} exited with: {e}", name.unwrap_or_default()));
            }
        }
        let tally: Tally = audit::tally(&self.book, &counts, &self.dlq.snapshot());
        let (read, unplaced) = self.dlq.counts();
        if unplaced > 0 {
            self.note(format!(
                "{unplaced} of {read} dead letters name no source position the book knows"
            ));
        }
        let mut report = Report {
            scenario: self.name.to_owned(),
            quick: self.env.quick,
            pass: false,
            failures: Vec::new(),
            produced: self.book.produced(),
            produce_failures: self.book.failures(),
            tally,
            lag,
            recover_seconds: recover.map(|d| d.as_secs_f64()),
            panics: procs::panics(&self.logs),
            exits: self.exits,
            checks: self.checks,
            notes: self.notes,
            seconds: self.started.elapsed().as_secs_f64(),
            dir: self.dir.display().to_string(),
            twice_is_failure: self.twice_is_failure,
        };
        report.judge();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_render_a_valid_configuration() {
        let mut s = Settings::default();
        s.string("kafka.brokers", "127.0.0.1:29092")
            .set("kafka.event_topics", r#"["a"]"#)
            .set("features.capacity.user_id", "20000")
            .set("features.dense", r#"[{entity = "item", name = "price"}]"#);
        let c = Config::from_toml(&s.render()).unwrap();
        assert_eq!(c.kafka.event_topics, vec!["a"]);
        assert_eq!(c.features.capacity["user_id"], 20000);
        assert_eq!(c.features.dense[0].name, "price");
    }
}
