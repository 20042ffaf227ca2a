//! Averaging profiles (EDM2 appendix C): power-function and classic exponential EMA, the
//! `sigma_rel <-> gamma` map, and inner products between profiles.

use std::sync::OnceLock;

use crate::error::{PhemaError, Result};

/// Largest relative width a power profile can have (`gamma -> 0`): `12^-0.5`.
pub const SIGMA_REL_MAX: f64 = 0.288_675_134_594_812_9;

/// Relative standard deviation of the power profile with exponent `gamma` (docs/accuracy.md);
/// `gamma = 0` is the running mean over `(0, t]` (docs/kernels.md), of width [`SIGMA_REL_MAX`].
pub fn gamma_to_sigma_rel(gamma: f64) -> Result<f64> {
    if !(gamma >= 0.0 && gamma.is_finite()) {
        return Err(PhemaError::OutOfRange {
            name: "gamma",
            value: gamma,
            expected: "must be a finite number >= 0".into(),
        });
    }
    Ok(sigma_rel_of(gamma))
}

fn sigma_rel_of(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0).powi(2) * (gamma + 3.0))).sqrt()
}

/// Exponent `gamma` of the power profile whose relative width is `sigma_rel`: the largest real
/// root of `g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0`.
pub fn sigma_rel_to_gamma(sigma_rel: f64) -> Result<f64> {
    // Below the width of gamma = e^60 (~9e-27) the bisection below has no root to find.
    let sigma_min = sigma_rel_of(60.0_f64.exp());
    if !(sigma_rel >= sigma_min && sigma_rel < SIGMA_REL_MAX) {
        return Err(PhemaError::OutOfRange {
            name: "sigma_rel",
            value: sigma_rel,
            expected: format!(
                "must lie in [{sigma_min:.3e}, {SIGMA_REL_MAX:.4}) (12^-0.5 is gamma = 0)"
            ),
        });
    }
    // sigma_rel(gamma) falls monotonically on (0, inf): bisect in log(gamma), which converges for
    // every valid input (a closed-form cubic root loses digits near both ends), then polish the
    // root of the cubic with Newton steps.
    let (mut lo, mut hi) = (-60.0_f64, 60.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if sigma_rel_of(mid.exp()) > sigma_rel {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-15 {
            break;
        }
    }
    let mut g = (0.5 * (lo + hi)).exp();
    let k = sigma_rel.powi(-2);
    for _ in 0..3 {
        let f = ((g + 7.0) * g + (16.0 - k)) * g + (12.0 - k);
        let df = (3.0 * g + 14.0) * g + (16.0 - k);
        if df == 0.0 {
            break;
        }
        let step = f / df;
        if !step.is_finite() || step.abs() > 1e-6 * g {
            break;
        }
        g -= step;
    }
    Ok(g)
}

/// One averaging profile at a given time: a probability density over training time `(0, t]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Profile {
    /// Power function `(gamma+1) tau^gamma / t^(gamma+1)` on `[0, t]`.
    Power {
        /// Time of the average.
        t: f64,
        /// Exponent, >= 0 (0: the running mean).
        gamma: f64,
    },
    /// Classic EMA `c exp(-c (t - tau))` renormalized on `(0, t]`: the mass `exp(-c t)` that a
    /// classic EMA leaves on the initial weights is not part of it (see [`Profile::initial_mass`]).
    Exponential {
        /// Time of the average.
        t: f64,
        /// Decay rate `c = -ln(beta) / dt` per time unit, > 0.
        rate: f64,
    },
}

impl Profile {
    /// A power profile, validating `t` and `gamma`.
    pub fn power(t: f64, gamma: f64) -> Result<Self> {
        check_time(t)?;
        gamma_to_sigma_rel(gamma)?;
        Ok(Profile::Power { t, gamma })
    }

    /// A classic EMA with decay `beta` applied every `dt` time units.
    pub fn from_beta(t: f64, beta: f64, dt: f64) -> Result<Self> {
        check_time(t)?;
        if !(beta > 0.0 && beta < 1.0) {
            return Err(PhemaError::OutOfRange {
                name: "beta",
                value: beta,
                expected: "must lie in (0, 1)".into(),
            });
        }
        check_positive("dt", dt)?;
        exponential(t, -beta.ln() / dt)
    }

    /// A classic EMA whose weights halve every `halflife` time units.
    pub fn from_halflife(t: f64, halflife: f64) -> Result<Self> {
        check_time(t)?;
        check_positive("halflife", halflife)?;
        exponential(t, std::f64::consts::LN_2 / halflife)
    }

    /// A profile from its spec `(kind, t, value, dt)` as the binding receives it: kind `power`
    /// (value = gamma), `beta` (value = beta per `dt` time units) or `halflife` (value = the
    /// half-life; `dt` unused).
    pub fn from_spec(kind: &str, t: f64, value: f64, dt: f64) -> Result<Self> {
        match kind {
            "power" => Profile::power(t, value),
            "beta" => Profile::from_beta(t, value, dt),
            "halflife" => Profile::from_halflife(t, value),
            other => Err(PhemaError::Invalid(format!(
                "unknown profile kind {other:?} (power, beta, halflife)"
            ))),
        }
    }

    /// The time the profile ends at.
    pub fn t(&self) -> f64 {
        match *self {
            Profile::Power { t, .. } | Profile::Exponential { t, .. } => t,
        }
    }

    /// The same profile shape ending at another time.
    pub fn at(&self, t: f64) -> Self {
        match *self {
            Profile::Power { gamma, .. } => Profile::Power { t, gamma },
            Profile::Exponential { rate, .. } => Profile::Exponential { t, rate },
        }
    }

    /// Mass a classic EMA would leave on the initial weights (0 for power profiles).
    pub fn initial_mass(&self) -> f64 {
        match *self {
            Profile::Power { .. } => 0.0,
            Profile::Exponential { t, rate } => (-rate * t).exp(),
        }
    }

    /// Standard deviation of the profile divided by its time: the width in `sigma_rel` units.
    pub fn sigma_rel(&self) -> f64 {
        match *self {
            Profile::Power { gamma, .. } => sigma_rel_of(gamma),
            Profile::Exponential { t, rate } => {
                // Variance of an exponential truncated to [0, t], over t^2:
                // 1/x^2 - 1/(4 sinh^2(x/2)) with x = rate t; a series near 0 avoids cancellation.
                let x = rate * t;
                let v = if x < 1e-2 {
                    let x2 = x * x;
                    1.0 / 12.0 - x2 / 240.0 + x2 * x2 / 6048.0
                } else {
                    let s = (0.5 * x).sinh();
                    1.0 / (x * x) - 1.0 / (4.0 * s * s)
                };
                v.max(0.0).sqrt()
            }
        }
    }

    /// Mass of the profile on `(0, tau]` (its cumulative distribution), given `ln(tau)` too:
    /// callers evaluating many profiles at one point take the logarithm once.
    pub fn cdf_ln(&self, tau: f64, ln_tau: f64, ln_t: f64) -> f64 {
        match *self {
            Profile::Power { t, gamma } if tau > 0.0 && tau < t => {
                ((gamma + 1.0) * (ln_tau - ln_t)).exp()
            }
            _ => self.cdf(tau),
        }
    }

    /// Mass of the profile on `(0, tau]` (its cumulative distribution).
    pub fn cdf(&self, tau: f64) -> f64 {
        let t = self.t();
        if tau <= 0.0 {
            return 0.0;
        }
        if tau >= t {
            return 1.0;
        }
        match *self {
            Profile::Power { gamma, .. } => (tau / t).powf(gamma + 1.0),
            Profile::Exponential { rate, .. } => {
                // (exp(-rate (t - tau)) - exp(-rate t)) / (1 - exp(-rate t)), cancellation-free.
                let z = -(-rate * t).exp_m1();
                (-rate * (t - tau)).exp() * -(-rate * tau).exp_m1() / z
            }
        }
    }

    /// [`Profile::density`] given `ln(tau)` and `ln(t)` too (cheaper for power profiles).
    pub fn density_ln(&self, tau: f64, ln_tau: f64, ln_t: f64) -> f64 {
        match *self {
            Profile::Power { t, gamma } if tau > 0.0 && tau <= t => {
                (gamma + 1.0) / t * (gamma * (ln_tau - ln_t)).exp()
            }
            _ => self.density(tau),
        }
    }

    /// Value of the density at `tau` (used by plots and tests).
    pub fn density(&self, tau: f64) -> f64 {
        let t = self.t();
        if !(tau >= 0.0 && tau <= t) {
            return 0.0;
        }
        match *self {
            Profile::Power { gamma, .. } => (gamma + 1.0) / t * (tau / t).powf(gamma),
            Profile::Exponential { rate, .. } => {
                rate * (-rate * (t - tau)).exp() / -(-rate * t).exp_m1()
            }
        }
    }
}

/// A classic EMA profile whose decay rate per time unit is a positive finite number: a rate that
/// overflows (a half-life of 1e-320) or underflows to 0 has no profile to integrate.
fn exponential(t: f64, rate: f64) -> Result<Profile> {
    if !(rate > 0.0 && rate.is_finite() && (rate * t).is_finite()) {
        return Err(PhemaError::OutOfRange {
            name: "decay rate",
            value: rate,
            expected: format!("must be positive and finite at t={t} (beta/dt or halflife)"),
        });
    }
    Ok(Profile::Exponential { t, rate })
}

fn check_time(t: f64) -> Result<()> {
    check_positive("t", t)
}

fn check_positive(name: &'static str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(PhemaError::OutOfRange {
            name,
            value: v,
            expected: "must be a finite number > 0".into(),
        })
    }
}

/// `<p, q> = integral of p(tau) q(tau) dtau`, in closed form where one exists and by
/// Gauss-Legendre quadrature otherwise.
pub fn inner(p: &Profile, q: &Profile) -> f64 {
    match (*p, *q) {
        (Profile::Power { t: ta, gamma: ga }, Profile::Power { t: tb, gamma: gb }) => {
            // Ratio form: raising t itself to gamma overflows for long runs.
            let (ta, ga, tb, gb) = if ta <= tb {
                (ta, ga, tb, gb)
            } else {
                (tb, gb, ta, ga)
            };
            (ga + 1.0) * (gb + 1.0) * (ta / tb).powf(gb) / ((ga + gb + 1.0) * tb)
        }
        (Profile::Exponential { t: ta, rate: ca }, Profile::Exponential { t: tb, rate: cb }) => {
            // Both renormalized on their own (0, t]; they overlap on (0, min t].
            let m = ta.min(tb);
            let s = ca + cb;
            // integral_0^m ca cb exp(-ca(ta - tau) - cb(tb - tau)) dtau
            let shift = ca * (ta - m) + cb * (tb - m);
            let val = ca * cb * (-shift).exp() * -(-s * m).exp_m1() / s;
            val / (-(-ca * ta).exp_m1() * -(-cb * tb).exp_m1())
        }
        (Profile::Power { t: ta, gamma }, Profile::Exponential { t: tb, rate })
        | (Profile::Exponential { t: tb, rate }, Profile::Power { t: ta, gamma }) => {
            power_exponential(ta, gamma, tb, rate)
        }
    }
}

/// `<power(ta, gamma), exponential(tb, rate)>` by quadrature.
///
/// With `m = min(ta, tb)` and `u = tau / m` the integral is
/// `K * integral_0^1 u^gamma exp(-a (1 - u)) du`, `a = rate m`, and the remaining integral is
/// evaluated by [`power_exp_integral`].
fn power_exponential(ta: f64, gamma: f64, tb: f64, rate: f64) -> f64 {
    let m = ta.min(tb);
    let a = rate * m;
    // K = (gamma+1) m^(gamma+1) / ta^(gamma+1) * rate * exp(-rate (tb - m)) / Z, all in ratio form.
    let log_k = (gamma + 1.0) * (m / ta).ln() - rate * (tb - m);
    let z = -(-rate * tb).exp_m1();
    (gamma + 1.0) * rate * log_k.exp() / z * power_exp_integral(gamma, a)
}

/// `I(gamma, a) = integral_0^1 u^gamma exp(-a (1 - u)) du` for `gamma > 0`, `a >= 0`.
///
/// Substituting `u = exp(-y)` turns the algebraic end point into a smooth integrand
/// `exp(-(gamma+1) y - a (1 - exp(-y)))` on `[0, inf)`, which decays at rate `a + gamma + 1` near 0
/// and `gamma + 1` far out. Panels grow geometrically from a first width matched to the fast
/// decay, so every panel spans only a few e-folds and 20-point Gauss-Legendre is exact to f64
/// rounding on each.
pub fn power_exp_integral(gamma: f64, a: f64) -> f64 {
    let (nodes, weights) = gauss_legendre_20();
    let f = |y: f64| (-(gamma + 1.0) * y + a * (-y).exp_m1()).exp();
    let y_end = 45.0 / (gamma + 1.0); // exp(-45) is far below f64 resolution relative to f(0)=1
    let mut lo = 0.0;
    let mut width = 0.5 / (a + gamma + 1.0);
    let mut sum = 0.0;
    while lo < y_end {
        let hi = (lo + width).min(y_end);
        let (c, h) = (0.5 * (hi + lo), 0.5 * (hi - lo));
        let panel: f64 = nodes
            .iter()
            .zip(weights)
            .map(|(x, w)| w * f(c + h * x))
            .sum();
        sum += h * panel;
        lo = hi;
        width *= 1.5;
    }
    sum
}

/// `integral_a^b f` by 20-point Gauss-Legendre on `panels` equal panels.
pub fn integrate(f: impl Fn(f64) -> f64, a: f64, b: f64, panels: usize) -> f64 {
    let (nodes, weights) = gauss_legendre_20();
    let width = (b - a) / panels as f64;
    (0..panels)
        .map(|p| {
            let (c, h) = (a + (p as f64 + 0.5) * width, 0.5 * width);
            h * nodes
                .iter()
                .zip(weights)
                .map(|(x, w)| w * f(c + h * x))
                .sum::<f64>()
        })
        .sum()
}

/// Nodes and weights of the 20-point Gauss-Legendre rule on `[-1, 1]`, computed once by Newton
/// iteration on the Legendre polynomial.
pub(crate) fn gauss_legendre_20() -> (&'static [f64; 20], &'static [f64; 20]) {
    static RULE: OnceLock<([f64; 20], [f64; 20])> = OnceLock::new();
    let (x, w) = RULE.get_or_init(gauss_legendre::<20>);
    (x, w)
}

/// The 8-point Gauss-Legendre rule on `[-1, 1]`, for integrands that need a figure, not f64
/// precision.
pub(crate) fn gauss_legendre_8() -> (&'static [f64; 8], &'static [f64; 8]) {
    static RULE: OnceLock<([f64; 8], [f64; 8])> = OnceLock::new();
    let (x, w) = RULE.get_or_init(gauss_legendre::<8>);
    (x, w)
}

fn gauss_legendre<const N: usize>() -> ([f64; N], [f64; N]) {
    let mut x = [0.0; N];
    let mut w = [0.0; N];
    let n = N as f64;
    for i in 0..N {
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n + 0.5)).cos();
        let mut dp = 1.0;
        for _ in 0..100 {
            // Three-term recurrence for P_N(z) and its derivative.
            let (mut p0, mut p1) = (1.0, z);
            for k in 2..=N {
                let k = k as f64;
                let p2 = ((2.0 * k - 1.0) * z * p1 - (k - 1.0) * p0) / k;
                p0 = p1;
                p1 = p2;
            }
            dp = n * (z * p1 - p0) / (z * z - 1.0);
            let dz = p1 / dp;
            z -= dz;
            if dz.abs() < 1e-16 {
                break;
            }
        }
        x[i] = z;
        w[i] = 2.0 / ((1.0 - z * z) * dp * dp);
    }
    (x, w)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn decay_rates_that_overflow_or_vanish_are_refused() {
        assert!(Profile::from_halflife(1000.0, 1e-320).is_err());
        assert!(Profile::from_beta(1000.0, 0.5, 1e-320).is_err());
        assert!(Profile::from_beta(1e307, 1e-300, 1.0).is_err());
        assert!(Profile::from_halflife(1000.0, 10.0).is_ok());
    }

    #[test]
    fn a_spec_names_each_kind_of_profile() {
        let spec = |k: &str, v: f64, dt: f64| Profile::from_spec(k, 1000.0, v, dt);
        assert_eq!(
            spec("power", 6.9, 1.0).unwrap(),
            Profile::power(1000.0, 6.9).unwrap()
        );
        let beta = spec("beta", 0.99, 2.0).unwrap();
        assert_eq!(beta, Profile::from_beta(1000.0, 0.99, 2.0).unwrap());
        let halflife = spec("halflife", 50.0, 7.0).unwrap();
        assert_eq!(halflife, Profile::from_halflife(1000.0, 50.0).unwrap());
        assert!(spec("gamma", 6.9, 1.0).is_err() && spec("beta", 1.5, 1.0).is_err());
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn sigma_rel_reference_values_from_spec() {
        for (s, g) in [(0.05, 16.9722), (0.10, 6.9372), (0.15, 3.5579)] {
            let got = sigma_rel_to_gamma(s).unwrap();
            assert!((got - g).abs() < 1e-4, "{s}: {got} vs {g}");
        }
    }

    #[test]
    fn sigma_rel_gamma_round_trip_over_whole_range() {
        for i in 1..1000 {
            let s = SIGMA_REL_MAX * i as f64 / 1000.0;
            let g = sigma_rel_to_gamma(s).unwrap();
            assert!(close(gamma_to_sigma_rel(g).unwrap(), s, 1e-12), "{s}");
            // g is a root of the cubic in `sigma_rel_to_gamma`.
            let k = s.powi(-2);
            let cubic = ((g + 7.0) * g + (16.0 - k)) * g + (12.0 - k);
            assert!(cubic.abs() <= 1e-9 * (g.powi(3) + k * g + k), "{s}");
        }
        assert!(close(sigma_rel_to_gamma(1e-4).unwrap(), 1e4, 1e-2));
    }

    #[test]
    fn out_of_range_inputs_are_errors() {
        for s in [0.0, -0.1, SIGMA_REL_MAX, 0.3, f64::NAN, f64::INFINITY] {
            assert!(sigma_rel_to_gamma(s).is_err(), "{s}");
        }
        for g in [-1e-300, -1.0, f64::NAN, f64::INFINITY] {
            assert!(gamma_to_sigma_rel(g).is_err(), "{g}");
        }
        assert!(Profile::from_beta(10.0, 1.0, 1.0).is_err());
        assert!(Profile::from_beta(10.0, 0.9, 0.0).is_err());
        assert!(Profile::power(0.0, 5.0).is_err());
    }

    /// Composite Simpson on a fine grid, independent of the quadrature under test.
    pub(crate) fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64, n: usize) -> f64 {
        let h = (b - a) / n as f64;
        let mut s = f(a) + f(b);
        for i in 1..n {
            s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0
    }

    #[test]
    fn inner_products_match_numerical_integration() {
        let profiles = [
            Profile::power(700.0, 6.9).unwrap(),
            Profile::power(1000.0, 16.97).unwrap(),
            Profile::power(400.0, 3.5).unwrap(),
            Profile::from_beta(1000.0, 0.999, 1.0).unwrap(),
            Profile::from_halflife(800.0, 50.0).unwrap(),
        ];
        for p in &profiles {
            for q in &profiles {
                let m = p.t().min(q.t());
                let want = simpson(|x| p.density(x) * q.density(x), 0.0, m, 400_000);
                let got = inner(p, q);
                assert!(close(got, want, 1e-8), "{p:?} {q:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn gamma_zero_is_the_running_mean() {
        // The uniform density 1/t on (0, t]: width 12^-0.5, cdf tau/t, <p, p> = 1/t.
        let p = Profile::power(400.0, 0.0).unwrap();
        assert!(close(
            gamma_to_sigma_rel(0.0).unwrap(),
            SIGMA_REL_MAX,
            1e-15
        ));
        assert!(close(p.cdf(100.0), 0.25, 1e-15) && close(p.density(7.0), 1.0 / 400.0, 1e-15));
        assert!(close(inner(&p, &p), 1.0 / 400.0, 1e-14));
        // Two running means: overlap (0, 300] at density 1/(300*400) each.
        let q = Profile::power(300.0, 0.0).unwrap();
        assert!(close(inner(&p, &q), 1.0 / 400.0, 1e-14));
        let e = Profile::from_beta(400.0, 0.99, 1.0).unwrap();
        let want = simpson(|x| p.density(x) * e.density(x), 0.0, 400.0, 400_000);
        assert!(close(inner(&p, &e), want, 1e-8));
    }

    #[test]
    fn profiles_integrate_to_one() {
        for p in [
            Profile::power(50.0, 0.5).unwrap(),
            Profile::from_beta(50.0, 0.9, 1.0).unwrap(),
        ] {
            let mass = simpson(|x| p.density(x), 0.0, 50.0, 200_000);
            assert!(close(mass, 1.0, 1e-6), "{p:?} {mass}");
        }
    }

    #[test]
    fn power_inner_product_does_not_overflow_for_long_runs() {
        let p = Profile::power(1e12, 400.0).unwrap();
        let q = Profile::power(9e11, 300.0).unwrap();
        let v = inner(&p, &q);
        assert!(v.is_finite() && v > 0.0);
        // Self inner product: (g+1)^2 / ((2g+1) t).
        assert!(close(inner(&p, &p), 401.0 * 401.0 / (801.0 * 1e12), 1e-14));
    }

    /// `I(gamma, a) = E[1 / (gamma + 1 + N)]`, `N ~ Poisson(a)`: expand `exp(a u)` in its power
    /// series. An exact series with positive terms, summed outward from the mode.
    fn poisson_reference(gamma: f64, a: f64) -> f64 {
        if a == 0.0 {
            return 1.0 / (gamma + 1.0);
        }
        // Unnormalized pmf relative to the mode; dividing by the summed pmf normalizes it.
        let mode = a.floor();
        let (mut num, mut den) = (1.0 / (gamma + 1.0 + mode), 1.0);
        let (mut p, mut n) = (1.0, mode);
        while p > 1e-20 || n < a + 10.0 {
            p *= a / (n + 1.0);
            n += 1.0;
            num += p / (gamma + 1.0 + n);
            den += p;
        }
        let (mut p, mut n) = (1.0, mode);
        while n > 0.0 && p > 1e-20 {
            p *= n / a;
            n -= 1.0;
            num += p / (gamma + 1.0 + n);
            den += p;
        }
        num / den
    }

    #[test]
    fn quadrature_matches_exact_series_to_1e_10() {
        for gamma in [1e-3, 0.05, 0.5, 1.0, 3.56, 6.94, 16.97, 100.0, 2000.0] {
            for a in [0.0, 1e-6, 1e-2, 0.5, 3.0, 40.0, 700.0, 1e4] {
                let got = power_exp_integral(gamma, a);
                let want = poisson_reference(gamma, a);
                assert!(
                    close(got, want, 1e-10),
                    "gamma={gamma} a={a}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn equivalent_sigma_rel_of_exponential_matches_its_moments() {
        for p in [
            Profile::from_beta(1000.0, 0.99, 1.0).unwrap(),
            Profile::from_beta(1000.0, 0.9999, 1.0).unwrap(),
            Profile::from_beta(1000.0, 0.9999999, 1.0).unwrap(),
        ] {
            let t = p.t();
            let m1 = simpson(|x| x * p.density(x), 0.0, t, 400_000);
            let m2 = simpson(|x| x * x * p.density(x), 0.0, t, 400_000);
            let want = (m2 - m1 * m1).sqrt() / t;
            assert!(
                close(p.sigma_rel(), want, 1e-6),
                "{p:?}: {} vs {want}",
                p.sigma_rel()
            );
        }
    }
}
