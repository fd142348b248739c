//! What changed in the model since the last serving snapshot, so a refresh costs the trainer
//! O(rows touched) instead of a copy of every embedding table.
//!
//! While tracking is on, each step records the table rows it updated (gathered or re-initialised),
//! the vocabulary rows it assigned to a new id, and the clicks it counted. [`ChangeLog::drain`]
//! turns that into a [`CatchUp`] — copies of just those rows and the (small) MLP — which the
//! refresher applies to its own full copy of the model (`refresh::mirror`), off the trainer
//! thread.

use rustc_hash::{FxHashMap, FxHashSet};
use tch::Tensor;

use crate::event::Id;
use crate::features::vocab::Vocab;
use crate::train::model::Towers;

/// Everything a full model copy needs to catch up with the trainer.
pub struct CatchUp {
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

impl CatchUp {
    /// The name of the first MLP variable or table whose carried values hold a NaN or an
    /// infinity. A copy that was finite stays finite after applying a delta without one, so
    /// the refresher checks the delta instead of the whole copy (a 10M-row table's scan).
    pub fn first_non_finite(&self) -> Option<String> {
        let rows = self.rows.iter().enumerate().filter_map(|(t, r)| {
            r.as_ref()
                .map(|(_, v)| (format!("table {t}"), v.shallow_clone()))
        });
        let named: Vec<(String, Tensor)> = self
            .dense
            .iter()
            .map(|(n, v)| (n.clone(), v.shallow_clone()))
            .chain(rows)
            .collect();
        crate::train::model::first_non_finite(&named)
    }

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
pub struct ChangeLog {
    tables: Vec<FxHashSet<i64>>,
    vocabs: Vec<FxHashSet<u32>>,
    clicks: FxHashMap<Id, u64>,
}

impl ChangeLog {
    /// Empty change sets for `tables` tables (one vocabulary each).
    pub fn new(tables: usize) -> Self {
        ChangeLog {
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
    pub fn drain(&mut self, step: i64, towers: &Towers, vocabs: &[Vocab]) -> CatchUp {
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
        CatchUp {
            step,
            dense: towers.copy_dense(),
            rows,
            vocab_rows,
            clicks: self.clicks.drain().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(rows: Vec<Option<(Tensor, Tensor)>>, dense: Vec<(String, Tensor)>) -> CatchUp {
        CatchUp {
            step: 1,
            dense,
            rows,
            vocab_rows: Vec::new(),
            clicks: Vec::new(),
        }
    }

    #[test]
    fn a_delta_names_the_first_variable_or_table_carrying_a_nan_or_an_infinity() {
        let row = |x: f32| Tensor::from_slice(&[1.0f32, x]).view([1, 2]);
        let at = || Tensor::from_slice(&[3i64]);
        let fine = delta(
            vec![None, Some((at(), row(2.0)))],
            vec![("user.0.weight".into(), row(0.5))],
        );
        assert_eq!(fine.first_non_finite(), None);
        let bad_row = delta(vec![None, Some((at(), row(f32::NAN)))], Vec::new());
        assert_eq!(bad_row.first_non_finite().as_deref(), Some("table 1"));
        let bad_var = delta(
            Vec::new(),
            vec![("user.0.weight".into(), row(f32::INFINITY))],
        );
        assert_eq!(bad_var.first_non_finite().as_deref(), Some("user.0.weight"));
    }
}
