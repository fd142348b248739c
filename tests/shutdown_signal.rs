//! `towerstream run` as a separate process against the real broker: SIGTERM finishes the
//! batch in hand, writes a checkpoint, commits the offsets that checkpoint holds and exits 0;
//! a restart restores the checkpoint and trains exactly the events that arrived since.
//!
//! The stream is clicks only (no impressions): each click is exactly one example and nothing
//! is held in the join window, so "everything consumed is applied" means the committed
//! offsets are the partitions' end offsets. Periodic checkpoints and commits are pushed out
//! of reach (one hour, ten minutes), so the checkpoint and the commits found after exit are
//! the ones the SIGTERM path wrote.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use towerstream::config::Config;
use towerstream::event::Event;
use towerstream::kafka::{client_config, produce_all, producer};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::checkpoint;
use towerstream::train::sampler::Rng;

const PARTITIONS: i32 = 3;
/// Clicks before the first run.
const FIRST: u64 = 3000;
/// Clicks produced between the runs.
const SECOND: u64 = 1000;
/// Generous bounds: the machine is slow and shares its cores with the broker.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const TRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> Config {
    let mut c = unique_config("sigterm");
    // Nothing is committed by the interval timer (its first tick comes before the first
    // assignment): the offsets found after exit are the shutdown's commit.
    c.kafka.commit_interval_ms = 600_000;
    c.train.batch_size = 64;
    c.train.max_wait_ms = 50;
    c.train.estimator_buckets = 1 << 12;
    c.model.tower_dims = vec![32, 16];
    c.features.capacity = BTreeMap::from([
        ("user_id".to_owned(), 1024),
        ("item_id".to_owned(), 1024),
        ("zip".to_owned(), 1024),
    ]);
    c.features.default_capacity = 256;
    c.index.refresh_interval_ms = 300;
    c.serve.listen = "127.0.0.1:0".into();
    c.checkpoint.dir = dir.join("checkpoints");
    // Only the shutdown checkpoint is written.
    c.checkpoint.every_steps = 0;
    c.checkpoint.every_secs = 3600;
    c.checkpoint.keep = 5;
    c
}

/// The keys `config` changes, as the TOML file the binary reads.
fn config_toml(c: &Config) -> String {
    let s = |v: &str| serde_json::to_string(v).unwrap(); // a JSON string is a TOML string
    let k = &c.kafka;
    let cap = &c.features.capacity;
    format!(
        "[kafka]\n\
         brokers = {}\n\
         group_id = {}\n\
         event_topics = [{}]\n\
         item_topic = {}\n\
         user_topic = {}\n\
         dead_letter_topic = {}\n\
         handover_topic = {}\n\
         commit_interval_ms = {}\n\
         statistics_interval_ms = {}\n\
         session_timeout_ms = {}\n\
         \n\
         [train]\n\
         batch_size = {}\n\
         max_wait_ms = {}\n\
         estimator_buckets = {}\n\
         \n\
         [model]\n\
         tower_dims = {:?}\n\
         \n\
         [features]\n\
         default_capacity = {}\n\
         \n\
         [features.capacity]\n\
         user_id = {}\n\
         item_id = {}\n\
         zip = {}\n\
         \n\
         [index]\n\
         refresh_interval_ms = {}\n\
         \n\
         [serve]\n\
         listen = {}\n\
         \n\
         [checkpoint]\n\
         dir = {}\n\
         every_steps = {}\n\
         every_secs = {}\n\
         keep = {}\n",
        s(&k.brokers),
        s(&k.group_id),
        s(&k.event_topics[0]),
        s(&k.item_topic),
        s(&k.user_topic),
        s(&k.dead_letter_topic),
        s(&k.handover_topic),
        k.commit_interval_ms,
        k.statistics_interval_ms,
        k.session_timeout_ms,
        c.train.batch_size,
        c.train.max_wait_ms,
        c.train.estimator_buckets,
        c.model.tower_dims,
        c.features.default_capacity,
        cap["user_id"],
        cap["item_id"],
        cap["zip"],
        c.index.refresh_interval_ms,
        s(&c.serve.listen),
        s(c.checkpoint.dir.to_str().expect("UTF-8 temp path")),
        c.checkpoint.every_steps,
        c.checkpoint.every_secs,
        c.checkpoint.keep,
    )
}

/// `towerstream run` in a child process; SIGKILLed if the test fails while it runs.
struct Service {
    name: &'static str,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn spawn(name: &'static str, config_path: &Path) -> Service {
        let mut cmd = towerstream_command(&[
            std::ffi::OsStr::new("--config"),
            config_path.as_os_str(),
            std::ffi::OsStr::new("run"),
        ]);
        let mut child = cmd.spawn().expect("spawn towerstream run");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let seen = stdout.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let err = BufReader::new(child.stderr.take().unwrap());
        let seen = stderr.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        });
        eprintln!("[{name}] started pid {}", child.id());
        Service {
            name,
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// The API address from the start-up line on stdout.
    async fn api_addr(&mut self) -> SocketAddr {
        const PREFIX: &str = "recall API on http://";
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("[{}] no start-up line in time", self.name))
                .unwrap_or_else(|| panic!("[{}] exited before listening", self.name));
            if let Some(rest) = line.strip_prefix(PREFIX) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
            }
        }
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: a signal to the child this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit, then for the end of its stdout; returns the status and the run's
    /// summary line.
    async fn wait_exit(&mut self) -> (ExitStatus, Duration, RunSummary) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                started.elapsed() < EXIT_TIMEOUT,
                "[{}] still running {EXIT_TIMEOUT:?} after SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let took = started.elapsed();
        // The reader thread sees EOF once the process is gone.
        while tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("stdout closes after exit")
            .is_some()
        {}
        let line = self
            .stdout
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("trained "))
            .cloned()
            .unwrap_or_else(|| panic!("[{}] printed no summary line ({status})", self.name));
        (status, took, RunSummary::parse(&line))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill(); // SIGKILL to the pid spawned above
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let out = self.stdout.lock().map(|l| l.join("\n")).unwrap_or_default();
            let err = self
                .stderr
                .lock()
                .map(|l| {
                    let from = l.len().saturating_sub(80);
                    l[from..].join("\n")
                })
                .unwrap_or_default();
            eprintln!(
                "--- [{}] stdout ---\n{out}\n--- [{}] stderr (tail) ---\n{err}",
                self.name, self.name
            );
        }
    }
}

/// "trained N examples in S steps this run (global step G); last checkpoint Some(\"…\")"
#[derive(Debug)]
struct RunSummary {
    examples: u64,
    steps: u64,
    global_step: i64,
    last_checkpoint: Option<PathBuf>,
}

impl RunSummary {
    fn parse(line: &str) -> RunSummary {
        let parse = || -> Option<RunSummary> {
            let rest = line.strip_prefix("trained ")?;
            let (examples, rest) = rest.split_once(" examples in ")?;
            let (steps, rest) = rest.split_once(" steps this run (global step ")?;
            let (global_step, rest) = rest.split_once("); last checkpoint ")?;
            let last_checkpoint = match rest {
                "None" => None,
                some => Some(PathBuf::from(
                    some.strip_prefix("Some(\"")?.strip_suffix("\")")?,
                )),
            };
            Some(RunSummary {
                examples: examples.parse().ok()?,
                steps: steps.parse().ok()?,
                global_step: global_step.parse().ok()?,
                last_checkpoint,
            })
        };
        parse().unwrap_or_else(|| panic!("unexpected summary line {line:?}"))
    }
}

/// A plain HTTP/1.0 GET: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} timed out"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// Sum of every series of the metric `name` in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Polls `/metrics` until this process has trained exactly `n` examples (never more).
async fn wait_trained(addr: SocketAddr, n: u64) {
    let deadline = Instant::now() + TRAIN_TIMEOUT;
    loop {
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let trained = metric_sum(&body, "towerstream_train_examples_total") as u64;
        assert!(
            trained <= n,
            "trained {trained} examples, only {n} new ones exist"
        );
        if trained == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "trained {trained} of {n} examples in {TRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The served model's version (global step), once a generation is served.
async fn served_model_version(addr: SocketAddr) -> i64 {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let (status, body) = get(addr, "/v1/model").await;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON model info");
            return v["model_version"].as_i64().expect("model_version");
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "no generation served in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per event-topic partition: the group's committed offset (`None`: nothing committed) and
/// the end offset (high watermark).
fn group_offsets(c: &Config) -> (Vec<Option<i64>>, Vec<i64>) {
    let consumer: BaseConsumer = client_config(&c.kafka)
        .set("group.id", &c.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topic = &c.kafka.event_topics[0];
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let committed = (0..PARTITIONS)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect();
    let ends = (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect();
    (committed, ends)
}

/// The checkpoint `summary` names is the only new one and holds the run's state: its step,
/// the lifetime example and click counts, and resume points at the partition ends, which the
/// group has committed too.
fn check_checkpoint(
    c: &Config,
    summary: &RunSummary,
    checkpoints_before: usize,
    total: u64,
    ends: &[i64],
) {
    let found = checkpoint::list(&c.checkpoint.dir).expect("list checkpoints");
    assert_eq!(
        found.len(),
        checkpoints_before + 1,
        "exactly one checkpoint per run (the shutdown's): {found:?}"
    );
    assert_eq!(found[0].step, summary.global_step, "{found:?}");
    let path = summary
        .last_checkpoint
        .as_ref()
        .expect("the run names its checkpoint");
    assert_eq!(&found[0].path, path);

    let (trainer, resume) = checkpoint::load(path, c).expect("load the checkpoint");
    assert_eq!(trainer.global_step(), summary.global_step);
    assert_eq!(trainer.examples_trained(), total);
    assert_eq!(trainer.pool().total_clicks(), total, "every click once");

    let topic = &c.kafka.event_topics[0];
    let mut expected = BTreeMap::new();
    for (p, end) in (0..PARTITIONS).zip(ends) {
        expected.insert((topic.clone(), p), *end);
    }
    let stored: BTreeMap<(String, i32), i64> =
        resume.iter().map(|(k, r)| (k.clone(), r.offset)).collect();
    assert_eq!(
        stored, expected,
        "checkpoint resume offsets = partition ends"
    );
    for (key, r) in &resume {
        assert_eq!(
            r.consumed_until, r.offset,
            "{key:?}: nothing consumed beyond"
        );
        assert!(
            r.unapplied.is_empty(),
            "{key:?}: {:?} unapplied",
            r.unapplied
        );
    }
    let (committed, ends_now) = group_offsets(c);
    assert_eq!(ends_now, ends, "nothing was produced meanwhile");
    let ends_some: Vec<Option<i64>> = ends.iter().map(|e| Some(*e)).collect();
    assert_eq!(committed, ends_some, "committed offsets = partition ends");
}

fn clicks(world: &World, rng: &mut Rng, range: std::ops::Range<u64>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|n| {
            let (u, j) = world.sample_click(rng);
            let e = world.click_event(u, j, 1_000 * n as i64, n);
            (world.users[u].id.to_string(), e.to_json())
        })
        .collect()
}

fn table(events: Vec<Event>) -> Vec<(String, Vec<u8>)> {
    events
        .into_iter()
        .map(|e| (e.event_id().to_owned(), e.to_json()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_and_commits_and_a_restart_resumes_from_them() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let text = config_toml(&c);
    assert_eq!(
        Config::from_toml(&text).expect("the test's TOML parses"),
        c,
        "the file says what the test assumes:\n{text}"
    );
    let config_path = dir.path().join("towerstream.toml");
    std::fs::write(&config_path, &text).unwrap();
    create_topics(&c, PARTITIONS).await;

    let world = World::new(WorldConfig {
        users: 50,
        items: 80,
        ..WorldConfig::default()
    });
    let p = producer(&c.kafka).expect("producer");
    produce_all(&p, &c.kafka.item_topic, table(world.item_events()))
        .await
        .expect("produce items");
    produce_all(&p, &c.kafka.user_topic, table(world.user_events()))
        .await
        .expect("produce users");
    let mut rng = Rng::new(11);
    let topic = c.kafka.event_topics[0].clone();
    produce_all(&p, &topic, clicks(&world, &mut rng, 0..FIRST))
        .await
        .expect("produce the first clicks");
    let (committed, ends1) = group_offsets(&c);
    assert_eq!(ends1.iter().sum::<i64>(), FIRST as i64);
    assert!(
        ends1.iter().all(|e| *e > 0),
        "every partition has clicks: {ends1:?}"
    );
    assert!(committed.iter().all(Option::is_none), "a fresh group");

    // First life: a fresh model trains every click, then SIGTERM.
    let mut run1 = Service::spawn("run 1", &config_path);
    let addr = run1.api_addr().await;
    wait_trained(addr, FIRST).await;
    assert!(
        checkpoint::list(&c.checkpoint.dir).unwrap().is_empty(),
        "no checkpoint before the signal"
    );
    let (committed, _) = group_offsets(&c);
    assert!(
        committed.iter().all(Option::is_none),
        "no commit before the signal: {committed:?}"
    );
    eprintln!("[run 1] trained {FIRST} at {:?}; SIGTERM", t0.elapsed());
    run1.sigterm();
    let (status, took, s1) = run1.wait_exit().await;
    eprintln!("[run 1] exited {status} {took:?} after SIGTERM: {s1:?}");
    assert!(status.success(), "run 1 exited with {status}");
    assert_eq!(s1.examples, FIRST);
    assert!(s1.steps >= FIRST.div_ceil(64), "{s1:?}");
    assert_eq!(s1.global_step, s1.steps as i64, "a fresh model: {s1:?}");
    check_checkpoint(&c, &s1, 0, FIRST, &ends1);
    drop(run1);

    // More clicks while it is down; the second life restores and trains exactly those.
    produce_all(&p, &topic, clicks(&world, &mut rng, FIRST..FIRST + SECOND))
        .await
        .expect("produce the second clicks");
    let (_, ends2) = group_offsets(&c);
    assert_eq!(ends2.iter().sum::<i64>(), (FIRST + SECOND) as i64);

    let mut run2 = Service::spawn("run 2", &config_path);
    let addr = run2.api_addr().await;
    let version = served_model_version(addr).await;
    assert!(
        version >= s1.global_step,
        "the first generation serves model {version}, the checkpoint holds step {}",
        s1.global_step
    );
    wait_trained(addr, SECOND).await;
    let (committed, _) = group_offsets(&c);
    let ends1_some: Vec<Option<i64>> = ends1.iter().map(|e| Some(*e)).collect();
    assert_eq!(committed, ends1_some, "no commit before the signal");
    eprintln!("[run 2] trained {SECOND} at {:?}; SIGTERM", t0.elapsed());
    run2.sigterm();
    let (status, took, s2) = run2.wait_exit().await;
    eprintln!("[run 2] exited {status} {took:?} after SIGTERM: {s2:?}");
    assert!(status.success(), "run 2 exited with {status}");
    assert_eq!(s2.examples, SECOND, "only the new clicks: {s2:?}");
    assert_eq!(
        s2.global_step,
        s1.global_step + s2.steps as i64,
        "the global step continues from the checkpoint: {s2:?}"
    );
    check_checkpoint(&c, &s2, 1, FIRST + SECOND, &ends2);
    eprintln!("done in {:?}", t0.elapsed());
}
