//! Cost of `Histories::push` with the user cap reached (the default 1M users): every click of
//! a user not yet held evicts the least recently active one, under the write lock serving's
//! readers wait on.
//!
//! `cargo bench --bench history [-- --users N]`. Under `cargo test` (no `--bench` argument) it
//! runs a tiny smoke pass.

use std::time::Instant;

use towerstream::event::Id;
use towerstream::features::history::Histories;

/// Fills `users` histories (cap `users`), then times `pushes` clicks of new users (each one
/// evicts) and of held users (no eviction). Returns ns per push for both.
fn measure(users: usize, pushes: usize) -> (f64, f64) {
    let mut h = Histories::new(50, users);
    let item = Id::new("item");
    for u in 0..users {
        h.push(&Id::new(format!("u{u}")), &item, 0);
    }
    let fresh: Vec<Id> = (0..pushes).map(|i| Id::new(format!("new{i}"))).collect();
    let started = Instant::now();
    for u in &fresh {
        h.push(u, &item, 0);
    }
    let evicting = started.elapsed().as_nanos() as f64 / pushes as f64;
    assert_eq!(h.users(), users);
    let held: Vec<Id> = (0..pushes)
        .map(|i| fresh[i % fresh.len()].clone())
        .collect();
    let started = Instant::now();
    for u in &held {
        h.push(u, &item, 0);
    }
    let hit = started.elapsed().as_nanos() as f64 / pushes as f64;
    (evicting, hit)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let users = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 1_000 });
    let pushes = if benching { 2_000 } else { 100 };
    let (evicting, hit) = measure(users, pushes);
    println!("{:<50} {:>10} {:>12}", "benchmark", "users", "ns/push");
    println!(
        "{:<50} {users:>10} {evicting:>12.0}",
        "history push, new user at the cap (evicts one)"
    );
    println!(
        "{:<50} {users:>10} {hit:>12.0}",
        "history push, user already held"
    );
}
