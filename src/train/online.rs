//! The online loop: micro-batches from ingestion, one step each, acknowledgements after the
//! step, checkpoints on a schedule and at shutdown.
//!
//! [`restore`] loads the newest checkpoint (or a fresh model); [`spawn`] runs the loop on a
//! [`Feed`] from ingestion until shutdown. The loop neither starts nor stops ingestion —
//! `app::start_training` wires the two. A graceful stop finishes the batch in hand, acknowledges
//! it and writes a checkpoint; the caller then stops ingestion, whose final commit matches it.
//! Each step holds the offset tracker's step lock from dropping examples of revoked partitions
//! to acknowledging the rest, so a rebalance never races a step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, CheckpointError};
use super::ledger::Ledger;
use super::trainer::{StepReport, Trainer};
use crate::batch::{next_batch, Wait};
use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::example::Origin;
use crate::example::TrainingExample;
use crate::health::{self, Health};
use crate::ingest::offsets::ResumeMap;
use crate::ingest::{Acker, IngestError};
use crate::metrics::Metrics;

/// Failures that stop training.
#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    /// The trained-examples ledger (`checkpoint.ledger`) could not be written.
    #[error("ledger {path}: {source}")]
    Ledger {
        /// The configured file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Ingestion could not start or failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A task panicked or was cancelled.
    #[error("training task failed: {0}")]
    Task(String),
}

/// How to stop the loop.
#[derive(Clone, Default)]
pub struct Stop {
    /// Finish the batch, checkpoint, stop ingestion, commit.
    pub graceful: CancellationToken,
    /// Stop at once: no checkpoint, no final commit (what a crash leaves behind).
    pub abort: CancellationToken,
}

/// What a finished loop did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Steps taken in this run.
    pub steps: u64,
    /// Examples trained in this run.
    pub examples: u64,
    /// Checkpoints written in this run.
    pub checkpoints: u64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Global step at the end.
    pub global_step: i64,
    /// Clicks counted by the model over its whole life (all runs).
    pub total_clicks: u64,
    /// True when stopped by [`Stop::abort`].
    pub aborted: bool,
    /// The checkpoint this run started from.
    pub restored_from: Option<PathBuf>,
}

/// Called once before the first step and after every step with the trainer (e.g. to hand the
/// refresher the model's changes), and every [`IDLE_TICK`] while no data arrives (those calls
/// get [`StepReport::idle`]).
pub type AfterStep = Box<dyn FnMut(&mut Trainer, &StepReport) + Send>;

/// Called with each batch just before it is trained on (e.g. prequential evaluation).
pub type BeforeStep = Box<dyn FnMut(&Trainer, &[crate::example::TrainingExample]) + Send>;

/// What the loop calls around steps.
#[derive(Default)]
pub struct Hooks {
    /// Before each step, with the batch.
    pub before_step: Option<BeforeStep>,
    /// After each step (and on idle ticks).
    pub after_step: Option<AfterStep>,
}

impl Hooks {
    /// Only an after-step hook.
    pub fn after(f: AfterStep) -> Hooks {
        Hooks {
            before_step: None,
            after_step: Some(f),
        }
    }
}

/// How long the loop waits for a first example before calling the hook anyway.
pub const IDLE_TICK: Duration = Duration::from_millis(500);

/// What the loop takes from ingestion: the examples, where to acknowledge them, and the
/// catalogue the negative pool follows.
pub struct Feed {
    /// The bounded stream of examples.
    pub examples: tokio::sync::mpsc::Receiver<TrainingExample>,
    /// Acknowledgements back to the offset tracker.
    pub acker: Acker,
    /// Catalogue and profiles.
    pub catalog: SharedCatalog,
}

/// Restores the newest checkpoint in `checkpoint.dir`, or builds a fresh model when there is
/// none; returns the trainer, the resume points to start ingestion from (`None`: fresh, read
/// the topics from the beginning) and the checkpoint's path.
pub async fn restore(config: &Config) -> Result<Restored, OnlineError> {
    let dir = config.checkpoint.dir.clone();
    let found = {
        let (dir, config) = (dir.clone(), config.clone());
        tokio::task::spawn_blocking(move || checkpoint::load_latest(&dir, &config))
            .await
            .map_err(|e| OnlineError::Task(e.to_string()))??
    };
    Ok(match found {
        Some((trainer, resume, found)) => {
            tracing::info!(path = %found.path.display(), step = found.step, "restored checkpoint");
            Restored {
                trainer,
                resume: Some(resume),
                from: Some(found.path),
            }
        }
        None => {
            tracing::info!(dir = %dir.display(), "no checkpoint: fresh model, topics from the beginning");
            Restored {
                trainer: Trainer::new(config),
                resume: None,
                from: None,
            }
        }
    })
}

/// A model to train on: restored from a checkpoint, or fresh.
pub struct Restored {
    /// The model and its state.
    pub trainer: Trainer,
    /// The checkpoint's resume points (`None` for a fresh model).
    pub resume: Option<ResumeMap>,
    /// The checkpoint it came from.
    pub from: Option<PathBuf>,
}

/// Spawns the loop on its own thread (registered as [`health::TRAIN`]). The returned task
/// resolves after the final checkpoint (graceful stop) or at once (abort); stopping ingestion
/// afterwards is the caller's, so its final commit matches the checkpoint.
pub fn spawn(
    restored: Restored,
    feed: Feed,
    config: &Config,
    metrics: &Metrics,
    stop: Stop,
    hooks: Hooks,
    health: &Health,
) -> Result<JoinHandle<Result<Summary, OnlineError>>, OnlineError> {
    let trainer = restored.trainer.with_metrics(metrics.train.clone());
    let (config, metrics) = (config.clone(), metrics.clone());
    let rt = tokio::runtime::Handle::current();
    let nice = config.train.nice;
    let worker = health.register(health::TRAIN);
    let from = restored.from;
    let done = crate::priority::spawn("towerstream-trainer", nice, move || {
        worker.run(|| run(trainer, feed, &config, &metrics, stop, hooks, rt, from))
    })
    .map_err(|e| OnlineError::Task(format!("cannot start the training thread: {e}")))?;
    Ok(tokio::spawn(async move {
        done.await
            .unwrap_or_else(|_| Err(OnlineError::Task("the training thread panicked".into())))
    }))
}

#[allow(clippy::too_many_arguments)]
fn run(
    mut trainer: Trainer,
    mut ingest: Feed,
    config: &Config,
    metrics: &Metrics,
    stop: Stop,
    hooks: Hooks,
    rt: tokio::runtime::Handle,
    restored_from: Option<PathBuf>,
) -> Result<Summary, OnlineError> {
    let t = &config.train;
    let cp = &config.checkpoint;
    let max_wait = Duration::from_millis(t.max_wait_ms);
    let mut summary = Summary {
        restored_from,
        ..Default::default()
    };
    let mut last_checkpoint = Instant::now();
    let mut steps_since_checkpoint = 0u64;
    let (mut window_start, mut window_examples) = (Instant::now(), 0u64);
    let catalog = Arc::clone(&ingest.catalog);
    let mut origins: Vec<Origin> = Vec::with_capacity(t.batch_size);
    let mut ledger = open_ledger(config, trainer.global_step())?;
    let Hooks {
        mut before_step,
        mut after_step,
    } = hooks;
    // Let the hook see the model before the first step: a refresher takes its one full copy
    // now, while nothing waits for training.
    if let Some(f) = after_step.as_mut() {
        f(&mut trainer, &StepReport::idle());
    }
    loop {
        if stop.abort.is_cancelled() {
            break;
        }
        // Only an abort (a simulated crash) may drop a batch in hand; the idle tick is part of
        // `next_batch`, which never gives up on examples it has taken.
        let batch = rt.block_on(async {
            tokio::select! {
                biased;
                _ = stop.abort.cancelled() => Wait::Closed,
                w = next_batch(&mut ingest.examples, t.batch_size, max_wait, IDLE_TICK, &stop.graceful) => w,
            }
        });
        let batch = match batch {
            Wait::Closed => break,
            Wait::Idle => {
                // No data: still let the hook run, so the last steps reach a generation.
                if let Some(f) = after_step.as_mut() {
                    f(&mut trainer, &StepReport::idle());
                }
                continue;
            }
            Wait::Batch(b) => b,
        };
        let mut batch = batch;
        // From here to the acknowledgement no revocation can commit: examples of partitions
        // revoked while they waited are dropped now (their next owner re-reads them), the
        // rest are trained and acknowledged before a revocation may hand their partition on.
        let step_guard = ingest.acker.begin_step(&mut batch);
        if batch.is_empty() {
            continue;
        }
        if let Some(f) = before_step.as_mut() {
            f(&trainer, &batch);
        }
        let report = trainer.step_shared(&batch, &catalog);
        if let Some(l) = ledger.as_mut() {
            l.step(trainer.global_step(), &batch)
                .map_err(|e| ledger_error(config, e))?;
        }
        origins.clear();
        origins.extend(batch.iter().map(|e| e.origin));
        ingest.acker.ack(&origins);
        drop(step_guard);
        summary.steps += 1;
        summary.examples += batch.len() as u64;
        steps_since_checkpoint += 1;
        window_examples += batch.len() as u64;
        if window_start.elapsed() >= Duration::from_secs(2) {
            metrics
                .train
                .examples_per_second
                .set(window_examples as f64 / window_start.elapsed().as_secs_f64());
            (window_start, window_examples) = (Instant::now(), 0);
        }
        if let Some(f) = after_step.as_mut() {
            f(&mut trainer, &report);
        }
        let due = (cp.every_steps > 0 && steps_since_checkpoint >= cp.every_steps)
            || (cp.every_secs > 0
                && last_checkpoint.elapsed() >= Duration::from_secs(cp.every_secs));
        if due {
            sync_ledger(&mut ledger, config)?;
            write_checkpoint(&trainer, &ingest, config, metrics, &mut summary)?;
            last_checkpoint = Instant::now();
            steps_since_checkpoint = 0;
        }
    }
    summary.global_step = trainer.global_step();
    summary.total_clicks = trainer.pool().total_clicks();
    if stop.abort.is_cancelled() {
        summary.aborted = true;
        return Ok(summary);
    }
    sync_ledger(&mut ledger, config)?;
    write_checkpoint(&trainer, &ingest, config, metrics, &mut summary)?;
    tracing::info!(
        steps = summary.steps,
        examples = summary.examples,
        "training stopped"
    );
    Ok(summary)
}

fn open_ledger(config: &Config, restored_step: i64) -> Result<Option<Ledger>, OnlineError> {
    let path = &config.checkpoint.ledger;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    Ledger::open(path, restored_step, &config.kafka.event_topics)
        .map(Some)
        .map_err(|e| ledger_error(config, e))
}

fn sync_ledger(ledger: &mut Option<Ledger>, config: &Config) -> Result<(), OnlineError> {
    // Every step a checkpoint holds must be on disk in the ledger before the checkpoint is.
    match ledger.as_mut() {
        Some(l) => l.sync().map_err(|e| ledger_error(config, e)),
        None => Ok(()),
    }
}

fn ledger_error(config: &Config, source: std::io::Error) -> OnlineError {
    OnlineError::Ledger {
        path: config.checkpoint.ledger.clone(),
        source,
    }
}

fn write_checkpoint(
    trainer: &Trainer,
    ingest: &Feed,
    config: &Config,
    metrics: &Metrics,
    summary: &mut Summary,
) -> Result<(), OnlineError> {
    let started = Instant::now();
    let resume = ingest.acker.resume_points();
    let path = checkpoint::save(
        trainer,
        &resume,
        &config.checkpoint.dir,
        config.checkpoint.keep,
    )?;
    ingest.acker.checkpointed(&resume);
    metrics.train.checkpoints.inc();
    metrics
        .train
        .checkpoint_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.train.checkpoint_step.set(trainer.global_step());
    tracing::info!(path = %path.display(), step = trainer.global_step(), "checkpoint written");
    summary.checkpoints += 1;
    summary.last_checkpoint = Some(path);
    Ok(())
}
