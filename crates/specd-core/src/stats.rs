//! Pearson's chi-square goodness-of-fit test, for checking sampled histograms against a
//! distribution (the statistical losslessness tests of speculative sampling use it).
//!
//! Owns the test statistic, the bin pooling rule and the chi-square survival function (via the
//! regularized incomplete gamma function). It does not draw samples or know about tokens.

/// Result of [`chi_square_test`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChiSquare {
    /// Pearson's statistic `sum (obs - exp)^2 / exp` over the (pooled) bins.
    pub statistic: f64,
    /// Degrees of freedom: number of (pooled) bins with positive expectation, minus one.
    pub df: usize,
    /// `P(X >= statistic)` for `X ~ chi^2(df)`; 0 when a bin with zero expected probability was
    /// observed (the hypothesis is impossible).
    pub p_value: f64,
}

/// Smallest expected count of a bin before it is pooled with other small bins.
pub const MIN_EXPECTED: f64 = 5.0;

/// Tests whether `observed` counts are a sample from `expected_probs` (normalized here; need not
/// sum to exactly 1). Bins with expected count below [`MIN_EXPECTED`] are pooled together
/// (and the pool merged into the smallest other bin if still too small).
///
/// # Panics
/// If the slices differ in length, or `expected_probs` has a negative, non-finite or all-zero
/// entry set (a programming error in the test that calls it).
pub fn chi_square_test(observed: &[u64], expected_probs: &[f64]) -> ChiSquare {
    assert_eq!(
        observed.len(),
        expected_probs.len(),
        "observed and expected_probs must have the same number of bins"
    );
    assert!(
        expected_probs.iter().all(|p| p.is_finite() && *p >= 0.0),
        "expected_probs must be finite and >= 0"
    );
    let total_p: f64 = expected_probs.iter().sum();
    assert!(total_p > 0.0, "expected_probs must not all be zero");
    let n: f64 = observed.iter().map(|&o| o as f64).sum();

    let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected)
    let mut pool = (0.0, 0.0);
    for (&o, &p) in observed.iter().zip(expected_probs) {
        let e = n * p / total_p;
        if p == 0.0 {
            if o > 0 {
                return ChiSquare {
                    statistic: f64::INFINITY,
                    df: 0,
                    p_value: 0.0,
                };
            }
            continue;
        }
        if e < MIN_EXPECTED {
            pool.0 += o as f64;
            pool.1 += e;
        } else {
            bins.push((o as f64, e));
        }
    }
    if pool.1 > 0.0 {
        if pool.1 >= MIN_EXPECTED || bins.is_empty() {
            bins.push(pool);
        } else {
            let smallest = bins.iter_mut().min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some(b) = smallest {
                b.0 += pool.0;
                b.1 += pool.1;
            }
        }
    }
    let statistic: f64 = bins.iter().map(|&(o, e)| (o - e) * (o - e) / e).sum();
    let df = bins.len().saturating_sub(1);
    let p_value = if df == 0 {
        1.0
    } else {
        chi_square_sf(statistic, df)
    };
    ChiSquare {
        statistic,
        df,
        p_value,
    }
}

/// Survival function of the chi-square distribution: `P(X >= x)` for `X ~ chi^2(df)`, `df >= 1`.
pub fn chi_square_sf(x: f64, df: usize) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 || df == 0 {
        return 1.0;
    }
    gamma_q(df as f64 / 2.0, x / 2.0)
}

/// `ln Gamma(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~1e-15 relative accuracy).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
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
        // Reflection formula.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized upper incomplete gamma `Q(a, x) = Gamma(a, x) / Gamma(a)`, `a > 0`, `x >= 0`.
fn gamma_q(a: f64, x: f64) -> f64 {
    const EPS: f64 = 1e-15;
    const MAX_ITER: usize = 10_000;
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        // Series for P(a, x).
        let mut ap = a;
        let mut sum = 1.0 / a;
        let mut del = sum;
        for _ in 0..MAX_ITER {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * EPS {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        // Continued fraction for Q(a, x) (modified Lentz).
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..MAX_ITER {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < EPS {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn ln_gamma_known_values() {
        assert!(close(ln_gamma(1.0), 0.0, 1.0) || ln_gamma(1.0).abs() < 1e-14);
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-13));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-13
        ));
        assert!(close(
            ln_gamma(10.5),
            1_133_278.388_948_785_5_f64.ln(),
            1e-9
        ));
    }

    #[test]
    fn survival_function_known_values() {
        // Critical values at 5% and 0.01%.
        assert!(close(chi_square_sf(3.841_458_820_694_124, 1), 0.05, 1e-9));
        assert!(close(chi_square_sf(18.307_038_053_275_146, 10), 0.05, 1e-9));
        assert!(close(chi_square_sf(15.136_705_226_623_606, 1), 1e-4, 1e-5));
        assert!(close(chi_square_sf(29.877_503_909_224_906, 7), 1e-4, 1e-5));
        // df = 2 is exponential.
        for x in [0.1, 1.0, 2.0, 10.0, 50.0] {
            assert!(close(chi_square_sf(x, 2), (-x / 2.0).exp(), 1e-12), "{x}");
        }
        assert_eq!(chi_square_sf(0.0, 3), 1.0);
        let tiny = chi_square_sf(100.0, 1);
        assert!(tiny > 0.0 && tiny < 1e-20, "{tiny}");
        // Monotone decreasing in x.
        let mut prev = 1.0;
        for i in 1..200 {
            let v = chi_square_sf(i as f64 * 0.5, 7);
            assert!(v <= prev);
            prev = v;
        }
    }

    #[test]
    fn test_accepts_exact_and_rejects_wrong() {
        let probs = [0.5, 0.25, 0.25];
        let r = chi_square_test(&[500, 250, 250], &probs);
        assert_eq!(r.statistic, 0.0);
        assert_eq!(r.df, 2);
        assert_eq!(r.p_value, 1.0);
        let r = chi_square_test(&[400, 300, 300], &probs);
        assert!(r.p_value < 1e-6, "{r:?}");
        // Zero-probability bin observed: impossible.
        let r = chi_square_test(&[5, 5, 1], &[0.5, 0.5, 0.0]);
        assert_eq!(r.p_value, 0.0);
        // Zero-probability bin unobserved: ignored.
        let r = chi_square_test(&[50, 50, 0], &[0.5, 0.5, 0.0]);
        assert_eq!(r.df, 1);
        assert_eq!(r.p_value, 1.0);
    }

    #[test]
    fn small_bins_are_pooled() {
        // Two bins of expected 1 each pool into one bin of expected 2, merged into the smallest.
        let r = chi_square_test(&[49, 49, 1, 1], &[0.49, 0.49, 0.01, 0.01]);
        assert_eq!(r.df, 1);
        let r = chi_square_test(&[450, 450, 50, 50], &[0.45, 0.45, 0.05, 0.05]);
        assert_eq!(r.df, 3);
    }
}
