//! Ablations: several configurations × several datasets, one table.
//!
//! A *variant* is a list of configuration overrides (`section.key=value`, as `--set` takes);
//! `--vary key=v1,v2` flags multiply into a grid, and a grid file lists named variants. Each
//! variant runs on each dataset with one streaming pass:
//! * an interactions dataset (MovieLens, CSV, ...) by the leave-last-out protocol of
//!   [`super::offline`] — Recall@10/100, NDCG@100 and MRR over every item, with standard errors
//!   over the test users, next to most-popular — plus its prequential Recall@100;
//! * an events file (impressions and clicks) by [`super::stream`]: prequential Recall@100
//!   through the service's join, next to most-popular and, for a generated stream, the truth.
//!
//! The table is Markdown (for the README), the rows are JSON, and the plot shows each
//! dataset's headline metric per variant with its standard error and the baselines.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::offline::{self, Options};
use super::stream;
use crate::config::Config;
use crate::data::{Dataset, Format};
use crate::synth::stream::StreamConfig;

/// Why an ablation could not run or be written.
#[derive(Debug, thiserror::Error)]
pub enum AblationError {
    /// A `--vary` flag is not `key=v1,v2,...`.
    #[error("--vary {0:?}: expected section.key=value1,value2,... (or value1|value2 when values contain commas)")]
    BadVary(String),
    /// The grid file could not be read or parsed.
    #[error("grid file {path}: {reason}")]
    Grid {
        /// The file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A dataset could not be read.
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// An output could not be written.
    #[error("cannot write {path}: {reason}")]
    Output {
        /// The file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// One configuration of the table: a name and its overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Shown in the table (`defaults`, or the overrides joined).
    pub name: String,
    /// `section.key=value` overrides on top of the base configuration.
    #[serde(default)]
    pub set: Vec<String>,
}

/// The cartesian product of `--vary key=v1,v2` flags (just the defaults without any).
pub fn grid(vary: &[String]) -> Result<Vec<Variant>, AblationError> {
    let mut variants = vec![Variant {
        name: "defaults".into(),
        set: Vec::new(),
    }];
    for flag in vary {
        let (key, values) = flag
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| AblationError::BadVary(flag.clone()))?;
        let sep = if values.contains('|') { '|' } else { ',' };
        let values: Vec<&str> = values.split(sep).map(str::trim).collect();
        variants = variants
            .iter()
            .flat_map(|v| {
                values.iter().map(move |value| {
                    let mut set = v.set.clone();
                    set.push(format!("{key}={value}"));
                    Variant {
                        name: set.join(" "),
                        set,
                    }
                })
            })
            .collect();
    }
    Ok(variants)
}

/// Named variants from a TOML file: `[[variant]]` tables with `name` and `set = ["k=v", ...]`.
pub fn load_grid(path: &Path) -> Result<Vec<Variant>, AblationError> {
    #[derive(Deserialize)]
    struct File {
        variant: Vec<Variant>,
    }
    let fail = |reason: String| AblationError::Grid {
        path: path.to_owned(),
        reason,
    };
    use figment::providers::{Format as _, Toml};
    if !path.is_file() {
        return Err(fail("no such file".into()));
    }
    let file: File = figment::Figment::from(Toml::file(path))
        .extract()
        .map_err(|e| fail(e.to_string()))?;
    Ok(file.variant)
}

/// A dataset of the table.
pub enum Source {
    /// Interactions (leave-last-out).
    Interactions(Dataset),
    /// An events file (prequential through the join), with the generator's truth if known.
    Events {
        /// File name.
        name: String,
        /// Its lines.
        lines: Vec<Vec<u8>>,
        /// The generator's configuration.
        truth: Option<StreamConfig>,
    },
}

impl Source {
    /// Reads `path`: an events file when it is one ([`stream::is_events_file`]), else a dataset.
    pub fn load(path: &Path, format: Format) -> Result<Source, AblationError> {
        let fail = |reason: String| AblationError::Dataset {
            path: path.to_owned(),
            reason,
        };
        if stream::is_events_file(path) {
            let (lines, truth) = stream::load(path).map_err(|e| fail(e.to_string()))?;
            let name = path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            return Ok(Source::Events { name, lines, truth });
        }
        Dataset::load(path, format)
            .map(Source::Interactions)
            .map_err(|e| fail(e.to_string()))
    }

    /// The dataset's name.
    pub fn name(&self) -> &str {
        match self {
            Source::Interactions(d) => &d.name,
            Source::Events { name, .. } => name,
        }
    }
}

/// A metric with its standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// Mean over users (or clicks).
    pub mean: f64,
    /// Standard error of the mean.
    pub se: f64,
}

/// One (dataset, variant) cell of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Dataset name.
    pub dataset: String,
    /// Variant name.
    pub variant: String,
    /// Leave-last-out Recall@10 (interactions datasets).
    pub recall_10: Option<Estimate>,
    /// Leave-last-out Recall@100.
    pub recall_100: Option<Estimate>,
    /// Leave-last-out NDCG@100.
    pub ndcg_100: Option<Estimate>,
    /// Leave-last-out MRR.
    pub mrr: Option<Estimate>,
    /// Most-popular's leave-last-out Recall@100 (the same exclusions).
    pub popular_recall_100: Option<f64>,
    /// Prequential Recall@100 over the streaming pass.
    pub prequential_100: Estimate,
    /// Most-popular's prequential Recall@100 (events files).
    pub popular_prequential_100: Option<f64>,
    /// The truth's prequential Recall@100 (generated streams).
    pub truth_prequential_100: Option<f64>,
    /// The informed observer's prequential Recall@100 (generated streams): everything the
    /// generator knows but where tastes drift, estimated from each user's clicks.
    pub observer_prequential_100: Option<f64>,
    /// Positives per training step (events files).
    pub positives_per_step: Option<f64>,
    /// Training examples per second.
    pub examples_per_second: f64,
    /// Prequential Recall@100 of the model, truth and most-popular over the last quarter of
    /// the clicks (events files): where the pass arrived.
    pub late: Option<stream::LateRecall>,
    /// The learning curve over tenths of the clicks (events files).
    pub curve: Vec<stream::CurvePoint>,
}

impl Row {
    /// The headline metric: leave-last-out Recall@100, else prequential Recall@100.
    pub fn headline(&self) -> Estimate {
        self.recall_100.unwrap_or(self.prequential_100)
    }

    /// The headline metric's most-popular baseline.
    pub fn baseline(&self) -> Option<f64> {
        self.popular_recall_100.or(self.popular_prequential_100)
    }
}

fn estimate(t: &super::metrics::MetricTable, key: &str) -> Option<Estimate> {
    Some(Estimate {
        mean: *t.get(key)?,
        se: t.get(&format!("{key}_se")).copied().unwrap_or(f64::NAN),
    })
}

/// Runs one variant (its configuration built) on one dataset.
pub fn run_one(source: &Source, variant: &Variant, config: &Config) -> Row {
    match source {
        Source::Interactions(d) => {
            let opts = Options {
                ks: vec![10, 100],
                ann: false,
                ..Options::default()
            };
            let r = offline::run(d, config, &opts).report;
            let n = r.test_users.max(1) as f64;
            let p = r.prequential_recall;
            Row {
                dataset: d.name.clone(),
                variant: variant.name.clone(),
                recall_10: estimate(&r.exact, "recall@10"),
                recall_100: estimate(&r.exact, "recall@100"),
                ndcg_100: estimate(&r.exact, "ndcg@100"),
                mrr: estimate(&r.exact, "mrr"),
                popular_recall_100: r.most_popular.get("recall@100").copied(),
                prequential_100: Estimate {
                    mean: p,
                    se: (p * (1.0 - p) / (r.train_interactions as f64).max(n)).sqrt(),
                },
                popular_prequential_100: None,
                truth_prequential_100: None,
                observer_prequential_100: None,
                positives_per_step: None,
                examples_per_second: r.examples_per_second,
                late: None,
                curve: Vec::new(),
            }
        }
        Source::Events { name, lines, truth } => {
            let r = stream::run(lines, truth.clone(), config, 100);
            Row {
                dataset: name.clone(),
                variant: variant.name.clone(),
                recall_10: None,
                recall_100: None,
                ndcg_100: None,
                mrr: None,
                popular_recall_100: None,
                prequential_100: Estimate {
                    mean: r.recall,
                    se: r.recall_se,
                },
                popular_prequential_100: Some(r.popular_recall),
                truth_prequential_100: r.truth_recall,
                observer_prequential_100: r.observer_recall,
                positives_per_step: Some(r.positives_per_step),
                examples_per_second: r.examples_per_second,
                late: Some(r.late),
                curve: r.curve,
            }
        }
    }
}

fn cell(e: Option<Estimate>) -> String {
    e.map_or_else(|| "—".into(), |e| format!("{:.4} ± {:.4}", e.mean, e.se))
}

fn num(x: Option<f64>) -> String {
    x.map_or_else(|| "—".into(), |x| format!("{x:.4}"))
}

/// The table as Markdown, one row per (dataset, variant).
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| dataset | variant | Recall@10 | Recall@100 | NDCG@100 | MRR | most popular R@100 | prequential R@100 | truth preq. R@100 | observer preq. R@100 | popular preq. R@100 | last quarter: model / truth / observer / popular | positives/step | examples/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            r.dataset,
            r.variant,
            cell(r.recall_10),
            cell(r.recall_100),
            cell(r.ndcg_100),
            cell(r.mrr),
            num(r.popular_recall_100),
            cell(Some(r.prequential_100)),
            num(r.truth_prequential_100),
            num(r.observer_prequential_100),
            num(r.popular_prequential_100),
            r.late.map_or_else(
                || "—".into(),
                |l| format!(
                    "{:.4} ± {:.4} / {} / {} / {:.4}",
                    l.recall.model,
                    l.se,
                    num(l.recall.truth),
                    num(l.recall.observer),
                    l.recall.popular
                )
            ),
            r.positives_per_step
                .map_or_else(|| "—".into(), |p| format!("{p:.1}")),
            r.examples_per_second,
        ));
    }
    s
}

/// Plots each dataset's headline metric per variant (bars with ± one standard error), with
/// most-popular (grey) and the truth (green) as lines, one panel per dataset, as SVG.
pub fn plot_svg(rows: &[Row], path: &Path) -> Result<(), AblationError> {
    let fail = |reason: String| AblationError::Output {
        path: path.to_owned(),
        reason,
    };
    let mut datasets: Vec<&str> = Vec::new();
    for r in rows {
        if !datasets.contains(&r.dataset.as_str()) {
            datasets.push(&r.dataset);
        }
    }
    let height = 260 * datasets.len().max(1) as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let panels = root.split_evenly((datasets.len().max(1), 1));
    for (panel, dataset) in panels.iter().zip(&datasets) {
        let of: Vec<&Row> = rows.iter().filter(|r| r.dataset == *dataset).collect();
        draw_panel(panel, dataset, &of).map_err(fail)?;
    }
    root.present().map_err(|e| fail(e.to_string()))
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Panel<'_>, dataset: &str, rows: &[&Row]) -> Result<(), String> {
    let top = rows
        .iter()
        .map(|r| (r.headline().mean + r.headline().se).max(r.truth_prequential_100.unwrap_or(0.0)))
        .fold(0.01f64, f64::max)
        * 1.15;
    let what = if rows.iter().any(|r| r.recall_100.is_some()) {
        "leave-last-out Recall@100"
    } else {
        "prequential Recall@100"
    };
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{dataset}: {what}"), ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(20)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..n, 0.0..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .draw()
        .map_err(|e| e.to_string())?;
    let bars = rows.iter().enumerate().map(|(i, r)| {
        let x = i as f64;
        Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, r.headline().mean)],
            BLUE.mix(0.6).filled(),
        )
    });
    chart.draw_series(bars).map_err(|e| e.to_string())?;
    let whiskers = rows.iter().enumerate().map(|(i, r)| {
        let (x, e) = (i as f64 + 0.5, r.headline());
        PathElement::new(vec![(x, e.mean - e.se), (x, e.mean + e.se)], BLACK)
    });
    chart.draw_series(whiskers).map_err(|e| e.to_string())?;
    let labels = rows.iter().enumerate().map(|(i, r)| {
        Text::new(
            format!("{} ({:.3})", r.variant, r.headline().mean),
            (i as f64 + 0.18, r.headline().mean * 0.5),
            ("sans-serif", 11).into_font(),
        )
    });
    chart.draw_series(labels).map_err(|e| e.to_string())?;
    for (value, color) in [
        (
            rows.first().and_then(|r| r.baseline()),
            RGBColor(120, 120, 120),
        ),
        (rows.first().and_then(|r| r.truth_prequential_100), GREEN),
    ] {
        if let Some(y) = value {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, y), (n, y)],
                    color,
                )))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Writes the rows as JSON.
pub fn write_json(rows: &[Row], path: &Path) -> Result<(), AblationError> {
    let fail = |reason: String| AblationError::Output {
        path: path.to_owned(),
        reason,
    };
    let text = serde_json::to_vec_pretty(rows).map_err(|e| fail(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_flags_multiply_into_a_grid() {
        let g = grid(&[
            "train.batch_size=128,1024".into(),
            "model.tower_dims=[64,32]|[32]".into(),
        ])
        .unwrap();
        let names: Vec<&str> = g.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "train.batch_size=128 model.tower_dims=[64,32]",
                "train.batch_size=128 model.tower_dims=[32]",
                "train.batch_size=1024 model.tower_dims=[64,32]",
                "train.batch_size=1024 model.tower_dims=[32]",
            ]
        );
        assert_eq!(grid(&[]).unwrap()[0].name, "defaults");
        assert!(matches!(
            grid(&["nokey".into()]),
            Err(AblationError::BadVary(_))
        ));
    }

    #[test]
    fn the_example_grid_file_loads_and_every_variant_is_a_valid_configuration() {
        let variants = load_grid(Path::new("examples/grids/modes.toml")).unwrap();
        assert_eq!(variants.len(), 4);
        assert_eq!(variants[0].name, "in-batch (defaults)");
        for v in &variants {
            Config::load_with(None, &v.set).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        }
        let missing = load_grid(Path::new("examples/grids/none.toml"));
        assert!(matches!(missing, Err(AblationError::Grid { .. })));
    }
}
