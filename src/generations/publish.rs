//! The trainer's side: every served generation goes to the generations topic.
//!
//! A message carries the user tower at the generation's model version and the item vectors
//! the generation serves. The tower is sent in full at least every
//! `replication.full_every_secs` (and after any failed send); in between, only the rows the
//! refresher saw change (from the trainer's [`CatchUp`]s) plus the small MLP. Item vectors are
//! sent when the generation's main index is new (an HNSW index as its serialized graph, which
//! replicas load instead of rebuilding), otherwise only its delta — so the large catalogue path
//! (an HNSW rebuild every few minutes, deltas in between) ships little.
//!
//! Sending runs on its own task: the refresher, through [`PublishQueue`]'s
//! [`GenerationSink`] side, only notes what changed and offers each generation it serves; a
//! generation still unsent when a newer one arrives is skipped (its changed rows go with the
//! newer one), so a slow broker never delays local generations.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tch::{Kind, Tensor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::wire::{
    self, DenseVar, GenerationMessage, ItemVectors, MainLists, ModelPart, TableRows, VocabRows,
};
use crate::catalog::ItemFeatures;
use crate::config::Config;
use crate::index::{IndexError, ItemIndex, SharedGraph};
use crate::kafka;
use crate::metrics::ReplicationMetrics;
use crate::refresh::{FrozenModel, Generation, GenerationSink};
use crate::train::changes::CatchUp;

/// Publishing failures (the next generation is then sent in full).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Kafka refused or timed out.
    #[error("publishing to the generations topic: {0}")]
    Kafka(#[from] KafkaError),
    /// Item vectors could not be read back from the index.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A tensor could not be copied out.
    #[error("copying weights: {0}")]
    Tensor(#[from] tch::TchError),
    /// The encoding thread panicked or was cancelled.
    #[error("encoding the message: {0}")]
    Encoding(#[from] tokio::task::JoinError),
}

/// Rows a model delta changed, remembered until a generation at or after its step is sent.
struct Pending {
    step: i64,
    rows: Vec<Vec<i64>>,
    vocab: Vec<Vec<u32>>,
}

/// What the replicas have (once the last send succeeded).
struct Shipped {
    step: i64,
    main: Arc<ItemIndex>,
    main_generation: u64,
    /// The main items whose ids went out last, and the generation that carried them.
    ids: (Vec<Arc<ItemFeatures>>, u64),
    /// The links of a linked main set and the generation that shipped them.
    links: Option<(Arc<SharedGraph>, u64)>,
}

/// Publishes generations to `replication.topic`.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    chunk_bytes: usize,
    full_every: Duration,
    min_interval: Duration,
    queue: Arc<PublishQueue>,
    shipped: Option<Shipped>,
    last_full: Option<Instant>,
    full_offset: i64,
    metrics: Option<ReplicationMetrics>,
}

fn floats(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))
}

fn longs(t: &Tensor) -> Result<Vec<i64>, tch::TchError> {
    Vec::<i64>::try_from(t.contiguous().view([-1]))
}

impl Publisher {
    /// Creates the topic if missing (one partition, `replication.retention_ms`) and a producer.
    pub async fn new(
        config: &Config,
        metrics: Option<ReplicationMetrics>,
    ) -> Result<Publisher, KafkaError> {
        let r = &config.replication;
        kafka::ensure_topics(&config.kafka, &[kafka::generations_topic_spec(r)]).await?;
        let mut client = kafka::client_config(&config.kafka);
        client
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("compression.type", "lz4")
            .set("message.max.bytes", (r.chunk_bytes + 64 * 1024).to_string());
        Ok(Publisher {
            producer: client.create()?,
            topic: r.topic.clone(),
            chunk_bytes: r.chunk_bytes,
            full_every: Duration::from_secs(r.full_every_secs),
            min_interval: Duration::from_millis(r.min_interval_ms),
            queue: Arc::default(),
            shipped: None,
            last_full: None,
            full_offset: -1,
            metrics,
        })
    }

    /// Spawns the sending task: it publishes each generation offered to the queue until
    /// `stop`, then the last one still waiting.
    pub fn start(mut self, stop: CancellationToken) -> (Arc<PublishQueue>, JoinHandle<()>) {
        let queue = self.queue.clone();
        let task = tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = stop.cancelled() => true,
                    _ = self.queue.ready.notified() => false,
                };
                if let Some(g) = self.queue.take() {
                    let sent = Instant::now();
                    if let Err(e) = self.publish(&g).await {
                        tracing::error!(error = %e, generation = g.number, "generation not shipped; the next one goes out in full");
                    }
                    if !stopping {
                        // Generations offered meanwhile replace each other in the slot, and the
                        // notification waits for the next turn.
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep_until((sent + self.min_interval).into()) => {}
                        }
                    }
                }
                if stopping {
                    return;
                }
            }
        });
        (queue, task)
    }

    /// Builds the message for `g` and whether it is full.
    fn message(&mut self, g: &Generation) -> Result<(GenerationMessage, bool), PublishError> {
        let model = &g.model;
        if self.queue.take_full_request() {
            self.shipped = None;
        }
        let full = match (&self.shipped, self.last_full) {
            (Some(_), Some(t)) => t.elapsed() >= self.full_every,
            _ => true,
        };
        let mut part = ModelPart {
            embedding_dim: model.towers.embedding_dim() as u32,
            tables: model
                .spec
                .tables()
                .iter()
                .map(|t| (t.name.clone(), t.capacity))
                .collect(),
            ..Default::default()
        };
        let base_step = if full {
            None
        } else {
            self.shipped.as_ref().map(|s| s.step)
        };
        if full {
            fill_model(&mut part, model, |_, vocab_len| {
                (
                    (0..vocab_len as i64).collect(),
                    (1..vocab_len as u32).collect(),
                )
            })?;
        } else if base_step != Some(model.step) {
            let user = model.spec.user_tables();
            let mut rows: Vec<BTreeSet<i64>> = vec![BTreeSet::new(); model.spec.tables().len()];
            let mut vocab: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); rows.len()];
            for p in self.queue.pending().iter() {
                for &t in &user {
                    rows[t].extend(p.rows.get(t).into_iter().flatten());
                    vocab[t].extend(p.vocab.get(t).into_iter().flatten());
                }
            }
            fill_model(&mut part, model, |t, _| {
                (
                    rows[t].iter().copied().collect(),
                    vocab[t].iter().copied().collect(),
                )
            })?;
        }
        let shipped_main = self
            .shipped
            .as_ref()
            .filter(|s| !full && Arc::ptr_eq(&s.main, &g.index));
        let dim = g.index.dim() as u32;
        let mut main_ids_of = None;
        let (main_generation, main, main_graph) = match shipped_main {
            Some(s) => (s.main_generation, None, None),
            None => {
                let graph = g.index.graph_bytes().transpose()?;
                let (vectors, groups) = match (&graph, g.index.grouped_vectors()) {
                    (Some(_), _) => (Vec::new(), Vec::new()),
                    (None, Some(grouped)) => (
                        grouped.distinct_rows().to_vec(),
                        grouped.group_of().to_vec(),
                    ),
                    (None, None) => (g.index.vectors()?, Vec::new()),
                };
                let items = &g.items[..g.main_len];
                let same_items = self.shipped.as_ref().filter(|s| {
                    !full
                        && s.ids.0.len() == items.len()
                        && s.ids.0.iter().zip(items).all(|(a, b)| Arc::ptr_eq(a, b))
                });
                main_ids_of = same_items.map(|s| s.ids.1);
                let ids = match main_ids_of {
                    Some(_) => Vec::new(),
                    None => items.iter().map(|f| f.item_id.to_string()).collect(),
                };
                let main = ItemVectors {
                    dim,
                    ids,
                    vectors,
                    groups,
                };
                (g.number, Some(main), graph)
            }
        };
        let (links_generation, main_links) = self.links_for(g, full, main.is_some())?;
        let main_lists = match (&main, g.index.clustered_vectors()) {
            (Some(_), Some(c)) => Some(MainLists {
                centroids: c.centroids().to_vec(),
                list_of_group: c.list_of_group(),
                depth_per_k: g.index.expansion_per_k(),
            }),
            _ => None,
        };
        let mut hidden: Vec<u64> = g.hidden.iter().copied().collect();
        hidden.sort_unstable();
        let message = GenerationMessage {
            generation: g.number,
            step: model.step,
            base_step,
            model: part,
            main_generation,
            main,
            main_graph,
            links_generation,
            main_links,
            main_lists,
            main_ids_of,
            delta: ItemVectors {
                groups: Vec::new(),
                dim,
                ids: g.items[g.main_len..]
                    .iter()
                    .map(|f| f.item_id.to_string())
                    .collect(),
                vectors: g.delta.clone(),
            },
            hidden,
            popular: model.popular.iter().map(|id| id.to_string()).collect(),
            catalog_version: g.catalog_version,
            published_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        Ok((message, full))
    }

    /// The links a linked main set of `g` walks: the generation that shipped them, and their
    /// bytes when the replicas do not have them yet (a full message, or new links with a new
    /// main set). Links travel once per relink; every version's vectors travel in `main`.
    fn links_for(
        &self,
        g: &Generation,
        full: bool,
        main_is_new: bool,
    ) -> Result<(Option<u64>, Option<Vec<u8>>), PublishError> {
        let Some(links) = g.index.shared_graph() else {
            return Ok((None, None));
        };
        let shipped = self
            .shipped
            .as_ref()
            .and_then(|s| s.links.as_ref())
            .filter(|(l, _)| !full && Arc::ptr_eq(l, links));
        Ok(match shipped {
            Some((_, n)) => (Some(*n), None),
            None if main_is_new => (Some(g.number), Some(links.to_bytes()?)),
            // Not reached: a main set the replicas have was shipped with its links.
            None => (None, None),
        })
    }

    /// Sends `g`. On failure the replicas may have a gap, so the next message is full.
    pub async fn publish(&mut self, g: &Generation) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self.send(g).await;
        match &result {
            Ok(Sent {
                full,
                bytes,
                main_generation,
                links_generation,
                ids_generation,
            }) => {
                let step = g.model.step;
                self.queue.pending().retain(|p| p.step > step);
                let links = g.index.shared_graph().cloned().zip(*links_generation);
                let ids = match (ids_generation, self.shipped.take()) {
                    (Some(n), _) => (g.items[..g.main_len].to_vec(), *n),
                    (None, Some(previous)) => previous.ids,
                    (None, None) => (Vec::new(), 0),
                };
                self.shipped = Some(Shipped {
                    step,
                    main: g.index.clone(),
                    main_generation: *main_generation,
                    ids,
                    links,
                });
                if *full {
                    self.last_full = Some(Instant::now());
                }
                if let Some(m) = &self.metrics {
                    let kind = if *full { "full" } else { "delta" };
                    m.published.with_label_values(&[kind]).inc();
                    m.published_bytes
                        .with_label_values(&[kind])
                        .inc_by(*bytes as u64);
                    m.publish_seconds.observe(started.elapsed().as_secs_f64());
                }
            }
            Err(_) => {
                self.shipped = None;
                if let Some(m) = &self.metrics {
                    m.publish_errors.inc();
                }
            }
        }
        result.map(|_| ())
    }

    /// Encodes and writes `g` (see [`Sent`]).
    async fn send(&mut self, g: &Generation) -> Result<Sent, PublishError> {
        let (message, full) = self.message(g)?;
        let sent = Sent {
            full,
            bytes: 0,
            main_generation: message.main_generation,
            links_generation: message.links_generation,
            ids_generation: message
                .main
                .as_ref()
                .map(|_| message.main_ids_of.unwrap_or(g.number)),
        };
        // Tens of MB at a million items: encoded and cut on a blocking thread, not on the
        // runtime that serves requests, and each record moved, not copied, to the producer.
        let (number, chunk_bytes, full_offset) = (g.number, self.chunk_bytes, self.full_offset);
        let (bytes, mut records) = tokio::task::spawn_blocking(move || {
            let body = wire::encode(&message);
            (
                body.len(),
                wire::chunk(number, &body, chunk_bytes, full_offset),
            )
        })
        .await?;
        let key = g.number.to_string();
        let timeout = Duration::from_secs(30);
        if full && !records.is_empty() {
            // The first record's offset is where a late replica starts: learn it, then stamp
            // it on the remaining records (the first carries the previous full offset).
            let first = records.remove(0);
            let delivery = self
                .producer
                .send(
                    FutureRecord::to(&self.topic).key(&key).payload(&first),
                    timeout,
                )
                .await
                .map_err(|(e, _)| e)?;
            self.full_offset = delivery.offset;
            for r in records.iter_mut() {
                wire::restamp(r, delivery.offset);
            }
        }
        let rest: Vec<(String, Vec<u8>)> = records.into_iter().map(|r| (key.clone(), r)).collect();
        kafka::produce_all(&self.producer, &self.topic, rest).await?;
        Ok(Sent { bytes, ..sent })
    }
}

/// What [`Publisher::send`] wrote.
struct Sent {
    /// A full message.
    full: bool,
    /// Bytes of the body.
    bytes: usize,
    /// The generation whose main item set it refers to.
    main_generation: u64,
    /// The generation whose links that set walks.
    links_generation: Option<u64>,
    /// With a main set: the generation whose message carried its ids.
    ids_generation: Option<u64>,
}

/// Between the refresher thread and the sending task: the rows changed since the last sent
/// generation, and the newest generation waiting to be sent.
#[derive(Default)]
pub struct PublishQueue {
    pending: Mutex<Vec<Pending>>,
    full_requested: AtomicBool,
    slot: Mutex<Option<Arc<Generation>>>,
    ready: tokio::sync::Notify,
}

impl GenerationSink for PublishQueue {
    fn note(&self, delta: &CatchUp) {
        let rows = delta
            .rows
            .iter()
            .map(|r| {
                r.as_ref()
                    .and_then(|(idx, _)| longs(idx).ok())
                    .unwrap_or_default()
            })
            .collect();
        let vocab = delta
            .vocab_rows
            .iter()
            .map(|v| v.iter().map(|(row, _)| *row).collect())
            .collect();
        self.pending().push(Pending {
            step: delta.step,
            rows,
            vocab,
        });
    }

    fn note_full(&self) {
        self.pending().clear();
        self.full_requested.store(true, Ordering::Release);
    }

    fn offer(&self, g: Arc<Generation>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
        self.ready.notify_one();
    }
}

impl PublishQueue {
    fn take(&self) -> Option<Arc<Generation>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn take_full_request(&self) -> bool {
        self.full_requested.swap(false, Ordering::AcqRel)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Fills `part` with the user tower's MLP and, per user-tower table, the rows and vocabulary
/// rows `select(table, rows in use)` names.
fn fill_model(
    part: &mut ModelPart,
    model: &FrozenModel,
    mut select: impl FnMut(usize, usize) -> (Vec<i64>, Vec<u32>),
) -> Result<(), tch::TchError> {
    for (name, t) in model.towers.copy_dense() {
        if name.starts_with("user.") {
            part.dense.push(DenseVar {
                name,
                shape: t.size(),
                values: floats(&t)?,
            });
        }
    }
    for t in model.spec.user_tables() {
        let vocab = &model.vocabs[t];
        let (rows, vocab_rows) = select(t, vocab.len());
        if !rows.is_empty() {
            let (_, values) = model.towers.copy_rows(t, &rows);
            part.rows.push(TableRows {
                table: t as u32,
                rows,
                values: floats(&values)?,
            });
        }
        if !vocab_rows.is_empty() {
            part.vocab.push(VocabRows {
                table: t as u32,
                entries: vocab_rows
                    .into_iter()
                    .map(|r| (r, vocab.key(r).to_owned()))
                    .collect(),
            });
        }
    }
    Ok(())
}
