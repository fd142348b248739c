//! The unit handed from ingestion to training: one labelled (user, item) pair with its
//! features resolved, plus the Kafka position it came from so the trainer can acknowledge it.

use std::sync::Arc;

use crate::catalog::{ItemFeatures, UserProfile};
use crate::event::Id;

/// Where an example came from: enough to acknowledge it to the offset tracker.
///
/// `topic` indexes `kafka.event_topics`; `epoch` is the assignment epoch of the partition, so
/// an acknowledgement that arrives after the partition was revoked (and maybe reassigned) is
/// recognised as stale instead of being stored twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// Index into the configured event topics.
    pub topic: u16,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset of the source message.
    pub offset: i64,
    /// Assignment epoch of the partition when the message was consumed.
    pub epoch: u32,
}

/// What the example teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// A click: a positive. `joined` says whether its impression was found in the window.
    Click {
        /// The click was matched to its impression.
        joined: bool,
    },
    /// An impression that left the join window without a click: an explicit negative for the
    /// point-wise and pair-wise modes (never for in-batch softmax, which samples its own).
    ShownNotClicked,
}

impl Label {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Click { joined: true } => "click_joined",
            Label::Click { joined: false } => "click_unjoined",
            Label::ShownNotClicked => "shown_not_clicked",
        }
    }

    /// True for clicks.
    pub fn is_positive(self) -> bool {
        matches!(self, Label::Click { .. })
    }
}

/// One training example.
#[derive(Debug, Clone)]
pub struct TrainingExample {
    /// Positive or explicit negative.
    pub label: Label,
    /// The user.
    pub user_id: Id,
    /// The item.
    pub item_id: Id,
    /// The user's profile when known at join time.
    pub user: Option<Arc<UserProfile>>,
    /// The item's catalogue features when known at join time.
    pub item: Option<Arc<ItemFeatures>>,
    /// Event time of the click (or of the impression, for negatives), ms.
    pub event_time_ms: i64,
    /// Dwell time of the click, when given.
    pub dwell_ms: Option<u64>,
    /// Slate position of the impression, when joined.
    pub position: Option<u32>,
    /// Source position, for acknowledgement.
    pub origin: Origin,
}
