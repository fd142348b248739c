//! The whole service in one process: ingest → train → refresh → serve.
//!
//! With `replication.publish` (always so for `towerstream train`) every generation is also
//! shipped to the generations topic for serving replicas ([`crate::generations`]).
//!
//! [`start`] wires the stages: the trainer (with ingestion) hands model updates to the
//! refresher through a one-slot [`ModelFeed`], the refresher publishes generations into
//! [`Served`], and the HTTP API reads them. [`Service::shutdown`] stops the API, then training
//! (which finishes its batch, checkpoints and commits), then the refresher and the publisher.
//! Every stage registers in the service's [`Health`], which `/healthz` reports and
//! [`Health::failed`] resolves from when one of them stops unexpectedly.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::eval::prequential::Prequential;
use crate::features::history::SharedHistories;
use crate::generations::Publisher;
use crate::health::{self, Health};
use crate::ingest::{self, IngestHandle, IngestOptions};
use crate::metrics::Metrics;
use crate::refresh::{self, FreshnessSamples, GenerationSink, ModelFeed, Refresher, Served};
use crate::serve::api;
use crate::serve::{Context, ServeState};
use crate::train::online::{self, BeforeStep, Hooks, OnlineError, Stop, Summary};

/// Failures that keep the service from starting.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Training (or ingestion) could not start.
    #[error(transparent)]
    Online(#[from] OnlineError),
    /// The API could not bind.
    #[error(transparent)]
    Listen(#[from] api::ListenError),
    /// A worker thread could not be started.
    #[error("cannot start the refresher thread: {0}")]
    Thread(std::io::Error),
    /// The generations topic could not be set up (`replication.publish`).
    #[error("generations topic: {0}")]
    Publish(#[from] rdkafka::error::KafkaError),
}

/// A running service.
pub struct Service {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The served generation.
    pub served: Arc<Served>,
    /// Catalogue and profiles.
    pub catalog: SharedCatalog,
    /// Metrics.
    pub metrics: Metrics,
    /// Its workers: training, ingestion, refresher, publisher (when publishing), API.
    pub health: Health,
    stop: Stop,
    api_stop: CancellationToken,
    refresh_stop: CancellationToken,
    publish_stop: CancellationToken,
    publishing: Option<JoinHandle<Result<(), tokio::task::JoinError>>>,
    train: JoinHandle<Result<Summary, OnlineError>>,
    refresher: JoinHandle<()>,
    api: JoinHandle<std::io::Result<()>>,
}

/// The prequential check of each batch against the served generation (created on first use,
/// when the trainer's live histories are at hand).
fn prequential(
    config: &Config,
    served: &Arc<Served>,
    catalog: &SharedCatalog,
    metrics: &Metrics,
) -> BeforeStep {
    let (config, served, catalog, metrics) = (
        config.clone(),
        served.clone(),
        catalog.clone(),
        metrics.serve.clone(),
    );
    let mut check: Option<Prequential> = None;
    Box::new(move |trainer, batch| {
        check
            .get_or_insert_with(|| {
                Prequential::new(
                    config.eval.clone(),
                    served.clone(),
                    Context {
                        catalog: catalog.clone(),
                        histories: trainer.histories(),
                        default_k: config.serve.default_k,
                    },
                    Some(metrics.clone()),
                )
            })
            .observe(batch)
    })
}

/// A started trainer: its task and the state it shares with serving.
pub struct Training {
    /// Training, then ingestion's final commit; resolves when both stopped.
    pub task: JoinHandle<Result<Summary, OnlineError>>,
    /// The catalogue ingestion keeps.
    pub catalog: SharedCatalog,
    /// The users' recent clicks the trainer keeps.
    pub histories: SharedHistories,
}

/// Restores the newest checkpoint (or builds a fresh model), starts ingestion from the
/// checkpoint's resume points (a fresh model reads the topics from the beginning), and starts
/// the training loop on it. `catalog` is filled by ingestion (pass the one `hooks` read).
///
/// The stages are wired here, not inside each other: ingestion knows nothing of training, and
/// the loop only reads its [`online::Feed`]. After a graceful stop (batch, checkpoint) the
/// ingest loop is stopped, so its final commit matches the checkpoint; after an abort (a
/// simulated crash) it is dropped without one.
pub async fn start_training(
    config: &Config,
    metrics: &Metrics,
    stop: Stop,
    hooks: Hooks,
    catalog: SharedCatalog,
    health: &Health,
) -> Result<Training, OnlineError> {
    let restored = online::restore(config).await?;
    let histories = restored.trainer.histories();
    let options = IngestOptions {
        from_beginning: restored.resume.is_none()
            && config.kafka.fresh_start == crate::config::FreshStart::Beginning,
        resume: restored.resume.clone().unwrap_or_default(),
        catalog: Some(catalog.clone()),
        health: health.clone(),
        commit_at_checkpoints: true,
        ..Default::default()
    };
    let ingest_stop = CancellationToken::new();
    let handle = ingest::spawn(config, metrics, options, ingest_stop.clone()).await?;
    let IngestHandle {
        examples,
        acker,
        catalog: ingested,
        task: mut ingesting,
    } = handle;
    let feed = online::Feed {
        examples,
        acker,
        catalog: ingested,
    };
    let training = online::spawn(restored, feed, config, metrics, stop, hooks, health)?;
    let health = health.clone();
    let task = tokio::spawn(async move {
        let summary = training
            .await
            .unwrap_or_else(|e| Err(OnlineError::Task(e.to_string())));
        if matches!(&summary, Ok(s) if s.aborted) {
            ingesting.abort();
            let _ = (&mut ingesting).await;
            return summary;
        }
        // Graceful stop or a failed loop: the ingest loop commits what was applied and ends.
        health.stop_requested(health::INGEST);
        ingest_stop.cancel();
        let ingested = ingesting
            .await
            .map_err(|e| OnlineError::Task(e.to_string()))
            .and_then(|r| r.map_err(OnlineError::from));
        summary.and_then(|s| ingested.map(|()| s))
    });
    Ok(Training {
        task,
        catalog,
        histories,
    })
}

/// Starts training, refreshing and serving.
pub async fn start(config: &Config, metrics: &Metrics) -> Result<Service, AppError> {
    let catalog: SharedCatalog = Arc::default();
    let served = Arc::new(Served::default());
    let samples: FreshnessSamples = Arc::default();
    let feed = Arc::new(ModelFeed::default());
    let trigger = refresh::trigger(
        config,
        catalog.clone(),
        feed.clone(),
        samples.clone(),
        Some(metrics.serve.clone()),
    );
    let stop = Stop::default();
    let health = Health::new(metrics);
    let hooks = Hooks {
        before_step: Some(prequential(config, &served, &catalog, metrics)),
        after_step: Some(trigger),
    };
    let started = start_training(
        config,
        metrics,
        stop.clone(),
        hooks,
        catalog.clone(),
        &health,
    )
    .await?;

    let publish_stop = CancellationToken::new();
    let (publisher, publishing) = if config.replication.publish {
        let p = Publisher::new(config, Some(metrics.replication.clone())).await?;
        tracing::info!(topic = %config.replication.topic, "publishing generations");
        let (queue, task) = p.start(publish_stop.clone());
        let task = tokio::spawn(health.register(health::PUBLISH).watch(task));
        (Some(queue as Arc<dyn GenerationSink>), Some(task))
    } else {
        (None, None)
    };
    let refresh_stop = CancellationToken::new();
    let refresher = Refresher {
        config: config.clone(),
        catalog: catalog.clone(),
        feed,
        served: served.clone(),
        samples,
        metrics: Some(metrics.serve.clone()),
        publisher,
    };
    let (rs, rt) = (refresh_stop.clone(), tokio::runtime::Handle::current());
    let worker = health.register(health::REFRESH);
    let done = crate::priority::spawn("towerstream-refresh", config.index.nice, move || {
        worker.run(|| refresher.run(rs, rt))
    })
    .map_err(AppError::Thread)?;
    let refresher = tokio::spawn(async move {
        let _ = done.await;
    });

    let state = ServeState {
        served: served.clone(),
        ctx: Context {
            catalog: catalog.clone(),
            histories: started.histories,
            default_k: config.serve.default_k,
        },
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let api = api::start(state, &config.serve).await?;
    let addr = api.addr;
    tracing::info!(%addr, "recall API listening");
    Ok(Service {
        addr,
        served,
        catalog,
        metrics: metrics.clone(),
        health,
        stop,
        api_stop: api.stop,
        refresh_stop,
        publish_stop,
        publishing,
        train: started.task,
        refresher,
        api: api.task,
    })
}

impl Service {
    /// Graceful stop: API, then training (batch, checkpoint, commit), then the refresher, then
    /// the generations publisher.
    pub async fn shutdown(self) -> Result<Summary, OnlineError> {
        self.health.shutting_down();
        self.api_stop.cancel();
        let _ = self.api.await;
        self.stop.graceful.cancel();
        let summary = self
            .train
            .await
            .map_err(|e| OnlineError::Task(e.to_string()))?;
        self.refresh_stop.cancel();
        let _ = self.refresher.await;
        // The last generation still waiting goes out before the process ends.
        self.publish_stop.cancel();
        if let Some(p) = self.publishing {
            let _ = p.await;
        }
        summary
    }

    /// True while the training loop runs (it stops on shutdown or on a fatal error).
    pub fn is_training(&self) -> bool {
        !self.train.is_finished()
    }
}
