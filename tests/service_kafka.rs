//! The whole service against the real broker: events in, generations out, recall over HTTP,
//! catalogue changes live, freshness measured, graceful shutdown with a checkpoint.

mod common;

use std::time::Duration;

use common::*;
use towerstream::app;
use towerstream::metrics::Metrics;
use towerstream::train::checkpoint;
use towerstream::train::sampler::Rng;

async fn recall_ids(client: &HttpClient, base: &str, user: &str) -> Vec<String> {
    let body = format!(r#"{{"user_id":"{user}","k":1000,"include_clicked":true}}"#);
    let (s, v) = http(client, "POST", format!("{base}/v1/recall"), Some(&body)).await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_fresh_candidates_out() {
    scenario(Index::Exact).await;
}

/// The same with an HNSW main index (catalogue above `exact_max_items`): catalogue changes are
/// served by delta generations while the main index is rebuilt in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_catalogues_serve_changes_through_delta_generations() {
    scenario(Index::HnswWithDeltas).await;
}

#[derive(PartialEq)]
enum Index {
    Exact,
    HnswWithDeltas,
}

async fn scenario(index: Index) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = service_config("service", dir.path());
    if index == Index::HnswWithDeltas {
        c.index.exact_max_items = 40; // the world has 80 items
    }
    c.index.freshness_sample_every = 1;
    c.eval.prequential_every = 4;
    let world = small_world(&c).await;

    let metrics = Metrics::new();
    let service = app::start(&c, &metrics).await.unwrap();
    let base = format!("http://{}", service.addr);
    let client: HttpClient = http_client();
    assert_eq!(
        http(&client, "GET", format!("{base}/healthz"), None)
            .await
            .0,
        200
    );

    // Ready (a generation served) before the first click: the prequential checks below count
    // only clicks that meet a served model, and a fast trainer can otherwise take all 2,000
    // before the first HNSW build is out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while http(&client, "GET", format!("{base}/readyz"), None).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Clicks stamped "now": freshness is measured from them.
    let mut rng = Rng::new(2);
    let clicks: Vec<_> = (0..2000u64)
        .map(|i| {
            let (u, j) = world.sample_click(&mut rng);
            (
                Some(world.users[u].id.to_string()),
                world.click_event(u, j, now_ms(), i).to_json(),
                None,
            )
        })
        .collect();
    produce(&c, &c.kafka.event_topics[0], &clicks).await;

    let (s, v) = http(&client, "GET", format!("{base}/v1/recall/u1?k=10"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 10);

    // A new item appears without a single click; a deleted one disappears.
    add_fresh_item_delete_i0(&c).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ids = recall_ids(&client, &base, "u1").await;
        if ids.iter().any(|i| i == "fresh-item") && !ids.iter().any(|i| i == "i0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "catalogue change not served: {} items",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    if index == Index::HnswWithDeltas {
        assert!(
            metrics.serve.delta_generations.get() >= 1,
            "the change should have been served by a delta generation"
        );
    } else {
        assert_eq!(metrics.serve.delta_generations.get(), 0);
    }

    // Wait until every click is trained, then check freshness and generations. Meanwhile new
    // generations keep coming: the deleted item never comes back, the new one never leaves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ids = recall_ids(&client, &base, "u1").await;
        assert!(!ids.iter().any(|i| i == "i0"), "a deleted item came back");
        assert!(
            ids.iter().any(|i| i == "fresh-item"),
            "the new item went away"
        );
        let trained = trained_clicks(&metrics);
        if trained >= 2000.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "training stalled at {trained} examples"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every sampled click reaches a generation, even after the stream went idle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while metrics.serve.freshness_seconds.get_sample_count() < 2000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 2000 clicks reached a generation",
            metrics.serve.freshness_seconds.get_sample_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freshness = metrics.serve.freshness_seconds.get_sample_count();
    let (_, info) = http(&client, "GET", format!("{base}/v1/model"), None).await;
    assert_eq!(info["catalog_size"], 80, "80 items + fresh-item − i0");
    let p_sum = metrics.serve.freshness_seconds.get_sample_sum() / freshness as f64;
    eprintln!(
        "mean freshness {p_sum:.3}s over {freshness} clicks; generations {}",
        metrics.serve.generations.get()
    );
    assert!(metrics.serve.generations.get() >= 2);
    // Every 4th click was checked against the served top-K before training on it.
    let checked = metrics.serve.prequential_clicks.get();
    assert!(checked > 100, "prequential checks: {checked}");
    let recall = metrics.serve.prequential_recall.get();
    assert!((0.0..=1.0).contains(&recall));
    eprintln!("prequential Recall@100 {recall:.3} over the last checks of {checked}");

    let summary = service.shutdown().await.unwrap();
    assert_eq!(summary.total_clicks, 2000);
    assert_eq!(
        checkpoint::list(dir.path()).unwrap()[0].step,
        summary.global_step
    );
}
