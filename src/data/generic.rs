//! The generic format: interactions (`user_id`, `item_id`, and `timestamp` in seconds or
//! `time_ms`) with optional user (`user_id`, `gender`, `age`, `occupation`, `zip`) and item
//! (`item_id`, `title`, `category`, `genres` — `|`-joined or, in JSONL, a list) files, as CSV
//! with a header or as JSON lines.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{malformed, read, DataError, Dataset, Interaction};
use crate::event::{Dense, Id, ItemEvent, Op, UserEvent};

/// CSV or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Csv,
    Jsonl,
}

#[derive(Deserialize)]
struct InteractionRow {
    user_id: String,
    item_id: String,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    time_ms: Option<i64>,
}

#[derive(Deserialize)]
struct UserRow {
    user_id: String,
    #[serde(default)]
    gender: Option<String>,
    #[serde(default)]
    age: Option<u8>,
    #[serde(default)]
    occupation: Option<String>,
    #[serde(default)]
    zip: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Genres {
    List(Vec<String>),
    Joined(String),
}

#[derive(Deserialize)]
struct ItemRow {
    item_id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    genres: Option<Genres>,
}

fn rows<T: DeserializeOwned>(path: &Path, kind: Kind) -> Result<Vec<T>, DataError> {
    let text = read(path)?;
    match kind {
        Kind::Jsonl => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| malformed(path, i + 1, e.to_string()))
            })
            .collect(),
        Kind::Csv => {
            let mut r = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            r.deserialize()
                .enumerate()
                .map(|(i, row)| {
                    // +2: 1-based, after the header.
                    row.map_err(|e| malformed(path, i + 2, e.to_string()))
                })
                .collect()
        }
    }
}

fn file(dir: &Path, stem: &str, kind: Kind) -> PathBuf {
    dir.join(format!(
        "{stem}.{}",
        match kind {
            Kind::Csv => "csv",
            Kind::Jsonl => "jsonl",
        }
    ))
}

/// A directory with `interactions.*` (and optional `users.*`, `items.*`) or one file.
pub(super) fn load(path: &Path, kind: Kind) -> Result<Dataset, DataError> {
    let (interactions, users, items) = if path.is_dir() {
        (
            file(path, "interactions", kind),
            Some(file(path, "users", kind)).filter(|p| p.is_file()),
            Some(file(path, "items", kind)).filter(|p| p.is_file()),
        )
    } else {
        (path.to_owned(), None, None)
    };
    let mut d = Dataset::default();
    for (i, r) in rows::<InteractionRow>(&interactions, kind)?
        .into_iter()
        .enumerate()
    {
        let time_ms = match (r.time_ms, r.timestamp) {
            (Some(ms), _) => ms,
            (None, Some(s)) => (s * 1000.0) as i64,
            (None, None) => {
                return Err(malformed(
                    &interactions,
                    i + 1,
                    "needs timestamp (s) or time_ms",
                ))
            }
        };
        if r.user_id.is_empty() || r.item_id.is_empty() {
            return Err(malformed(&interactions, i + 1, "empty user_id or item_id"));
        }
        d.interactions.push(Interaction {
            user_id: Id::new(r.user_id),
            item_id: Id::new(r.item_id),
            time_ms,
        });
    }
    if let Some(p) = users {
        for r in rows::<UserRow>(&p, kind)? {
            d.users.push(UserEvent {
                event_id: format!("user-{}", r.user_id),
                event_time_ms: 0,
                user_id: Id::new(r.user_id),
                op: Op::Upsert,
                gender: r.gender,
                age: r.age,
                occupation: r.occupation,
                zip: r.zip,
                dense: Dense::new(),
            });
        }
    }
    if let Some(p) = items {
        for r in rows::<ItemRow>(&p, kind)? {
            let genres: Vec<String> = match r.genres {
                Some(Genres::List(v)) => v,
                Some(Genres::Joined(s)) => s
                    .split('|')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            d.items.push(ItemEvent {
                event_id: format!("item-{}", r.item_id),
                event_time_ms: 0,
                item_id: Id::new(r.item_id),
                op: Op::Upsert,
                title: r.title,
                category: r.category.or_else(|| genres.first().cloned()),
                genres,
                dense: Dense::new(),
            });
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::super::{Dataset, Format};

    #[test]
    fn csv_and_jsonl_directories_read_the_same() {
        let csv = tempfile::tempdir().unwrap();
        std::fs::write(
            csv.path().join("interactions.csv"),
            "user_id,item_id,timestamp\nu1,a,20\nu2,b,10\n",
        )
        .unwrap();
        std::fs::write(csv.path().join("items.csv"), "item_id,genres\na,x|y\nb,\n").unwrap();
        std::fs::write(
            csv.path().join("users.csv"),
            "user_id,gender,age\nu1,F,30\n",
        )
        .unwrap();
        let json = tempfile::tempdir().unwrap();
        std::fs::write(
            json.path().join("interactions.jsonl"),
            "{\"user_id\":\"u1\",\"item_id\":\"a\",\"time_ms\":20000}\n{\"user_id\":\"u2\",\"item_id\":\"b\",\"timestamp\":10}\n",
        )
        .unwrap();
        std::fs::write(
            json.path().join("items.jsonl"),
            "{\"item_id\":\"a\",\"genres\":[\"x\",\"y\"]}\n{\"item_id\":\"b\"}\n",
        )
        .unwrap();
        std::fs::write(
            json.path().join("users.jsonl"),
            "{\"user_id\":\"u1\",\"gender\":\"F\",\"age\":30}\n",
        )
        .unwrap();
        let a = Dataset::load(csv.path(), Format::Auto).unwrap();
        let b = Dataset::load(json.path(), Format::Auto).unwrap();
        assert_eq!(a.interactions, b.interactions);
        assert_eq!(a.interactions[0].item_id.as_str(), "b");
        assert_eq!(a.items[0].genres, vec!["x", "y"]);
        assert_eq!(b.items[0].genres, vec!["x", "y"]);
        assert_eq!(a.users[0].age, Some(30));
    }

    #[test]
    fn a_row_without_time_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.csv");
        std::fs::write(&f, "user_id,item_id\nu1,a\n").unwrap();
        let e = Dataset::load(&f, Format::Auto).unwrap_err().to_string();
        assert!(e.contains("x.csv:1") && e.contains("timestamp"), "{e}");
    }
}
