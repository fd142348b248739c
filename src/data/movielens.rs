//! MovieLens readers: 100K (GroupLens `u.*` or RecBole atomic `ml-100k.*`) and 1M (`*.dat`).

use std::path::Path;

use super::{malformed, read, DataError, Dataset, Interaction};
use crate::event::{Dense, Id, ItemEvent, Op, UserEvent};

/// ML-100K genre flags, in `u.genre` order.
const GENRES_100K: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

fn item(id: &str, title: Option<String>, genres: Vec<String>) -> ItemEvent {
    ItemEvent {
        event_id: format!("item-{id}"),
        event_time_ms: 0,
        item_id: Id::new(id),
        op: Op::Upsert,
        title,
        category: genres.first().cloned(),
        genres,
        dense: Dense::new(),
    }
}

fn user(id: &str, gender: &str, age: &str, occupation: &str, zip: &str) -> UserEvent {
    UserEvent {
        event_id: format!("user-{id}"),
        event_time_ms: 0,
        user_id: Id::new(id),
        op: Op::Upsert,
        gender: Some(gender.to_owned()).filter(|s| !s.is_empty()),
        age: age.parse().ok(),
        occupation: Some(occupation.to_owned()).filter(|s| !s.is_empty()),
        zip: Some(zip.to_owned()).filter(|s| !s.is_empty()),
        dense: Dense::new(),
    }
}

/// Lines with their 1-based numbers, skipping blanks (and the header when `header`).
fn lines(text: &str, header: bool) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .skip(usize::from(header))
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn interaction(path: &Path, n: usize, f: &[&str]) -> Result<Interaction, DataError> {
    if f.len() < 4 {
        return Err(malformed(
            path,
            n,
            format!("expected 4 fields, found {}", f.len()),
        ));
    }
    let secs: f64 = f[3]
        .trim()
        .parse()
        .map_err(|_| malformed(path, n, format!("timestamp {:?} is not a number", f[3])))?;
    if f[0].trim().is_empty() || f[1].trim().is_empty() {
        return Err(malformed(path, n, "empty user or item id"));
    }
    if f[1].trim().parse::<u64>().is_err() || f[0].trim().parse::<u64>().is_err() {
        return Err(malformed(path, n, "MovieLens ids are integers"));
    }
    Ok(Interaction {
        user_id: Id::new(f[0].trim()),
        item_id: Id::new(f[1].trim()),
        time_ms: (secs * 1000.0) as i64,
    })
}

/// MovieLens-100K in either layout.
pub(super) fn load_100k(dir: &Path) -> Result<Dataset, DataError> {
    if dir.join("u.data").is_file() {
        grouplens_100k(dir)
    } else {
        recbole_100k(dir)
    }
}

fn grouplens_100k(dir: &Path) -> Result<Dataset, DataError> {
    let mut d = Dataset::default();
    let p = dir.join("u.data");
    for (n, l) in lines(&read(&p)?, false) {
        d.interactions
            .push(interaction(&p, n, &l.split('\t').collect::<Vec<_>>())?);
    }
    let p = dir.join("u.user");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, false) {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() < 5 {
                return Err(malformed(&p, n, "expected id|age|gender|occupation|zip"));
            }
            d.users.push(user(f[0], f[2], f[1], f[3], f[4]));
        }
    }
    let p = dir.join("u.item");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, false) {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() < 5 + GENRES_100K.len() {
                return Err(malformed(
                    &p,
                    n,
                    "expected id|title|date|video date|url|19 genre flags",
                ));
            }
            let flags = &f[f.len() - GENRES_100K.len()..];
            let genres = GENRES_100K
                .iter()
                .zip(flags)
                .filter(|(_, on)| on.trim() == "1")
                .map(|(g, _)| (*g).to_owned())
                .collect();
            d.items.push(item(f[0], Some(f[1].to_owned()), genres));
        }
    }
    Ok(d)
}

fn recbole_100k(dir: &Path) -> Result<Dataset, DataError> {
    let mut d = Dataset::default();
    let p = dir.join("ml-100k.inter");
    for (n, l) in lines(&read(&p)?, true) {
        d.interactions
            .push(interaction(&p, n, &l.split('\t').collect::<Vec<_>>())?);
    }
    let p = dir.join("ml-100k.user");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, true) {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 5 {
                return Err(malformed(
                    &p,
                    n,
                    "expected user_id age gender occupation zip_code",
                ));
            }
            d.users.push(user(f[0], f[2], f[1], f[3], f[4]));
        }
    }
    let p = dir.join("ml-100k.item");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, true) {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 4 {
                return Err(malformed(
                    &p,
                    n,
                    "expected item_id movie_title release_year class",
                ));
            }
            let genres = f[3].split_whitespace().map(str::to_owned).collect();
            d.items.push(item(f[0], Some(f[1].to_owned()), genres));
        }
    }
    Ok(d)
}

/// MovieLens-1M (`::`-separated).
pub(super) fn load_1m(dir: &Path) -> Result<Dataset, DataError> {
    let mut d = Dataset::default();
    let p = dir.join("ratings.dat");
    for (n, l) in lines(&read(&p)?, false) {
        d.interactions
            .push(interaction(&p, n, &l.split("::").collect::<Vec<_>>())?);
    }
    let p = dir.join("users.dat");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, false) {
            let f: Vec<&str> = l.split("::").collect();
            if f.len() < 5 {
                return Err(malformed(
                    &p,
                    n,
                    "expected UserID::Gender::Age::Occupation::Zip",
                ));
            }
            d.users.push(user(f[0], f[1], f[2], f[3], f[4]));
        }
    }
    let p = dir.join("movies.dat");
    if p.is_file() {
        for (n, l) in lines(&read(&p)?, false) {
            let f: Vec<&str> = l.split("::").collect();
            if f.len() < 3 {
                return Err(malformed(&p, n, "expected MovieID::Title::Genres"));
            }
            let genres = f[2]
                .split('|')
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect();
            d.items.push(item(f[0], Some(f[1].to_owned()), genres));
        }
    }
    Ok(d)
}
