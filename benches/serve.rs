//! Serving: index build time versus catalogue size, search latency and recall of the usearch
//! index (top-100, top-1000 at two depths, a selective filter walked and as a facet), and
//! recall latency/QPS through the HTTP API, closed loop with and without training running and
//! open loop at fixed arrival rates.
//!
//! `cargo bench --bench serve [-- --json] [-- --sizes 10000,100000,1000000] [-- --seconds 5]
//! [-- --http-only] [-- --train-nice 0,5,10] [-- --open-rates 1000,20000]` (`--train-nice`:
//! the trainer thread's priority offsets to compare; default the configured `train.nice`;
//! `--open-rates`: open-loop arrival rates, latency from each request's intended send time).
//! `-- --scans [--sizes 100000,400000,1000000]`: the exact scan of a large catalogue's distinct
//! vectors and the search of its lists, at the model's width, against a catalogue of 1M items.
//! Under `cargo test` it runs a smoke pass only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use towerstream::catalog::{Catalog, ItemFeatures};
use towerstream::config::{Config, IndexConfig, Similarity};
use towerstream::event::{Dense, Event, Id};
use towerstream::index::shared_graph::SharedGraph;
use towerstream::index::{brute_force, ClusteredVectors, GroupedVectors, ItemIndex};
use towerstream::metrics::Metrics;
use towerstream::refresh::{embed_items, Facets, FrozenModel, Generation, Served};
use towerstream::serve::api::router;
use towerstream::serve::load::{open_loop, percentile, recall_load};
use towerstream::serve::{Context, ServeState};
use towerstream::synth::{World, WorldConfig};
use towerstream::train::sampler::Rng;
use towerstream::train::Trainer;

#[derive(Serialize)]
struct Row {
    benchmark: String,
    items: usize,
    value: f64,
    unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recall: Option<f64>,
}

/// Embedding-like vectors: 1000 cluster centres on the unit sphere plus noise, normalised.
fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut gauss = move || {
        let u1 = rng.next_f64().max(1e-12);
        let u2 = rng.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let centres: Vec<f32> = (0..1000 * dim).map(|_| gauss()).collect();
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[(i % 1000) * dim..(i % 1000 + 1) * dim];
        let v: Vec<f32> = c.iter().map(|x| x + 0.5 * gauss()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

fn index_rows(
    n: usize,
    dim: usize,
    queries: usize,
    config: &IndexConfig,
) -> (Vec<Row>, ItemIndex, Vec<f32>) {
    let v = vectors(n, dim, 1);
    let started = Instant::now();
    let index = ItemIndex::build(&v, dim, Similarity::Cosine, config).expect("build");
    let build = started.elapsed().as_secs_f64();
    let qs = vectors(queries, dim, 99);
    let mut lat = Vec::with_capacity(queries);
    let mut overlap = 0usize;
    for q in qs.chunks_exact(dim) {
        let t = Instant::now();
        let hits = index.search(q, 100, |_| true).expect("search");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        let exact: std::collections::HashSet<u64> = index
            .exact_search(q, 100)
            .expect("exact")
            .iter()
            .map(|h| h.key)
            .collect();
        overlap += hits.iter().filter(|h| exact.contains(&h.key)).count();
    }
    lat.sort_by(f64::total_cmp);
    let flat = ItemIndex::exact(v.clone(), dim);
    let mut flat_lat = Vec::with_capacity(queries);
    for q in qs.chunks_exact(dim) {
        let t = Instant::now();
        std::hint::black_box(flat.search(q, 100, |_| true).expect("search"));
        flat_lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    flat_lat.sort_by(f64::total_cmp);
    let mut rows = vec![
        Row {
            benchmark: "exact (brute force) search top-100, 1 thread".into(),
            items: n,
            value: queries as f64 / flat_lat.iter().sum::<f64>() * 1000.0,
            unit: "queries/s",
            p50_ms: Some(percentile(&flat_lat, 0.5)),
            p99_ms: Some(percentile(&flat_lat, 0.99)),
            recall: Some(1.0),
        },
        seconds_row("index build (single writer)".into(), n, build),
        Row {
            benchmark: "usearch search top-100, 1 thread".into(),
            items: n,
            value: queries as f64 / lat.iter().sum::<f64>() * 1000.0,
            unit: "queries/s",
            p50_ms: Some(percentile(&lat, 0.5)),
            p99_ms: Some(percentile(&lat, 0.99)),
            recall: Some(overlap as f64 / (100 * queries) as f64),
        },
    ];
    if let Some(r) = faiss_reference(&v, &qs, dim, rows[2].recall.unwrap_or(0.9), config) {
        rows.push(r);
    }
    rows.extend(depth_rows(&index, &v, &qs, dim, config));
    (rows, index, v)
}

/// The graph that outlives model versions (`--shared-graph`): linked once for the vectors of
/// one version, searched with those of a later one whose every vector moved by `drift`
/// (relative noise, renormalised) — recall@100 against exact search of the later version, next
/// to a graph built natively for it, and the indirect metric's cost per search.
fn shared_graph_rows(n: usize, dim: usize, queries: usize, config: &IndexConfig) -> Vec<Row> {
    let v0 = vectors(n, dim, 1);
    let started = Instant::now();
    let graph = SharedGraph::build(&v0, dim, config).expect("build");
    let mut rows = vec![Row {
        benchmark: "shared graph: link (single writer, indirect metric)".into(),
        items: n,
        value: started.elapsed().as_secs_f64(),
        unit: "s",
        p50_ms: None,
        p99_ms: None,
        recall: None,
    }];
    let noise = vectors(n, dim, 2);
    let qs = vectors(queries, dim, 99);
    for drift in [0.0f32, 0.1, 0.3, 0.6] {
        let mut v1: Vec<f32> = v0.iter().zip(&noise).map(|(a, b)| a + drift * b).collect();
        for row in v1.chunks_exact_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        let (mut lat, mut overlap) = (Vec::new(), 0usize);
        for q in qs.chunks_exact(dim) {
            let t = Instant::now();
            let hits = graph
                .search(&v1, q, 100, (2 * 100).max(config.expansion_search))
                .expect("search");
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            let exact: std::collections::HashSet<u64> = brute_force(&v1, dim, q, 100, |_| true)
                .iter()
                .map(|h| h.key)
                .collect();
            overlap += hits.iter().filter(|h| exact.contains(&h.key)).count();
        }
        lat.sort_by(f64::total_cmp);
        rows.push(latency_row(
            format!("shared graph linked at v0, searched with v1 (drift {drift}) top-100"),
            n,
            &lat,
            Some(overlap as f64 / (100 * queries) as f64),
        ));
    }
    rows
}

/// How far a real model's item vectors move between versions: the world's 2,000 items
/// embedded after a warm-up of 300 steps (batch 128) and again after 32, 320 and 1,600 more
/// — at 2,000 clicks/s, 2 s, 20 s and 100 s of stream. The value is the mean L2 distance of
/// an item's unit vector between the two versions: the `drift` of the shared-graph rows is
/// about the same measure (noise of norm `drift` added before renormalising).
/// The scans a large catalogue's requests run: every distinct vector (up to
/// `index.exact_max_items` of them), and the lists of a clustered index at the default depth
/// (2 candidates per result: 1/16 of the lists). `n` distinct vectors of the model's width
/// stand for a catalogue of `items` (each item a vector drawn from them).
fn scan_rows(n: usize, items: usize, dim: usize, queries: usize) -> Vec<Row> {
    let v = vectors(n, dim, 1);
    let mut rng = Rng::new(5);
    let group_of: Vec<u32> = (0..items)
        .map(|i| if i < n { i as u32 } else { rng.below(n) as u32 })
        .collect();
    let grouped = GroupedVectors::new(v, group_of.clone(), dim).expect("groups");
    let started = Instant::now();
    let lists = ClusteredVectors::build(
        GroupedVectors::new(grouped.distinct_rows().to_vec(), group_of, dim).expect("groups"),
        None,
    );
    let build = started.elapsed().as_secs_f64();
    let qs = vectors(queries, dim, 99);
    let (mut scan_lat, mut list_lat, mut overlap) = (Vec::new(), Vec::new(), 0usize);
    for q in qs.chunks_exact(dim) {
        let t = Instant::now();
        let exact = std::hint::black_box(grouped.search(q, 100, |_| true));
        scan_lat.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let hits = std::hint::black_box(lists.search(q, 100, 2.0, |_| true));
        list_lat.push(t.elapsed().as_secs_f64() * 1000.0);
        let floor = exact.last().map_or(f32::NEG_INFINITY, |h| h.score);
        overlap += hits.iter().filter(|h| h.score >= floor).count();
    }
    scan_lat.sort_by(f64::total_cmp);
    list_lat.sort_by(f64::total_cmp);
    vec![
        latency_row(
            format!("distinct scan top-100, {dim}-wide, 1 thread ({items} items)"),
            n,
            &scan_lat,
            Some(1.0),
        ),
        seconds_row(format!("lists ({}) build, cold", lists.lists()), n, build),
        latency_row(
            format!(
                "lists search top-100 at depth 2 ({} of {} lists), 1 thread",
                lists.lists_scanned(2.0, 100),
                lists.lists()
            ),
            n,
            &list_lat,
            Some(overlap as f64 / (100 * queries) as f64),
        ),
    ]
}

fn model_drift_rows() -> Vec<Row> {
    let world = World::new(WorldConfig {
        users: 2000,
        items: 2000,
        ..WorldConfig::default()
    });
    let mut catalog = Catalog::default();
    for e in world.item_events().into_iter().chain(world.user_events()) {
        match e {
            Event::Item(i) => drop(catalog.apply_item(&i)),
            Event::User(u) => drop(catalog.apply_user(&u)),
            _ => {}
        }
    }
    let items: Vec<Arc<ItemFeatures>> = world.items.iter().map(|i| i.features.clone()).collect();
    let c = Config::default();
    let mut trainer = Trainer::new(&c);
    let mut rng = Rng::new(8);
    let mut steps = |trainer: &mut Trainer, n: usize| {
        for s in 0..n {
            let batch: Vec<_> = (0..c.train.batch_size)
                .map(|i| {
                    let (u, j) = world.sample_click(&mut rng);
                    world.example(u, j, (s * 1000 + i) as i64, i as i64)
                })
                .collect();
            trainer.step(&batch, &catalog);
        }
    };
    steps(&mut trainer, 300);
    let embed = |t: &Trainer| embed_items(&FrozenModel::of(t), &items, 8192);
    let before = embed(&trainer);
    let dim = before.len() / items.len();
    let mut rows = Vec::new();
    let mut done = 0;
    for after_steps in [32usize, 320, 1600] {
        steps(&mut trainer, after_steps - done);
        done = after_steps;
        let after = embed(&trainer);
        let moved: f64 = before
            .chunks_exact(dim)
            .zip(after.chunks_exact(dim))
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(x - y).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .sum::<f64>()
            / items.len() as f64;
        rows.push(Row {
            benchmark: format!("model drift: item vectors {after_steps} steps apart (batch 128)"),
            items: items.len(),
            value: moved,
            unit: "mean L2",
            p50_ms: None,
            p99_ms: None,
            recall: None,
        });
    }
    rows
}

/// A row of per-query latencies (sorted, ms): queries/s, p50, p99.
/// A row of something that took `seconds` once (a build).
fn seconds_row(benchmark: String, items: usize, seconds: f64) -> Row {
    Row {
        benchmark,
        items,
        value: seconds,
        unit: "s",
        p50_ms: None,
        p99_ms: None,
        recall: None,
    }
}

fn latency_row(benchmark: String, items: usize, lat: &[f64], recall: Option<f64>) -> Row {
    Row {
        benchmark,
        items,
        value: lat.len() as f64 / lat.iter().sum::<f64>().max(1e-12) * 1000.0,
        unit: "queries/s",
        p50_ms: Some(percentile(lat, 0.5)),
        p99_ms: Some(percentile(lat, 0.99)),
        recall,
    }
}

/// Large k and selective filters on the same graph: recall@1000 with the search depth at k
/// (what usearch does by itself) and at the configured multiple of k, and a filter passing
/// one item in a hundred (a small category) at k = 100 — how many of the k come back and how
/// many of the exact filtered top-k they are.
fn depth_rows(
    index: &ItemIndex,
    v: &[f32],
    qs: &[f32],
    dim: usize,
    config: &IndexConfig,
) -> Vec<Row> {
    let queries = (qs.len() / dim).min(100);
    let measure = |index: &ItemIndex, k: usize, keep: &dyn Fn(u64) -> bool| {
        let (mut lat, mut found, mut overlap) = (Vec::new(), 0usize, 0usize);
        for q in qs.chunks_exact(dim).take(queries) {
            let t = Instant::now();
            let hits = index.search(q, k, keep).expect("search");
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            let exact: std::collections::HashSet<u64> = brute_force(v, dim, q, k, keep)
                .iter()
                .map(|h| h.key)
                .collect();
            found += hits.len();
            overlap += hits.iter().filter(|h| exact.contains(&h.key)).count();
        }
        lat.sort_by(f64::total_cmp);
        let want = queries * k;
        (
            lat,
            found as f64 / want as f64,
            overlap as f64 / want as f64,
        )
    };
    let n = v.len() / dim;
    let mut rows = Vec::new();
    for per_k in [1.0, config.expansion_per_k] {
        index.set_expansion_per_k(per_k);
        let (lat, _, recall) = measure(index, 1000, &|_| true);
        rows.push(latency_row(
            format!("usearch search top-1000, depth {per_k} × k"),
            n,
            &lat,
            Some(recall),
        ));
    }
    let (lat, returned, recall) = measure(index, 100, &|key| key % 100 == 7);
    rows.push(latency_row(
        format!("usearch filtered walk top-100, 1 % pass; {returned:.3} of k returned"),
        n,
        &lat,
        Some(recall),
    ));
    // The plan a small facet gets (`index.filtered_exact_max`): exact over its own keys.
    let facet: Vec<u64> = (0..n as u64).filter(|key| key % 100 == 7).collect();
    let mut lat = Vec::new();
    for q in qs.chunks_exact(dim).take(queries) {
        let t = Instant::now();
        std::hint::black_box(
            index
                .search_among(q, 100, &facet, |_| true)
                .expect("search"),
        );
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    rows.push(latency_row(
        format!(
            "exact over a {}-item facet top-100 (small-facet plan)",
            facet.len()
        ),
        n,
        &lat,
        Some(1.0),
    ));
    rows
}

/// faiss-cpu HNSW on the same vectors at the same recall (`scripts/bench-deps` installs it);
/// `None` when the venv has no faiss.
fn faiss_reference(
    v: &[f32],
    queries: &[f32],
    dim: usize,
    recall: f64,
    c: &IndexConfig,
) -> Option<Row> {
    if !std::env::args().any(|a| a == "--bench") {
        return None; // smoke runs under `cargo test` stay in-process
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    let has = std::process::Command::new(&python)
        .args(["-c", "import faiss"])
        .output()
        .ok()?;
    if !has.status.success() {
        eprintln!("faiss reference skipped: run scripts/bench-deps to install faiss-cpu");
        return None;
    }
    let dir = std::env::temp_dir();
    let (vp, qp) = (
        dir.join("towerstream-bench-vectors.f32"),
        dir.join("towerstream-bench-queries.f32"),
    );
    let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(&vp, bytes(v)).ok()?;
    std::fs::write(&qp, bytes(queries)).ok()?;
    let out = std::process::Command::new(&python)
        .arg(format!("{root}/benches/faiss_reference.py"))
        .arg(&vp)
        .arg(&qp)
        .arg(dim.to_string())
        .arg(format!("{recall}"))
        .arg(c.connectivity.to_string())
        .arg(c.expansion_add.to_string())
        .output()
        .ok()?;
    let _ = (std::fs::remove_file(vp), std::fs::remove_file(qp));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(Row {
        benchmark: format!(
            "faiss-cpu {} HNSW top-100, 1 thread (efSearch {}, build {:.1} s)",
            j["faiss"].as_str().unwrap_or("?"),
            j["efSearch"],
            j["build_seconds"].as_f64().unwrap_or(0.0)
        ),
        items: j["items"].as_u64().unwrap_or(0) as usize,
        value: j["queries_per_second"].as_f64().unwrap_or(0.0),
        unit: "queries/s",
        p50_ms: j["p50_ms"].as_f64(),
        p99_ms: j["p99_ms"].as_f64(),
        recall: j["recall"].as_f64(),
    })
}

/// A served generation over `n` synthetic items, with a user tower trained on a small world.
fn generation(n: usize, trainer: &Trainer, config: &IndexConfig) -> (Generation, f64) {
    let snapshot = Arc::new(FrozenModel::of(trainer));
    let dim = snapshot.towers.output_dim() as usize;
    let v = vectors(n, dim, 5);
    let started = Instant::now();
    let index = ItemIndex::build(&v, dim, Similarity::Cosine, config).expect("build");
    let build = started.elapsed().as_secs_f64();
    let items: Vec<Arc<ItemFeatures>> = (0..n)
        .map(|j| {
            Arc::new(ItemFeatures {
                item_id: Id::new(format!("x{j}")),
                category: Some(format!("g{}", j % 8)),
                genres: vec![format!("g{}", j % 8)],
                dense: Dense::new(),
                updated_ms: 0,
            })
        })
        .collect();
    let keys: HashMap<Id, u64> = items
        .iter()
        .enumerate()
        .map(|(i, f)| (f.item_id.clone(), i as u64))
        .collect();
    let g = Generation {
        number: 1,
        model: snapshot,
        main_len: items.len(),
        facets: Arc::new(Facets::new(&items, config.filtered_exact_max)),
        items,
        keys: Arc::new(keys),
        index: Arc::new(index),
        delta: Vec::new(),
        hidden: Default::default(),
        catalog_version: 0,
        published_unix: 0.0,
        build_seconds: build,
        distinct_inputs: None,
    };
    (g, build)
}

async fn http_load(
    addr: std::net::SocketAddr,
    users: usize,
    seconds: f64,
    concurrency: usize,
) -> (f64, f64, f64) {
    let ids: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    let r = recall_load(&format!("http://{addr}"), &ids, 100, seconds, concurrency).await;
    assert_eq!(r.errors, 0, "recall requests failed");
    (r.requests_per_second, r.p50_ms, r.p99_ms)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let json = args.iter().any(|a| a == "--json");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<usize> = arg("--sizes")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| {
            if benching {
                vec![10_000, 30_000, 100_000]
            } else {
                vec![2_000]
            }
        });
    let seconds: f64 = arg("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 5.0 } else { 0.3 });
    let train_nices: Vec<i32> = arg("--train-nice")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![Config::default().train.nice]);
    let open_rates: Vec<f64> = arg("--open-rates")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| {
            if benching {
                vec![1000.0, 20_000.0]
            } else {
                vec![200.0]
            }
        });
    let dim = 64;
    let config = IndexConfig::default();
    let mut rows = Vec::new();
    let http_only = args.iter().any(|a| a == "--http-only");
    if args.iter().any(|a| a == "--shared-graph") {
        rows.extend(model_drift_rows());
        for &n in &sizes {
            rows.extend(shared_graph_rows(
                n,
                dim,
                if benching { 200 } else { 20 },
                &config,
            ));
        }
        print_rows(&rows, json);
        return;
    }
    if args.iter().any(|a| a == "--scans") {
        let width = Config::default().model.embedding_dim as usize;
        for &n in &sizes {
            let items = n.max(if benching { 1_000_000 } else { n });
            rows.extend(scan_rows(n, items, width, if benching { 500 } else { 20 }));
        }
        print_rows(&rows, json);
        return;
    }
    for &n in sizes.iter().filter(|_| !http_only) {
        let (r, _, _) = index_rows(n, dim, if benching { 500 } else { 20 }, &config);
        rows.extend(r);
    }

    // HTTP: a user tower trained on a small world, the largest size's index.
    let world = World::new(WorldConfig {
        users: 1000,
        items: 500,
        ..WorldConfig::default()
    });
    let mut catalog = Catalog::default();
    for e in world.user_events() {
        if let Event::User(u) = e {
            catalog.apply_user(&u);
        }
    }
    let mut c = Config::default();
    c.train.batch_size = 256;
    let mut trainer = Trainer::new(&c);
    let mut rng = Rng::new(8);
    let train_batch = |rng: &mut Rng| -> Vec<_> {
        (0..256)
            .map(|i| {
                let (u, j) = world.sample_click(rng);
                world.example(u, j, i, i)
            })
            .collect()
    };
    for _ in 0..20 {
        trainer.step(&train_batch(&mut rng), &catalog);
    }
    let n = *sizes.last().expect("a size");
    let (g, _) = generation(n, &trainer, &config);
    let served = Arc::new(Served::default());
    served.publish(g, None);
    let metrics = Metrics::new();
    let catalog = Arc::new(std::sync::RwLock::new(catalog));
    let state = ServeState {
        served,
        ctx: Context {
            catalog: catalog.clone(),
            histories: trainer.histories(),
            default_k: 100,
        },
        metrics,
        health: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(towerstream::serve::api::serve(
            listener,
            router(state, &c.serve),
            stop.clone(),
        ));
        addr
    });
    // Warm-up (page cache, allocator, connection pool), not reported.
    rt.block_on(http_load(addr, 1000, seconds.min(3.0), 4));
    let runs = std::iter::once(None).chain(train_nices.iter().copied().map(Some));
    for training in runs {
        let busy = Arc::new(AtomicBool::new(training.is_some()));
        let trainer_thread = training.map(|nice| {
            let busy = busy.clone();
            let catalog = catalog.clone();
            let world_batches: Vec<Vec<_>> = (0..50).map(|_| train_batch(&mut rng)).collect();
            let mut t = Trainer::new(&c);
            // As in the service: the trainer thread runs `train.nice` below request handling.
            towerstream::priority::spawn("bench-trainer", nice, move || {
                let mut steps = 0usize;
                while busy.load(Ordering::Acquire) {
                    t.step(
                        &world_batches[steps % world_batches.len()],
                        &catalog.read().expect("catalog"),
                    );
                    steps += 1;
                }
                steps
            })
            .expect("trainer thread")
        });
        let (qps, p50, p99) = rt.block_on(http_load(addr, 1000, seconds, 4));
        busy.store(false, Ordering::Release);
        let steps = trainer_thread.map(|h| h.blocking_recv().expect("trainer"));
        rows.push(Row {
            benchmark: format!(
                "HTTP POST /v1/recall k=100, 4 connections{}",
                steps.map_or(String::new(), |s| format!(
                    ", training alongside at nice +{} ({s} steps)",
                    training.unwrap_or_default()
                ))
            ),
            items: n,
            value: qps,
            unit: "requests/s",
            p50_ms: Some(p50),
            p99_ms: Some(p99),
            recall: None,
        });
    }
    // Open loop: requests leave at a fixed rate, latency from the intended send time; past
    // saturation the API sheds (503) instead of letting a queue grow.
    let ids: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    for &rate in &open_rates {
        let r = rt.block_on(open_loop(
            &format!("http://{addr}"),
            &ids,
            100,
            rate,
            seconds,
        ));
        rows.push(Row {
            benchmark: format!(
                "HTTP open loop {rate:.0} req/s k=100: {} ok, {} shed, {} 408, {} errors",
                r.ok, r.shed, r.timed_out, r.errors
            ),
            items: n,
            value: r.ok as f64 / r.seconds.max(1e-9),
            unit: "requests/s",
            p50_ms: Some(r.p50_ms),
            p99_ms: Some(r.p99_ms),
            recall: None,
        });
    }
    stop.cancel();

    print_rows(&rows, json);
}

/// The rows as a table, or as JSON.
fn print_rows(rows: &[Row], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(rows).expect("rows serialise")
        );
        return;
    }
    println!(
        "{:<72} {:>9} {:>12} {:<11} {:>8} {:>8} {:>7}",
        "benchmark", "items", "value", "unit", "p50 ms", "p99 ms", "recall"
    );
    for r in rows {
        let f = |x: Option<f64>, d: usize| x.map(|v| format!("{v:.d$}")).unwrap_or_default();
        println!(
            "{:<72} {:>9} {:>12.2} {:<11} {:>8} {:>8} {:>7}",
            r.benchmark,
            r.items,
            r.value,
            r.unit,
            f(r.p50_ms, 3),
            f(r.p99_ms, 3),
            f(r.recall, 4)
        );
    }
}
