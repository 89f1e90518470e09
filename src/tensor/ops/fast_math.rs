//! f32 `exp` and `erf` written as straight-line arithmetic, so that a loop over a
//! slice compiles to SIMD code: libm's scalar f64 `erf` and `exp`, which the
//! activations used for every dtype, were about a sixth of a meta-iteration on the
//! MiniLM workload. Both are accurate to a few units in the last place of f32 (the
//! tests compare them with libm in f64), which is what an f32 activation can hold.

/// `eˣ` for f32 `x`: Cephes' `expf` (range reduction by ln 2 in two parts, a degree-6
/// polynomial, the exponent built from bits). Underflows to 2⁻¹²⁶ scale below −87
/// and saturates at e⁸⁸; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (|v| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let out = y * scale;
    if x.is_nan() {
        x
    } else {
        out
    }
}

/// `erf(x)` for f32 `x`: the rational approximation of Eigen and TensorFlow (odd
/// degree-13 numerator over even degree-8 denominator on [−4, 4]; beyond, ±1 in f32).
/// NaN stays NaN.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let c = x.clamp(-4.0, 4.0);
    let c2 = c * c;
    let p = -2.726_142_3e-10;
    let p = p * c2 + 2.770_681_4e-8;
    let p = p * c2 - 2.101_024e-6;
    let p = p * c2 - 5.692_506_4e-5;
    let p = p * c2 - 7.349_906_3e-4;
    let p = p * c2 - 2.954_600_1e-3;
    let p = p * c2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * c2 - 2.133_740_6e-4;
    let q = q * c2 - 1.682_827e-3;
    let q = q * c2 - 7.373_329e-3;
    let q = q * c2 - 1.426_474e-2;
    let out = c * p / q;
    if x.is_nan() {
        x
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `fast` against libm's `exact` at points spread over `[lo, hi]` (ends
    /// included): within 4 f32 epsilons of `max(|exact|, floor)`.
    fn assert_tracks_libm(
        name: &str,
        fast: fn(f32) -> f32,
        exact: fn(f64) -> f64,
        (lo, hi): (f32, f32),
        floor: f64,
    ) {
        let n = 200_000;
        for x in (0..=n).map(|i| lo + (hi - lo) * i as f32 / n as f32) {
            let (got, want) = (fast(x) as f64, exact(x as f64));
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(floor),
                "{name}({x}) = {got}, libm {want}"
            );
        }
    }

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        assert_tracks_libm("exp", exp, libm::exp, (-87.0, 88.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-200.0), exp(-87.0));
    }

    #[test]
    fn erf_matches_libm_to_a_few_ulp() {
        assert_tracks_libm("erf", erf, libm::erf, (-6.0, 6.0), 1e-3);
        assert!(erf(f32::NAN).is_nan());
    }
}
