//! The article's training objectives, as pure functions of tower outputs.
//!
//! | mode | loss | negatives |
//! |---|---|---|
//! | [`in_batch_softmax`] (YoutubeSBC) | softmax CE, logits `s/τ − log q` | the batch's other positives (+ mixed) |
//! | [`sampled_softmax`] (YoutubeDNN) | softmax CE, positive at index 0 | k sampled per positive |
//! | [`pointwise_bce`] (DSSM) | binary CE on `s/τ` | sampled + shown-not-clicked, label 0 |
//! | [`pairwise_bpr`] (FacebookDSSM) | `−log σ((s⁺ − s⁻)/τ)` | one sampled per positive |

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

/// YoutubeDNN sampled softmax: `u [B, d]`, `pos [B, d]`, `neg [B, k, d]`; positive at 0.
pub fn sampled_softmax(u: &Tensor, pos: &Tensor, neg: &Tensor, tau: f64) -> Tensor {
    let s_pos = (u * pos).sum_dim_intlist(1, true, u.kind());
    let s_neg = neg.matmul(&u.unsqueeze(2)).squeeze_dim(2);
    let logits = Tensor::cat(&[s_pos, s_neg], 1) / tau;
    -logits.log_softmax(1, u.kind()).select(1, 0).mean(u.kind())
}

/// DSSM point-wise: binary cross-entropy of `(u·v)/τ` against `labels` (1 click, 0 negative).
pub fn pointwise_bce(u: &Tensor, v: &Tensor, labels: &Tensor, tau: f64) -> Tensor {
    let logits = (u * v).sum_dim_intlist(1, false, u.kind()) / tau;
    logits.binary_cross_entropy_with_logits::<Tensor>(labels, None, None, Reduction::Mean)
}

/// FacebookDSSM pair-wise BPR: `−log σ((u·v⁺ − u·v⁻)/τ)`.
pub fn pairwise_bpr(u: &Tensor, pos: &Tensor, neg: &Tensor, tau: f64) -> Tensor {
    let diff = ((u * pos).sum_dim_intlist(1, false, u.kind())
        - (u * neg).sum_dim_intlist(1, false, u.kind()))
        / tau;
    -diff.log_sigmoid().mean(u.kind())
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
        check_grad(&u, &|x| sampled_softmax(x, &pos, &neg, 0.5));
        check_grad(&neg, &|x| sampled_softmax(&u, &pos, x, 0.5));
        check_grad(&u, &|x| pointwise_bce(x, &pos, &labels, 0.5));
        check_grad(&pos, &|x| pairwise_bpr(&u, x, &neg1, 0.5));
        check_grad(&neg1, &|x| pairwise_bpr(&u, &pos, x, 0.5));
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
