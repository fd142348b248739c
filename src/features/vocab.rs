//! Dynamic, collision-free vocabularies: arbitrary ids to embedding rows, as they arrive.
//!
//! Row 0 is the shared "unknown" row. A new id gets its own row once it has been seen
//! `min_count` times (counted in a small count-min sketch, so admission costs bounded memory).
//! The sketch *forgets*: it is sized by the table (two counters per row and hash function)
//! and halves every counter after a quarter of its width in increments (TinyLFU's reset), with
//! conservative updates. Without that, 16k counters that never decay all pass `min_count`
//! once a few hundred thousand distinct ids went by, and admission stops filtering exactly
//! at the scale it is for (a 100k-row table with `min_count = 2` admitted one-off ids until
//! it was full; now 4 % of a million one-off ids get a row). The price of bounded memory is a
//! horizon: sightings of an id count toward `min_count` for about `capacity / 2` sightings
//! of other not-yet-admitted ids.
//! When every row is taken, the least recently seen of a sample of rows is evicted if it has
//! been unseen for longer than `ttl_ms` (event time); its row is handed back to the caller to
//! re-initialise weights and optimizer state. If nothing is old enough, the id stays unknown.

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::hash::stable_hash;

/// Row of the shared unknown/cold id.
pub const UNKNOWN_ROW: u32 = 0;

/// Vocabulary limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabParams {
    /// Rows including the unknown row.
    pub capacity: u32,
    /// Sightings before an id gets its own row (1 = at once).
    pub min_count: u32,
    /// Rows unseen for longer than this (event-time ms) may be reused when full.
    pub ttl_ms: i64,
}

/// What a training-time lookup did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Known id.
    Hit(u32),
    /// New id admitted into a never-used row.
    Admitted(u32),
    /// New id admitted into a row taken from an expired id: re-initialise that row.
    Evicted(u32),
    /// Not (yet) admitted: use the unknown row.
    Unknown,
}

impl Lookup {
    /// The row to use.
    pub fn row(self) -> u32 {
        match self {
            Lookup::Hit(r) | Lookup::Admitted(r) | Lookup::Evicted(r) => r,
            Lookup::Unknown => UNKNOWN_ROW,
        }
    }
}

/// Smallest sketch width (counters per hash function).
const MIN_SKETCH_WIDTH: usize = 1 << 14;
const SKETCH_DEPTH: usize = 4;

/// Sketch width for a table of `capacity` rows: a power of two of at least two per row.
fn sketch_width(capacity: usize) -> usize {
    (2 * capacity).next_power_of_two().max(MIN_SKETCH_WIDTH)
}
const EVICTION_SAMPLE: usize = 32;

/// One feature's vocabulary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vocab {
    params: VocabParams,
    /// Id → row. Fx hashing: several lookups per example on the training hot path.
    rows: FxHashMap<String, u32>,
    /// Per row: its id (empty for free rows and row 0) and the last event time it was seen.
    keys: Vec<String>,
    last_seen: Vec<i64>,
    /// Count-min sketch of sightings of not-yet-admitted ids (only when `min_count > 1`),
    /// [`SKETCH_DEPTH`] rows of `sketch.len() / SKETCH_DEPTH` counters.
    sketch: Vec<u16>,
    /// Increments since the counters were last halved.
    #[serde(default)]
    sketch_increments: usize,
    /// Deterministic sampler state for eviction.
    rng: u64,
    admissions: u64,
    evictions: u64,
}

impl Vocab {
    /// An empty vocabulary (only the unknown row).
    pub fn new(params: VocabParams) -> Self {
        let capacity = params.capacity.max(2) as usize;
        Vocab {
            params,
            rows: FxHashMap::default(),
            keys: vec![String::new()],
            last_seen: vec![i64::MIN],
            sketch: if params.min_count > 1 {
                vec![0; sketch_width(capacity) * SKETCH_DEPTH]
            } else {
                Vec::new()
            },
            sketch_increments: 0,
            rng: 0x853c_49e6_748f_ea9b ^ capacity as u64,
            admissions: 0,
            evictions: 0,
        }
    }

    /// Rows in use, including the unknown row.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when only the unknown row exists.
    pub fn is_empty(&self) -> bool {
        self.keys.len() <= 1
    }

    /// Total rows the embedding table needs.
    pub fn capacity(&self) -> u32 {
        self.params.capacity.max(2)
    }

    /// Ids admitted so far (including into reused rows).
    pub fn admissions(&self) -> u64 {
        self.admissions
    }

    /// Rows reused after eviction so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Serving-time lookup: never admits, never touches.
    pub fn get(&self, id: &str) -> u32 {
        self.rows.get(id).copied().unwrap_or(UNKNOWN_ROW)
    }

    /// The id holding `row` (empty for row 0 and unused rows).
    pub fn key(&self, row: u32) -> &str {
        self.keys.get(row as usize).map_or("", String::as_str)
    }

    /// Makes `row` hold `id`, as the training copy of this vocabulary did (mirrors that apply
    /// a trainer's changes; `id` empty frees the row).
    pub fn assign(&mut self, row: u32, id: &str) {
        let r = row as usize;
        if r == 0 || r >= self.capacity() as usize {
            return;
        }
        if r >= self.keys.len() {
            self.keys.resize(r + 1, String::new());
            self.last_seen.resize(r + 1, i64::MIN);
        }
        let old = std::mem::replace(&mut self.keys[r], id.to_owned());
        if self.rows.get(&old) == Some(&row) {
            self.rows.remove(&old);
        }
        if !id.is_empty() {
            self.rows.insert(id.to_owned(), row);
        }
    }

    /// Training-time lookup at event time `now_ms`: touches, counts and admits.
    pub fn lookup(&mut self, id: &str, now_ms: i64) -> Lookup {
        if let Some(&row) = self.rows.get(id) {
            self.last_seen[row as usize] = now_ms;
            return Lookup::Hit(row);
        }
        if self.params.min_count > 1 && self.count(id) < self.params.min_count {
            return Lookup::Unknown;
        }
        let (row, evicted) = if self.keys.len() < self.capacity() as usize {
            self.keys.push(id.to_owned());
            self.last_seen.push(now_ms);
            ((self.keys.len() - 1) as u32, false)
        } else {
            match self.victim(now_ms) {
                Some(row) => {
                    let old = std::mem::replace(&mut self.keys[row as usize], id.to_owned());
                    self.rows.remove(&old);
                    self.last_seen[row as usize] = now_ms;
                    self.evictions += 1;
                    (row, true)
                }
                None => return Lookup::Unknown,
            }
        };
        self.rows.insert(id.to_owned(), row);
        self.admissions += 1;
        if evicted {
            Lookup::Evicted(row)
        } else {
            Lookup::Admitted(row)
        }
    }

    /// Counts a sighting of `id` and returns its (approximate, decaying) count.
    ///
    /// Conservative update: only the counters at the current minimum grow, so collisions
    /// inflate counts less. Every `width / 4` increments all counters are halved: a count says
    /// how often the id was seen *recently*, and the load per counter stays below one.
    fn count(&mut self, id: &str) -> u32 {
        let width = self.sketch.len() / SKETCH_DEPTH;
        let h = stable_hash(id.as_bytes());
        let mut cols = [0usize; SKETCH_DEPTH];
        for (d, col) in cols.iter_mut().enumerate() {
            let c = (h.rotate_left(16 * d as u32) ^ (d as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                % width as u64;
            *col = d * width + c as usize;
        }
        let min = cols.iter().map(|c| self.sketch[*c]).min().unwrap_or(0);
        for c in cols {
            if self.sketch[c] == min {
                self.sketch[c] = min.saturating_add(1);
            }
        }
        self.sketch_increments += 1;
        if self.sketch_increments >= width / 4 {
            for c in &mut self.sketch {
                *c >>= 1;
            }
            self.sketch_increments = 0;
        }
        u32::from(min.saturating_add(1))
    }

    /// The least recently seen of a random sample of rows, if it has expired.
    fn victim(&mut self, now_ms: i64) -> Option<u32> {
        let n = self.keys.len() as u64 - 1;
        let mut best: Option<(i64, u32)> = None;
        for _ in 0..EVICTION_SAMPLE {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let row = 1 + (self.rng % n) as u32;
            let seen = self.last_seen[row as usize];
            if best.is_none_or(|(s, _)| seen < s) {
                best = Some((seen, row));
            }
        }
        best.filter(|(seen, _)| now_ms.saturating_sub(*seen) > self.params.ttl_ms)
            .map(|(_, row)| row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(capacity: u32, min_count: u32, ttl_ms: i64) -> VocabParams {
        VocabParams {
            capacity,
            min_count,
            ttl_ms,
        }
    }

    #[test]
    fn admission_still_filters_after_millions_of_one_off_ids() {
        // A 100k-row table that admits ids seen twice, then 1M ids seen once each (a long
        // tail of one-off item ids, bots, typos...): they must not take its rows.
        let mut v = Vocab::new(params(100_000, 2, 0));
        for i in 0..1_000_000u32 {
            v.lookup(&format!("once-{i}"), 0);
        }
        eprintln!("{} of 1,000,000 one-off ids admitted", v.admissions());
        assert!(
            v.admissions() < 50_000,
            "{} of 1,000,000 one-off ids were admitted (the table holds 100,000)",
            v.admissions()
        );
        // An id seen twice within the recent past is still admitted.
        assert_eq!(v.lookup("twice", 0), Lookup::Unknown);
        for i in 0..1_000u32 {
            v.lookup(&format!("between-{i}"), 0);
        }
        assert_ne!(v.lookup("twice", 0), Lookup::Unknown);
    }
    #[test]
    fn ids_get_distinct_rows_and_keep_them() {
        let mut v = Vocab::new(params(100, 1, 1000));
        let a = v.lookup("a", 0).row();
        let b = v.lookup("b", 0).row();
        assert_ne!(a, b);
        assert_ne!(a, UNKNOWN_ROW);
        assert_eq!(v.lookup("a", 5), Lookup::Hit(a));
        assert_eq!(v.get("a"), a);
        assert_eq!(v.get("never"), UNKNOWN_ROW);
    }

    #[test]
    fn admission_waits_for_min_count() {
        let mut v = Vocab::new(params(100, 3, 1000));
        assert_eq!(v.lookup("x", 0), Lookup::Unknown);
        assert_eq!(v.lookup("x", 0), Lookup::Unknown);
        assert!(matches!(v.lookup("x", 0), Lookup::Admitted(_)));
    }

    #[test]
    fn a_mirror_replaying_assignments_resolves_ids_like_the_original() {
        let mut v = Vocab::new(params(4, 1, 100));
        let mut mirror = v.clone();
        let mut assigned = Vec::new();
        for (t, id) in ["a", "b", "c"].iter().enumerate() {
            assigned.push(v.lookup(id, t as i64).row());
        }
        v.lookup("b", 150);
        v.lookup("c", 150);
        assigned.push(v.lookup("d", 200).row()); // evicts "a"
        for row in assigned {
            mirror.assign(row, v.key(row));
        }
        for id in ["a", "b", "c", "d", "never"] {
            assert_eq!(mirror.get(id), v.get(id), "{id}");
        }
        assert_eq!(mirror.get("a"), UNKNOWN_ROW);
    }

    #[test]
    fn full_vocab_reuses_only_expired_rows() {
        let mut v = Vocab::new(params(4, 1, 100)); // rows 1..=3 usable
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            v.lookup(id, i as i64);
        }
        // Nothing is older than the TTL yet: the newcomer stays unknown.
        assert_eq!(v.lookup("d", 50), Lookup::Unknown);
        v.lookup("b", 150);
        v.lookup("c", 150);
        // "a" (seen at 0) has expired by 200 and is the least recently seen.
        let row_a = v.get("a");
        assert_eq!(v.lookup("d", 200), Lookup::Evicted(row_a));
        assert_eq!(v.get("a"), UNKNOWN_ROW);
        assert_eq!(v.get("d"), row_a);
        assert_eq!((v.admissions(), v.evictions()), (4, 1));
    }
}
