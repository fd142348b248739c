//! Datasets as the project's events: MovieLens (100K in the GroupLens or the RecBole layout,
//! 1M) and a generic CSV/JSONL interaction format with optional user and item files.
//!
//! A [`Dataset`] is a catalogue (item events), profiles (user events) and interactions in
//! event-time order; [`Dataset::events`] turns it into the stream `towerstream replay`
//! publishes, and `towerstream eval` splits it leave-last-out. Datasets come without
//! impressions, so every interaction becomes an (unjoined) click.

mod generic;
mod movielens;

use std::path::{Path, PathBuf};

use crate::catalog::Catalog;
use crate::event::{Click, Event, Id, ItemEvent, UserEvent};

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A record is malformed.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No known layout was found at the path.
    #[error("no dataset recognised at {0} (expected MovieLens u.data / ml-100k.inter / ratings.dat, or interactions.csv / interactions.jsonl)")]
    Unrecognised(PathBuf),
}

/// On-disk layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Detect from the files present.
    Auto,
    /// MovieLens-100K: GroupLens `u.data`/`u.user`/`u.item` or RecBole `ml-100k.{inter,user,item}`.
    Ml100k,
    /// MovieLens-1M: `ratings.dat`, `users.dat`, `movies.dat`.
    Ml1m,
    /// `interactions.csv` (+ optional `users.csv`, `items.csv`) or a single CSV file.
    Csv,
    /// `interactions.jsonl` (+ optional `users.jsonl`, `items.jsonl`) or a single JSONL file.
    Jsonl,
    /// A file of towerstream events, one JSON per line (what `towerstream gen` writes): item
    /// and user upserts become the catalogue and profiles, clicks the interactions.
    Events,
}

/// One user-item interaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    /// The user.
    pub user_id: Id,
    /// The item.
    pub item_id: Id,
    /// Event time (ms since the epoch).
    pub time_ms: i64,
}

/// A catalogue, profiles and interactions.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Name (directory or file stem).
    pub name: String,
    /// Items (upserts).
    pub items: Vec<ItemEvent>,
    /// User profiles (upserts).
    pub users: Vec<UserEvent>,
    /// Interactions, sorted by time (stable: ties keep file order).
    pub interactions: Vec<Interaction>,
}

impl Dataset {
    /// Reads the dataset at `path` in `format`.
    pub fn load(path: &Path, format: Format) -> Result<Dataset, DataError> {
        let format = match format {
            Format::Auto => detect(path)?,
            f => f,
        };
        let mut d = match format {
            Format::Ml100k => movielens::load_100k(path)?,
            Format::Ml1m => movielens::load_1m(path)?,
            Format::Csv => generic::load(path, generic::Kind::Csv)?,
            Format::Jsonl => generic::load(path, generic::Kind::Jsonl)?,
            Format::Events => events_file(path)?,
            Format::Auto => unreachable!("resolved above"),
        };
        d.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        d.interactions.sort_by_key(|i| i.time_ms);
        // Items only seen in interactions still belong to the catalogue (without features).
        let known: std::collections::HashSet<Id> =
            d.items.iter().map(|i| i.item_id.clone()).collect();
        let mut missing: Vec<Id> = d
            .interactions
            .iter()
            .map(|i| i.item_id.clone())
            .filter(|id| !known.contains(id))
            .collect();
        missing.sort();
        missing.dedup();
        for id in missing {
            d.items.push(ItemEvent {
                event_id: format!("item-{id}"),
                event_time_ms: 0,
                item_id: id,
                op: crate::event::Op::Upsert,
                title: None,
                category: None,
                genres: Vec::new(),
                dense: crate::event::Dense::new(),
            });
        }
        Ok(d)
    }

    /// The catalogue and profiles as a [`Catalog`].
    pub fn catalog(&self) -> Catalog {
        let mut c = Catalog::default();
        for i in &self.items {
            c.apply_item(i);
        }
        for u in &self.users {
            c.apply_user(u);
        }
        c
    }

    /// Everything as events: items, then users (stamped just before the first interaction),
    /// then one click per interaction, in time order.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        let start = self.interactions.first().map_or(0, |i| i.time_ms - 1);
        let items = self.items.iter().map(move |i| {
            Event::Item(ItemEvent {
                event_time_ms: start,
                ..i.clone()
            })
        });
        let users = self.users.iter().map(move |u| {
            Event::User(UserEvent {
                event_time_ms: start,
                ..u.clone()
            })
        });
        let clicks = self.interactions.iter().enumerate().map(|(n, i)| {
            Event::Click(Click {
                event_id: format!("{}-{n}", self.name),
                event_time_ms: i.time_ms,
                user_id: i.user_id.clone(),
                item_id: i.item_id.clone(),
                impression_id: None,
                dwell_ms: None,
            })
        });
        items.chain(users).chain(clicks)
    }
}

fn detect(path: &Path) -> Result<Format, DataError> {
    let has = |f: &str| path.join(f).is_file();
    if path.is_dir() {
        if has("u.data") || has("ml-100k.inter") {
            return Ok(Format::Ml100k);
        }
        if has("ratings.dat") {
            return Ok(Format::Ml1m);
        }
        if has("interactions.csv") {
            return Ok(Format::Csv);
        }
        if has("interactions.jsonl") {
            return Ok(Format::Jsonl);
        }
    } else if path.is_file() {
        match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => return Ok(Format::Csv),
            Some("jsonl") | Some("json") => {
                // An events file has a `type` on every line.
                let first = read(path)?.lines().next().unwrap_or("").to_owned();
                let typed = serde_json::from_str::<serde_json::Value>(&first)
                    .is_ok_and(|v| v.get("type").is_some());
                return Ok(if typed { Format::Events } else { Format::Jsonl });
            }
            _ => {}
        }
    }
    Err(DataError::Unrecognised(path.to_owned()))
}

/// Reads a towerstream events file: items and users as upserted (deletes drop them), clicks
/// as interactions; impressions are not interactions.
fn events_file(path: &Path) -> Result<Dataset, DataError> {
    let mut d = Dataset::default();
    let mut items: Vec<ItemEvent> = Vec::new();
    let mut users: Vec<UserEvent> = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e = crate::event::parse_event(line.as_bytes(), usize::MAX)
            .map_err(|e| malformed(path, i + 1, e.to_string()))?;
        match e {
            Event::Item(x) => items.push(x),
            Event::User(x) => users.push(x),
            Event::Click(c) => d.interactions.push(Interaction {
                user_id: c.user_id,
                item_id: c.item_id,
                time_ms: c.event_time_ms,
            }),
            Event::Impression(_) => {}
        }
    }
    d.items = latest_upserts(items, |x| (&x.item_id, x.op));
    d.users = latest_upserts(users, |x| (&x.user_id, x.op));
    Ok(d)
}

/// The last event of each id if it is an upsert (a later delete removes the id), by id.
fn latest_upserts<T>(events: Vec<T>, key: impl Fn(&T) -> (&Id, crate::event::Op)) -> Vec<T> {
    let mut latest: std::collections::BTreeMap<Id, T> = std::collections::BTreeMap::new();
    for e in events {
        let (id, op) = key(&e);
        let id = id.clone();
        if op == crate::event::Op::Upsert {
            latest.insert(id, e);
        } else {
            latest.remove(&id);
        }
    }
    latest.into_values().collect()
}

pub(crate) fn read(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    // MovieLens files are Latin-1 (titles); ids and features are ASCII either way.
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    })
}

pub(crate) fn malformed(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Malformed {
        path: path.to_owned(),
        line,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recbole_and_grouplens_layouts_of_ml_100k_read_the_same() {
        let grouplens = tempfile::tempdir().unwrap();
        let g = grouplens.path();
        std::fs::write(
            g.join("u.data"),
            "1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250000\n",
        )
        .unwrap();
        std::fs::write(
            g.join("u.user"),
            "1|24|M|technician|85711\n2|53|F|other|94043\n",
        )
        .unwrap();
        let flags = |on: &[usize]| {
            (0..19)
                .map(|i| if on.contains(&i) { "1" } else { "0" })
                .collect::<Vec<_>>()
                .join("|")
        };
        std::fs::write(
            g.join("u.item"),
            format!(
                "10|Toy Story (1995)|01-Jan-1995||http://x|{}\n20|GoldenEye (1995)|01-Jan-1995||http://y|{}\n",
                flags(&[3, 4, 5]),
                flags(&[1, 2, 16])
            ),
        )
        .unwrap();
        let recbole = tempfile::tempdir().unwrap();
        let r = recbole.path();
        std::fs::write(r.join("ml-100k.inter"), "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250000\n").unwrap();
        std::fs::write(r.join("ml-100k.user"), "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n").unwrap();
        std::fs::write(r.join("ml-100k.item"), "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tToy Story\t1995\tAnimation Children's Comedy\n20\tGoldenEye\t1995\tAction Adventure Thriller\n").unwrap();

        let a = Dataset::load(g, Format::Auto).unwrap();
        let b = Dataset::load(r, Format::Auto).unwrap();
        assert_eq!(a.interactions, b.interactions);
        assert_eq!(a.interactions[0].item_id.as_str(), "20", "sorted by time");
        assert_eq!(a.interactions[0].time_ms, 881_250_000_000);
        for (x, y) in a.items.iter().zip(&b.items) {
            assert_eq!((&x.item_id, &x.genres), (&y.item_id, &y.genres));
        }
        assert_eq!(a.items[0].genres, vec!["Animation", "Children's", "Comedy"]);
        for (x, y) in a.users.iter().zip(&b.users) {
            assert_eq!(
                (&x.user_id, &x.gender, x.age, &x.occupation, &x.zip),
                (&y.user_id, &y.gender, y.age, &y.occupation, &y.zip)
            );
        }
        let events: Vec<Event> = a.events().collect();
        assert_eq!(events.len(), 2 + 2 + 3);
        assert!(matches!(events[4], Event::Click(_)));
    }

    #[test]
    fn a_generated_events_file_reads_as_a_dataset() {
        use crate::synth::stream::{Stream, StreamConfig};
        use crate::synth::WorldConfig;
        let (events, counts) = Stream::new(StreamConfig {
            world: WorldConfig {
                users: 30,
                items: 40,
                ..WorldConfig::default()
            },
            requests: 500,
            ..StreamConfig::default()
        })
        .events();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("events.jsonl");
        let text: Vec<String> = events
            .iter()
            .map(|e| String::from_utf8(e.to_json()).unwrap())
            .collect();
        std::fs::write(&f, text.join("\n")).unwrap();
        let d = Dataset::load(&f, Format::Auto).unwrap();
        assert_eq!(d.interactions.len(), counts.clicks);
        assert_eq!((d.items.len(), d.users.len()), (40, 30));
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("u.data"), "1\t10\t5\t881250949\n1\tx\n").unwrap();
        let e = Dataset::load(dir.path(), Format::Ml100k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("u.data:2"), "{e}");
    }
}
