//! A serving replica's side: the generations topic becomes served generations.
//!
//! The replica keeps its own copy of the user tower ([`Mirror`], as the refresher does), brought
//! up to date by each message, and its own index over the shipped item vectors (exact or HNSW
//! by its own `index` configuration). A message whose base it does not have (it started in the
//! middle, or a message was lost) is skipped until the next full one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use tch::{Device, Tensor};
use tokio_util::sync::CancellationToken;

use super::wire::{Assembler, ChunkHeader, GenerationMessage, ItemVectors, MainLists, ModelPart};
use crate::catalog::{ItemFeatures, SharedCatalog};
use crate::config::Config;
use crate::event::{Dense, Id};
use crate::features::FeatureSpec;
use crate::index::{ClusteredVectors, GroupedVectors, IndexError, ItemIndex, SharedGraph};
use crate::kafka;
use crate::metrics::Metrics;
use crate::refresh::{live_keys, relink, Facets, FrozenModel, Generation, Mirror, Served};
use crate::train::changes::CatchUp;
use crate::train::model::Towers;

/// Why a message was not served.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The message builds on a model version this replica does not have.
    #[error("generation {generation} builds on step {base}, this replica has {have:?}; waiting for a full generation")]
    Gap {
        /// Generation number.
        generation: u64,
        /// Step it builds on.
        base: i64,
        /// Step this replica is at.
        have: Option<i64>,
    },
    /// The trainer's model does not fit this replica's configuration.
    #[error("the trainer's model does not match this replica's configuration: {0}")]
    Incompatible(String),
    /// Sizes in the message do not add up.
    #[error("generation {generation} is malformed: {reason}")]
    Corrupt {
        /// Generation number.
        generation: u64,
        /// What does not add up.
        reason: String,
    },
    /// Building the index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl FollowError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            FollowError::Gap { .. } => "gap",
            FollowError::Incompatible(_) => "incompatible",
            FollowError::Corrupt { .. } | FollowError::Index(_) => "corrupt",
        }
    }
}

struct Main {
    generation: u64,
    /// The generation whose message carried the ids of these items.
    ids_generation: u64,
    items: Vec<Arc<ItemFeatures>>,
    index: Arc<ItemIndex>,
    facets: Arc<Facets>,
}

/// Turns generation messages into served generations.
pub struct Follower {
    config: Config,
    spec: FeatureSpec,
    catalog: SharedCatalog,
    served: Arc<Served>,
    metrics: Option<Metrics>,
    mirror: Option<Mirror>,
    model: Option<Arc<FrozenModel>>,
    spare: Option<Arc<FrozenModel>>,
    main: Option<Main>,
    /// Links received for linked main sets (`index.large_catalog = relink` on the trainer), and
    /// the generation that shipped them: later main sets walk them with their own vectors.
    links: Option<(u64, Arc<SharedGraph>)>,
    /// Shapes of this replica's user-tower variables (known from the first full message on),
    /// which every later message, delta or full, must match.
    shapes: BTreeMap<String, Vec<i64>>,
    /// The id → key map last served, reused while the items it maps stay the same.
    keys: Option<KeyMap>,
}

/// What a generation serves besides its model and delta vectors: its main set's index and
/// facets, its items (main, then delta), their id → key map, and the main keys hidden.
struct ServedItems {
    index: Arc<ItemIndex>,
    facets: Arc<Facets>,
    main_len: usize,
    items: Vec<Arc<ItemFeatures>>,
    keys: Arc<HashMap<Id, u64>>,
    hidden: HashSet<u64>,
}

/// An id → key map and what it was built from. A new model over the same main items, delta
/// items and hidden keys (most messages) serves the same map, as the trainer's generations
/// share theirs: building one for a million items took 0.5–2.5 s of the replica's 0.6–5 s per
/// message on the two cores it shares with the trainer, so the replica fell behind.
struct KeyMap {
    /// The generation whose message carried the main items' ids.
    ids_generation: u64,
    /// The delta items, in key order after the main ones.
    delta_ids: Vec<String>,
    /// Main keys not served.
    hidden: HashSet<u64>,
    keys: Arc<HashMap<Id, u64>>,
}

fn corrupt(generation: u64, reason: impl Into<String>) -> FollowError {
    FollowError::Corrupt {
        generation,
        reason: reason.into(),
    }
}

impl Follower {
    /// A follower publishing into `served`, resolving item features from `catalog`.
    pub fn new(
        config: &Config,
        catalog: SharedCatalog,
        served: Arc<Served>,
        metrics: Option<Metrics>,
    ) -> Follower {
        Follower {
            config: config.clone(),
            spec: FeatureSpec::new(&config.features),
            catalog,
            served,
            metrics,
            mirror: None,
            model: None,
            spare: None,
            main: None,
            links: None,
            shapes: BTreeMap::new(),
            keys: None,
        }
    }

    /// Model step this replica is at.
    pub fn step(&self) -> Option<i64> {
        self.mirror.as_ref().map(Mirror::step)
    }

    /// Applies one message and serves the generation it describes.
    pub fn apply(&mut self, mut m: GenerationMessage) -> Result<(), FollowError> {
        let started = Instant::now();
        let full = m.base_step.is_none();
        self.apply_model(&m)?;
        let model = self.model_at(&m)?;
        let model_s = started.elapsed().as_secs_f64();
        let new_main = m.main.is_some();
        if let Some(main) = m.main.take() {
            let built = self.receive_main(&mut m, main, &model)?;
            self.main = Some(self.keep_depth(built));
        }
        let main_s = started.elapsed().as_secs_f64() - model_s;
        let parts = self.items_and_keys(&m)?;
        let generation = Generation {
            number: m.generation,
            model,
            items: parts.items,
            keys: parts.keys,
            index: parts.index,
            facets: parts.facets,
            main_len: parts.main_len,
            delta: m.delta.vectors,
            hidden: parts.hidden,
            catalog_version: m.catalog_version,
            published_unix: 0.0,
            build_seconds: started.elapsed().as_secs_f64(),
            distinct_inputs: None,
        };
        let keys_s = started.elapsed().as_secs_f64() - model_s - main_s;
        let serve = self.metrics.as_ref().map(|x| &x.serve);
        drop(self.served.publish(generation, serve));
        if new_main {
            // Walks of stale links go deeper, as on the trainer: each side probes its own.
            // (Lists come with the depth the trainer probed for them.)
            if let Some(g) = self
                .served
                .load()
                .filter(|g| g.index.shared_graph().is_some())
            {
                relink::probe_and_tune(&g.index, &self.config.index);
            }
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let delay_s = (now_ms - m.published_unix_ms).max(0) as f64 / 1000.0;
        if let Some(x) = &self.metrics {
            let kind = if full { "full" } else { "delta" };
            x.replication.received.with_label_values(&[kind]).inc();
            x.replication.delay_seconds.observe(delay_s);
        }
        tracing::debug!(
            generation = m.generation,
            full,
            model_s,
            main_s,
            keys_s,
            total_s = started.elapsed().as_secs_f64(),
            delay_s,
            "replica applied"
        );
        Ok(())
    }

    /// The main item set `m` brings (`main`, taken out of it): its index built from what was
    /// sent, its items resolved from the ids sent or shared with the set that brought them.
    fn receive_main(
        &mut self,
        m: &mut GenerationMessage,
        main: ItemVectors,
        model: &FrozenModel,
    ) -> Result<Main, FollowError> {
        let links = self.links_for(m, main.dim as usize)?;
        let same_items = match m.main_ids_of {
            None => self.same_ids_as_served(&main.ids, m.generation),
            Some(n) => match self.main.as_ref().filter(|x| x.ids_generation == n) {
                Some(x) => Some((x.items.clone(), x.facets.clone())),
                None => {
                    return Err(corrupt(
                        m.generation,
                        format!("item ids of generation {n} not received"),
                    ))
                }
            },
        };
        let sent = MainSent {
            graph: m.main_graph.as_deref(),
            links,
            lists: m.main_lists.take(),
            same_items,
            ids_generation: m.main_ids_of.unwrap_or(m.generation),
        };
        self.build_main(m.generation, m.main_generation, main, sent, model)
    }

    /// The main set `m` searches and the items it serves (the main set's, then its delta
    /// items), their id → key map and the hidden main keys, after checking that they fit. The map is the one last
    /// served while the items it maps are the same (see [`KeyMap`]).
    fn items_and_keys(&mut self, m: &GenerationMessage) -> Result<ServedItems, FollowError> {
        let main = self
            .main
            .as_ref()
            .filter(|x| x.generation == m.main_generation)
            .ok_or_else(|| {
                corrupt(
                    m.generation,
                    format!(
                        "main item set of generation {} not received",
                        m.main_generation
                    ),
                )
            })?;
        check_vectors(m.generation, &m.delta, main.index.dim(), m.delta.ids.len())?;
        let main_len = main.items.len();
        if let Some(h) = m.hidden.iter().find(|h| **h as usize >= main_len) {
            return Err(corrupt(
                m.generation,
                format!("hidden key {h} out of range"),
            ));
        }
        let (ids_generation, index, facets) =
            (main.ids_generation, main.index.clone(), main.facets.clone());
        let mut items = main.items.clone();
        items.extend(self.features(&m.delta.ids));
        let hidden: HashSet<u64> = m.hidden.iter().copied().collect();
        let same = self.keys.as_ref().filter(|k| {
            k.ids_generation == ids_generation && k.delta_ids == m.delta.ids && k.hidden == hidden
        });
        let keys = match same {
            Some(same) => same.keys.clone(),
            None => {
                let keys = Arc::new(live_keys(&items, &hidden));
                self.keys = Some(KeyMap {
                    ids_generation,
                    delta_ids: m.delta.ids.clone(),
                    hidden: hidden.clone(),
                    keys: keys.clone(),
                });
                keys
            }
        };
        Ok(ServedItems {
            index,
            facets,
            main_len,
            items,
            keys,
            hidden,
        })
    }

    fn apply_model(&mut self, m: &GenerationMessage) -> Result<(), FollowError> {
        match m.base_step {
            None => {
                let towers = Towers::new(&self.spec, &self.config.model, Device::Cpu);
                self.shapes = user_shapes(&towers);
                self.check_compatible(&m.model, true)?;
                let delta = self.to_delta(m.generation, m.step, &m.model)?;
                let vocabs = self.spec.vocabs(&self.config.features);
                let mut mirror = Mirror::from_parts(m.step, towers, vocabs, self.spec.clone());
                mirror.apply(delta);
                self.mirror = Some(mirror);
            }
            Some(base) => {
                let have = self.step();
                if have != Some(base) {
                    return Err(FollowError::Gap {
                        generation: m.generation,
                        base,
                        have,
                    });
                }
                if m.step != base || !m.model.is_empty() {
                    self.check_compatible(&m.model, false)?;
                    let delta = self.to_delta(m.generation, m.step, &m.model)?;
                    if let Some(mirror) = self.mirror.as_mut() {
                        mirror.apply(delta);
                    }
                }
            }
        }
        Ok(())
    }

    /// The snapshot serving `m`: a new one when the model moved (written into the snapshot
    /// of two generations ago when its readers are gone), else the current one.
    fn model_at(&mut self, m: &GenerationMessage) -> Result<Arc<FrozenModel>, FollowError> {
        if let Some(model) = self
            .model
            .as_ref()
            .filter(|x| x.step == m.step && m.base_step.is_some())
        {
            return Ok(model.clone());
        }
        let Some(mirror) = self.mirror.as_ref() else {
            return Err(FollowError::Gap {
                generation: m.generation,
                base: m.base_step.unwrap_or(m.step),
                have: None,
            });
        };
        let reusable = self.spare.take().and_then(|s| Arc::try_unwrap(s).ok());
        let mut snapshot = mirror.snapshot_into(reusable);
        snapshot.popular = m.popular.iter().map(Id::new).collect();
        let model = Arc::new(snapshot);
        self.spare = self.model.replace(model.clone());
        Ok(model)
    }

    /// Checks that `part` fits this replica's towers: the same tables and embedding width,
    /// and every variable it carries present here with the same shape (a full message carries
    /// all of them, a delta those that changed).
    fn check_compatible(&self, part: &ModelPart, full: bool) -> Result<(), FollowError> {
        let mine: Vec<(String, u32)> = self
            .spec
            .tables()
            .iter()
            .map(|t| (t.name.clone(), t.capacity))
            .collect();
        if part.tables != mine {
            return Err(FollowError::Incompatible(format!(
                "tables (name, capacity) {:?} here, {:?} in the trainer (compare [features])",
                mine, part.tables
            )));
        }
        if i64::from(part.embedding_dim) != self.config.model.embedding_dim {
            return Err(FollowError::Incompatible(format!(
                "model.embedding_dim is {} here, {} in the trainer",
                self.config.model.embedding_dim, part.embedding_dim
            )));
        }
        if full && self.shapes.len() != part.dense.len() {
            return Err(FollowError::Incompatible(format!(
                "{} user-tower variables here, {} in the trainer (compare [model])",
                self.shapes.len(),
                part.dense.len()
            )));
        }
        for d in &part.dense {
            match self.shapes.get(&d.name) {
                Some(shape) if *shape == d.shape => {}
                Some(shape) => {
                    return Err(FollowError::Incompatible(format!(
                        "{} has shape {:?} here, {:?} in the trainer (compare [model])",
                        d.name, shape, d.shape
                    )))
                }
                None => {
                    return Err(FollowError::Incompatible(format!(
                        "no variable {} here (compare [model])",
                        d.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// The message's weights as a delta the mirror applies, after checking every size.
    fn to_delta(
        &self,
        generation: u64,
        step: i64,
        part: &ModelPart,
    ) -> Result<CatchUp, FollowError> {
        let tables = self.spec.tables();
        let dim = self.config.model.embedding_dim;
        let mut dense = Vec::with_capacity(part.dense.len());
        for d in &part.dense {
            if element_count(&d.shape) != Some(d.values.len()) {
                return Err(corrupt(
                    generation,
                    format!(
                        "{}: {} values for shape {:?}",
                        d.name,
                        d.values.len(),
                        d.shape
                    ),
                ));
            }
            dense.push((
                d.name.clone(),
                Tensor::from_slice(&d.values).view(d.shape.as_slice()),
            ));
        }
        let mut rows: Vec<Option<(Tensor, Tensor)>> = (0..tables.len()).map(|_| None).collect();
        for r in &part.rows {
            let t = r.table as usize;
            let Some(info) = tables.get(t) else {
                return Err(corrupt(generation, format!("table {t} does not exist")));
            };
            if r.values.len() as i64 != r.rows.len() as i64 * dim
                || r.rows
                    .iter()
                    .any(|x| *x < 0 || *x >= i64::from(info.capacity))
            {
                return Err(corrupt(
                    generation,
                    format!("rows of table {} do not fit", info.name),
                ));
            }
            rows[t] = Some((
                Tensor::from_slice(&r.rows),
                Tensor::from_slice(&r.values).view([r.rows.len() as i64, dim]),
            ));
        }
        let mut vocab_rows: Vec<Vec<(u32, String)>> = vec![Vec::new(); tables.len()];
        for v in &part.vocab {
            let Some(slot) = vocab_rows.get_mut(v.table as usize) else {
                return Err(corrupt(
                    generation,
                    format!("vocabulary {} does not exist", v.table),
                ));
            };
            slot.extend(v.entries.iter().cloned());
        }
        Ok(CatchUp {
            step,
            dense,
            rows,
            vocab_rows,
            clicks: Vec::new(),
        })
    }

    fn features(&self, ids: &[String]) -> Vec<Arc<ItemFeatures>> {
        let catalog = self.catalog.read().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .map(|id| {
                let id = Id::new(id);
                catalog.item(&id).unwrap_or_else(|| {
                    Arc::new(ItemFeatures {
                        item_id: id,
                        category: None,
                        genres: Vec::new(),
                        dense: Dense::new(),
                        updated_ms: 0,
                    })
                })
            })
            .collect()
    }

    /// The served main set's items and facets when a full message brings exactly their ids
    /// again (it comes every `replication.full_every_secs` for replicas that start late):
    /// resolving a million ids, their facets and their key map took about 3 s here, comparing
    /// them takes milliseconds. The key map is then known under `generation` too.
    fn same_ids_as_served(
        &mut self,
        ids: &[String],
        generation: u64,
    ) -> Option<(Vec<Arc<ItemFeatures>>, Arc<Facets>)> {
        let main = self.main.as_ref().filter(|x| {
            x.items.len() == ids.len()
                && x.items
                    .iter()
                    .zip(ids)
                    .all(|(item, id)| item.item_id.as_str() == id)
        })?;
        if let Some(k) = self
            .keys
            .as_mut()
            .filter(|k| k.ids_generation == main.ids_generation)
        {
            k.ids_generation = generation;
        }
        Some((main.items.clone(), main.facets.clone()))
    }

    /// `built` searching as deep as the main set it replaces when both walk the same links
    /// (the depth a probe chose for them; see [`relink::probe_and_tune`]).
    fn keep_depth(&self, built: Main) -> Main {
        if let (Some(old), Some(new)) = (&self.main, built.index.shared_graph()) {
            if old
                .index
                .shared_graph()
                .is_some_and(|g| Arc::ptr_eq(g, new))
            {
                built.index.set_expansion_per_k(old.index.expansion_per_k());
            }
        }
        built
    }

    /// The links `m`'s main set walks: received in `m` (kept for later versions) or earlier.
    fn links_for(
        &mut self,
        m: &mut GenerationMessage,
        dim: usize,
    ) -> Result<Option<Arc<SharedGraph>>, FollowError> {
        let Some(wanted) = m.links_generation else {
            return Ok(None);
        };
        if let Some(bytes) = m.main_links.take() {
            let links = SharedGraph::from_bytes(&bytes, dim, &self.config.index)?;
            self.links = Some((wanted, Arc::new(links)));
        }
        match &self.links {
            Some((n, links)) if *n == wanted => Ok(Some(links.clone())),
            _ => Err(corrupt(
                m.generation,
                format!("links of generation {wanted} not received"),
            )),
        }
    }

    fn build_main(
        &self,
        generation: u64,
        main_generation: u64,
        main: ItemVectors,
        sent: MainSent<'_>,
        model: &FrozenModel,
    ) -> Result<Main, FollowError> {
        let dim = model.towers.output_dim() as usize;
        let MainSent {
            graph,
            links,
            lists,
            same_items,
            ids_generation: m_ids_generation,
        } = sent;
        let count = same_items.as_ref().map_or(main.ids.len(), |(i, _)| i.len());
        let index = if let Some(links) = links {
            check_vectors(generation, &main, dim, count)?;
            if links.len() != count {
                return Err(corrupt(
                    generation,
                    format!("links of {} items for {count} ids", links.len()),
                ));
            }
            ItemIndex::linked(links, main.vectors, dim, &self.config.index)?
        } else if let Some(bytes) = graph {
            let index = ItemIndex::from_graph_bytes(bytes, dim, &self.config.index)?;
            if index.len() != count {
                return Err(corrupt(
                    generation,
                    format!("graph of {} items for {count} ids", index.len()),
                ));
            }
            index
        } else if !main.groups.is_empty() {
            check_vectors(generation, &main, dim, count)?;
            let grouped = GroupedVectors::new(main.vectors, main.groups, dim)
                .ok_or_else(|| corrupt(generation, "an item of a group that is not sent"))?;
            match lists {
                Some(l) => {
                    let c = ClusteredVectors::from_parts(grouped, l.centroids, &l.list_of_group)
                        .ok_or_else(|| corrupt(generation, "lists that do not fit the vectors"))?;
                    ItemIndex::clustered(c, l.depth_per_k)
                }
                None => ItemIndex::grouped(grouped),
            }
        } else if count <= self.config.index.exact_max_items {
            check_vectors(generation, &main, dim, count)?;
            ItemIndex::exact(main.vectors, dim)
        } else {
            check_vectors(generation, &main, dim, count)?;
            ItemIndex::build(
                &main.vectors,
                dim,
                model.towers.similarity(),
                &self.config.index,
            )?
        };
        let (items, facets) = match same_items {
            Some(same) => same,
            None => {
                let items = self.features(&main.ids);
                let facets = Facets::new(&items, self.config.index.filtered_exact_max);
                (items, Arc::new(facets))
            }
        };
        Ok(Main {
            generation: main_generation,
            ids_generation: m_ids_generation,
            facets,
            items,
            index: Arc::new(index),
        })
    }

    /// Follows the topic from the newest full message until `stop` (blocking: run it on its
    /// own thread).
    pub fn run(mut self, stop: CancellationToken) -> Result<(), KafkaError> {
        let r = &self.config.replication;
        let consumer: BaseConsumer = kafka::client_config(&self.config.kafka)
            .set("group.id", &r.replica_group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "fetch.message.max.bytes",
                (r.chunk_bytes + 64 * 1024).to_string(),
            )
            .create()?;
        let topic = r.topic.clone();
        let start = start_offset(&consumer, &topic, &stop)?;
        tracing::info!(%topic, offset = start, "following generations");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let mut assembler = Assembler::default();
        while !stop.is_cancelled() {
            let msg = match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "generations topic");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Some(Ok(msg)) => msg,
            };
            let received = Instant::now();
            let result = match assembler.push(msg.payload().unwrap_or_default()) {
                Ok(None) => continue,
                Ok(Some(m)) => {
                    let (generation, step) = (m.generation, m.step);
                    let applied = self.apply(m);
                    if let Some(x) = &self.metrics {
                        x.replication
                            .apply_seconds
                            .observe(received.elapsed().as_secs_f64());
                    }
                    applied.inspect(|_| tracing::debug!(generation, step, "serving generation"))
                }
                Err(e) => {
                    tracing::warn!(offset = msg.offset(), error = %e, "skipping record");
                    if let Some(x) = &self.metrics {
                        x.replication.rejected.with_label_values(&["corrupt"]).inc();
                    }
                    continue;
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "generation not served");
                if let Some(x) = &self.metrics {
                    x.replication
                        .rejected
                        .with_label_values(&[e.reason()])
                        .inc();
                }
            }
        }
        Ok(())
    }
}

/// Elements of a tensor of `shape`: `None` for a negative dimension or a product that does not
/// fit (so a crafted shape never reaches `view`, which panics on it).
fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, d| {
        usize::try_from(*d).ok().and_then(|d| n.checked_mul(d))
    })
}

/// Shapes of the user-tower variables of `towers`, by name.
fn user_shapes(towers: &Towers) -> BTreeMap<String, Vec<i64>> {
    towers
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("user."))
        .map(|(n, t)| (n, t.size()))
        .collect()
}

/// Checks that `v` holds vectors of width `dim` for `items` items (its ids, or those of an
/// earlier main set with the same items).
fn check_vectors(
    generation: u64,
    v: &ItemVectors,
    dim: usize,
    items: usize,
) -> Result<(), FollowError> {
    let rows = if v.groups.is_empty() {
        items
    } else if v.groups.len() == items {
        v.vectors.len() / dim.max(1)
    } else {
        return Err(corrupt(
            generation,
            format!("{} groups for {items} items", v.groups.len()),
        ));
    };
    if v.dim as usize != dim || v.vectors.len() != rows * dim {
        return Err(corrupt(
            generation,
            format!(
                "{} vectors of width {} for {} items (this replica's towers output {dim})",
                v.vectors.len(),
                v.dim,
                items
            ),
        ));
    }
    Ok(())
}

/// What came with a main set besides its vectors.
struct MainSent<'a> {
    /// The serialized HNSW graph.
    graph: Option<&'a [u8]>,
    /// The links it walks.
    links: Option<Arc<SharedGraph>>,
    /// Its lists.
    lists: Option<MainLists>,
    /// The items and facets of the main set it shares its items with (its ids not sent).
    same_items: Option<(Vec<Arc<ItemFeatures>>, Arc<Facets>)>,
    /// The generation whose message carried the ids.
    ids_generation: u64,
}

/// Where to start reading: the first record of the newest full message, as the last record's
/// header says; the beginning when the topic is empty or the header points before it.
fn start_offset(
    consumer: &BaseConsumer,
    topic: &str,
    stop: &CancellationToken,
) -> Result<i64, KafkaError> {
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    if high <= low {
        return Ok(low);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(high - 1))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !stop.is_cancelled() {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let full = ChunkHeader::read(msg.payload().unwrap_or_default())
                .map_or(-1, |(h, _)| h.full_offset);
            return Ok(if full >= low { full } else { low });
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generations::wire::{DenseVar, TableRows};

    fn config() -> Config {
        let mut c = Config::default();
        c.features.capacity.clear();
        c.features.default_capacity = 64;
        c.model.tower_dims = vec![8, 4];
        c
    }

    /// A full message as a trainer with an untrained model would send it, for items `ids`.
    fn full(c: &Config, ids: &[&str]) -> GenerationMessage {
        let spec = FeatureSpec::new(&c.features);
        let towers = Towers::new(&spec, &c.model, Device::Cpu);
        let dense = towers
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with("user."))
            .map(|(name, t)| DenseVar {
                name,
                shape: t.size(),
                values: Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap(),
            })
            .collect();
        let dim = towers.output_dim() as usize;
        GenerationMessage {
            generation: 1,
            step: 10,
            base_step: None,
            model: ModelPart {
                embedding_dim: c.model.embedding_dim as u32,
                tables: spec
                    .tables()
                    .iter()
                    .map(|t| (t.name.clone(), t.capacity))
                    .collect(),
                dense,
                rows: Vec::new(),
                vocab: Vec::new(),
            },
            main_generation: 1,
            main_graph: None,
            links_generation: None,
            main_links: None,
            main_lists: None,
            main_ids_of: None,
            main: Some(ItemVectors {
                groups: Vec::new(),
                dim: dim as u32,
                ids: ids.iter().map(|s| s.to_string()).collect(),
                vectors: (0..ids.len() * dim).map(|i| i as f32).collect(),
            }),
            delta: ItemVectors {
                groups: Vec::new(),
                dim: dim as u32,
                ..Default::default()
            },
            hidden: Vec::new(),
            popular: vec!["b".into()],
            catalog_version: 1,
            published_unix_ms: 0,
        }
    }

    fn follower(c: &Config) -> (Follower, Arc<Served>) {
        let served = Arc::new(Served::default());
        (
            Follower::new(c, SharedCatalog::default(), served.clone(), None),
            served,
        )
    }

    #[test]
    fn a_full_message_is_served_and_a_delta_on_it_too() {
        let c = config();
        let (mut f, served) = follower(&c);
        f.apply(full(&c, &["a", "b", "c"])).unwrap();
        let g = served.load().unwrap();
        assert_eq!((g.number, g.model.step, g.catalog_size()), (1, 10, 3));
        assert_eq!(g.model.popular, vec![Id::new("b")]);
        // A delta: item "b" hidden, "d" added, the model moved to step 12 with one row.
        let mut d = full(&c, &[]);
        d.generation = 2;
        d.step = 12;
        d.base_step = Some(10);
        d.main = None;
        d.model.dense.clear();
        d.model.rows = vec![TableRows {
            table: 0,
            rows: vec![1],
            values: vec![0.5; c.model.embedding_dim as usize],
        }];
        d.delta = ItemVectors {
            groups: Vec::new(),
            dim: 4,
            ids: vec!["d".into()],
            vectors: vec![1.0; 4],
        };
        d.hidden = vec![1];
        f.apply(d).unwrap();
        let g = served.load().unwrap();
        assert_eq!((g.number, g.model.step, g.catalog_size()), (2, 12, 3));
        assert!(g.keys.contains_key(&Id::new("d")) && !g.keys.contains_key(&Id::new("b")));
        assert_eq!(f.step(), Some(12));
    }

    #[test]
    fn a_new_model_over_the_same_items_comes_without_their_ids() {
        let c = config();
        let (mut f, served) = follower(&c);
        f.apply(full(&c, &["a", "b", "c"])).unwrap();
        let before = served.load().unwrap();
        // Generation 2: the same items with new vectors; the ids are generation 1's.
        let mut m = full(&c, &[]);
        (m.generation, m.step, m.base_step, m.main_generation) = (2, 11, Some(10), 2);
        m.model.dense.clear();
        m.main_ids_of = Some(1);
        if let Some(main) = m.main.as_mut() {
            main.vectors = vec![0.25; 3 * main.dim as usize];
        }
        f.apply(m.clone()).unwrap();
        let g = served.load().unwrap();
        assert_eq!((g.number, g.catalog_size()), (2, 3));
        assert!(
            Arc::ptr_eq(&g.keys, &before.keys),
            "the same items' map is reused"
        );
        assert_eq!(g.index.row(2), Some(vec![0.25; g.index.dim()]));
        // Generation 3 names ids this replica never received: refused, not misread.
        (m.generation, m.step, m.base_step, m.main_generation) = (3, 12, Some(11), 3);
        m.main_ids_of = Some(7);
        assert_eq!(f.apply(m).map_err(|e| e.reason()), Err("corrupt"));
        assert_eq!(served.load().unwrap().number, 2);
    }

    #[test]
    fn the_key_map_is_rebuilt_exactly_when_the_served_items_change() {
        let c = config();
        let (mut f, served) = follower(&c);
        f.apply(full(&c, &["a", "b", "c"])).unwrap();
        let first = served.load().unwrap();
        let message = |generation: u64, delta: &[&str], hidden: Vec<u64>| {
            let mut m = full(&c, &[]);
            (m.generation, m.step, m.base_step, m.main) = (generation, 10, Some(10), None);
            m.model.dense.clear();
            m.delta.ids = delta.iter().map(|s| s.to_string()).collect();
            m.delta.vectors = vec![1.0; delta.len() * m.delta.dim as usize];
            m.hidden = hidden;
            m
        };
        // "b" hidden and "d" added: a new map, with the new items' keys.
        f.apply(message(2, &["d"], vec![1])).unwrap();
        let second = served.load().unwrap();
        assert!(!Arc::ptr_eq(&second.keys, &first.keys));
        let key = |g: &Generation, id: &str| g.keys.get(&Id::new(id)).copied();
        assert_eq!(
            ["a", "b", "c", "d"].map(|id| key(&second, id)),
            [Some(0), None, Some(2), Some(3)]
        );
        // The same delta and hidden keys again: the same map.
        f.apply(message(3, &["d"], vec![1])).unwrap();
        assert!(Arc::ptr_eq(&served.load().unwrap().keys, &second.keys));
        // Another delta item in the same place: a new map, "e" where "d" was.
        f.apply(message(4, &["e"], vec![1])).unwrap();
        let fourth = served.load().unwrap();
        assert_eq!(["d", "e"].map(|id| key(&fourth, id)), [None, Some(3)]);
        // Nothing hidden any more: "b" is back.
        f.apply(message(5, &["e"], Vec::new())).unwrap();
        assert_eq!(key(&served.load().unwrap(), "b"), Some(1));
    }

    #[test]
    fn a_full_message_with_the_served_ids_reuses_their_items_and_key_map() {
        let c = config();
        let (mut f, served) = follower(&c);
        f.apply(full(&c, &["a", "b", "c"])).unwrap();
        let first = served.load().unwrap();
        let mut again = full(&c, &["a", "b", "c"]);
        (again.generation, again.main_generation) = (2, 2);
        f.apply(again).unwrap();
        let second = served.load().unwrap();
        assert!(Arc::ptr_eq(&second.keys, &first.keys));
        assert!(Arc::ptr_eq(&second.items[0], &first.items[0]));
        // Later messages refer to the ids by the full message's generation.
        let mut next = full(&c, &[]);
        (
            next.generation,
            next.step,
            next.base_step,
            next.main_generation,
        ) = (3, 11, Some(10), 3);
        next.model.dense.clear();
        next.main_ids_of = Some(2);
        if let Some(main) = next.main.as_mut() {
            main.vectors = vec![0.5; 3 * main.dim as usize];
        }
        f.apply(next).unwrap();
        assert!(Arc::ptr_eq(&served.load().unwrap().keys, &first.keys));
        // Other ids (here one more) are resolved afresh.
        let mut other = full(&c, &["a", "b", "c", "d"]);
        (other.generation, other.main_generation) = (4, 4);
        f.apply(other).unwrap();
        let fourth = served.load().unwrap();
        assert!(!Arc::ptr_eq(&fourth.keys, &first.keys));
        assert_eq!(fourth.keys.get(&Id::new("d")), Some(&3));
    }

    #[test]
    fn a_delta_without_its_base_waits_for_a_full_message() {
        let c = config();
        let (mut f, served) = follower(&c);
        let mut d = full(&c, &["a"]);
        d.base_step = Some(7);
        assert!(matches!(f.apply(d), Err(FollowError::Gap { base: 7, .. })));
        assert!(served.load().is_none());
        f.apply(full(&c, &["a"])).unwrap();
        let mut d = full(&c, &["a"]);
        d.base_step = Some(9); // the replica is at 10
        assert!(matches!(
            f.apply(d),
            Err(FollowError::Gap { have: Some(10), .. })
        ));
    }

    #[test]
    fn a_differently_configured_trainer_is_named_not_followed() {
        let c = config();
        let mut other = config();
        other.features.default_capacity = 128;
        let (mut f, served) = follower(&c);
        let err = f.apply(full(&other, &["a"])).unwrap_err();
        assert!(
            matches!(err, FollowError::Incompatible(ref m) if m.contains("[features]")),
            "{err}"
        );
        let mut other = config();
        other.model.tower_dims = vec![16, 4];
        let err = f.apply(full(&other, &["a"])).unwrap_err();
        assert!(
            matches!(err, FollowError::Incompatible(ref m) if m.contains("[model]")),
            "{err}"
        );
        assert!(served.load().is_none());
    }

    /// A delta on `full(c, ..)` (step 10 → 12) carrying the variables `f` leaves in it.
    fn delta_with(c: &Config, f: impl FnOnce(&mut Vec<DenseVar>)) -> GenerationMessage {
        let mut d = full(c, &[]);
        d.generation = 2;
        d.step = 12;
        d.base_step = Some(10);
        d.main = None;
        f(&mut d.model.dense);
        d
    }

    #[test]
    fn a_delta_with_crafted_shapes_is_rejected_not_a_panic() {
        let c = config();
        let (mut f, served) = follower(&c);
        f.apply(full(&c, &["a"])).unwrap();
        let before = f.step();
        // Negative dimensions whose product matches the value count (it passed the size
        // check and reached `view`, which panicked).
        let negative = delta_with(&c, |dense| {
            dense.truncate(1);
            let n = dense[0].values.len() as i64;
            dense[0].shape = vec![-1, -n];
        });
        let err = f.apply(negative).unwrap_err();
        assert!(matches!(err, FollowError::Incompatible(_)), "{err}");
        // A valid shape that is not this replica's (copy_ would broadcast or panic).
        let other = delta_with(&c, |dense| {
            // A matrix flattened to one dimension (the variables' order is not fixed).
            let i = dense.iter().position(|v| v.shape.len() >= 2).unwrap();
            dense.swap(0, i);
            dense.truncate(1);
            let n = dense[0].values.len() as i64;
            dense[0].shape = vec![n];
        });
        let err = f.apply(other).unwrap_err();
        assert!(
            matches!(err, FollowError::Incompatible(ref m) if m.contains("shape")),
            "{err}"
        );
        // A variable this replica does not have, and tables of another configuration.
        let unknown = delta_with(&c, |dense| {
            dense.truncate(1);
            dense[0].name = "user.99.weight".into();
        });
        assert!(matches!(
            f.apply(unknown),
            Err(FollowError::Incompatible(_))
        ));
        let mut tables = delta_with(&c, |dense| dense.clear());
        tables.model.tables[0].1 = 128;
        let err = f.apply(tables).unwrap_err();
        assert!(
            matches!(err, FollowError::Incompatible(ref m) if m.contains("[features]")),
            "{err}"
        );
        // Nothing was applied, and a good delta is still served afterwards.
        assert_eq!(f.step(), before);
        assert_eq!(served.load().unwrap().number, 1);
        let good = delta_with(&c, |dense| dense.truncate(1));
        f.apply(good).unwrap();
        assert_eq!((served.load().unwrap().number, f.step()), (2, Some(12)));
    }

    #[test]
    fn element_counts_reject_negative_and_overflowing_shapes() {
        assert_eq!(element_count(&[8, 4]), Some(32));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[0, 5]), Some(0));
        assert_eq!(element_count(&[-2, -3]), None);
        assert_eq!(element_count(&[i64::MAX, 4]), None);
        assert_eq!(element_count(&[1 << 40, 1 << 40]), None);
    }

    #[test]
    fn sizes_that_do_not_add_up_are_rejected_before_any_tensor_op() {
        let c = config();
        let (mut f, _) = follower(&c);
        let mut m = full(&c, &["a"]);
        m.model.rows = vec![TableRows {
            table: 0,
            rows: vec![64], // capacity 64: rows 0..=63
            values: vec![0.0; c.model.embedding_dim as usize],
        }];
        assert!(matches!(f.apply(m), Err(FollowError::Corrupt { .. })));
        let mut m = full(&c, &["a", "b"]);
        if let Some(main) = m.main.as_mut() {
            main.vectors.pop();
        }
        assert!(matches!(f.apply(m), Err(FollowError::Corrupt { .. })));
        let mut m = full(&c, &["a"]);
        m.main = None;
        m.main_generation = 5;
        assert!(matches!(f.apply(m), Err(FollowError::Corrupt { .. })));
    }
}
