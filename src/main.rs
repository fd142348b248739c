//! The `towerstream` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use towerstream::config::Config;
use towerstream::data::{Dataset, Format};
use towerstream::eval::{offline, report};
use towerstream::health::Health;
use towerstream::ingest::{self, IngestOptions};
use towerstream::kafka;
use towerstream::metrics::Metrics;
use towerstream::synth::stream::{Stream, StreamConfig};
use towerstream::synth::WorldConfig;

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
    /// Override one configuration key on top of the file and the environment, as
    /// `section.key=value` (a TOML value, else a string); repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    /// Longest a graceful stop (last batch, checkpoint, commit) may take after SIGTERM/Ctrl-C
    /// before the process gives up and exits with an error (stay below the orchestrator's
    /// grace period; Kubernetes' here is 60 s).
    #[arg(long, global = true, default_value_t = 50, value_name = "SECONDS")]
    shutdown_timeout: u64,
    /// After a worker stopped unexpectedly (`run`, `train`, `serve`): how long the process
    /// keeps answering `/healthz` (503, naming it) and `/metrics` (`towerstream_worker_up` 0)
    /// before it stops and exits non-zero, so scrapes and probes see why it went (two
    /// Prometheus scrape intervals of 15 s). SIGTERM/Ctrl-C ends the wait.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    failure_linger: u64,
    /// What to run (`run` when none is given).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest, train, refresh the index and serve the API in one process (until Ctrl-C/SIGTERM);
    /// the default.
    Run {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// The trainer alone: ingest, train, checkpoint, and publish every generation (user tower,
    /// item vectors, model version) to the generations topic for `serve` replicas. It also
    /// serves the API (recall from its own index, /metrics, /healthz, /readyz).
    Train {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// A serving replica: follows the generations topic (from the newest full generation),
    /// the catalogue and the event topics, builds its own index and serves the recall API.
    Serve {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Load-test a running recall API: closed-loop `POST /v1/recall` from N connections,
    /// printing requests/s and latency percentiles.
    Bench(BenchArgs),
    /// Validate and print the effective configuration; with `--sample N`, also read the newest
    /// N messages of each event topic (no group, no commit) and show what each becomes.
    CheckConfig {
        /// Messages per event topic to decode and show (0: none).
        #[arg(long, default_value_t = 0)]
        sample: usize,
    },
    /// Create the configured topics if they do not exist.
    Topics {
        /// Partitions of each event topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Write a synthetic stream with ground truth (drifting tastes, arriving items, impressions
    /// with position bias) as JSON lines, and its configuration beside it (`<out>.world.json`).
    Gen {
        /// Output file (JSON lines, one event per line, in event-time order).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        stream: StreamArgs,
    },
    /// Publish a dataset, an events file or a synthetic stream to the configured topics in
    /// event-time order, with a progress bar.
    Replay(ReplayArgs),
    /// Offline evaluation on a dataset: leave-last-out split, training in time order (with the
    /// prequential curve of the first pass), Hit/Recall/Precision/NDCG@K and MRR, exact and HNSW.
    /// With `--vary`, `--grid`, several `--dataset`s or an events file: an ablation table of
    /// every variant on every dataset (one streaming pass each).
    Eval(EvalArgs),
    /// Run ingestion alone, acknowledging every example at once (a dry run of the pipeline),
    /// printing throughput every few seconds until Ctrl-C or SIGTERM. It reads in its own
    /// consumer group (`<kafka.group_id>.dry-run`), commits nothing and writes no dead
    /// letters (they are logged instead), so it leaves production state alone.
    Ingest {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
}

/// Options of `towerstream bench`.
#[derive(clap::Args)]
struct BenchArgs {
    /// Base URL of the API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Users to ask for: ids `<user-prefix>1` ..= `<user-prefix><users>`.
    #[arg(long, default_value_t = 943)]
    users: usize,
    /// Prefix of the user ids (MovieLens: none; synthetic streams: `u`).
    #[arg(long, default_value = "")]
    user_prefix: String,
    /// Items per request.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Open loop: send this many requests per second whatever the answers do, latency
    /// measured from each request's intended send time (`--connections` is then unused).
    #[arg(long)]
    rate: Option<f64>,
    /// Length of the run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `towerstream replay`.
#[derive(clap::Args)]
struct ReplayArgs {
    /// Dataset directory or file (MovieLens, CSV, JSONL interactions).
    #[arg(long, conflicts_with_all = ["events", "synthetic"])]
    dataset: Option<PathBuf>,
    /// Dataset layout.
    #[arg(long, value_enum, default_value = "auto")]
    format: Format,
    /// An events file written by `towerstream gen` (JSON lines).
    #[arg(long, conflicts_with = "synthetic")]
    events: Option<PathBuf>,
    /// Generate a synthetic stream on the fly (see the stream options).
    #[arg(long)]
    synthetic: bool,
    #[command(flatten)]
    stream: StreamArgs,
    /// Events per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Send at most this many events.
    #[arg(long)]
    limit: Option<usize>,
    /// Stamp events with the time they are sent (a historical dataset played as live).
    #[arg(long)]
    now: bool,
    /// Partitions of each topic created if missing.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Payload shape: towerstream's schema, or the example shop's own JSON (read with
    /// `--config schemas/examples/mapped/shop-mapping.toml`).
    #[arg(long, value_enum, default_value = "native")]
    shape: towerstream::replay::PayloadShape,
}

/// Options of `towerstream eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// Dataset directory or file (see `scripts/fetch-data`), or an events file with
    /// impressions (`towerstream gen`); repeatable.
    #[arg(long, required = true)]
    dataset: Vec<PathBuf>,
    /// Vary one configuration key over values, `section.key=v1,v2` (`v1|v2` when values
    /// contain commas); repeatable, the flags multiply into a grid.
    #[arg(long, value_name = "KEY=VALUES")]
    vary: Vec<String>,
    /// Named variants from a TOML file (`[[variant]]` with `name` and `set = ["k=v"]`).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Write the ablation table as Markdown here.
    #[arg(long)]
    table: Option<PathBuf>,
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
}

/// Options of a synthetic stream (`gen`, `replay --synthetic`).
#[derive(clap::Args)]
struct StreamArgs {
    /// Users.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Items.
    #[arg(long, default_value_t = 500)]
    items: usize,
    /// Requests (slates shown).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Items per slate.
    #[arg(long, default_value_t = 10)]
    slate: usize,
    /// Examination at position p is 1 / (1 + p)^bias.
    #[arg(long, default_value_t = 1.0)]
    position_bias: f64,
    /// Hours for a full turn of every user's taste (0: no drift).
    #[arg(long, default_value_t = 4.0)]
    drift_hours: f64,
    /// Share of items that arrive during the stream.
    #[arg(long, default_value_t = 0.1)]
    new_item_share: f64,
    /// Milliseconds between requests (event time).
    #[arg(long, default_value_t = 100)]
    request_interval_ms: i64,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl StreamArgs {
    fn config(&self) -> anyhow::Result<StreamConfig> {
        anyhow::ensure!(
            self.users > 0 && self.items > 0,
            "--users and --items must be positive"
        );
        anyhow::ensure!(self.slate > 0, "--slate must be positive");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.new_item_share),
            "--new-item-share must be in 0..=1"
        );
        anyhow::ensure!(
            self.drift_hours >= 0.0,
            "--drift-hours must not be negative"
        );
        anyhow::ensure!(
            self.request_interval_ms > 0,
            "--request-interval-ms must be positive"
        );
        Ok(StreamConfig {
            world: WorldConfig {
                users: self.users,
                items: self.items,
                seed: self.seed,
                ..WorldConfig::default()
            },
            requests: self.requests,
            slate: self.slate,
            position_bias: self.position_bias,
            request_interval_ms: self.request_interval_ms,
            drift_period_ms: (self.drift_hours * 3_600_000.0) as i64,
            new_item_share: self.new_item_share,
            ..StreamConfig::default()
        })
    }
}

fn read_events(path: &std::path::Path) -> anyhow::Result<Vec<towerstream::event::Event>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            towerstream::event::parse_event(l.as_bytes(), usize::MAX)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
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

/// Waits for the shutdown request, or for a worker to stop unexpectedly and then `linger`
/// seconds more (or the shutdown request) while the API still reports it; the failure, if any.
async fn until_shutdown_or_failure(
    shutdown: &CancellationToken,
    health: &Health,
    linger: u64,
) -> Option<towerstream::health::Failure> {
    let failure = tokio::select! {
        biased; // a failure is reported even when a shutdown was requested at the same time
        f = health.failed() => f,
        _ = shutdown.cancelled() => return None,
    };
    tracing::error!(
        worker = failure.worker,
        reason = %failure.reason,
        "a worker stopped; stopping the process in {linger} s (--failure-linger)"
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(linger)) => {}
    }
    Some(failure)
}

/// After a worker failure and the graceful stop it triggered: the error naming the worker(s),
/// so the process exits non-zero and an orchestrator restarts it.
fn worker_failure<T, E: std::fmt::Display>(
    health: &Health,
    first: towerstream::health::Failure,
    stopped: anyhow::Result<Result<T, E>>,
) -> anyhow::Error {
    match stopped {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "graceful stop after the failure"),
        Err(e) => tracing::error!(error = %e, "graceful stop after the failure"),
    }
    let mut failures = health.failures();
    if failures.is_empty() {
        failures.push(first);
    }
    let all: Vec<String> = failures.iter().map(ToString::to_string).collect();
    anyhow::anyhow!("{}", all.join("; "))
}

/// Awaits a graceful stop for at most `secs` seconds.
async fn bounded<T>(secs: u64, stop: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(secs), stop)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "graceful stop did not finish within {secs} s (--shutdown-timeout); exiting without it"
            )
        })
}

/// Where `towerstream eval`'s ablation table goes (besides stdout).
struct AblationOutputs {
    table: Option<PathBuf>,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
}

/// `towerstream eval` with variants: every variant on every dataset, one table.
fn ablation(
    config_path: &Option<PathBuf>,
    set: &[String],
    datasets: &[PathBuf],
    format: Format,
    vary: &[String],
    grid: Option<PathBuf>,
    out: &AblationOutputs,
) -> anyhow::Result<()> {
    use towerstream::eval::ablation::{self, Source};
    let variants = match grid {
        Some(path) => ablation::load_grid(&path)?,
        None => ablation::grid(vary)?,
    };
    let mut configs = Vec::with_capacity(variants.len());
    for v in &variants {
        let overrides: Vec<String> = set.iter().chain(&v.set).cloned().collect();
        let c = Config::load_with(config_path.as_deref(), &overrides)
            .with_context(|| format!("variant {:?}", v.name))?;
        configs.push(c);
    }
    let mut rows = Vec::new();
    for path in datasets {
        let source = Source::load(path, format)?;
        for (v, c) in variants.iter().zip(&configs) {
            eprintln!("[eval] {} × {}", source.name(), v.name);
            let row = ablation::run_one(&source, v, c);
            rows.push(row);
        }
    }
    let text = ablation::markdown(&rows);
    print!("{text}");
    if let Some(p) = &out.table {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &out.json {
        ablation::write_json(&rows, p)?;
    }
    if let Some(p) = &out.plot {
        ablation::plot_svg(&rows, p)?;
        println!("plot: {}", p.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    init_logging(cli.log_json);
    let config = Config::load_with(cli.config.as_deref(), &cli.set)?;
    let command = cli
        .command
        .take()
        .unwrap_or(Command::Run { duration: None });
    match command {
        Command::Run { duration } => run_service(&cli, config, duration).await,
        Command::Train { duration } => {
            let mut config = config;
            config.replication.publish = true;
            run_service(&cli, config, duration).await
        }
        Command::Serve { duration } => serve_replica(&cli, &config, duration).await,
        Command::Eval(args) => tokio::task::block_in_place(|| eval(&cli, config, args)),
        Command::Gen { out, stream } => tokio::task::block_in_place(|| generate(&out, &stream)),
        Command::Replay(args) => replay(&config, args).await,
        Command::Bench(args) => bench(args).await,
        Command::CheckConfig { sample } => {
            println!("{}", serde_json::to_string_pretty(&config)?);
            if sample > 0 {
                print_samples(&config, sample).await?;
            }
            Ok(())
        }
        Command::Topics { partitions } => topics(&config, partitions).await,
        Command::Ingest { duration } => ingest_dry_run(&config, duration).await,
    }
}

/// `towerstream run` and `train`: the whole service until a signal, `--duration` or a worker
/// failure.
async fn run_service(cli: &Cli, config: Config, duration: Option<u64>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let shutdown = shutdown_token(duration);
    let service = towerstream::app::start(&config, &metrics)
        .await
        .context("starting the service")?;
    println!(
        "recall API on http://{}  (metrics: http://{}/metrics)",
        service.addr, service.addr
    );
    let health = service.health.clone();
    if let Some(f) = until_shutdown_or_failure(&shutdown, &health, cli.failure_linger).await {
        let stopped = bounded(cli.shutdown_timeout, service.shutdown()).await;
        return Err(worker_failure(&health, f, stopped));
    }
    let summary = bounded(cli.shutdown_timeout, service.shutdown())
        .await?
        .context("stopping")?;
    println!(
        "trained {} examples in {} steps this run (global step {}); last checkpoint {:?}",
        summary.examples, summary.steps, summary.global_step, summary.last_checkpoint
    );
    Ok(())
}

/// `towerstream serve`: a replica until a signal, `--duration` or a worker failure.
async fn serve_replica(cli: &Cli, config: &Config, duration: Option<u64>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let shutdown = shutdown_token(duration);
    let replica = towerstream::replica::start(config, &metrics)
        .await
        .context("starting the replica")?;
    println!(
        "replica recall API on http://{}  (metrics: http://{}/metrics)",
        replica.addr, replica.addr
    );
    let health = replica.health.clone();
    if let Some(f) = until_shutdown_or_failure(&shutdown, &health, cli.failure_linger).await {
        let stopped = bounded(cli.shutdown_timeout, replica.shutdown()).await;
        return Err(worker_failure(&health, f, stopped));
    }
    bounded(cli.shutdown_timeout, replica.shutdown())
        .await?
        .context("stopping")?;
    Ok(())
}

/// `towerstream eval`: one report on one dataset, or an ablation table of variants.
fn eval(cli: &Cli, mut config: Config, a: EvalArgs) -> anyhow::Result<()> {
    let variants = a.vary.len() + usize::from(a.grid.is_some()) > 0;
    if variants
        || a.dataset.len() > 1
        || (a.dataset.iter()).any(|d| towerstream::eval::stream::is_events_file(d))
    {
        let outputs = AblationOutputs {
            table: a.table,
            json: a.json,
            plot: a.plot,
        };
        return ablation(
            &cli.config,
            &cli.set,
            &a.dataset,
            a.format,
            &a.vary,
            a.grid,
            &outputs,
        );
    }
    let dataset = a
        .dataset
        .into_iter()
        .next()
        .context("--dataset is required")?;
    if let Some(b) = a.batch_size {
        anyhow::ensure!(b > 0, "--batch-size must be positive");
        config.train.batch_size = b;
    }
    anyhow::ensure!(a.epochs > 0, "--epochs must be positive");
    anyhow::ensure!(a.k.iter().all(|k| *k > 0), "--k values must be positive");
    let data = Dataset::load(&dataset, a.format)
        .with_context(|| format!("reading {}", dataset.display()))?;
    let opts = offline::Options {
        epochs: a.epochs,
        ks: a.k,
        ann: !a.no_ann,
        progress: true,
        ..Default::default()
    };
    let outcome = offline::run(&data, &config, &opts);
    print!("{}", report::summary(&outcome.report));
    if let Some(p) = a.json {
        report::write_json(&outcome.report, &p)?;
        println!("report: {}", p.display());
    }
    if let Some(p) = a.plot {
        report::plot_svg(&outcome.report, &p)?;
        println!("plot: {}", p.display());
    }
    if let Some(dir) = a.export {
        report::export(&dir, &data, &outcome)?;
        println!("split and vectors: {}", dir.display());
    }
    Ok(())
}

/// `towerstream gen`: a synthetic stream as JSON lines, its configuration beside it.
fn generate(out: &std::path::Path, stream: &StreamArgs) -> anyhow::Result<()> {
    let cfg = stream.config()?;
    let (events, counts) = Stream::new(cfg.clone()).events();
    let mut text = Vec::with_capacity(events.len() * 160);
    for e in &events {
        text.extend_from_slice(&e.to_json());
        text.push(b'\n');
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    let world = out.with_extension("world.json");
    std::fs::write(&world, serde_json::to_vec_pretty(&cfg)?)?;
    println!(
        "{}: {} items, {} users, {} impressions, {} clicks ({} events); configuration {}",
        out.display(),
        counts.items,
        counts.users,
        counts.impressions,
        counts.clicks,
        events.len(),
        world.display()
    );
    Ok(())
}

/// `towerstream replay`: a dataset, an events file or a synthetic stream to the topics.
async fn replay(config: &Config, a: ReplayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.rate >= 0.0, "--rate must not be negative");
    let mut all = match (a.dataset, a.events, a.synthetic) {
        (Some(d), _, _) => Dataset::load(&d, a.format)
            .with_context(|| format!("reading {}", d.display()))?
            .events()
            .collect(),
        (None, Some(f), _) => read_events(&f)?,
        (None, None, true) => Stream::new(a.stream.config()?).events().0,
        (None, None, false) => {
            anyhow::bail!("say what to replay: --dataset, --events or --synthetic")
        }
    };
    if let Some(n) = a.limit {
        all.truncate(n);
    }
    kafka::ensure_topics(
        &config.kafka,
        &kafka::topic_specs(&config.kafka, a.partitions),
    )
    .await
    .context("creating topics")?;
    let total = all.len() as u64;
    let opts = towerstream::replay::ReplayOptions {
        rate: a.rate,
        restamp: a.now,
        progress: true,
        shape: a.shape,
    };
    let stats = towerstream::replay::replay(&config.kafka, all, Some(total), opts)
        .await
        .context("publishing")?;
    for (topic, n) in &stats.per_topic {
        println!("{topic}: {n}");
    }
    let types: Vec<String> = stats
        .per_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "sent {} events ({}) in {:.1} s = {:.0} events/s",
        stats.events,
        types.join(", "),
        stats.seconds,
        stats.rate()
    );
    Ok(())
}

/// `towerstream bench`: closed-loop load from N connections, or open loop with `--rate`.
async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.users > 0, "--users must be positive");
    anyhow::ensure!(a.seconds > 0.0, "--seconds must be positive");
    let ids: Vec<String> = (1..=a.users)
        .map(|i| format!("{}{i}", a.user_prefix))
        .collect();
    if let Some(rate) = a.rate {
        return bench_open_loop(&a.url, &ids, a.k, rate, a.seconds, a.json).await;
    }
    let r =
        towerstream::serve::load::recall_load(&a.url, &ids, a.k, a.seconds, a.connections).await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} requests in {:.1} s: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors",
            r.ok, r.seconds, r.requests_per_second, r.p50_ms, r.p99_ms, r.max_ms, r.errors
        );
    }
    anyhow::ensure!(r.ok > 0, "no request succeeded against {}", a.url);
    Ok(())
}

/// `towerstream topics`: the event, table and generations topics, created if missing.
async fn topics(config: &Config, partitions: i32) -> anyhow::Result<()> {
    let mut specs = kafka::topic_specs(&config.kafka, partitions);
    specs.push(kafka::generations_topic_spec(&config.replication));
    kafka::ensure_topics(&config.kafka, &specs)
        .await
        .context("creating topics")?;
    for s in specs {
        println!(
            "{} partitions={} compacted={}",
            s.name, s.partitions, s.compacted
        );
    }
    Ok(())
}

/// `towerstream ingest`: the ingestion pipeline alone, every example acknowledged at once.
async fn ingest_dry_run(config: &Config, duration: Option<u64>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let shutdown = shutdown_token(duration);
    let options = IngestOptions {
        dry_run: true,
        ..IngestOptions::default()
    };
    let mut handle = ingest::spawn(config, &metrics, options, shutdown.clone())
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
    let skipped = metrics.ingest.dead_letter_dry_run.get();
    println!("{n} examples, {skipped} invalid events (dry run: not dead-lettered)");
    Ok(())
}

/// `towerstream bench --rate`: the open-loop run and its report.
async fn bench_open_loop(
    url: &str,
    ids: &[String],
    k: usize,
    rate: f64,
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate > 0.0 && rate.is_finite(),
        "--rate must be a positive number of requests per second"
    );
    let r = towerstream::serve::load::open_loop(url, ids, k, rate, seconds).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "open loop at {:.0} req/s: {} sent in {:.1} s; {} ok, {} shed (503), {} timed out (408), {} errors; \
             from the intended send time p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            r.rate, r.sent, r.seconds, r.ok, r.shed, r.timed_out, r.errors, r.p50_ms, r.p99_ms,
            r.p999_ms, r.max_ms
        );
    }
    anyhow::ensure!(r.ok > 0, "no request succeeded against {url}");
    Ok(())
}

/// `check-config --sample N`: the newest messages of each event topic and what the decoder (the
/// native schema or the `[mapping]`) makes of them: the event trained on, or the dead-letter
/// reason.
async fn print_samples(config: &Config, per_topic: usize) -> anyhow::Result<()> {
    let decoder = config.decoder()?;
    let k = config.kafka.clone();
    let samples = tokio::task::spawn_blocking(move || {
        ingest::sample::newest_messages(&k, per_topic, Duration::from_secs(10))
    })
    .await?
    .context("reading samples from the event topics")?;
    if samples.is_empty() {
        println!("no messages in {:?}", config.kafka.event_topics);
    }
    for m in samples {
        let how = if decoder.is_mapped(m.topic) {
            "mapped"
        } else {
            "native schema"
        };
        println!("\n{}[{}]@{} ({how})", m.topic_name, m.partition, m.offset);
        let Some(payload) = m.payload else {
            println!("  tombstone: dead-lettered (bad_json)");
            continue;
        };
        println!(
            "  {}",
            String::from_utf8_lossy(&payload)
                .chars()
                .take(400)
                .collect::<String>()
        );
        // A binary record's schema comes from the registry first, as in the consumer loops.
        let source = towerstream::mapping::Source::Events(m.topic);
        if let (Some(id), Some(registry)) =
            (decoder.pending_schema(source, &payload), decoder.registry())
        {
            if let Err(e) = registry.fetch(id).await {
                println!("  → schema {id} not fetched: {e}");
                continue;
            }
        }
        match decoder.decode(m.topic, &payload) {
            Ok(e) => println!("  → {}", String::from_utf8_lossy(&e.to_json())),
            Err(e) => println!("  → dead letter {}: {}", e.reason, e.detail),
        }
    }
    Ok(())
}
