//! Field mapping: the impression and click events a shop already has, read as towerstream's.
//!
//! Without a `[mapping]` section an event topic carries towerstream's own JSON schema
//! ([`parse_event`]). With one, each towerstream field is read from where the user's events
//! keep it, named by a JSON Pointer (RFC 6901, `/user/id` for `{"user": {"id": 7}}`):
//!
//! ```toml
//! [mapping.default]              # every event topic without an entry of its own
//! kind = { field = "/action", click = ["click", "tap"], impression = ["view"] }
//! user_id = "/user/id"
//! item_id = "/item/sku"
//! event_time = "/ts"
//! time_format = "rfc3339"        # or epoch_ms, epoch_s, auto (number: ms, string: RFC 3339)
//!
//! [mapping.topics."shop.clicks"]  # fields set here replace the default's
//! kind = "click"
//! ```
//!
//! A mapped event becomes the same [`Event`] the native schema gives and passes the same
//! checks ([`validate`]); a missing or mistyped field is an [`EventError`] naming the user's
//! field, dead-lettered like any malformed event. A mapping that cannot work is a
//! [`ConfigError`] naming the key, at startup ([`Decoder::new`]).
//!
//! Fields the user's events may not have are derived: the event id from the payload's bytes
//! (a replayed message keeps its id, so deduplication still works), an impression's id from
//! its event id, its request id from the user and the time (one slate per user and instant),
//! its position as 0.

mod binary;
mod extract;
pub mod registry;
pub mod shop;

pub use binary::AvroSchema;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use extract::{ExtractError, Extractor, Found};
use registry::{RegistryError, SchemaRegistry};

use crate::config::ConfigError;
use crate::event::{
    parse_event, validate, Click, Dense, Event, EventError, Impression, InvalidReason, ItemEvent,
    Op, UserEvent, MAX_EVENT_TIME_MS,
};

/// The `[mapping]` section: a default for every event topic and per-topic mappings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MappingConfig {
    /// The mapping of event topics without their own; `None`: towerstream's own schema.
    pub default: Option<FieldMap>,
    /// Per event topic (by name): fields set here replace the default's.
    pub topics: BTreeMap<String, FieldMap>,
    /// The item topic's records (`kafka.item_topic`); `None`: towerstream's item events.
    pub items: Option<TableMap>,
    /// The user topic's records (`kafka.user_topic`); `None`: towerstream's user events.
    pub users: Option<TableMap>,
    /// Base URL of a Confluent-compatible schema registry API (e.g.
    /// `http://registry:8081`, or Apicurio's `http://registry:8080/apis/ccompat/v7`), for
    /// mappings with `format = "avro"`; empty: none.
    pub schema_registry_url: String,
    /// Longest one request to the registry may take.
    pub schema_registry_timeout_ms: u64,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            default: None,
            topics: BTreeMap::new(),
            items: None,
            users: None,
            schema_registry_url: String::new(),
            schema_registry_timeout_ms: 5000,
        }
    }
}

/// How a mapped topic's payloads are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// JSON text.
    #[default]
    Json,
    /// Avro binary in the Confluent wire format, its schema in `mapping.schema_registry_url`;
    /// the pointers address the record's fields by name.
    Avro,
    /// Protobuf in the Confluent wire format, its `.proto` schema in the registry; the
    /// pointers address the message's fields by name (`google.protobuf.Timestamp` as epoch ms).
    Protobuf,
}

impl PayloadFormat {
    fn uses_registry(self) -> bool {
        matches!(self, PayloadFormat::Avro | PayloadFormat::Protobuf)
    }
}

/// Where an item's or a user's fields live in the records of a table topic (JSON Pointers).
/// A tombstone (null payload) deletes the id in its key, mapped or not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableMap {
    /// How the payloads are encoded (default `json`).
    pub format: Option<PayloadFormat>,
    /// Item id (items) or user id (users): required.
    pub id: Option<String>,
    /// Event id; derived from the payload when unset.
    pub event_id: Option<String>,
    /// Update time, read as `time_format` says; the record's Kafka timestamp when unset (it
    /// orders updates of one id: an older one never overwrites a newer).
    pub event_time: Option<String>,
    /// How `event_time` is written (default `auto`).
    pub time_format: Option<TimeFormat>,
    /// A field whose listed values mean the record deletes the id (`{ field, values }`).
    pub deleted: Option<DeletedRule>,
    /// Items: display title.
    pub title: Option<String>,
    /// Items: primary category.
    pub category: Option<String>,
    /// Items: genres or tags (an array of strings, or one string).
    pub genres: Option<String>,
    /// Users: gender code.
    pub gender: Option<String>,
    /// Users: age in years.
    pub age: Option<String>,
    /// Users: occupation code.
    pub occupation: Option<String>,
    /// Users: postal code.
    pub zip: Option<String>,
    /// Dense features: towerstream's name (as in `features`) → pointer.
    pub dense: BTreeMap<String, String>,
}

/// Values of one field that mark a table record as a delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedRule {
    /// Pointer to the field.
    pub field: String,
    /// Values meaning "deleted" (strings, or booleans and numbers written as text: "true").
    pub values: Vec<String>,
}

/// Where towerstream's event fields live in the user's events (JSON Pointers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldMap {
    /// How the payloads are encoded (default `json`).
    pub format: Option<PayloadFormat>,
    /// Which kind each event is: one kind for the topic, or a field and its values.
    pub kind: Option<KindRule>,
    /// Event id (deduplication key); derived from the payload when unset.
    pub event_id: Option<String>,
    /// User id (string or integer).
    pub user_id: Option<String>,
    /// Item id (string or integer).
    pub item_id: Option<String>,
    /// Event time, read as `time_format` says.
    pub event_time: Option<String>,
    /// How `event_time` is written (default `auto`).
    pub time_format: Option<TimeFormat>,
    /// Impression id (an impression's defaults to its event id; a click's is optional).
    pub impression_id: Option<String>,
    /// Request (slate) id of an impression; defaults to user and time.
    pub request_id: Option<String>,
    /// Slot of an impression in its slate; defaults to 0.
    pub position: Option<String>,
    /// Dwell time of a click in ms.
    pub dwell_ms: Option<String>,
    /// UI surface of an impression.
    pub surface: Option<String>,
}

/// How the kind of an event is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KindRule {
    /// Every event of the topic is of this kind (`"click"` or `"impression"`).
    Fixed(String),
    /// One "action" field says: these values mean a click, those an impression.
    Field {
        /// Pointer to the field.
        field: String,
        /// Values meaning a click.
        #[serde(default)]
        click: Vec<String>,
        /// Values meaning an impression.
        #[serde(default)]
        impression: Vec<String>,
    },
}

/// How an event time is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// A number is epoch milliseconds, a string an integer of them or RFC 3339.
    #[default]
    Auto,
    /// Epoch milliseconds (number or numeric string).
    EpochMs,
    /// Epoch seconds, fractions allowed (number or numeric string).
    EpochS,
    /// RFC 3339 / ISO-8601 (`2026-12-03T17:00:00Z`; without an offset, UTC).
    Rfc3339,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Click,
    Impression,
}

/// A [`FieldMap`] checked and ready: every pointer valid, every required field named.
#[derive(Debug, Clone)]
struct Compiled {
    format: PayloadFormat,
    /// Reads the values at every pointer below in one pass.
    extractor: Extractor,
    kind: CompiledKind,
    event_id: Option<String>,
    user_id: String,
    item_id: String,
    event_time: String,
    time_format: TimeFormat,
    impression_id: Option<String>,
    request_id: Option<String>,
    position: Option<String>,
    dwell_ms: Option<String>,
    surface: Option<String>,
}

#[derive(Debug, Clone)]
enum CompiledKind {
    Fixed(Kind),
    Field {
        field: String,
        values: HashMap<String, Kind>,
    },
}

/// Payload bytes to [`Event`]s, per event topic: towerstream's schema or the user's mapping.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_bytes: usize,
    /// By topic index (as in [`crate::example::Origin::topic`]); `None`: native schema.
    topics: Vec<Option<Compiled>>,
    items: Option<CompiledTable>,
    users: Option<CompiledTable>,
    registry: Option<Arc<SchemaRegistry>>,
}

/// Where a payload was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The event topic at this index of `kafka.event_topics`.
    Events(u16),
    /// A table topic.
    Table(Table),
}

/// Which table a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `kafka.item_topic`.
    Items,
    /// `kafka.user_topic`.
    Users,
}

/// A [`TableMap`] checked and ready.
#[derive(Debug, Clone)]
struct CompiledTable {
    format: PayloadFormat,
    /// Reads the values at every pointer below in one pass.
    extractor: Extractor,
    table: Table,
    id: String,
    event_id: Option<String>,
    event_time: Option<String>,
    time_format: TimeFormat,
    deleted: Option<(String, Vec<String>)>,
    /// Towerstream field → pointer, for the optional string fields of this table.
    text: Vec<(&'static str, String)>,
    genres: Option<String>,
    age: Option<String>,
    dense: Vec<(String, String)>,
}

impl Decoder {
    /// Checks `mapping` against the event topics (`kafka.event_topics`, in order); payloads
    /// over `max_bytes` are refused. Errors name the key, e.g. `mapping.topics."a".user_id`.
    pub fn new(
        mapping: &MappingConfig,
        event_topics: &[String],
        max_bytes: usize,
    ) -> Result<Decoder, ConfigError> {
        if let Some(name) = mapping.topics.keys().find(|t| !event_topics.contains(t)) {
            return Err(invalid(
                &format!("mapping.topics.{name:?}"),
                "is not one of kafka.event_topics",
            ));
        }
        let topics: Vec<Option<Compiled>> = event_topics
            .iter()
            .map(|name| {
                let own = mapping.topics.get(name);
                let merged = match (&mapping.default, own) {
                    (None, None) => return Ok(None),
                    (Some(d), None) => d.clone(),
                    (None, Some(t)) => t.clone(),
                    (Some(d), Some(t)) => merge(d, t),
                };
                let key = match own {
                    Some(_) => format!("mapping.topics.{name:?}"),
                    None => "mapping.default".to_string(),
                };
                compile(&merged, &key).map(Some)
            })
            .collect::<Result<_, _>>()?;
        let table = |m: &Option<TableMap>, t, key| m.as_ref().map(|m| compile_table(m, t, key));
        let items = table(&mapping.items, Table::Items, "mapping.items").transpose()?;
        let users = table(&mapping.users, Table::Users, "mapping.users").transpose()?;
        let avro = topics
            .iter()
            .flatten()
            .any(|c: &Compiled| c.format.uses_registry())
            || [&items, &users]
                .into_iter()
                .flatten()
                .any(|t| t.format.uses_registry());
        let url = mapping.schema_registry_url.trim();
        if avro && url.is_empty() {
            return Err(invalid(
                "mapping.schema_registry_url",
                "is needed by a mapping with format = \"avro\" or \"protobuf\"",
            ));
        }
        if !url.is_empty() && !url.starts_with("http://") {
            return Err(invalid(
                "mapping.schema_registry_url",
                format!("{url:?} is not an http:// URL"),
            ));
        }
        let timeout = Duration::from_millis(mapping.schema_registry_timeout_ms.max(1));
        Ok(Decoder {
            max_bytes,
            topics,
            items,
            users,
            registry: (!url.is_empty()).then(|| Arc::new(SchemaRegistry::new(url, timeout))),
        })
    }

    /// Waits until the schema a payload from `source` needs is known, fetching it from the
    /// schema registry and retrying (100 ms doubling to 5 s, each failure counted in
    /// `errors`) while the registry cannot be reached: the record — and the loop reading it —
    /// waits; nothing is dead-lettered for an outage. A schema the registry does not have ends
    /// the wait (the record is then dead-lettered as `bad_encoding`). False when `stop` is
    /// cancelled first.
    pub async fn await_schema(
        &self,
        source: Source,
        payload: Option<&[u8]>,
        stop: Option<&tokio_util::sync::CancellationToken>,
        errors: &prometheus::IntCounter,
    ) -> bool {
        let (Some(payload), Some(registry)) = (payload, self.registry.as_ref()) else {
            return true;
        };
        let Some(id) = self.pending_schema(source, payload) else {
            return true;
        };
        let mut wait = Duration::from_millis(100);
        loop {
            match registry.fetch(id).await {
                Ok(()) => return true,
                Err(e @ (RegistryError::NotFound(_) | RegistryError::BadSchema { .. })) => {
                    tracing::warn!(schema = id, error = %e, "a record names an unusable schema");
                    return true;
                }
                Err(e) => {
                    errors.inc();
                    tracing::warn!(
                        schema = id,
                        error = %e,
                        retry_ms = wait.as_millis() as u64,
                        "schema registry unavailable: the record waits"
                    );
                }
            }
            match stop {
                Some(stop) => tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                },
                None => tokio::time::sleep(wait).await,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// The schema registry the Avro mappings read their schemas from.
    pub fn registry(&self) -> Option<&Arc<SchemaRegistry>> {
        self.registry.as_ref()
    }

    /// The schema id a payload of the event topic `topic` (or of `table`) needs and the
    /// registry has not been asked for yet: fetch it ([`SchemaRegistry::fetch`]) before
    /// decoding, so an outage makes records wait instead of failing them.
    pub fn pending_schema(&self, source: Source, payload: &[u8]) -> Option<u32> {
        let format = match source {
            Source::Events(t) => self.topics.get(t as usize)?.as_ref()?.format,
            Source::Table(Table::Items) => self.items.as_ref()?.format,
            Source::Table(Table::Users) => self.users.as_ref()?.format,
        };
        let registry = self.registry.as_ref()?;
        let (id, _) = registry::framed(payload).filter(|_| format.uses_registry())?;
        registry.schema(id).is_none().then_some(id)
    }

    /// A decoder of towerstream's own schema on every topic.
    pub fn native(max_bytes: usize) -> Decoder {
        Decoder {
            max_bytes,
            topics: Vec::new(),
            items: None,
            users: None,
            registry: None,
        }
    }

    /// Decodes and validates one (non-tombstone) record of a table topic: an item or user
    /// event. `record_time_ms` (the Kafka timestamp) stands in for an unmapped update time.
    pub fn decode_table(
        &self,
        table: Table,
        payload: &[u8],
        record_time_ms: Option<i64>,
    ) -> Result<Event, EventError> {
        let mapped = match table {
            Table::Items => self.items.as_ref(),
            Table::Users => self.users.as_ref(),
        };
        match mapped {
            Some(map) => {
                self.check_size(payload)?;
                map.decode(payload, record_time_ms, self.registry.as_deref())
            }
            None => parse_event(payload, self.max_bytes),
        }
    }

    fn check_size(&self, payload: &[u8]) -> Result<(), EventError> {
        if payload.len() > self.max_bytes {
            return Err(EventError::new(
                InvalidReason::Oversize,
                format!(
                    "payload is {} bytes, limit {}",
                    payload.len(),
                    self.max_bytes
                ),
            ));
        }
        Ok(())
    }

    /// True when the event topic at `topic` is read through a mapping.
    pub fn is_mapped(&self, topic: u16) -> bool {
        matches!(self.topics.get(topic as usize), Some(Some(_)))
    }

    /// Decodes and validates one payload of the event topic at index `topic`.
    pub fn decode(&self, topic: u16, payload: &[u8]) -> Result<Event, EventError> {
        match self.topics.get(topic as usize) {
            Some(Some(map)) => {
                self.check_size(payload)?;
                map.decode(payload, self.registry.as_deref())
            }
            _ => parse_event(payload, self.max_bytes),
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn merge(base: &FieldMap, over: &FieldMap) -> FieldMap {
    fn pick<T: Clone>(over: &Option<T>, base: &Option<T>) -> Option<T> {
        over.clone().or_else(|| base.clone())
    }
    FieldMap {
        format: pick(&over.format, &base.format),
        kind: pick(&over.kind, &base.kind),
        event_id: pick(&over.event_id, &base.event_id),
        user_id: pick(&over.user_id, &base.user_id),
        item_id: pick(&over.item_id, &base.item_id),
        event_time: pick(&over.event_time, &base.event_time),
        time_format: pick(&over.time_format, &base.time_format),
        impression_id: pick(&over.impression_id, &base.impression_id),
        request_id: pick(&over.request_id, &base.request_id),
        position: pick(&over.position, &base.position),
        dwell_ms: pick(&over.dwell_ms, &base.dwell_ms),
        surface: pick(&over.surface, &base.surface),
    }
}

fn kind_named(name: &str) -> Option<Kind> {
    match name {
        "click" => Some(Kind::Click),
        "impression" => Some(Kind::Impression),
        _ => None,
    }
}

fn compile(m: &FieldMap, key: &str) -> Result<Compiled, ConfigError> {
    let pointer = |field: &str, p: &Option<String>| -> Result<Option<String>, ConfigError> {
        match p {
            Some(p) if !(p.is_empty() || p.starts_with('/')) => Err(invalid(
                &format!("{key}.{field}"),
                format!("{p:?} is not a JSON Pointer (RFC 6901: empty, or starting with `/`)"),
            )),
            _ => Ok(p.clone()),
        }
    };
    let required = |field: &str, p: &Option<String>| -> Result<String, ConfigError> {
        pointer(field, p)?.ok_or_else(|| {
            invalid(
                &format!("{key}.{field}"),
                "is required (a JSON Pointer into the events)",
            )
        })
    };
    let kind = match &m.kind {
        None => return Err(invalid(&format!("{key}.kind"), "is required")),
        Some(KindRule::Fixed(k)) => CompiledKind::Fixed(kind_named(k).ok_or_else(|| {
            invalid(
                &format!("{key}.kind"),
                format!("{k:?} is not an event kind (click or impression)"),
            )
        })?),
        Some(KindRule::Field {
            field,
            click,
            impression,
        }) => {
            let field = required("kind.field", &Some(field.clone()))?;
            let mut values = HashMap::new();
            let tagged = click
                .iter()
                .map(|v| (v, Kind::Click))
                .chain(impression.iter().map(|v| (v, Kind::Impression)));
            for (v, k) in tagged {
                if values.insert(v.clone(), k).is_some() {
                    return Err(invalid(
                        &format!("{key}.kind"),
                        format!("value {v:?} is listed twice"),
                    ));
                }
            }
            if values.is_empty() {
                return Err(invalid(
                    &format!("{key}.kind"),
                    "names no value meaning a click or an impression",
                ));
            }
            CompiledKind::Field { field, values }
        }
    };
    let mut c = Compiled {
        format: m.format.unwrap_or_default(),
        extractor: Extractor::default(),
        kind,
        event_id: pointer("event_id", &m.event_id)?,
        user_id: required("user_id", &m.user_id)?,
        item_id: required("item_id", &m.item_id)?,
        event_time: required("event_time", &m.event_time)?,
        time_format: m.time_format.unwrap_or_default(),
        impression_id: pointer("impression_id", &m.impression_id)?,
        request_id: pointer("request_id", &m.request_id)?,
        position: pointer("position", &m.position)?,
        dwell_ms: pointer("dwell_ms", &m.dwell_ms)?,
        surface: pointer("surface", &m.surface)?,
    };
    let kind_field = match &c.kind {
        CompiledKind::Field { field, .. } => Some(field.as_str()),
        CompiledKind::Fixed(_) => None,
    };
    let optional = [
        &c.event_id,
        &c.impression_id,
        &c.request_id,
        &c.position,
        &c.dwell_ms,
        &c.surface,
    ];
    c.extractor = Extractor::new(
        [
            c.user_id.as_str(),
            c.item_id.as_str(),
            c.event_time.as_str(),
        ]
        .into_iter()
        .chain(kind_field)
        .chain(optional.into_iter().flatten().map(String::as_str)),
    );
    Ok(c)
}

fn check_pointer(key: &str, p: &str) -> Result<(), ConfigError> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{p:?} is not a JSON Pointer (RFC 6901: empty, or starting with `/`)"),
        ))
    }
}

fn compile_table(m: &TableMap, table: Table, key: &str) -> Result<CompiledTable, ConfigError> {
    let opt = |field: &str, p: &Option<String>| -> Result<Option<String>, ConfigError> {
        if let Some(p) = p {
            check_pointer(&format!("{key}.{field}"), p)?;
        }
        Ok(p.clone())
    };
    let id = opt("id", &m.id)?
        .ok_or_else(|| invalid(&format!("{key}.id"), "is required (a JSON Pointer)"))?;
    // The text fields of this table, and those of the other one (a mistake to name here).
    type Named<'a> = Vec<(&'static str, &'a Option<String>)>;
    let item_fields: Named = vec![("title", &m.title), ("category", &m.category)];
    let user_fields: Named = vec![
        ("gender", &m.gender),
        ("occupation", &m.occupation),
        ("zip", &m.zip),
    ];
    let (names, mut wrong) = match table {
        Table::Items => (item_fields, user_fields),
        Table::Users => (user_fields, item_fields),
    };
    match table {
        Table::Items => wrong.push(("age", &m.age)),
        Table::Users => wrong.push(("genres", &m.genres)),
    }
    if let Some((field, _)) = wrong.iter().find(|(_, p)| p.is_some()) {
        return Err(invalid(
            &format!("{key}.{field}"),
            format!(
                "is not a field of the {} table",
                key.trim_start_matches("mapping.")
            ),
        ));
    }
    let mut text = Vec::new();
    for (field, p) in names {
        if let Some(p) = opt(field, p)? {
            text.push((field, p));
        }
    }
    for (name, p) in &m.dense {
        check_pointer(&format!("{key}.dense.{name}"), p)?;
    }
    let deleted = match &m.deleted {
        Some(d) => {
            check_pointer(&format!("{key}.deleted.field"), &d.field)?;
            if d.values.is_empty() {
                return Err(invalid(&format!("{key}.deleted.values"), "names no value"));
            }
            Some((d.field.clone(), d.values.clone()))
        }
        None => None,
    };
    let mut t = CompiledTable {
        format: m.format.unwrap_or_default(),
        extractor: Extractor::default(),
        table,
        id,
        event_id: opt("event_id", &m.event_id)?,
        event_time: opt("event_time", &m.event_time)?,
        time_format: m.time_format.unwrap_or_default(),
        deleted,
        text,
        genres: opt("genres", &m.genres)?,
        age: opt("age", &m.age)?,
        dense: m.dense.clone().into_iter().collect(),
    };
    let optional = [&t.event_id, &t.event_time, &t.genres, &t.age];
    t.extractor = Extractor::new(
        std::iter::once(t.id.as_str())
            .chain(optional.into_iter().flatten().map(String::as_str))
            .chain(t.deleted.iter().map(|(p, _)| p.as_str()))
            .chain(t.text.iter().map(|(_, p)| p.as_str()))
            .chain(t.dense.iter().map(|(_, p)| p.as_str())),
    );
    Ok(t)
}

/// One mapped field of one event: where it was read from, for the error a user can act on.
#[derive(Clone, Copy)]
struct Field<'a> {
    target: &'static str,
    pointer: &'a str,
    value: Option<&'a Value>,
}

impl Field<'_> {
    fn missing(&self) -> EventError {
        EventError::new(
            InvalidReason::MissingField,
            format!(
                "missing field `{}` (mapped to {})",
                self.pointer, self.target
            ),
        )
    }

    fn wrong(&self, want: &str) -> EventError {
        let got = self.value.map_or_else(String::new, |v| {
            let s = v.to_string();
            format!(", got {}", s.chars().take(64).collect::<String>())
        });
        EventError::new(
            InvalidReason::InvalidField,
            format!(
                "`{}` (mapped to {}) must be {want}{got}",
                self.pointer, self.target
            ),
        )
    }

    fn present(&self) -> Result<&Value, EventError> {
        match self.value {
            None | Some(Value::Null) => Err(self.missing()),
            Some(v) => Ok(v),
        }
    }

    /// A string, or an integer kept as its decimal string (as the native ids are).
    fn token(&self) -> Result<String, EventError> {
        match self.present()? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            _ => Err(self.wrong("a string or an integer")),
        }
    }

    /// A number, or a numeric string (what CSV-born feeds write).
    fn number(&self) -> Result<f64, EventError> {
        let v = self.present()?;
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| self.wrong("a number"))
    }

    /// An array of strings or integers, or one of them.
    fn tokens(&self) -> Result<Vec<String>, EventError> {
        match self.present()? {
            Value::Array(values) => values
                .iter()
                .map(|v| {
                    Field {
                        value: Some(v),
                        ..*self
                    }
                    .token()
                })
                .collect(),
            _ => self.token().map(|t| vec![t]),
        }
    }

    fn unsigned(&self) -> Result<u64, EventError> {
        let v = self.present()?;
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| self.wrong("a non-negative integer"))
    }

    fn time_ms(&self, format: TimeFormat) -> Result<i64, EventError> {
        let v = self.present()?;
        let ms = match (format, v) {
            (TimeFormat::Auto | TimeFormat::EpochMs, Value::Number(n)) => n.as_f64(),
            (TimeFormat::EpochS, Value::Number(n)) => n.as_f64().map(|s| s * 1000.0),
            (TimeFormat::EpochMs, Value::String(s)) => s.trim().parse::<f64>().ok(),
            (TimeFormat::EpochS, Value::String(s)) => {
                s.trim().parse::<f64>().ok().map(|s| s * 1000.0)
            }
            (TimeFormat::Auto, Value::String(s)) => {
                s.trim().parse::<f64>().ok().or_else(|| rfc3339_ms(s))
            }
            (TimeFormat::Rfc3339, Value::String(s)) => rfc3339_ms(s),
            _ => None,
        };
        let want = match format {
            TimeFormat::Auto => "epoch milliseconds or an RFC 3339 time",
            TimeFormat::EpochMs => "epoch milliseconds",
            TimeFormat::EpochS => "epoch seconds",
            TimeFormat::Rfc3339 => "an RFC 3339 time (2026-12-03T17:00:00Z)",
        };
        match ms {
            Some(ms) if ms.is_finite() && (0.0..=MAX_EVENT_TIME_MS as f64).contains(&ms) => {
                Ok(ms as i64)
            }
            _ => Err(self.wrong(want)),
        }
    }
}

/// Milliseconds of an RFC 3339 time, or of an ISO-8601 one without an offset (read as UTC).
fn rfc3339_ms(s: &str) -> Option<f64> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    use time::{OffsetDateTime, PrimitiveDateTime};
    let s = s.trim();
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(s, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(s, &Iso8601::DEFAULT).map(|t| t.assume_utc()))
        .ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as f64)
}

/// The value of one mapped field in `doc`, named for the errors.
fn field<'a>(doc: &'a Found<'_>, target: &'static str, p: &'a str) -> Field<'a> {
    Field {
        target,
        pointer: p,
        value: doc.pointer(p),
    }
}

/// [`field`] of an optional mapping: `None` when unmapped, absent or null.
fn optional<'a>(doc: &'a Found<'_>, target: &'static str, p: Option<&'a str>) -> Option<Field<'a>> {
    let f = field(doc, target, p?);
    matches!(f.value, Some(v) if !v.is_null()).then_some(f)
}

/// The values `extractor` points at in `payload`, read as `format` says.
fn document<'x>(
    extractor: &'x Extractor,
    format: PayloadFormat,
    payload: &[u8],
    registry: Option<&SchemaRegistry>,
) -> Result<Found<'x>, EventError> {
    match format {
        PayloadFormat::Json => extractor.extract(payload).map_err(not_json),
        PayloadFormat::Avro | PayloadFormat::Protobuf => {
            let registry = registry.ok_or_else(|| {
                EventError::new(InvalidReason::BadEncoding, "no schema registry configured")
            })?;
            registry
                .extract(payload, extractor)
                .map_err(|e| EventError::new(InvalidReason::BadEncoding, e))
        }
    }
}

impl Compiled {
    fn kind(&self, doc: &Found<'_>) -> Result<Kind, EventError> {
        let (pointer, values) = match &self.kind {
            CompiledKind::Fixed(k) => return Ok(*k),
            CompiledKind::Field { field, values } => (field, values),
        };
        let f = field(doc, "kind", pointer);
        let v = f.token()?;
        values.get(&v).copied().ok_or_else(|| {
            EventError::new(
                InvalidReason::UnknownType,
                format!(
                    "`{}` is {:?}, which the mapping names neither a click nor an impression",
                    pointer,
                    v.chars().take(64).collect::<String>()
                ),
            )
        })
    }

    fn decode(
        &self,
        payload: &[u8],
        registry: Option<&SchemaRegistry>,
    ) -> Result<Event, EventError> {
        let doc = document(&self.extractor, self.format, payload, registry)?;
        let event = self.read(&doc, payload)?;
        validate(&event).map_err(|e| self.name_source(e))?;
        Ok(event)
    }

    fn read(&self, doc: &Found<'_>, payload: &[u8]) -> Result<Event, EventError> {
        let kind = self.kind(doc)?;
        let event_id = match optional(doc, "event_id", self.event_id.as_deref()) {
            Some(f) => f.token()?,
            None => format!("h{:016x}", crate::hash::stable_hash(payload)),
        };
        let user_id = field(doc, "user_id", &self.user_id).token()?;
        let item_id = field(doc, "item_id", &self.item_id).token()?;
        let event_time_ms = field(doc, "event_time", &self.event_time).time_ms(self.time_format)?;
        let impression_id = optional(doc, "impression_id", self.impression_id.as_deref())
            .map(|f| f.token())
            .transpose()?;
        Ok(match kind {
            Kind::Click => Event::Click(Click {
                event_id,
                event_time_ms,
                user_id: user_id.as_str().into(),
                item_id: item_id.as_str().into(),
                impression_id,
                dwell_ms: optional(doc, "dwell_ms", self.dwell_ms.as_deref())
                    .map(|f| f.unsigned())
                    .transpose()?,
            }),
            Kind::Impression => Event::Impression(Impression {
                impression_id: impression_id.unwrap_or_else(|| event_id.clone()),
                request_id: match optional(doc, "request_id", self.request_id.as_deref()) {
                    Some(f) => f.token()?,
                    None => format!("{user_id}@{event_time_ms}"),
                },
                position: match optional(doc, "position", self.position.as_deref()) {
                    Some(f) => {
                        let p = f.unsigned()?;
                        u32::try_from(p).map_err(|_| f.wrong("a slot number"))?
                    }
                    None => 0,
                },
                surface: optional(doc, "surface", self.surface.as_deref())
                    .map(|f| f.token())
                    .transpose()?,
                event_id,
                event_time_ms,
                user_id: user_id.as_str().into(),
                item_id: item_id.as_str().into(),
            }),
        })
    }

    /// A check of the native schema names towerstream's field; say where it came from.
    fn name_source(&self, mut e: EventError) -> EventError {
        let sources = [
            ("event_id", &self.event_id),
            ("user_id", &Some(self.user_id.clone())),
            ("item_id", &Some(self.item_id.clone())),
            ("impression_id", &self.impression_id),
            ("request_id", &self.request_id),
            ("position", &self.position),
            ("dwell_ms", &self.dwell_ms),
            ("surface", &self.surface),
        ];
        for (target, pointer) in sources {
            if let (true, Some(p)) = (e.detail.starts_with(&format!("`{target}`")), pointer) {
                e.detail = format!("{} (mapped from `{p}`)", e.detail);
                break;
            }
        }
        e
    }
}

fn not_json(e: ExtractError) -> EventError {
    match e {
        ExtractError::Json(e) => EventError::new(InvalidReason::BadJson, e.to_string()),
        ExtractError::NotAnObject => {
            EventError::new(InvalidReason::BadJson, "the payload is not a JSON object")
        }
    }
}

/// The text of a scalar (strings as they are, other values as JSON writes them).
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl CompiledTable {
    fn decode(
        &self,
        payload: &[u8],
        record_time_ms: Option<i64>,
        registry: Option<&SchemaRegistry>,
    ) -> Result<Event, EventError> {
        let doc = document(&self.extractor, self.format, payload, registry)?;
        let target = match self.table {
            Table::Items => "item_id",
            Table::Users => "user_id",
        };
        let id = field(&doc, target, &self.id).token()?;
        let event_id = match optional(&doc, "event_id", self.event_id.as_deref()) {
            Some(f) => f.token()?,
            None => format!("h{:016x}", crate::hash::stable_hash(payload)),
        };
        let event_time_ms = match optional(&doc, "event_time", self.event_time.as_deref()) {
            Some(f) => f.time_ms(self.time_format)?,
            None => record_time_ms.unwrap_or(0).max(0),
        };
        let deleted = self.deleted.as_ref().is_some_and(|(p, values)| {
            doc.pointer(p)
                .is_some_and(|v| values.contains(&scalar_text(v)))
        });
        let op = if deleted { Op::Delete } else { Op::Upsert };
        let mut text: HashMap<&str, String> = HashMap::new();
        for (target, p) in &self.text {
            if let Some(f) = optional(&doc, target, Some(p)) {
                text.insert(target, f.token()?);
            }
        }
        let mut dense = Dense::new();
        for (name, p) in &self.dense {
            let f = field(&doc, "dense", p);
            if matches!(f.value, Some(v) if !v.is_null()) {
                dense.insert(name.clone(), f.number()?);
            }
        }
        let event = match self.table {
            Table::Items => Event::Item(ItemEvent {
                event_id,
                event_time_ms,
                item_id: id.as_str().into(),
                op,
                title: text.remove("title"),
                category: text.remove("category"),
                genres: match optional(&doc, "genres", self.genres.as_deref()) {
                    Some(f) => f.tokens()?,
                    None => Vec::new(),
                },
                dense,
            }),
            Table::Users => Event::User(UserEvent {
                event_id,
                event_time_ms,
                user_id: id.as_str().into(),
                op,
                gender: text.remove("gender"),
                age: match optional(&doc, "age", self.age.as_deref()) {
                    Some(f) => {
                        let a = f.unsigned()?;
                        Some(u8::try_from(a).map_err(|_| f.wrong("an age in years"))?)
                    }
                    None => None,
                },
                occupation: text.remove("occupation"),
                zip: text.remove("zip"),
                dense,
            }),
        };
        validate(&event).map_err(|mut e| {
            if let Some(name) = e.detail.strip_prefix("`dense.") {
                let name = name.split('`').next().unwrap_or_default();
                if let Some((_, p)) = self.dense.iter().find(|(n, _)| n == name) {
                    e.detail = format!("{} (mapped from `{p}`)", e.detail);
                }
            } else if e.detail.starts_with(&format!("`{target}`")) {
                e.detail = format!("{} (mapped from `{}`)", e.detail, self.id);
            }
            e
        })?;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> MappingConfig {
        let toml = r#"
            [default]
            kind = { field = "/action", click = ["click", "tap"], impression = ["view"] }
            event_id = "/meta/id"
            user_id = "/user/id"
            item_id = "/item/sku"
            event_time = "/ts"
            time_format = "rfc3339"
            impression_id = "/meta/impression"
            position = "/slot"
            dwell_ms = "/dwell"
        "#;
        from_toml(toml)
    }

    fn from_toml(toml: &str) -> MappingConfig {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap()
    }

    fn decode(m: &MappingConfig, json: &str) -> Result<Event, EventError> {
        Decoder::new(m, &["shop".into()], 4096)
            .unwrap()
            .decode(0, json.as_bytes())
    }

    #[test]
    fn a_nested_event_with_an_action_field_and_iso_times_maps_to_the_native_one() {
        let m = shop();
        let click = r#"{"action": "tap", "meta": {"id": "e1", "impression": "imp9"},
            "user": {"id": 42}, "item": {"sku": "A-7"}, "ts": "2026-12-03T17:00:00.250Z",
            "dwell": 1200}"#;
        let Event::Click(c) = decode(&m, click).unwrap() else {
            panic!("not a click")
        };
        assert_eq!((c.event_id.as_str(), c.user_id.as_str()), ("e1", "42"));
        assert_eq!(c.item_id.as_str(), "A-7");
        assert_eq!(c.event_time_ms, 1_796_317_200_250);
        assert_eq!(c.impression_id.as_deref(), Some("imp9"));
        assert_eq!(c.dwell_ms, Some(1200));
        let view = r#"{"action": "view", "meta": {"id": "e2", "impression": "imp9"},
            "user": {"id": 42}, "item": {"sku": "A-7"}, "ts": "2026-12-03T18:00:00+01:00",
            "slot": 3}"#;
        let Event::Impression(i) = decode(&m, view).unwrap() else {
            panic!("not an impression")
        };
        assert_eq!((i.impression_id.as_str(), i.position), ("imp9", 3));
        assert_eq!(i.event_time_ms, 1_796_317_200_000);
        assert_eq!(i.request_id, "42@1796317200000");
    }

    #[test]
    fn missing_mistyped_and_unmapped_values_are_rejected_naming_the_users_field() {
        let m = shop();
        let e = decode(
            &m,
            r#"{"action": "tap", "user": {}, "item": {"sku": 1}, "ts": "x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, InvalidReason::MissingField);
        assert!(e.detail.contains("`/user/id`"), "{e}");
        let e = decode(
            &m,
            r#"{"action": "tap", "user": {"id": true}, "item": {"sku": 1}, "ts": "x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, InvalidReason::InvalidField);
        assert!(e.detail.contains("`/user/id` (mapped to user_id)"), "{e}");
        let e = decode(
            &m,
            r#"{"action": "tap", "user": {"id": 1}, "item": {"sku": 1}, "ts": "yesterday"}"#,
        )
        .unwrap_err();
        assert!(
            e.detail.contains("`/ts`") && e.detail.contains("RFC 3339"),
            "{e}"
        );
        let e = decode(&m, r#"{"action": "buy", "user": {"id": 1}}"#).unwrap_err();
        assert_eq!(e.reason, InvalidReason::UnknownType);
        assert!(e.detail.contains("\"buy\""), "{e}");
        // The native checks run too, and say where the value came from.
        let long = "x".repeat(300);
        let e = decode(
            &m,
            &format!(
                r#"{{"action": "tap", "user": {{"id": "{long}"}}, "item": {{"sku": 1}},
                "ts": "2026-01-01T00:00:00Z"}}"#
            ),
        )
        .unwrap_err();
        assert!(e.detail.contains("mapped from `/user/id`"), "{e}");
    }

    #[test]
    fn the_event_id_is_derived_from_the_payload_when_the_events_have_none() {
        let mut m = shop();
        if let Some(d) = m.default.as_mut() {
            d.event_id = None;
            d.time_format = Some(TimeFormat::EpochS);
        }
        let a = r#"{"action": "tap", "user": {"id": 1}, "item": {"sku": 2}, "ts": 1796317200.5}"#;
        let b = r#"{"action": "tap", "user": {"id": 1}, "item": {"sku": 3}, "ts": 1796317200.5}"#;
        let (ea, eb) = (decode(&m, a).unwrap(), decode(&m, b).unwrap());
        assert_eq!(ea.event_time_ms(), 1_796_317_200_500);
        assert_eq!(ea.event_id(), decode(&m, a).unwrap().event_id());
        assert_ne!(ea.event_id(), eb.event_id());
    }

    #[test]
    fn topic_mappings_override_the_default_and_unmapped_topics_stay_native() {
        let mut m = shop();
        m.topics.insert(
            "clicks".into(),
            FieldMap {
                kind: Some(KindRule::Fixed("click".into())),
                ..FieldMap::default()
            },
        );
        let mut native = m.clone();
        native.default = None;
        let topics = ["clicks".to_string(), "native".to_string()];
        let d = Decoder::new(&native, &topics, 4096);
        // Without a default, the topic's own mapping must name every required field.
        let err = d.unwrap_err().to_string();
        assert!(err.contains("mapping.topics.\"clicks\".user_id"), "{err}");
        let d = Decoder::new(&m, &topics, 4096).unwrap();
        let e = d
            .decode(
                0,
                br#"{"user": {"id": 1}, "item": {"sku": 2}, "ts": "2026-01-01T00:00:00Z"}"#,
            )
            .unwrap();
        assert_eq!(e.kind(), "click");
        assert!(d.is_mapped(1), "the default applies to every other topic");
        let native_only = Decoder::new(&MappingConfig::default(), &topics, 4096).unwrap();
        assert!(!native_only.is_mapped(0));
        assert!(native_only.decode(0, br#"{"type": "click"}"#).is_err());
    }

    #[test]
    fn mappings_that_cannot_work_name_the_key() {
        let cases: [(&str, &str); 5] = [
            ("[default]\nkind = \"purchase\"", "mapping.default.kind"),
            (
                "[default]\nkind = { field = \"/a\", click = [\"x\"], impression = [\"x\"] }",
                "mapping.default.kind",
            ),
            (
                "[default]\nkind = \"click\"\nuser_id = \"user\"\nitem_id = \"/i\"\nevent_time = \"/t\"",
                "mapping.default.user_id",
            ),
            (
                "[default]\nkind = \"click\"\nuser_id = \"/u\"\nevent_time = \"/t\"",
                "mapping.default.item_id",
            ),
            ("[topics.elsewhere]\nkind = \"click\"", "mapping.topics.\"elsewhere\""),
        ];
        for (toml, key) in cases {
            let m = from_toml(toml);
            let err = Decoder::new(&m, &["shop".into()], 4096).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{toml}: {err}"
            );
        }
    }

    #[test]
    fn catalogue_and_profile_feeds_map_to_item_and_user_events() {
        let m = from_toml(
            r#"
            [items]
            id = "/sku"
            event_time = "/updated_at"
            title = "/name"
            category = "/taxonomy/0"
            genres = "/tags"
            deleted = { field = "/status", values = ["archived", "deleted"] }
            dense = { price = "/price/amount" }
            [users]
            id = "/customer_id"
            age = "/profile/age"
            zip = "/address/postcode"
        "#,
        );
        let d = Decoder::new(&m, &["shop".into()], 4096).unwrap();
        let item = br#"{"sku": "A-1", "updated_at": "2026-12-03T17:00:00Z", "name": "Mug",
            "taxonomy": ["kitchen", "mugs"], "tags": ["gift", 7], "price": {"amount": "12.5"},
            "status": "active"}"#;
        let Event::Item(i) = d.decode_table(Table::Items, item, Some(5)).unwrap() else {
            panic!("not an item")
        };
        assert_eq!((i.item_id.as_str(), i.op), ("A-1", Op::Upsert));
        assert_eq!(i.event_time_ms, 1_796_317_200_000);
        assert_eq!(
            (i.title.as_deref(), i.category.as_deref()),
            (Some("Mug"), Some("kitchen"))
        );
        assert_eq!(i.genres, vec!["gift", "7"]);
        assert_eq!(i.dense.get("price"), Some(&12.5));
        let gone = br#"{"sku": "A-1", "updated_at": "2026-12-04T00:00:00Z", "status": "archived"}"#;
        let Event::Item(g) = d.decode_table(Table::Items, gone, None).unwrap() else {
            panic!("not an item")
        };
        assert_eq!(g.op, Op::Delete);
        // Without a mapped update time, the record's timestamp orders the updates.
        let user =
            br#"{"customer_id": 9, "profile": {"age": 31}, "address": {"postcode": "10115"}}"#;
        let Event::User(u) = d.decode_table(Table::Users, user, Some(1234)).unwrap() else {
            panic!("not a user")
        };
        assert_eq!(
            (u.user_id.as_str(), u.age, u.event_time_ms),
            ("9", Some(31), 1234)
        );
        assert_eq!(u.zip.as_deref(), Some("10115"));
        // A price beyond what f32 holds is refused, naming the shop's field.
        let huge = br#"{"sku": "A-2", "updated_at": 1, "price": {"amount": 1e308}}"#;
        let e = d.decode_table(Table::Items, huge, None).unwrap_err();
        assert_eq!(e.reason, InvalidReason::InvalidField);
        assert!(e.detail.contains("mapped from `/price/amount`"), "{e}");
        let e = d
            .decode_table(Table::Users, br#"{"profile": {"age": 31}}"#, None)
            .unwrap_err();
        assert!(
            e.detail.contains("`/customer_id` (mapped to user_id)"),
            "{e}"
        );
        // Unmapped tables stay native.
        let native = Decoder::new(&MappingConfig::default(), &["shop".into()], 4096).unwrap();
        assert!(native.decode_table(Table::Items, item, None).is_err());
    }

    #[test]
    fn table_mappings_that_cannot_work_name_the_key() {
        for (toml, key) in [
            ("[items]\ntitle = \"/t\"", "mapping.items.id"),
            ("[items]\nid = \"/i\"\nage = \"/a\"", "mapping.items.age"),
            (
                "[users]\nid = \"/i\"\ngenres = \"/g\"",
                "mapping.users.genres",
            ),
            (
                "[users]\nid = \"/i\"\ndense = { x = \"x\" }",
                "mapping.users.dense.x",
            ),
            (
                "[items]\nid = \"/i\"\ndeleted = { field = \"/s\", values = [] }",
                "mapping.items.deleted.values",
            ),
        ] {
            let err = Decoder::new(&from_toml(toml), &["shop".into()], 4096).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{toml}: {err}"
            );
        }
    }
}
