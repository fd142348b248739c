//! The article's training objectives, as pure functions of tower outputs.
//!
//! | mode | loss | negatives |
//! |---|---|---|
//! | [`in_batch_softmax`] (YoutubeSBC) | softmax CE, logits `s/τ − log q` | the batch's other positives (+ mixed) |
//! | [`sampled_softmax`] (YoutubeDNN) | softmax CE over `s/τ − log(k·q)`, positive at index 0 | k sampled per positive |
//! | [`pointwise_bce`] (DSSM) | binary CE on `s/τ` | sampled + shown-not-clicked, label 0 |
//! | [`pairwise_bpr`] (FacebookDSSM) | `−log σ((s⁺ − s⁻)/τ)` | one sampled per positive |
//!
//! Sampled negatives are drawn with replacement and can be the row's own positive item (an
//! accidental hit): the list-wise modes mask such a logit, the point-wise and pair-wise ones
//! give the term weight 0 — otherwise the positive item is trained as its own negative.

use tch::{Kind, Reduction, Tensor};

/// Logit given to masked entries (accidental hits): softmax weight exactly 0 in f32/f64.
pub const MASKED_LOGIT: f64 = -1e9;

/// In-batch logits `[B, N]`: `u·vᵀ/τ − log q`, with `mask` entries set to [`MASKED_LOGIT`].
///
/// `u` is `[B, d]`, `v` is `[N, d]` with the B positives first (row i of `v` is the positive of
/// row i of `u`), `log_q` is `[N]`, `mask` is `[B, N]` (true = accidental hit: the same item
/// as the row's positive, off the diagonal).
pub fn in_batch_logits(u: &Tensor, v: &Tensor, log_q: &Tensor, mask: &Tensor, tau: f64) -> Tensor {
    (u.matmul(&v.tr()) / tau - log_q.unsqueeze(0)).masked_fill(mask, MASKED_LOGIT)
}

/// YoutubeSBC batch softmax: `−(1/B) Σᵢ rᵢ · log softmax(logitsᵢ)[i]`.
pub fn in_batch_softmax(
    u: &Tensor,
    v: &Tensor,
    log_q: &Tensor,
    mask: &Tensor,
    reward: &Tensor,
    tau: f64,
) -> Tensor {
    let logits = in_batch_logits(u, v, log_q, mask, tau);
    let b = u.size()[0];
    let diag = Tensor::arange(b, (Kind::Int64, u.device()));
    let log_p = logits
        .log_softmax(1, logits.kind())
        .gather(1, &diag.unsqueeze(1), false)
        .squeeze_dim(1);
    -(log_p * reward).mean(logits.kind())
}

/// The accidental-hit mask: `item_keys[j] == item_keys[i]` for `j != i`, over `[B, N]`.
pub fn accidental_hits(row_keys: &Tensor, col_keys: &Tensor) -> Tensor {
    let b = row_keys.size()[0];
    let n = col_keys.size()[0];
    let same = row_keys.unsqueeze(1).eq_tensor(&col_keys.unsqueeze(0));
    let eye = Tensor::eye_m(b, n, (Kind::Bool, row_keys.device()));
    same.logical_and(&eye.logical_not())
}

/// YoutubeDNN sampled softmax with the sampled-softmax correction (Jean et al. 2015; TF's
/// `sampled_softmax_loss`): `u [B, d]`, `pos [B, d]`, `neg [B, k, d]`, positive at index 0.
///
/// `log_q` is `[B, 1 + k]`, the log of the expected count `k·q(item)` of each candidate under
/// the proposal (0 for none): with it, the sampled softmax estimates the full softmax whatever
/// the proposal, instead of a softmax in which popular items are over-represented. `hits` is
/// `[B, k]` (true = the negative is the row's positive item), masked out.
pub fn sampled_softmax(
    u: &Tensor,
    pos: &Tensor,
    neg: &Tensor,
    log_q: &Tensor,
    hits: &Tensor,
    tau: f64,
) -> Tensor {
    let s_pos = (u * pos).sum_dim_intlist(1, true, u.kind());
    let s_neg = neg.matmul(&u.unsqueeze(2)).squeeze_dim(2);
    let b = u.size()[0];
    let mask = Tensor::cat(
        &[
            Tensor::zeros([b, 1], (Kind::Bool, u.device())),
            hits.shallow_clone(),
        ],
        1,
    );
    let logits = (Tensor::cat(&[s_pos, s_neg], 1) / tau - log_q).masked_fill(&mask, MASKED_LOGIT);
    -logits.log_softmax(1, u.kind()).select(1, 0).mean(u.kind())
}

/// Mean of `losses` weighted by `weights` (0 = the term does not count); 0 when all are 0.
fn weighted_mean(losses: &Tensor, weights: &Tensor) -> Tensor {
    (losses * weights).sum(losses.kind()) / weights.sum(losses.kind()).clamp_min(1e-12)
}

/// DSSM point-wise: binary cross-entropy of `(u·v)/τ` against `labels` (1 click, 0
/// negative), each term weighted by `weights` (0 for a sampled negative that is the user's
/// own positive item).
pub fn pointwise_bce(
    u: &Tensor,
    v: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    tau: f64,
) -> Tensor {
    let logits = (u * v).sum_dim_intlist(1, false, u.kind()) / tau;
    let each =
        logits.binary_cross_entropy_with_logits::<Tensor>(labels, None, None, Reduction::None);
    weighted_mean(&each, weights)
}

/// FacebookDSSM pair-wise BPR: `−log σ((u·v⁺ − u·v⁻)/τ)`, each pair weighted by `weights`
/// (0 when the negative is the positive item itself).
pub fn pairwise_bpr(u: &Tensor, pos: &Tensor, neg: &Tensor, weights: &Tensor, tau: f64) -> Tensor {
    let diff = ((u * pos).sum_dim_intlist(1, false, u.kind())
        - (u * neg).sum_dim_intlist(1, false, u.kind()))
        / tau;
    weighted_mean(&-diff.log_sigmoid(), weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const D: (Kind, Device) = (Kind::Double, Device::Cpu);

    /// Checks d loss / d x against central finite differences for every element of x.
    fn check_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
        let x = x.detach().set_requires_grad(true);
        let loss = f(&x);
        loss.backward();
        let analytic = x.grad().view([-1]);
        let flat = x.detach().view([-1]);
        let eps = 1e-6;
        for i in 0..flat.size()[0] {
            let bump = |delta: f64| {
                let y = flat.copy();
                let _ = y.get(i).fill_(flat.double_value(&[i]) + delta);
                f(&y.view(x.size().as_slice())).double_value(&[])
            };
            let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
            let a = analytic.double_value(&[i]);
            assert!(
                (a - numeric).abs() < 1e-5 * (1.0 + numeric.abs()),
                "element {i}: autograd {a} vs numeric {numeric}"
            );
        }
    }

    fn data() -> (Tensor, Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let u = Tensor::randn([3, 4], D);
        let v = Tensor::randn([5, 4], D); // 3 positives + 2 mixed negatives
        let log_q = Tensor::from_slice(&[0.02f64, 0.5, 0.1, 0.3, 0.3]).log();
        let keys = Tensor::from_slice(&[10i64, 11, 10, 12, 13]);
        let mask = accidental_hits(&keys.narrow(0, 0, 3), &keys);
        (u, v, log_q, mask)
    }

    #[test]
    fn in_batch_softmax_gradients_match_finite_differences() {
        let (u, v, log_q, mask) = data();
        let r = Tensor::from_slice(&[1.0f64, 2.0, 0.5]);
        check_grad(&u, &|x| in_batch_softmax(x, &v, &log_q, &mask, &r, 0.2));
        check_grad(&v, &|x| in_batch_softmax(&u, x, &log_q, &mask, &r, 0.2));
    }

    #[test]
    fn other_losses_gradients_match_finite_differences() {
        tch::manual_seed(3);
        let u = Tensor::randn([3, 4], D);
        let pos = Tensor::randn([3, 4], D);
        let neg = Tensor::randn([3, 2, 4], D);
        let neg1 = Tensor::randn([3, 4], D);
        let labels = Tensor::from_slice(&[1.0f64, 0.0, 1.0]);
        let weights = Tensor::from_slice(&[1.0f64, 0.0, 1.0]);
        let log_q = Tensor::from_slice(&[0.1f64, 0.5, 0.2, 0.3, 0.3, 0.9, 0.1, 0.6, 0.2])
            .log()
            .view([3, 3]);
        let hits = Tensor::from_slice(&[false, true, false, false, false, false]).view([3, 2]);
        check_grad(&u, &|x| sampled_softmax(x, &pos, &neg, &log_q, &hits, 0.5));
        check_grad(&neg, &|x| sampled_softmax(&u, &pos, x, &log_q, &hits, 0.5));
        check_grad(&u, &|x| pointwise_bce(x, &pos, &labels, &weights, 0.5));
        check_grad(&pos, &|x| pairwise_bpr(&u, x, &neg1, &weights, 0.5));
        check_grad(&neg1, &|x| pairwise_bpr(&u, &pos, x, &weights, 0.5));
    }

    /// The gradient of the sampled softmax with respect to the user vector, averaged over
    /// many draws from a skewed proposal, against the full softmax's: with the log-Q
    /// correction it is the full softmax's; without it, popular items pull too hard.
    ///
    /// Averaged over eight random catalogues: the corrected estimator is consistent, not
    /// unbiased at a finite k, and one catalogue's error swings with its geometry.
    #[test]
    fn corrected_sampled_softmax_follows_the_full_softmax_under_a_skewed_proposal() {
        let seeds = 1..=8u64;
        let runs = seeds.clone().count() as f64;
        let (mut corrected, mut raw) = (0.0, 0.0);
        for seed in seeds {
            let (c, r) = sampled_gradient_errors(seed);
            corrected += c / runs;
            raw += r / runs;
        }
        assert!(
            corrected < 0.1,
            "corrected: mean relative error {corrected}"
        );
        assert!(
            raw > 3.0 * corrected,
            "uncorrected {raw} vs corrected {corrected}"
        );
    }

    /// Relative errors of the mean sampled-softmax gradient, with and without the log-Q
    /// correction, against the full softmax's, on a catalogue drawn from `seed`.
    fn sampled_gradient_errors(seed: u64) -> (f64, f64) {
        // The data come from a local generator: libtorch's global one is shared with the
        // tests running in parallel, whose draws would change these vectors run to run.
        let mut rng = crate::train::sampler::Rng::new(seed);
        let n = 30i64;
        let items = gaussian(&mut rng, n, 4);
        let u = gaussian(&mut rng, 1, 4);
        // Proposal ∝ 1/(rank+1)^1.5: the first items are drawn far more often.
        let w: Vec<f64> = (0..n).map(|j| 1.0 / ((j + 1) as f64).powf(1.5)).collect();
        let total: f64 = w.iter().sum();
        let q: Vec<f64> = w.iter().map(|x| x / total).collect();
        let (k, draws) = (64usize, 400usize);
        // The positive's own logit is corrected too (as in YoutubeSBC and TensorFlow's
        // sampled softmax); the item with k·q ≈ 1 keeps that term unscaled, so what the
        // test sees is the negatives' importance sampling.
        let positive = 8i64;
        let grad_of = |loss: &dyn Fn(&Tensor) -> Tensor| {
            let x = u.detach().set_requires_grad(true);
            loss(&x).backward();
            x.grad()
        };
        let full = grad_of(&|x| {
            let logits = x.matmul(&items.tr());
            -logits.log_softmax(1, Kind::Double).get(0).get(positive)
        });
        let mut sum_corrected = Tensor::zeros([1, 4], D);
        let mut sum_raw = Tensor::zeros([1, 4], D);
        for _ in 0..draws {
            let picks: Vec<i64> = (0..k)
                .map(|_| {
                    let mut r = rng.next_f64();
                    q.iter()
                        .position(|p| {
                            r -= p;
                            r <= 0.0
                        })
                        .unwrap_or(n as usize - 1) as i64
                })
                .collect();
            let neg = items
                .index_select(0, &Tensor::from_slice(&picks))
                .unsqueeze(0);
            let pos = items.get(positive).unsqueeze(0);
            let hits = Tensor::from_slice(&picks).eq(positive).unsqueeze(0);
            let mut lq = vec![(k as f64 * q[positive as usize]).ln()];
            lq.extend(picks.iter().map(|j| (k as f64 * q[*j as usize]).ln()));
            let log_q = Tensor::from_slice(&lq).unsqueeze(0);
            sum_corrected += grad_of(&|x| sampled_softmax(x, &pos, &neg, &log_q, &hits, 1.0));
            sum_raw +=
                grad_of(&|x| sampled_softmax(x, &pos, &neg, &log_q.zeros_like(), &hits, 1.0));
        }
        let err = |g: Tensor| {
            let g = g / draws as f64;
            (&g - &full).norm().double_value(&[]) / full.norm().double_value(&[])
        };
        (err(sum_corrected), err(sum_raw))
    }

    /// A `rows × cols` tensor of standard normal draws (Box–Muller) from `rng`.
    fn gaussian(rng: &mut crate::train::sampler::Rng, rows: i64, cols: i64) -> Tensor {
        let values: Vec<f64> = (0..rows * cols)
            .map(|_| {
                let (a, b) = (1.0 - rng.next_f64(), rng.next_f64());
                (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
            })
            .collect();
        Tensor::from_slice(&values).view([rows, cols])
    }

    #[test]
    fn a_sampled_negative_that_is_the_positive_counts_for_nothing() {
        tch::manual_seed(4);
        let u = Tensor::randn([1, 4], D);
        let pos = Tensor::randn([1, 4], D);
        let other = Tensor::randn([1, 1, 4], D);
        // Negatives: [the positive itself, another item]; the hit is masked out.
        let neg = Tensor::cat(&[pos.unsqueeze(1), other.shallow_clone()], 1);
        let hits = Tensor::from_slice(&[true, false]).view([1, 2]);
        let zeros = Tensor::zeros([1, 3], D);
        let with_hit = sampled_softmax(&u, &pos, &neg, &zeros, &hits, 1.0).double_value(&[]);
        let without = sampled_softmax(
            &u,
            &pos,
            &other,
            &Tensor::zeros([1, 2], D),
            &hits.narrow(1, 1, 1),
            1.0,
        )
        .double_value(&[]);
        assert!(
            (with_hit - without).abs() < 1e-12,
            "{with_hit} vs {without}"
        );
        // Point-wise: the positive labelled 0 with weight 0 changes nothing.
        let users = Tensor::cat(&[&u, &u, &u], 0);
        let v = Tensor::cat(&[&pos, &pos, &other.squeeze_dim(1)], 0);
        let labels = Tensor::from_slice(&[1.0f64, 0.0, 0.0]);
        let w = Tensor::from_slice(&[1.0f64, 0.0, 1.0]);
        let keep = Tensor::from_slice(&[0i64, 2]);
        let a = pointwise_bce(&users, &v, &labels, &w, 1.0).double_value(&[]);
        let b = pointwise_bce(
            &users.index_select(0, &keep),
            &v.index_select(0, &keep),
            &labels.index_select(0, &keep),
            &Tensor::ones([2], D),
            1.0,
        )
        .double_value(&[]);
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn correction_moves_each_logit_by_exactly_minus_log_q() {
        let (u, v, log_q, _) = data();
        let none = Tensor::zeros([3, 5], (Kind::Bool, Device::Cpu));
        let raw = in_batch_logits(&u, &v, &log_q.zeros_like(), &none, 0.2);
        let corrected = in_batch_logits(&u, &v, &log_q, &none, 0.2);
        let shift = corrected - raw;
        let want = (-&log_q).unsqueeze(0).expand([3, 5], false);
        assert!(shift.allclose(&want, 1e-12, 1e-12, false), "{shift}");
    }

    #[test]
    fn masked_accidental_hits_contribute_nothing() {
        let (u, v, log_q, mask) = data();
        // Row 0 and row 2 share item 10: (0, 2) and (2, 0) are masked.
        assert!(mask.int64_value(&[0, 2]) == 1 && mask.int64_value(&[2, 0]) == 1);
        assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), 2);
        let r = Tensor::ones([3], D);
        let base = in_batch_softmax(&u, &v, &log_q, &mask, &r, 0.2).double_value(&[]);
        // Moving the masked column's logit arbitrarily changes nothing for row 0's loss terms:
        // perturb log_q of column 2 only for row 0 by making the mask absorb it.
        let logits = in_batch_logits(&u, &v, &log_q, &mask, 0.2)
            .detach()
            .set_requires_grad(true);
        let diag = Tensor::arange(3, (Kind::Int64, Device::Cpu)).unsqueeze(1);
        let loss = -logits
            .log_softmax(1, Kind::Double)
            .gather(1, &diag, false)
            .mean(Kind::Double);
        loss.backward();
        let g = logits.grad();
        assert_eq!(g.double_value(&[0, 2]), 0.0);
        assert_eq!(g.double_value(&[2, 0]), 0.0);
        assert!(g.double_value(&[0, 1]).abs() > 0.0);
        // And the full loss equals the loss computed without the masked columns for those rows.
        let unmasked_row0: f64 = {
            let l = in_batch_logits(&u, &v, &log_q, &mask.zeros_like(), 0.2);
            let keep = Tensor::from_slice(&[0i64, 1, 3, 4]);
            -l.get(0)
                .index_select(0, &keep)
                .log_softmax(0, Kind::Double)
                .double_value(&[0])
        };
        let masked_row0 = -in_batch_logits(&u, &v, &log_q, &mask, 0.2)
            .get(0)
            .log_softmax(0, Kind::Double)
            .double_value(&[0]);
        assert!((unmasked_row0 - masked_row0).abs() < 1e-12);
        assert!(base.is_finite());
    }
}
