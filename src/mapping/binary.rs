//! Avro and Protobuf records walked once with the mapping's pointer tree, the binary
//! counterpart of the JSON [`Extractor`](super::extract::Extractor) walk.
//!
//! Decoding a whole record first (`apache_avro::from_avro_datum` into a `Value` tree with an
//! owned name per field, `prost_reflect::DynamicMessage` with a map of fields) and then
//! following the pointers cost Avro 1.8× and Protobuf 2.3× the native JSON path (`cargo bench
//! --bench ingest`). These walkers read the datum in its schema's order and materialise only
//! the values a pointer names; everything else is skipped by its length, still checked for
//! being well-formed (a truncated record is an error, as before).
//!
//! Values read as the whole-record decoding read them: unions unwrapped, enums as their
//! symbol (Avro) or number (Protobuf), logical Avro types as their underlying numbers,
//! `google.protobuf.Timestamp` as epoch milliseconds, proto3 scalars without presence as their
//! default when absent. The Protobuf walk leaves descents into map entries or list elements to
//! the full decoding (it answers [`ProtoWalk::Unsupported`]).

use apache_avro::schema::{Name, Namespace, Schema};
use serde_json::{Map, Number, Value};

use super::extract::Node;

/// What an Avro datum failed on.
type Result<T> = std::result::Result<T, String>;

/// An Avro schema with its named types, so that references resolve without a lookup in the
/// whole schema per record.
#[derive(Debug)]
pub struct AvroSchema {
    /// The writer's schema.
    pub schema: Schema,
    names: std::collections::HashMap<Name, Schema>,
}

impl AvroSchema {
    /// `schema` with its named types resolved; `Err` when a reference names no type.
    pub fn new(schema: Schema) -> Result<AvroSchema> {
        let names = apache_avro::schema::ResolvedSchema::try_from(&schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        Ok(AvroSchema { schema, names })
    }

    /// Fills `values` (by the nodes' slots) from `datum`, which must hold exactly one datum.
    pub(super) fn walk(
        &self,
        root: &Node,
        datum: &[u8],
        values: &mut [Option<Value>],
    ) -> Result<()> {
        let mut buf = datum;
        self.visit(&self.schema, &None, root, &mut buf, values)?;
        if !buf.is_empty() {
            return Err(format!("{} bytes after the datum", buf.len()));
        }
        Ok(())
    }

    /// The whole datum as JSON (mappings whose pointers nest inside one another).
    pub(super) fn read_whole(&self, datum: &[u8]) -> Result<Value> {
        let mut buf = datum;
        let v = self.read(&self.schema, &None, &mut buf)?;
        if !buf.is_empty() {
            return Err(format!("{} bytes after the datum", buf.len()));
        }
        Ok(v)
    }

    fn resolve<'s>(&'s self, name: &Name, ns: &Namespace) -> Result<(&'s Schema, Namespace)> {
        let full = name.fully_qualified_name(ns);
        let schema = self
            .names
            .get(&full)
            .ok_or_else(|| format!("the schema names an unknown type {}", full.name))?;
        Ok((schema, full.namespace))
    }

    /// Reads the value of `schema` at `node`: kept when a pointer ends here, walked into when
    /// pointers go deeper, skipped otherwise.
    fn visit(
        &self,
        schema: &Schema,
        ns: &Namespace,
        node: &Node,
        buf: &mut &[u8],
        values: &mut [Option<Value>],
    ) -> Result<()> {
        if let Some(slot) = node.slot {
            let v = self.read(schema, ns, buf)?;
            if let Some(cell) = values.get_mut(slot) {
                *cell = Some(v);
            }
            return Ok(());
        }
        if node.children.is_empty() {
            return self.skip(schema, ns, buf);
        }
        match schema {
            Schema::Union(u) => {
                let variant = union_variant(u.variants(), buf)?;
                self.visit(variant, ns, node, buf, values)
            }
            Schema::Record(r) => {
                let inner = r.name.fully_qualified_name(ns).namespace;
                for f in &r.fields {
                    match node.children.get(&f.name) {
                        Some(child) => self.visit(&f.schema, &inner, child, buf, values)?,
                        None => self.skip(&f.schema, &inner, buf)?,
                    }
                }
                Ok(())
            }
            Schema::Map(m) => blocks(buf, |buf| {
                let key = string(buf)?;
                match node.children.get(key) {
                    Some(child) => self.visit(&m.types, ns, child, buf, values),
                    None => self.skip(&m.types, ns, buf),
                }
            }),
            Schema::Array(a) => {
                let mut i = 0usize;
                blocks(buf, |buf| {
                    let child = node.children.get(i.to_string().as_str());
                    i += 1;
                    match child {
                        Some(child) => self.visit(&a.items, ns, child, buf, values),
                        None => self.skip(&a.items, ns, buf),
                    }
                })
            }
            Schema::Ref { name } => {
                let (schema, inner) = self.resolve(name, ns)?;
                self.visit(schema, &inner, node, buf, values)
            }
            // A scalar where the pointers go deeper: nothing below it is found.
            other => self.skip(other, ns, buf),
        }
    }

    /// Reads one value of `schema` as JSON.
    fn read(&self, schema: &Schema, ns: &Namespace, buf: &mut &[u8]) -> Result<Value> {
        Ok(match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Bool(take(buf, 1)?[0] != 0),
            s if is_integer(s) => Value::from(long(buf)?),
            // Non-finite numbers have no JSON form: absent, as the whole-record path read them.
            Schema::Float => {
                let b = take(buf, 4)?;
                let f = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
            }
            Schema::Double => {
                let b = take(buf, 8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Number::from_f64(f64::from_le_bytes(a)).map_or(Value::Null, Value::Number)
            }
            Schema::String => Value::String(string(buf)?.to_owned()),
            Schema::Enum(e) => {
                let i = long(buf)?;
                let symbol = usize::try_from(i).ok().and_then(|i| e.symbols.get(i));
                Value::String(
                    symbol
                        .ok_or_else(|| format!("enum index {i} out of range"))?
                        .clone(),
                )
            }
            Schema::Union(u) => {
                let variant = union_variant(u.variants(), buf)?;
                self.read(variant, ns, buf)?
            }
            Schema::Record(r) => {
                let inner = r.name.fully_qualified_name(ns).namespace;
                let mut obj = Map::new();
                for f in &r.fields {
                    obj.insert(f.name.clone(), self.read(&f.schema, &inner, buf)?);
                }
                Value::Object(obj)
            }
            Schema::Array(a) => {
                let mut items = Vec::new();
                blocks(buf, |buf| {
                    items.push(self.read(&a.items, ns, buf)?);
                    Ok(())
                })?;
                Value::Array(items)
            }
            Schema::Map(m) => {
                let mut obj = Map::new();
                blocks(buf, |buf| {
                    let key = string(buf)?.to_owned();
                    obj.insert(key, self.read(&m.types, ns, buf)?);
                    Ok(())
                })?;
                Value::Object(obj)
            }
            Schema::Ref { name } => {
                let (schema, inner) = self.resolve(name, ns)?;
                self.read(schema, &inner, buf)?
            }
            // Bytes-like values (bytes, fixed, decimals, uuid, duration) are rare in events:
            // the library decodes them and converts them as it always did.
            other => {
                let start = *buf;
                self.skip(other, ns, buf)?;
                let used = &start[..start.len() - buf.len()];
                let v = apache_avro::from_avro_datum(other, &mut &used[..], None)
                    .map_err(|e| e.to_string())?;
                Value::try_from(v).unwrap_or(Value::Null)
            }
        })
    }

    /// Moves past one value of `schema`.
    fn skip(&self, schema: &Schema, ns: &Namespace, buf: &mut &[u8]) -> Result<()> {
        match schema {
            Schema::Null => {}
            Schema::Boolean => {
                take(buf, 1)?;
            }
            Schema::Float => {
                take(buf, 4)?;
            }
            Schema::Double => {
                take(buf, 8)?;
            }
            Schema::Duration => {
                take(buf, 12)?;
            }
            Schema::Fixed(f) => {
                take(buf, f.size)?;
            }
            Schema::String => {
                string(buf)?;
            }
            Schema::Bytes | Schema::BigDecimal | Schema::Uuid => {
                let n = length(buf)?;
                take(buf, n)?;
            }
            Schema::Decimal(d) => self.skip(&d.inner, ns, buf)?,
            Schema::Union(u) => {
                let variant = union_variant(u.variants(), buf)?;
                self.skip(variant, ns, buf)?;
            }
            Schema::Record(r) => {
                let inner = r.name.fully_qualified_name(ns).namespace;
                for f in &r.fields {
                    self.skip(&f.schema, &inner, buf)?;
                }
            }
            Schema::Array(a) => blocks(buf, |buf| self.skip(&a.items, ns, buf))?,
            Schema::Map(m) => blocks(buf, |buf| {
                string(buf)?;
                self.skip(&m.types, ns, buf)
            })?,
            Schema::Ref { name } => {
                let (schema, inner) = self.resolve(name, ns)?;
                self.skip(schema, &inner, buf)?;
            }
            // What is left is an `int` or `long` on the wire: numbers, logical dates and
            // times, enum indexes.
            other => {
                debug_assert!(is_integer(other) || matches!(other, Schema::Enum(_)));
                long(buf)?;
            }
        }
        Ok(())
    }
}

/// Whether values of `schema` are an `int` or `long` on the wire (logical dates and times
/// included), read as that number.
fn is_integer(schema: &Schema) -> bool {
    matches!(
        schema,
        Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
    )
}

/// The first `n` bytes of `buf` (consumed).
fn take<'b>(buf: &mut &'b [u8], n: usize) -> Result<&'b [u8]> {
    if buf.len() < n {
        return Err("the datum ends early".into());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// An Avro `int` or `long` (zig-zag varint).
fn long(buf: &mut &[u8]) -> Result<i64> {
    varint(buf).map(unzigzag)
}

/// The signed value of a zig-zag encoded varint (Avro's ints and longs, Protobuf's sint).
pub(super) fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// A non-negative length.
fn length(buf: &mut &[u8]) -> Result<usize> {
    let n = long(buf)?;
    usize::try_from(n).map_err(|_| format!("negative length {n}"))
}

/// An Avro `string`, borrowed.
fn string<'b>(buf: &mut &'b [u8]) -> Result<&'b str> {
    let n = length(buf)?;
    std::str::from_utf8(take(buf, n)?).map_err(|_| "a string that is not UTF-8".to_owned())
}

fn union_variant<'s>(variants: &'s [Schema], buf: &mut &[u8]) -> Result<&'s Schema> {
    let i = long(buf)?;
    usize::try_from(i)
        .ok()
        .and_then(|i| variants.get(i))
        .ok_or_else(|| format!("union branch {i} of {}", variants.len()))
}

/// The items of an array or map: blocks of a count (negative: followed by the block's byte
/// size) until a count of 0; `item` reads one.
fn blocks(buf: &mut &[u8], mut item: impl FnMut(&mut &[u8]) -> Result<()>) -> Result<()> {
    loop {
        let count = long(buf)?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            length(buf)?;
        }
        for _ in 0..count.unsigned_abs() {
            item(buf)?;
        }
    }
}

/// What the Protobuf walk made of a message.
#[derive(Debug)]
pub(super) enum ProtoWalk {
    /// The values are filled in.
    Done,
    /// A pointer descends into a map entry or a list element: decode the whole message.
    Unsupported,
}

/// Fills `values` from the Protobuf message `bytes` of type `desc`, reading only the fields
/// `node`'s pointers name.
pub(super) fn walk_proto(
    desc: &prost_reflect::MessageDescriptor,
    node: &Node,
    bytes: &[u8],
    values: &mut [Option<Value>],
) -> Result<ProtoWalk> {
    let mut buf = bytes;
    // Field numbers met, to give the pointed fields without presence their defaults.
    let mut seen: Vec<u32> = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (number, wire) = (
            u32::try_from(key >> 3).map_err(|_| "bad field number")?,
            (key & 7) as u8,
        );
        let field = desc.get_field(number);
        let child = field.as_ref().and_then(|f| node.children.get(f.name()));
        let (Some(fd), Some(child)) = (field, child) else {
            skip_wire(&mut buf, wire)?;
            continue;
        };
        if fd.is_map() || (fd.is_list() && !child.children.is_empty()) {
            return Ok(ProtoWalk::Unsupported);
        }
        seen.push(number);
        if let Some(slot) = child.slot {
            let cell = values.get_mut(slot).ok_or("slot out of range")?;
            read_field(&fd, wire, &mut buf, cell)?;
        } else if let prost_reflect::Kind::Message(m) = fd.kind() {
            let inner = len_delimited(&mut buf, wire)?;
            if let ProtoWalk::Unsupported = walk_proto(&m, child, inner, values)? {
                return Ok(ProtoWalk::Unsupported);
            }
        } else {
            // A scalar where the pointers go deeper: nothing below it is found.
            skip_wire(&mut buf, wire)?;
        }
    }
    for (name, child) in &node.children {
        let Some(slot) = child.slot else { continue };
        let Some(fd) = desc.get_field_by_name(name) else {
            continue;
        };
        if fd.supports_presence() || seen.contains(&fd.number()) {
            continue;
        }
        // A proto3 scalar without `optional` has no presence: 0 and "" are its values, not
        // absences (user 0 exists); unset lists read as [].
        if let Some(cell) = values.get_mut(slot) {
            *cell = super::extract::proto_json(&fd.default_value());
        }
    }
    Ok(ProtoWalk::Done)
}

/// Reads one occurrence of field `fd` into `cell`: scalars replace (the last one wins, as
/// Protobuf merges), repeated fields append (packed or not).
fn read_field(
    fd: &prost_reflect::FieldDescriptor,
    wire: u8,
    buf: &mut &[u8],
    cell: &mut Option<Value>,
) -> Result<()> {
    use prost_reflect::Kind;
    let kind = fd.kind();
    if !fd.is_list() {
        *cell = scalar(&kind, wire, buf)?;
        return Ok(());
    }
    let items = match cell {
        Some(Value::Array(items)) => items,
        _ => {
            *cell = Some(Value::Array(Vec::new()));
            match cell {
                Some(Value::Array(items)) => items,
                _ => return Err("unreachable".into()),
            }
        }
    };
    let packable = !matches!(kind, Kind::String | Kind::Bytes | Kind::Message(_));
    if packable && wire == 2 {
        let mut packed = len_delimited(buf, wire)?;
        let element_wire = match kind {
            Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => 1,
            Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => 5,
            _ => 0,
        };
        while !packed.is_empty() {
            items.extend(scalar(&kind, element_wire, &mut packed)?);
        }
    } else {
        items.extend(scalar(&kind, wire, buf)?);
    }
    Ok(())
}

/// One value of `kind` as JSON (`None` for values the mapping cannot use: bytes, messages
/// other than a Timestamp, non-finite numbers).
fn scalar(kind: &prost_reflect::Kind, wire: u8, buf: &mut &[u8]) -> Result<Option<Value>> {
    use prost_reflect::Kind;
    let expect = |w: u8| {
        if w == wire {
            Ok(())
        } else {
            Err(format!("wire type {wire} where {w} was expected"))
        }
    };
    let fixed = |buf: &mut &[u8], n: usize| -> Result<u64> {
        let b = take(buf, n)?;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    Ok(Some(match kind {
        Kind::Bool => {
            expect(0)?;
            Value::Bool(varint(buf)? != 0)
        }
        // int32 is sign-extended to 64 bits on the wire.
        Kind::Int32 | Kind::Int64 | Kind::Enum(_) => {
            expect(0)?;
            let v = varint(buf)? as i64;
            Value::from(if matches!(kind, Kind::Int64) {
                v
            } else {
                i64::from(v as i32)
            })
        }
        Kind::Uint32 => {
            expect(0)?;
            Value::from(varint(buf)? as u32)
        }
        Kind::Uint64 => {
            expect(0)?;
            Value::from(varint(buf)?)
        }
        Kind::Sint32 => {
            expect(0)?;
            Value::from(unzigzag(varint(buf)?) as i32)
        }
        Kind::Sint64 => {
            expect(0)?;
            Value::from(unzigzag(varint(buf)?))
        }
        Kind::Fixed32 => {
            expect(5)?;
            Value::from(fixed(buf, 4)? as u32)
        }
        Kind::Sfixed32 => {
            expect(5)?;
            Value::from(fixed(buf, 4)? as u32 as i32)
        }
        Kind::Fixed64 => {
            expect(1)?;
            Value::from(fixed(buf, 8)?)
        }
        Kind::Sfixed64 => {
            expect(1)?;
            Value::from(fixed(buf, 8)? as i64)
        }
        Kind::Float => {
            expect(5)?;
            let f = f32::from_bits(fixed(buf, 4)? as u32);
            return Ok(Number::from_f64(f64::from(f)).map(Value::Number));
        }
        Kind::Double => {
            expect(1)?;
            let f = f64::from_bits(fixed(buf, 8)?);
            return Ok(Number::from_f64(f).map(Value::Number));
        }
        Kind::String => {
            let b = len_delimited(buf, wire)?;
            let s = std::str::from_utf8(b).map_err(|_| "a string that is not UTF-8")?;
            Value::String(s.to_owned())
        }
        Kind::Bytes => {
            len_delimited(buf, wire)?;
            return Ok(None);
        }
        Kind::Message(m) => {
            let b = len_delimited(buf, wire)?;
            if m.full_name() != "google.protobuf.Timestamp" {
                return Ok(None);
            }
            return timestamp_ms(b).map(|ms| Some(Value::from(ms)));
        }
    }))
}

/// A `google.protobuf.Timestamp` (seconds = 1, nanos = 2) as epoch milliseconds.
fn timestamp_ms(mut b: &[u8]) -> Result<i64> {
    let (mut secs, mut nanos) = (0i64, 0i64);
    while !b.is_empty() {
        let key = varint(&mut b)?;
        match (key >> 3, key & 7) {
            (1, 0) => secs = varint(&mut b)? as i64,
            (2, 0) => nanos = i64::from(varint(&mut b)? as i32),
            (_, wire) => skip_wire(&mut b, wire as u8)?,
        }
    }
    Ok(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000))
}

/// A base-128 varint (Protobuf's, and under Avro's zig-zag ints and longs).
pub(super) fn varint(buf: &mut &[u8]) -> Result<u64> {
    let (mut v, mut shift) = (0u64, 0u32);
    loop {
        let (&b, rest) = buf.split_first().ok_or("the record ends early")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
        if shift > 63 {
            return Err("a varint longer than 10 bytes".into());
        }
    }
}

fn len_delimited<'b>(buf: &mut &'b [u8], wire: u8) -> Result<&'b [u8]> {
    if wire != 2 {
        return Err(format!(
            "wire type {wire} where a length-delimited value was expected"
        ));
    }
    let n = usize::try_from(varint(buf)?).map_err(|_| "length out of range")?;
    take(buf, n).map_err(|_| "the message ends early".to_owned())
}

/// Moves past one value of wire type `wire`.
fn skip_wire(buf: &mut &[u8], wire: u8) -> Result<()> {
    match wire {
        0 => {
            varint(buf)?;
        }
        1 => {
            take(buf, 8)?;
        }
        2 => {
            len_delimited(buf, wire)?;
        }
        5 => {
            take(buf, 4)?;
        }
        // Groups (3, 4) are deprecated and not written by proto3.
        w => return Err(format!("unsupported wire type {w}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::extract::Extractor;
    use super::super::registry::Registered;
    use super::super::registry::SchemaRegistry;
    use super::*;
    use apache_avro::types::Value as A;
    use proptest::prelude::*;

    /// Each pointer alone (a walk with one leaf) and all of them at once find what `reference`
    /// (the whole-record decoding) finds.
    fn same_as_reference(
        pointers: &[&str],
        find: impl Fn(&Extractor, &str) -> Option<Value>,
        reference: impl Fn(&str) -> Option<Value>,
    ) -> std::result::Result<(), TestCaseError> {
        for p in pointers {
            prop_assert_eq!(find(&Extractor::new([*p]), p), reference(p), "{}", p);
        }
        let all = Extractor::new(pointers.iter().copied());
        for p in pointers {
            prop_assert_eq!(find(&all, p), reference(p), "{}", p);
        }
        Ok(())
    }

    const AVRO: &str = r#"{"type": "record", "name": "Event", "namespace": "shop", "fields": [
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["view", "click"]}},
        {"name": "user", "type": {"type": "record", "name": "User", "fields": [
            {"name": "id", "type": "long"},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "scores", "type": {"type": "map", "values": "double"}}]}},
        {"name": "blob", "type": "bytes"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "slot", "type": ["null", "int"]},
        {"name": "weight", "type": "float"},
        {"name": "seller", "type": ["null", "User"]},
        {"name": "id16", "type": {"type": "fixed", "name": "Id16", "size": 4}},
        {"name": "ok", "type": "boolean"}]}"#;

    const POINTERS: &[&str] = &[
        "/kind",
        "/user/id",
        "/user/tags",
        "/user/tags/1",
        "/user/scores/a",
        "/blob",
        "/at",
        "/slot",
        "/weight",
        "/seller/id",
        "/seller/tags/0",
        "/id16",
        "/ok",
        "/absent",
        "/user/absent",
        "/at/deeper",
    ];

    fn user(id: i64, tags: &[String], scores: &[(String, f64)]) -> A {
        A::Record(vec![
            ("id".into(), A::Long(id)),
            (
                "tags".into(),
                A::Array(tags.iter().map(|t| A::String(t.clone())).collect()),
            ),
            (
                "scores".into(),
                A::Map(
                    scores
                        .iter()
                        .map(|(k, v)| (k.clone(), A::Double(*v)))
                        .collect(),
                ),
            ),
        ])
    }

    /// What the whole-record path found: the datum decoded, converted to JSON, pointed into.
    fn reference(schema: &Schema, datum: &[u8], p: &str) -> Option<Value> {
        let v = apache_avro::from_avro_datum(schema, &mut &datum[..], None).ok()?;
        Value::try_from(v).ok()?.pointer(p).cloned()
    }

    proptest! {
        #[test]
        fn the_avro_walk_finds_what_decoding_the_whole_record_finds(
            click in any::<bool>(),
            id in any::<i64>(),
            tags in proptest::collection::vec("[a-z]{0,6}", 0..4),
            scores in proptest::collection::vec(("[a-c]", -1e6f64..1e6), 0..3),
            blob in proptest::collection::vec(any::<u8>(), 0..5),
            at in any::<i64>(),
            slot in proptest::option::of(any::<i32>()),
            weight in -1e9f32..1e9,
            seller in proptest::option::of(any::<i64>()),
            ok in any::<bool>(),
        ) {
            let schema = Schema::parse_str(AVRO).unwrap();
            let record = A::Record(vec![
                ("kind".into(), A::Enum(u32::from(click), if click { "click" } else { "view" }.into())),
                ("user".into(), user(id, &tags, &scores)),
                ("blob".into(), A::Bytes(blob)),
                ("at".into(), A::TimestampMillis(at)),
                ("slot".into(), match slot {
                    Some(s) => A::Union(1, Box::new(A::Int(s))),
                    None => A::Union(0, Box::new(A::Null)),
                }),
                ("weight".into(), A::Float(weight)),
                ("seller".into(), match seller {
                    Some(s) => A::Union(1, Box::new(user(s, &tags, &[]))),
                    None => A::Union(0, Box::new(A::Null)),
                }),
                ("id16".into(), A::Fixed(4, vec![1, 2, 3, 4])),
                ("ok".into(), A::Boolean(ok)),
            ]);
            let datum = apache_avro::to_avro_datum(&schema, record).unwrap();
            let walker = AvroSchema::new(schema.clone()).unwrap();
            same_as_reference(
                POINTERS,
                |x, p| x.found_in_avro(&walker, &datum).unwrap().pointer(p).cloned(),
                |p| reference(&schema, &datum, p),
            )?;
        }
    }

    #[test]
    fn broken_avro_datums_are_errors_not_partial_events() {
        let schema = Schema::parse_str(AVRO).unwrap();
        let walker = AvroSchema::new(schema.clone()).unwrap();
        let record = A::Record(vec![
            ("kind".into(), A::Enum(1, "click".into())),
            ("user".into(), user(7, &["a".into()], &[])),
            ("blob".into(), A::Bytes(vec![])),
            ("at".into(), A::TimestampMillis(5)),
            ("slot".into(), A::Union(0, Box::new(A::Null))),
            ("weight".into(), A::Float(1.0)),
            ("seller".into(), A::Union(0, Box::new(A::Null))),
            ("id16".into(), A::Fixed(4, vec![0; 4])),
            ("ok".into(), A::Boolean(true)),
        ]);
        let datum = apache_avro::to_avro_datum(&schema, record).unwrap();
        let x = Extractor::new(["/user/id"]);
        assert!(x.found_in_avro(&walker, &datum).is_ok());
        // Cut anywhere, even after the pointed field: the record is not whole.
        for cut in 0..datum.len() {
            assert!(
                x.found_in_avro(&walker, &datum[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = datum.clone();
        longer.push(0);
        let err = x.found_in_avro(&walker, &longer).unwrap_err();
        assert!(err.contains("after the datum"), "{err}");
    }

    const PROTO: &str = r#"syntax = "proto3";
        package t;
        import "google/protobuf/timestamp.proto";
        message Inner { int64 id = 1; repeated string tags = 2; }
        enum Kind { VIEW = 0; CLICK = 1; }
        message Event {
          Kind kind = 1;
          string user = 2;
          int32 small = 3;
          sint64 zz = 4;
          fixed64 fx = 5;
          double score = 6;
          float weight = 7;
          bool ok = 8;
          repeated int32 slots = 9;
          google.protobuf.Timestamp at = 10;
          optional int32 maybe = 11;
          Inner inner = 12;
          bytes blob = 13;
          map<string, string> attrs = 14;
          repeated Inner others = 15;
          uint32 u = 16;
          sfixed32 sf = 17;
        }"#;

    const PROTO_POINTERS: &[&str] = &[
        "/kind",
        "/user",
        "/small",
        "/zz",
        "/fx",
        "/score",
        "/weight",
        "/ok",
        "/slots",
        "/at",
        "/maybe",
        "/inner/id",
        "/inner/tags",
        "/blob",
        "/u",
        "/sf",
        "/absent",
        "/inner/absent",
        "/user/deeper",
    ];

    fn event_type() -> prost_reflect::MessageDescriptor {
        let Ok(Registered::Protobuf(file)) = SchemaRegistry::compile_proto(PROTO) else {
            panic!("the test .proto compiles");
        };
        let event = file.messages().find(|m| m.name() == "Event");
        event.unwrap()
    }

    /// What the whole-message path found.
    fn proto_reference(
        desc: &prost_reflect::MessageDescriptor,
        bytes: &[u8],
        p: &str,
    ) -> Option<Value> {
        // Pointers into maps and list elements make the walk decode the whole message.
        let x = Extractor::new([p, "/attrs/k"]);
        x.found_in_proto(desc, bytes).unwrap().pointer(p).cloned()
    }

    proptest! {
        #[test]
        fn the_protobuf_walk_finds_what_decoding_the_whole_message_finds(
            kind in 0i32..2,
            user in proptest::option::of("[a-z]{0,5}"),
            small in any::<i32>(),
            zz in any::<i64>(),
            fx in any::<u64>(),
            score in -1e9f64..1e9,
            weight in -1e6f32..1e6,
            ok in any::<bool>(),
            slots in proptest::collection::vec(any::<i32>(), 0..4),
            at in proptest::option::of((0i64..4_000_000_000, 0i32..1_000_000_000)),
            maybe in proptest::option::of(any::<i32>()),
            inner in proptest::option::of((any::<i64>(), proptest::collection::vec("[a-z]{1,3}", 0..3))),
            u in any::<u32>(),
            sf in any::<i32>(),
        ) {
            use prost::Message as _;
            use prost_reflect::{DynamicMessage, Value as P};
            let desc = event_type();
            let mut m = DynamicMessage::new(desc.clone());
            m.set_field_by_name("kind", P::EnumNumber(kind));
            if let Some(user) = user {
                m.set_field_by_name("user", P::String(user));
            }
            m.set_field_by_name("small", P::I32(small));
            m.set_field_by_name("zz", P::I64(zz));
            m.set_field_by_name("fx", P::U64(fx));
            m.set_field_by_name("score", P::F64(score));
            m.set_field_by_name("weight", P::F32(weight));
            m.set_field_by_name("ok", P::Bool(ok));
            m.set_field_by_name("slots", P::List(slots.into_iter().map(P::I32).collect()));
            if let Some((s, n)) = at {
                let mut ts = DynamicMessage::new(desc.get_field_by_name("at").unwrap().kind().as_message().unwrap().clone());
                ts.set_field_by_name("seconds", P::I64(s));
                ts.set_field_by_name("nanos", P::I32(n));
                m.set_field_by_name("at", P::Message(ts));
            }
            if let Some(v) = maybe {
                m.set_field_by_name("maybe", P::I32(v));
            }
            let inner_desc = desc.get_field_by_name("inner").unwrap().kind().as_message().unwrap().clone();
            if let Some((id, tags)) = inner {
                let mut i = DynamicMessage::new(inner_desc.clone());
                i.set_field_by_name("id", P::I64(id));
                i.set_field_by_name("tags", P::List(tags.into_iter().map(P::String).collect()));
                m.set_field_by_name("inner", P::Message(i.clone()));
                m.set_field_by_name("others", P::List(vec![P::Message(i)]));
            }
            m.set_field_by_name("blob", P::Bytes(vec![1, 2].into()));
            m.set_field_by_name("u", P::U32(u));
            m.set_field_by_name("sf", P::I32(sf));
            let bytes = m.encode_to_vec();
            same_as_reference(
                PROTO_POINTERS,
                |x, p| x.found_in_proto(&desc, &bytes).unwrap().pointer(p).cloned(),
                |p| proto_reference(&desc, &bytes, p),
            )?;
        }
    }

    #[test]
    fn pointers_into_maps_and_list_elements_fall_back_to_the_whole_message() {
        use prost::Message as _;
        use prost_reflect::{DynamicMessage, MapKey, Value as P};
        let desc = event_type();
        let mut m = DynamicMessage::new(desc.clone());
        m.set_field_by_name(
            "attrs",
            P::Map([(MapKey::String("k".into()), P::String("v".into()))].into()),
        );
        m.set_field_by_name("slots", P::List(vec![P::I32(4), P::I32(5)]));
        let bytes = m.encode_to_vec();
        let x = Extractor::new(["/attrs/k", "/slots/1"]);
        let found = x.found_in_proto(&desc, &bytes).unwrap();
        assert_eq!(found.pointer("/attrs/k"), Some(&Value::from("v")));
        assert_eq!(found.pointer("/slots/1"), Some(&Value::from(5)));
        // The walk itself declines them rather than answering wrongly.
        let only_map = Extractor::new(["/attrs/k"]);
        assert!(only_map.found_in_proto(&desc, &bytes).is_ok());
        let truncated = &bytes[..bytes.len() - 1];
        assert!(Extractor::new(["/user"])
            .found_in_proto(&desc, truncated)
            .is_err());
    }
}
