//! Adam and Adagrad, written on tensors so their state is ours: dense for the MLPs, lazy
//! (touched rows only) for embedding tables, with per-row reset when a vocabulary reuses a
//! row, and plain named tensors for checkpoints.
//!
//! Two details make the lazy variants behave like their dense originals for a row that is
//! touched late or reused:
//! * **Adam's bias correction counts each row's own updates.** With the global step (as TF's
//!   LazyAdam does), a row first updated late gets `m = 0.1·g`, `v = 0.001·g²` and
//!   corrections near 1, so it moves by up to `0.1/√0.001 ≈ 3.2×` the learning rate (2.5× at
//!   step 1,000); with its own count, its first move is the learning rate, like any
//!   parameter's first Adam step.
//! * **Adagrad's accumulator starts at 0.1** (TensorFlow's `initial_accumulator_value`), not
//!   at 0: from 0 the first update is `lr·sign(g)` whatever the gradient's size, so a rare
//!   row's first tiny gradient moves it as far as a large one would.

use tch::{Device, Kind, Tensor};

use crate::config::OptimizerKind;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const ADAGRAD_EPS: f64 = 1e-10;
/// Adagrad's initial accumulator (TensorFlow's default).
pub const ADAGRAD_INITIAL_ACCUMULATOR: f64 = 0.1;

/// Per-parameter state: Adam keeps (m, v); Adagrad keeps the squared-gradient sum in `v`.
/// Tables under Adam also count each row's updates (`steps`, one per row).
#[derive(Debug)]
struct Slot {
    m: Option<Tensor>,
    v: Tensor,
    steps: Option<Tensor>,
}

impl Slot {
    fn new(kind: OptimizerKind, size: &[i64], device: Device, per_row: bool) -> Slot {
        let z = || Tensor::zeros(size, (Kind::Float, device));
        let adam = matches!(kind, OptimizerKind::Adam);
        Slot {
            m: adam.then(z),
            v: if adam {
                z()
            } else {
                Tensor::full(size, ADAGRAD_INITIAL_ACCUMULATOR, (Kind::Float, device))
            },
            steps: (adam && per_row)
                .then(|| Tensor::zeros(&size[..1.min(size.len())], (Kind::Float, device))),
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
        let slot =
            |per_row: bool| move |t: &Tensor| Slot::new(kind, &t.size(), t.device(), per_row);
        Optimizer {
            kind,
            lr_dense,
            lr_rows,
            dense: params.iter().map(slot(false)).collect(),
            tables: tables.iter().map(slot(true)).collect(),
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
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        let (c1, c2) = (
            Tensor::from(1.0 - BETA1.powf(t)).to(device),
            Tensor::from(1.0 - BETA2.powf(t)).to(device),
        );
        tch::no_grad(|| {
            for (p, slot) in params.iter().zip(self.dense.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let update = Self::direction(self.kind, slot, &g, &c1, &c2);
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
                    steps: None,
                };
                // Each row's bias correction from its own update count (see the module doc).
                let (c1, c2) = match &mut slot.steps {
                    Some(steps) => {
                        let n = steps.index_select(0, &idx) + 1.0;
                        let _ = steps.index_copy_(0, &idx, &n);
                        let n = n.unsqueeze(1);
                        let one = || Tensor::ones_like(&n);
                        (
                            one() - Tensor::from(BETA1).to(n.device()).pow(&n),
                            one() - Tensor::from(BETA2).to(n.device()).pow(&n),
                        )
                    }
                    None => (c1.shallow_clone(), c2.shallow_clone()),
                };
                let update = Self::direction(self.kind, &mut row_slot, &g, &c1, &c2);
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
    /// `c1`, `c2` are Adam's bias corrections `1 − β^t`: scalars, or one per row (`[k, 1]`).
    fn direction(
        kind: OptimizerKind,
        slot: &mut Slot,
        g: &Tensor,
        c1: &Tensor,
        c2: &Tensor,
    ) -> Tensor {
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
        let v0 = match self.kind {
            OptimizerKind::Adam => 0.0,
            OptimizerKind::Adagrad => ADAGRAD_INITIAL_ACCUMULATOR,
        };
        tch::no_grad(|| {
            let _ = slot.v.index_fill_(0, &idx, v0);
            if let Some(m) = &mut slot.m {
                let _ = m.index_fill_(0, &idx, 0.0);
            }
            if let Some(steps) = &mut slot.steps {
                let _ = steps.index_fill_(0, &idx, 0.0);
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
                if let Some(steps) = &s.steps {
                    v.push((format!("optim.{prefix}.{i}.steps"), steps.shallow_clone()));
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
                if let Some(steps) = &mut s.steps {
                    let name = format!("optim.{prefix}.{i}.steps");
                    let t = get(&name).ok_or_else(|| format!("missing {name}"))?;
                    tch::no_grad(|| steps.copy_(&t));
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

    /// One step on the rows `rows` of `table` with the constant gradient `g` per element;
    /// returns how far the first of them moved (L∞).
    fn table_step(opt: &mut Optimizer, table: &mut Tensor, rows: &[i64], g: f32) -> f64 {
        let idx = Tensor::from_slice(rows);
        let before = table.index_select(0, &idx);
        let leaf = table.index_select(0, &idx).set_requires_grad(true);
        (&leaf * f64::from(g)).sum(Kind::Float).backward();
        let no_dense = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        opt.step(
            &[no_dense],
            std::slice::from_mut(table),
            &[rows.to_vec()],
            &[leaf],
        );
        let after = table.index_select(0, &idx);
        (after - before).get(0).abs().max().double_value(&[])
    }

    #[test]
    fn a_row_first_updated_late_moves_by_the_learning_rate_like_any_first_adam_step() {
        let lr = 0.01;
        let mut table = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        let mut opt = Optimizer::new(OptimizerKind::Adam, lr, lr, &[], &[table.shallow_clone()]);
        let first = table_step(&mut opt, &mut table, &[0], 1.0);
        assert!(
            (first - lr).abs() < 0.01 * lr,
            "first step of row 0: {first}"
        );
        for _ in 0..999 {
            table_step(&mut opt, &mut table, &[0], 1.0);
        }
        // Row 3 is touched for the first time at global step 1,001.
        let late = table_step(&mut opt, &mut table, &[3, 0], 0.5);
        assert!(
            (late - lr).abs() < 0.01 * lr,
            "row 3's first step is lr = {lr}, not 2.5 lr: {late}"
        );
        // A reused row starts over, too.
        opt.reset_rows(0, &[3]);
        let reused = table_step(&mut opt, &mut table, &[3], -2.0);
        assert!((reused - lr).abs() < 0.01 * lr, "after a reset: {reused}");
    }

    #[test]
    fn adagrad_moves_a_row_by_its_gradient_not_by_its_sign_on_the_first_step() {
        let lr = 0.1;
        let mut table = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        let mut opt = Optimizer::new(
            OptimizerKind::Adagrad,
            lr,
            lr,
            &[],
            &[table.shallow_clone()],
        );
        let tiny = table_step(&mut opt, &mut table, &[1], 1e-4);
        // lr · g / √(0.1 + g²) ≈ 3.2e-4 · lr; from a zero accumulator it was lr · sign(g).
        assert!(
            tiny < 0.01 * lr,
            "a gradient of 1e-4 moved the row by {tiny}"
        );
        opt.reset_rows(0, &[1]);
        let again = table_step(&mut opt, &mut table, &[1], 1e-4);
        assert!(
            (again - tiny).abs() < 1e-9,
            "a reset row starts from 0.1 again"
        );
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
