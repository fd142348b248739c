//! Evaluation: the article's offline leave-last-out protocol with the prequential
//! (test-then-train) curve of the streaming pass, and the report (JSON, CSV exports, SVG plot).
//!
//! * [`metrics`]: Hit/Recall/Precision/NDCG@K and MRR for one target per user.
//! * [`offline`]: split, train in time order, rank every item (exact and through HNSW).
//! * [`prequential`]: the same idea online — served top-K checked before each sampled click
//!   is trained on, as a rolling metric.
//! * [`stream`]: an events file (impressions and clicks) through the service's own pipeline
//!   and join, trained test-then-train, scored against the generator's truth when known.
//! * [`ablation`]: several configurations × several datasets in one table (`towerstream
//!   eval --vary ...`), with standard errors, as JSON and as a plot.
//! * [`report`]: the JSON report, a summary table, the plot, and CSV exports of the split and
//!   the vectors (for scoring other libraries with the same code).

pub mod ablation;
pub mod metrics;
pub mod offline;
pub mod prequential;
pub mod report;
pub mod stream;
