//! Catalogue and profile state built from the `item` and `user` topics.
//!
//! Both topics are tables (log-compacted, keyed by id): every instance reads them in full at
//! start and follows them afterwards, so this state never needs checkpointing. Entries are
//! immutable `Arc`s, so resolving features for an example is a pointer copy.
//!
//! Changes are ordered by event time, not by arrival: a change older than the stored version
//! (or than a remembered deletion) is ignored and reported as [`Applied::Stale`]; of two
//! changes with the same time the later arrival wins. So a replay after a restart, or table
//! events arriving over several partitions at different speeds, cannot bring back an older
//! version. Deletion times are remembered for the most recent deletions only
//! ([`Catalog::set_deletion_memory`]), which bounds memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use crate::event::{Dense, Id, ItemEvent, Op, UserEvent};

/// An item's model features.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFeatures {
    /// The item.
    pub item_id: Id,
    /// Primary category.
    pub category: Option<String>,
    /// Genres / tags.
    pub genres: Vec<String>,
    /// Dense features.
    pub dense: Dense,
    /// Event time of the last upsert.
    pub updated_ms: i64,
}

/// A user's profile features.
#[derive(Debug, Clone, PartialEq)]
pub struct UserProfile {
    /// The user.
    pub user_id: Id,
    /// Gender code.
    pub gender: Option<String>,
    /// Age in years.
    pub age: Option<u8>,
    /// Occupation code.
    pub occupation: Option<String>,
    /// Postal code.
    pub zip: Option<String>,
    /// Dense features.
    pub dense: Dense,
    /// Event time of the last upsert.
    pub updated_ms: i64,
}

/// Active items and known users.
#[derive(Debug, Default)]
pub struct Catalog {
    items: Table<ItemFeatures>,
    users: Table<UserProfile>,
    /// Bumped on every change, so readers (index refresh) can tell whether to rebuild.
    version: u64,
    /// The most recent item changes with the version each made, so a reader that keeps its
    /// own copy (the trainer's negative pool) follows the catalogue without re-reading it all.
    journal: std::collections::VecDeque<(u64, Id)>,
    /// Item changes up to this version may have left the journal.
    journal_floor: u64,
}

/// Item changes the journal keeps (a reader further behind re-reads the catalogue).
pub const ITEM_JOURNAL: usize = 65_536;

/// The catalogue shared between ingestion (the only writer) and its readers.
pub type SharedCatalog = Arc<RwLock<Catalog>>;

/// What applying one table change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change is now the catalogue's state.
    Changed,
    /// Nothing visible changed (a deletion of an absent entry, remembered for its time).
    Unchanged,
    /// Older (event time) than the stored version or the remembered deletion: ignored.
    Stale,
}

/// Deletions remembered per table by default (see [`Catalog::set_deletion_memory`]).
pub const DEFAULT_DELETION_MEMORY: usize = 100_000;

impl Catalog {
    /// Keeps the times of at most `cap` deletions per table (items, users). Beyond it the
    /// oldest deletion is forgotten first, and an upsert older than a forgotten deletion is
    /// applied again (the entry comes back); memory stays at O(`cap`) ids.
    pub fn set_deletion_memory(&mut self, cap: usize) {
        self.items.deleted.set_cap(cap);
        self.users.deleted.set_cap(cap);
    }

    /// Applies a catalogue upsert or delete, unless it is older than what is stored.
    pub fn apply_item(&mut self, e: &ItemEvent) -> Applied {
        let applied = match e.op {
            Op::Upsert => self
                .items
                .upsert(&e.item_id, e.event_time_ms, || ItemFeatures {
                    item_id: e.item_id.clone(),
                    category: e.category.clone(),
                    genres: e.genres.clone(),
                    dense: e.dense.clone(),
                    updated_ms: e.event_time_ms,
                }),
            Op::Delete => self.items.delete(&e.item_id, Some(e.event_time_ms)),
        };
        self.count_item(applied, &e.item_id)
    }

    /// Applies a profile upsert or delete, unless it is older than what is stored.
    pub fn apply_user(&mut self, e: &UserEvent) -> Applied {
        let applied = match e.op {
            Op::Upsert => self
                .users
                .upsert(&e.user_id, e.event_time_ms, || UserProfile {
                    user_id: e.user_id.clone(),
                    gender: e.gender.clone(),
                    age: e.age,
                    occupation: e.occupation.clone(),
                    zip: e.zip.clone(),
                    dense: e.dense.clone(),
                    updated_ms: e.event_time_ms,
                }),
            Op::Delete => self.users.delete(&e.user_id, Some(e.event_time_ms)),
        };
        self.count(applied)
    }

    /// Deletes an item at `time_ms` (a tombstone's record time), unless a newer version is
    /// stored; `None` (no record time) deletes whatever is stored.
    pub fn delete_item(&mut self, id: &Id, time_ms: Option<i64>) -> Applied {
        let applied = self.items.delete(id, time_ms);
        self.count_item(applied, id)
    }

    /// Deletes a profile like [`delete_item`](Self::delete_item) deletes an item.
    pub fn delete_user(&mut self, id: &Id, time_ms: Option<i64>) -> Applied {
        let applied = self.users.delete(id, time_ms);
        self.count(applied)
    }

    fn count(&mut self, applied: Applied) -> Applied {
        if applied == Applied::Changed {
            self.version += 1;
        }
        applied
    }

    fn count_item(&mut self, applied: Applied, id: &Id) -> Applied {
        let applied = self.count(applied);
        if applied == Applied::Changed {
            if self.journal.len() == ITEM_JOURNAL {
                if let Some((v, _)) = self.journal.pop_front() {
                    self.journal_floor = v;
                }
            }
            self.journal.push_back((self.version, id.clone()));
        }
        applied
    }

    /// The items changed (upserted or deleted) after `version`, oldest first — possibly one
    /// id more than once — or `None` when the journal no longer reaches back that far.
    pub fn item_changes_since(&self, version: u64) -> Option<impl Iterator<Item = &Id>> {
        (version >= self.journal_floor && version <= self.version).then(|| {
            let from = self.journal.partition_point(|(v, _)| *v <= version);
            self.journal.range(from..).map(|(_, id)| id)
        })
    }

    /// Features of an active item.
    pub fn item(&self, id: &Id) -> Option<Arc<ItemFeatures>> {
        self.items.live.get(id).cloned()
    }

    /// Profile of a known user.
    pub fn user(&self, id: &Id) -> Option<Arc<UserProfile>> {
        self.users.live.get(id).cloned()
    }

    /// Number of active items.
    pub fn item_count(&self) -> usize {
        self.items.live.len()
    }

    /// Number of known users.
    pub fn user_count(&self) -> usize {
        self.users.live.len()
    }

    /// Iterates active items (arbitrary order).
    pub fn items(&self) -> impl Iterator<Item = &Arc<ItemFeatures>> {
        self.items.live.values()
    }

    /// Change counter.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Deletions remembered (items plus users), bounded by the deletion memory.
    pub fn remembered_deletions(&self) -> usize {
        self.items.deleted.len() + self.users.deleted.len()
    }
}

/// Anything stored with the event time of its version.
trait Versioned {
    fn updated_ms(&self) -> i64;
}

impl Versioned for ItemFeatures {
    fn updated_ms(&self) -> i64 {
        self.updated_ms
    }
}

impl Versioned for UserProfile {
    fn updated_ms(&self) -> i64 {
        self.updated_ms
    }
}

/// One table: live entries plus the times of recent deletions.
///
/// The rule is "newest event time wins, ties go to the later arrival", so the table converges
/// to the same state whatever order the changes arrive in (a replay after a restart,
/// partitions read at different speeds), as long as a deletion is remembered.
#[derive(Debug)]
struct Table<T> {
    live: HashMap<Id, Arc<T>>,
    deleted: Deletions,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            live: HashMap::new(),
            deleted: Deletions::new(DEFAULT_DELETION_MEMORY),
        }
    }
}

impl<T: Versioned> Table<T> {
    /// Event time of what the table knows about `id`: its version or its deletion.
    fn known_ms(&self, id: &Id) -> Option<i64> {
        match self.live.get(id) {
            Some(v) => Some(v.updated_ms()),
            None => self.deleted.time(id),
        }
    }

    fn upsert(&mut self, id: &Id, time_ms: i64, make: impl FnOnce() -> T) -> Applied {
        if self.known_ms(id).is_some_and(|known| time_ms < known) {
            return Applied::Stale;
        }
        self.deleted.forget(id);
        self.live.insert(id.clone(), Arc::new(make()));
        Applied::Changed
    }

    fn delete(&mut self, id: &Id, time_ms: Option<i64>) -> Applied {
        let known = self.known_ms(id);
        let time_ms = match (time_ms, known) {
            (Some(t), Some(k)) if t < k => return Applied::Stale,
            (Some(t), _) => t,
            // No time of its own: it deletes whatever is there, at that version's time.
            (None, k) => k.unwrap_or(i64::MIN),
        };
        self.deleted.remember(id, time_ms);
        if self.live.remove(id).is_some() {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }
}

/// Event times of recent deletions, at most `cap` of them (oldest forgotten first), so an
/// upsert older than a deletion does not bring the entry back.
#[derive(Debug)]
struct Deletions {
    /// Deletion time and sequence number per id.
    at: HashMap<Id, (i64, u64)>,
    /// Deletions in the order they were remembered; an entry whose sequence number no longer
    /// matches `at` is outdated (the id was deleted again or upserted since).
    order: VecDeque<(u64, Id)>,
    next: u64,
    cap: usize,
}

impl Deletions {
    fn new(cap: usize) -> Self {
        Deletions {
            at: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap,
        }
    }

    fn time(&self, id: &Id) -> Option<i64> {
        self.at.get(id).map(|(t, _)| *t)
    }

    fn remember(&mut self, id: &Id, time_ms: i64) {
        let seq = self.next;
        self.next += 1;
        self.at.insert(id.clone(), (time_ms, seq));
        self.order.push_back((seq, id.clone()));
        self.trim();
    }

    fn forget(&mut self, id: &Id) {
        // Its entry in `order` stays until it reaches the front (bounded by `cap` anyway).
        self.at.remove(id);
    }

    fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
        self.trim();
    }

    /// Bounding `order` (not just `at`) bounds both, outdated entries included.
    fn trim(&mut self) {
        while self.order.len() > self.cap {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&id).is_some_and(|(_, s)| *s == seq) {
                self.at.remove(&id);
            }
        }
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
impl ItemFeatures {
    /// An item with a category and genres and nothing else (unit tests).
    pub(crate) fn for_test(id: &str, category: Option<&str>, genres: &[&str]) -> Arc<ItemFeatures> {
        Arc::new(ItemFeatures {
            item_id: Id::new(id),
            category: category.map(str::to_owned),
            genres: genres.iter().map(|g| (*g).to_owned()).collect(),
            dense: Default::default(),
            updated_ms: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, op: Op, genre: &str) -> ItemEvent {
        ItemEvent {
            event_id: format!("e-{id}-{genre}"),
            event_time_ms: 1,
            item_id: Id::new(id),
            op,
            title: None,
            category: None,
            genres: vec![genre.into()],
            dense: Dense::new(),
        }
    }

    fn at(id: &str, op: Op, genre: &str, t: i64) -> ItemEvent {
        ItemEvent {
            event_time_ms: t,
            ..item(id, op, genre)
        }
    }

    fn user(id: &str, op: Op, zip: &str, t: i64) -> UserEvent {
        UserEvent {
            event_id: format!("u-{id}-{zip}"),
            event_time_ms: t,
            user_id: Id::new(id),
            op,
            gender: None,
            age: None,
            occupation: None,
            zip: Some(zip.into()),
            dense: Dense::new(),
        }
    }

    fn genres(c: &Catalog, id: &str) -> Option<Vec<String>> {
        c.item(&Id::new(id)).map(|i| i.genres.clone())
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let mut c = Catalog::default();
        assert_eq!(
            c.apply_item(&at("a", Op::Upsert, "new", 20)),
            Applied::Changed
        );
        // A replay after a restart, or a slower partition, delivers the older version later.
        assert_eq!(
            c.apply_item(&at("a", Op::Upsert, "old", 10)),
            Applied::Stale
        );
        assert_eq!(genres(&c, "a"), Some(vec!["new".into()]));
        assert_eq!(
            c.apply_item(&at("a", Op::Delete, "old", 10)),
            Applied::Stale
        );
        assert!(c.item(&Id::new("a")).is_some());
        // Ties: the later arrival wins.
        assert_eq!(
            c.apply_item(&at("a", Op::Upsert, "tie", 20)),
            Applied::Changed
        );
        assert_eq!(genres(&c, "a"), Some(vec!["tie".into()]));
        assert_eq!(c.version(), 2, "stale changes do not bump the version");

        assert_eq!(
            c.apply_user(&user("u", Op::Upsert, "new", 5)),
            Applied::Changed
        );
        assert_eq!(
            c.apply_user(&user("u", Op::Upsert, "old", 4)),
            Applied::Stale
        );
        let zip = c.user(&Id::new("u")).and_then(|u| u.zip.clone());
        assert_eq!(zip.as_deref(), Some("new"));
    }

    #[test]
    fn a_deletion_is_remembered_so_an_older_upsert_does_not_resurrect_the_entry() {
        let mut c = Catalog::default();
        c.apply_item(&at("a", Op::Upsert, "x", 10));
        assert_eq!(c.delete_item(&Id::new("a"), Some(30)), Applied::Changed);
        assert_eq!(c.apply_item(&at("a", Op::Upsert, "x", 20)), Applied::Stale);
        assert!(c.item(&Id::new("a")).is_none());
        // A deletion arriving before the upsert it deletes (another partition) holds too.
        assert_eq!(c.delete_item(&Id::new("b"), Some(30)), Applied::Unchanged);
        assert_eq!(c.apply_item(&at("b", Op::Upsert, "x", 29)), Applied::Stale);
        assert!(c.item(&Id::new("b")).is_none());
        // A newer upsert brings it back and the deletion is forgotten.
        assert_eq!(
            c.apply_item(&at("a", Op::Upsert, "y", 30)),
            Applied::Changed
        );
        assert_eq!(genres(&c, "a"), Some(vec!["y".into()]));
        assert_eq!(c.remembered_deletions(), 1);
        // A tombstone without a record time deletes whatever is stored.
        assert_eq!(c.delete_item(&Id::new("a"), None), Applied::Changed);
        assert_eq!(c.apply_item(&at("a", Op::Upsert, "z", 29)), Applied::Stale);
        assert_eq!(
            c.apply_user(&user("u", Op::Upsert, "1", 5)),
            Applied::Changed
        );
        assert_eq!(c.delete_user(&Id::new("u"), Some(6)), Applied::Changed);
        assert_eq!(c.apply_user(&user("u", Op::Upsert, "1", 5)), Applied::Stale);
        assert_eq!(c.user_count(), 0);
    }

    #[test]
    fn deletion_memory_is_bounded_and_forgets_the_oldest_first() {
        let mut c = Catalog::default();
        c.set_deletion_memory(3);
        for i in 0..10 {
            let id = format!("i{i}");
            c.apply_item(&at(&id, Op::Upsert, "x", 1));
            c.delete_item(&Id::new(&id), Some(2));
            // Upserts and deletions of one id leave outdated entries; they count too.
            c.apply_item(&at(&id, Op::Upsert, "x", 3));
            c.delete_item(&Id::new(&id), Some(4));
        }
        assert_eq!(
            c.remembered_deletions(),
            2,
            "at most 3 entries, 2 of them current"
        );
        assert!(c.items.deleted.order.len() <= 3);
        assert_eq!(c.apply_item(&at("i9", Op::Upsert, "x", 3)), Applied::Stale);
        // A forgotten deletion no longer protects: the documented cost of the bound.
        assert_eq!(
            c.apply_item(&at("i0", Op::Upsert, "x", 3)),
            Applied::Changed
        );
        c.set_deletion_memory(0);
        assert_eq!(c.remembered_deletions(), 0);
    }

    #[test]
    fn upsert_replaces_and_delete_removes() {
        let mut c = Catalog::default();
        c.apply_item(&item("a", Op::Upsert, "x"));
        c.apply_item(&item("a", Op::Upsert, "y"));
        assert_eq!(c.item(&Id::new("a")).unwrap().genres, vec!["y"]);
        c.apply_item(&item("a", Op::Delete, "y"));
        assert!(c.item(&Id::new("a")).is_none());
        assert_eq!(c.item_count(), 0);
        assert_eq!(c.version(), 3);
    }
}
