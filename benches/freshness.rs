//! Freshness end to end through the real broker: clicks stamped "now" are produced at a fixed
//! rate while the whole service (ingest → train → refresh → serve) runs; the freshness
//! histogram then says how long a click took to reach a served generation.
//!
//! Besides the freshness of sampled clicks it samples the *served-model age* every 100 ms:
//! now minus the moment the trainer reached the served model's step. Above
//! `index.exact_max_items` (`--exact-max-items`, default the service's 100k) the run takes
//! the HNSW path, as a user at that size would.
//!
//! With `--replica` the trainer also publishes to a generations topic and a serving replica
//! (in the same process, so it shares the two cores) follows it: the report adds message sizes,
//! publish time, the trainer → replica delay, the replica's own work per message, how long it
//! took to serve after it was started, and its served-model age (sampled like the trainer's,
//! from its first generation on).
//!
//! `cargo bench --bench freshness [-- --items 100000] [-- --rate 10000] [-- --seconds 30]
//! [-- --refresh-ms 500] [-- --exact-max-items N] [-- --replica] [-- --publish-ms 1000]
//! [-- --rebuild | --relink | --clusters] [-- --api-rate 1000] [-- --recall-slots N]
//! [-- --hot-items 5000] [-- --json]` with `scripts/kafka start` running. `--rebuild` /
//! `--relink` / `--clusters` set `index.large_catalog` whatever the default; `--api-rate R`
//! sends recall requests open loop at R/s during the clicks and reports their latency
//! (`--recall-slots`: `serve.max_concurrent_recalls`). Clicks are
//! skewed over the whole catalogue (so the model tells more and more items apart as it learns);
//! `--hot-items N` sends them uniformly to the first N items instead (what earlier figures,
//! N = 5000, measured). Under
//! `cargo test` it does nothing but say so.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use towerstream::app;
use towerstream::config::{Config, LargeCatalog};
use towerstream::event::{Click, Dense, Event, Id, ItemEvent, Op, UserEvent};
use towerstream::kafka::{ensure_topics, produce_all, producer, topic_specs};
use towerstream::metrics::Metrics;
use towerstream::serve::load::open_loop;
use towerstream::train::sampler::Rng;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Quantile from a Prometheus histogram, interpolating linearly inside the bucket.
fn quantile(h: &prometheus::Histogram, q: f64) -> f64 {
    let m = prometheus::core::Collector::collect(h);
    let hist = m[0].get_metric()[0].get_histogram();
    let total = hist.get_sample_count() as f64;
    let target = q * total;
    let (mut prev_bound, mut prev_count) = (0.0, 0.0);
    for b in hist.get_bucket() {
        let (bound, count) = (b.upper_bound(), b.cumulative_count() as f64);
        if count >= target {
            let frac = if count > prev_count {
                (target - prev_count) / (count - prev_count)
            } else {
                1.0
            };
            return prev_bound + frac * (bound - prev_bound);
        }
        (prev_bound, prev_count) = (bound, count);
    }
    f64::INFINITY
}

/// When the trainer reached each step, and how old the served model was at each sample.
#[derive(Default)]
struct ModelAge {
    /// (seconds since the start of the clicks, trainer step), as the step grew.
    reached: Vec<(f64, i64)>,
    /// Served-model age samples (seconds).
    ages: Vec<f64>,
}

impl ModelAge {
    /// Records the trainer's step and, at most every 100 ms, the age of the served model: now
    /// minus when the trainer reached the served step (the start, for a step reached before).
    fn sample(&mut self, now: f64, trainer_step: i64, served_step: Option<i64>) {
        if self.reached.last().is_none_or(|(_, s)| trainer_step > *s) {
            self.reached.push((now, trainer_step));
        }
        let due = self.ages.len() as f64 * 0.1;
        if let (Some(served), true) = (served_step, now >= due) {
            let at = self
                .reached
                .iter()
                .find(|(_, s)| *s >= served)
                .map_or(now, |r| r.0);
            self.ages.push(now - at);
        }
    }

    fn quantile(&self, q: f64) -> f64 {
        let mut a = self.ages.clone();
        a.sort_by(f64::total_cmp);
        a.get(((a.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    }
}

/// What one run is asked to do.
struct Run {
    items: usize,
    rate: u64,
    seconds: u64,
    refresh_ms: u64,
    exact_max_items: usize,
    with_replica: bool,
    publish_ms: u64,
    large_catalog: LargeCatalog,
    /// Open-loop recall requests per second during the clicks (0: none).
    api_rate: u64,
    /// `serve.max_concurrent_recalls` (0: the default, one per core).
    recall_slots: usize,
    /// Clicks go uniformly to the first `hot_items` items; 0: over the whole catalogue,
    /// skewed (item `⌊n·r³⌋` for uniform r: a fifth of the clicks on 1 % of the items).
    hot_items: usize,
}

async fn run(r: Run) -> Result<serde_json::Value, String> {
    let Run {
        items,
        rate,
        seconds,
        refresh_ms,
        exact_max_items,
        with_replica,
        publish_ms,
        large_catalog,
        api_rate,
        recall_slots,
        hot_items,
    } = r;
    let stamp = now_ms();
    let dir = std::env::temp_dir().join(format!("towerstream-freshness-{stamp}"));
    let mut c = Config::default();
    c.kafka.brokers =
        std::env::var("TS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    c.kafka.group_id = format!("fresh-{stamp}");
    c.kafka.event_topics = vec![format!("fresh-events-{stamp}")];
    c.kafka.item_topic = format!("fresh-items-{stamp}");
    c.kafka.user_topic = format!("fresh-users-{stamp}");
    c.kafka.dead_letter_topic = format!("fresh-dlq-{stamp}");
    c.train.batch_size = 1024;
    c.train.max_wait_ms = 50;
    c.index.refresh_interval_ms = refresh_ms;
    // The path a user at this size takes (HNSW above `index.exact_max_items`), unless asked.
    c.index.exact_max_items = exact_max_items;
    c.index.large_catalog = large_catalog;
    c.index.freshness_sample_every = 10;
    c.serve.listen = "127.0.0.1:0".into();
    c.checkpoint.dir = dir.clone();
    c.checkpoint.every_secs = 0;
    c.serve.max_concurrent_recalls = recall_slots;
    c.features
        .capacity
        .insert("item_id".into(), items as u32 + 1);
    c.features.capacity.insert("user_id".into(), 10_001);
    c.replication.publish = with_replica;
    c.replication.min_interval_ms = publish_ms;
    c.replication.topic = format!("fresh-generations-{stamp}");
    ensure_topics(&c.kafka, &topic_specs(&c.kafka, 4))
        .await
        .map_err(|e| format!("no broker: {e}"))?;
    let p = producer(&c.kafka).map_err(|e| e.to_string())?;

    let mut rng = Rng::new(3);
    let catalogue: Vec<(String, Vec<u8>)> = (0..items)
        .map(|j| {
            let genres = vec![format!("g{}", rng.below(18)), format!("g{}", rng.below(18))];
            let e = Event::Item(ItemEvent {
                event_id: format!("item-{j}"),
                event_time_ms: stamp,
                item_id: Id::new(format!("i{j}")),
                op: Op::Upsert,
                title: None,
                category: Some(genres[0].clone()),
                genres,
                dense: Dense::new(),
            });
            (format!("i{j}"), e.to_json())
        })
        .collect();
    produce_all(&p, &c.kafka.item_topic, catalogue)
        .await
        .map_err(|e| e.to_string())?;
    let users = (0..10_000).map(|u| {
        let e = Event::User(UserEvent {
            event_id: format!("user-{u}"),
            event_time_ms: stamp,
            user_id: Id::new(format!("u{u}")),
            op: Op::Upsert,
            gender: Some(if u % 2 == 0 { "F" } else { "M" }.into()),
            age: Some(18 + (u % 50) as u8),
            occupation: Some(format!("{}", u % 21)),
            zip: Some(format!("{:05}", u % 3000)),
            dense: Dense::new(),
        });
        (format!("u{u}"), e.to_json())
    });
    produce_all(&p, &c.kafka.user_topic, users)
        .await
        .map_err(|e| e.to_string())?;

    let metrics = Metrics::new();
    let starting = Instant::now();
    let service = app::start(&c, &metrics).await.map_err(|e| e.to_string())?;
    while service.served.load().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_generation_s = starting.elapsed().as_secs_f64();
    // Above exact_max_items the first generation is searched exactly while the first graph
    // builds; the clicks start once it is in, so the run measures the steady state (the
    // start is reported on its own).
    let scanning_all = |g: &towerstream::refresh::Generation| {
        g.index
            .scanned_vectors()
            .is_some_and(|n| n > exact_max_items)
    };
    while service.served.load().is_some_and(|g| scanning_all(&g)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first_graph_s = starting.elapsed().as_secs_f64();
    let replica_metrics = Metrics::new();
    let replica_starting = Instant::now();
    let replica = match with_replica {
        true => Some(
            towerstream::replica::start(&c, &replica_metrics)
                .await
                .map_err(|e| e.to_string())?,
        ),
        false => None,
    };
    let started = Instant::now();
    let api = (api_rate > 0).then(|| {
        let url = format!("http://{}", service.addr);
        let users: Vec<String> = (0..1000).map(|u| format!("u{u}")).collect();
        tokio::spawn(
            async move { open_loop(&url, &users, 100, api_rate as f64, seconds as f64).await },
        )
    });
    let mut recall = Vec::new();
    // Sampled every pass of the loop: what a request saw over time, not per probe.
    let (mut recall_over_time, mut depths) = (Vec::new(), Vec::new());
    let mut age = ModelAge::default();
    // The replica's served model, aged against the trainer's steps the same way.
    let mut replica_age = ModelAge::default();
    let mut replica_ready_s = None;
    let mut sent = 0u64;
    let topic = c.kafka.event_topics[0].clone();
    while started.elapsed() < Duration::from_secs(seconds) {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let batch: Vec<(String, Vec<u8>)> = (sent..due)
            .map(|n| {
                let u = rng.below(10_000);
                let j = match hot_items {
                    0 => ((items as f64 * rng.next_f64().powi(3)) as usize).min(items - 1),
                    hot => rng.below(items.min(hot)),
                };
                let e = Event::Click(Click {
                    event_id: format!("c{n}"),
                    event_time_ms: now_ms(),
                    user_id: Id::new(format!("u{u}")),
                    item_id: Id::new(format!("i{j}")),
                    impression_id: None,
                    dwell_ms: None,
                });
                (format!("u{u}"), e.to_json())
            })
            .collect();
        sent = due;
        produce_all(&p, &topic, batch)
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(10)).await;
        age.sample(
            started.elapsed().as_secs_f64(),
            metrics.train.global_step.get(),
            service.served.load().map(|g| g.model.step),
        );
        if let Some(r) = &replica {
            let step = r.served.load().map(|g| g.model.step);
            if step.is_some() && replica_ready_s.is_none() {
                replica_ready_s = Some(replica_starting.elapsed().as_secs_f64());
            }
            replica_age.sample(
                started.elapsed().as_secs_f64(),
                metrics.train.global_step.get(),
                step,
            );
        }
        let r = metrics.serve.index_recall.get();
        if r > 0.0 && recall.last() != Some(&r) {
            recall.push(r);
        }
        if r > 0.0 {
            recall_over_time.push(r);
            depths.push(metrics.serve.index_search_depth.get());
        }
    }
    recall_over_time.sort_by(f64::total_cmp);
    let produce_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let trained = metrics
        .train
        .examples
        .with_label_values(&["click_unjoined"])
        .get();
    let verified_recall = service.served.load().and_then(|g| verify_recall(&g, 20));
    let f = &metrics.serve.freshness_seconds;
    let builds = &metrics.serve.build_seconds;
    let mut out = serde_json::json!({
        "benchmark": "freshness end to end through the local broker",
        "catalogue_items": items,
        "clicked_items": if hot_items == 0 { "skewed over all".to_string() } else { format!("uniform over {}", hot_items.min(items)) },
        "target_rate_events_per_second": rate,
        "sent": sent,
        "achieved_rate_events_per_second": sent as f64 / produce_s,
        "trained": trained,
        "refresh_interval_ms": refresh_ms,
        "publish_min_interval_ms": if with_replica { Some(publish_ms) } else { None },
        "generations": metrics.serve.generations.get(),
        "mean_generation_build_seconds": builds.get_sample_sum() / builds.get_sample_count().max(1) as f64,
        "freshness_samples": f.get_sample_count(),
        "freshness_p50_seconds": quantile(f, 0.5),
        "freshness_p99_seconds": quantile(f, 0.99),
        "index_path": match (items > exact_max_items, large_catalog) {
            (false, _) => "exact",
            (true, LargeCatalog::Rebuild) => "hnsw, rebuilt",
            (true, LargeCatalog::Relink) => "hnsw, relinked",
            (true, LargeCatalog::Clusters) => "lists, redone per version",
        },
        "first_generation_seconds": first_generation_s,
        "first_graph_seconds": first_graph_s,
        "relinks": metrics.serve.relinks.with_label_values(&["first"]).get()
            + metrics.serve.relinks.with_label_values(&["recall"]).get()
            + metrics.serve.relinks.with_label_values(&["changes"]).get()
            + metrics.serve.relinks.with_label_values(&["spread"]).get(),
        "probed_recall_min": recall.iter().copied().reduce(f64::min),
        "probed_recall_last": recall.last(),
        "served_recall_mean": (!recall_over_time.is_empty()).then(|| recall_over_time.iter().sum::<f64>() / recall_over_time.len() as f64),
        "served_recall_p05": recall_over_time.get(recall_over_time.len() / 20),
        "search_depth_per_k_max": depths.iter().copied().reduce(f64::max),
        "search_depth_per_k_last": depths.last(),
        "served_index_at_end": service.served.load().map(|g| g.index.kind()),
        "scanned_vectors_at_end": service.served.load().and_then(|g| g.index.scanned_vectors()),
        "distinct_inputs_at_end": metrics.serve.index_distinct_inputs.get(),
        "linked_nodes_at_end": service.served.load().and_then(|g| g.index.shared_graph().map(|l| l.nodes())),
        "verified_recall_at_end": verified_recall,
        "served_model_age_samples": age.ages.len(),
        "served_model_age_p50_seconds": age.quantile(0.5),
        "served_model_age_p99_seconds": age.quantile(0.99),
        "trainer_step_at_end": metrics.train.global_step.get(),
        "served_model_step_at_end": service.served.load().map(|g| g.model.step),
    });
    if let Some(api) = api {
        let r = api.await.map_err(|e| e.to_string())?;
        let extra = serde_json::json!({
            "api_open_loop_rate": r.rate,
            "api_ok": r.ok,
            "api_shed": r.shed,
            "api_timed_out": r.timed_out,
            "api_errors": r.errors,
            "api_p50_ms": r.p50_ms,
            "api_p99_ms": r.p99_ms,
            "api_p999_ms": r.p999_ms,
            "api_p99_by_10s_ms": r.p99_by_window_ms,
            "api_server_p50_ms_at_most": server_quantile_ms(&metrics, 0.5),
            "api_server_p99_ms_at_most": server_quantile_ms(&metrics, 0.99),
            "api_user_tower_mean_ms": stage_mean_ms(&metrics, "user_tower"),
            "api_search_mean_ms": stage_mean_ms(&metrics, "search"),
        });
        if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
    }
    if let Some(replica) = replica {
        let r = &metrics.replication;
        let per = |kind: &str| {
            r.published_bytes.with_label_values(&[kind]).get() as f64
                / r.published.with_label_values(&[kind]).get().max(1) as f64
        };
        let d = &replica_metrics.replication.delay_seconds;
        let a = &replica_metrics.replication.apply_seconds;
        let mean_apply = a.get_sample_sum() / a.get_sample_count().max(1) as f64;
        let extra = serde_json::json!({
            "published_full": r.published.with_label_values(&["full"]).get(),
            "published_delta": r.published.with_label_values(&["delta"]).get(),
            "mean_full_message_bytes": per("full"),
            "mean_delta_message_bytes": per("delta"),
            "mean_publish_seconds": r.publish_seconds.get_sample_sum() / r.publish_seconds.get_sample_count().max(1) as f64,
            "replica_received": replica_metrics.replication.received.with_label_values(&["full"]).get()
                + replica_metrics.replication.received.with_label_values(&["delta"]).get(),
            "replica_delay_p50_seconds": quantile(d, 0.5),
            "replica_delay_p99_seconds": quantile(d, 0.99),
            "replica_mean_apply_seconds": mean_apply,
            "replica_ready_seconds": replica_ready_s,
            "replica_model_age_p50_seconds": replica_age.quantile(0.5),
            "replica_model_age_p99_seconds": replica_age.quantile(0.99),
            "replica_generation": replica_metrics.serve.generation.get(),
            "trainer_generation": metrics.serve.generation.get(),
        });
        if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        replica.shutdown().await.map_err(|e| e.to_string())?;
    }
    service.shutdown().await.map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    let _ = towerstream::kafka::delete_topics(
        &c.kafka,
        &[
            &topic,
            &c.kafka.item_topic,
            &c.kafka.user_topic,
            &c.kafka.dead_letter_topic,
            &c.replication.topic,
        ],
    )
    .await;
    Ok(out)
}

/// Recall@100 of what `g` serves against a brute-force scan of every main item's vector, for
/// `queries` item vectors spread over the catalogue: a hit counts when it scores at least the
/// exact 100th (items tied with it are as right). Independent of the index's own probe.
fn verify_recall(g: &towerstream::refresh::Generation, queries: usize) -> Option<f64> {
    let rows = g.index.vectors().ok()?;
    let (dim, n) = (g.index.dim(), g.main_len);
    let (mut found, mut wanted) = (0, 0);
    for q in (0..n).step_by((n / queries.max(1)).max(1)).take(queries) {
        let query = &rows[q * dim..(q + 1) * dim];
        let exact =
            towerstream::index::brute_force(&rows, dim, query, 100, |k| !g.hidden.contains(&k));
        let kth = exact.last()?.score;
        let got = g
            .index
            .search(query, 100, |k| !g.hidden.contains(&k))
            .ok()?;
        found += got
            .iter()
            .filter(|h| h.score >= kth - 1e-5)
            .count()
            .min(exact.len());
        wanted += exact.len();
    }
    (wanted > 0).then(|| found as f64 / wanted as f64)
}

/// The upper bound of the bucket of `towerstream_recall_request_duration_seconds` holding
/// quantile `q` (ms): the server's side of a request (admission and compute), without the
/// client's and the connection's.
fn server_quantile_ms(metrics: &Metrics, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let families = metrics.serve.request_seconds.collect();
    let h = families.first()?.get_metric().first()?.get_histogram();
    let want = q * h.get_sample_count() as f64;
    h.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() as f64 >= want)
        .map(|b| b.upper_bound() * 1000.0)
}

/// Mean compute of a recall stage over the run (ms).
fn stage_mean_ms(metrics: &Metrics, stage: &str) -> f64 {
    let h = metrics
        .serve
        .recall_stage_seconds
        .with_label_values(&[stage]);
    1000.0 * h.get_sample_sum() / (h.get_sample_count().max(1) as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("freshness benchmark: run with `cargo bench --bench freshness` and a broker");
        return;
    }
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (items, rate, seconds, refresh) = (
        arg("--items", 100_000),
        arg("--rate", 10_000),
        arg("--seconds", 30),
        arg("--refresh-ms", 500),
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let flag = |name: &str| args.iter().any(|a| a == name);
    let replica = flag("--replica");
    let publish_ms = arg("--publish-ms", 1000);
    let exact_max_items = arg(
        "--exact-max-items",
        Config::default().index.exact_max_items as u64,
    ) as usize;
    match rt.block_on(run(Run {
        items: items as usize,
        rate,
        seconds,
        refresh_ms: refresh,
        exact_max_items,
        with_replica: replica,
        publish_ms,
        large_catalog: match (flag("--rebuild"), flag("--relink"), flag("--clusters")) {
            (true, _, _) => LargeCatalog::Rebuild,
            (_, true, _) => LargeCatalog::Relink,
            (_, _, true) => LargeCatalog::Clusters,
            _ => Config::default().index.large_catalog,
        },
        api_rate: arg("--api-rate", 0),
        recall_slots: arg("--recall-slots", 0) as usize,
        hot_items: arg("--hot-items", 0) as usize,
    })) {
        Ok(v) => {
            if args.iter().any(|a| a == "--json") {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(o) = v.as_object() {
                for (k, val) in o {
                    println!("{k:<34} {val}");
                }
            }
        }
        Err(e) => eprintln!("freshness benchmark failed: {e}"),
    }
}
