//! At-least-once bookkeeping: which consumed offsets are applied downstream.
//!
//! Each consumed message is *opened* with a reference count: one per example it produced
//! (acknowledged by the trainer after its step) plus one while the joiner holds it. The
//! partition's committable offset is the smallest offset still referenced, or one past the
//! highest opened offset when nothing is pending. Nothing is stored for Kafka before that.
//!
//! Acknowledgements carry the partition's assignment epoch; after a revocation they are
//! stale and ignored, so a message re-delivered to the new owner is never acknowledged twice.
//!
//! Revocation and training exclude each other ([`OffsetTracker::begin_step`]): the trainer
//! holds the step lock from dropping examples of revoked epochs to acknowledging the rest, and
//! [`OffsetTracker::revoke_all`] takes it too. So when a revocation commits a partition's
//! committable offset, every example of that partition is either acknowledged (trained) or will
//! be dropped untrained — never trained by two owners. This is the drain Vector's Kafka source
//! does on revoke, bounded by one step instead of a timeout.
//!
//! [`ResumePoint`] is what a checkpoint saves with the model: the committable offset plus the
//! offsets above it that were already applied, so a restart replays the gap without
//! training anything twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::example::Origin;

/// A partition of one of the event topics, by topic index.
pub type PartitionKey = (u16, i32);

#[derive(Debug)]
struct PartitionState {
    epoch: u32,
    /// offset → outstanding references.
    pending: BTreeMap<i64, u32>,
    /// One past the highest opened offset; `None` before the first message.
    next: Option<i64>,
    /// Last committable offset handed out by [`OffsetTracker::take_changed`].
    stored: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    fn resume_point(&self) -> Option<ResumePoint> {
        let (offset, next) = (self.committable()?, self.next?);
        Some(ResumePoint {
            offset,
            consumed_until: next,
            // BTreeMap keys: already sorted, as `already_applied` needs.
            unapplied: self.pending.keys().copied().collect(),
        })
    }
}

/// Where to resume one partition after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Seek here: the first offset not yet applied.
    pub offset: i64,
    /// One past the highest offset consumed before the checkpoint.
    pub consumed_until: i64,
    /// Offsets in `offset..consumed_until` that were NOT applied; all others in that range
    /// were, and their examples must not be emitted again.
    pub unapplied: Vec<i64>,
}

/// Longest commit metadata written (brokers accept 4096 bytes by default,
/// `offset.metadata.max.bytes`).
pub const MAX_COMMIT_METADATA: usize = 4000;

impl ResumePoint {
    /// The point as commit metadata, when there is anything above the committed offset to
    /// tell and it fits in [`MAX_COMMIT_METADATA`]: `ts1;<consumed_until>;<u|a>;<list>`, the
    /// list naming either the unapplied or the applied offsets (whichever is shorter) as LEB128
    /// gaps in URL-safe base64 — about 1.4 bytes an offset, so a few thousand held impressions
    /// still fit.
    pub fn to_commit_metadata(&self) -> Option<String> {
        self.encode()
            .filter(|text| text.len() <= MAX_COMMIT_METADATA)
    }

    /// The point in the format of [`Self::to_commit_metadata`], whatever its length (the
    /// handover topic carries the ones too long for commit metadata); `None` when nothing
    /// above the committed offset is applied.
    pub fn encode(&self) -> Option<String> {
        use base64::Engine as _;
        if self.consumed_until <= self.offset {
            return None;
        }
        let range = usize::try_from(self.consumed_until - self.offset).ok()?;
        let (mode, listed): (char, Vec<i64>) = if self.unapplied.len() * 2 <= range {
            ('u', self.unapplied.clone())
        } else {
            let unapplied: std::collections::HashSet<i64> =
                self.unapplied.iter().copied().collect();
            let applied = (self.offset..self.consumed_until).filter(|o| !unapplied.contains(o));
            ('a', applied.collect())
        };
        let mut bytes = Vec::with_capacity(listed.len() * 2);
        let mut prev = self.offset - 1;
        for o in listed {
            let mut gap = u64::try_from(o - prev - 1).ok()?;
            prev = o;
            loop {
                let low = (gap & 0x7f) as u8;
                gap >>= 7;
                if gap == 0 {
                    bytes.push(low);
                    break;
                }
                bytes.push(low | 0x80);
            }
        }
        let list = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Some(format!("ts1;{};{mode};{list}", self.consumed_until))
    }

    /// Reads [`Self::to_commit_metadata`] back for a partition committed at `offset`.
    pub fn from_commit_metadata(offset: i64, metadata: &str) -> Option<ResumePoint> {
        use base64::Engine as _;
        let mut parts = metadata.split(';');
        if parts.next()? != "ts1" {
            return None;
        }
        let consumed_until: i64 = parts.next()?.parse().ok()?;
        let mode = parts.next()?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next()?)
            .ok()?;
        if consumed_until <= offset {
            return None;
        }
        let (mut listed, mut prev, mut gap, mut shift) = (Vec::new(), offset - 1, 0u64, 0u32);
        for b in bytes {
            gap |= u64::from(b & 0x7f) << shift;
            if b & 0x80 != 0 {
                shift += 7;
                if shift > 63 {
                    return None;
                }
                continue;
            }
            let o = prev.checked_add(i64::try_from(gap).ok()?)?.checked_add(1)?;
            if o >= consumed_until {
                return None;
            }
            listed.push(o);
            (prev, gap, shift) = (o, 0, 0);
        }
        let unapplied = match mode {
            "u" => listed,
            "a" => {
                let applied: std::collections::HashSet<i64> = listed.into_iter().collect();
                (offset..consumed_until)
                    .filter(|o| !applied.contains(o))
                    .collect()
            }
            _ => return None,
        };
        Some(ResumePoint {
            offset,
            consumed_until,
            unapplied,
        })
    }

    /// This run's point of a partition (`current`) completed with an earlier one: offsets this
    /// run has not read yet keep the earlier point's verdict, so a checkpoint written before the
    /// partition was re-read that far does not forget what the model already holds.
    pub fn merge(
        current: Option<ResumePoint>,
        earlier: Option<&ResumePoint>,
    ) -> Option<ResumePoint> {
        match (current, earlier) {
            (None, e) => e.cloned(),
            (Some(c), None) => Some(c),
            (Some(c), Some(e)) if c.consumed_until >= e.consumed_until => Some(c),
            (Some(c), Some(e)) => {
                let mut unapplied = c.unapplied;
                unapplied.extend(
                    e.unapplied
                        .iter()
                        .copied()
                        .filter(|o| *o >= c.consumed_until),
                );
                unapplied.sort_unstable();
                unapplied.dedup();
                Some(ResumePoint {
                    offset: c.offset,
                    consumed_until: e.consumed_until,
                    unapplied,
                })
            }
        }
    }

    /// True if `offset` was applied before the checkpoint.
    pub fn already_applied(&self, offset: i64) -> bool {
        offset >= self.offset
            && offset < self.consumed_until
            && self.unapplied.binary_search(&offset).is_err()
    }
}

/// Per-partition resume points, keyed by topic name and partition.
pub type ResumeMap = BTreeMap<(String, i32), ResumePoint>;

/// Counts of acknowledgements, for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckOutcome {
    /// References released.
    pub applied: usize,
    /// Acknowledgements for revoked partitions or earlier epochs, ignored.
    pub stale: usize,
}

/// Tracks open references per partition. Shared by the ingest loop, the Kafka rebalance
/// callback and the trainer (which acknowledges).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
    /// Held across a training step and across a revocation (see the module docs).
    step: Mutex<()>,
    /// The last known resume point of each partition this model has read: from the checkpoint
    /// it was restored from, or from the revocation that took the partition away. A checkpoint
    /// written while a partition is away, or not re-read that far yet, carries it forward.
    carried: Mutex<HashMap<PartitionKey, ResumePoint>>,
    /// `Some` when periodic commits follow checkpoints ([`Self::commit_at_checkpoints`]): the
    /// offset of each assigned partition as of the newest checkpoint.
    checkpointed: Mutex<Option<HashMap<PartitionKey, i64>>>,
}

#[derive(Debug, Default)]
struct Inner {
    parts: HashMap<PartitionKey, PartitionState>,
    next_epoch: u32,
}

impl Inner {
    fn applied_offsets(&self) -> BTreeMap<PartitionKey, i64> {
        self.parts
            .iter()
            .filter_map(|(k, p)| p.committable().map(|c| (*k, c)))
            .collect()
    }
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that carries the resume points a model was restored with into its next
    /// checkpoints, until the partitions are read past them.
    pub fn with_resume(resume: HashMap<PartitionKey, ResumePoint>) -> Self {
        OffsetTracker {
            carried: Mutex::new(resume),
            ..Self::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the process, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking a newly assigned partition; returns its epoch.
    pub fn assign(&self, key: PartitionKey) -> u32 {
        let mut g = self.lock();
        g.next_epoch += 1;
        let epoch = g.next_epoch;
        g.parts.insert(
            key,
            PartitionState {
                epoch,
                pending: BTreeMap::new(),
                next: None,
                stored: None,
            },
        );
        epoch
    }

    /// Stops tracking a revoked partition; returns its final committable offset.
    pub fn revoke(&self, key: PartitionKey) -> Option<i64> {
        self.revoke_all(&[key]).pop().flatten().map(|r| r.offset)
    }

    /// Stops tracking revoked partitions once no step is in progress; returns each one's final
    /// resume point (in order): the committable offset plus what above it was applied, so the
    /// next owner can skip it. Examples of these partitions still in flight are stale from now
    /// on: [`Self::is_current`] is false for them and the trainer drops them.
    pub fn revoke_all(&self, keys: &[PartitionKey]) -> Vec<Option<ResumePoint>> {
        let _no_step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = self.lock();
        if let Some(map) = self
            .checkpointed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            // The revocation commits what was applied; an older checkpoint's offset must not
            // move the group's commit back once the partition is someone else's.
            for k in keys {
                map.remove(k);
            }
        }
        let mut carried = self.carried.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .map(|k| {
                let point = g.parts.remove(k).and_then(|p| p.resume_point());
                let merged = ResumePoint::merge(point, carried.get(k));
                if let Some(m) = &merged {
                    carried.insert(*k, m.clone());
                }
                merged
            })
            .collect()
    }

    /// The last known resume point of a partition this model read (see `carried`).
    pub fn carried(&self, key: PartitionKey) -> Option<ResumePoint> {
        self.carried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }

    /// Held by the trainer from filtering a batch ([`Self::is_current`]) to acknowledging it,
    /// so a revocation waits for the step in progress instead of racing it.
    pub fn begin_step(&self) -> std::sync::MutexGuard<'_, ()> {
        self.step.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while `origin`'s partition is assigned under the epoch it was consumed in.
    pub fn is_current(&self, origin: &Origin) -> bool {
        self.lock()
            .parts
            .get(&(origin.topic, origin.partition))
            .is_some_and(|p| p.epoch == origin.epoch)
    }

    /// The epoch of an assigned partition.
    pub fn epoch(&self, key: PartitionKey) -> Option<u32> {
        self.lock().parts.get(&key).map(|p| p.epoch)
    }

    /// Registers a consumed message with `refs` outstanding references (0: applied already).
    /// Returns false if the partition is not assigned under that epoch.
    pub fn open(&self, origin: Origin, refs: u32) -> bool {
        let mut g = self.lock();
        let Some(p) = g.parts.get_mut(&(origin.topic, origin.partition)) else {
            return false;
        };
        if p.epoch != origin.epoch {
            return false;
        }
        if refs > 0 {
            *p.pending.entry(origin.offset).or_insert(0) += refs;
        }
        p.next = Some(
            p.next
                .map_or(origin.offset + 1, |n| n.max(origin.offset + 1)),
        );
        true
    }

    /// Releases one reference for each origin (a trainer acknowledgement or a joiner release).
    pub fn ack(&self, origins: &[Origin]) -> AckOutcome {
        let mut g = self.lock();
        let mut outcome = AckOutcome::default();
        for o in origins {
            let Some(p) = g.parts.get_mut(&(o.topic, o.partition)) else {
                outcome.stale += 1;
                continue;
            };
            if p.epoch != o.epoch {
                outcome.stale += 1;
                continue;
            }
            match p.pending.get_mut(&o.offset) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    p.pending.remove(&o.offset);
                }
                None => {
                    outcome.stale += 1;
                    continue;
                }
            }
            outcome.applied += 1;
        }
        outcome
    }

    /// Committable offsets that changed since the last call (for `store_offsets`).
    pub fn take_changed(&self) -> Vec<(PartitionKey, i64)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for (key, p) in g.parts.iter_mut() {
            if let Some(c) = p.committable() {
                if p.stored != Some(c) {
                    p.stored = Some(c);
                    out.push((*key, c));
                }
            }
        }
        out
    }

    /// From now on the offsets to commit ([`Self::offsets_to_commit`]) are those of the newest
    /// checkpoint ([`Self::checkpointed`]), not the applied ones: a crash restarts from the
    /// checkpoint, and a partition the checkpoint does not name starts from the group's
    /// commit, which must then not hold examples only the lost steps had trained. A trainer
    /// that checkpoints sets this; ingestion alone commits what was applied.
    pub fn commit_at_checkpoints(&self) {
        let mut c = self.checkpointed.lock().unwrap_or_else(|p| p.into_inner());
        c.get_or_insert_with(HashMap::new);
    }

    /// A checkpoint holding these resume points was written: its offsets become committable
    /// for the partitions assigned now (one taken away since is its new owner's to commit).
    pub fn checkpointed(&self, points: impl IntoIterator<Item = (PartitionKey, i64)>) {
        let g = self.lock();
        let mut c = self.checkpointed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = c.as_mut() {
            for (key, offset) in points {
                if g.parts.contains_key(&key) {
                    map.insert(key, offset);
                }
            }
        }
    }

    /// What to commit now, per assigned partition: the newest checkpoint's offset when commits
    /// follow checkpoints, else the first offset not yet applied.
    pub fn offsets_to_commit(&self) -> BTreeMap<PartitionKey, i64> {
        // `inner` before `checkpointed`, the order every path takes (a revocation and the
        // trainer's `checkpointed` included), so no two threads wait on each other.
        let g = self.lock();
        let c = self.checkpointed.lock().unwrap_or_else(|p| p.into_inner());
        match c.as_ref() {
            None => g.applied_offsets(),
            Some(map) => map
                .iter()
                .filter(|(k, _)| g.parts.contains_key(k))
                .map(|(k, o)| (*k, *o))
                .collect(),
        }
    }

    /// Per assigned partition, the first offset not yet applied ("applied up to").
    pub fn applied_offsets(&self) -> BTreeMap<PartitionKey, i64> {
        self.lock().applied_offsets()
    }

    /// Exact resume points for a checkpoint: every assigned partition's, merged with what is
    /// known of partitions not read that far (or not assigned) in this run.
    pub fn resume_points(&self, topics: &[String]) -> ResumeMap {
        let g = self.lock();
        let carried = self.carried.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys: std::collections::BTreeSet<PartitionKey> = g.parts.keys().copied().collect();
        keys.extend(carried.keys().copied());
        let mut out = ResumeMap::new();
        for key in keys {
            let current = g.parts.get(&key).and_then(PartitionState::resume_point);
            let (Some(point), Some(name)) = (
                ResumePoint::merge(current, carried.get(&key)),
                topics.get(usize::from(key.0)),
            ) else {
                continue;
            };
            out.insert((name.clone(), key.1), point);
        }
        out
    }

    /// One past the highest offset processed of an assigned partition (`None` before its
    /// first message).
    pub fn consumed_until(&self, key: PartitionKey) -> Option<i64> {
        self.lock().parts.get(&key).and_then(|p| p.next)
    }

    /// Total references outstanding (examples in flight plus held impressions).
    pub fn outstanding(&self) -> u64 {
        self.lock()
            .parts
            .values()
            .flat_map(|p| p.pending.values())
            .map(|n| u64::from(*n))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(offset: i64, epoch: u32) -> Origin {
        Origin {
            topic: 0,
            partition: 3,
            offset,
            epoch,
        }
    }

    #[test]
    fn commits_that_follow_checkpoints_never_pass_the_newest_checkpoint() {
        let t = OffsetTracker::new();
        t.commit_at_checkpoints();
        let (a, b) = ((0, 3), (0, 4));
        let (ea, eb) = (t.assign(a), t.assign(b));
        let at = |key: PartitionKey, offset: i64, epoch: u32| Origin {
            topic: key.0,
            partition: key.1,
            offset,
            epoch,
        };
        for i in 0..10 {
            assert!(t.open(at(a, i, ea), 1));
        }
        t.ack(&(0..10).map(|i| at(a, i, ea)).collect::<Vec<_>>());
        // Applied, not checkpointed: nothing to commit yet.
        assert_eq!(t.applied_offsets()[&a], 10);
        assert!(t.offsets_to_commit().is_empty());
        let resume = t.resume_points(&["events".to_owned()]);
        t.checkpointed(resume.iter().map(|((_, p), r)| ((0, *p), r.offset)));
        // Partition b is first read after the checkpoint and trained: still nothing of it to
        // commit (a crash restarts b from the group's commit; before, it had moved past the
        // clicks the checkpoint never held, and they were lost).
        assert!(t.open(at(b, 0, eb), 1));
        t.ack(&[at(b, 0, eb)]);
        assert_eq!(t.applied_offsets()[&b], 1);
        assert_eq!(t.offsets_to_commit(), BTreeMap::from([(a, 10)]));
        // A revocation hands a over with its own commit; the old checkpoint offset goes.
        t.revoke_all(&[a]);
        assert!(t.offsets_to_commit().is_empty());
        // Without the mode, the applied offsets are committed as before.
        let plain = OffsetTracker::new();
        let e = plain.assign(a);
        assert!(plain.open(at(a, 0, e), 1));
        plain.ack(&[at(a, 0, e)]);
        assert_eq!(plain.offsets_to_commit(), BTreeMap::from([(a, 1)]));
    }

    #[test]
    fn committable_offset_waits_for_the_oldest_reference() {
        let t = OffsetTracker::new();
        let e = t.assign((0, 3));
        assert!(t.open(o(10, e), 1));
        assert!(t.open(o(11, e), 0));
        assert!(t.open(o(12, e), 2));
        assert_eq!(t.applied_offsets()[&(0, 3)], 10);
        t.ack(&[o(12, e)]);
        assert_eq!(t.applied_offsets()[&(0, 3)], 10);
        t.ack(&[o(10, e)]);
        assert_eq!(t.applied_offsets()[&(0, 3)], 12);
        t.ack(&[o(12, e)]);
        assert_eq!(t.applied_offsets()[&(0, 3)], 13);
        assert_eq!(t.take_changed(), vec![((0, 3), 13)]);
        assert!(t.take_changed().is_empty());
    }

    #[test]
    fn acks_after_revocation_are_stale() {
        let t = OffsetTracker::new();
        let e1 = t.assign((0, 3));
        t.open(o(5, e1), 1);
        assert_eq!(t.revoke((0, 3)), Some(5));
        let e2 = t.assign((0, 3));
        assert_ne!(e1, e2);
        let out = t.ack(&[o(5, e1)]);
        assert_eq!(
            out,
            AckOutcome {
                applied: 0,
                stale: 1
            }
        );
        assert!(!t.open(o(6, e1), 1));
        // Double acknowledgement is stale too.
        t.open(o(5, e2), 1);
        assert_eq!(
            t.ack(&[o(5, e2), o(5, e2)]),
            AckOutcome {
                applied: 1,
                stale: 1
            }
        );
    }

    #[test]
    fn resume_points_list_the_gaps() {
        let t = OffsetTracker::new();
        let e = t.assign((0, 3));
        for off in 0..6 {
            t.open(o(off, e), 1);
        }
        t.ack(&[o(0, e), o(2, e), o(3, e), o(5, e)]);
        let r = &t.resume_points(&["events".into()])[&("events".into(), 3)];
        assert_eq!(r.offset, 1);
        assert_eq!(r.consumed_until, 6);
        assert_eq!(r.unapplied, vec![1, 4]);
        assert!(r.already_applied(2) && r.already_applied(5));
        assert!(!r.already_applied(1) && !r.already_applied(4) && !r.already_applied(6));
    }

    /// Killed after a checkpoint, restarted, re-read only part of the gap, checkpointed again:
    /// the new checkpoint still says which offsets beyond what was re-read were applied, and
    /// keeps partitions not assigned (yet) in this run. It forgot both before, and the next
    /// restart trained them twice.
    #[test]
    fn a_checkpoint_carries_forward_what_this_run_has_not_re_read() {
        let restored = ResumePoint {
            offset: 10,
            consumed_until: 100,
            unapplied: vec![10, 50],
        };
        let away = ResumePoint {
            offset: 7,
            consumed_until: 7,
            unapplied: vec![],
        };
        let t = OffsetTracker::with_resume(HashMap::from([
            ((0, 3), restored.clone()),
            ((0, 4), away.clone()),
        ]));
        let e = t.assign((0, 3));
        t.open(o(10, e), 1); // the held impression, again
        for off in 11..20 {
            t.open(o(off, e), 0); // applied before the checkpoint: skipped
        }
        let points = t.resume_points(&["events".into()]);
        assert_eq!(points[&("events".into(), 3)], restored);
        assert_eq!(points[&("events".into(), 4)], away);
        // Read past the restored point: this run's own point takes over.
        for off in 20..120 {
            t.open(o(off, e), u32::from(off == 50));
        }
        let p = &t.resume_points(&["events".into()])[&("events".into(), 3)];
        assert_eq!((p.offset, p.consumed_until), (10, 120));
        assert_eq!(p.unapplied, vec![10, 50]);
    }

    #[test]
    fn commit_metadata_round_trips_and_fits_thousands_of_held_offsets() {
        // 5,000 held impressions among 6,500 offsets: the applied ones are listed instead.
        let unapplied: Vec<i64> = (1000..7500).filter(|o| o % 13 >= 3).collect();
        let p = ResumePoint {
            offset: 1000,
            consumed_until: 7500,
            unapplied,
        };
        let text = p.to_commit_metadata().expect("fits");
        assert!(text.len() < MAX_COMMIT_METADATA, "{} bytes", text.len());
        assert_eq!(ResumePoint::from_commit_metadata(1000, &text), Some(p));
        let sparse = ResumePoint {
            offset: 5,
            consumed_until: 1_000_000,
            unapplied: vec![5, 70, 999_999],
        };
        let text = sparse.to_commit_metadata().unwrap();
        assert_eq!(ResumePoint::from_commit_metadata(5, &text), Some(sparse));
        assert_eq!(ResumePoint::from_commit_metadata(5, "garbage"), None);
        assert_eq!(ResumePoint::from_commit_metadata(5, "ts1;9;x;AA"), None);
        assert_eq!(
            ResumePoint::from_commit_metadata(5, "ts1;9;u;Pw"),
            None,
            "beyond the range"
        );
    }

    proptest::proptest! {
        /// Whatever the ack order, the committable offset never passes an unacknowledged one.
        #[test]
        fn never_commits_past_a_pending_offset(acks in proptest::collection::vec(0i64..50, 0..80)) {
            let t = OffsetTracker::new();
            let e = t.assign((0, 3));
            for off in 0..50 { t.open(o(off, e), 1); }
            let mut done = std::collections::BTreeSet::new();
            for a in acks {
                if done.insert(a) { t.ack(&[o(a, e)]); }
                let c = t.applied_offsets()[&(0, 3)];
                let first_pending = (0..50).find(|x| !done.contains(x)).unwrap_or(50);
                proptest::prop_assert_eq!(c, first_pending);
            }
        }
    }
}
