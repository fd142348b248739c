//! Online evaluation while streaming (test-then-train): before a sampled click is trained on,
//! ask the served generation for the user's top-K exactly as the API would, and count whether
//! the clicked item is in it. The rolling share is the `towerstream_prequential_recall` gauge.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::EvalConfig;
use crate::example::TrainingExample;
use crate::metrics::ServeMetrics;
use crate::refresh::Served;
use crate::serve::{recall, Context, RecallRequest};

/// The rolling prequential Recall@K of the served model.
pub struct Prequential {
    config: EvalConfig,
    served: Arc<Served>,
    ctx: Context,
    window: VecDeque<bool>,
    hits_in_window: usize,
    seen: u64,
    metrics: Option<ServeMetrics>,
}

impl Prequential {
    /// Checks clicks against `served`, resolving users through `ctx` (live histories).
    pub fn new(
        config: EvalConfig,
        served: Arc<Served>,
        ctx: Context,
        metrics: Option<ServeMetrics>,
    ) -> Self {
        Prequential {
            config,
            served,
            ctx,
            window: VecDeque::new(),
            hits_in_window: 0,
            seen: 0,
            metrics,
        }
    }

    /// Checks every n-th click of a batch that is about to be trained on.
    pub fn observe(&mut self, batch: &[TrainingExample]) {
        let every = self.config.prequential_every;
        if every == 0 {
            return;
        }
        let Some(generation) = self.served.load() else {
            return; // nothing served yet: nothing to evaluate
        };
        for e in batch.iter().filter(|e| e.label.is_positive()) {
            self.seen += 1;
            if !self.seen.is_multiple_of(every) {
                continue;
            }
            let req = RecallRequest {
                user_id: Some(e.user_id.to_string()),
                k: Some(self.config.prequential_k),
                ..Default::default()
            };
            let Ok(answer) = recall(&generation, &self.ctx, &req) else {
                continue;
            };
            let hit = answer.items.iter().any(|s| s.item_id == e.item_id.as_str());
            self.window.push_back(hit);
            self.hits_in_window += usize::from(hit);
            if self.window.len() > self.config.prequential_window {
                if let Some(old) = self.window.pop_front() {
                    self.hits_in_window -= usize::from(old);
                }
            }
            if let Some(m) = &self.metrics {
                m.prequential_clicks.inc();
                if hit {
                    m.prequential_hits.inc();
                }
                m.prequential_recall.set(self.recall());
            }
        }
    }

    /// Recall@K over the window (0 before any check).
    pub fn recall(&self) -> f64 {
        self.hits_in_window as f64 / self.window.len().max(1) as f64
    }

    /// Clicks checked so far.
    pub fn checked(&self) -> usize {
        self.window.len()
    }
}
