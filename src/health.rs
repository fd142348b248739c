//! Liveness of the process's long-running workers, kept in one place.
//!
//! A worker that dies must not leave a healthy-looking process behind: every long-running
//! task or thread (the training loop, the ingest loop, the refresher, the publisher, the API;
//! a replica's context and generations followers) registers here when it starts, and the
//! [`Worker`] handle it runs under marks it stopped when it ends — with an error, a panic, or
//! a return nobody asked for — together with the reason. `/healthz` and `/readyz`, the
//! `towerstream_worker_up` gauge and the command line (which then exits non-zero, so an
//! orchestrator restarts the process even without probes) all read this one registry.
//!
//! Once [`Health::shutting_down`] is called, a worker that ends without an error stopped as
//! asked and is not a failure; an error is one at any time.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use prometheus::IntGaugeVec;
use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// The training loop (`run`, `train`).
pub const TRAIN: &str = "train";
/// The ingest loop: Kafka events to training examples (`run`, `train`).
pub const INGEST: &str = "ingest";
/// The refresher: model updates to index generations (`run`, `train`).
pub const REFRESH: &str = "refresh";
/// The generations publisher (`train`, or `replication.publish`).
pub const PUBLISH: &str = "publish";
/// The HTTP API (every serving process).
pub const API: &str = "api";
/// A replica's follower of the table and event topics (catalogue and click histories).
pub const CONTEXT: &str = "context";
/// A replica's follower of the generations topic.
pub const GENERATIONS: &str = "generations";

/// What a worker is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WorkerState {
    /// Started and not ended.
    Running,
    /// Ended as asked, during a shutdown.
    Stopped,
    /// Ended by an error, a panic or an unrequested return.
    Failed {
        /// Why it ended.
        reason: String,
    },
}

/// A worker that ended unexpectedly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The worker's name (one of this module's constants).
    pub worker: &'static str,
    /// Why it ended.
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} stopped: {}", self.worker, self.reason)
    }
}

/// The registry of the process's workers. Cheap to clone; clones share it.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    workers: Mutex<BTreeMap<&'static str, WorkerState>>,
    shutting_down: AtomicBool,
    /// Workers whose owner asked them to stop (outside a process shutdown).
    stop_requested: Mutex<std::collections::BTreeSet<&'static str>>,
    /// Failed workers in the order they failed: the first is the cause.
    failure_order: Mutex<Vec<&'static str>>,
    failed: Notify,
    /// `towerstream_worker_up`; absent for a registry without metrics (tests, tools).
    up: Option<IntGaugeVec>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("workers", &self.workers())
            .finish()
    }
}

impl Health {
    /// A registry that reports each worker's state as `towerstream_worker_up` in `metrics`.
    pub fn new(metrics: &Metrics) -> Health {
        Health {
            inner: Arc::new(Inner {
                up: Some(metrics.worker_up.clone()),
                ..Inner::default()
            }),
        }
    }

    /// Registers `worker` as running; run it under the returned handle so its end is seen.
    pub fn register(&self, worker: &'static str) -> Worker {
        self.set(worker, WorkerState::Running);
        Worker {
            health: self.clone(),
            name: worker,
            finished: false,
        }
    }

    /// A graceful shutdown has begun: workers ending without an error from now on stopped as
    /// asked.
    pub fn shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// `worker`'s owner asks it to stop (e.g. ingestion after the training loop ended): its
    /// clean end is a stop, not a failure.
    pub fn stop_requested(&self, worker: &'static str) {
        self.inner
            .stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker);
    }

    /// Every registered worker and its state.
    pub fn workers(&self) -> BTreeMap<&'static str, WorkerState> {
        self.lock().clone()
    }

    /// The workers that ended unexpectedly (none while the process is healthy).
    pub fn failures(&self) -> Vec<Failure> {
        let order = self
            .inner
            .failure_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let workers = self.lock();
        order
            .into_iter()
            .filter_map(|worker| match workers.get(worker) {
                Some(WorkerState::Failed { reason }) => Some(Failure {
                    worker,
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Resolves with the first failure, as soon as a worker has failed.
    pub async fn failed(&self) -> Failure {
        loop {
            let notified = self.inner.failed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a failure between the check and the await wakes it.
            notified.as_mut().enable();
            if let Some(f) = self.failures().into_iter().next() {
                return f;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, WorkerState>> {
        self.inner.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, worker: &'static str, state: WorkerState) {
        let (up, failed) = match &state {
            WorkerState::Running => (1, false),
            WorkerState::Stopped => (0, false),
            WorkerState::Failed { .. } => (0, true),
        };
        self.lock().insert(worker, state);
        if failed {
            let mut order = self
                .inner
                .failure_order
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !order.contains(&worker) {
                order.push(worker);
            }
        }
        if let Some(g) = &self.inner.up {
            g.with_label_values(&[worker]).set(up);
        }
        if failed {
            self.inner.failed.notify_waiters();
        }
    }

    /// Records the end of `worker`: `failure` is the error it ended with, if any.
    fn ended(&self, worker: &'static str, failure: Option<String>) {
        let shutting_down = self.inner.shutting_down.load(Ordering::SeqCst)
            || self
                .inner
                .stop_requested
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(worker);
        let state = match failure {
            Some(reason) => WorkerState::Failed { reason },
            None if shutting_down => WorkerState::Stopped,
            None => WorkerState::Failed {
                reason: "returned without a shutdown request".into(),
            },
        };
        if let WorkerState::Failed { reason } = &state {
            tracing::error!(worker, reason = %reason, "worker stopped");
        }
        self.set(worker, state);
    }
}

/// How a worker's result tells an error from a normal end.
pub trait Outcome {
    /// The error it ended with, if any.
    fn failure(&self) -> Option<String>;
}

impl Outcome for () {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl<T, E: fmt::Display> Outcome for Result<T, E> {
    fn failure(&self) -> Option<String> {
        self.as_ref().err().map(ToString::to_string)
    }
}

/// A registered worker: run its body under [`Worker::watch`] (a future) or [`Worker::run`]
/// (a thread's closure). Dropped before either finished (the task was cancelled, the thread
/// never started), it counts as a worker that ended without an error.
pub struct Worker {
    health: Health,
    name: &'static str,
    finished: bool,
}

impl Worker {
    /// Awaits `body` and records how it ended; a panic is recorded with its message and then
    /// resumed, so the task's join handle still sees it.
    pub async fn watch<F>(mut self, body: F) -> F::Output
    where
        F: Future,
        F::Output: Outcome,
    {
        let result = AssertUnwindSafe(body).catch_unwind().await;
        self.finish(result)
    }

    /// Runs `body` on the calling thread and records how it ended, as [`Worker::watch`] does.
    pub fn run<T: Outcome>(mut self, body: impl FnOnce() -> T) -> T {
        let result = std::panic::catch_unwind(AssertUnwindSafe(body));
        self.finish(result)
    }

    fn finish<T: Outcome>(&mut self, result: Result<T, Box<dyn Any + Send>>) -> T {
        self.finished = true;
        match result {
            Ok(out) => {
                self.health.ended(self.name, out.failure());
                out
            }
            Err(panic) => {
                let reason = format!("panicked: {}", panic_message(panic.as_ref()));
                self.health.ended(self.name, Some(reason));
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.finished {
            self.health.ended(self.name, None);
        }
    }
}

/// The message a panic was raised with.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(m: &Metrics, worker: &str) -> i64 {
        m.worker_up.with_label_values(&[worker]).get()
    }

    #[test]
    fn a_registered_worker_is_up_and_running() {
        let m = Metrics::new();
        let h = Health::new(&m);
        let _w = h.register(TRAIN);
        assert_eq!(h.workers()[TRAIN], WorkerState::Running);
        assert_eq!(up(&m, TRAIN), 1);
        assert!(h.failures().is_empty());
    }

    /// The training loop fails, then its owner stops ingestion: the cause is reported first
    /// (not the alphabetically first worker) and the requested stop is no failure.
    #[test]
    fn the_first_failure_is_the_cause_and_a_requested_stop_is_none() {
        let h = Health::default();
        let ingest = h.register(INGEST);
        let _: Result<(), &str> = h.register(TRAIN).run(|| Err("checkpoint write failed"));
        h.stop_requested(INGEST);
        ingest.run(|| ());
        assert_eq!(h.workers()[INGEST], WorkerState::Stopped);
        let _: Result<(), &str> = h.register(API).run(|| Err("later"));
        let f = h.failures();
        assert_eq!((f[0].worker, f[1].worker), (TRAIN, API), "{f:?}");
    }

    #[test]
    fn an_error_fails_the_worker_with_its_message_even_during_shutdown() {
        let m = Metrics::new();
        let h = Health::new(&m);
        let out: Result<(), String> = h.register(TRAIN).run(|| Err("disk full".into()));
        assert!(out.is_err());
        assert_eq!(
            h.failures(),
            vec![Failure {
                worker: TRAIN,
                reason: "disk full".into()
            }]
        );
        assert_eq!(up(&m, TRAIN), 0);
        h.shutting_down();
        let _: Result<(), &str> = h.register(INGEST).run(|| Err("broken"));
        assert_eq!(h.failures().len(), 2);
    }

    #[test]
    fn a_panicking_thread_fails_the_worker_and_the_panic_goes_on() {
        let h = Health::default();
        let w = h.register(REFRESH);
        let joined =
            std::thread::spawn(move || w.run(|| -> () { panic!("index exploded") })).join();
        assert!(joined.is_err(), "the thread still panics");
        let f = &h.failures()[0];
        assert_eq!(f.worker, REFRESH);
        assert_eq!(f.reason, "panicked: index exploded");
    }

    #[tokio::test]
    async fn a_panicking_task_fails_the_worker_and_its_handle_sees_the_panic() {
        let h = Health::default();
        let w = h.register(CONTEXT);
        let n = 3;
        let task = tokio::spawn(w.watch(async move {
            if n == 3 {
                panic!("bad offset {n}");
            }
        }));
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(h.failures()[0].reason, "panicked: bad offset 3");
    }

    #[test]
    fn a_return_fails_the_worker_unless_a_shutdown_began() {
        let m = Metrics::new();
        let h = Health::new(&m);
        h.register(PUBLISH).run(|| ());
        assert_eq!(
            h.failures()[0].reason,
            "returned without a shutdown request"
        );
        let h = Health::new(&Metrics::new());
        let w = h.register(API);
        h.shutting_down();
        w.run(|| ());
        drop(h.register(GENERATIONS)); // cancelled during the shutdown
        assert!(h.failures().is_empty(), "{:?}", h.workers());
        assert_eq!(h.workers()[API], WorkerState::Stopped);
        assert_eq!(h.workers()[GENERATIONS], WorkerState::Stopped);
    }

    #[tokio::test]
    async fn failed_resolves_once_a_worker_fails() {
        let h = Health::default();
        let w = h.register(TRAIN);
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.failed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _: Result<(), &str> = w.watch(async { Err("checkpoint") }).await;
        let f = waiting.await.unwrap();
        assert_eq!(f.to_string(), "worker train stopped: checkpoint");
        // Already failed: resolves at once.
        assert_eq!(h.failed().await.worker, TRAIN);
    }
}
