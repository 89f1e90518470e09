//! Statistics for comparing meta-learning methods: confidence intervals, paired tests,
//! effect sizes and macro-F1.
//!
//! Everything here is a pure function on slices, so results can be recomputed from the
//! per-episode numbers a run saves. The special functions (log-gamma, regularized
//! incomplete beta, Student's t) are implemented here rather than pulled from a crate,
//! so that their accuracy is pinned down by this module's tests against reference values.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// A confidence interval around a mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The point estimate (the sample mean, or the observed mean difference).
    pub mean: f64,
    /// Half the interval's width: `(high - low) / 2`. For a t interval the interval is
    /// `mean ± half_width`; a percentile bootstrap interval need not be symmetric.
    pub half_width: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// Number of values (or pairs) the interval is computed from.
    pub n: usize,
}

/// The outcome of a two-sided hypothesis test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TestResult {
    /// The test statistic: Student's t for [`paired_t_test`], `min(W+, W−)` for
    /// [`wilcoxon_signed_rank`] (as scipy reports it).
    pub statistic: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Number of pairs the test used (for Wilcoxon: pairs with a non-zero difference).
    pub n: usize,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

fn check_finite(name: &str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(invalid(format!(
            "{name}[{i}] = {} is not finite",
            values[i]
        ))),
        None => Ok(()),
    }
}

fn check_len(name: &str, values: &[f64], min: usize) -> Result<()> {
    if values.len() < min {
        return Err(invalid(format!(
            "{name} needs at least {min} values, got {}",
            values.len()
        )));
    }
    check_finite(name, values)
}

fn check_confidence(confidence: f64) -> Result<()> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(invalid(format!(
            "confidence must be strictly between 0 and 1, got {confidence}"
        )));
    }
    Ok(())
}

/// Element-wise differences `a - b` of two equally long samples of at least `min` pairs.
fn paired_differences(a: &[f64], b: &[f64], min: usize) -> Result<Vec<f64>> {
    if a.len() != b.len() {
        return Err(invalid(format!(
            "paired samples must have equal lengths, got {} and {}",
            a.len(),
            b.len()
        )));
    }
    check_len("a", a, min)?;
    check_len("b", b, min)?;
    Ok(a.iter().zip(b).map(|(x, y)| x - y).collect())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample standard deviation (divisor n − 1); two passes, because the one-pass formula
/// cancels catastrophically when accuracies differ only in late digits.
fn sample_sd(values: &[f64], mean: f64) -> f64 {
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    (ss / (values.len() - 1) as f64).sqrt()
}

// ---------------------------------------------------------------------------------
// Special functions
// ---------------------------------------------------------------------------------

/// Natural logarithm of the gamma function for `x > 0` (Lanczos approximation,
/// g = 7, 9 terms; relative error around 1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Continued fraction for the incomplete beta function (modified Lentz), valid and
/// fast-converging for `x < (a + 1) / (a + b + 2)`.
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-16;
    let qab = a + b;
    let qap = a + 1.0;
    let qam = a - 1.0;
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    // One step of Lentz's recurrence for the partial numerator `aa`: updates the
    // ratios `c` and `d` (kept away from zero) and returns the factor `h` takes on.
    let mut step = |aa: f64| {
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        d * c
    };
    for m in 1..=10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Each iteration takes the even term, then the odd one, of the fraction.
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)));
        let delta = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)));
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// Regularized incomplete beta function `I_x(a, b)` for `a, b > 0` and `0 ≤ x ≤ 1`.
pub fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    // The continued fraction converges quickly only on one side of the mean; use the
    // symmetry I_x(a, b) = 1 − I_{1−x}(b, a) on the other.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// Standard normal cumulative distribution function, via `erfc` so that the lower tail
/// keeps full relative precision.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Upper tail `P(T > t)` of Student's t with `df` degrees of freedom, computed
/// directly (not as `1 − cdf`) so that small p-values keep their precision.
fn student_t_sf(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return if t > 0.0 { 0.0 } else { 1.0 };
    }
    let x = df / (df + t * t);
    let tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, x);
    if t >= 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

/// Cumulative distribution function of Student's t with `df > 0` degrees of freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    student_t_sf(-t, df)
}

fn student_t_pdf(t: f64, df: f64) -> f64 {
    let ln = ln_gamma((df + 1.0) / 2.0)
        - ln_gamma(df / 2.0)
        - 0.5 * (df * std::f64::consts::PI).ln()
        - (df + 1.0) / 2.0 * (t * t / df).ln_1p();
    ln.exp()
}

/// Quantile (inverse CDF) of Student's t with `df > 0` degrees of freedom, for
/// `0 < p < 1`; e.g. `student_t_quantile(0.975, 9.0)` ≈ 2.2621571627.
///
/// Solved by Newton's method on the upper tail, safeguarded by bisection, to a relative
/// accuracy near 1e-13.
pub fn student_t_quantile(p: f64, df: f64) -> Result<f64> {
    if !(p > 0.0 && p < 1.0) {
        return Err(invalid(format!(
            "t quantile: p must be strictly between 0 and 1, got {p}"
        )));
    }
    if !(df > 0.0 && df.is_finite()) {
        return Err(invalid(format!(
            "t quantile: degrees of freedom must be positive, got {df}"
        )));
    }
    if p == 0.5 {
        return Ok(0.0);
    }
    // Solve for the positive quantile of the smaller tail, then restore the sign: the
    // tail probability q is then small and exact, with no 1 − p cancellation.
    let q = p.min(1.0 - p);
    let sign = if p > 0.5 { 1.0 } else { -1.0 };
    let f = |t: f64| student_t_sf(t, df) - q; // decreasing in t
    let mut lo = 0.0;
    let mut hi = 1.0;
    while f(hi) > 0.0 {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return Err(invalid(format!(
                "t quantile: p = {p} with df = {df} is too extreme"
            )));
        }
    }
    let mut t = 0.5 * (lo + hi);
    for _ in 0..300 {
        let ft = f(t);
        if ft == 0.0 {
            break;
        }
        if ft > 0.0 {
            lo = t;
        } else {
            hi = t;
        }
        let newton = t + ft / student_t_pdf(t, df);
        let next = if newton > lo && newton < hi && newton.is_finite() {
            newton
        } else {
            0.5 * (lo + hi)
        };
        let done = (next - t).abs() <= 1e-15 * t.max(1.0) || hi - lo <= 1e-15 * hi;
        t = next;
        if done {
            break;
        }
    }
    Ok(sign * t)
}

// ---------------------------------------------------------------------------------
// Intervals, tests and effect sizes
// ---------------------------------------------------------------------------------

/// The median (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some(0.5 * (v[mid - 1] + v[mid])),
    }
}

/// Mean of `values` with a two-sided Student's t confidence interval at level
/// `confidence` (e.g. 0.95): `mean ± t_{(1+c)/2, n−1} · sd / √n`.
///
/// Needs at least two finite values.
pub fn mean_ci(values: &[f64], confidence: f64) -> Result<Interval> {
    check_len("values", values, 2)?;
    check_confidence(confidence)?;
    let n = values.len();
    let m = mean(values);
    let se = sample_sd(values, m) / (n as f64).sqrt();
    let t = student_t_quantile((1.0 + confidence) / 2.0, (n - 1) as f64)?;
    let half_width = t * se;
    Ok(Interval {
        mean: m,
        half_width,
        low: m - half_width,
        high: m + half_width,
        n,
    })
}

/// Two-sided paired t-test of `a` against `b` (pairs at equal indices), on the
/// differences `a − b` with n − 1 degrees of freedom.
///
/// Needs at least two pairs. If every difference is the same, the statistic is 0 with
/// p = 1 when that difference is 0, and ±∞ with p = 0 otherwise (the limits of the
/// formula).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Result<TestResult> {
    let d = paired_differences(a, b, 2)?;
    let n = d.len();
    let m = mean(&d);
    let sd = sample_sd(&d, m);
    let (statistic, p_value) = if sd == 0.0 {
        if m == 0.0 {
            (0.0, 1.0)
        } else {
            (m.signum() * f64::INFINITY, 0.0)
        }
    } else {
        let t = m / (sd / (n as f64).sqrt());
        (t, (2.0 * student_t_sf(t.abs(), (n - 1) as f64)).min(1.0))
    };
    Ok(TestResult {
        statistic,
        p_value,
        n,
    })
}

/// Ranks of `values` (1-based), ties given the average of the ranks they span; also
/// returns the sizes of the tie groups for the variance correction.
fn average_ranks(values: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        if end - start > 1 {
            ties.push(end - start);
        }
        start = end;
    }
    (ranks, ties)
}

/// Largest number of non-zero differences for which [`wilcoxon_signed_rank`] uses the
/// exact null distribution (when there are no ties).
pub const WILCOXON_EXACT_MAX_N: usize = 25;

/// Two-sided Wilcoxon signed-rank test of `a` against `b` (pairs at equal indices).
///
/// Zero differences are dropped (Wilcoxon's method) and tied absolute differences get
/// average ranks. With at most [`WILCOXON_EXACT_MAX_N`] remaining pairs and no ties the
/// p-value comes from the exact null distribution of W+; otherwise from the normal
/// approximation with the tie-corrected variance and a continuity correction of ½.
/// The statistic is `min(W+, W−)`. Fails if every difference is zero.
pub fn wilcoxon_signed_rank(a: &[f64], b: &[f64]) -> Result<TestResult> {
    let d: Vec<f64> = paired_differences(a, b, 1)?
        .into_iter()
        .filter(|&x| x != 0.0)
        .collect();
    let n = d.len();
    if n == 0 {
        return Err(invalid(
            "Wilcoxon signed-rank test: every difference is zero, nothing to rank",
        ));
    }
    let abs: Vec<f64> = d.iter().map(|x| x.abs()).collect();
    let (ranks, ties) = average_ranks(&abs);
    let w_plus: f64 = d
        .iter()
        .zip(&ranks)
        .filter(|(x, _)| **x > 0.0)
        .map(|(_, r)| r)
        .sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let w_minus = total - w_plus;
    let statistic = w_plus.min(w_minus);
    let p_value = if n <= WILCOXON_EXACT_MAX_N && ties.is_empty() {
        // Without ties ranks are 1..=n and W+ is an integer; count the sign assignments
        // reaching each sum (subset-sum DP, 2^n ≤ 2^25 fits exactly in f64).
        let max = n * (n + 1) / 2;
        let mut counts = vec![0.0f64; max + 1];
        counts[0] = 1.0;
        for r in 1..=n {
            for s in (r..=max).rev() {
                counts[s] += counts[s - r];
            }
        }
        let k = statistic.round() as usize;
        let lower: f64 = counts[..=k].iter().sum();
        (2.0 * lower / 2f64.powi(n as i32)).min(1.0)
    } else {
        let nf = n as f64;
        let tie_term: f64 = ties
            .iter()
            .map(|&t| {
                let t = t as f64;
                t * t * t - t
            })
            .sum();
        let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
        let diff = w_plus - total / 2.0;
        // Continuity correction towards the mean, never past it.
        let corrected = (diff.abs() - 0.5).max(0.0);
        if var <= 0.0 {
            1.0
        } else {
            let z = corrected / var.sqrt();
            (2.0 * normal_cdf(-z)).min(1.0)
        }
    };
    Ok(TestResult {
        statistic,
        p_value,
        n,
    })
}

/// Cohen's d for paired samples (often called d_z): the mean of the differences
/// `a − b` divided by their sample standard deviation.
///
/// Needs at least two pairs, and fails if every difference is the same (the effect size
/// is then undefined).
pub fn cohens_d_paired(a: &[f64], b: &[f64]) -> Result<f64> {
    let d = paired_differences(a, b, 2)?;
    let m = mean(&d);
    let sd = sample_sd(&d, m);
    if sd == 0.0 {
        return Err(invalid(
            "Cohen's d: the differences have zero standard deviation",
        ));
    }
    Ok(m / sd)
}

/// Linear-interpolation quantile of sorted values (numpy's default method).
fn sorted_quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let frac = pos - i as f64;
    if i + 1 < sorted.len() {
        sorted[i] + frac * (sorted[i + 1] - sorted[i])
    } else {
        sorted[i]
    }
}

/// Paired bootstrap confidence interval for the mean difference `mean(a − b)`,
/// percentile method: `resamples` resamples of the pairs with replacement, drawn from a
/// `ChaCha8Rng` seeded with `seed` so the interval is reproducible.
///
/// `mean` is the observed mean difference; `low` and `high` are the (1 − c)/2 and
/// (1 + c)/2 quantiles of the resampled means, so the interval need not be symmetric.
/// Needs at least two pairs and one resample (use a few thousand in practice).
pub fn bootstrap_ci_diff(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Result<Interval> {
    let d = paired_differences(a, b, 2)?;
    check_confidence(confidence)?;
    if resamples == 0 {
        return Err(invalid("bootstrap needs at least one resample, got 0"));
    }
    let n = d.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let low = sorted_quantile(&means, (1.0 - confidence) / 2.0);
    let high = sorted_quantile(&means, (1.0 + confidence) / 2.0);
    Ok(Interval {
        mean: mean(&d),
        half_width: (high - low) / 2.0,
        low,
        high,
        n,
    })
}

/// Macro-averaged F1 score of `predictions` against `labels`, classes `0..classes`.
///
/// Per class F1 = 2·TP / (2·TP + FP + FN); the macro average is their unweighted mean
/// over the classes that occur in `labels` or `predictions`. A class that occurs in
/// neither says nothing about the classifier, so it is left out rather than counted as
/// 0 (which would make the score depend on how many unused classes the caller names).
pub fn macro_f1(predictions: &[u32], labels: &[u32], classes: usize) -> Result<f64> {
    if predictions.len() != labels.len() {
        return Err(invalid(format!(
            "macro-F1: {} predictions for {} labels",
            predictions.len(),
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(invalid("macro-F1 needs at least one prediction"));
    }
    if classes == 0 {
        return Err(invalid("macro-F1 needs at least one class"));
    }
    let mut tp = vec![0usize; classes];
    let mut fp = vec![0usize; classes];
    let mut fn_ = vec![0usize; classes];
    for (i, (&p, &l)) in predictions.iter().zip(labels).enumerate() {
        let (p, l) = (p as usize, l as usize);
        if p >= classes || l >= classes {
            return Err(invalid(format!(
                "macro-F1: item {i} has prediction {p} / label {l}, outside 0..{classes}"
            )));
        }
        if p == l {
            tp[p] += 1;
        } else {
            fp[p] += 1;
            fn_[l] += 1;
        }
    }
    let (sum, present) = (0..classes)
        .filter(|&c| tp[c] + fp[c] + fn_[c] > 0)
        .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64)
        .fold((0.0, 0usize), |(s, k), f| (s + f, k + 1));
    Ok(sum / present as f64)
}

// Reference values keep every digit mpmath printed, so they can be checked against the
// source by eye; the extra digits beyond f64 are harmless.
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    // Reference values were computed independently with mpmath 1.3 at 40 significant
    // digits (t tail = betainc(df/2, 1/2, 0, df/(df+t²), regularized)/2, quantiles by
    // findroot on it, and the paired-t p-value cross-checked by integrating the t
    // density with mpmath.quad). scipy was not available to compare with.

    fn close(actual: f64, expected: f64, tol: f64) {
        assert!(
            (actual - expected).abs() <= tol * expected.abs().max(1.0),
            "{actual} vs expected {expected} (tol {tol})"
        );
    }

    #[test]
    fn ln_gamma_matches_reference() {
        close(ln_gamma(0.5), 0.572_364_942_924_700_087_07, 1e-14); // ln √π
        close(ln_gamma(10.0), 12.801_827_480_081_469_611, 1e-14); // ln 9!
        close(ln_gamma(123.4), 469.336_097_442_190_558_44, 1e-14);
        close(ln_gamma(0.01), 4.599_479_878_042_021_722_5, 1e-13);
    }

    #[test]
    fn incomplete_beta_matches_closed_forms_and_reference() {
        for &x in &[0.01, 0.2, 0.5, 0.77, 0.99] {
            close(regularized_incomplete_beta(1.0, 1.0, x), x, 1e-14);
            close(regularized_incomplete_beta(3.0, 1.0, x), x.powi(3), 1e-13);
            close(
                regularized_incomplete_beta(1.0, 4.0, x),
                1.0 - (1.0 - x).powi(4),
                1e-13,
            );
        }
        close(regularized_incomplete_beta(7.5, 7.5, 0.5), 0.5, 1e-14);
        // mpmath betainc(2.5, 0.5, 0, 0.3, regularized=True)
        close(
            regularized_incomplete_beta(2.5, 0.5, 0.3),
            0.018_927_124_071_945_653_504,
            1e-12,
        );
        // mpmath betainc(15, 0.5, 0, 0.9, regularized=True)
        close(
            regularized_incomplete_beta(15.0, 0.5, 0.9),
            0.077_858_670_314_667_802_534,
            1e-12,
        );
    }

    #[test]
    fn normal_cdf_matches_reference() {
        close(normal_cdf(0.0), 0.5, 1e-15);
        close(normal_cdf(1.959_963_984_540_054), 0.975, 1e-14);
        close(normal_cdf(-1.959_963_984_540_054), 0.025, 1e-13);
    }

    #[test]
    fn t_quantiles_match_reference() {
        // Values quoted in the brief as scipy's: the quantile must agree to 1e-6.
        for (df, q) in [
            (9.0, 2.262_157_162_740_991_5),
            (1.0, 12.706_204_736_174_707),
            (30.0, 2.042_272_456_301_237_3),
        ] {
            close(student_t_quantile(0.975, df).unwrap(), q, 1e-6);
        }
        // mpmath at 40 digits; the implementation is far tighter than 1e-6. (For df = 9
        // mpmath gives 2.26215716279820554, 5.7e-11 above the quoted scipy value;
        // integrating the density with mpmath.quad confirms mpmath's.)
        for (p, df, q) in [
            (0.975, 1.0, 12.706_204_736_174_704_646),
            (0.975, 2.0, 4.302_652_729_749_463_852_3),
            (0.975, 5.0, 2.570_581_835_636_315_514_7),
            (0.975, 9.0, 2.262_157_162_798_205_542_6),
            (0.975, 30.0, 2.042_272_456_301_238_31),
            (0.975, 100.0, 1.983_971_518_523_552_286_6),
            (0.995, 3.0, 5.840_909_309_733_357_260_7),
            (0.9999, 4.0, 13.033_671_720_896_456_198),
        ] {
            close(student_t_quantile(p, df).unwrap(), q, 1e-11);
            close(student_t_quantile(1.0 - p, df).unwrap(), -q, 1e-9);
        }
        // Closed forms: df = 1 is Cauchy, t = tan(π(p − ½)); df = 2 has
        // t = (2p − 1) / √(2p(1 − p)).
        for &p in &[0.6, 0.9, 0.999, 0.999_999] {
            let cauchy = (std::f64::consts::PI * (p - 0.5)).tan();
            close(student_t_quantile(p, 1.0).unwrap(), cauchy, 1e-9);
            let df2 = (2.0 * p - 1.0) / (2.0 * p * (1.0 - p)).sqrt();
            close(student_t_quantile(p, 2.0).unwrap(), df2, 1e-9);
        }
        assert_eq!(student_t_quantile(0.5, 7.0).unwrap(), 0.0);
        assert!(student_t_quantile(1.0, 7.0).is_err());
        assert!(student_t_quantile(0.9, 0.0).is_err());
    }

    #[test]
    fn t_cdf_matches_cauchy() {
        for &t in &[-30.0, -1.5, 0.0, 0.3, 4.0, 1e4] {
            let expected = 0.5 + f64::atan(t) / std::f64::consts::PI;
            close(student_t_cdf(t, 1.0), expected, 1e-13);
        }
    }

    #[test]
    fn mean_ci_of_one_to_ten() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let ci = mean_ci(&v, 0.95).unwrap();
        // mean 5.5, sd = √(82.5/9), half width = t_{0.975,9} · sd / √10 (mpmath).
        close(ci.mean, 5.5, 1e-15);
        close(ci.half_width, 2.165_850_589_668_169_630_4, 1e-11);
        close(ci.low, 5.5 - 2.165_850_589_668_169_630_4, 1e-11);
        close(ci.high, 5.5 + 2.165_850_589_668_169_630_4, 1e-11);
        assert_eq!(ci.n, 10);
        let flat = mean_ci(&[0.5, 0.5, 0.5], 0.9).unwrap();
        assert_eq!((flat.half_width, flat.low, flat.high), (0.0, 0.5, 0.5));
    }

    #[test]
    fn mean_ci_rejects_bad_input() {
        let err = mean_ci(&[1.0], 0.95).unwrap_err().to_string();
        assert!(err.contains("at least 2 values, got 1"), "{err}");
        assert!(mean_ci(&[], 0.95).is_err());
        assert!(mean_ci(&[1.0, 2.0], 1.0).is_err());
        assert!(mean_ci(&[1.0, f64::NAN], 0.95).is_err());
    }

    const A: [f64; 10] = [0.71, 0.64, 0.80, 0.55, 0.68, 0.74, 0.59, 0.77, 0.66, 0.70];
    const B: [f64; 10] = [0.65, 0.60, 0.78, 0.57, 0.61, 0.70, 0.58, 0.72, 0.60, 0.69];

    #[test]
    fn paired_t_test_matches_reference() {
        // d = [.06 .04 .02 −.02 .07 .04 .01 .05 .06 .01], mean 0.034,
        // sd = √(Σ(d − 0.034)²/9) = 0.028363...; t = mean / (sd/√10).
        let r = paired_t_test(&A, &B).unwrap();
        close(r.statistic, 3.790_800_145_860_552_861_3, 1e-10);
        // Two-sided p: mpmath, via betainc and via integrating the t density (agree).
        close(r.p_value, 0.004_277_392_636_696_272_910_3, 1e-10);
        assert_eq!(r.n, 10);
        // Swapping the samples flips the sign only.
        let s = paired_t_test(&B, &A).unwrap();
        close(s.statistic, -r.statistic, 1e-14);
        close(s.p_value, r.p_value, 1e-14);
    }

    #[test]
    fn paired_t_test_df2_closed_form() {
        // n = 3, df = 2: the t CDF is ½ + t / (2√(2 + t²)), so p = 1 − |t|/√(2 + t²).
        let a = [3.0, 5.0, 4.0];
        let b = [1.0, 2.0, 2.5];
        // d = [2, 3, 1.5]; mean 13/6; Σ(d − mean)² = 7/6; sd = √(7/12).
        let mean = 13.0 / 6.0;
        let sd = (7.0f64 / 12.0).sqrt();
        let t = mean / (sd / 3f64.sqrt());
        let r = paired_t_test(&a, &b).unwrap();
        close(r.statistic, t, 1e-13);
        close(r.p_value, 1.0 - t / (2.0 + t * t).sqrt(), 1e-12);
    }

    #[test]
    fn paired_t_test_degenerate_and_errors() {
        let r = paired_t_test(&[1.0, 2.0], &[1.0, 2.0]).unwrap();
        assert_eq!((r.statistic, r.p_value), (0.0, 1.0));
        let r = paired_t_test(&[2.0, 3.0], &[1.0, 2.0]).unwrap();
        assert_eq!((r.statistic, r.p_value), (f64::INFINITY, 0.0));
        let err = paired_t_test(&[1.0, 2.0], &[1.0]).unwrap_err().to_string();
        assert!(err.contains("equal lengths"), "{err}");
        assert!(paired_t_test(&[1.0], &[2.0]).is_err());
    }

    /// Exact two-sided p-value by brute force: every one of the 2^n sign assignments of
    /// ranks 1..=n is equally likely under H0; p = 2·P(W+ ≤ min(W+, W−)), capped at 1.
    fn wilcoxon_enumerated(w_min: f64, n: usize) -> f64 {
        let mut at_most = 0u64;
        for mask in 0u64..(1 << n) {
            let w: usize = (0..n).filter(|i| mask >> i & 1 == 1).map(|i| i + 1).sum();
            if (w as f64) <= w_min {
                at_most += 1;
            }
        }
        (2.0 * at_most as f64 / (1u64 << n) as f64).min(1.0)
    }

    #[test]
    fn wilcoxon_exact_matches_enumeration() {
        // Differences 0.3, −0.1, 0.5, 0.2, 0.45, −0.05, 0.7, 0.15, 0.25, −0.35, 0.6, 0.55
        // (a zero pair is appended and must be dropped).
        let d = [
            0.3, -0.1, 0.5, 0.2, 0.45, -0.05, 0.7, 0.15, 0.25, -0.35, 0.6, 0.55, 0.0,
        ];
        let b = vec![1.0; d.len()];
        let a: Vec<f64> = d.iter().map(|x| 1.0 + x).collect();
        let r = wilcoxon_signed_rank(&a, &b).unwrap();
        assert_eq!(r.n, 12);
        // |d| ranks: 0.05→1, 0.1→2, 0.35→7, so W− = 10 and W+ = 78 − 10 = 68.
        assert_eq!(r.statistic, 10.0);
        close(r.p_value, wilcoxon_enumerated(10.0, 12), 1e-14);
        // The same count by hand: sums ≤ 10 of distinct ranks in 1..=12 number 43, so
        // p = 2·43/4096.
        close(r.p_value, 86.0 / 4096.0, 1e-14);
        // All ten differences positive: p = 2/2^10 (scipy's exact 0.001953125).
        let up: Vec<f64> = (1..=10).map(f64::from).collect();
        let zeros = vec![0.0; 10];
        let r = wilcoxon_signed_rank(&up, &zeros).unwrap();
        assert_eq!(r.statistic, 0.0);
        close(r.p_value, 0.001_953_125, 1e-15);
        // Symmetric in the order of the samples.
        let r2 = wilcoxon_signed_rank(&zeros, &up).unwrap();
        assert_eq!(r2.p_value, r.p_value);
        for n in [1usize, 5, 17] {
            let v: Vec<f64> = (1..=n)
                .map(|i| i as f64 * if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let z = vec![0.0; n];
            let r = wilcoxon_signed_rank(&v, &z).unwrap();
            close(r.p_value, wilcoxon_enumerated(r.statistic, n), 1e-13);
        }
    }

    #[test]
    fn wilcoxon_normal_approximation_with_ties() {
        // 40 differences ((i mod 7) − 3)/2 + (¼ if i mod 5 = 0): 5 zeros dropped, 35 left
        // with many ties. Expected from the same formulas evaluated in mpmath: ranks by
        // averaging, W+ = 310.5, var = n(n+1)(2n+1)/24 − Σ(t³ − t)/48,
        // z = (|W+ − n(n+1)/4| − ½)/√var, p = erfc(z/√2).
        let d: Vec<f64> = (0..40)
            .map(|i| ((i % 7) as f64 - 3.0) * 0.5 + if i % 5 == 0 { 0.25 } else { 0.0 })
            .collect();
        let zeros = vec![0.0; d.len()];
        let r = wilcoxon_signed_rank(&d, &zeros).unwrap();
        assert_eq!(r.n, 35);
        assert_eq!(r.statistic, 310.5);
        close(r.p_value, 0.947_431_606_457_651_124_17, 1e-12);
        // Over 25 distinct differences, all positive: z = (465/2 − ½)/√(30·31·61/24).
        let up: Vec<f64> = (1..=30).map(f64::from).collect();
        let r = wilcoxon_signed_rank(&up, &vec![0.0; 30]).unwrap();
        let z = (232.5 - 0.5) / (30.0f64 * 31.0 * 61.0 / 24.0).sqrt();
        close(r.p_value, libm::erfc(z / std::f64::consts::SQRT_2), 1e-13);
    }

    #[test]
    fn wilcoxon_errors() {
        let err = wilcoxon_signed_rank(&[1.0, 2.0], &[1.0, 2.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("every difference is zero"), "{err}");
        assert!(wilcoxon_signed_rank(&[], &[]).is_err());
    }

    #[test]
    fn cohens_d_by_hand() {
        // d = [2, 3, 1.5], mean 13/6, sd √(7/12) → d = (13/6)/√(7/12) = 2.83654...
        let d = cohens_d_paired(&[3.0, 5.0, 4.0], &[1.0, 2.0, 2.5]).unwrap();
        close(d, 13.0 / 6.0 / (7.0f64 / 12.0).sqrt(), 1e-14);
        close(d, 2.836_832_573_067_900_956, 1e-12);
        close(
            cohens_d_paired(&A, &B).unwrap(),
            1.198_756_261_541_786_018_5,
            1e-10,
        );
        assert!(cohens_d_paired(&[2.0, 3.0], &[1.0, 2.0]).is_err());
        assert!(cohens_d_paired(&[2.0], &[1.0]).is_err());
    }

    #[test]
    fn bootstrap_is_seeded_and_sensible() {
        let x = bootstrap_ci_diff(&A, &B, 4000, 0.95, 7).unwrap();
        let y = bootstrap_ci_diff(&A, &B, 4000, 0.95, 7).unwrap();
        assert_eq!(x, y);
        let z = bootstrap_ci_diff(&A, &B, 4000, 0.95, 8).unwrap();
        assert_ne!(x.low, z.low);
        close(x.mean, 0.034, 1e-12);
        assert!(x.low < x.mean && x.mean < x.high, "{x:?}");
        close(x.half_width, (x.high - x.low) / 2.0, 1e-15);
        // The percentile interval should be near the normal-theory one: the bootstrap
        // sd of the mean is sd·√((n−1)/n)/√n ≈ 0.0085, so its 95% half width ≈ 0.0167,
        // a bit narrower than the t interval (0.0203).
        assert!(x.half_width > 0.012 && x.half_width < 0.021, "{x:?}");
        // Constant differences give a degenerate interval.
        let c = bootstrap_ci_diff(&[2.0, 3.0, 4.0], &[1.0, 2.0, 3.0], 100, 0.9, 1).unwrap();
        assert_eq!((c.low, c.high, c.half_width), (1.0, 1.0, 0.0));
        assert!(bootstrap_ci_diff(&A, &B, 0, 0.95, 1).is_err());
        assert!(bootstrap_ci_diff(&A, &B[..9], 10, 0.95, 1).is_err());
    }

    #[test]
    fn macro_f1_hand_confusion() {
        // Confusion (rows = label, cols = prediction), 3 classes:
        //   label 0: [3, 1, 0]   label 1: [0, 2, 2]   label 2: [1, 0, 1]
        // class 0: TP 3, FP 1, FN 1 → F1 = 6/8 = 0.75
        // class 1: TP 2, FP 1, FN 2 → F1 = 4/7
        // class 2: TP 1, FP 2, FN 1 → F1 = 2/5
        let mut preds = Vec::new();
        let mut labels = Vec::new();
        for (label, row) in [[3, 1, 0], [0, 2, 2], [1, 0, 1]].iter().enumerate() {
            for (pred, &count) in row.iter().enumerate() {
                for _ in 0..count {
                    preds.push(pred as u32);
                    labels.push(label as u32);
                }
            }
        }
        let f1 = macro_f1(&preds, &labels, 3).unwrap();
        close(f1, (0.75 + 4.0 / 7.0 + 0.4) / 3.0, 1e-15);
        // An unused fourth class does not change the score.
        close(macro_f1(&preds, &labels, 4).unwrap(), f1, 1e-15);
        assert_eq!(macro_f1(&[0, 1, 2], &[0, 1, 2], 3).unwrap(), 1.0);
        assert_eq!(macro_f1(&[1, 0], &[0, 1], 2).unwrap(), 0.0);
        assert!(macro_f1(&[0, 3], &[0, 1], 3).is_err());
        assert!(macro_f1(&[0], &[0, 1], 3).is_err());
        assert!(macro_f1(&[], &[], 3).is_err());
    }
}
