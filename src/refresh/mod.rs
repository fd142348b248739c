//! Continuous refresh: model snapshots from the trainer become index generations.
//!
//! ```text
//!  trainer thread ── every refresh interval (or after N catalogue changes) ──▶ CatchUp
//!        (copies of the rows changed since the last one: the only cost the trainer pays)
//!  refresher thread ── Mirror.apply ── FrozenModel ── embed every active item (batched,
//!        no grad, once per distinct input) ── main index (a scan, lists for this version,
//!        or links) ──▶ Generation { model snapshot, index, key → item } ── ArcSwap ──▶ readers
//! ```
//!
//! A generation pairs the index with the user tower of the *same* snapshot, so a request never
//! mixes versions; the previous generation is freed when its last reader drops it. When the
//! catalogue changes while training is idle, the refresher rebuilds with the latest snapshot.

pub mod embed;
pub mod facets;
pub mod mirror;
pub mod relink;

pub use embed::{embed_catalogue, embed_items, Embedding};
pub use facets::Facets;
pub use mirror::{FrozenModel, Mirror, MirrorUpdate, ModelFeed, POPULAR_KEPT};
pub use relink::RelinkCause;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use crate::catalog::{ItemFeatures, SharedCatalog};
use crate::config::{Config, IndexConfig, LargeCatalog};
use crate::event::Id;
use crate::index::{ClusteredVectors, Hit, IndexError, ItemIndex, SharedGraph};
use crate::metrics::ServeMetrics;
use crate::train::changes::CatchUp;
use crate::train::online::AfterStep;
use crate::train::Trainer;

/// One served version: a model snapshot and the index of the catalogue it embedded.
///
/// For large catalogues a generation may be a *delta* on top of an earlier one: the same model
/// and main index (shared), items added or changed since searched exactly from `delta`, and
/// main keys of deleted or changed items hidden. Both parts come from the same model snapshot.
pub struct Generation {
    /// Sequence number (1, 2, ...).
    pub number: u64,
    /// The model.
    pub model: Arc<FrozenModel>,
    /// Items by key: the main index's first, then the delta's.
    pub items: Vec<Arc<ItemFeatures>>,
    /// Key of each live item (shared by the generations of one item set: 10M entries).
    pub keys: Arc<HashMap<Id, u64>>,
    /// The main index (keys `0..main_len`), shared by the deltas built on it.
    pub index: Arc<ItemIndex>,
    /// The main index's items by category and genre (shared like the index).
    pub facets: Arc<Facets>,
    /// Items covered by the main index.
    pub main_len: usize,
    /// Vectors of `items[main_len..]`, searched exactly.
    pub delta: Vec<f32>,
    /// Main keys not to return (deleted or changed since the main index was built).
    pub hidden: HashSet<u64>,
    /// Catalogue version embedded.
    pub catalog_version: u64,
    /// When it was published (Unix seconds).
    pub published_unix: f64,
    /// Time to embed and build.
    pub build_seconds: f64,
    /// Distinct tower inputs among the main items (what their embedding pass ran); `None`
    /// where the vectors came from elsewhere (a replica's shipped generation).
    pub distinct_inputs: Option<usize>,
}

impl Generation {
    /// Top-`k` among keys `keep` accepts: the main index (minus hidden keys) merged with the
    /// exact delta. With `facet`, `keep` accepts only that facet's items; a small facet is
    /// then searched exactly over its own main items (see [`Facets`]) instead of the graph.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        facet: Option<&str>,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        let main_keep = |key| !self.hidden.contains(&key) && keep(key);
        let mut hits = match facet.and_then(|f| self.facets.small(f)) {
            Some(keys) => self.index.search_among(query, k, keys, main_keep)?,
            None => self.index.search(query, k, main_keep)?,
        };
        if !self.delta.is_empty() {
            let base = self.main_len as u64;
            let dim = self.index.dim();
            hits.extend(
                crate::index::brute_force(&self.delta, dim, query, k, |i| keep(base + i))
                    .into_iter()
                    .map(|h| Hit {
                        key: base + h.key,
                        score: h.score,
                    }),
            );
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(k);
        }
        Ok(hits)
    }

    /// Live items served.
    pub fn catalog_size(&self) -> usize {
        self.keys.len()
    }

    /// Items searched exactly on top of the main index.
    pub fn delta_len(&self) -> usize {
        self.items.len() - self.main_len
    }

    /// True for a generation that reuses an earlier main index with changes on top.
    pub fn is_delta(&self) -> bool {
        self.delta_len() > 0 || !self.hidden.is_empty()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Builds a generation from a snapshot and the active catalogue.
pub fn build(
    number: u64,
    model: Arc<FrozenModel>,
    catalog: &SharedCatalog,
    config: &IndexConfig,
) -> Result<Generation, IndexError> {
    build_from(
        number,
        model,
        catalog_items(catalog),
        config,
        WithoutLinks::Build,
    )
}

/// The active items (as shared pointers) and the catalogue version they are.
pub fn catalog_items(catalog: &SharedCatalog) -> (Vec<Arc<ItemFeatures>>, u64) {
    let c = catalog.read().unwrap_or_else(|p| p.into_inner());
    (c.items().cloned().collect(), c.version())
}

/// What a large catalogue's main index is when its distinct vectors are too many to scan and
/// no links are at hand for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithoutLinks {
    /// Build a graph as `index.large_catalog` says: links ([`SharedGraph`]) or an HNSW index.
    /// Seconds to minutes at a million items: a background build.
    Build,
    /// Scan every item: serves at once (a start, or a model whose vectors outgrew the scan of
    /// distinct vectors while links are built), at about 20 ms a request at a million items.
    Scan,
}

/// The main index over one embedding pass: every item scanned up to `index.exact_max_items`
/// items; above, the distinct vectors scanned while there are at most
/// `index.exact_max_distinct` (and `exact_max_items`) of them (exact, and nothing to build or
/// to go stale); else, as `index.large_catalog` says, lists redone for
/// this version (`clusters`, warm-started from `previous`'s centroids and searched at its
/// depth), `previous`'s links walked with these vectors (`relink`), or, without links, as
/// `without` says.
pub fn main_index(
    embedding: Embedding,
    previous: Option<&ItemIndex>,
    without: WithoutLinks,
    similarity: crate::config::Similarity,
    config: &IndexConfig,
) -> Result<ItemIndex, IndexError> {
    let dim = embedding.dim();
    if embedding.len() <= config.exact_max_items {
        return Ok(ItemIndex::exact(embedding.into_rows(), dim));
    }
    let few = embedding.distinct_inputs() <= config.exact_max_items.min(config.exact_max_distinct);
    if few || config.large_catalog == LargeCatalog::Clusters {
        let grouped = embedding.into_grouped().ok_or(IndexError::from(
            "an embedding pass whose items name missing rows",
        ))?;
        if few {
            return Ok(ItemIndex::grouped(grouped));
        }
        let lists = previous.and_then(ItemIndex::clustered_vectors);
        let started = Instant::now();
        let clustered = ClusteredVectors::build(grouped, lists.map(|l| l.centroids()));
        let depth = match previous.filter(|_| lists.is_some()) {
            Some(p) => p.expansion_per_k(),
            None => config.expansion_per_k,
        };
        let (lists, clustered_s) = (clustered.lists(), started.elapsed().as_secs_f64());
        let index = ItemIndex::clustered(clustered, depth);
        // Probed before it is served (tens of ms: exact scans of the distinct vectors), so
        // the depth is fixed with the version and replicas serve it as sent.
        let probe = relink::probe_and_tune(&index, config);
        tracing::debug!(
            lists,
            clustered_s,
            probed_s = started.elapsed().as_secs_f64() - clustered_s,
            ?probe,
            "lists built"
        );
        return Ok(index);
    }
    let rows = embedding.into_rows();
    let links = previous.and_then(ItemIndex::shared_graph).cloned();
    match (links, without, config.large_catalog) {
        (Some(links), _, _) => {
            let index = ItemIndex::linked(links, rows, dim, config)?;
            // Same links, similar staleness: start at the depth the last probe chose.
            if let Some(p) = previous {
                index.set_expansion_per_k(p.expansion_per_k());
            }
            Ok(index)
        }
        (None, WithoutLinks::Scan, _) => Ok(ItemIndex::exact(rows, dim)),
        (None, WithoutLinks::Build, LargeCatalog::Relink | LargeCatalog::Clusters) => {
            let graph = SharedGraph::build(&rows, dim, config)?;
            ItemIndex::linked(Arc::new(graph), rows, dim, config)
        }
        (None, WithoutLinks::Build, LargeCatalog::Rebuild) => {
            ItemIndex::build(&rows, dim, similarity, config)
        }
    }
}

/// [`build`] from items taken earlier (a background build embeds the catalogue as it was when
/// the build was decided, so later changes are seen as changes and served by deltas); a
/// catalogue that needs a graph gets one unless `without` says to scan it.
pub fn build_from(
    number: u64,
    model: Arc<FrozenModel>,
    (mut items, catalog_version): (Vec<Arc<ItemFeatures>>, u64),
    config: &IndexConfig,
    without: WithoutLinks,
) -> Result<Generation, IndexError> {
    let started = Instant::now();
    items.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    let embedding = embed_catalogue(&model, &items, config.embed_batch);
    let distinct_inputs = embedding.distinct_inputs();
    let similarity = model.towers.similarity();
    let index = main_index(embedding, None, without, similarity, config)?;
    let keys: HashMap<Id, u64> = items
        .iter()
        .enumerate()
        .map(|(i, f)| (f.item_id.clone(), i as u64))
        .collect();
    Ok(Generation {
        number,
        model,
        main_len: items.len(),
        facets: Arc::new(Facets::new(&items, config.filtered_exact_max)),
        items,
        keys: Arc::new(keys),
        index: Arc::new(index),
        delta: Vec::new(),
        hidden: HashSet::new(),
        catalog_version,
        published_unix: 0.0,
        build_seconds: started.elapsed().as_secs_f64(),
        distinct_inputs: Some(distinct_inputs),
    })
}

/// Key of every item not hidden: what a generation serves.
pub fn live_keys(items: &[Arc<ItemFeatures>], hidden: &HashSet<u64>) -> HashMap<Id, u64> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| !hidden.contains(&(*i as u64)))
        .map(|(i, f)| (f.item_id.clone(), i as u64))
        .collect()
}

/// A delta generation: `base`'s model and main index, plus the catalogue's changes since the
/// main index was built (new and changed items embedded with the same model and searched
/// exactly; deleted and changed main items hidden). Cost: O(catalogue) comparisons plus the
/// item tower on the changed items only.
pub fn with_changes(
    number: u64,
    base: &Generation,
    catalog: &SharedCatalog,
    config: &IndexConfig,
) -> Generation {
    let started = Instant::now();
    let (current, catalog_version) = catalog_items(catalog);
    let main = &base.items[..base.main_len];
    let main_keys: HashMap<&Id, u64> = main
        .iter()
        .enumerate()
        .map(|(i, f)| (&f.item_id, i as u64))
        .collect();
    let mut changed: Vec<Arc<ItemFeatures>> = Vec::new();
    let mut live_main: HashSet<u64> = HashSet::with_capacity(main.len());
    for item in current {
        match main_keys.get(&item.item_id) {
            Some(&k) if Arc::ptr_eq(&main[k as usize], &item) || *main[k as usize] == *item => {
                live_main.insert(k);
            }
            _ => changed.push(item),
        }
    }
    changed.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    let hidden: HashSet<u64> = (0..base.main_len as u64)
        .filter(|k| !live_main.contains(k))
        .collect();
    let delta = embed_items(&base.model, &changed, config.embed_batch);
    let mut items: Vec<Arc<ItemFeatures>> = main.to_vec();
    items.extend(changed);
    let keys = live_keys(&items, &hidden);
    Generation {
        number,
        model: base.model.clone(),
        items,
        keys: Arc::new(keys),
        index: base.index.clone(),
        facets: base.facets.clone(),
        main_len: base.main_len,
        delta,
        hidden,
        catalog_version,
        published_unix: 0.0,
        build_seconds: started.elapsed().as_secs_f64(),
        distinct_inputs: base.distinct_inputs,
    }
}

/// The generation readers see. Loading is wait-free; a swap never blocks a reader.
///
/// A replaced generation is *retired*, not dropped: freeing one (a million items' index,
/// features and a model copy) takes milliseconds, and whoever drops the last reference pays
/// for it. Left to the readers, that would be a recall request; retired generations are
/// freed by the publishing thread instead ([`Self::reclaim`], also run by every publish),
/// once no reader holds them.
#[derive(Default)]
pub struct Served {
    current: ArcSwapOption<Generation>,
    retired: Mutex<Vec<Arc<Generation>>>,
}

impl Served {
    /// The current generation (kept alive by the returned `Arc` for as long as needed).
    pub fn load(&self) -> Option<Arc<Generation>> {
        self.current.load_full()
    }

    /// Frees the retired generations no reader holds any more, on the calling thread.
    /// Returns how many are still read.
    pub fn reclaim(&self) -> usize {
        let free: Vec<Arc<Generation>> = {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            // Retired generations are out of `current`, so no reader can take a new reference:
            // a count of one (this list's) stays one.
            let (free, held) = retired.drain(..).partition(|g| Arc::strong_count(g) == 1);
            *retired = held;
            free
        };
        drop(free);
        self.retired.lock().map_or(0, |r| r.len())
    }

    /// Publishes a generation and returns the previous one, retired (see [`Self::reclaim`]):
    /// readers that still hold it never free it.
    pub fn publish(
        &self,
        mut generation: Generation,
        metrics: Option<&ServeMetrics>,
    ) -> Option<Arc<Generation>> {
        self.reclaim();
        let started = Instant::now();
        generation.published_unix = unix_now();
        let distinct_inputs = generation.distinct_inputs;
        let exact = generation.index.is_exact();
        let (probed, depth) = (
            generation.index.probed_recall(),
            generation.index.expansion_per_k(),
        );
        let (number, step, vectors, delta, is_delta, bytes, build) = (
            generation.number,
            generation.model.step,
            generation.catalog_size(),
            generation.delta_len(),
            generation.is_delta(),
            generation.index.memory_bytes() + std::mem::size_of_val(generation.delta.as_slice()),
            generation.build_seconds,
        );
        let published = generation.published_unix;
        let previous = self.current.swap(Some(Arc::new(generation)));
        if let Some(p) = &previous {
            self.retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(p.clone());
        }
        if let Some(m) = metrics {
            m.swap_seconds.observe(started.elapsed().as_secs_f64());
            m.build_seconds.observe(build);
            m.generations.inc();
            m.generation.set(number as i64);
            m.generation_model_step.set(step);
            m.generation_published.set(published);
            m.index_vectors.set(vectors as i64);
            m.index_delta_vectors.set(delta as i64);
            if let Some(n) = distinct_inputs {
                m.index_distinct_inputs.set(n as i64);
            }
            if is_delta {
                m.delta_generations.inc();
            }
            if exact {
                // A scan finds the exact answer.
                m.index_recall.set(1.0);
                m.index_search_depth.set(1.0);
            } else if let Some(recall) = probed {
                m.index_recall.set(recall);
                m.index_search_depth.set(depth);
            }
            m.index_bytes.set(bytes as i64);
        }
        previous
    }
}

/// Clicks sampled for the freshness histogram: (model step that trained them, event time ms).
pub type FreshnessSamples = Arc<Mutex<Vec<(i64, i64)>>>;

/// The trainer-side half: every interval or after enough catalogue changes, once the refresher
/// asked for it, hands the refresher what changed in the model (a full copy the first time),
/// and samples trained clicks for freshness. Until the refresher asks, changes keep
/// accumulating and are handed over at the first step end after it does.
pub fn trigger(
    config: &Config,
    catalog: SharedCatalog,
    feed: Arc<ModelFeed>,
    samples: FreshnessSamples,
    metrics: Option<ServeMetrics>,
) -> AfterStep {
    let interval = Duration::from_millis(config.index.refresh_interval_ms);
    let on_changes = config.index.refresh_on_changes as u64;
    let every = config.index.freshness_sample_every;
    let mut last = Instant::now() - interval;
    let mut last_step = None;
    let mut last_catalog = 0u64;
    let mut seen = 0u64;
    Box::new(move |trainer: &mut Trainer, report| {
        let step = trainer.global_step();
        if every > 0 && !report.is_idle() {
            let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
            for t in trainer.last_positive_times() {
                seen += 1;
                if seen.is_multiple_of(every) {
                    s.push((step, *t));
                }
            }
        }
        let version = catalog.read().map(|c| c.version()).unwrap_or(0);
        let changed = on_changes > 0 && version.saturating_sub(last_catalog) >= on_changes;
        let newer = last_step != Some(step);
        if newer && feed.is_wanted() && (last.elapsed() >= interval || changed) {
            let started = Instant::now();
            let offered = feed.try_offer(|| match trainer.take_delta() {
                Some(delta) => MirrorUpdate::Delta(delta),
                None => MirrorUpdate::Full(Box::new(Mirror::of(trainer))),
            });
            if offered {
                if let Some(m) = &metrics {
                    m.handoff_seconds.observe(started.elapsed().as_secs_f64());
                }
                last = Instant::now();
                last_step = Some(step);
                last_catalog = version;
            }
        }
    })
}

/// A probe of a served generation's links (see [`relink::probe_and_tune`]) on its own thread.
struct ProbeRun {
    /// The generation probed.
    generation: Arc<Generation>,
    thread: std::thread::JoinHandle<Option<relink::Probe>>,
}

/// The refresher: builds and publishes generations; runs on its own thread.
pub struct Refresher {
    /// Configuration (`[index]`).
    pub config: Config,
    /// The catalogue to embed.
    pub catalog: SharedCatalog,
    /// Model updates from the trainer.
    pub feed: Arc<ModelFeed>,
    /// Where generations are published.
    pub served: Arc<Served>,
    /// Clicks waiting for the generation that includes them.
    pub samples: FreshnessSamples,
    /// Serving metrics.
    pub metrics: Option<ServeMetrics>,
    /// Ships every published generation to serving replicas (`towerstream train`).
    pub publisher: Option<Arc<dyn GenerationSink>>,
}

/// Where the refresher hands what it serves on to, besides its own readers: the
/// generations topic for serving replicas ([`crate::generations::PublishQueue`]).
///
/// A trait so that this stage does not depend on the one downstream of it: the refresher calls
/// these on its own thread, so each must return at once (the sink sends elsewhere).
pub trait GenerationSink: Send + Sync {
    /// The refresher is about to apply `delta`: its changed rows must go with the next message.
    fn note(&self, delta: &CatchUp);
    /// The refresher received a full model copy (a restart): the next message is full.
    fn note_full(&self);
    /// A generation was just served; one still waiting may be replaced by it.
    fn offer(&self, generation: Arc<Generation>);
}

impl Refresher {
    /// Publishes `g` with the next number and times the sampled clicks it is the first
    /// generation to include.
    /// Returns the model of the generation it replaced when no other generation shares it
    /// (a spare for the next snapshot).
    fn publish(&self, mut g: Generation) -> Option<Arc<FrozenModel>> {
        g.number = self.served.load().map_or(1, |c| c.number + 1);
        let step = g.model.step;
        let model = g.model.clone();
        let previous = self.served.publish(g, self.metrics.as_ref());
        let now_ms = (unix_now() * 1000.0) as i64;
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = &self.metrics {
            for (_, t) in s.iter().filter(|(st, _)| *st <= step) {
                m.freshness_seconds
                    .observe((now_ms - t).max(0) as f64 / 1000.0);
            }
        }
        s.retain(|(st, _)| *st > step);
        drop(s);
        if let (Some(p), Some(g)) = (&self.publisher, self.served.load()) {
            p.offer(g);
        }
        previous
            .map(|g| g.model.clone())
            .filter(|m| !Arc::ptr_eq(m, &model))
    }

    /// True when a generation of a newer model than `g`'s is served.
    fn is_older_than_served(&self, g: &Generation) -> bool {
        self.served
            .load()
            .is_some_and(|cur| cur.model.step > g.model.step)
    }

    /// Serves `base`'s items embedded with `model` (see [`relink::reembed`]: their distinct
    /// vectors scanned, or `base`'s links walked), plus the catalogue's changes since `base`
    /// was built; returns the replaced generation's model (see [`Self::publish`]). On failure
    /// the previous generation stays served.
    fn reembed(
        &self,
        base: Arc<Generation>,
        model: Arc<FrozenModel>,
        catalog_version: u64,
    ) -> Option<Arc<FrozenModel>> {
        let built = relink::reembed(&base, model, &self.config.index);
        drop(base);
        match built {
            Ok(g) if g.catalog_version == catalog_version => self.publish(g),
            Ok(g) => self.publish(with_changes(0, &g, &self.catalog, &self.config.index)),
            Err(e) => {
                tracing::error!(error = %e, "embedding a new model failed; serving the previous generation");
                None
            }
        }
    }

    /// Starts probing the served generation's links on a thread of its own, unless a probe is
    /// running, that generation was probed already (`last_probed` is the number of the last
    /// one started) or it has no shared links. The probe's exact searches and deep walks take
    /// seconds at a million items; on this thread they held up every next generation by that
    /// much (1.2-3.3 s after each 3 s embedding pass). Generations served while a probe runs
    /// are skipped, but the newest is always probed once the running probe is done.
    fn start_probe(&self, running: &mut Option<ProbeRun>, last_probed: &mut u64) {
        if running.is_some() {
            return;
        }
        let Some(generation) = self.served.load() else {
            return;
        };
        // Lists are probed as they are built; links on this thread, being slow to probe.
        if generation.number == *last_probed || generation.index.shared_graph().is_none() {
            return;
        }
        *last_probed = generation.number;
        let (probed, config) = (generation.clone(), self.config.index.clone());
        match std::thread::Builder::new()
            .name("towerstream-probe".into())
            .spawn(move || relink::probe_and_tune(&probed.index, &config))
        {
            Ok(thread) => *running = Some(ProbeRun { generation, thread }),
            Err(e) => tracing::warn!(error = %e, "cannot start the recall probe"),
        }
    }

    /// Takes a finished probe's verdict, if the links it probed are still the served ones (a
    /// relink that landed meanwhile makes it moot: its "changes" or "recall" cause would start
    /// another relink at once): reports its recall and depth (`towerstream_index_recall`,
    /// `towerstream_index_search_depth_per_k`), gives the depth it chose to the served
    /// generation (a newer model may walk the same links by now), and says whether the links
    /// are due for a rebuild.
    fn finish_probe(&self, running: &mut Option<ProbeRun>) -> Option<RelinkCause> {
        if !running.as_ref().is_some_and(|p| p.thread.is_finished()) {
            return None;
        }
        let ProbeRun { generation, thread } = running.take()?;
        let probe = thread.join().ok().flatten();
        let current = self.served.load()?;
        let same_links = match (
            current.index.shared_graph(),
            generation.index.shared_graph(),
        ) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same_links {
            return None;
        }
        if let Some(p) = probe {
            if let Some(m) = &self.metrics {
                m.index_recall.set(p.served);
                m.index_search_depth.set(p.depth_per_k);
            }
            current.index.set_expansion_per_k(p.depth_per_k);
        }
        let due = relink::relink_due(&generation, probe.map(|p| p.at_base), &self.config.index);
        if let Some(cause) = due {
            tracing::debug!(
                cause = cause.label(),
                ?probe,
                "shared links due for a rebuild"
            );
        }
        due
    }

    /// Counts and logs a model snapshot that holds a NaN or an infinity (one bad weight would
    /// make every recall answer garbage): no generation is built, served or shipped from it.
    fn refuse(&self, step: i64, tensor: &str) {
        tracing::error!(
            step,
            tensor,
            "model holds NaN or infinite values: no generation built, served or shipped from it"
        );
        if let Some(m) = &self.metrics {
            m.generations_refused.inc();
        }
    }

    /// Builds generations whenever a new snapshot arrived or the catalogue changed, checking at
    /// least every refresh interval, until `stop`.
    ///
    /// Catalogues up to `index.exact_max_items` get a full (exact) generation each time. Larger
    /// ones rebuild their HNSW index on a background thread — one build at a time, always
    /// with the newest snapshot — while catalogue changes are served within the interval by
    /// delta generations on top of the current one.
    pub fn run(self, stop: CancellationToken, rt: tokio::runtime::Handle) {
        let interval = Duration::from_millis(self.config.index.refresh_interval_ms);
        let mut background: Option<std::thread::JoinHandle<Result<Generation, IndexError>>> = None;
        let mut mirror: Option<Mirror> = None;
        // The model of the generation before the current one: once its readers are gone, the
        // next snapshot is copied into it.
        let mut spare: Option<Arc<FrozenModel>> = None;
        // Whether the mirror as it is now was found finite (`Some(false)`: it holds NaN or
        // infinite values and is never built, served or shipped). Unknown after each update.
        let mut finite: Option<bool> = None;
        // `relink` and `clusters`: every new model is one embedding pass over the main items.
        let relinking = self.config.index.large_catalog != LargeCatalog::Rebuild;
        // `relink`: links built in the background, waiting to be walked by the newest model.
        let mut new_links: Option<Generation> = None;
        // `relink`: why the served links should be rebuilt, once no build is running.
        let mut relink_wanted: Option<RelinkCause> = None;
        // `relink`: the probe of a served generation's links running on its own thread.
        let mut probing: Option<ProbeRun> = None;
        let mut last_probed = 0u64;
        let frozen =
            |mirror: &Mirror, spare: &mut Option<Arc<FrozenModel>>, finite: &mut Option<bool>| {
                let reusable = spare.take().and_then(|s| Arc::try_unwrap(s).ok());
                let snapshot = mirror.snapshot_into(reusable);
                if finite.is_none() {
                    let bad = snapshot.towers.first_non_finite();
                    if let Some(tensor) = &bad {
                        self.refuse(snapshot.step, tensor);
                    }
                    *finite = Some(bad.is_none());
                }
                (*finite == Some(true)).then(|| Arc::new(snapshot))
            };
        loop {
            // Ready for the trainer's next update: it comes at the end of its next step, not
            // from whenever the previous build started.
            self.feed.want();
            let asked = Instant::now();
            let woke = rt.block_on(async {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    _ = self.feed.offered() => true,
                    _ = tokio::time::sleep(interval) => true,
                }
            });
            if !woke {
                return;
            }
            self.feed.unwant();
            // Frees what readers left behind here, and the spare model with it.
            self.served.reclaim();
            relink_wanted = self.finish_probe(&mut probing).or(relink_wanted);
            self.start_probe(&mut probing, &mut last_probed);
            if background.as_ref().is_some_and(|h| h.is_finished()) {
                match background.take().map(|h| h.join()) {
                    // New links built with an older model than the one served: walk them with
                    // the newest model below instead of serving the older one.
                    // Either way the links are new: what was due for the old ones (changes
                    // since they were built, their recall) is not due for these.
                    Some(Ok(Ok(g))) if relinking && self.is_older_than_served(&g) => {
                        relink_wanted = None;
                        new_links = Some(g)
                    }
                    Some(Ok(Ok(g))) => {
                        spare = self.publish(g).or(spare);
                        if relinking {
                            relink_wanted = None;
                            self.start_probe(&mut probing, &mut last_probed);
                        }
                    }
                    Some(Ok(Err(e))) => {
                        tracing::error!(error = %e, "background index build failed")
                    }
                    Some(Err(_)) => tracing::error!("background index build panicked"),
                    None => {}
                }
            }
            let update = self.feed.take();
            if update.is_some() {
                // Known finite only if it was and the delta brings no NaN or infinity;
                // otherwise the next snapshot is checked whole.
                let finite_delta = match &update {
                    Some(MirrorUpdate::Delta(d)) => d.first_non_finite().is_none(),
                    _ => false,
                };
                finite = (finite == Some(true) && finite_delta).then_some(true);
                tracing::debug!(
                    waited_s = asked.elapsed().as_secs_f64(),
                    "model update taken"
                );
            }
            match update {
                Some(MirrorUpdate::Full(m)) => {
                    if let Some(p) = &self.publisher {
                        p.note_full();
                    }
                    mirror = Some(*m)
                }
                Some(MirrorUpdate::Delta(d)) => match mirror.as_mut() {
                    Some(m) => {
                        if let Some(p) = &self.publisher {
                            p.note(&d);
                        }
                        m.apply(d)
                    }
                    None => tracing::error!("model delta without a full copy first; ignored"),
                },
                None => {}
            }
            let Some(mirror) = mirror.as_ref() else {
                continue;
            };
            // A refused model is not tried again; catalogue changes are still served, with the
            // model of the current generation.
            let usable = finite != Some(false);
            let (catalog_version, items) = self
                .catalog
                .read()
                .map(|c| (c.version(), c.item_count()))
                .unwrap_or((0, 0));
            let mut current = self.served.load();
            let mut model_new = usable
                && current
                    .as_ref()
                    .is_none_or(|g| g.model.step != mirror.step());
            let mut catalog_new = current
                .as_ref()
                .is_none_or(|g| g.catalog_version != catalog_version);
            let links_due = relink_wanted.is_some() && background.is_none();
            if !model_new && !catalog_new && !links_due && new_links.is_none() {
                continue; // nothing new to serve, nothing to build
            }
            if items <= self.config.index.exact_max_items {
                let model = if usable {
                    frozen(mirror, &mut spare, &mut finite)
                } else {
                    current.as_ref().map(|g| g.model.clone())
                };
                let Some(model) = model else {
                    continue;
                };
                drop(current); // the generation being replaced must not outlive the swap
                match build(0, model, &self.catalog, &self.config.index) {
                    Ok(g) => spare = self.publish(g),
                    Err(e) => {
                        tracing::error!(error = %e, "generation build failed; serving the previous one")
                    }
                }
                continue;
            }
            if current.is_none() && usable {
                // Nothing served yet (a start): serve at once — the distinct vectors scanned, or
                // every item while the first graph builds (minutes at a million items, when the
                // API used to answer 503). The same answers as the graph, a fresh model.
                if let Some(model) = frozen(mirror, &mut spare, &mut finite) {
                    let items = catalog_items(&self.catalog);
                    match build_from(0, model, items, &self.config.index, WithoutLinks::Scan) {
                        Ok(g) => spare = self.publish(g).or(spare),
                        Err(e) => tracing::error!(error = %e, "first generation failed"),
                    }
                    current = self.served.load();
                    catalog_new = false;
                    model_new = false;
                }
            }
            if relinking && usable && (model_new || new_links.is_some()) {
                // A new model is one embedding pass over the current main items (new links, if
                // built meanwhile): their distinct vectors scanned or the links walked.
                let base = new_links.take().map(Arc::new).or_else(|| current.clone());
                if let Some(base) = base {
                    let started = Instant::now();
                    let Some(model) = frozen(mirror, &mut spare, &mut finite) else {
                        continue;
                    };
                    let (step, copied) = (model.step, started.elapsed());
                    drop(current); // the generation being replaced must not outlive the swap
                    if let Some(previous) = self.reembed(base, model, catalog_version) {
                        spare = Some(previous);
                    }
                    self.start_probe(&mut probing, &mut last_probed);
                    tracing::debug!(
                        step,
                        copy_s = copied.as_secs_f64(),
                        served_s = started.elapsed().as_secs_f64(),
                        "new model embedded"
                    );
                    // Served now; what is left is starting new links if they are due.
                    catalog_new = false;
                    current = self.served.load();
                }
            }
            // `relink` builds links only while every item is scanned (more distinct vectors
            // than `exact_max_items`, no links yet) or when they are due; `rebuild` always has
            // one build running.
            let scanning_all = current.as_ref().is_none_or(|g| {
                g.index
                    .scanned_vectors()
                    .is_some_and(|n| n > self.config.index.exact_max_items)
            });
            let build_now = !relinking || scanning_all || relink_wanted.is_some();
            if background.is_none() && usable && build_now {
                if relinking {
                    let cause = relink_wanted.take().unwrap_or(RelinkCause::First);
                    if let Some(m) = &self.metrics {
                        m.relinks.with_label_values(&[cause.label()]).inc();
                    }
                    tracing::info!(
                        cause = cause.label(),
                        items,
                        "linking the catalogue in the background"
                    );
                }
                if let Some(model) = frozen(mirror, &mut spare, &mut finite) {
                    let (items, config) = (catalog_items(&self.catalog), self.config.index.clone());
                    // A change that arrived since the version was read above (the model copy
                    // takes a while) is in this build; serve it by a delta now as well, not
                    // only when the build is done.
                    catalog_new |= items.1 != catalog_version;
                    background = Some(std::thread::spawn(move || {
                        build_from(0, model, items, &config, WithoutLinks::Build)
                    }));
                }
            }
            if let Some(cur) = current.filter(|_| catalog_new) {
                let g = with_changes(0, &cur, &self.catalog, &self.config.index);
                drop(cur);
                if relinking {
                    relink_wanted =
                        relink::relink_due(&g, None, &self.config.index).or(relink_wanted);
                }
                spare = self.publish(g).or(spare);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::event::Event;
    use crate::synth::{World, WorldConfig};
    use crate::train::sampler::Rng;

    /// Steps `trainer` once on clicks of `world`, then runs the trigger as the loop does.
    fn step(
        trainer: &mut Trainer,
        world: &World,
        catalog: &Catalog,
        rng: &mut Rng,
        trigger: &mut AfterStep,
    ) -> i64 {
        let batch: Vec<_> = (0..16)
            .map(|i| {
                let (u, j) = world.sample_click(rng);
                world.example(u, j, i, i)
            })
            .collect();
        let report = trainer.step(&batch, catalog);
        trigger(trainer, &report);
        trainer.global_step()
    }

    #[test]
    fn the_trainer_hands_over_the_model_only_once_the_refresher_asked_for_it() {
        let world = World::new(WorldConfig {
            users: 50,
            items: 50,
            ..WorldConfig::default()
        });
        let mut catalog = Catalog::default();
        for e in world.item_events() {
            if let Event::Item(i) = e {
                let _ = catalog.apply_item(&i);
            }
        }
        let mut config = Config::default();
        config.index.refresh_interval_ms = 100;
        let mut trainer = Trainer::new(&config);
        let feed = Arc::new(ModelFeed::default());
        let shared: SharedCatalog = Arc::default();
        let mut trigger = trigger(&config, shared, feed.clone(), Arc::default(), None);
        let mut rng = Rng::new(3);

        step(&mut trainer, &world, &catalog, &mut rng, &mut trigger);
        assert!(
            matches!(feed.take(), Some(MirrorUpdate::Full(_))),
            "the first copy is wanted at once"
        );
        // The refresher is building: however long that takes, the trainer keeps its changes.
        std::thread::sleep(Duration::from_millis(150));
        step(&mut trainer, &world, &catalog, &mut rng, &mut trigger);
        assert!(
            feed.take().is_none(),
            "offered while the refresher was busy"
        );
        // It asks: the next step's end hands over the model as of that step.
        feed.want();
        let asked_at = step(&mut trainer, &world, &catalog, &mut rng, &mut trigger);
        match feed.take() {
            Some(MirrorUpdate::Delta(d)) => assert_eq!(d.step, asked_at),
            _ => panic!("no delta after the refresher asked"),
        }
        // Not again before it asks again.
        std::thread::sleep(Duration::from_millis(150));
        step(&mut trainer, &world, &catalog, &mut rng, &mut trigger);
        assert!(feed.take().is_none());
    }

    /// Above `exact_max_items` items, the distinct vectors are scanned only while there are
    /// at most `exact_max_distinct` of them; past that the lists take over (every request
    /// would otherwise scan them all).
    #[test]
    fn a_large_catalogue_scans_its_distinct_vectors_only_while_they_are_few() {
        use crate::config::Similarity;
        let (config, model, items) = embed::six_inputs_fixture();
        let kind = |exact_max_items: usize, exact_max_distinct: usize| {
            let mut index = config.index.clone();
            index.exact_max_items = exact_max_items;
            index.exact_max_distinct = exact_max_distinct;
            let embedding = embed_catalogue(&model, &items, 64);
            assert_eq!(embedding.distinct_inputs(), 6);
            main_index(
                embedding,
                None,
                WithoutLinks::Scan,
                Similarity::Cosine,
                &index,
            )
            .expect("index")
            .kind()
        };
        assert_eq!(kind(100, 6), "distinct");
        assert_eq!(kind(100, 5), "lists");
        // Never more than a catalogue scanned whole.
        assert_eq!(kind(5, 100), "lists");
    }

    /// A request that still reads a replaced generation never frees it: the last reference is
    /// the retired list's, and the publishing thread frees it once the readers are gone.
    #[test]
    fn a_reader_never_frees_the_generation_it_held() {
        let trainer = Trainer::new(&Config::default());
        let model = Arc::new(FrozenModel::of(&trainer));
        let catalog: SharedCatalog = Arc::default();
        let config = Config::default().index;
        let generation = || build(1, model.clone(), &catalog, &config).expect("generation");
        let served = Served::default();
        served.publish(generation(), None);
        let reader = served.load().expect("served");
        let first = Arc::downgrade(&reader);
        drop(served.publish(generation(), None));
        assert_eq!(served.reclaim(), 1, "still read");
        // The request finishes: dropping its reference frees nothing.
        drop(reader);
        assert!(first.upgrade().is_some(), "freed by the reader");
        assert_eq!(served.reclaim(), 0);
        assert!(first.upgrade().is_none(), "never freed");
        // Publishing reclaims too: the retired list does not grow with swaps.
        for _ in 0..5 {
            served.publish(generation(), None);
        }
        assert_eq!(served.retired.lock().map(|r| r.len()).unwrap_or(0), 1);
    }
}
