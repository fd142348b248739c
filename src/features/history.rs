//! Each user's recent clicked items (the sequence feature), bounded per user and in users.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::event::Id;

/// Histories shared between the trainer (writer) and serving (readers).
pub type SharedHistories = std::sync::Arc<std::sync::RwLock<Histories>>;

/// Recent clicks per user: the last `len` item ids, newest last.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    len: usize,
    max_users: usize,
    users: FxHashMap<Id, (u64, VecDeque<Id>)>,
    /// Monotonic activity clock for dropping the least recently active user.
    clock: u64,
}

/// Serialised form (checkpoints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoriesState {
    /// Per user, newest last.
    pub users: Vec<(String, Vec<String>)>,
}

impl Histories {
    /// Keeps the last `len` clicks of at most `max_users` users.
    pub fn new(len: usize, max_users: usize) -> Self {
        Histories {
            len,
            max_users: max_users.max(1),
            users: FxHashMap::default(),
            clock: 0,
        }
    }

    /// [`Histories::new`], shared: the trainer's (or a replica's) writer and serving's readers.
    pub fn shared(len: usize, max_users: usize) -> SharedHistories {
        std::sync::Arc::new(std::sync::RwLock::new(Histories::new(len, max_users)))
    }

    /// Configured history length.
    pub fn len_limit(&self) -> usize {
        self.len
    }

    /// Users with a history.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The user's recent items, oldest first.
    pub fn get(&self, user: &Id) -> impl Iterator<Item = &Id> {
        self.users.get(user).into_iter().flat_map(|(_, q)| q.iter())
    }

    /// Forgets every history (e.g. before another pass over the same stream).
    pub fn clear(&mut self) {
        self.users.clear();
        self.clock = 0;
    }

    /// Appends a click.
    pub fn push(&mut self, user: &Id, item: &Id) {
        if self.len == 0 {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        let entry = self
            .users
            .entry(user.clone())
            .or_insert_with(|| (clock, VecDeque::new()));
        entry.0 = clock;
        entry.1.push_back(item.clone());
        if entry.1.len() > self.len {
            entry.1.pop_front();
        }
        if self.users.len() > self.max_users {
            // Rare (only when over the cap): drop the least recently active user.
            if let Some(oldest) = self
                .users
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                self.users.remove(&oldest);
            }
        }
    }

    /// Snapshot for a checkpoint (users ordered by last activity, so restore keeps the order).
    pub fn state(&self) -> HistoriesState {
        let mut v: Vec<(&Id, &(u64, VecDeque<Id>))> = self.users.iter().collect();
        v.sort_by_key(|(_, (t, _))| *t);
        HistoriesState {
            users: v
                .into_iter()
                .map(|(u, (_, q))| (u.to_string(), q.iter().map(Id::to_string).collect()))
                .collect(),
        }
    }

    /// Restores a snapshot.
    pub fn restore(&mut self, state: HistoriesState) {
        self.users.clear();
        self.clock = 0;
        for (u, items) in state.users {
            self.clock += 1;
            let q: VecDeque<Id> = items.iter().map(Id::new).collect();
            self.users.insert(Id::new(u), (self.clock, q));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_n_and_round_trips() {
        let mut h = Histories::new(3, 10);
        let u = Id::new("u");
        for i in 0..5 {
            h.push(&u, &Id::new(format!("i{i}")));
        }
        let got: Vec<String> = h.get(&u).map(|i| i.to_string()).collect();
        assert_eq!(got, ["i2", "i3", "i4"]);
        let mut h2 = Histories::new(3, 10);
        h2.restore(h.state());
        assert_eq!(h2.get(&u).count(), 3);
    }

    #[test]
    fn drops_the_least_recently_active_user_over_the_cap() {
        let mut h = Histories::new(2, 2);
        h.push(&Id::new("a"), &Id::new("x"));
        h.push(&Id::new("b"), &Id::new("x"));
        h.push(&Id::new("a"), &Id::new("y"));
        h.push(&Id::new("c"), &Id::new("x"));
        assert_eq!(h.users(), 2);
        assert_eq!(h.get(&Id::new("b")).count(), 0);
        assert_eq!(h.get(&Id::new("a")).count(), 2);
    }
}
