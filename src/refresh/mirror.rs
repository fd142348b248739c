//! The refresher's own copy of the model, kept current from the trainer's deltas.
//!
//! ```text
//!  trainer thread   first refresh: Mirror::of(trainer)      (full copy, once)
//!                   afterwards:    trainer.take_delta()     (rows touched since: O(changes))
//!        │ ModelFeed — one slot; the trainer offers only when the refresher took the last one,
//!        ▼           so deltas are never lost or merged (changes keep accumulating meanwhile)
//!  refresher thread mirror.apply(delta); mirror.snapshot() → FrozenModel for a generation
//! ```
//!
//! The full copy a generation needs (its tensors must stay frozen while readers use them) is
//! made here, on the refresher thread, so a refresh costs the trainer only the rows it changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::event::Id;
use crate::features::vocab::Vocab;
use crate::features::FeatureSpec;
use crate::train::changes::CatchUp;
use crate::train::model::Towers;
use crate::train::Trainer;

/// Items kept for the popularity fallback.
pub const POPULAR_KEPT: usize = 1000;

/// A frozen copy of the model: what a generation serves with.
pub struct FrozenModel {
    /// Training step the weights are from (the model version).
    pub step: i64,
    /// Towers (both: the item tower embeds the catalogue, the user tower serves queries).
    pub towers: Towers,
    /// Vocabularies as of `step`.
    pub vocabs: Vec<Vocab>,
    /// Feature spec.
    pub spec: FeatureSpec,
    /// Most clicked items, for users the model knows nothing about.
    pub popular: Vec<Id>,
}

// SAFETY: a snapshot is immutable once built: its tensors are only read, by forward passes
// under `no_grad` (index_select, matmul, relu, norm), which libtorch supports from many
// threads at once — the same guarantee PyTorch inference servers rely on. tch marks `Tensor`
// !Sync only because some `&self` methods (autograd state) could mutate; no such method is
// called on a snapshot.
unsafe impl Sync for FrozenModel {}

impl FrozenModel {
    /// A full copy of the trainer's model (tests and tools; the online path uses [`Mirror`]).
    pub fn of(trainer: &Trainer) -> FrozenModel {
        FrozenModel {
            step: trainer.global_step(),
            towers: trainer.towers().snapshot(),
            vocabs: trainer.vocabs().to_vec(),
            spec: trainer.spec().clone(),
            popular: most_clicked(trainer.pool().click_counts()),
        }
    }
}

/// The `POPULAR_KEPT` most clicked items, most clicked first (ties by id).
fn most_clicked(counts: &HashMap<Id, u64>) -> Vec<Id> {
    let mut popular: Vec<(&Id, &u64)> = counts.iter().collect();
    let keep = POPULAR_KEPT.min(popular.len());
    if keep > 0 && keep < popular.len() {
        popular.select_nth_unstable_by(keep - 1, |a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        popular.truncate(keep);
    }
    popular.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    popular.into_iter().map(|(id, _)| id.clone()).collect()
}

/// A full, mutable copy of the model that follows the trainer through [`CatchUp`]s.
pub struct Mirror {
    step: i64,
    towers: Towers,
    vocabs: Vec<Vocab>,
    spec: FeatureSpec,
    clicks: HashMap<Id, u64>,
}

impl Mirror {
    /// Starts tracking the trainer's changes and copies its model (trainer thread, once).
    pub fn of(trainer: &mut Trainer) -> Mirror {
        trainer.track_changes();
        Mirror {
            step: trainer.global_step(),
            towers: trainer.towers().snapshot(),
            vocabs: trainer.vocabs().to_vec(),
            spec: trainer.spec().clone(),
            clicks: trainer.pool().click_counts().clone(),
        }
    }

    /// A copy built from parts shipped elsewhere (a serving replica), with no click counts.
    pub fn from_parts(step: i64, towers: Towers, vocabs: Vec<Vocab>, spec: FeatureSpec) -> Mirror {
        Mirror {
            step,
            towers,
            vocabs,
            spec,
            clicks: HashMap::new(),
        }
    }

    /// Training step the copy is at.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// Brings the copy to `delta.step`. Deltas must be applied in the order they were taken.
    pub fn apply(&mut self, delta: CatchUp) {
        self.towers.overwrite(&delta.dense, &delta.rows);
        for (vocab, rows) in self.vocabs.iter_mut().zip(&delta.vocab_rows) {
            for (row, id) in rows {
                vocab.assign(*row, id);
            }
        }
        for (id, n) in delta.clicks {
            *self.clicks.entry(id).or_insert(0) += n;
        }
        self.step = delta.step;
    }

    /// A frozen copy for a generation (refresher thread).
    pub fn snapshot(&self) -> FrozenModel {
        self.snapshot_into(None)
    }

    /// A frozen copy, written into `spare` (a snapshot no generation uses any more) when
    /// given: large tables are then copied into memory already mapped instead of fresh pages.
    pub fn snapshot_into(&self, spare: Option<FrozenModel>) -> FrozenModel {
        let towers = match spare {
            Some(mut s) => {
                s.towers.copy_from(&self.towers);
                s.towers
            }
            None => self.towers.snapshot(),
        };
        FrozenModel {
            step: self.step,
            towers,
            vocabs: self.vocabs.clone(),
            spec: self.spec.clone(),
            popular: most_clicked(&self.clicks),
        }
    }
}

/// What the trainer hands the refresher.
pub enum MirrorUpdate {
    /// A full copy (the first hand-off).
    Full(Box<Mirror>),
    /// Changes since the previous update.
    Delta(CatchUp),
}

/// The one-slot hand-off from the trainer thread to the refresher.
///
/// The refresher says when it is ready for the next update ([`ModelFeed::want`]) and the
/// trainer hands one over only then, at the end of its next step: an update offered while a
/// generation is still being built would wait in the slot and reach the index that much older
/// (at a million items an embedding pass takes seconds, and the delta taken after it was up to
/// a pass old).
pub struct ModelFeed {
    slot: Mutex<Option<MirrorUpdate>>,
    ready: tokio::sync::Notify,
    wanted: AtomicBool,
}

impl Default for ModelFeed {
    fn default() -> Self {
        ModelFeed {
            slot: Mutex::new(None),
            ready: tokio::sync::Notify::new(),
            // The first update (the full copy) is wanted before the refresher asks.
            wanted: AtomicBool::new(true),
        }
    }
}

impl ModelFeed {
    /// A feed already holding a full copy (tests, tools).
    pub fn with(mirror: Mirror) -> ModelFeed {
        let feed = ModelFeed::default();
        feed.try_offer(|| MirrorUpdate::Full(Box::new(mirror)));
        feed
    }

    /// Puts `make()` in the slot if the refresher took the previous update; otherwise does
    /// nothing (and does not call `make`) and returns false. One producer only: the slot is
    /// checked, then filled after `make` ran without holding the lock (the refresher only ever
    /// empties it).
    pub fn try_offer(&self, make: impl FnOnce() -> MirrorUpdate) -> bool {
        if self.lock().is_some() {
            return false;
        }
        let update = make();
        self.wanted.store(false, Ordering::Release);
        *self.lock() = Some(update);
        self.ready.notify_one();
        true
    }

    /// The refresher is ready for the next update (it finished what it was building).
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// The refresher woke for another reason (its interval, a finished build) and is busy
    /// again: an update offered now would wait in the slot until it is done.
    pub fn unwant(&self) {
        self.wanted.store(false, Ordering::Release);
    }

    /// Whether the refresher asked for an update since the last one was offered.
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MirrorUpdate>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the waiting update, if any.
    pub fn take(&self) -> Option<MirrorUpdate> {
        self.lock().take()
    }

    /// Resolves once an update was offered (possibly before this call).
    pub async fn offered(&self) {
        self.ready.notified().await;
    }
}
