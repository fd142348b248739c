//! Evaluation output: the JSON report, a text summary, an SVG plot of the prequential curve and
//! the loss, and CSV exports of the split and the vectors.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::offline::{item_entries, to_vec, Outcome, Report};
use crate::data::Dataset;
use crate::train::trainer::UserEntry;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The plot could not be drawn.
    #[error("cannot draw {path}: {reason}")]
    Plot {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A human-readable summary: sizes, throughput, and metrics per K.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {} users, {} items, {} training interactions, {} test users",
        r.dataset, r.users, r.items, r.train_interactions, r.test_users
    );
    let _ = writeln!(
        s,
        "training: {} epoch(s), batch {}, {} examples in {:.2} s = {:.0} examples/s",
        r.epochs, r.batch_size, r.examples, r.train_seconds, r.examples_per_second
    );
    let _ = writeln!(
        s,
        "prequential Recall@{} over the first pass: {:.4}",
        r.prequential_k, r.prequential_recall
    );
    let mut ks: Vec<usize> = r
        .exact
        .keys()
        .filter_map(|k| k.strip_prefix("recall@")?.parse().ok())
        .collect();
    ks.sort_unstable();
    let _ = writeln!(
        s,
        "{:<8} {:>6} {:>9} {:>9} {:>11} {:>9}",
        "search", "K", "Hit@K", "Recall@K", "Precision@K", "NDCG@K"
    );
    let tables = std::iter::once(("exact", &r.exact))
        .chain(r.ann.iter().map(|t| ("hnsw", t)))
        .chain(std::iter::once(("popular", &r.most_popular)));
    for (name, t) in tables {
        for k in &ks {
            let g = |m: &str| t.get(&format!("{m}@{k}")).copied().unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "{:<8} {:>6} {:>9.4} {:>9.4} {:>11.5} {:>9.4}",
                name,
                k,
                g("hit"),
                g("recall"),
                g("precision"),
                g("ndcg")
            );
        }
        let _ = writeln!(
            s,
            "{:<8} {:>6} MRR {:.4}",
            name,
            "",
            t.get("mrr").copied().unwrap_or(f64::NAN)
        );
    }
    s
}

/// Writes the report as pretty JSON.
pub fn write_json(r: &Report, path: &Path) -> Result<(), ReportError> {
    let json = serde_json::to_string_pretty(r).unwrap_or_default();
    std::fs::write(path, json).map_err(io(path))
}

/// Rolling mean of the prequential recall over `window` clicks-worth of points.
fn rolling(r: &Report, window: usize) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> = r
        .prequential
        .iter()
        .filter(|p| p.recall.is_finite())
        .map(|p| (p.examples as f64, p.recall))
        .collect();
    let w = window.max(1);
    (0..pts.len())
        .map(|i| {
            let from = i.saturating_sub(w - 1);
            let slice = &pts[from..=i];
            (
                pts[i].0,
                slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64,
            )
        })
        .collect()
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// One line chart over training examples.
fn line_chart(
    area: &Area<'_>,
    caption: &str,
    points: Vec<(f64, f64)>,
    x_max: f64,
    y: std::ops::Range<f64>,
    color: &RGBColor,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("training examples")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points, color))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Plots the prequential Recall@K (rolling mean) and the loss over the first pass as SVG.
pub fn plot_svg(r: &Report, path: &Path) -> Result<(), ReportError> {
    let fail = |reason: String| ReportError::Plot {
        path: path.to_owned(),
        reason,
    };
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let (top, bottom) = root.split_vertically(300);
    let max_x = r
        .prequential
        .last()
        .map_or(1.0, |p| p.examples as f64)
        .max(1.0);
    let window = (r.prequential.len() / 20).max(1);
    let recall = rolling(r, window);
    let max_y = recall.iter().map(|p| p.1).fold(0.0f64, f64::max).max(0.01) * 1.1;
    let caption = format!(
        "{}: prequential Recall@{} (rolling over {} batches)",
        r.dataset, r.prequential_k, window
    );
    line_chart(&top, &caption, recall, max_x, 0.0..max_y, &BLUE).map_err(fail)?;
    let losses: Vec<(f64, f64)> = r
        .prequential
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| (p.examples as f64, p.loss))
        .collect();
    let (lo, hi) = losses.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if lo <= hi {
        (lo * 0.95, hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };
    line_chart(
        &bottom,
        "training loss per step",
        losses,
        max_x,
        lo..hi,
        &RED,
    )
    .map_err(fail)?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Writes one CSV file (header, then rows), quoting through the `csv` crate.
fn write_csv(
    path: &Path,
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> Result<(), ReportError> {
    let fail = |e: csv::Error| ReportError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let mut w = csv::Writer::from_path(path).map_err(fail)?;
    w.write_record(header).map_err(fail)?;
    for row in rows {
        w.write_record(&row).map_err(fail)?;
    }
    w.flush().map_err(io(path))
}

fn write_vectors(
    path: &Path,
    id_column: &str,
    ids: &[String],
    t: &tch::Tensor,
) -> Result<(), ReportError> {
    let dim = t.size().get(1).copied().unwrap_or(0) as usize;
    let flat = to_vec(t);
    let header: Vec<String> = std::iter::once(id_column.to_owned())
        .chain((0..dim).map(|i| format!("v{i}")))
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rows = ids
        .iter()
        .zip(flat.chunks_exact(dim.max(1)))
        .map(|(id, row)| {
            std::iter::once(id.clone())
                .chain(row.iter().map(|x| x.to_string()))
                .collect()
        });
    write_csv(path, &header, rows)
}

/// Writes the split and the model's vectors as CSV into `dir` (`users.csv`, `items.csv`,
/// `train.csv`, `test.csv`, `user_vectors.csv` for the test users, `item_vectors.csv`) and
/// the report as `summary.json`, so another library can train on the same split and every
/// model can be scored by the same code.
pub fn export(dir: &Path, dataset: &Dataset, o: &Outcome) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    write_csv(
        &dir.join("users.csv"),
        &["user_id", "gender", "age", "occupation", "zip"],
        dataset.users.iter().map(|u| {
            vec![
                u.user_id.to_string(),
                text(&u.gender),
                u.age.map(|a| a.to_string()).unwrap_or_default(),
                text(&u.occupation),
                text(&u.zip),
            ]
        }),
    )?;
    write_csv(
        &dir.join("items.csv"),
        &["item_id", "genres"],
        dataset
            .items
            .iter()
            .map(|i| vec![i.item_id.to_string(), i.genres.join("|")]),
    )?;
    for (name, rows) in [("train.csv", &o.split.train), ("test.csv", &o.split.test)] {
        write_csv(
            &dir.join(name),
            &["user_id", "item_id", "timestamp"],
            rows.iter().map(|x| {
                vec![
                    x.user_id.to_string(),
                    x.item_id.to_string(),
                    (x.time_ms / 1000).to_string(),
                ]
            }),
        )?;
    }
    let users: Vec<UserEntry> = o
        .split
        .test
        .iter()
        .map(|x| (x.user_id.clone(), o.catalog.user(&x.user_id)))
        .collect();
    let ids: Vec<String> = users.iter().map(|(id, _)| id.to_string()).collect();
    write_vectors(
        &dir.join("user_vectors.csv"),
        "user_id",
        &ids,
        &o.trainer.user_vectors(&users),
    )?;
    let items = item_entries(&o.catalog);
    let ids: Vec<String> = items.iter().map(|(id, _)| id.to_string()).collect();
    write_vectors(
        &dir.join("item_vectors.csv"),
        "item_id",
        &ids,
        &o.trainer.item_vectors(&items),
    )?;
    write_json(&o.report, &dir.join("summary.json"))
}
