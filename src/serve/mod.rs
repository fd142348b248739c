//! Recall: a user's top-K items from the current generation.
//!
//! The user vector comes from the generation's own user tower and vocabularies (never from
//! another version), the user's profile (catalogue, or overrides in the request) and recent
//! clicks (live histories, or an override). Items the user recently clicked are excluded unless
//! asked otherwise. A user the model knows nothing about gets the generation's most clicked
//! items, flagged as a popularity fallback.

pub mod admission;
pub mod api;
pub mod load;

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{SharedCatalog, UserProfile};
use crate::event::{Dense, Id};
use crate::features::history::SharedHistories;
use crate::features::vocab::UNKNOWN_ROW;
use crate::features::{ServeRows, UserRef};
use crate::index::IndexError;
use crate::refresh::Generation;

/// Largest `k` a request may ask for.
pub const MAX_K: usize = 1000;

/// Profile fields a request may supply or override.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureOverrides {
    /// Gender code.
    pub gender: Option<String>,
    /// Age in years.
    pub age: Option<u8>,
    /// Occupation code.
    pub occupation: Option<String>,
    /// Postal code.
    pub zip: Option<String>,
    /// Dense features.
    #[serde(default)]
    pub dense: Dense,
}

/// A recall request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallRequest {
    /// The user (may be unknown to the model).
    pub user_id: Option<String>,
    /// How many items (1..=1000; the configured default when absent).
    pub k: Option<usize>,
    /// Profile overrides (fields given replace the stored profile's).
    pub features: Option<FeatureOverrides>,
    /// Recent clicked items, replacing the stored history.
    pub history: Option<Vec<String>>,
    /// Items never to return.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only items of this category or genre.
    pub category: Option<String>,
    /// Also return items the user recently clicked.
    #[serde(default)]
    pub include_clicked: bool,
}

/// One recalled item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Item id.
    pub item_id: String,
    /// Similarity to the user (cosine or inner product; higher is better). For the popularity
    /// fallback: the rank-based score 1/(1 + rank).
    pub score: f32,
}

/// A recall answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallResponse {
    /// Training step of the model that produced it (the model version).
    pub model_version: i64,
    /// Generation number.
    pub generation: u64,
    /// The user asked about.
    pub user_id: Option<String>,
    /// True when the model had no embedding of this user id (features/history only, or the
    /// popularity fallback).
    pub cold_user: bool,
    /// `"popularity"` when nothing personal was known.
    pub fallback: Option<String>,
    /// Items, best first.
    pub items: Vec<Scored>,
}

/// Request problems (HTTP 400) and internal failures (HTTP 500/503).
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No generation has been published yet.
    #[error("no model generation is being served yet")]
    NotReady,
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The computation did not return (it panicked on the blocking pool).
    #[error("recall failed: {0}")]
    Internal(String),
}

/// What recall reads besides the generation.
#[derive(Clone)]
pub struct Context {
    /// Catalogue and profiles.
    pub catalog: SharedCatalog,
    /// Live histories.
    pub histories: SharedHistories,
    /// `k` when none is given.
    pub default_k: usize,
}

fn merge(
    stored: Option<&UserProfile>,
    id: &Id,
    o: Option<&FeatureOverrides>,
) -> Option<UserProfile> {
    match (stored, o) {
        (None, None) => None,
        (s, o) => {
            let mut p = s.cloned().unwrap_or(UserProfile {
                user_id: id.clone(),
                gender: None,
                age: None,
                occupation: None,
                zip: None,
                dense: Dense::new(),
                updated_ms: 0,
            });
            if let Some(o) = o {
                p.gender = o.gender.clone().or(p.gender);
                p.age = o.age.or(p.age);
                p.occupation = o.occupation.clone().or(p.occupation);
                p.zip = o.zip.clone().or(p.zip);
                p.dense.extend(o.dense.clone());
            }
            Some(p)
        }
    }
}

/// Where a recall's compute went (`towerstream_recall_stage_seconds`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecallTimings {
    /// Encoding the user and the user tower's forward pass.
    pub user_tower: std::time::Duration,
    /// The index search and the items' ids.
    pub search: std::time::Duration,
}

/// Answers a recall request from `generation`.
pub fn recall(
    generation: &Generation,
    ctx: &Context,
    req: &RecallRequest,
) -> Result<RecallResponse, RecallError> {
    recall_timed(generation, ctx, req).map(|(r, _)| r)
}

/// [`recall`], and where its time went (`None` for the popularity fallback, which runs
/// neither stage).
pub fn recall_timed(
    generation: &Generation,
    ctx: &Context,
    req: &RecallRequest,
) -> Result<(RecallResponse, Option<RecallTimings>), RecallError> {
    let k = req.k.unwrap_or(ctx.default_k);
    if !(1..=MAX_K).contains(&k) {
        return Err(RecallError::BadRequest(format!(
            "k must be in 1..={MAX_K}, got {k}"
        )));
    }
    if let Some(id) = &req.user_id {
        if id.is_empty() || id.len() > crate::event::MAX_ID_LEN {
            return Err(RecallError::BadRequest(
                "user_id must be 1..=256 bytes".into(),
            ));
        }
    }
    if req.user_id.is_none() && req.features.is_none() && req.history.is_none() {
        return Err(RecallError::BadRequest(
            "give user_id, features or history".into(),
        ));
    }
    if let Some(o) = &req.features {
        // The bound events have: one inf in a request would make the answer garbage.
        crate::event::check_dense("features.dense", &o.dense)
            .map_err(|e| RecallError::BadRequest(e.detail))?;
    }
    if req.exclude.len() > 10_000 {
        return Err(RecallError::BadRequest(
            "exclude lists at most 10000 items".into(),
        ));
    }
    let model = &generation.model;
    let user_id = Id::new(req.user_id.as_deref().unwrap_or(""));
    let stored = ctx
        .catalog
        .read()
        .ok()
        .and_then(|c| req.user_id.as_ref().and_then(|_| c.user(&user_id)));
    let profile = merge(stored.as_deref(), &user_id, req.features.as_ref());
    let history: Vec<Id> = match &req.history {
        Some(h) => h.iter().map(Id::new).collect(),
        None => ctx
            .histories
            .read()
            .map(|h| h.get(&user_id).cloned().collect())
            .unwrap_or_default(),
    };
    let known_id = req.user_id.is_some()
        && model
            .spec
            .tables()
            .iter()
            .position(|t| t.name == "user_id")
            .is_some_and(|t| model.vocabs[t].get(user_id.as_str()) != UNKNOWN_ROW);

    let mut excluded: HashSet<u64> = req
        .exclude
        .iter()
        .filter_map(|i| generation.keys.get(&Id::new(i)).copied())
        .collect();
    if !req.include_clicked {
        excluded.extend(
            history
                .iter()
                .filter_map(|i| generation.keys.get(i).copied()),
        );
    }
    let category_ok = |key: u64| match &req.category {
        None => true,
        Some(c) => generation.items.get(key as usize).is_some_and(|f| {
            f.category.as_deref() == Some(c.as_str()) || f.genres.iter().any(|g| g == c)
        }),
    };

    if !known_id && profile.is_none() && history.is_empty() {
        let items = model
            .popular
            .iter()
            .filter(|id| {
                generation
                    .keys
                    .get(*id)
                    .is_some_and(|key| !excluded.contains(key) && category_ok(*key))
            })
            .take(k)
            .enumerate()
            .map(|(rank, id)| Scored {
                item_id: id.to_string(),
                score: 1.0 / (1.0 + rank as f32),
            })
            .collect();
        let response = RecallResponse {
            model_version: model.step,
            generation: generation.number,
            user_id: req.user_id.clone(),
            cold_user: true,
            fallback: Some("popularity".into()),
            items,
        };
        return Ok((response, None));
    }

    let started = std::time::Instant::now();
    let user = UserRef {
        id: &user_id,
        profile: profile.as_ref(),
        history: history.iter().collect(),
    };
    let input = model
        .spec
        .encode_users(std::slice::from_ref(&user), &mut ServeRows(&model.vocabs));
    let v = model
        .towers
        .embed_users(&input)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let query: Vec<f32> = Vec::try_from(v.view([-1])).unwrap_or_default();
    let embedded = std::time::Instant::now();
    let hits = generation.search(&query, k, req.category.as_deref(), |key| {
        !excluded.contains(&key) && category_ok(key)
    })?;
    let items = hits
        .into_iter()
        .filter_map(|h| {
            generation.items.get(h.key as usize).map(|f| Scored {
                item_id: f.item_id.to_string(),
                score: h.score,
            })
        })
        .collect();
    let timings = RecallTimings {
        user_tower: embedded - started,
        search: embedded.elapsed(),
    };
    let response = RecallResponse {
        model_version: model.step,
        generation: generation.number,
        user_id: req.user_id.clone(),
        cold_user: !known_id,
        fallback: None,
        items,
    };
    Ok((response, Some(timings)))
}

/// Everything the API needs.
#[derive(Clone)]
pub struct ServeState {
    /// The served generation.
    pub served: Arc<crate::refresh::Served>,
    /// Recall context.
    pub ctx: Context,
    /// Metrics (also exposed at `/metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The process's workers: `/healthz` fails once one has stopped.
    pub health: crate::health::Health,
}
