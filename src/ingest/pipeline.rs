//! The event transform: what happens to every event-topic message, in the trainer's ingestion
//! and in a serving replica alike, so a fix lands once.
//!
//! ```text
//!  payload ─▶ Decoder ─▶ time rules (Joiner::admit) ─▶ impression/click ─▶ Joiner ─▶ JoinOutput
//!               │ bad            │ future / too late           item/user ─▶ Catalog
//!               └────────────────┴──▶ Outcome::Rejected (the caller dead-letters or skips)
//! ```
//!
//! The pipeline owns the join state and writes the catalogue; what to do with the output is
//! the caller's: the trainer's ingest loop accounts offsets, dead-letters and hands examples on;
//! a replica only adds the clicks to its histories.

use crate::catalog::SharedCatalog;
use crate::event::{Event, EventError, InvalidReason};
use crate::example::Origin;
use crate::join::{Disposition, JoinOutput, Joiner};
use tokio_util::sync::CancellationToken;

use crate::mapping::{Decoder, Source};
use crate::metrics::IngestMetrics;

use super::tables::{self, TableChange};

/// What happened to one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Refused: malformed, or outside the time rules. Nothing else happened.
    Rejected(EventError),
    /// An impression or click went through the join (its examples are in the output).
    Joined(Disposition),
    /// An item or user event updated the catalogue.
    Table,
}

/// Parse, validate, time rules, join: one message at a time. Single-threaded.
pub struct EventPipeline {
    joiner: Joiner,
    catalog: SharedCatalog,
    decoder: Decoder,
    metrics: IngestMetrics,
}

impl EventPipeline {
    /// A pipeline reading payloads with `decoder` (towerstream's schema or the user's
    /// mapping, see [`Config::decoder`](crate::config::Config::decoder)), joining into `joiner`
    /// and applying table events to `catalog`.
    pub fn new(
        joiner: Joiner,
        catalog: SharedCatalog,
        decoder: Decoder,
        metrics: IngestMetrics,
    ) -> Self {
        EventPipeline {
            joiner,
            catalog,
            decoder,
            metrics,
        }
    }

    /// How payloads are read (also the table topics', which the caller decodes).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The catalogue the table events write.
    pub fn catalog(&self) -> &SharedCatalog {
        &self.catalog
    }

    /// The join state (window size, watermarks).
    pub fn joiner(&self) -> &Joiner {
        &self.joiner
    }

    /// Handles one message from `origin` received at wall time `now_ms`; returns the event's
    /// kind (`malformed` when it did not parse) and the outcome. Examples and released origins
    /// are appended to `out`.
    pub fn handle(
        &mut self,
        origin: Origin,
        payload: Option<&[u8]>,
        now_ms: i64,
        out: &mut JoinOutput,
    ) -> (&'static str, Outcome) {
        let Some(payload) = payload else {
            let err = EventError {
                reason: InvalidReason::BadJson,
                detail: "the message has no payload (a tombstone); event topics carry events, \
                         not table deletes"
                    .into(),
            };
            return ("malformed", Outcome::Rejected(err));
        };
        let event = match self.decoder.decode(origin.topic, payload) {
            Ok(e) => e,
            Err(err) => return ("malformed", Outcome::Rejected(err)),
        };
        let kind = event.kind();
        if let Err(v) = self.joiner.admit(origin, event.event_time_ms(), now_ms) {
            let err = EventError {
                reason: v.reason,
                detail: v.detail(event.event_time_ms()),
            };
            return (kind, Outcome::Rejected(err));
        }
        let outcome = match event {
            Event::Impression(imp) => {
                let c = self.catalog.read().unwrap_or_else(|p| p.into_inner());
                Outcome::Joined(self.joiner.on_impression(imp, origin, &c, out))
            }
            Event::Click(click) => {
                let c = self.catalog.read().unwrap_or_else(|p| p.into_inner());
                Outcome::Joined(self.joiner.on_click(click, origin, &c, out))
            }
            table => {
                if let Some(change) = TableChange::from_event(table) {
                    tables::apply(&self.catalog, &change, &self.metrics);
                }
                Outcome::Table
            }
        };
        (kind, outcome)
    }

    /// Waits until the schema a payload of event topic `topic` needs is known (see
    /// [`Decoder::await_schema`]); false when `stop` is cancelled first.
    pub async fn await_schema(
        &self,
        topic: u16,
        payload: Option<&[u8]>,
        stop: &CancellationToken,
    ) -> bool {
        let errors = &self.metrics.schema_registry_errors;
        self.decoder
            .await_schema(Source::Events(topic), payload, Some(stop), errors)
            .await
    }

    /// Moves idle partitions' clocks on ([`Joiner::tick`]); what leaves the window goes to `out`.
    pub fn tick(&mut self, now_ms: i64, out: &mut JoinOutput) {
        let c = self.catalog.read().unwrap_or_else(|p| p.into_inner());
        self.joiner.tick(now_ms, &c, out);
    }

    /// Forgets revoked partitions ([`Joiner::revoke`]).
    pub fn revoke(&mut self, partitions: &[(u16, i32)]) {
        self.joiner.revoke(partitions);
    }
}

/// Milliseconds since the epoch by the wall clock (the time rules' reference).
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
