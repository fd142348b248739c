//! What changed in the model since the last serving snapshot, so a refresh costs the trainer
//! O(rows touched) instead of a copy of every embedding table.
//!
//! While tracking is on, each step records the table rows it updated (gathered or re-initialised),
//! the vocabulary rows it assigned to a new id, and the clicks it counted. [`Changes::drain`]
//! turns that into a [`ModelDelta`] — copies of just those rows and the (small) MLP — which the
//! refresher applies to its own full copy of the model (`refresh::mirror`), off the trainer
//! thread.

use rustc_hash::{FxHashMap, FxHashSet};
use tch::Tensor;

use crate::event::Id;
use crate::features::vocab::Vocab;
use crate::train::model::Towers;

/// Everything a full model copy needs to catch up with the trainer.
pub struct ModelDelta {
    /// Training step the delta brings the copy to.
    pub step: i64,
    /// MLP variables by name (copies).
    pub dense: Vec<(String, Tensor)>,
    /// Per table: the changed rows (`i64` indices) and their values `[rows, dim]`; `None` when
    /// no row of that table changed.
    pub rows: Vec<Option<(Tensor, Tensor)>>,
    /// Per vocabulary: rows now holding a different id, and that id.
    pub vocab_rows: Vec<Vec<(u32, String)>>,
    /// Clicks counted since the previous delta, per item.
    pub clicks: Vec<(Id, u64)>,
}

impl ModelDelta {
    /// Table rows carried, over all tables.
    pub fn row_count(&self) -> usize {
        self.rows
            .iter()
            .flatten()
            .map(|(idx, _)| idx.size()[0] as usize)
            .sum()
    }
}

/// Rows, vocabulary assignments and clicks recorded since the last drain.
#[derive(Debug, Default)]
pub struct Changes {
    tables: Vec<FxHashSet<i64>>,
    vocabs: Vec<FxHashSet<u32>>,
    clicks: FxHashMap<Id, u64>,
}

impl Changes {
    /// Empty change sets for `tables` tables (one vocabulary each).
    pub fn new(tables: usize) -> Self {
        Changes {
            tables: vec![FxHashSet::default(); tables],
            vocabs: vec![FxHashSet::default(); tables],
            clicks: FxHashMap::default(),
        }
    }

    /// Rows of `table` whose values changed.
    pub fn rows(&mut self, table: usize, rows: &[i64]) {
        self.tables[table].extend(rows.iter().copied());
    }

    /// A vocabulary row now holds a new id.
    pub fn assigned(&mut self, table: usize, row: u32) {
        self.vocabs[table].insert(row);
    }

    /// One click on `item`.
    pub fn click(&mut self, item: &Id) {
        *self.clicks.entry(item.clone()).or_insert(0) += 1;
    }

    /// Copies what changed out of `towers` and `vocabs` and starts over.
    pub fn drain(&mut self, step: i64, towers: &Towers, vocabs: &[Vocab]) -> ModelDelta {
        let rows = self
            .tables
            .iter_mut()
            .enumerate()
            .map(|(t, set)| {
                if set.is_empty() {
                    return None;
                }
                let mut rows: Vec<i64> = set.drain().collect();
                rows.sort_unstable();
                Some(towers.copy_rows(t, &rows))
            })
            .collect();
        let vocab_rows = self
            .vocabs
            .iter_mut()
            .zip(vocabs)
            .map(|(set, v)| {
                set.drain()
                    .map(|row| (row, v.key(row).to_owned()))
                    .collect()
            })
            .collect();
        ModelDelta {
            step,
            dense: towers.copy_dense(),
            rows,
            vocab_rows,
            clicks: self.clicks.drain().collect(),
        }
    }
}
