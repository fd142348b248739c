//! Stable hashing shared by every stage: the frequency estimator's buckets, the admission
//! sketch and accidental-hit keys are checkpointed, so the hash must not change between runs,
//! platforms or Rust versions (std's `DefaultHasher` promises none of that).

/// 64-bit FNV-1a, stable across runs and platforms.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
