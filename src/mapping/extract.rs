//! One pass over a JSON payload that keeps only the values a mapping points at.
//!
//! Parsing a whole event into a `serde_json::Value` allocates every key and string of it,
//! wanted or not, and made mapped decoding twice as slow as the native schema (`cargo bench
//! --bench ingest`). The [`Extractor`] instead walks the document once with a tree of the
//! wanted paths: subtrees nobody points into are skipped without allocating, and only the
//! values at the pointers are materialised.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::binary::{walk_proto, AvroSchema, ProtoWalk};

/// The wanted pointers as a tree of their (unescaped) segments.
#[derive(Debug, Clone, Default)]
pub(super) struct Node {
    /// The segments below this one that some pointer goes on with.
    pub(super) children: HashMap<String, Node>,
    /// Index of the pointer ending here.
    pub(super) slot: Option<usize>,
}

/// Reads the values at a fixed set of JSON Pointers from payloads.
#[derive(Debug, Clone, Default)]
pub struct Extractor {
    root: Node,
    pointers: Vec<String>,
    /// Some pointer is a prefix of another (`/a` and `/a/b`): the walk cannot both keep and
    /// descend into one value, so such mappings parse the whole document instead.
    whole: bool,
}

/// The values found, by pointer.
#[derive(Debug)]
pub struct Found<'a> {
    pointers: &'a [String],
    values: Vec<Option<Value>>,
}

impl Found<'_> {
    /// The value at `pointer` (one the extractor was built with), if the payload has it.
    pub fn pointer(&self, pointer: &str) -> Option<&Value> {
        let i = self.pointers.iter().position(|p| p == pointer)?;
        self.values.get(i)?.as_ref()
    }
}

/// A payload that is not a JSON object, or not JSON.
#[derive(Debug)]
pub enum ExtractError {
    /// Broken JSON.
    Json(serde_json::Error),
    /// JSON, but not an object.
    NotAnObject,
}

fn segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

impl Extractor {
    /// An extractor of `pointers` (RFC 6901, each empty or starting with `/`).
    pub fn new<'p>(pointers: impl IntoIterator<Item = &'p str>) -> Extractor {
        let mut x = Extractor::default();
        for p in pointers {
            if x.pointers.iter().any(|q| q == p) {
                continue;
            }
            let slot = x.pointers.len();
            x.pointers.push(p.to_owned());
            let mut node = &mut x.root;
            for s in segments(p) {
                x.whole |= node.slot.is_some();
                node = node.children.entry(s).or_default();
            }
            x.whole |= !node.children.is_empty();
            node.slot = Some(slot);
        }
        x
    }

    /// The values at the pointers in an Avro `datum` of `schema`, read in one walk that
    /// materialises only them.
    pub fn found_in_avro(&self, schema: &AvroSchema, datum: &[u8]) -> Result<Found<'_>, String> {
        let values = if self.whole {
            let doc = schema.read_whole(datum)?;
            self.pointers
                .iter()
                .map(|p| doc.pointer(p).cloned())
                .collect()
        } else {
            let mut values = vec![None; self.pointers.len()];
            schema.walk(&self.root, datum, &mut values)?;
            values
        };
        Ok(Found {
            pointers: &self.pointers,
            values,
        })
    }

    /// The values at the pointers in a Protobuf message of type `desc`: one walk over its
    /// fields, or the whole message decoded when a pointer goes into a map or a list element
    /// (or into a value another pointer keeps).
    pub fn found_in_proto(
        &self,
        desc: &prost_reflect::MessageDescriptor,
        bytes: &[u8],
    ) -> Result<Found<'_>, String> {
        if !self.whole {
            let mut values = vec![None; self.pointers.len()];
            if let ProtoWalk::Done = walk_proto(desc, &self.root, bytes, &mut values)? {
                return Ok(Found {
                    pointers: &self.pointers,
                    values,
                });
            }
        }
        let msg = prost_reflect::DynamicMessage::decode(desc.clone(), bytes)
            .map_err(|e| e.to_string())?;
        Ok(Found {
            pointers: &self.pointers,
            values: self
                .pointers
                .iter()
                .map(|p| proto_at(&msg, &segments(p)))
                .collect(),
        })
    }

    /// The values at the pointers in `payload`.
    pub fn extract(&self, payload: &[u8]) -> Result<Found<'_>, ExtractError> {
        let mut values = vec![None; self.pointers.len()];
        if self.whole || self.root.slot.is_some() {
            let doc: Value = serde_json::from_slice(payload).map_err(ExtractError::Json)?;
            if !doc.is_object() {
                return Err(ExtractError::NotAnObject);
            }
            for (v, p) in values.iter_mut().zip(&self.pointers) {
                *v = doc.pointer(p).cloned();
            }
        } else {
            let mut de = serde_json::Deserializer::from_slice(payload);
            let seed = Walk {
                node: &self.root,
                values: &mut values,
                root: true,
            };
            match seed.deserialize(&mut de) {
                Ok(true) => {}
                Ok(false) => return Err(ExtractError::NotAnObject),
                Err(e) => return Err(ExtractError::Json(e)),
            }
            de.end().map_err(ExtractError::Json)?;
        }
        Ok(Found {
            pointers: &self.pointers,
            values,
        })
    }
}

/// The value at `path` in a Protobuf message as JSON; unset fields are absent.
fn proto_at(msg: &prost_reflect::DynamicMessage, path: &[String]) -> Option<Value> {
    use prost_reflect::{ReflectMessage, Value as P};
    let (first, rest) = path.split_first()?;
    let fd = msg.descriptor().get_field_by_name(first)?;
    // A proto3 scalar without `optional` has no presence: 0 and "" are its values, not
    // absences (user 0 exists); fields with presence that are unset are absent.
    if fd.supports_presence() && !msg.has_field(&fd) {
        return None;
    }
    let field = msg.get_field(&fd);
    let mut at: &P = &field;
    let mut rest = rest;
    loop {
        match (at, rest.split_first()) {
            (P::Message(m), Some(_)) => return proto_at(m, rest),
            (P::List(items), Some((i, more))) => {
                at = items.get(i.parse::<usize>().ok()?)?;
                rest = more;
            }
            (P::Map(m), Some((k, more))) => {
                at = m.get(&prost_reflect::MapKey::String(k.clone()))?;
                rest = more;
            }
            (_, Some(_)) => return None,
            (leaf, None) => return proto_json(leaf),
        }
    }
}

/// A Protobuf value as JSON; `None` for what a mapping cannot use (bytes, maps, messages other
/// than a Timestamp, non-finite numbers).
pub(super) fn proto_json(v: &prost_reflect::Value) -> Option<Value> {
    use prost_reflect::{ReflectMessage, Value as P};
    Some(match v {
        P::Bool(b) => Value::Bool(*b),
        P::I32(i) => Value::from(*i),
        P::I64(i) => Value::from(*i),
        P::U32(i) => Value::from(*i),
        P::U64(i) => Value::from(*i),
        P::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map(Value::Number)?,
        P::F64(f) => serde_json::Number::from_f64(*f).map(Value::Number)?,
        P::String(s) => Value::String(s.clone()),
        P::EnumNumber(n) => Value::from(*n),
        P::List(items) => Value::Array(items.iter().filter_map(proto_json).collect()),
        // A google.protobuf.Timestamp reads as epoch milliseconds, like Avro's timestamp-millis.
        P::Message(m) if m.descriptor().full_name() == "google.protobuf.Timestamp" => {
            let secs = m.get_field_by_name("seconds")?.as_i64()?;
            let nanos = m.get_field_by_name("nanos")?.as_i32()?;
            Value::from(secs * 1000 + i64::from(nanos) / 1_000_000)
        }
        P::Bytes(_) | P::Map(_) | P::Message(_) => return None,
    })
}

/// Walks one value at `node`; returns false for a root that is not an object.
struct Walk<'a> {
    node: &'a Node,
    values: &'a mut Vec<Option<Value>>,
    root: bool,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        match self.node.slot {
            // A leaf: keep the value as it is (a scalar, or an array of genres).
            Some(slot) => {
                let v = Value::deserialize(d)?;
                if let Some(cell) = self.values.get_mut(slot) {
                    *cell = Some(v);
                }
                Ok(true)
            }
            None => d.deserialize_any(self),
        }
    }
}

/// A key, borrowed from the payload unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match self.node.children.get(key.as_ref()) {
                Some(child) => {
                    map.next_value_seed(Walk {
                        node: child,
                        values: &mut *self.values,
                        root: false,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        if self.root {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(false);
        }
        let mut i = 0usize;
        loop {
            let more = match self.node.children.get(i.to_string().as_str()) {
                Some(child) => seq
                    .next_element_seed(Walk {
                        node: child,
                        values: &mut *self.values,
                        root: false,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(true);
            }
            i += 1;
        }
    }

    // Scalars where an object was expected: nothing below them is found. At the root, the
    // payload is not an object.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(!self.root)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(!self.root)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(!self.root)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(!self.root)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(!self.root)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(!self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_finds_what_json_pointer_finds() {
        let doc = br#"{"a": {"b": [10, {"c": "x"}], "skip": {"deep": [1, 2, {"z": null}]}},
            "t~/s": 5, "genres": ["g1", "g2"], "n": null, "esc\u0041pe": 1}"#;
        let pointers = [
            "/a/b/0", "/a/b/1/c", "/t~0~1s", "/genres", "/n", "/missing", "/a/b/7", "/escApe",
        ];
        let x = Extractor::new(pointers);
        assert!(!x.whole);
        let found = x.extract(doc).unwrap();
        let full: Value = serde_json::from_slice(doc).unwrap();
        for p in pointers {
            assert_eq!(found.pointer(p), full.pointer(p), "{p}");
        }
        assert!(matches!(
            x.extract(b"[1, 2]"),
            Err(ExtractError::NotAnObject)
        ));
        assert!(matches!(x.extract(b"7"), Err(ExtractError::NotAnObject)));
        assert!(matches!(x.extract(b"{\"a\": "), Err(ExtractError::Json(_))));
        assert!(matches!(
            x.extract(b"{} trailing"),
            Err(ExtractError::Json(_))
        ));
        // A pointer below another: the whole document is read, with the same answers.
        let nested = Extractor::new(["/a/b", "/a/b/1/c"]);
        assert!(nested.whole);
        let found = nested.extract(doc).unwrap();
        assert_eq!(found.pointer("/a/b/1/c"), full.pointer("/a/b/1/c"));
        assert_eq!(found.pointer("/a/b"), full.pointer("/a/b"));
    }
}
