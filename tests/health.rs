//! Health that tells the truth, against the real broker: a trainer whose training loop fails
//! (its checkpoint directory turned into a file, then a checkpoint falls due) answers
//! `/healthz` 503 naming the worker, reports `towerstream_worker_up{worker="train"} 0`, and
//! `towerstream run` exits non-zero naming it; a replica keeps following the catalogue and the
//! click histories through consumer errors (its event topic deleted and created again).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use towerstream::config::Config;
use towerstream::event::Id;
use towerstream::health::{self, WorkerState};
use towerstream::metrics::Metrics;
use towerstream::synth::World;
use towerstream::train::sampler::Rng;
use towerstream::{app, kafka, replica};

/// Generous bounds: the machine is slow and shares its cores with the broker.
const DEADLINE: Duration = Duration::from_secs(120);

/// A small service that checkpoints after every step into `dir/checkpoints` (not created yet).
fn trainer_config(test: &str, dir: &Path) -> Config {
    let mut c = service_config(test, &dir.join("checkpoints"));
    c.checkpoint.every_steps = 1;
    c.eval.prequential_every = 0;
    c
}

/// Where a directory should be, a file: every checkpoint write fails from now on.
fn break_checkpoints(c: &Config) {
    assert!(!c.checkpoint.dir.exists(), "no checkpoint written yet");
    std::fs::write(&c.checkpoint.dir, "not a directory").unwrap();
}

fn clicks(world: &World, n: u64) -> Vec<(Option<String>, Vec<u8>, Option<i32>)> {
    let mut rng = Rng::new(3);
    (0..n)
        .map(|i| {
            let (u, j) = world.sample_click(&mut rng);
            (
                Some(world.users[u].id.to_string()),
                world.click_event(u, j, now_ms(), i).to_json(),
                None,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_training_loop_fails_healthz_and_readyz_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = trainer_config("health", dir.path());
    let world = small_world(&c).await;
    let metrics = Metrics::new();
    let service = app::start(&c, &metrics).await.unwrap();
    let base = format!("http://{}", service.addr);
    let client = http_client();

    let (s, body) = http(&client, "GET", format!("{base}/healthz"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "ok");
    for w in [health::TRAIN, health::INGEST, health::REFRESH, health::API] {
        assert_eq!(body["workers"][w]["state"], "running", "{w}: {body}");
        let up = metric_value(&metrics, "towerstream_worker_up", &[("worker", w)]);
        assert_eq!(up, 1.0, "{w}");
    }

    break_checkpoints(&c);
    produce(&c, &c.kafka.event_topics[0], &clicks(&world, 200)).await;

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let body = loop {
        let (s, body) = http(&client, "GET", format!("{base}/healthz"), None).await;
        if s == 503 {
            break body;
        }
        assert_eq!(s, 200, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz still 200 {DEADLINE:?} after the checkpoint directory broke: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["status"], "failing", "{body}");
    let error = body["error"].as_str().expect("an error message");
    assert!(error.contains("worker train stopped"), "{body}");
    assert!(
        error.contains("checkpoints"),
        "the reason names the path: {body}"
    );
    assert_eq!(body["workers"]["train"]["state"], "failed", "{body}");
    let (s, ready) = http(&client, "GET", format!("{base}/readyz"), None).await;
    assert_eq!(s, 503, "{ready}");
    assert!(
        ready["error"].as_str().unwrap().contains("worker train"),
        "{ready}"
    );
    assert_eq!(
        metric_value(&metrics, "towerstream_worker_up", &[("worker", "train")]),
        0.0
    );
    assert_eq!(service.health.failed().await.worker, health::TRAIN);
    assert!(
        service.shutdown().await.is_err(),
        "the stop reports the failure"
    );
}

/// `config`'s keys that differ from the defaults, as the TOML file the binary reads.
fn config_toml(c: &Config) -> String {
    let s = |v: &str| serde_json::to_string(v).unwrap(); // a JSON string is a TOML string
    let k = &c.kafka;
    format!(
        "[kafka]\nbrokers = {}\ngroup_id = {}\nevent_topics = [{}]\nitem_topic = {}\n\
         user_topic = {}\ndead_letter_topic = {}\nhandover_topic = {}\ncommit_interval_ms = {}\n\
         statistics_interval_ms = {}\nsession_timeout_ms = {}\n\n\
         [train]\nbatch_size = {}\nmax_wait_ms = {}\n\n\
         [model]\ntower_dims = {:?}\n\n\
         [eval]\nprequential_every = {}\n\n\
         [index]\nrefresh_interval_ms = {}\n\n\
         [serve]\nlisten = {}\n\n\
         [checkpoint]\ndir = {}\nevery_steps = {}\n",
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
        c.model.tower_dims,
        c.eval.prequential_every,
        c.index.refresh_interval_ms,
        s(&c.serve.listen),
        s(c.checkpoint.dir.to_str().expect("UTF-8 temp path")),
        c.checkpoint.every_steps,
    )
}

/// `towerstream run` in a child process; SIGKILLed (by its own pid) if the test fails while
/// it runs.
struct Run {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    /// Starts `towerstream --failure-linger <linger> run` with a config like
    /// [`trainer_config`]'s and waits until its API listens; the world is published.
    async fn start(test: &str, dir: &Path, linger: u64) -> (Run, Config, World) {
        let c = trainer_config(test, dir);
        let text = config_toml(&c);
        assert_eq!(
            Config::from_toml(&text).expect("the test's TOML parses"),
            c,
            "the file says what the test assumes:\n{text}"
        );
        let config_path = dir.join("towerstream.toml");
        std::fs::write(&config_path, &text).unwrap();
        let world = small_world(&c).await;

        let linger = linger.to_string();
        let mut cmd = towerstream_command(&[
            std::ffi::OsStr::new("--config"),
            config_path.as_os_str(),
            std::ffi::OsStr::new("--failure-linger"),
            std::ffi::OsStr::new(&linger),
            std::ffi::OsStr::new("run"),
        ]);
        let mut child = cmd.spawn().expect("spawn towerstream run");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stderr_pipe = BufReader::new(child.stderr.take().unwrap());
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let seen = stderr.clone();
        let stderr_done = std::thread::spawn(move || {
            for line in stderr_pipe.lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        });
        let mut run = Run {
            child,
            addr: String::new(),
            stderr,
            stderr_done: Some(stderr_done),
        };
        let listening = tokio::task::spawn_blocking(move || {
            stdout.lines().map_while(Result::ok).find_map(|l| {
                let rest = l.strip_prefix("recall API on http://")?;
                Some(rest.split_whitespace().next()?.to_owned())
            })
        });
        run.addr = tokio::time::timeout(DEADLINE, listening)
            .await
            .expect("no start-up line in time")
            .unwrap()
            .expect("exited before listening");
        (run, c, world)
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: a signal to the child this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit; the status and the `Error: ` line of stderr.
    async fn wait_exit(&mut self, what: &str) -> (std::process::ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "towerstream run still running {DEADLINE:?} after {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // stderr is complete once the reader thread saw EOF (threads may log after the error).
        let done = self.stderr_done.take().expect("waited once");
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::task::spawn_blocking(move || done.join()),
        )
        .await
        .expect("stderr closes after exit")
        .unwrap()
        .unwrap();
        let lines = self.stderr.lock().unwrap().clone();
        let error = lines
            .iter()
            .find(|l| l.starts_with("Error: "))
            .cloned()
            .unwrap_or_else(|| panic!("no error line in stderr ({status})"));
        (status, error)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let err = self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default();
            eprintln!("--- towerstream run stderr ---\n{err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towerstream_run_exits_non_zero_naming_the_worker_when_training_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (mut run, c, world) = Run::start("health-run", dir.path(), 0).await;
    break_checkpoints(&c);
    produce(&c, &c.kafka.event_topics[0], &clicks(&world, 200)).await;
    let (status, error) = run.wait_exit("its training loop failed").await;
    assert!(!status.success(), "exited with {status}");
    assert!(error.contains("worker train stopped"), "{error}");
}

/// With a linger the failed process keeps reporting the failure — `/healthz` 503 and
/// `towerstream_worker_up{worker="train"} 0` on `/metrics` — until SIGTERM, then exits
/// non-zero all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towerstream_run_reports_the_failure_while_it_lingers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut run, c, world) = Run::start("health-linger", dir.path(), 600).await;
    let base = format!("http://{}", run.addr);
    let client = http_client();
    break_checkpoints(&c);
    produce(&c, &c.kafka.event_topics[0], &clicks(&world, 200)).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (s, body) = http(&client, "GET", format!("{base}/healthz"), None).await;
        if s == 503 {
            assert_eq!(body["workers"]["train"]["state"], "failed", "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz still {s} {DEADLINE:?} after the checkpoint directory broke: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, text) = http(&client, "GET", format!("{base}/metrics"), None).await;
    assert_eq!(s, 200);
    let text = text.as_str().expect("Prometheus text");
    assert!(
        text.lines()
            .any(|l| l == r#"towerstream_worker_up{worker="train"} 0"#),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l == r#"towerstream_worker_up{worker="api"} 1"#));
    run.sigterm();
    let (status, error) = run.wait_exit("SIGTERM").await;
    assert!(!status.success(), "exited with {status}");
    assert!(error.contains("worker train stopped"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_following_through_consumer_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = service_config("replica-health", dir.path());
    c.replication.topic = format!("gen-{}", c.kafka.group_id);
    let world = small_world(&c).await;
    let metrics = Metrics::new();
    let replica = replica::start(&c, &metrics).await.unwrap();
    let base = format!("http://{}", replica.addr);
    let client = http_client();
    let errors = |m: &Metrics| {
        metric_value(
            m,
            "towerstream_replica_consumer_errors_total",
            &[("source", "events")],
        )
    };
    assert_eq!(errors(&metrics), 0.0);

    // The event topic disappears: the events consumer reports errors (after librdkafka's next
    // metadata refresh).
    let topic = c.kafka.event_topics[0].clone();
    kafka::delete_topics(&c.kafka, &[&topic]).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while errors(&metrics) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no consumer error reported {DEADLINE:?} after the topic was deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The catalogue still follows its topic.
    add_fresh_item_delete_i0(&c).await;
    let fresh = Id::new("fresh-item");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while replica.catalog.read().unwrap().item(&fresh).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the catalogue froze after the consumer error"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The topic comes back: new clicks reach the histories again. The consumer starts the
    // new topic at its end, wherever that is when it notices, so clicks go on until one lands.
    create_topics(&c, 2).await;
    let user = world.users[0].id.clone();
    let item = world.items[1].id.clone();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for i in 0u64.. {
        let seen = replica
            .histories
            .read()
            .unwrap()
            .get(&user)
            .any(|x| *x == item);
        if seen {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the click histories never resumed after the topic came back"
        );
        let click = world.click_event(0, 1, now_ms(), 10_000 + i);
        produce(
            &c,
            &topic,
            &[(Some(user.to_string()), click.to_json(), None)],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (s, body) = http(&client, "GET", format!("{base}/healthz"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        replica.health.workers()[health::CONTEXT],
        WorkerState::Running
    );
    assert_eq!(
        metric_value(&metrics, "towerstream_worker_up", &[("worker", "context")]),
        1.0
    );
    replica.shutdown().await.unwrap();
}
