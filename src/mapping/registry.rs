//! Avro payloads in the Confluent wire format, with their schemas from a schema registry.
//!
//! A record is `0x00 | schema id (u32, big-endian) | Avro binary datum`. The schema of an id is
//! fetched once from the registry's Confluent-compatible API (`GET {url}/schemas/ids/{id}`;
//! Confluent Schema Registry, Apicurio's `/apis/ccompat/v7`, Karapace) and kept: an id names
//! one schema forever. Fetching is a separate, async step ([`SchemaRegistry::fetch`]) that the
//! consumer loops run before decoding a record whose schema is not known yet, retrying while
//! the registry is unreachable — records wait for it and none is dead-lettered for an outage;
//! decoding itself ([`SchemaRegistry::decode_avro`]) stays synchronous and never waits.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Why a schema could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the id does not exist (records of it cannot be decoded).
    #[error("schema {0} is not in the registry")]
    NotFound(u32),
    /// The registry holds something that is not a usable Avro schema.
    #[error("schema {id} does not parse as Avro: {reason}")]
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
    schemas: RwLock<HashMap<u32, Arc<apache_avro::Schema>>>,
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
    pub fn insert(&self, id: u32, schema: apache_avro::Schema) {
        let mut schemas = self.schemas.write().unwrap_or_else(|p| p.into_inner());
        schemas.insert(id, Arc::new(schema));
    }

    /// The schema of `id`, if fetched already.
    pub fn schema(&self, id: u32) -> Option<Arc<apache_avro::Schema>> {
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
        let schema =
            apache_avro::Schema::parse_str(text).map_err(|e| RegistryError::BadSchema {
                id,
                reason: e.to_string(),
            })?;
        let mut schemas = self.schemas.write().unwrap_or_else(|p| p.into_inner());
        schemas.insert(id, Arc::new(schema));
        Ok(())
    }

    /// Registers an Avro `schema` under `subject` and returns its id (producers' side: the
    /// tests, benchmarks and demo publish with it).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema }).to_string();
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

    /// The record `payload` (Confluent-framed Avro), for the mapping's pointers. `Err` says
    /// why it cannot be decoded; a schema not fetched yet is such a reason (the consumer loops
    /// fetch before decoding, so it means the registry does not have it).
    pub fn decode_avro(&self, payload: &[u8]) -> Result<apache_avro::types::Value, String> {
        let (id, datum) = framed(payload).ok_or_else(|| {
            "not a schema-registry record (magic byte 0 and a 4-byte schema id first)".to_owned()
        })?;
        let schema = self
            .schema(id)
            .ok_or_else(|| format!("schema {id} is not in the registry"))?;
        let mut reader = datum;
        let value = apache_avro::from_avro_datum(&schema, &mut reader, None)
            .map_err(|e| format!("not an Avro datum of schema {id}: {e}"))?;
        if !reader.is_empty() {
            return Err(format!(
                "{} bytes after the Avro datum of schema {id}",
                reader.len()
            ));
        }
        Ok(value)
    }
}
