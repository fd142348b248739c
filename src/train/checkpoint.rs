//! Checkpoints: model weights, optimizer state, vocabularies, histories, estimator arrays,
//! click counts and the Kafka resume points, written together and atomically.
//!
//! Layout: `<dir>/step-<000000001234>/{tensors.ot, state.json, MANIFEST.json}`. A checkpoint is
//! written into a hidden temporary directory, every file is synced, `MANIFEST.json` is written
//! last, then the directory is renamed into place. Only directories with a manifest count, so a
//! crash mid-write leaves nothing that a restart would load. The newest `keep` are kept.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::estimator::FrequencyEstimator;
use super::model::first_non_finite;
use super::sampler::Rng;
use super::trainer::Trainer;
use crate::config::{Config, FeaturesConfig, ModelConfig};
use crate::features::history::HistoriesState;
use crate::features::vocab::Vocab;
use crate::ingest::offsets::{ResumeMap, ResumePoint};

/// Checkpoint layout version. 2: the estimator's clock counts positives, histories keep event
/// times, Adam counts each table row's updates; a format-1 checkpoint is refused by name.
const FORMAT: u32 = 2;

/// Checkpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system.
    #[error("checkpoint I/O at {path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// libtorch (de)serialisation.
    #[error("checkpoint tensors at {path}: {source}")]
    Tensor {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        source: tch::TchError,
    },
    /// State file.
    #[error("checkpoint state at {path}: {source}")]
    State {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// A file is truncated or otherwise not what the manifest says.
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt {
        /// Path involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model holds a NaN or an infinity: such a checkpoint is never written (the ones
    /// already on disk are kept) and never restored.
    #[error("checkpoint {path}: tensor {tensor} holds NaN or infinite values")]
    NonFinite {
        /// The checkpoint that was not written, or was not restored.
        path: PathBuf,
        /// The first tensor found holding one.
        tensor: String,
    },
    /// The checkpoint does not fit the configured model.
    #[error("checkpoint {path} does not match the configuration: {reason}")]
    Mismatch {
        /// Path involved.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    step: i64,
    examples_trained: u64,
    model: ModelConfig,
    features: FeaturesConfig,
    vocabs: Vec<Vocab>,
    histories: HistoriesState,
    estimator: FrequencyEstimator,
    clicks: Vec<(String, u64)>,
    rng: Rng,
    resume: Vec<(String, i32, ResumePoint)>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    step: i64,
    files: Vec<(String, u64)>,
}

/// A checkpoint found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its directory.
    pub path: PathBuf,
    /// Global step it holds.
    pub step: i64,
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

/// Writes a checkpoint of `trainer` with `resume` into `dir`; keeps the newest `keep`.
pub fn save(
    trainer: &Trainer,
    resume: &ResumeMap,
    dir: &Path,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let name = format!("step-{:012}", trainer.step);
    let final_path = dir.join(&name);
    let mut named = trainer.towers.named_tensors();
    named.extend(trainer.optim.named_tensors());
    // Checked before anything is written or rotated: the good checkpoints stay the newest.
    if let Some(tensor) = first_non_finite(&named) {
        if let Some(m) = trainer.metrics() {
            m.checkpoints_refused.inc();
        }
        tracing::error!(step = trainer.step, tensor = %tensor, "model holds NaN or infinite values: checkpoint refused");
        return Err(CheckpointError::NonFinite {
            path: final_path,
            tensor,
        });
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let tensors_path = tmp.join("tensors.ot");
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, t)| (k.as_str(), t)).collect();
    Tensor::save_multi(&refs, &tensors_path).map_err(|source| CheckpointError::Tensor {
        path: tensors_path.clone(),
        source,
    })?;
    fs::File::open(&tensors_path)
        .and_then(|f| f.sync_all())
        .map_err(io(&tensors_path))?;

    let clicks = trainer.pool.state();
    let state = State {
        format: FORMAT,
        step: trainer.step,
        examples_trained: trainer.examples_trained,
        model: trainer.config.model.clone(),
        features: trainer.config.features.clone(),
        vocabs: trainer.vocabs.clone(),
        histories: trainer
            .histories
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .state(),
        estimator: trainer.estimator.clone(),
        clicks,
        rng: trainer.rng.clone(),
        resume: resume
            .iter()
            .map(|((t, p), r)| (t.clone(), *p, r.clone()))
            .collect(),
    };
    let state_path = tmp.join("state.json");
    let bytes = serde_json::to_vec(&state).map_err(|source| CheckpointError::State {
        path: state_path.clone(),
        source,
    })?;
    write_synced(&state_path, &bytes)?;

    let mut files = Vec::new();
    for f in ["tensors.ot", "state.json"] {
        let p = tmp.join(f);
        files.push((f.to_owned(), fs::metadata(&p).map_err(io(&p))?.len()));
    }
    let manifest = Manifest {
        format: FORMAT,
        step: trainer.step,
        files,
    };
    let manifest_path = tmp.join("MANIFEST.json");
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|source| CheckpointError::State {
        path: manifest_path.clone(),
        source,
    })?;
    write_synced(&manifest_path, &bytes)?;
    sync_dir(&tmp)?;

    if final_path.exists() {
        fs::remove_dir_all(&final_path).map_err(io(&final_path))?;
    }
    fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    sync_dir(dir)?;

    for old in list(dir)?.into_iter().skip(keep.max(1)) {
        let _ = fs::remove_dir_all(&old.path);
    }
    Ok(final_path)
}

/// Valid checkpoints in `dir`, newest first (a missing directory has none).
pub fn list(dir: &Path) -> Result<Vec<Found>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        if path.join("MANIFEST.json").is_file() {
            found.push(Found { path, step });
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.step));
    Ok(found)
}

/// Loads one checkpoint into a trainer built from `config`.
pub fn load(path: &Path, config: &Config) -> Result<(Trainer, ResumeMap), CheckpointError> {
    let manifest_path = path.join("MANIFEST.json");
    let manifest: Manifest = serde_json::from_slice(
        &fs::read(&manifest_path).map_err(io(&manifest_path))?,
    )
    .map_err(|source| CheckpointError::State {
        path: manifest_path.clone(),
        source,
    })?;
    for (file, len) in &manifest.files {
        let p = path.join(file);
        let actual = fs::metadata(&p).map_err(io(&p))?.len();
        if actual != *len {
            return Err(CheckpointError::Corrupt {
                path: p,
                reason: format!("{actual} bytes, manifest says {len}"),
            });
        }
    }
    let state_path = path.join("state.json");
    let state: State = serde_json::from_slice(&fs::read(&state_path).map_err(io(&state_path))?)
        .map_err(|source| CheckpointError::State {
            path: state_path.clone(),
            source,
        })?;
    let mismatch = |reason: &str| CheckpointError::Mismatch {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if state.format != FORMAT {
        return Err(mismatch(&format!(
            "format version {} (this build reads {FORMAT}); start from a fresh checkpoint directory",
            state.format
        )));
    }
    let same_model = state.model.embedding_dim == config.model.embedding_dim
        && state.model.tower_dims == config.model.tower_dims
        && state.model.similarity == config.model.similarity
        && state.model.history_pooling == config.model.history_pooling;
    if !same_model {
        return Err(mismatch(
            "model.embedding_dim / tower_dims / similarity / history_pooling differ",
        ));
    }
    if state.features.user != config.features.user
        || state.features.item != config.features.item
        || state.features.dense != config.features.dense
        || state.features.history_len != config.features.history_len
    {
        return Err(mismatch("features differ"));
    }

    let mut trainer = Trainer::new(config);
    if state.vocabs.len() != trainer.vocabs.len()
        || state
            .vocabs
            .iter()
            .zip(&trainer.vocabs)
            .any(|(a, b)| a.capacity() != b.capacity())
    {
        return Err(mismatch("vocabulary capacities differ"));
    }
    let tensors_path = path.join("tensors.ot");
    let loaded: HashMap<String, Tensor> = Tensor::load_multi(&tensors_path)
        .map_err(|source| CheckpointError::Tensor {
            path: tensors_path.clone(),
            source,
        })?
        .into_iter()
        .collect();
    let device = trainer.towers.device();
    let get = |name: &str| loaded.get(name).map(|t| t.to(device));
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for (name, mut t) in trainer.towers.named_tensors() {
            let src = get(&name).ok_or_else(|| mismatch(&format!("missing tensor {name}")))?;
            if src.size() != t.size() {
                return Err(mismatch(&format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    src.size(),
                    t.size()
                )));
            }
            t.copy_(&src);
        }
        Ok(())
    })?;
    trainer.optim.restore(&get).map_err(|e| mismatch(&e))?;
    let mut restored = trainer.towers.named_tensors();
    restored.extend(trainer.optim.named_tensors());
    if let Some(tensor) = first_non_finite(&restored) {
        // Written before the guard existed: an older checkpoint is the better start.
        return Err(CheckpointError::NonFinite {
            path: path.to_owned(),
            tensor,
        });
    }

    trainer.step = state.step;
    trainer.examples_trained = state.examples_trained;
    trainer.vocabs = state.vocabs;
    trainer
        .histories
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .restore(state.histories);
    if state.estimator.params() != trainer.estimator.params() {
        return Err(mismatch("train.estimator_* differ"));
    }
    trainer.estimator = state.estimator;
    trainer.pool.restore(state.clicks);
    trainer.rng = state.rng;
    let resume = state
        .resume
        .into_iter()
        .map(|(t, p, r)| ((t, p), r))
        .collect();
    Ok((trainer, resume))
}

/// Loads the newest valid checkpoint in `dir`, skipping unreadable ones (with a warning).
pub fn load_latest(
    dir: &Path,
    config: &Config,
) -> Result<Option<(Trainer, ResumeMap, Found)>, CheckpointError> {
    for found in list(dir)? {
        match load(&found.path, config) {
            Ok((t, r)) => return Ok(Some((t, r, found))),
            Err(e @ CheckpointError::Mismatch { .. }) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "skipping unreadable checkpoint"),
        }
    }
    Ok(None)
}
