//! Position bias of shown-not-clicked negatives (point-wise mode).
//!
//! An impression at a low slate position that was not clicked is weak evidence: the user may
//! never have looked at it. Under the examination hypothesis (`P(click | p) = e(p)·r`), the
//! click-through rate by position relative to the top position estimates the examination
//! probability `e(p)`; a shown negative at position `p` then counts with weight `e(p)`
//! (`train.shown_weighting = "examination"`), the way unbiased learning-to-rank discounts
//! unexamined results. The rates are counted online from what the trainer sees: joined clicks
//! (which carry their impression's position) and shown negatives.
//!
//! The estimate ignores that better items are shown higher, so it *under*-estimates `e(p)`
//! for a ranked slate; the weight is floored at [`MIN_WEIGHT`] so no position is ignored.

/// Positions tracked (deeper ones share the last slot).
const POSITIONS: usize = 64;

/// Impressions at a position (and at the top) before its rate is trusted.
const MIN_IMPRESSIONS: u64 = 100;

/// Smallest weight a shown negative gets.
pub const MIN_WEIGHT: f32 = 0.05;

/// Click and impression counts by slate position.
#[derive(Debug, Clone)]
pub struct PositionBias {
    clicks: [u64; POSITIONS],
    impressions: [u64; POSITIONS],
}

impl Default for PositionBias {
    fn default() -> Self {
        PositionBias {
            clicks: [0; POSITIONS],
            impressions: [0; POSITIONS],
        }
    }
}

fn slot(position: u32) -> usize {
    (position as usize).min(POSITIONS - 1)
}

impl PositionBias {
    /// Counts an impression at `position`, clicked or not.
    pub fn observe(&mut self, position: u32, clicked: bool) {
        let p = slot(position);
        self.impressions[p] += 1;
        self.clicks[p] += u64::from(clicked);
    }

    fn rate(&self, p: usize) -> Option<f64> {
        (self.impressions[p] >= MIN_IMPRESSIONS)
            .then(|| self.clicks[p] as f64 / self.impressions[p] as f64)
    }

    /// The estimated examination probability of `position` relative to the top, in
    /// `[MIN_WEIGHT, 1]`; 1 until both rates are known.
    pub fn examination(&self, position: u32) -> f32 {
        match (self.rate(slot(position)), self.rate(0)) {
            (Some(here), Some(top)) if top > 0.0 => ((here / top) as f32).clamp(MIN_WEIGHT, 1.0),
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::sampler::Rng;

    #[test]
    fn recovers_the_examination_curve_of_unranked_slates() {
        // Relevance independent of position (shuffled slates), examination 1/(1+p).
        let mut bias = PositionBias::default();
        let mut rng = Rng::new(9);
        for _ in 0..200_000 {
            let p = rng.below(5) as u32;
            let clicked = rng.next_f64() < 0.3 / (1.0 + f64::from(p));
            bias.observe(p, clicked);
        }
        for p in 0..5u32 {
            let want = 1.0 / (1.0 + p as f32);
            let got = bias.examination(p);
            assert!((got - want).abs() < 0.03, "position {p}: {got} vs {want}");
        }
        assert_eq!(
            PositionBias::default().examination(3),
            1.0,
            "unknown: full weight"
        );
    }
}
