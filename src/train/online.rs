//! The online loop: micro-batches from ingestion, one step each, acknowledgements after the
//! step, checkpoints on a schedule and at shutdown.
//!
//! [`start`] is the trainer's whole life: restore the newest checkpoint (or start fresh from
//! the beginning of the topics), start ingestion at the checkpoint's resume points, and train
//! until shutdown. Graceful shutdown finishes the batch in hand, acknowledges it, writes a
//! checkpoint, and only then stops ingestion, whose final commit then matches the checkpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, CheckpointError};
use super::trainer::{StepReport, Trainer};
use crate::batch::next_batch;
use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::example::Origin;
use crate::features::history::SharedHistories;
use crate::health::{self, Health};
use crate::ingest::{self, IngestError, IngestHandle, IngestOptions};
use crate::metrics::Metrics;

/// Failures that stop training.
#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
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

enum Wait {
    Batch(Vec<crate::example::TrainingExample>),
    Idle,
    Stop,
}

/// A started trainer: its task and the state it shares with serving.
pub struct Started {
    /// The loop; resolves when it stops.
    pub task: JoinHandle<Result<Summary, OnlineError>>,
    /// The catalogue ingestion keeps.
    pub catalog: SharedCatalog,
    /// The users' recent clicks the trainer keeps.
    pub histories: SharedHistories,
}

/// Restores the newest checkpoint (or builds a fresh model), starts ingestion from the
/// checkpoint's positions, and spawns the loop. `catalog` is filled by ingestion (pass the
/// one `after_step` reads). The loop and ingestion register in `health` as
/// [`health::TRAIN`] and [`health::INGEST`].
pub async fn start(
    config: &Config,
    metrics: &Metrics,
    stop: Stop,
    hooks: Hooks,
    catalog: SharedCatalog,
    health: &Health,
) -> Result<Started, OnlineError> {
    let dir = config.checkpoint.dir.clone();
    let restored = {
        let (dir, config) = (dir.clone(), config.clone());
        tokio::task::spawn_blocking(move || checkpoint::load_latest(&dir, &config))
            .await
            .map_err(|e| OnlineError::Task(e.to_string()))??
    };
    let (trainer, options, restored_from) = match restored {
        Some((trainer, resume, found)) => {
            tracing::info!(path = %found.path.display(), step = found.step, "restored checkpoint");
            (
                trainer,
                IngestOptions {
                    resume,
                    ..Default::default()
                },
                Some(found.path),
            )
        }
        None => {
            tracing::info!(dir = %dir.display(), "no checkpoint: fresh model, topics from the beginning");
            (
                Trainer::new(config),
                IngestOptions {
                    from_beginning: true,
                    ..Default::default()
                },
                None,
            )
        }
    };
    let trainer = trainer.with_metrics(metrics.train.clone());
    let histories = trainer.histories();
    let ingest_stop = CancellationToken::new();
    let options = IngestOptions {
        catalog: Some(catalog.clone()),
        health: health.clone(),
        ..options
    };
    let handle = ingest::spawn(config, metrics, options, ingest_stop.clone()).await?;
    let config = config.clone();
    let metrics = metrics.clone();
    let rt = tokio::runtime::Handle::current();
    let nice = config.train.nice;
    let worker = health.register(health::TRAIN);
    let done = crate::priority::spawn("towerstream-trainer", nice, move || {
        worker.run(|| {
            run(
                trainer,
                handle,
                ingest_stop,
                &config,
                &metrics,
                stop,
                hooks,
                rt,
                restored_from,
            )
        })
    })
    .map_err(|e| OnlineError::Task(format!("cannot start the training thread: {e}")))?;
    let task = tokio::spawn(async move {
        done.await
            .unwrap_or_else(|_| Err(OnlineError::Task("the training thread panicked".into())))
    });
    Ok(Started {
        task,
        catalog,
        histories,
    })
}

#[allow(clippy::too_many_arguments)]
fn run(
    mut trainer: Trainer,
    mut ingest: IngestHandle,
    ingest_stop: CancellationToken,
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
        let batch = rt.block_on(async {
            tokio::select! {
                biased;
                _ = stop.abort.cancelled() => Wait::Stop,
                _ = tokio::time::sleep(IDLE_TICK) => Wait::Idle,
                b = next_batch(&mut ingest.examples, t.batch_size, max_wait, &stop.graceful) => {
                    b.map_or(Wait::Stop, Wait::Batch)
                }
            }
        });
        let batch = match batch {
            Wait::Stop => break,
            Wait::Idle => {
                // No data: still let the hook run, so the last steps reach a generation.
                if let Some(f) = after_step.as_mut() {
                    f(&mut trainer, &StepReport::idle());
                }
                continue;
            }
            Wait::Batch(b) => b,
        };
        if let Some(f) = before_step.as_mut() {
            f(&trainer, &batch);
        }
        let report = {
            let catalog = catalog.read().unwrap_or_else(|p| p.into_inner());
            trainer.step(&batch, &catalog)
        };
        if report.loss.is_nan() && !report.skipped {
            tracing::error!(step = trainer.global_step(), "loss is NaN");
        }
        origins.clear();
        origins.extend(batch.iter().map(|e| e.origin));
        ingest.acker.ack(&origins);
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
            write_checkpoint(&trainer, &ingest, config, metrics, &mut summary)?;
            last_checkpoint = Instant::now();
            steps_since_checkpoint = 0;
        }
    }
    summary.global_step = trainer.global_step();
    summary.total_clicks = trainer.pool().total_clicks();
    if stop.abort.is_cancelled() {
        summary.aborted = true;
        ingest.task.abort();
        let _ = rt.block_on(&mut ingest.task);
        return Ok(summary);
    }
    write_checkpoint(&trainer, &ingest, config, metrics, &mut summary)?;
    ingest_stop.cancel();
    rt.block_on(&mut ingest.task)
        .map_err(|e| OnlineError::Task(e.to_string()))??;
    tracing::info!(
        steps = summary.steps,
        examples = summary.examples,
        "training stopped"
    );
    Ok(summary)
}

fn write_checkpoint(
    trainer: &Trainer,
    ingest: &IngestHandle,
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
