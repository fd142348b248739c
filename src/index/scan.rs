//! The scoring kernel every exact scan runs on: inner products of a query with contiguous
//! rows, and the best of them kept on the way.
//!
//! A recall request scans thousands to a hundred thousand vectors (the lists a search picks,
//! a catalogue's distinct vectors, a small catalogue whole). Profiling the freshness bench at
//! 1,000 requests/s showed a quarter of all CPU in a per-row `dot` built for baseline x86-64,
//! plus a vector of every score allocated and partitioned per request. Here rows are scored
//! a block at a time with AVX2 and FMA when the CPU has them (detected at run time, so one
//! binary runs everywhere), and only rows that beat the current floor of the best are kept:
//! a top 100 of 100k rows touches a few hundred candidates, not 100k.

use super::Hit;

/// Rows scored per block (their scores live on the stack).
const BLOCK: usize = 256;

/// Inner product of `a` and `b` (equal lengths).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len().is_multiple_of(8) && has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); lengths are equal multiples
        // of 8 (`a` checked, `b` by the callers' contract, and `avx2::dot` reads only
        // `a.len()` of each after asserting it).
        return unsafe { avx2::dot(a, b) };
    }
    portable_dot(a, b)
}

/// Scores of every `dim`-wide row of `rows` against `query`, into `out` (one per row).
pub fn score_rows(rows: &[f32], dim: usize, query: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dim.is_multiple_of(8) && query.len() == dim && has_avx2_fma() {
        let n = (rows.len() / dim).min(out.len());
        let whole = n - n % 8;
        for (rows8, s8) in rows[..whole * dim]
            .chunks_exact(8 * dim)
            .zip(out.chunks_exact_mut(8))
        {
            // SAFETY: features checked; 8 rows of `dim` (a multiple of 8) and a query of `dim`.
            unsafe { avx2::dot8(rows8, query, s8) };
        }
        for (row, s) in rows[whole * dim..n * dim]
            .chunks_exact(dim)
            .zip(&mut out[whole..n])
        {
            // SAFETY: as in `dot`: features checked, both slices `dim` long, a multiple of 8.
            *s = unsafe { avx2::dot(row, query) };
        }
        return;
    }
    for (row, s) in rows.chunks_exact(dim).zip(out.iter_mut()) {
        *s = portable_dot(row, query);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    // The std macro caches its answer; this is an atomic load after the first call.
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Eight independent accumulators, so baseline SSE code still vectorises.
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `a · b` for lengths that are equal multiples of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert!(b.len() >= a.len() && a.len().is_multiple_of(8));
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        // Two accumulators hide the FMA latency for the common widths (16, 32, 64).
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i < n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(one)
    }

    /// The scores of 8 consecutive rows of `query.len()` (a multiple of 8) into `out[..8]`:
    /// one accumulator per row, summed across lanes together at the end (a horizontal sum
    /// per row would cost more than the products at the model's width of 16).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot8(rows: &[f32], query: &[f32], out: &mut [f32]) {
        let dim = query.len();
        assert!(dim.is_multiple_of(8) && rows.len() >= 8 * dim && out.len() >= 8);
        let (pr, pq) = (rows.as_ptr(), query.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < dim {
            let q = _mm256_loadu_ps(pq.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(pr.add(r * dim + i)), q, *a);
            }
            i += 8;
        }
        // Pairwise sums: after two rounds each 128-bit half holds four rows' partial sums.
        let t0 = _mm256_hadd_ps(acc[0], acc[1]);
        let t1 = _mm256_hadd_ps(acc[2], acc[3]);
        let t2 = _mm256_hadd_ps(acc[4], acc[5]);
        let t3 = _mm256_hadd_ps(acc[6], acc[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let low = _mm256_permute2f128_ps(u0, u1, 0x20);
        let high = _mm256_permute2f128_ps(u0, u1, 0x31);
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(low, high));
    }
}

/// Every `dim`-wide row of `rows` scored against `query`, row `i` keyed `key_of(i)`, in row
/// order.
pub fn every_hit(
    rows: &[f32],
    dim: usize,
    query: &[f32],
    key_of: impl Fn(usize) -> u64,
) -> Vec<Hit> {
    let mut scores = vec![0f32; rows.len() / dim.max(1)];
    score_rows(rows, dim, query, &mut scores);
    scores
        .into_iter()
        .enumerate()
        .map(|(i, score)| Hit {
            key: key_of(i),
            score,
        })
        .collect()
}

/// The best `want` hits of everything offered (ties at the cut broken arbitrarily), without
/// keeping every score: candidates below the floor of a full set are dropped as they come.
pub struct Best {
    want: usize,
    hits: Vec<Hit>,
    /// Every kept set of `want` scores at least this; a row must beat it to be kept.
    floor: f32,
}

impl Best {
    /// Keeps the best `want` (at least 1).
    pub fn new(want: usize) -> Best {
        let want = want.max(1);
        Best {
            want,
            hits: Vec::with_capacity(4 * want),
            floor: f32::NEG_INFINITY,
        }
    }

    /// Offers the `dim`-wide `rows`; row `i` is keyed `key_of(i)` and kept only if `keep`
    /// accepts that key (asked only of rows that beat the floor).
    pub fn offer_rows(
        &mut self,
        rows: &[f32],
        dim: usize,
        query: &[f32],
        key_of: impl Fn(usize) -> u64,
        keep: impl Fn(u64) -> bool,
    ) {
        let mut scores = [0f32; BLOCK];
        for (b, block) in rows.chunks(BLOCK * dim.max(1)).enumerate() {
            let n = block.len() / dim.max(1);
            score_rows(block, dim, query, &mut scores[..n]);
            for (i, &score) in scores[..n].iter().enumerate() {
                if score > self.floor {
                    let key = key_of(b * BLOCK + i);
                    if keep(key) {
                        self.push(Hit { key, score });
                    }
                }
            }
        }
    }

    /// Offers one scored hit.
    pub fn push(&mut self, hit: Hit) {
        if hit.score <= self.floor {
            return;
        }
        self.hits.push(hit);
        if self.hits.len() >= 4 * self.want {
            self.shrink();
        }
    }

    /// Keeps the best `want` and raises the floor to the worst of them.
    fn shrink(&mut self) {
        let order = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score);
        if self.hits.len() > self.want {
            self.hits.select_nth_unstable_by(self.want - 1, order);
            self.hits.truncate(self.want);
        }
        if self.hits.len() == self.want {
            self.floor = self
                .hits
                .iter()
                .map(|h| h.score)
                .fold(f32::INFINITY, f32::min);
        }
    }

    /// True when an offered hit may have been dropped (the best `want` are kept, not every
    /// hit offered).
    pub fn dropped(&self) -> bool {
        self.floor > f32::NEG_INFINITY || self.hits.len() > self.want
    }

    /// The best `want`, best first (ties by key).
    pub fn into_sorted(mut self) -> Vec<Hit> {
        self.shrink();
        self.hits
            .sort_by(|a, b| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key)));
        self.hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::sampler::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn the_kernel_agrees_with_a_plain_sum_at_every_width() {
        for dim in [1, 3, 8, 16, 24, 32, 40, 64, 100, 128] {
            let (a, b) = (random(dim, dim as u64), random(dim, 1000 + dim as u64));
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let got = dot(&a, &b);
            assert!(
                (got - plain).abs() <= 1e-4 * (1.0 + plain.abs()),
                "dim {dim}: {got} vs {plain}"
            );
            let rows = random(dim * 300, 7);
            let mut out = vec![0f32; 300];
            score_rows(&rows, dim, &a, &mut out);
            for (r, s) in rows.chunks_exact(dim).zip(&out) {
                assert!((s - portable_dot(r, &a)).abs() <= 1e-4 * (1.0 + s.abs()));
            }
        }
    }

    #[test]
    fn best_keeps_what_a_full_sort_keeps_and_asks_the_filter_only_above_the_floor() {
        let (dim, n) = (16, 20_000);
        let rows = random(dim * n, 1);
        let query = random(dim, 2);
        let odd = |key: u64| key % 2 == 1;
        let asked = std::cell::Cell::new(0usize);
        let mut best = Best::new(100);
        best.offer_rows(
            &rows,
            dim,
            &query,
            |i| i as u64,
            |key| {
                asked.set(asked.get() + 1);
                odd(key)
            },
        );
        let got = best.into_sorted();
        let mut all: Vec<Hit> = rows
            .chunks_exact(dim)
            .enumerate()
            .filter(|(i, _)| odd(*i as u64))
            .map(|(i, r)| Hit {
                key: i as u64,
                score: portable_dot(r, &query),
            })
            .collect();
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        assert_eq!(got.len(), 100);
        for (g, e) in got.iter().zip(&all) {
            assert!((g.score - e.score).abs() < 1e-5, "{g:?} vs {e:?}");
        }
        // The point of the floor: most rows never reach the (costly) filter.
        assert!(asked.get() < n / 4, "filter asked {} times", asked.get());
    }
}
