//! Following trainers' ledgers (`checkpoint.ledger`) while they are written.
//!
//! A [`LedgerFollower`] reads only the complete lines appended since its last look and keeps
//! the same view as `towerstream::train::ledger::surviving`: a `run` line drops the steps
//! above the step it restored (they died with the previous run). At the end the whole file is
//! read once more with `surviving` itself, and the two must agree.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use towerstream::train::ledger::{self, Entry};

/// A trained example's source: `(topic index, partition, offset, positive)`.
pub type Source = (u16, i32, i64, u8);

/// How many surviving steps trained each source.
pub type Counts = HashMap<Source, u32>;

/// An incremental reader of one ledger file.
pub struct LedgerFollower {
    path: PathBuf,
    read_to: u64,
    partial: Vec<u8>,
    steps: BTreeMap<i64, Vec<Source>>,
    counts: Counts,
    restored: Vec<i64>,
}

impl LedgerFollower {
    /// Follows `path` (it may not exist yet).
    pub fn new(path: PathBuf) -> LedgerFollower {
        LedgerFollower {
            path,
            read_to: 0,
            partial: Vec::new(),
            steps: BTreeMap::new(),
            counts: HashMap::new(),
            restored: Vec::new(),
        }
    }

    /// Reads what was appended; returns the current counts.
    pub fn poll(&mut self) -> &Counts {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return &self.counts;
        };
        if f.seek(SeekFrom::Start(self.read_to)).is_err() {
            return &self.counts;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return &self.counts;
        }
        self.read_to += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last_nl) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return &self.counts;
        };
        let rest = self.partial.split_off(last_nl + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        for line in complete.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Ok(entry) = serde_json::from_slice::<Entry>(line) {
                self.apply(entry);
            }
        }
        &self.counts
    }

    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Run { run } => {
                self.restored.push(run.restored_step);
                for (_, examples) in self.steps.split_off(&(run.restored_step + 1)) {
                    self.forget(&examples);
                }
            }
            Entry::Step { step, examples } => {
                for e in &examples {
                    *self.counts.entry(*e).or_insert(0) += 1;
                }
                if let Some(old) = self.steps.insert(step, examples) {
                    self.forget(&old);
                }
            }
        }
    }

    fn forget(&mut self, examples: &[Source]) {
        for e in examples {
            if let Some(n) = self.counts.get_mut(e) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(e);
                }
            }
        }
    }

    /// The step each run restored (one `run` line per process start).
    pub fn restored(&self) -> &[i64] {
        &self.restored
    }

    /// The final word: the library's own reading of the whole file. `Err` names a
    /// disagreement with the incremental view (a harness bug).
    pub fn settle(&mut self) -> Result<Counts, String> {
        self.poll();
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let exact = ledger::surviving(&text);
        if exact != self.counts {
            return Err(format!(
                "ledger {}: incremental view ({} sources) differs from surviving() ({})",
                self.path.display(),
                self.counts.len(),
                exact.len()
            ));
        }
        Ok(exact)
    }
}

/// Adds `b`'s counts to `a` (several trainers' ledgers).
pub fn merge(a: &mut Counts, b: &Counts) {
    for (k, v) in b {
        *a.entry(*k).or_insert(0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn incremental_reading_agrees_with_surviving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut follower = LedgerFollower::new(path.clone());
        let run = |r: i64| {
            format!("{{\"run\":{{\"restored_step\":{r},\"topics\":[\"ev\"],\"pid\":1,\"unix_ms\":0}}}}\n")
        };
        let step = |s: i64, o: i64| format!("{{\"step\":{s},\"examples\":[[0,0,{o},1]]}}\n");
        f.write_all(run(0).as_bytes()).unwrap();
        for s in 1..=4 {
            f.write_all(step(s, s).as_bytes()).unwrap();
        }
        // Half a line: not read until it is complete.
        f.write_all(b"{\"step\":5,\"exam").unwrap();
        assert_eq!(follower.poll().len(), 4);
        f.write_all(b"ples\":[[0,0,5,1]]}\n").unwrap();
        assert_eq!(follower.poll().len(), 5);
        // A crash after step 5; the next run restored step 2 and trains 3.. again.
        f.write_all(run(2).as_bytes()).unwrap();
        f.write_all(step(3, 3).as_bytes()).unwrap();
        assert_eq!(follower.poll().len(), 3);
        assert_eq!(follower.restored(), &[0, 2]);
        let settled = follower.settle().unwrap();
        assert!(settled.values().all(|n| *n == 1));
    }
}
