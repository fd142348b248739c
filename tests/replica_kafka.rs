//! The train/serve split over the real broker: a trainer publishes generations to the
//! generations topic; serving replicas — one running from the start, one started late — follow
//! it and answer recall exactly as the trainer's own index does for the same model version.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use towerstream::config::LargeCatalog;
use towerstream::metrics::Metrics;
use towerstream::train::sampler::Rng;
use towerstream::{app, replica};

/// (generation, model version) served at `base`, when ready.
async fn served(client: &HttpClient, base: &str) -> Option<(u64, i64)> {
    let (s, v) = http(client, "GET", format!("{base}/v1/model"), None).await;
    (s == 200).then(|| {
        (
            v["generation"].as_u64().unwrap(),
            v["model_version"].as_i64().unwrap(),
        )
    })
}

/// Waits until `replica` serves what `trainer` serves, and that stays so for a second (the
/// trainer has nothing new to publish).
async fn converge(client: &HttpClient, trainer: &str, replica: &str, what: &str) -> (u64, i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut stable_since: Option<(tokio::time::Instant, (u64, i64))> = None;
    loop {
        let (t, r) = (served(client, trainer).await, served(client, replica).await);
        match (t, r, stable_since) {
            (Some(t), Some(r), Some((since, v))) if t == r && v == t => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return t;
                }
            }
            (Some(t), Some(r), _) if t == r => {
                stable_since = Some((tokio::time::Instant::now(), t));
            }
            _ => stable_since = None,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never caught up: trainer {t:?}, replica {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn recall(client: &HttpClient, base: &str, body: &str) -> Value {
    let (s, v) = http(client, "POST", format!("{base}/v1/recall"), Some(body)).await;
    assert_eq!(s, 200, "{base}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_the_trainers_generations_exactly() {
    scenario(Main::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_hnsw_generations_with_catalogue_deltas() {
    scenario(Main::Hnsw).await;
}

/// `index.large_catalog = relink`: the trainer walks one graph with each version's vectors; the
/// replicas must receive those links (before, they built a graph of their own from the vectors
/// and their scores differed from the trainer's in the last digits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_walk_the_trainers_links_with_each_versions_vectors() {
    scenario(Main::Linked).await;
}

/// A catalogue above `index.exact_max_items` whose items embed to few distinct vectors (an
/// id table of 8 rows: the other items are their features alone) is scanned over those; the
/// replicas receive the distinct vectors and each item's, and answer as the trainer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_scan_the_trainers_distinct_vectors() {
    scenario(Main::Distinct).await;
}

/// `index.large_catalog = clusters`: the replicas receive each version's lists and the depth
/// the trainer probed for them, and answer as the trainer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_scan_the_trainers_lists() {
    scenario(Main::Lists).await;
}

/// The trainer's main index in a scenario.
#[derive(Clone, Copy, PartialEq)]
enum Main {
    Exact,
    Hnsw,
    Linked,
    Distinct,
    Lists,
}

async fn scenario(main: Main) {
    let hnsw = main != Main::Exact;
    let dir = tempfile::tempdir().unwrap();
    let mut c = service_config("replica", dir.path());
    c.replication.topic = format!("gen-{}", c.kafka.group_id);
    c.replication.publish = true;
    // One full message at the start, deltas afterwards: the replicas must stay exact through
    // deltas alone (and through skipped generations: at most one message every 2 s, while
    // the refresher makes a generation every 300 ms — with the default 1 s a loaded machine
    // made generations no faster than that and skipped none). Small records: every
    // generation is chunked.
    c.replication.min_interval_ms = 2000;
    c.replication.full_every_secs = 3600;
    c.replication.retention_ms = 7_200_000;
    c.replication.chunk_bytes = 4096;
    if hnsw {
        c.index.exact_max_items = 40; // the world has 80 items: HNSW main index + deltas
    }
    if main == Main::Distinct {
        // 7 items with an id row, the rest one vector per (category, genres): at most 63.
        c.features.capacity.insert("item_id".into(), 8);
        c.index.exact_max_items = 70;
    }
    c.index.large_catalog = match main {
        Main::Linked | Main::Distinct => LargeCatalog::Relink,
        Main::Lists => LargeCatalog::Clusters,
        _ => LargeCatalog::Rebuild,
    };
    c.eval.prequential_every = 0;
    let world = small_world(&c).await;
    let client: HttpClient = http_client();

    // A replica up before the trainer: not ready until a generation arrives.
    let early_metrics = Metrics::new();
    // Replicas with another HNSW connectivity: they must load the trainer's graph (same answers,
    // same memory), not build their own.
    let mut rc = c.clone();
    rc.index.connectivity = 48;
    let early = replica::start(&rc, &early_metrics).await.unwrap();
    let early_base = format!("http://{}", early.addr);
    assert_eq!(
        http(&client, "GET", format!("{early_base}/readyz"), None)
            .await
            .0,
        503
    );

    let metrics = Metrics::new();
    let trainer = app::start(&c, &metrics).await.unwrap();
    let trainer_base = format!("http://{}", trainer.addr);

    let mut rng = Rng::new(5);
    let mut clicks = |n: u64, from: u64| -> Vec<_> {
        (from..from + n)
            .map(|i| {
                // Never i0: it is deleted mid-stream, and a click on it may then be dropped.
                let (u, j) = loop {
                    let (u, j) = world.sample_click(&mut rng);
                    if world.items[j].id.as_str() != "i0" {
                        break (u, j);
                    }
                };
                (
                    Some(world.users[u].id.to_string()),
                    world.click_event(u, j, now_ms(), i).to_json(),
                    None,
                )
            })
            .collect()
    };
    let first = clicks(1000, 0);
    let second = clicks(1000, 1000);
    produce(&c, &c.kafka.event_topics[0], &first).await;
    // The change comes after the first generation, so on the HNSW path it is served (and
    // shipped) as a delta generation on that generation's main index.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while served(&client, &trainer_base).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trainer never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A catalogue change mid-stream: a new item and a deletion travel as item vectors (a
    // delta generation on the HNSW path).
    add_fresh_item_delete_i0(&c).await;
    // Over about 3 s, so that training spans several 300 ms refreshes but at most two 2 s
    // publish intervals (the refresher takes a model update only when it is ready for one,
    // and a burst trained in one second made too few generations to skip any).
    for slice in second.chunks(200) {
        produce(&c, &c.kafka.event_topics[0], slice).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let trained = trained_clicks(&metrics);
        if trained >= 2000.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "training stalled at {trained} of 2000 clicks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (generation, step) =
        converge(&client, &trainer_base, &early_base, "the early replica").await;
    assert!(
        generation >= 3,
        "expected several generations, got {generation}"
    );

    // A replica started after the fact resumes from the newest full generation and replays
    // the deltas after it.
    let late_metrics = Metrics::new();
    let late = replica::start(&rc, &late_metrics).await.unwrap();
    let late_base = format!("http://{}", late.addr);
    assert_eq!(
        converge(&client, &trainer_base, &late_base, "the late replica").await,
        (generation, step)
    );
    assert_eq!(
        served(&client, &trainer_base).await,
        Some((generation, step)),
        "the trainer moved on while the late replica caught up"
    );

    // Same version, same answers: items, order and scores, for known users with their
    // histories, for a category filter, and for a user known only by features.
    let mut bodies: Vec<String> = (0..50)
        .map(|u| format!(r#"{{"user_id":"u{u}","k":20}}"#))
        .collect();
    bodies.push(r#"{"user_id":"u3","k":10,"category":"g1","include_clicked":true}"#.into());
    bodies.push(r#"{"features":{"gender":"F","age":30},"history":["i5","i7"],"k":10}"#.into());
    for body in &bodies {
        let t = recall(&client, &trainer_base, body).await;
        assert_eq!(t["model_version"], step);
        assert!(!t["items"].as_array().unwrap().is_empty(), "{body}: {t}");
        for base in [&early_base, &late_base] {
            let r = recall(&client, base, body).await;
            assert_eq!(r, t, "{body}: replica {base} differs from the trainer");
        }
    }
    let ids: Vec<String> = recall(
        &client,
        &late_base,
        r#"{"user_id":"u1","k":1000,"include_clicked":true}"#,
    )
    .await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.iter().any(|i| i == "fresh-item") && !ids.iter().any(|i| i == "i0"));

    let received = |m: &Metrics, kind: &str| {
        metric_value(
            m,
            "towerstream_replication_received_total",
            &[("kind", kind)],
        )
    };
    assert_eq!(
        received(&early_metrics, "full"),
        1.0,
        "one full message, then deltas"
    );
    // At least one delta on top of the full message (how many depends on how many
    // generations the 2 s publish interval skipped on this machine).
    assert!(received(&early_metrics, "delta") >= 1.0);
    assert!(
        received(&late_metrics, "delta") >= received(&early_metrics, "delta"),
        "the late replica replayed the deltas"
    );
    for m in [&early_metrics, &late_metrics] {
        for reason in ["gap", "incompatible", "corrupt"] {
            assert_eq!(
                metric_value(
                    m,
                    "towerstream_replication_rejected_total",
                    &[("reason", reason)]
                ),
                0.0,
                "{reason}"
            );
        }
    }
    let published = metric_value(
        &metrics,
        "towerstream_replication_published_total",
        &[("kind", "delta")],
    );
    // At least one delta (how many depends on how many 2 s publish intervals the run spans,
    // fewer on a loaded machine).
    assert!(published >= 1.0, "no delta message published");
    // Refresh every 300 ms, publish at most every 2000 ms: generations were
    // skipped, and their changed rows still reached the replicas with the next message.
    let sent = published
        + metric_value(
            &metrics,
            "towerstream_replication_published_total",
            &[("kind", "full")],
        );
    assert!(
        sent < metrics.serve.generations.get() as f64,
        "{sent} messages for {} generations: none skipped",
        metrics.serve.generations.get()
    );
    if main == Main::Linked {
        for served in [&early.served, &late.served, &trainer.served] {
            let g = served.load().unwrap();
            assert!(g.index.shared_graph().is_some(), "not linked");
        }
    }
    if main == Main::Lists {
        for served in [&early.served, &late.served, &trainer.served] {
            assert_eq!(served.load().unwrap().index.kind(), "lists");
        }
    }
    if main == Main::Distinct {
        for served in [&early.served, &late.served, &trainer.served] {
            let g = served.load().unwrap();
            assert_eq!(g.index.kind(), "distinct");
            assert!(g.index.scanned_vectors().is_some_and(|n| n <= 70));
        }
        let relinks = common::relinks(&metrics.serve);
        assert_eq!(relinks, 0, "links built for a catalogue of few vectors");
    }
    if main == Main::Hnsw {
        // The replicas loaded the trainer's HNSW graph rather than building their own (which
        // would have their connectivity, 48).
        for r in [&early, &late] {
            let g = r.served.load().unwrap();
            assert_eq!(
                g.index.connectivity(),
                Some(16),
                "replica built its own graph"
            );
        }
    }
    if hnsw {
        assert!(
            metrics.serve.delta_generations.get() >= 1,
            "the catalogue change should have gone out as a delta"
        );
    }

    let healths = [
        trainer.health.clone(),
        early.health.clone(),
        late.health.clone(),
    ];
    for h in &healths {
        assert!(h.failures().is_empty(), "{h:?}");
    }
    late.shutdown().await.unwrap();
    early.shutdown().await.unwrap();
    trainer.shutdown().await.unwrap();
    // A graceful stop is no failure: every worker of each process ended `stopped`.
    let names = |h: &towerstream::health::Health| h.workers().into_keys().collect::<Vec<_>>();
    assert_eq!(
        names(&healths[0]),
        ["api", "ingest", "publish", "refresh", "train"]
    );
    assert_eq!(names(&healths[1]), ["api", "context", "generations"]);
    for h in &healths {
        for (worker, state) in h.workers() {
            assert_eq!(state, towerstream::health::WorkerState::Stopped, "{worker}");
        }
    }
}
