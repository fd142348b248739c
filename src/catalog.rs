//! Catalogue and profile state built from the `item` and `user` topics.
//!
//! Both topics are tables (log-compacted, keyed by id): every instance reads them in full at
//! start and follows them afterwards, so this state never needs checkpointing. Entries are
//! immutable `Arc`s, so resolving features for an example is a pointer copy.

use std::collections::HashMap;
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
    items: HashMap<Id, Arc<ItemFeatures>>,
    users: HashMap<Id, Arc<UserProfile>>,
    /// Bumped on every change, so readers (index refresh) can tell whether to rebuild.
    version: u64,
}

/// The catalogue shared between ingestion (the only writer) and its readers.
pub type SharedCatalog = Arc<RwLock<Catalog>>;

impl Catalog {
    /// Applies a catalogue upsert or delete.
    pub fn apply_item(&mut self, e: &ItemEvent) {
        match e.op {
            Op::Upsert => {
                self.items.insert(
                    e.item_id.clone(),
                    Arc::new(ItemFeatures {
                        item_id: e.item_id.clone(),
                        category: e.category.clone(),
                        genres: e.genres.clone(),
                        dense: e.dense.clone(),
                        updated_ms: e.event_time_ms,
                    }),
                );
            }
            Op::Delete => {
                self.items.remove(&e.item_id);
            }
        }
        self.version += 1;
    }

    /// Applies a profile upsert or delete.
    pub fn apply_user(&mut self, e: &UserEvent) {
        match e.op {
            Op::Upsert => {
                self.users.insert(
                    e.user_id.clone(),
                    Arc::new(UserProfile {
                        user_id: e.user_id.clone(),
                        gender: e.gender.clone(),
                        age: e.age,
                        occupation: e.occupation.clone(),
                        zip: e.zip.clone(),
                        dense: e.dense.clone(),
                        updated_ms: e.event_time_ms,
                    }),
                );
            }
            Op::Delete => {
                self.users.remove(&e.user_id);
            }
        }
        self.version += 1;
    }

    /// Features of an active item.
    pub fn item(&self, id: &Id) -> Option<Arc<ItemFeatures>> {
        self.items.get(id).cloned()
    }

    /// Profile of a known user.
    pub fn user(&self, id: &Id) -> Option<Arc<UserProfile>> {
        self.users.get(id).cloned()
    }

    /// Number of active items.
    pub fn item_count(&self) -> usize {
        self.items.len()
    }

    /// Number of known users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Iterates active items (arbitrary order).
    pub fn items(&self) -> impl Iterator<Item = &Arc<ItemFeatures>> {
        self.items.values()
    }

    /// Change counter.
    pub fn version(&self) -> u64 {
        self.version
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
