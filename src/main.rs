//! The `towerstream` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use towerstream::config::Config;
use towerstream::data::{Dataset, Format};
use towerstream::eval::{offline, report};
use towerstream::ingest::{self, IngestOptions};
use towerstream::kafka;
use towerstream::metrics::Metrics;

#[derive(Parser)]
#[command(
    name = "towerstream",
    version,
    about = "Streaming online-learning two-tower recall"
)]
struct Cli {
    /// Configuration file (TOML); `TOWERSTREAM_*` environment variables override it.
    #[arg(long, short, global = true, env = "TOWERSTREAM_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest, train, refresh the index and serve the API in one process (until Ctrl-C/SIGTERM).
    Run {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Validate and print the effective configuration.
    CheckConfig,
    /// Create the configured topics if they do not exist.
    Topics {
        /// Partitions of each event topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Offline evaluation on a dataset: leave-last-out split, training in time order (with the
    /// prequential curve of the first pass), Hit/Recall/Precision/NDCG@K and MRR, exact and HNSW.
    Eval {
        /// Dataset directory or file (see `scripts/fetch-data`).
        #[arg(long)]
        dataset: PathBuf,
        /// Dataset layout.
        #[arg(long, value_enum, default_value = "auto")]
        format: Format,
        /// Passes over the training part (1: the single streaming pass).
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Batch size (default: `train.batch_size`).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Cut-offs K.
        #[arg(long, value_delimiter = ',', default_values_t = [10, 50, 100])]
        k: Vec<usize>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Plot the prequential Recall@K and the loss as SVG here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Export the split and the vectors as CSV into this directory.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Skip the HNSW search (exact scoring only).
        #[arg(long)]
        no_ann: bool,
    },
    /// Run ingestion alone, acknowledging every example at once (a dry run of the pipeline),
    /// printing throughput every few seconds until Ctrl-C or SIGTERM.
    Ingest {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// A token cancelled on SIGINT/SIGTERM, or after `duration` seconds when given.
fn shutdown_token(duration: Option<u64>) -> CancellationToken {
    let token = CancellationToken::new();
    cancel_on_signal(token.clone());
    if let Some(secs) = duration {
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            t.cancel();
        });
    }
    token
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run { duration } => {
            let metrics = Metrics::new();
            let shutdown = shutdown_token(duration);
            let service = towerstream::app::start(&config, &metrics)
                .await
                .context("starting the service")?;
            println!(
                "recall API on http://{}  (metrics: http://{}/metrics)",
                service.addr, service.addr
            );
            shutdown.cancelled().await;
            let summary = service.shutdown().await.context("stopping")?;
            println!(
                "trained {} examples in {} steps this run (global step {}); last checkpoint {:?}",
                summary.examples, summary.steps, summary.global_step, summary.last_checkpoint
            );
        }
        Command::Eval {
            dataset,
            format,
            epochs,
            batch_size,
            k,
            json,
            plot,
            export,
            no_ann,
        } => {
            let mut config = config;
            if let Some(b) = batch_size {
                anyhow::ensure!(b > 0, "--batch-size must be positive");
                config.train.batch_size = b;
            }
            anyhow::ensure!(epochs > 0, "--epochs must be positive");
            anyhow::ensure!(k.iter().all(|k| *k > 0), "--k values must be positive");
            let data = Dataset::load(&dataset, format)
                .with_context(|| format!("reading {}", dataset.display()))?;
            let opts = offline::Options {
                epochs,
                ks: k,
                ann: !no_ann,
                progress: true,
                ..Default::default()
            };
            let outcome = tokio::task::block_in_place(|| offline::run(&data, &config, &opts));
            print!("{}", report::summary(&outcome.report));
            if let Some(p) = json {
                report::write_json(&outcome.report, &p)?;
                println!("report: {}", p.display());
            }
            if let Some(p) = plot {
                report::plot_svg(&outcome.report, &p)?;
                println!("plot: {}", p.display());
            }
            if let Some(dir) = export {
                tokio::task::block_in_place(|| report::export(&dir, &data, &outcome))?;
                println!("split and vectors: {}", dir.display());
            }
        }
        Command::CheckConfig => {
            println!("{}", serde_json::to_string_pretty(&config)?);
        }
        Command::Topics { partitions } => {
            let specs = kafka::topic_specs(&config.kafka, partitions);
            kafka::ensure_topics(&config.kafka, &specs)
                .await
                .context("creating topics")?;
            for s in specs {
                println!(
                    "{} partitions={} compacted={}",
                    s.name, s.partitions, s.compacted
                );
            }
        }
        Command::Ingest { duration } => {
            let metrics = Metrics::new();
            let shutdown = shutdown_token(duration);
            let mut handle = ingest::spawn(
                &config,
                &metrics,
                IngestOptions::default(),
                shutdown.clone(),
            )
            .await
            .context("starting ingestion")?;
            let mut report = tokio::time::interval(Duration::from_secs(5));
            let (mut n, mut last) = (0u64, 0u64);
            loop {
                tokio::select! {
                    ex = handle.examples.recv() => match ex {
                        Some(ex) => { handle.acker.ack(&[ex.origin]); n += 1; }
                        None => break,
                    },
                    _ = report.tick() => {
                        tracing::info!(examples = n, per_second = (n - last) / 5, "ingest progress");
                        last = n;
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
            // Acknowledge whatever is already in the channel, then let the loop commit.
            while let Ok(ex) = handle.examples.try_recv() {
                handle.acker.ack(&[ex.origin]);
                n += 1;
            }
            handle.task.await.context("ingest task")??;
            println!("{n} examples");
        }
    }
    Ok(())
}
