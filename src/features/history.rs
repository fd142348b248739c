//! Each user's recent clicked items (the sequence feature), bounded per user and in users.
//!
//! Each click keeps its event time, so an example can read the history *as of its own event
//! time* ([`Histories::get_before`]): a shown-not-clicked negative leaves the join window
//! minutes after its impression, and by then the user's later clicks are in the history —
//! features the model could not have had when the impression was shown.

use std::collections::VecDeque;

use lru::LruCache;
use rustc_hash::FxBuildHasher;

use serde::{Deserialize, Serialize};

use crate::event::Id;

/// Histories shared between the trainer (writer) and serving (readers).
pub type SharedHistories = std::sync::Arc<std::sync::RwLock<Histories>>;

/// Recent clicks per user: the last `len` item ids with their event times, newest last.
///
/// Users are kept in least-recently-active order (an LRU list), so dropping the oldest one
/// when a new user passes `max_users` costs O(1) under the write lock serving's readers wait
/// on, not a scan of every user.
#[derive(Debug, Clone)]
pub struct Histories {
    len: usize,
    max_users: usize,
    /// Most recently active first. Unbounded: the cap is enforced in [`Self::push`], so no
    /// table of `max_users` entries is allocated up front.
    users: LruCache<Id, VecDeque<(Id, i64)>, FxBuildHasher>,
}

impl Default for Histories {
    fn default() -> Self {
        Histories::new(0, 1)
    }
}

/// Serialised form (checkpoints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoriesState {
    /// Per user, least recently active first; each history newest last, as (item, event
    /// time in ms).
    pub users: Vec<(String, Vec<(String, i64)>)>,
}

impl Histories {
    /// Keeps the last `len` clicks of at most `max_users` users.
    pub fn new(len: usize, max_users: usize) -> Self {
        Histories {
            len,
            max_users: max_users.max(1),
            users: LruCache::unbounded_with_hasher(FxBuildHasher),
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

    /// The user's recent items, oldest first (reading does not count as activity).
    pub fn get(&self, user: &Id) -> impl Iterator<Item = &Id> {
        self.users
            .peek(user)
            .into_iter()
            .flat_map(|q| q.iter().map(|(item, _)| item))
    }

    /// The user's recent items clicked before `event_time_ms`, oldest first: the history an
    /// example of that time saw. Clicks pushed out by later ones are gone, so this is the
    /// last `len` clicks before the time only while fewer than `len` came after it.
    pub fn get_before(&self, user: &Id, event_time_ms: i64) -> impl Iterator<Item = &Id> {
        self.users.peek(user).into_iter().flat_map(move |q| {
            q.iter()
                .filter(move |(_, t)| *t < event_time_ms)
                .map(|(item, _)| item)
        })
    }

    /// The histories of `users` alone, copied (reading does not count as activity), with no
    /// cap on users: a scratch copy to work on without holding the shared lock.
    pub fn of_users<'a>(&self, users: impl IntoIterator<Item = &'a Id>) -> Histories {
        let mut out = Histories::new(self.len, usize::MAX);
        for user in users {
            if let Some(q) = self.users.peek(user) {
                if !out.users.contains(user) {
                    out.users.put(user.clone(), q.clone());
                }
            }
        }
        out
    }

    /// Forgets every history (e.g. before another pass over the same stream).
    pub fn clear(&mut self) {
        self.users.clear();
    }

    /// Appends a click at `event_time_ms`; the user becomes the most recently active. Over
    /// the cap, the least recently active user is dropped, in O(1).
    pub fn push(&mut self, user: &Id, item: &Id, event_time_ms: i64) {
        if self.len == 0 {
            return;
        }
        let q = self.users.get_or_insert_mut_ref(user, VecDeque::new);
        q.push_back((item.clone(), event_time_ms));
        if q.len() > self.len {
            q.pop_front();
        }
        if self.users.len() > self.max_users {
            self.users.pop_lru();
        }
    }

    /// Snapshot for a checkpoint (users ordered by last activity, so restore keeps the order).
    pub fn state(&self) -> HistoriesState {
        HistoriesState {
            users: self
                .users
                .iter()
                .rev()
                .map(|(u, q)| {
                    let items = q.iter().map(|(i, t)| (i.to_string(), *t)).collect();
                    (u.to_string(), items)
                })
                .collect(),
        }
    }

    /// Restores a snapshot (the last user listed is the most recently active).
    pub fn restore(&mut self, state: HistoriesState) {
        self.users.clear();
        for (u, items) in state.users {
            let q: VecDeque<(Id, i64)> = items.into_iter().map(|(i, t)| (Id::new(i), t)).collect();
            self.users.put(Id::new(u), q);
        }
        while self.users.len() > self.max_users {
            self.users.pop_lru();
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
            h.push(&u, &Id::new(format!("i{i}")), 0);
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
        h.push(&Id::new("a"), &Id::new("x"), 0);
        h.push(&Id::new("b"), &Id::new("x"), 0);
        h.push(&Id::new("a"), &Id::new("y"), 0);
        h.push(&Id::new("c"), &Id::new("x"), 0);
        assert_eq!(h.users(), 2);
        assert_eq!(h.get(&Id::new("b")).count(), 0);
        assert_eq!(h.get(&Id::new("a")).count(), 2);
    }

    #[test]
    fn a_copy_of_some_users_answers_like_the_original_and_leaves_it_alone() {
        let mut h = Histories::new(3, 10);
        for (u, i, t) in [("a", "x", 1), ("b", "x", 2), ("a", "y", 3), ("c", "z", 4)] {
            h.push(&Id::new(u), &Id::new(i), t);
        }
        let (a, b) = (Id::new("a"), Id::new("b"));
        let mut copy = h.of_users([&a, &a, &Id::new("nobody")]);
        assert_eq!(copy.users(), 1);
        let before: Vec<&Id> = h.get_before(&a, 3).collect();
        assert_eq!(copy.get_before(&a, 3).collect::<Vec<_>>(), before);
        assert_eq!(copy.get(&b).count(), 0);
        copy.push(&a, &Id::new("w"), 5);
        assert_eq!(copy.get(&a).count(), 3);
        assert_eq!(h.get(&a).count(), 2, "the original changed");
        // Reading for the copy is no activity: the original's order is untouched.
        assert_eq!(held(&h), ["b", "a", "c"]);
    }

    fn held(h: &Histories) -> Vec<String> {
        h.state().users.into_iter().map(|(u, _)| u).collect()
    }

    #[test]
    fn at_the_cap_each_new_user_evicts_exactly_the_least_recently_active_even_after_restore() {
        let id = |i: usize| Id::new(format!("u{i}"));
        let mut h = Histories::new(3, 4);
        for i in 0..4 {
            h.push(&id(i), &Id::new("x"), 0);
        }
        // Activity order now u1, u2, u0, u3 (oldest first); reading does not count.
        h.push(&id(0), &Id::new("y"), 0);
        h.push(&id(3), &Id::new("y"), 0);
        assert_eq!(h.get(&id(1)).count(), 1);
        assert_eq!(held(&h), ["u1", "u2", "u0", "u3"]);

        // A checkpoint round trip keeps that order, so evictions continue where they were.
        let mut r = Histories::new(3, 4);
        r.restore(h.state());
        for h in [&mut h, &mut r] {
            h.push(&id(4), &Id::new("z"), 0);
            assert_eq!(held(h), ["u2", "u0", "u3", "u4"]);
            h.push(&id(5), &Id::new("z"), 0);
            assert_eq!(held(h), ["u0", "u3", "u4", "u5"]);
            assert_eq!(h.users(), 4);
            let u0: Vec<&Id> = h.get(&id(0)).collect();
            assert_eq!(u0, [&Id::new("x"), &Id::new("y")]);
        }
    }

    #[test]
    fn restoring_more_users_than_the_cap_keeps_the_most_recent() {
        let mut big = Histories::new(2, 10);
        for i in 0..10 {
            big.push(&Id::new(format!("u{i}")), &Id::new("x"), 0);
        }
        let mut small = Histories::new(2, 3);
        small.restore(big.state());
        assert_eq!(held(&small), ["u7", "u8", "u9"]);
    }

    #[test]
    fn a_history_as_of_an_event_time_leaves_out_later_clicks() {
        let mut h = Histories::new(5, 10);
        let u = Id::new("u");
        for (i, t) in [("a", 100), ("b", 200), ("c", 300)] {
            h.push(&u, &Id::new(i), t);
        }
        let at = |t| h.get_before(&u, t).map(Id::to_string).collect::<Vec<_>>();
        assert_eq!(at(250), ["a", "b"]);
        assert_eq!(
            at(100),
            Vec::<String>::new(),
            "a click is not in its own history"
        );
        assert_eq!(at(i64::MAX), ["a", "b", "c"]);
        let mut r = Histories::new(5, 10);
        r.restore(h.state());
        assert_eq!(
            r.get_before(&u, 250).count(),
            2,
            "times survive a checkpoint"
        );
    }
}
