//! Dropout, deterministic given a seed.

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Whether a forward pass trains (dropout active, with masks drawn from `seed`) or
/// evaluates (dropout is the identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: dropout masks are drawn from a generator seeded with `seed` mixed with
    /// each call site's salt, so the same seed gives the same masks on every run.
    Train {
        /// Seed of this forward pass's dropout masks.
        seed: u64,
    },
    /// Evaluation: no dropout.
    Eval,
}

/// Mixes a seed with a call-site salt (SplitMix64 finaliser) so that every dropout site
/// of a forward pass draws an independent mask.
pub(crate) fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by
/// `1/(1−p)`, so the expectation is unchanged. The identity in [`Mode::Eval`] or when
/// `p == 0`. `salt` distinguishes call sites that share a forward pass's seed.
///
/// The mask is a constant of the graph, so derivatives of every order are exact.
pub fn dropout(x: &Tensor, p: f64, mode: Mode, salt: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}");
    }
    let seed = match mode {
        Mode::Eval => return Ok(x.clone()),
        Mode::Train { .. } if p == 0.0 => return Ok(x.clone()),
        Mode::Train { seed } => mix_seed(seed, salt),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep_scale = 1.0 / (1.0 - p);
    let mask: Vec<f64> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep_scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn eval_mode_and_zero_probability_are_identity() {
        let x = random_tensor(&[4, 4], 3, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.5, Mode::Eval, 1).unwrap();
        let b = dropout(&x, 0.0, Mode::Train { seed: 9 }, 1).unwrap();
        assert_eq!(a.to_vec2::<f64>().unwrap(), x.to_vec2::<f64>().unwrap());
        assert_eq!(b.to_vec2::<f64>().unwrap(), x.to_vec2::<f64>().unwrap());
    }

    #[test]
    fn same_seed_same_mask_and_rate_is_about_p() {
        let x = Tensor::ones((100, 100), candle_core::DType::F64, &Device::Cpu).unwrap();
        let train = Mode::Train { seed: 7 };
        let a = dropout(&x, 0.3, train, 5).unwrap().flatten_all().unwrap();
        let b = dropout(&x, 0.3, train, 5).unwrap().flatten_all().unwrap();
        let c = dropout(&x, 0.3, train, 6).unwrap().flatten_all().unwrap();
        let (a, b, c) = (
            a.to_vec1::<f64>().unwrap(),
            b.to_vec1::<f64>().unwrap(),
            c.to_vec1::<f64>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c, "a different salt must give a different mask");
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.3).abs() < 0.03, "dropped fraction {dropped}");
        let kept: Vec<_> = a.iter().filter(|&&v| v != 0.0).collect();
        assert!(kept.iter().all(|&&v| (v - 1.0 / 0.7).abs() < 1e-12));
    }

    #[test]
    fn rejects_probability_one() {
        let x = random_tensor(&[2], 1, &Device::Cpu).unwrap();
        let err = dropout(&x, 1.0, Mode::Train { seed: 1 }, 0).unwrap_err();
        assert!(err.to_string().contains("[0, 1)"));
    }
}
