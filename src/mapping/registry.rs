//! Avro and Protobuf payloads in the Confluent wire format, with their schemas from a schema
//! registry.
//!
//! A record is `0x00 | schema id (u32, big-endian) | Avro binary datum`, or for Protobuf
//! `0x00 | schema id | message indexes (zig-zag varints: a count, then the path of the
//! message type in the .proto file; a lone 0 for the first message) | Protobuf message`. The schema of an id is
//! fetched once from the registry's Confluent-compatible API (`GET {url}/schemas/ids/{id}`;
//! Confluent Schema Registry, Apicurio's `/apis/ccompat/v7`, Karapace) and kept: an id names
//! one schema forever. Fetching is a separate, async step ([`SchemaRegistry::fetch`]) that the
//! consumer loops run before decoding a record whose schema is not known yet, retrying while
//! the registry is unreachable — records wait for it and none is dead-lettered for an outage;
//! decoding itself ([`SchemaRegistry::decode`]) stays synchronous and never waits.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::binary::AvroSchema;
use super::extract::{Extractor, Found};

/// Why a schema could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the id does not exist (records of it cannot be decoded).
    #[error("schema {0} is not in the registry")]
    NotFound(u32),
    /// The registry holds something that is not a usable Avro schema or `.proto` file.
    #[error("schema {id} is not a usable Avro schema or .proto file: {reason}")]
    BadSchema {
        /// The id.
        id: u32,
        /// The parser's message.
        reason: String,
    },
    /// The registry could not be asked (down, unreachable, 5xx): try again later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
}

/// The registry's schemas, fetched on first use and kept by id. Cheap to share.
pub struct SchemaRegistry {
    url: String,
    timeout: Duration,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    schemas: RwLock<HashMap<u32, Arc<Registered>>>,
}

/// A schema as the registry holds it, compiled.
// One per schema id, behind an `Arc`: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Registered {
    /// An Avro schema (its named types resolved).
    Avro(AvroSchema),
    /// A `.proto` file (imports of Google's well-known types resolved), compiled.
    Protobuf(prost_reflect::FileDescriptor),
}

/// The one `.proto` file a registry entry holds, beside Google's well-known types.
struct ProtoSource {
    source: String,
}

impl protox::file::FileResolver for ProtoSource {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == PROTO_NAME {
            protox::file::File::from_source(name, &self.source)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

const PROTO_NAME: &str = "registered.proto";

/// Compiles the text of a `.proto` file.
fn compile_proto(source: &str) -> Result<prost_reflect::FileDescriptor, String> {
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(ProtoSource {
        source: source.to_owned(),
    });
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.open_file(PROTO_NAME).map_err(|e| e.to_string())?;
    compiler
        .descriptor_pool()
        .get_file_by_name(PROTO_NAME)
        .ok_or_else(|| "the compiled file is missing".to_owned())
}

/// One zig-zag varint from the front of `buf`.
pub(super) fn zigzag(buf: &mut &[u8]) -> Option<i64> {
    super::binary::varint(buf).ok().map(super::binary::unzigzag)
}

/// The message type the indexes at the front of `buf` name in `file` (consumed).
fn message_of(
    file: &prost_reflect::FileDescriptor,
    buf: &mut &[u8],
) -> Result<prost_reflect::MessageDescriptor, String> {
    let bad = || "bad message indexes after the schema id".to_owned();
    let count = zigzag(buf).ok_or_else(bad)?;
    let path: Vec<i64> = if count == 0 {
        vec![0]
    } else {
        (0..count.min(32))
            .map(|_| zigzag(buf).ok_or_else(bad))
            .collect::<Result<_, _>>()?
    };
    let pick = |mut it: Box<dyn Iterator<Item = prost_reflect::MessageDescriptor> + '_>, i: i64| {
        usize::try_from(i).ok().and_then(|i| it.nth(i))
    };
    let mut msg = pick(Box::new(file.messages()), path[0])
        .ok_or_else(|| format!("no message {} in the schema", path[0]))?;
    for &i in &path[1..] {
        msg = pick(Box::new(msg.child_messages()), i)
            .ok_or_else(|| format!("no nested message {i} in {}", msg.full_name()))?;
    }
    Ok(msg)
}

/// The encoding of the message indexes naming the `index`-th top-level message.
pub fn message_indexes(index: usize) -> Vec<u8> {
    if index == 0 {
        return vec![0];
    }
    // Count 1 (zig-zag 2), then the index (zig-zag 2i), as varints.
    let mut out = vec![2];
    let mut v = (index as u64) << 1;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The schema id and datum of a Confluent-framed record, `None` when it is not framed so.
pub fn framed(payload: &[u8]) -> Option<(u32, &[u8])> {
    match payload {
        [0, a, b, c, d, datum @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        _ => None,
    }
}

/// `datum` framed for schema `id` (what a Confluent Avro serializer writes).
pub fn frame(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

impl SchemaRegistry {
    /// A registry at `url` (e.g. `http://127.0.0.1:28081/apis/ccompat/v7`); each request gives
    /// up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> SchemaRegistry {
        SchemaRegistry {
            url: url.trim_end_matches('/').to_owned(),
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
            schemas: RwLock::new(HashMap::new()),
        }
    }

    /// Keeps `schema` as the schema of `id`, as if fetched (schemas known ahead, benchmarks).
    pub fn insert(&self, id: u32, schema: Registered) {
        let mut schemas = self.schemas.write().unwrap_or_else(|p| p.into_inner());
        schemas.insert(id, Arc::new(schema));
    }

    /// Compiles the text of a `.proto` file as the registry would hold it.
    pub fn compile_proto(source: &str) -> Result<Registered, String> {
        compile_proto(source).map(Registered::Protobuf)
    }

    /// The schema of `id`, if fetched already.
    pub fn schema(&self, id: u32) -> Option<Arc<Registered>> {
        let schemas = self.schemas.read().unwrap_or_else(|p| p.into_inner());
        schemas.get(&id).cloned()
    }

    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Value), RegistryError> {
        let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unavailable(&e))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| unavailable(&"timed out"))?
            .map_err(|e| unavailable(&e))?;
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| unavailable(&"timed out"))?
            .map_err(|e| unavailable(&e))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// Fetches and keeps the schema of `id` (nothing to do when it is kept already).
    pub async fn fetch(&self, id: u32) -> Result<(), RegistryError> {
        if self.schema(id).is_some() {
            return Ok(());
        }
        let (status, body) = self
            .request(hyper::Method::GET, &format!("/schemas/ids/{id}"), None)
            .await?;
        match status {
            200 => {}
            404 => return Err(RegistryError::NotFound(id)),
            s => {
                return Err(RegistryError::Unavailable(format!(
                    "GET /schemas/ids/{id} answered {s}"
                )))
            }
        }
        let text = body.get("schema").and_then(Value::as_str).unwrap_or("");
        let bad = |reason: String| RegistryError::BadSchema { id, reason };
        let schema = match body.get("schemaType").and_then(Value::as_str) {
            None | Some("AVRO") => Registered::Avro(
                apache_avro::Schema::parse_str(text)
                    .map_err(|e| e.to_string())
                    .and_then(AvroSchema::new)
                    .map_err(bad)?,
            ),
            Some("PROTOBUF") => Registered::Protobuf(compile_proto(text).map_err(bad)?),
            Some(other) => return Err(bad(format!("schema type {other} is not read"))),
        };
        self.insert(id, schema);
        Ok(())
    }

    /// Registers a `schema` (Avro, or with `protobuf` the text of a `.proto` file) under
    /// `subject` and returns its id (producers' side: the tests publish with it).
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
        protobuf: bool,
    ) -> Result<u32, RegistryError> {
        let body = match protobuf {
            false => serde_json::json!({ "schema": schema }),
            true => serde_json::json!({ "schema": schema, "schemaType": "PROTOBUF" }),
        }
        .to_string();
        let (status, json) = self
            .request(
                hyper::Method::POST,
                &format!("/subjects/{subject}/versions"),
                Some(body),
            )
            .await?;
        match (status, json.get("id").and_then(Value::as_u64)) {
            (200, Some(id)) => u32::try_from(id)
                .map_err(|_| RegistryError::Unavailable(format!("schema id {id} out of range"))),
            _ => Err(RegistryError::Unavailable(format!(
                "registering {subject} answered {status}: {json}"
            ))),
        }
    }

    /// The values `extractor` points at in the record `payload` (Confluent-framed Avro or
    /// Protobuf), read with its schema. `Err` says why it cannot be; a schema not fetched yet
    /// is such a reason (the consumer loops fetch before decoding, so it means the registry
    /// does not have it).
    pub fn extract<'x>(
        &self,
        payload: &[u8],
        extractor: &'x Extractor,
    ) -> Result<Found<'x>, String> {
        let (id, datum) = framed(payload).ok_or_else(|| {
            "not a schema-registry record (magic byte 0 and a 4-byte schema id first)".to_owned()
        })?;
        let schema = self
            .schema(id)
            .ok_or_else(|| format!("schema {id} is not in the registry"))?;
        match schema.as_ref() {
            Registered::Avro(schema) => extractor
                .found_in_avro(schema, datum)
                .map_err(|e| format!("not an Avro datum of schema {id}: {e}")),
            Registered::Protobuf(file) => {
                let mut rest = datum;
                let message = message_of(file, &mut rest)?;
                extractor.found_in_proto(&message, rest).map_err(|e| {
                    format!("not a {} message of schema {id}: {e}", message.full_name())
                })
            }
        }
    }
}
