//! The records of the generations topic.
//!
//! One [`GenerationMessage`] per generation, encoded with `postcard` and split into records of
//! at most `replication.chunk_bytes`. Every record starts with a fixed 32-byte header:
//!
//! ```text
//!  magic "TSG2" | generation u64 | chunk u32 | chunks u32 | full offset i64 | body length u32
//! ```
//!
//! `full offset` is the topic offset of the first record of the newest *full* message known
//! when the record was sent (−1 before the first one), so a replica that starts late reads the
//! last record, seeks there and replays from a complete model.

use serde::{Deserialize, Serialize};

/// Bytes of the record header.
pub const HEADER_BYTES: usize = 32;
/// Bumped whenever the body's layout changes, so an old replica refuses a new record by its
/// header instead of misreading its body (`TSG2`: links of linked main sets; `TSG3`: main
/// sets sent as their distinct vectors, and their lists).
const MAGIC: &[u8; 4] = b"TSG3";

/// A record that is not a generations-topic record of this format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Too short, wrong magic, or inconsistent header.
    #[error("not a towerstream generation record: {0}")]
    Header(&'static str),
    /// The reassembled body does not decode.
    #[error("generation {generation} does not decode: {source}")]
    Body {
        /// Generation number from the header.
        generation: u64,
        /// Cause.
        source: postcard::Error,
    },
}

/// A generation as shipped to replicas: the user tower (complete or changed rows), the item
/// vectors of the same model version, and what the API reports about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMessage {
    /// The trainer's generation number.
    pub generation: u64,
    /// Model version (training step).
    pub step: i64,
    /// `None`: `model` is complete and a replica can start here. `Some(s)`: `model` holds the
    /// rows changed since the message at step `s`, which the replica must have applied.
    pub base_step: Option<i64>,
    /// User-tower weights and vocabularies.
    pub model: ModelPart,
    /// Generation whose main item set this one searches.
    pub main_generation: u64,
    /// `Some(n)`: `main` carries no ids; its items are those of the main set whose ids came
    /// with generation `n` (a new model over the same items: the ids of a million items are
    /// 7 MB a message).
    pub main_ids_of: Option<u64>,
    /// The main item set with vectors, when it is new in this message (always in full ones).
    /// For an HNSW main index the vectors are empty and travel inside `main_graph`.
    pub main: Option<ItemVectors>,
    /// The serialized usearch graph of an HNSW main index: replicas load it instead of
    /// rebuilding (minutes at a million items), and search exactly the trainer's graph.
    pub main_graph: Option<Vec<u8>>,
    /// Generation whose links the main set walks with `main`'s vectors (a linked index,
    /// `index.large_catalog = relink`); `None` for an exact or HNSW main set.
    pub links_generation: Option<u64>,
    /// The links themselves ([`crate::index::SharedGraph::to_bytes`]) when they are new in this
    /// message (always in full ones): they travel once per relink, the vectors with each version.
    pub main_links: Option<Vec<u8>>,
    /// The lists of a main set split around centroids (`index.large_catalog = clusters`),
    /// with `main`; `None` otherwise.
    pub main_lists: Option<MainLists>,
    /// Items searched exactly on top of the main set (new or changed since it was built).
    pub delta: ItemVectors,
    /// Positions in the main set no longer served (deleted or changed items).
    pub hidden: Vec<u64>,
    /// Most clicked items, for users the model knows nothing about.
    pub popular: Vec<String>,
    /// Catalogue version the trainer embedded.
    pub catalog_version: u64,
    /// When the trainer published it (Unix ms).
    pub published_unix_ms: i64,
}

/// Lists around centroids over a main set's distinct vectors ([`crate::index::ClusteredVectors`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MainLists {
    /// `lists × dim` centroids.
    pub centroids: Vec<f32>,
    /// The list of every distinct vector.
    pub list_of_group: Vec<u32>,
    /// The depth the trainer's probe chose for this version (a replica serves it as sent,
    /// so both answer alike).
    pub depth_per_k: f64,
}

/// Tower weights: MLP variables, embedding-table rows and vocabulary entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelPart {
    /// Embedding width.
    pub embedding_dim: u32,
    /// Every table of the model (name, rows), so a replica can check it was configured alike.
    pub tables: Vec<(String, u32)>,
    /// MLP variables of the user tower.
    pub dense: Vec<DenseVar>,
    /// Rows of the tables the user tower reads.
    pub rows: Vec<TableRows>,
    /// Vocabulary rows (`id` empty: the row was freed).
    pub vocab: Vec<VocabRows>,
}

impl ModelPart {
    /// True when it carries no weights (a generation with the previous message's model).
    pub fn is_empty(&self) -> bool {
        self.dense.is_empty() && self.rows.is_empty() && self.vocab.is_empty()
    }
}

/// One MLP variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseVar {
    /// Variable name in the var store (`user.0.weight`, ...).
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Rows of one embedding table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    /// Table index.
    pub table: u32,
    /// Row indices.
    pub rows: Vec<i64>,
    /// `rows.len() × embedding_dim` values.
    pub values: Vec<f32>,
}

/// Vocabulary rows of one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabRows {
    /// Table index.
    pub table: u32,
    /// (row, id).
    pub entries: Vec<(u32, String)>,
}

/// Item ids and their vectors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemVectors {
    /// Vector width.
    pub dim: u32,
    /// Item ids.
    pub ids: Vec<String>,
    /// `ids.len() × dim` values; with `groups`, one row per distinct vector.
    pub vectors: Vec<f32>,
    /// Empty, or the row in `vectors` of every id: a main set scanned over its distinct
    /// vectors travels as those (a million items in some 70k vectors, not a million).
    pub groups: Vec<u32>,
}

impl ItemVectors {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True without items.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The fixed header of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Generation number.
    pub generation: u64,
    /// Chunk index (0-based).
    pub chunk: u32,
    /// Chunks of this generation.
    pub chunks: u32,
    /// Offset of the first record of the newest full message (−1: none yet).
    pub full_offset: i64,
}

impl ChunkHeader {
    /// Reads the header of a record.
    pub fn read(record: &[u8]) -> Result<(ChunkHeader, &[u8]), WireError> {
        if record.len() < HEADER_BYTES {
            return Err(WireError::Header("shorter than the header"));
        }
        if &record[..4] != MAGIC {
            return Err(WireError::Header("wrong magic"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(record[i..i + 4].try_into().unwrap_or([0; 4]));
        let header = ChunkHeader {
            generation: u64_at(4),
            chunk: u32_at(12),
            chunks: u32_at(16),
            full_offset: u64_at(20) as i64,
        };
        let len = u32_at(28) as usize;
        let body = &record[HEADER_BYTES..];
        if body.len() != len || header.chunks == 0 || header.chunk >= header.chunks {
            return Err(WireError::Header("inconsistent header"));
        }
        Ok((header, body))
    }

    fn write(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.extend_from_slice(&self.full_offset.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// Encodes a message body (before chunking).
pub fn encode(message: &GenerationMessage) -> Vec<u8> {
    // Serializing plain structs of numbers and strings into a Vec cannot fail.
    postcard::to_stdvec(message).unwrap_or_default()
}

/// Splits `body` into records of at most `chunk_bytes` of body each, stamped with `full_offset`.
pub fn chunk(generation: u64, body: &[u8], chunk_bytes: usize, full_offset: i64) -> Vec<Vec<u8>> {
    let pieces: Vec<&[u8]> = if body.is_empty() {
        vec![body]
    } else {
        body.chunks(chunk_bytes.max(1)).collect()
    };
    let chunks = pieces.len() as u32;
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            ChunkHeader {
                generation,
                chunk: i as u32,
                chunks,
                full_offset,
            }
            .write(piece)
        })
        .collect()
}

/// Rewrites the full offset of a record made by [`chunk`] (the publisher learns the offset of a
/// full message's first record only once it is written).
pub fn restamp(record: &mut [u8], full_offset: i64) {
    if record.len() >= HEADER_BYTES {
        record[20..28].copy_from_slice(&full_offset.to_le_bytes());
    }
}

/// Reassembles messages from records read in order. A record out of sequence (a chunk lost to
/// a failed send, or reading from the middle of a message) drops the message being assembled.
#[derive(Debug, Default)]
pub struct Assembler {
    generation: Option<u64>,
    next: u32,
    body: Vec<u8>,
}

impl Assembler {
    /// Takes the next record; returns a message when its last chunk arrived.
    pub fn push(&mut self, record: &[u8]) -> Result<Option<GenerationMessage>, WireError> {
        let (h, body) = ChunkHeader::read(record)?;
        if h.chunk == 0 {
            self.generation = Some(h.generation);
            self.next = 0;
            self.body.clear();
        }
        if self.generation != Some(h.generation) || self.next != h.chunk {
            self.generation = None;
            self.body.clear();
            return Ok(None);
        }
        self.body.extend_from_slice(body);
        self.next += 1;
        if self.next < h.chunks {
            return Ok(None);
        }
        self.generation = None;
        let body = std::mem::take(&mut self.body);
        postcard::from_bytes(&body)
            .map(Some)
            .map_err(|source| WireError::Body {
                generation: h.generation,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> GenerationMessage {
        GenerationMessage {
            generation: 7,
            step: 42,
            base_step: Some(40),
            model: ModelPart {
                embedding_dim: 2,
                tables: vec![("user_id".into(), 10)],
                dense: vec![DenseVar {
                    name: "user.0.weight".into(),
                    shape: vec![1, 2],
                    values: vec![0.5, -1.0],
                }],
                rows: vec![TableRows {
                    table: 0,
                    rows: vec![3],
                    values: vec![1.0, 2.0],
                }],
                vocab: vec![VocabRows {
                    table: 0,
                    entries: vec![(3, "u3".into()), (4, String::new())],
                }],
            },
            main_generation: 5,
            main: None,
            main_graph: Some(vec![1, 2, 3]),
            links_generation: Some(4),
            main_links: Some(vec![4, 5]),
            main_lists: None,
            main_ids_of: None,
            delta: ItemVectors {
                groups: Vec::new(),
                dim: 2,
                ids: (0..n).map(|i| format!("item-{i}")).collect(),
                vectors: (0..2 * n).map(|i| i as f32 / 7.0).collect(),
            },
            hidden: vec![1, 9],
            popular: vec!["a".into()],
            catalog_version: 3,
            published_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_chunked_message_reassembles_bit_exactly() {
        let m = message(5000);
        let body = encode(&m);
        let records = chunk(m.generation, &body, 4096, 17);
        assert!(records.len() > 10);
        let mut a = Assembler::default();
        let (last, rest) = records.split_last().unwrap();
        for r in rest {
            assert_eq!(a.push(r).unwrap(), None);
            assert_eq!(ChunkHeader::read(r).unwrap().0.full_offset, 17);
        }
        assert_eq!(a.push(last).unwrap(), Some(m));
    }

    #[test]
    fn a_missing_chunk_drops_the_message_and_the_next_one_still_arrives() {
        let m = message(3000);
        let records = chunk(m.generation, &encode(&m), 4096, -1);
        let mut a = Assembler::default();
        for (i, r) in records.iter().enumerate() {
            if i != 2 {
                assert_eq!(a.push(r).unwrap(), None);
            }
        }
        let next = GenerationMessage {
            generation: 8,
            ..message(10)
        };
        let out = chunk(8, &encode(&next), 4096, -1)
            .iter()
            .map(|r| a.push(r).unwrap())
            .last()
            .flatten();
        assert_eq!(out, Some(next));
    }

    #[test]
    fn foreign_records_are_errors() {
        let mut a = Assembler::default();
        assert!(a.push(b"hello").is_err());
        assert!(a.push(&[0u8; 40]).is_err());
        let mut r = chunk(1, b"abc", 1024, -1).remove(0);
        r.push(0); // body longer than the header says
        assert!(a.push(&r).is_err());
        let ok = chunk(1, b"abc", 1024, -1).remove(0);
        assert!(matches!(a.push(&ok), Err(WireError::Body { .. })));
    }
}
