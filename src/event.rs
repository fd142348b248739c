//! Event types and their wire format: the Rust mirror of `schemas/*.schema.json`.
//!
//! [`parse_event`] is the one entry point from raw Kafka payload bytes to a validated [`Event`].
//! It never panics; every rejection carries an [`InvalidReason`] (the metric label and the
//! dead-letter header) and a human-readable detail naming the offending field.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest accepted string id (bytes), as in the schemas' `$defs/id`.
pub const MAX_ID_LEN: usize = 256;
/// Largest accepted token (event ids, impression ids, categorical values).
pub const MAX_TOKEN_LEN: usize = 128;
/// Largest accepted event time: 9999999999999 ms (year 2286), as in the schemas.
pub const MAX_EVENT_TIME_MS: i64 = 9_999_999_999_999;
/// Largest accepted dwell time: one day.
pub const MAX_DWELL_MS: u64 = 86_400_000;
/// Largest accepted impression position.
pub const MAX_POSITION: u32 = 10_000;
/// Most genres an item may carry.
pub const MAX_GENRES: usize = 64;
/// Most dense features an entity may carry.
pub const MAX_DENSE: usize = 64;
/// Largest accepted magnitude of a dense value: `|x| ≤ 1e15`, as in the schemas.
///
/// JSON (and f64) accepts values like `1e308` that are `inf` once the model reads them as f32,
/// and one such value poisons every weight it reaches. 1e15 keeps every integer exact in f64
/// and covers millisecond timestamps, money in cents and byte counts up to a petabyte; with the
/// configuration's own bounds (`|mean| ≤` this, `std ≥` [`MIN_DENSE_STD`]) every accepted value
/// stays finite in f32 after the feature transform (`|(x − mean) / std| ≤ 2e21`).
pub const MAX_DENSE_ABS: f64 = 1e15;
/// Smallest configured standard deviation of a dense feature (see [`MAX_DENSE_ABS`]).
pub const MIN_DENSE_STD: f64 = 1e-6;

/// An entity id (user or item). The wire format accepts a string or an integer; integers are
/// kept as their decimal string so `42` and `"42"` name the same entity. Cloning is cheap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(Arc<str>);

impl Id {
    /// Creates an id from any string-like value (no validation; see [`parse_event`]).
    pub fn new(s: impl AsRef<str>) -> Self {
        Id(Arc::from(s.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's UTF-8 bytes (for stable hashing).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::new(s)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or integer id")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id::new(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id::new(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id::new(v.to_string()))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// An item shown to a user: one slot of one request's slate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Impression {
    /// Unique id of the event (deduplication key).
    pub event_id: String,
    /// Event time in ms since the epoch.
    pub event_time_ms: i64,
    /// Who saw it.
    pub user_id: Id,
    /// What was shown.
    pub item_id: Id,
    /// Unique id of this display; clicks refer to it.
    pub impression_id: String,
    /// The request that produced the slate.
    pub request_id: String,
    /// 0-based slot in the slate.
    pub position: u32,
    /// Optional UI surface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surface: Option<String>,
}

/// A click (positive engagement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Click {
    /// Unique id of the event (deduplication key).
    pub event_id: String,
    /// Event time in ms since the epoch.
    pub event_time_ms: i64,
    /// Who clicked.
    pub user_id: Id,
    /// What was clicked.
    pub item_id: Id,
    /// The impression clicked, when the producer knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impression_id: Option<String>,
    /// Dwell time in ms, when known (reward weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwell_ms: Option<u64>,
}

/// Upsert or delete of a catalogue entry or profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Create or replace.
    #[default]
    Upsert,
    /// Remove.
    Delete,
}

/// Named dense features, in a stable order.
pub type Dense = std::collections::BTreeMap<String, f64>;

/// Catalogue upsert/delete of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemEvent {
    /// Unique id of the event.
    pub event_id: String,
    /// Event time in ms since the epoch.
    pub event_time_ms: i64,
    /// The item.
    pub item_id: Id,
    /// Upsert or delete.
    pub op: Op,
    /// Display title (not a model feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Primary category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Genres / tags (multi-valued categorical).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub genres: Vec<String>,
    /// Dense features.
    #[serde(default, skip_serializing_if = "Dense::is_empty")]
    pub dense: Dense,
}

/// Profile upsert/delete of one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEvent {
    /// Unique id of the event.
    pub event_id: String,
    /// Event time in ms since the epoch.
    pub event_time_ms: i64,
    /// The user.
    pub user_id: Id,
    /// Upsert (default) or delete.
    #[serde(default)]
    pub op: Op,
    /// Gender code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    /// Age in years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<u8>,
    /// Occupation code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupation: Option<String>,
    /// Postal code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip: Option<String>,
    /// Dense features.
    #[serde(default, skip_serializing_if = "Dense::is_empty")]
    pub dense: Dense,
}

/// Any event towerstream consumes; `type` is the JSON discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// See [`Impression`].
    Impression(Impression),
    /// See [`Click`].
    Click(Click),
    /// See [`ItemEvent`].
    Item(ItemEvent),
    /// See [`UserEvent`].
    User(UserEvent),
}

impl Event {
    /// The event's type name as on the wire (also a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Impression(_) => "impression",
            Event::Click(_) => "click",
            Event::Item(_) => "item",
            Event::User(_) => "user",
        }
    }

    /// The producer-assigned event id.
    pub fn event_id(&self) -> &str {
        match self {
            Event::Impression(e) => &e.event_id,
            Event::Click(e) => &e.event_id,
            Event::Item(e) => &e.event_id,
            Event::User(e) => &e.event_id,
        }
    }

    /// Event time in ms.
    pub fn event_time_ms(&self) -> i64 {
        match self {
            Event::Impression(e) => e.event_time_ms,
            Event::Click(e) => e.event_time_ms,
            Event::Item(e) => e.event_time_ms,
            Event::User(e) => e.event_time_ms,
        }
    }

    /// Sets the event time (replays that re-stamp history as "now").
    pub fn set_event_time_ms(&mut self, t: i64) {
        match self {
            Event::Impression(e) => e.event_time_ms = t,
            Event::Click(e) => e.event_time_ms = t,
            Event::Item(e) => e.event_time_ms = t,
            Event::User(e) => e.event_time_ms = t,
        }
    }

    /// JSON bytes of the event (the wire format `parse_event` reads).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why an event was rejected. `as_str` is the metric label and dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Not JSON (or not UTF-8, or not an object).
    BadJson,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or is out of range.
    InvalidField,
    /// The payload exceeds `ingest.max_event_bytes`.
    Oversize,
    /// `type` names no known event.
    UnknownType,
    /// The event arrived on a topic that does not carry its type (e.g. a click on the items topic).
    WrongTopic,
    /// The event time is further ahead of the wall clock than `join.max_future_ms`.
    FutureTime,
    /// The event time is further behind its partition's clock than `join.allowed_lateness_ms`.
    TooLate,
    /// A tombstone (null payload) on a table topic without a usable key: the key names what
    /// it deletes.
    BadKey,
    /// A binary payload (Avro with a schema registry) that is not framed as one, names a
    /// schema the registry does not have, or does not decode with its schema.
    BadEncoding,
}

impl InvalidReason {
    /// All reasons, for pre-registering metric labels.
    pub const ALL: [InvalidReason; 10] = [
        InvalidReason::BadJson,
        InvalidReason::MissingField,
        InvalidReason::InvalidField,
        InvalidReason::Oversize,
        InvalidReason::UnknownType,
        InvalidReason::WrongTopic,
        InvalidReason::FutureTime,
        InvalidReason::TooLate,
        InvalidReason::BadKey,
        InvalidReason::BadEncoding,
    ];

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::BadJson => "bad_json",
            InvalidReason::MissingField => "missing_field",
            InvalidReason::InvalidField => "invalid_field",
            InvalidReason::Oversize => "oversize",
            InvalidReason::UnknownType => "unknown_type",
            InvalidReason::WrongTopic => "wrong_topic",
            InvalidReason::FutureTime => "future_time",
            InvalidReason::TooLate => "too_late",
            InvalidReason::BadKey => "bad_key",
            InvalidReason::BadEncoding => "bad_encoding",
        }
    }

    /// Parses [`as_str`](Self::as_str) back.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected event: the reason class plus a detail for humans.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct EventError {
    /// Reason class.
    pub reason: InvalidReason,
    /// What exactly was wrong, naming the field where there is one.
    pub detail: String,
}

impl EventError {
    /// An error of class `reason` with `detail` for humans.
    pub fn new(reason: InvalidReason, detail: impl Into<String>) -> Self {
        EventError {
            reason,
            detail: detail.into(),
        }
    }

    fn invalid(field: &str, why: impl fmt::Display) -> Self {
        Self::new(InvalidReason::InvalidField, format!("`{field}` {why}"))
    }
}

#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
}

/// Parses and validates one payload. `max_bytes` bounds the payload size.
///
/// Two passes: a cheap probe reads only `type` (so an unknown type or broken JSON is named
/// as such), then the concrete struct is read with the path of any bad field recorded.
pub fn parse_event(bytes: &[u8], max_bytes: usize) -> Result<Event, EventError> {
    if bytes.len() > max_bytes {
        return Err(EventError::new(
            InvalidReason::Oversize,
            format!("payload is {} bytes, limit {max_bytes}", bytes.len()),
        ));
    }
    let probe: TypeProbe<'_> = serde_json::from_slice(bytes)
        .map_err(|e| EventError::new(InvalidReason::BadJson, e.to_string()))?;
    let event = match probe.ty.as_deref() {
        None => {
            return Err(EventError::new(
                InvalidReason::MissingField,
                "missing field `type`",
            ))
        }
        Some("impression") => Event::Impression(read(bytes)?),
        Some("click") => Event::Click(read(bytes)?),
        Some("item") => Event::Item(read(bytes)?),
        Some("user") => Event::User(read(bytes)?),
        Some(other) => {
            return Err(EventError::new(
                InvalidReason::UnknownType,
                format!("unknown event type {:?}", truncate(other, 64)),
            ))
        }
    };
    validate(&event)?;
    Ok(event)
}

fn read<T: de::DeserializeOwned>(bytes: &[u8]) -> Result<T, EventError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if msg.starts_with("missing field") {
            EventError::new(InvalidReason::MissingField, msg)
        } else if inner.is_syntax() || inner.is_eof() {
            EventError::new(InvalidReason::BadJson, msg)
        } else {
            EventError::new(InvalidReason::InvalidField, format!("`{path}`: {msg}"))
        }
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), EventError> {
    if value.is_empty() {
        Err(EventError::invalid(field, "must not be empty"))
    } else if value.chars().count() > max {
        Err(EventError::invalid(
            field,
            format_args!("is longer than {max} characters"),
        ))
    } else {
        Ok(())
    }
}

fn check_common(event_id: &str, event_time_ms: i64) -> Result<(), EventError> {
    check_len("event_id", event_id, MAX_TOKEN_LEN)?;
    if !(0..=MAX_EVENT_TIME_MS).contains(&event_time_ms) {
        return Err(EventError::invalid(
            "event_time_ms",
            format_args!("must be in 0..={MAX_EVENT_TIME_MS}, got {event_time_ms}"),
        ));
    }
    Ok(())
}

fn check_opt(field: &str, value: &Option<String>, max: usize) -> Result<(), EventError> {
    value
        .as_deref()
        .map_or(Ok(()), |v| check_len(field, v, max))
}

/// Checks a `dense` map at `field` (`dense` in events, `features.dense` in recall requests):
/// at most [`MAX_DENSE`] entries, each finite and within ±[`MAX_DENSE_ABS`]. The detail names
/// the offending entry, e.g. "`dense.price` must be finite and within ±1e15, got 1e308".
pub fn check_dense(field: &str, dense: &Dense) -> Result<(), EventError> {
    if dense.len() > MAX_DENSE {
        return Err(EventError::invalid(
            field,
            format_args!("has more than {MAX_DENSE} entries"),
        ));
    }
    for (name, x) in dense {
        if !(x.is_finite() && x.abs() <= MAX_DENSE_ABS) {
            return Err(EventError::invalid(
                &format!("{field}.{}", truncate(name, 64)),
                format_args!("must be finite and within ±{MAX_DENSE_ABS:e}, got {x:e}"),
            ));
        }
    }
    Ok(())
}

/// Range and length checks the JSON Schemas express but serde's types do not (also run on
/// events read through a [`crate::mapping`]).
pub fn validate(event: &Event) -> Result<(), EventError> {
    match event {
        Event::Impression(e) => {
            check_common(&e.event_id, e.event_time_ms)?;
            check_len("user_id", e.user_id.as_str(), MAX_ID_LEN)?;
            check_len("item_id", e.item_id.as_str(), MAX_ID_LEN)?;
            check_len("impression_id", &e.impression_id, MAX_TOKEN_LEN)?;
            check_len("request_id", &e.request_id, MAX_TOKEN_LEN)?;
            if e.position > MAX_POSITION {
                return Err(EventError::invalid(
                    "position",
                    format_args!("must be at most {MAX_POSITION}"),
                ));
            }
            if let Some(s) = &e.surface {
                if s.chars().count() > 64 {
                    return Err(EventError::invalid(
                        "surface",
                        "is longer than 64 characters",
                    ));
                }
            }
        }
        Event::Click(e) => {
            check_common(&e.event_id, e.event_time_ms)?;
            check_len("user_id", e.user_id.as_str(), MAX_ID_LEN)?;
            check_len("item_id", e.item_id.as_str(), MAX_ID_LEN)?;
            check_opt("impression_id", &e.impression_id, MAX_TOKEN_LEN)?;
            if e.dwell_ms.is_some_and(|d| d > MAX_DWELL_MS) {
                return Err(EventError::invalid(
                    "dwell_ms",
                    format_args!("must be at most {MAX_DWELL_MS}"),
                ));
            }
        }
        Event::Item(e) => {
            check_common(&e.event_id, e.event_time_ms)?;
            check_len("item_id", e.item_id.as_str(), MAX_ID_LEN)?;
            if let Some(t) = &e.title {
                if t.chars().count() > 512 {
                    return Err(EventError::invalid(
                        "title",
                        "is longer than 512 characters",
                    ));
                }
            }
            check_opt("category", &e.category, MAX_TOKEN_LEN)?;
            if e.genres.len() > MAX_GENRES {
                return Err(EventError::invalid(
                    "genres",
                    format_args!("has more than {MAX_GENRES} entries"),
                ));
            }
            for g in &e.genres {
                check_len("genres[]", g, MAX_TOKEN_LEN)?;
            }
            check_dense("dense", &e.dense)?;
        }
        Event::User(e) => {
            check_common(&e.event_id, e.event_time_ms)?;
            check_len("user_id", e.user_id.as_str(), MAX_ID_LEN)?;
            check_opt("gender", &e.gender, MAX_TOKEN_LEN)?;
            check_opt("occupation", &e.occupation, MAX_TOKEN_LEN)?;
            check_opt("zip", &e.zip, MAX_TOKEN_LEN)?;
            if e.age.is_some_and(|a| a > 150) {
                return Err(EventError::invalid("age", "must be in 0..=150"));
            }
            check_dense("dense", &e.dense)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_and_string_ids_are_the_same_entity() {
        let a = br#"{"type":"click","event_id":"e","event_time_ms":1,"user_id":42,"item_id":"7"}"#;
        let b = br#"{"type":"click","event_id":"e","event_time_ms":1,"user_id":"42","item_id":7}"#;
        assert_eq!(parse_event(a, 1024), parse_event(b, 1024));
    }

    #[test]
    fn reasons_name_the_field() {
        let e = parse_event(
            br#"{"type":"impression","event_id":"e","event_time_ms":1,"user_id":"u","item_id":"i","impression_id":"x","request_id":"r","position":"3"}"#,
            1024,
        )
        .unwrap_err();
        assert_eq!(e.reason, InvalidReason::InvalidField);
        assert!(e.detail.contains("position"), "{}", e.detail);
    }

    fn item_with_price(price: &str) -> Result<Event, EventError> {
        let json = format!(
            r#"{{"type":"item","event_id":"e","event_time_ms":1,"item_id":"i","op":"upsert","dense":{{"year":1975,"price":{price}}}}}"#
        );
        parse_event(json.as_bytes(), 1024)
    }

    #[test]
    fn dense_values_beyond_f32_or_the_bound_are_rejected_naming_the_field() {
        // 1e308 and 1e39 are finite f64 but inf as f32; 1e16 is finite in both but out of range.
        for bad in [
            "1e308",
            "-1e308",
            "1e39",
            "3.5e38",
            "1e16",
            "-1000000000000001",
        ] {
            let e = item_with_price(bad).unwrap_err();
            assert_eq!(e.reason, InvalidReason::InvalidField, "{bad}");
            assert!(
                e.detail
                    .contains("`dense.price` must be finite and within ±1e15"),
                "{bad}: {}",
                e.detail
            );
        }
        let user = br#"{"type":"user","event_id":"e","event_time_ms":1,"user_id":"u","dense":{"spend":1e39}}"#;
        let e = parse_event(user, 1024).unwrap_err();
        assert!(e.detail.contains("`dense.spend`"), "{}", e.detail);
    }

    #[test]
    fn dense_values_within_the_bound_are_accepted() {
        for ok in ["0", "-0.0", "1e15", "-1e15", "1e-300", "1700000000000"] {
            assert!(item_with_price(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn oversize_is_checked_before_parsing() {
        let e = parse_event(&[b'{'; 100], 10).unwrap_err();
        assert_eq!(e.reason, InvalidReason::Oversize);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_event(&bytes, 256);
        }

        #[test]
        fn mutated_valid_events_never_panic(cut in 0usize..120, byte in proptest::num::u8::ANY) {
            let mut v = br#"{"type":"click","event_id":"e","event_time_ms":1,"user_id":42,"item_id":"7","dwell_ms":5}"#.to_vec();
            let i = cut.min(v.len() - 1);
            v[i] = byte;
            let _ = parse_event(&v, 1024);
        }
    }
}
