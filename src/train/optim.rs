//! Adam and Adagrad, written on tensors so their state is ours: dense for the MLPs, lazy
//! (touched rows only) for embedding tables, with per-row reset when a vocabulary reuses a
//! row, and plain named tensors for checkpoints.

use tch::{Device, Kind, Tensor};

use crate::config::OptimizerKind;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const ADAGRAD_EPS: f64 = 1e-10;

/// Per-parameter state: Adam keeps (m, v); Adagrad keeps the squared-gradient sum in `v`.
#[derive(Debug)]
struct Slot {
    m: Option<Tensor>,
    v: Tensor,
}

impl Slot {
    fn new(kind: OptimizerKind, size: &[i64], device: Device) -> Slot {
        let z = || Tensor::zeros(size, (Kind::Float, device));
        Slot {
            m: matches!(kind, OptimizerKind::Adam).then(z),
            v: z(),
        }
    }
}

/// Optimizer over a list of dense parameters and a list of embedding tables.
pub struct Optimizer {
    kind: OptimizerKind,
    lr_dense: f64,
    lr_rows: f64,
    dense: Vec<Slot>,
    tables: Vec<Slot>,
    step: i64,
}

impl Optimizer {
    /// State for `params` (dense) and `tables` (row-sparse).
    pub fn new(
        kind: OptimizerKind,
        lr_dense: f64,
        lr_rows: f64,
        params: &[Tensor],
        tables: &[Tensor],
    ) -> Self {
        let slot = |t: &Tensor| Slot::new(kind, &t.size(), t.device());
        Optimizer {
            kind,
            lr_dense,
            lr_rows,
            dense: params.iter().map(slot).collect(),
            tables: tables.iter().map(slot).collect(),
            step: 0,
        }
    }

    /// Updates taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// One update: dense parameters from their `.grad()`, table rows from gathered leaves.
    /// `gathered[t]` holds the rows `rows[t]` of table `t` (with gradients after backward).
    pub fn step(
        &mut self,
        params: &[Tensor],
        tables: &mut [Tensor],
        rows: &[Vec<i64>],
        gathered: &[Tensor],
    ) {
        self.step += 1;
        let t = self.step as f64;
        let (c1, c2) = (1.0 - BETA1.powf(t), 1.0 - BETA2.powf(t));
        tch::no_grad(|| {
            for (p, slot) in params.iter().zip(self.dense.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let update = Self::direction(self.kind, slot, &g, c1, c2);
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(update * self.lr_dense));
                let _ = p.grad().zero_();
            }
            for (((table, slot), rows), leaf) in tables
                .iter_mut()
                .zip(self.tables.iter_mut())
                .zip(rows)
                .zip(gathered)
            {
                if rows.is_empty() {
                    continue;
                }
                let g = leaf.grad();
                if !g.defined() {
                    continue;
                }
                let idx = Tensor::from_slice(rows).to(table.device());
                let mut row_slot = Slot {
                    m: slot.m.as_ref().map(|m| m.index_select(0, &idx)),
                    v: slot.v.index_select(0, &idx),
                };
                let update = Self::direction(self.kind, &mut row_slot, &g, c1, c2);
                if let (Some(m), Some(rm)) = (&mut slot.m, &row_slot.m) {
                    let _ = m.index_copy_(0, &idx, rm);
                }
                let _ = slot.v.index_copy_(0, &idx, &row_slot.v);
                let new_rows = table.index_select(0, &idx) - update * self.lr_rows;
                let _ = table.index_copy_(0, &idx, &new_rows);
            }
        });
    }

    /// Updates `slot` with gradient `g` and returns the step direction (before the rate).
    fn direction(kind: OptimizerKind, slot: &mut Slot, g: &Tensor, c1: f64, c2: f64) -> Tensor {
        match kind {
            OptimizerKind::Adam => {
                let m = slot.m.as_mut().expect("Adam keeps a first moment");
                let _ = m.g_mul_scalar_(BETA1).g_add_(&(g * (1.0 - BETA1)));
                let _ = slot.v.g_mul_scalar_(BETA2).g_add_(&(g * g * (1.0 - BETA2)));
                (&*m / c1) / ((&slot.v / c2).sqrt() + EPS)
            }
            OptimizerKind::Adagrad => {
                let _ = slot.v.g_add_(&(g * g));
                g / (slot.v.sqrt() + ADAGRAD_EPS)
            }
        }
    }

    /// Forgets the state of rows reused by a vocabulary.
    pub fn reset_rows(&mut self, table: usize, rows: &[i64]) {
        if rows.is_empty() {
            return;
        }
        let slot = &mut self.tables[table];
        let idx = Tensor::from_slice(rows).to(slot.v.device());
        tch::no_grad(|| {
            let _ = slot.v.index_fill_(0, &idx, 0.0);
            if let Some(m) = &mut slot.m {
                let _ = m.index_fill_(0, &idx, 0.0);
            }
        });
    }

    /// Named state tensors, for checkpoints.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("optim.step".to_owned(), Tensor::from_slice(&[self.step]))];
        for (prefix, slots) in [("dense", &self.dense), ("table", &self.tables)] {
            for (i, s) in slots.iter().enumerate() {
                v.push((format!("optim.{prefix}.{i}.v"), s.v.shallow_clone()));
                if let Some(m) = &s.m {
                    v.push((format!("optim.{prefix}.{i}.m"), m.shallow_clone()));
                }
            }
        }
        v
    }

    /// Restores state written by [`Self::named_tensors`].
    pub fn restore(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<(), String> {
        self.step = get("optim.step")
            .ok_or("missing optim.step")?
            .int64_value(&[0]);
        for (prefix, slots) in [("dense", &mut self.dense), ("table", &mut self.tables)] {
            for (i, s) in slots.iter_mut().enumerate() {
                let name = format!("optim.{prefix}.{i}.v");
                let v = get(&name).ok_or_else(|| format!("missing {name}"))?;
                tch::no_grad(|| s.v.copy_(&v));
                if let Some(m) = &mut s.m {
                    let name = format!("optim.{prefix}.{i}.m");
                    let t = get(&name).ok_or_else(|| format!("missing {name}"))?;
                    tch::no_grad(|| m.copy_(&t));
                }
            }
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients of `tensors` (those without one are skipped), or a
/// non-finite value when any gradient is NaN or infinite.
///
/// Squares are summed per tensor in the gradients' own precision (f32): a gradient whose square
/// overflows counts as non-finite, because it would make the optimizer's second moments
/// infinite and freeze (Adam) or zero (Adagrad) that weight for good. One host sync in all.
pub fn grad_norm<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> f64 {
    let sums: Vec<Tensor> = tch::no_grad(|| {
        tensors
            .into_iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .map(|g| g.square().sum(Kind::Float).to_kind(Kind::Double))
            .collect()
    });
    if sums.is_empty() {
        return 0.0;
    }
    tch::no_grad(|| Tensor::stack(&sums, 0).sum(Kind::Double).double_value(&[])).sqrt()
}

/// Multiplies the gradients of `tensors` by `factor` in place (gradient clipping).
pub fn scale_grads<'a>(tensors: impl IntoIterator<Item = &'a Tensor>, factor: f64) {
    tch::no_grad(|| {
        for t in tensors {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(factor);
            }
        }
    });
}

/// Zeroes the gradients of `params` without updating them (a step that is thrown away must
/// not leave its gradients to be added to the next one's).
pub fn discard_grads(params: &[Tensor]) {
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_grad(values: &[f32]) -> Tensor {
        let p = Tensor::from_slice(values).set_requires_grad(true);
        // d/dp of sum(p * c) = c: the gradient is the constant given.
        (&p * Tensor::from_slice(values).detach())
            .sum(Kind::Float)
            .backward();
        p
    }

    #[test]
    fn grad_norm_is_global_and_flags_non_finite_or_overflowing_gradients() {
        let (a, b) = (with_grad(&[3.0]), with_grad(&[0.0, 4.0]));
        let no_grad = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert_eq!(grad_norm([&a, &b, &no_grad]), 5.0);
        scale_grads([&a, &b], 0.5);
        assert_eq!(grad_norm([&a, &b]), 2.5);
        for bad in [f32::NAN, f32::INFINITY, 1e20] {
            // 1e20 is finite, but its square is not in f32.
            let c = with_grad(&[1.0, bad]);
            assert!(!grad_norm([&a, &c]).is_finite(), "{bad}");
        }
        discard_grads(&[a.shallow_clone()]);
        assert_eq!(grad_norm([&a]), 0.0);
    }

    /// Minimising (x − 3)² drives x to 3 for both optimizers, dense and row-sparse alike.
    #[test]
    fn both_optimizers_minimise_a_quadratic() {
        for kind in [OptimizerKind::Adam, OptimizerKind::Adagrad] {
            let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let mut table = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
            let mut opt = Optimizer::new(
                kind,
                0.1,
                0.1,
                &[p.shallow_clone()],
                &[table.shallow_clone()],
            );
            for _ in 0..2000 {
                let rows = vec![vec![2i64]];
                let leaf = table
                    .index_select(0, &Tensor::from_slice(&rows[0]))
                    .set_requires_grad(true);
                let loss =
                    (&p - 3.0).square().sum(Kind::Float) + (&leaf - 3.0).square().sum(Kind::Float);
                loss.backward();
                opt.step(
                    &[p.shallow_clone()],
                    std::slice::from_mut(&mut table),
                    &rows,
                    &[leaf],
                );
            }
            assert!(
                (p.double_value(&[0]) - 3.0).abs() < 0.05,
                "{kind:?} dense {p}"
            );
            assert!(
                (table.double_value(&[2, 1]) - 3.0).abs() < 0.05,
                "{kind:?} row {table}"
            );
            // Untouched rows stay as they were.
            assert_eq!(table.double_value(&[1, 0]), 0.0);
        }
    }
}
