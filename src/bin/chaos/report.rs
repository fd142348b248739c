//! What a scenario found, as a table for people and JSON for tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::audit::Tally;
use crate::book::Produced;
use crate::probe::Lag;
use crate::procs::Exit;

/// One scenario-specific expectation and what happened.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is expected.
    pub name: String,
    /// Met?
    pub pass: bool,
    /// The numbers.
    pub detail: String,
}

/// The report of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `--quick` variant.
    pub quick: bool,
    /// Met every goal.
    pub pass: bool,
    /// Failed goals, in words.
    pub failures: Vec<String>,
    /// Records delivered.
    pub produced: Produced,
    /// Records the producer gave up on.
    pub produce_failures: u64,
    /// The accounting.
    pub tally: Tally,
    /// Largest lags.
    pub lag: Lag,
    /// From the fault (or the end of the stream) until everything was accounted; `None` when
    /// the timeout came first.
    pub recover_seconds: Option<f64>,
    /// `panicked` in the children's logs.
    pub panics: u64,
    /// How each child ended.
    pub exits: Vec<Exit>,
    /// Scenario-specific expectations.
    pub checks: Vec<Check>,
    /// Observations (numbers that are not goals).
    pub notes: Vec<String>,
    /// Wall time of the scenario.
    pub seconds: f64,
    /// Where the logs are.
    pub dir: String,
    /// Trained more than once is expected to be 0 (not so after `kill -9` without exact resume).
    #[serde(skip)]
    pub twice_is_failure: bool,
}

impl Report {
    /// The report of a scenario the harness could not carry out.
    pub fn error(scenario: &str, quick: bool, dir: String, error: &anyhow::Error) -> Report {
        Report {
            scenario: scenario.to_owned(),
            quick,
            pass: false,
            failures: vec![format!("harness error: {error:#}")],
            produced: Produced::default(),
            produce_failures: 0,
            tally: Tally::default(),
            lag: Lag::default(),
            recover_seconds: None,
            panics: 0,
            exits: Vec::new(),
            checks: Vec::new(),
            notes: vec![format!("harness error: {error:#}")],
            seconds: 0.0,
            dir,
            twice_is_failure: true,
        }
    }

    /// Decides `pass` from the goals: nothing lost, no panic, no click twice (where that is a
    /// goal), children ending as expected, every check met.
    pub fn judge(&mut self) {
        let t = &self.tally;
        let mut f = Vec::new();
        if t.lost() > 0 {
            f.push(format!(
                "{} lost ({} clicks, {} malformed records)",
                t.lost(),
                t.clicks_lost,
                t.malformed_lost
            ));
        }
        if self.panics > 0 {
            f.push(format!("{} panics", self.panics));
        }
        if self.twice_is_failure && t.trained_more > 0 {
            f.push(format!("{} clicks trained more than once", t.trained_more));
        }
        if self.recover_seconds.is_none() {
            f.push("not recovered before the timeout".into());
        }
        if self.produce_failures > 0 {
            f.push(format!("{} records not produced", self.produce_failures));
        }
        for e in &self.exits {
            if !e.as_expected() {
                f.push(format!(
                    "{} ended with {} after {}",
                    e.name,
                    e.short(),
                    e.stopped_by
                ));
            }
        }
        for c in &self.checks {
            if !c.pass {
                f.push(format!("{}: {}", c.name, c.detail));
            }
        }
        self.pass = f.is_empty();
        self.failures = f;
    }

    /// The table of one scenario.
    pub fn table(&self, allowed: bool) -> String {
        let t = &self.tally;
        let p = &self.produced;
        let verdict = match (self.pass, allowed) {
            (true, _) => "PASS",
            (false, true) => "FAIL (allowed)",
            (false, false) => "FAIL",
        };
        let mut s = String::new();
        let quick = if self.quick { " (quick)" } else { "" };
        let _ = writeln!(
            s,
            "== {}{quick}: {verdict} in {:.0} s ==",
            self.scenario, self.seconds
        );
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<22} {v}");
        };
        row(
            &mut s,
            "produced",
            format!(
                "{} clicks, {} duplicates, {} impressions, {} other",
                p.clicks, p.duplicates, p.impressions, p.other
            ),
        );
        row(&mut s, "trained once", t.trained_once.to_string());
        let more = if t.trained_more > 0 {
            format!("{} (up to {}x)", t.trained_more, t.max_times)
        } else {
            "0".into()
        };
        row(&mut s, "trained more than once", more);
        row(&mut s, "dead-lettered", reasons(&t.dead_lettered()));
        row(
            &mut s,
            "dropped as duplicate",
            t.dropped_duplicates.to_string(),
        );
        row(
            &mut s,
            "lost",
            format!(
                "{} ({} clicks, {} malformed)",
                t.lost(),
                t.clicks_lost,
                t.malformed_lost
            ),
        );
        row(
            &mut s,
            "largest consumer lag",
            format!(
                "{} (gauge), {} (committed offsets), {} clicks (backlog)",
                self.lag.gauge, self.lag.committed, self.lag.backlog
            ),
        );
        if self.lag.gauge_zero_while_behind > 0 {
            let _ = writeln!(
                s,
                "  {:<22} read 0 in {} samples while the committed lag was over 100",
                "lag gauge", self.lag.gauge_zero_while_behind
            );
        }
        row(
            &mut s,
            "time to recover",
            self.recover_seconds
                .map_or("timeout".into(), |s| format!("{s:.1} s")),
        );
        row(&mut s, "panics", self.panics.to_string());
        row(
            &mut s,
            "exit codes",
            self.exits
                .iter()
                .map(|e| format!("{} {}", e.name, e.short()))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for c in &self.checks {
            let mark = if c.pass { "ok" } else { "FAILED" };
            let _ = writeln!(s, "  check: {} — {mark}: {}", c.name, c.detail);
        }
        for (tag, outcomes) in &t.tagged {
            let _ = writeln!(s, "  {tag}: {}", reasons(outcomes));
        }
        for (reason, detail) in &t.reason_details {
            let _ = writeln!(s, "  reason {reason}, e.g.: {detail}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        if !t.lost_examples.is_empty() {
            let _ = writeln!(s, "  lost, e.g.: {}", t.lost_examples.join(", "));
        }
        let _ = writeln!(s, "  logs: {}", self.dir);
        s
    }
}

fn reasons(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    let total: u64 = m.values().sum();
    let parts: Vec<String> = m.iter().map(|(r, n)| format!("{r} {n}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// One row per scenario, as a Markdown table (the README's).
pub fn summary(reports: &[Report], allowed: &[String]) -> String {
    let mut s = String::from(
        "| scenario | result | clicks | dup sent | impr. | other | trained once | >1 | dead-lettered | dup dropped | lost | max lag: gauge / committed / click backlog | recover | panics | exit codes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let t = &r.tally;
        let result = match (r.pass, allowed.contains(&r.scenario)) {
            (true, _) => "pass",
            (false, true) => "FAIL (allowed)",
            (false, false) => "FAIL",
        };
        let exits: Vec<String> = r
            .exits
            .iter()
            .map(|e| {
                let role = e.name.split('#').next().unwrap_or_default();
                format!("{role} {}", e.short())
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {result} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} |",
            r.scenario,
            r.produced.clicks,
            r.produced.duplicates,
            r.produced.impressions,
            r.produced.other,
            t.trained_once,
            t.trained_more,
            t.dead_lettered().values().sum::<u64>(),
            t.dropped_duplicates,
            t.lost(),
            r.lag.gauge,
            r.lag.committed,
            r.lag.backlog,
            r.recover_seconds
                .map_or("timeout".into(), |s| format!("{s:.1} s")),
            r.panics,
            compress(&exits),
        );
    }
    s
}

/// `SIGKILL ×5, 0` instead of five repetitions.
fn compress(items: &[String]) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for i in items {
        match out.last_mut() {
            Some((last, n)) if last == i => *n += 1,
            _ => out.push((i.clone(), 1)),
        }
    }
    out.iter()
        .map(|(i, n)| {
            if *n > 1 {
                format!("{i} ×{n}")
            } else {
                i.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
