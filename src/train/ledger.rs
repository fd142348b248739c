//! The trained-examples ledger: an optional JSON-lines file naming the source position of every
//! example each step trained on, so an audit (the fault harness, `scripts/chaos`) can tell
//! exactly which clicks the model holds — once, twice, or not at all.
//!
//! ```text
//! {"run":{"restored_step":8,"topics":["events"],"pid":4242,"unix_ms":1764620000000}}
//! {"step":9,"examples":[[0,2,1187,1],[0,1,1190,0]]}      [topic index, partition, offset, positive]
//! ```
//!
//! A run starts with a `run` line giving the step it restored. Steps above that step written by
//! an earlier run were lost with that run (a crash after them and before a checkpoint), so a
//! reader drops them: the model holds exactly the steps of the runs' surviving prefixes. The
//! file is flushed and synced before every checkpoint, so no step a checkpoint contains can be
//! missing from the ledger; a crash may cut the last line short, which readers skip.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::example::TrainingExample;

/// The first line a run writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    /// Global step of the checkpoint the run started from (0 when fresh).
    pub restored_step: i64,
    /// The event topics, in the order of [`crate::example::Origin::topic`].
    pub topics: Vec<String>,
    /// Process id.
    pub pid: u32,
    /// Wall time of the start, ms since the epoch.
    pub unix_ms: u64,
}

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entry {
    /// A run started.
    Run {
        /// Where it started.
        run: RunStart,
    },
    /// A step trained on these examples: `[topic index, partition, offset, positive 1/0]`.
    Step {
        /// Global step number after the step.
        step: i64,
        /// The examples' source positions.
        examples: Vec<(u16, i32, i64, u8)>,
    },
}

/// Appends entries to the ledger file.
pub struct Ledger {
    out: BufWriter<File>,
}

impl Ledger {
    /// Opens (appending) the ledger at `path` and writes the run's first line.
    pub fn open(path: &Path, restored_step: i64, topics: &[String]) -> std::io::Result<Ledger> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut ledger = Ledger {
            out: BufWriter::with_capacity(1 << 16, file),
        };
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // A previous run killed mid-line left a fragment: start on a fresh line.
        ledger.out.write_all(b"\n")?;
        ledger.write(&Entry::Run {
            run: RunStart {
                restored_step,
                topics: topics.to_vec(),
                pid: std::process::id(),
                unix_ms,
            },
        })?;
        ledger.sync()?;
        Ok(ledger)
    }

    /// Records the examples of the step that brought the model to `step`, and hands the line
    /// to the OS (not synced) so an auditor following the file sees every step at once.
    pub fn step(&mut self, step: i64, batch: &[TrainingExample]) -> std::io::Result<()> {
        let examples = batch
            .iter()
            .map(|e| {
                let o = e.origin;
                (
                    o.topic,
                    o.partition,
                    o.offset,
                    u8::from(e.label.is_positive()),
                )
            })
            .collect();
        self.write(&Entry::Step { step, examples })?;
        self.out.flush()
    }

    /// Flushes and syncs to disk (before a checkpoint is written).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    fn write(&mut self, entry: &Entry) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, entry)?;
        self.out.write_all(b"\n")
    }
}

/// What a ledger says the model holds: per (topic index, partition, offset, positive), how many
/// surviving steps trained on it. Lines that do not parse (a crash mid-write) are skipped.
pub fn surviving(text: &str) -> std::collections::HashMap<(u16, i32, i64, u8), u32> {
    let mut steps: std::collections::BTreeMap<i64, Vec<(u16, i32, i64, u8)>> = Default::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Entry>(line) {
            Ok(Entry::Run { run }) => {
                // Steps the restored checkpoint does not contain died with the previous run.
                steps.split_off(&(run.restored_step + 1));
            }
            Ok(Entry::Step { step, examples }) => {
                steps.insert(step, examples);
            }
            Err(_) => {}
        }
    }
    let mut counts = std::collections::HashMap::new();
    for e in steps.into_values().flatten() {
        *counts.entry(e).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_lost_with_a_crashed_run_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ex = |offset| Entry::Step {
            step: offset + 1,
            examples: vec![(0, 0, offset, 1)],
        };
        let mut a = Ledger::open(&path, 0, &["ev".into()]).unwrap();
        for off in 0..5 {
            a.write(&ex(off)).unwrap();
        }
        a.sync().unwrap();
        drop(a);
        // A crash cut a line short; the next run restored step 3 and re-trained offsets 3, 4.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\":6,\"exa")
            .unwrap();
        let mut b = Ledger::open(&path, 3, &["ev".into()]).unwrap();
        for off in 3..6 {
            b.write(&ex(off)).unwrap();
        }
        b.sync().unwrap();
        let got = surviving(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(got.len(), 6);
        assert!(got.values().all(|n| *n == 1), "{got:?}");
    }
}
