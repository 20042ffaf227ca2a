//! Averages of a run beyond EMA lengths (docs/kernels.md): windows, the last checkpoints,
//! decay-emulating merges, BEMA; the densities snapshots and targets have over training time,
//! and their inner products.
//!
//! Every target is a linear functional of the trajectory: a density over time (fitted by least
//! squares from averaged snapshots, or integrated against the hat functions of plain
//! checkpoints) plus point masses on the weights at single times (exact only from raw weights).

use std::f64::consts::PI;
use std::sync::Arc;

use crate::error::{PhemaError, Result};
use crate::math::profile::{self, Profile};

/// Most point masses one target may put on the run (a BEMA updating every step of a long run).
pub const MAX_POINT_MASSES: usize = 10_000_000;
/// Most steps a stepwise snapshot profile may have.
pub const MAX_STEPS: usize = 10_000_000;
/// Relative tolerance of the numerical inner products.
pub const QUADRATURE_TOL: f64 = 1e-12;

/// Relative slack under which two times are the same time.
const SAME_TIME: f64 = 1e-9;

/// Most samples a user-defined merge shape may have.
pub const MAX_TABLE: usize = 1 << 20;

/// The learning-rate decay a merge stands in for: `f(u)` on `[0, 1]` from 1 down to 0.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// `f(u) = 1 - u`: the merge is the uniform average.
    Linear,
    /// `f(u) = (1 + cos(pi u)) / 2`.
    Cosine,
    /// `f(u) = 1 - sqrt(u)` (Megatron's `minus-sqrt`).
    OneMinusSqrt,
    /// A user's `f`, sampled at `u = j / (n - 1)`, `j = 0 … n-1`, linear between the samples
    /// (docs/kernels.md); `f(1)` may be above 0, a point mass at the merge's end.
    Table(Arc<[f64]>),
}

impl Shape {
    /// The shape named `linear`, `cosine` or `1-sqrt` (`minus-sqrt`).
    pub fn parse(name: &str) -> Result<Shape> {
        match name {
            "linear" => Ok(Shape::Linear),
            "cosine" => Ok(Shape::Cosine),
            "1-sqrt" | "minus-sqrt" => Ok(Shape::OneMinusSqrt),
            other => Err(PhemaError::Invalid(format!(
                "merge shape {other:?} is unknown (linear, cosine, 1-sqrt)"
            ))),
        }
    }

    /// A user-defined shape from its samples at `u = j / (n - 1)`: `2 <= n <=` [`MAX_TABLE`],
    /// finite, `f(0) = 1`, non-increasing, `>= 0`.
    pub fn table(samples: Vec<f64>) -> Result<Shape> {
        let n = samples.len();
        if !(2..=MAX_TABLE).contains(&n) {
            return Err(PhemaError::Invalid(format!(
                "a user-defined merge shape needs 2..={MAX_TABLE} samples, not {n}"
            )));
        }
        let why = if !samples.iter().all(|v| v.is_finite()) {
            Some("is not finite everywhere")
        } else if (samples[0] - 1.0).abs() > 1e-12 {
            Some("has f(0) != 1")
        } else if samples.windows(2).any(|w| w[1] > w[0]) {
            Some("increases somewhere")
        } else if samples[n - 1] < 0.0 {
            Some("falls below 0")
        } else {
            None
        };
        match why {
            Some(why) => Err(PhemaError::Invalid(format!(
                "a user-defined merge shape {why} on [0, 1]"
            ))),
            None => Ok(Shape::Table(samples.into())),
        }
    }

    /// The name `parse` takes (`user-defined` for a table).
    pub fn name(&self) -> &'static str {
        match self {
            Shape::Linear => "linear",
            Shape::Cosine => "cosine",
            Shape::OneMinusSqrt => "1-sqrt",
            Shape::Table(_) => "user-defined",
        }
    }

    /// The sample interval of a table holding `u`, and where in it `u` lies (0..=1).
    fn piece(table: &[f64], u: f64) -> (usize, f64) {
        let steps = (table.len() - 1) as f64;
        let x = (u.clamp(0.0, 1.0) * steps).min(steps);
        let j = (x.floor() as usize).min(table.len() - 2);
        (j, x - j as f64)
    }

    /// `f(u)`.
    pub fn f(&self, u: f64) -> f64 {
        match self {
            Shape::Linear => 1.0 - u,
            Shape::Cosine => 0.5 * (1.0 + (PI * u).cos()),
            Shape::OneMinusSqrt => 1.0 - u.sqrt(),
            Shape::Table(v) => {
                let (j, frac) = Shape::piece(v, u);
                v[j] + frac * (v[j + 1] - v[j])
            }
        }
    }

    /// `-f'(u)`: the merge's density over the window, in window units.
    pub fn rate(&self, u: f64) -> f64 {
        match self {
            Shape::Linear => 1.0,
            Shape::Cosine => 0.5 * PI * (PI * u).sin(),
            Shape::OneMinusSqrt => 0.5 / u.sqrt(),
            Shape::Table(v) => {
                let (j, _) = Shape::piece(v, u);
                (v[j] - v[j + 1]) * (v.len() - 1) as f64
            }
        }
    }

    /// A table's merge over `(t - width, t]` as averages see it: its density, a step per
    /// sample interval (None when `f(1) = 1`), and the mass `f(1)` at `t`.
    fn table_density(v: &[f64], t: f64, width: f64) -> Result<(Option<Density>, f64)> {
        let end = v[v.len() - 1];
        let rest = 1.0 - end;
        if rest <= 1e-12 {
            return Ok((None, end));
        }
        let steps = (v.len() - 1) as f64;
        let lo = t - width;
        let mut edges: Vec<f64> = (0..v.len())
            .map(|j| lo + width * j as f64 / steps)
            .collect();
        edges[v.len() - 1] = t;
        let mass = v.windows(2).map(|w| (w[0] - w[1]) / rest).collect();
        Ok((
            Some(Density::Steps(Arc::new(Steps::new(edges, mass)?))),
            end,
        ))
    }
}

/// Megatron-LM's merge coefficients (`tools/checkpoint/weighted_merge.py`, docs/kernels.md) for
/// `n` checkpoints, oldest first: `w_i = f(i/n)`, `c_{n-1} = w_{n-1}`, `c_i = w_i - w_{i+1}`,
/// `c_0 = 1 - sum of the others`.
pub fn merge_coefficients(shape: &Shape, n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![1.0; n];
    }
    let w: Vec<f64> = (0..n).map(|i| shape.f(i as f64 / n as f64)).collect();
    let mut c = vec![0.0; n];
    c[n - 1] = w[n - 1];
    for i in 1..n - 1 {
        c[i] = w[i] - w[i + 1];
    }
    c[0] = 1.0 - c[1..].iter().sum::<f64>();
    c
}

/// BEMA's hyper-parameters as TRL's `BEMACallback` names them (docs/kernels.md): burn-in `tau`
/// (`update_after`), update period `phi` (`update_freq`), `kappa` (`ema_power`), `eta`
/// (`bias_power`), `rho` (`lag`), `gamma` (`multiplier`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bema {
    /// Burn-in time: the EMA starts at the weights of this time.
    pub tau: f64,
    /// Time between updates.
    pub phi: f64,
    /// Exponent of the EMA weight `beta = (rho + gamma t)^-kappa`.
    pub kappa: f64,
    /// Exponent of the bias correction `alpha = (rho + gamma t)^-eta`.
    pub eta: f64,
    /// Lag.
    pub rho: f64,
    /// Multiplier of time.
    pub gamma: f64,
}

impl Default for Bema {
    fn default() -> Self {
        Bema {
            tau: 0.0,
            phi: 400.0,
            kappa: 0.5,
            eta: 0.2,
            rho: 10.0,
            gamma: 1.0,
        }
    }
}

impl Bema {
    /// Checks every parameter: finite, `tau, kappa, eta, gamma >= 0`, `phi > 0`, and `rho >= 1`
    /// so that `beta <= 1` at every update.
    pub fn check(&self) -> Result<()> {
        for (name, v, lo, strict) in [
            ("tau", self.tau, 0.0, false),
            ("phi", self.phi, 0.0, true),
            ("kappa", self.kappa, 0.0, false),
            ("eta", self.eta, 0.0, false),
            ("rho", self.rho, 1.0, false),
            ("gamma", self.gamma, 0.0, false),
        ] {
            let ok = v.is_finite() && if strict { v > lo } else { v >= lo };
            if !ok {
                return Err(PhemaError::OutOfRange {
                    name,
                    value: v,
                    expected: format!(
                        "BEMA's {name} must be a finite number {} {lo}",
                        if strict { ">" } else { ">=" }
                    ),
                });
            }
        }
        Ok(())
    }

    /// The point masses of BEMA read at time `t`, as `(time, weight)`: TRL updates at
    /// `tau + j phi <= t` with `EMA <- (1 - beta) EMA + beta theta`, `beta = (rho + gamma u)^-kappa`
    /// at the update's step `u`, starting from `theta_tau`, and returns
    /// `EMA + alpha (theta_u - theta_tau)` of the last update `u`.
    pub fn masses(&self, t: f64) -> Result<Vec<(f64, f64)>> {
        self.check()?;
        if t.is_nan() || t <= self.tau {
            return Err(PhemaError::OutOfRange {
                name: "tau",
                value: self.tau,
                expected: format!("BEMA's burn-in must end before t={t}"),
            });
        }
        let updates = ((t - self.tau) / self.phi * (1.0 + 1e-12)).floor();
        if updates < 1.0 {
            return Err(PhemaError::Invalid(format!(
                "BEMA at t={t} has no update yet: the first is at tau + phi = {}",
                self.tau + self.phi
            )));
        }
        if updates > MAX_POINT_MASSES as f64 {
            return Err(PhemaError::Invalid(format!(
                "BEMA at t={t} makes {updates} updates (phi={}): at most {MAX_POINT_MASSES}",
                self.phi
            )));
        }
        let n = updates as usize;
        let times: Vec<f64> = (1..=n).map(|j| self.tau + j as f64 * self.phi).collect();
        // weight_j = beta_j prod_{i > j} (1 - beta_i); theta_tau keeps prod_i (1 - beta_i).
        let mut out = Vec::with_capacity(n + 1);
        let mut keep = 1.0;
        for &u in times.iter().rev() {
            let beta = (self.rho + self.gamma * u).powf(-self.kappa);
            out.push((u, beta * keep));
            keep *= 1.0 - beta;
        }
        out.reverse();
        let last = times[n - 1];
        let alpha = (self.rho + self.gamma * last).powf(-self.eta);
        out.insert(0, (self.tau, keep - alpha));
        out[n].1 += alpha;
        Ok(out)
    }
}

/// A snapshot's profile known as weights per step: mass `mass[k]` spread evenly over
/// `(edges[k], edges[k+1]]` (e.g. the per-call weights of an ema-pytorch average).
#[derive(Debug, PartialEq)]
pub struct Steps {
    edges: Vec<f64>,
    mass: Vec<f64>,
    /// `cum[k]`: mass up to `edges[k]`.
    cum: Vec<f64>,
}

impl Steps {
    /// Checks the steps: edges finite, `>= 0`, strictly increasing, one more than the masses,
    /// masses finite and summing to 1.
    pub fn new(edges: Vec<f64>, mass: Vec<f64>) -> Result<Self> {
        if mass.is_empty() || mass.len() > MAX_STEPS || edges.len() != mass.len() + 1 {
            return Err(PhemaError::Invalid(format!(
                "a stepwise profile needs 1..={MAX_STEPS} steps and one more edge than steps \
                 ({} edges, {} steps)",
                edges.len(),
                mass.len()
            )));
        }
        let increasing = edges.windows(2).all(|w| w[0] < w[1]);
        if !increasing || !edges.iter().all(|e| e.is_finite() && *e >= 0.0) {
            return Err(PhemaError::Invalid(
                "a stepwise profile's edges must be finite, >= 0 and strictly increasing".into(),
            ));
        }
        if let Some(m) = mass.iter().find(|m| !(m.is_finite() && **m >= 0.0)) {
            return Err(PhemaError::Invalid(format!(
                "a stepwise profile's weight {m} is not a finite number >= 0"
            )));
        }
        let mut cum = Vec::with_capacity(edges.len());
        let mut acc = 0.0;
        cum.push(0.0);
        for m in &mass {
            acc += m;
            cum.push(acc);
        }
        if (acc - 1.0).abs() > 1e-9 {
            return Err(PhemaError::Invalid(format!(
                "a stepwise profile's weights sum to {acc}, not 1"
            )));
        }
        Ok(Steps { edges, mass, cum })
    }

    /// The step boundaries, ascending.
    pub fn edges(&self) -> &[f64] {
        &self.edges
    }

    /// The mass of each step.
    pub fn mass(&self) -> &[f64] {
        &self.mass
    }

    /// The time the profile ends at.
    pub fn t(&self) -> f64 {
        self.edges[self.edges.len() - 1]
    }

    fn cdf(&self, tau: f64) -> f64 {
        let k = self.edges.partition_point(|&e| e <= tau);
        if k == 0 {
            return 0.0;
        }
        if k == self.edges.len() {
            return self.cum[k - 1];
        }
        let (a, b) = (self.edges[k - 1], self.edges[k]);
        self.cum[k - 1] + self.mass[k - 1] * (tau - a) / (b - a)
    }

    fn density(&self, tau: f64) -> f64 {
        let k = self.edges.partition_point(|&e| e < tau);
        if k == 0 || k == self.edges.len() {
            return 0.0;
        }
        self.mass[k - 1] / (self.edges[k] - self.edges[k - 1])
    }

    /// `integral of self * q`: `self` is constant on each step, so this is exact given `q`'s
    /// distribution function.
    fn inner(&self, q: &Density) -> f64 {
        let mut fq = q.cdf(self.edges[0]);
        let mut sum = 0.0;
        for (k, m) in self.mass.iter().enumerate() {
            let next = q.cdf(self.edges[k + 1]);
            sum += m * (next - fq) / (self.edges[k + 1] - self.edges[k]);
            fq = next;
        }
        sum
    }

    fn moments(&self) -> (f64, f64) {
        let (mut m1, mut m2) = (0.0, 0.0);
        for (k, m) in self.mass.iter().enumerate() {
            let (a, b) = (self.edges[k], self.edges[k + 1]);
            m1 += m * 0.5 * (a + b);
            m2 += m * (a * a + a * b + b * b) / 3.0;
        }
        (m1, m2)
    }
}

/// A density over training time, of mass 1: what a snapshot averages, or the smooth part of a
/// target.
#[derive(Clone, Debug, PartialEq)]
pub enum Density {
    /// A power or classic EMA profile.
    Profile(Profile),
    /// The uniform average over `(t - width, t]`.
    Window {
        /// End of the window.
        t: f64,
        /// Its length.
        width: f64,
    },
    /// A merge's density `-f'(u) / width` at `u = (tau - t + width) / width` (`f(1) = 0` for
    /// every shape, so no mass sits at the end).
    Merge {
        /// End of the window.
        t: f64,
        /// Its length.
        width: f64,
        /// The decay emulated.
        shape: Shape,
    },
    /// Weights per step.
    Steps(Arc<Steps>),
}

impl From<Profile> for Density {
    fn from(p: Profile) -> Self {
        Density::Profile(p)
    }
}

impl Density {
    /// The time the density ends at.
    pub fn t(&self) -> f64 {
        match self {
            Density::Profile(p) => p.t(),
            Density::Window { t, .. } | Density::Merge { t, .. } => *t,
            Density::Steps(s) => s.t(),
        }
    }

    /// Times inside the support where the density jumps (quadrature splits there).
    pub fn breaks(&self) -> Vec<f64> {
        match self {
            Density::Profile(_) => Vec::new(),
            Density::Window { t, width } | Density::Merge { t, width, .. } => vec![t - width],
            Density::Steps(s) => s.edges.clone(),
        }
    }

    /// Mass on `(0, tau]`.
    pub fn cdf(&self, tau: f64) -> f64 {
        match self {
            Density::Profile(p) => p.cdf(tau),
            Density::Window { t, width } => ((tau - (t - width)) / width).clamp(0.0, 1.0),
            Density::Merge { t, width, shape } => {
                let u = ((tau - (t - width)) / width).clamp(0.0, 1.0);
                1.0 - shape.f(u)
            }
            Density::Steps(s) => s.cdf(tau),
        }
    }

    /// [`Density::cdf`] given `ln(tau)` too (cheaper for power profiles).
    pub fn cdf_ln(&self, tau: f64, ln_tau: f64, ln_t: f64) -> f64 {
        match self {
            Density::Profile(p) => p.cdf_ln(tau, ln_tau, ln_t),
            _ => self.cdf(tau),
        }
    }

    /// [`Density::density`] given `ln(tau)` and `ln(t)` too (cheaper for power profiles).
    pub fn density_ln(&self, tau: f64, ln_tau: f64, ln_t: f64) -> f64 {
        match self {
            Density::Profile(p) => p.density_ln(tau, ln_tau, ln_t),
            _ => self.density(tau),
        }
    }

    /// Value of the density at `tau`.
    pub fn density(&self, tau: f64) -> f64 {
        match self {
            Density::Profile(p) => p.density(tau),
            Density::Window { t, width } => {
                if tau > t - width && tau <= *t {
                    1.0 / width
                } else {
                    0.0
                }
            }
            Density::Merge { t, width, shape } => {
                let u = (tau - (t - width)) / width;
                if u > 0.0 && u <= 1.0 {
                    shape.rate(u) / width
                } else {
                    0.0
                }
            }
            Density::Steps(s) => s.density(tau),
        }
    }

    /// Standard deviation over `t`.
    pub fn sigma_rel(&self) -> f64 {
        match self {
            Density::Profile(p) => p.sigma_rel(),
            Density::Window { t, width } => width / t / 12f64.sqrt(),
            Density::Merge { t, width, shape } => {
                // Moments of u under -f'(u) on (0, 1]; the 1-sqrt density has an integrable
                // singularity at 0, which the adaptive rule resolves.
                let m1 = adaptive(&|u| u * shape.rate(u), 0.0, 1.0);
                let m2 = adaptive(&|u| u * u * shape.rate(u), 0.0, 1.0);
                (m2 - m1 * m1).max(0.0).sqrt() * width / t
            }
            Density::Steps(s) => {
                let (m1, m2) = s.moments();
                (m2 - m1 * m1).max(0.0).sqrt() / s.t()
            }
        }
    }

    /// Mass a classic EMA leaves on the initial weights (0 for every other density).
    pub fn initial_mass(&self) -> f64 {
        match self {
            Density::Profile(p) => p.initial_mass(),
            _ => 0.0,
        }
    }

    /// How far the density varies over `(a, b]`, a piece between its breaks with `0 < a`: its
    /// e-folds, or radians of a cosine; 0 where it is constant, or below `exp(-40)` of its peak
    /// (negligible). Quadrature sizes panels by it.
    pub fn efolds(&self, a: f64, b: f64) -> f64 {
        let t = self.t();
        if a >= t {
            return 0.0;
        }
        match self {
            Density::Profile(Profile::Power { gamma, .. }) if gamma * (t / b).ln() < 40.0 => {
                gamma * (b / a).ln()
            }
            Density::Profile(Profile::Exponential { rate, .. }) if rate * (t - b) < 40.0 => {
                rate * (b - a)
            }
            Density::Profile(_) => 0.0,
            Density::Merge { width, .. } => PI * (b - a) / width,
            Density::Window { .. } | Density::Steps(_) => 0.0,
        }
    }

    /// Whether `integral of density^2` is finite: least squares needs it.
    pub fn square_integrable(&self) -> bool {
        !matches!(
            self,
            Density::Merge {
                shape: Shape::OneMinusSqrt,
                ..
            }
        )
    }
}

/// `<p, q> = integral of p(tau) q(tau) dtau`: closed forms for power and exponential profiles,
/// exact sums for windows and steps (constant pieces against a distribution function), and
/// adaptive Gauss-Kronrod otherwise.
pub fn inner(p: &Density, q: &Density) -> f64 {
    match (p, q) {
        (Density::Profile(a), Density::Profile(b)) => profile::inner(a, b),
        (Density::Steps(s), x) | (x, Density::Steps(s)) => s.inner(x),
        (Density::Window { t, width }, x) | (x, Density::Window { t, width }) => {
            (x.cdf(*t) - x.cdf(t - width)) / width
        }
        (
            Density::Profile(pr),
            Density::Merge {
                t,
                width,
                shape: Shape::Cosine,
            },
        )
        | (
            Density::Merge {
                t,
                width,
                shape: Shape::Cosine,
            },
            Density::Profile(pr),
        ) => profile_cosine(pr, *t, *width),
        _ => {
            let lo = p.t() - support(p);
            let lo = lo.max(q.t() - support(q)).max(0.0);
            let hi = p.t().min(q.t());
            if hi <= lo {
                return 0.0;
            }
            let mut cuts: Vec<f64> = p.breaks().into_iter().chain(q.breaks()).collect();
            cuts.retain(|&c| c > lo && c < hi);
            cuts.push(lo);
            cuts.push(hi);
            cuts.sort_by(f64::total_cmp);
            cuts.windows(2)
                .map(|w| adaptive(&|x| p.density(x) * q.density(x), w[0], w[1]))
                .sum()
        }
    }
}

/// E-folds of the integrand plus radians of the cosine per Gauss-Legendre panel: 20 points
/// integrate `exp(a x) sin(b x)` with `a + b <= 4` over a panel to f64 rounding.
const EFOLDS_PER_PANEL: f64 = 4.0;

/// `<profile, cosine merge over (t - width, t]>` by 20-point Gauss-Legendre on panels sized to
/// the integrand, which is smooth on the overlap: a power profile in `y = ln(hi / tau)`, where
/// it is `exp(-(gamma + 1) y)`, an exponential one in `tau`. Where the profile has fallen by
/// `exp(-50)` from the overlap's end the rest is dropped.
fn profile_cosine(p: &Profile, t: f64, width: f64) -> f64 {
    let lo = t - width;
    let hi = t.min(p.t());
    if hi <= lo {
        return 0.0;
    }
    let rate = |tau: f64| 0.5 * PI / width * (PI * (tau - lo) / width).sin();
    match *p {
        Profile::Power { t: tp, gamma } => {
            let g1 = gamma + 1.0;
            let top = (hi / tp).ln();
            let span = if lo > 0.0 {
                (hi / lo).ln()
            } else {
                f64::INFINITY
            };
            let span = span.min(50.0 / g1);
            // dtau/dy = -tau <= hi: the cosine's phase moves by at most pi hi / width per unit y.
            let efolds = g1 * span + PI * hi / width * span;
            let panels = (efolds / EFOLDS_PER_PANEL).ceil().max(1.0) as usize;
            profile::integrate(
                |y| {
                    let tau = hi * (-y).exp();
                    g1 * (g1 * (top - y)).exp() * rate(tau)
                },
                0.0,
                span,
                panels,
            )
        }
        Profile::Exponential { t: tp, rate: c } => {
            let from = lo.max(hi - 50.0 / c);
            let efolds = (c + PI / width) * (hi - from);
            let panels = (efolds / EFOLDS_PER_PANEL).ceil().max(1.0) as usize;
            let z = -(-c * tp).exp_m1();
            profile::integrate(
                |tau| c * (-c * (tp - tau)).exp() / z * rate(tau),
                from,
                hi,
                panels,
            )
        }
    }
}

/// Length of the support ending at `t`.
fn support(d: &Density) -> f64 {
    match d {
        Density::Window { width, .. } | Density::Merge { width, .. } => *width,
        _ => d.t(),
    }
}

/// `integral_a^b f` to [`QUADRATURE_TOL`] relative, by adaptive 7/15-point Gauss-Kronrod: the
/// interval with the largest error estimate is halved until the summed estimate is below the
/// tolerance. Its nodes avoid the end points, so integrable end-point singularities are
/// resolved by halving toward them.
pub fn adaptive(f: &dyn Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const MAX_INTERVALS: usize = 4000;
    if b.is_nan() || a.is_nan() || b <= a {
        return 0.0;
    }
    let mut parts: Vec<(f64, f64, f64, f64)> = (0..4)
        .map(|i| {
            let (lo, hi) = (
                a + (b - a) * i as f64 / 4.0,
                a + (b - a) * (i + 1) as f64 / 4.0,
            );
            let (v, e) = kronrod(f, lo, hi);
            (lo, hi, v, e)
        })
        .collect();
    loop {
        let total: f64 = parts.iter().map(|p| p.2).sum();
        let err: f64 = parts.iter().map(|p| p.3).sum();
        if err <= QUADRATURE_TOL * total.abs() || parts.len() >= MAX_INTERVALS {
            return total;
        }
        let (k, _) =
            parts.iter().enumerate().fold(
                (0, -1.0),
                |(bk, be), (k, p)| if p.3 > be { (k, p.3) } else { (bk, be) },
            );
        let (lo, hi, _, _) = parts[k];
        let mid = 0.5 * (lo + hi);
        if !(mid > lo && mid < hi) {
            // The interval cannot be halved further in f64.
            parts[k].3 = 0.0;
            continue;
        }
        let (v1, e1) = kronrod(f, lo, mid);
        let (v2, e2) = kronrod(f, mid, hi);
        parts[k] = (lo, mid, v1, e1);
        parts.push((mid, hi, v2, e2));
    }
}

/// The 15-point Kronrod estimate of `integral_a^b f` and its distance from the embedded
/// 7-point Gauss estimate.
fn kronrod(f: &dyn Fn(f64) -> f64, a: f64, b: f64) -> (f64, f64) {
    // Nodes (positive half, outermost first) and weights of the Gauss-Kronrod 7/15 pair.
    const XK: [f64; 8] = [
        0.991_455_371_120_812_6,
        0.949_107_912_342_758_5,
        0.864_864_423_359_769_1,
        0.741_531_185_599_394_4,
        0.586_087_235_467_691_1,
        0.405_845_151_377_397_2,
        0.207_784_955_007_898_5,
        0.0,
    ];
    const WK: [f64; 8] = [
        0.022_935_322_010_529_22,
        0.063_092_092_629_978_55,
        0.104_790_010_322_250_2,
        0.140_653_259_715_525_9,
        0.169_004_726_639_267_9,
        0.190_350_578_064_785_4,
        0.204_432_940_075_298_9,
        0.209_482_141_084_727_8,
    ];
    // Gauss weights of the nodes XK[1], XK[3], XK[5], XK[7].
    const WG: [f64; 4] = [
        0.129_484_966_168_869_7,
        0.279_705_391_489_276_7,
        0.381_830_050_505_118_9,
        0.417_959_183_673_469_4,
    ];
    let (c, h) = (0.5 * (a + b), 0.5 * (b - a));
    let mut k = 0.0;
    let mut g = 0.0;
    for i in 0..8 {
        let v = if i == 7 {
            f(c)
        } else {
            f(c - h * XK[i]) + f(c + h * XK[i])
        };
        k += WK[i] * v;
        if i % 2 == 1 {
            g += WG[i / 2] * v;
        }
    }
    (k * h, ((k - g) * h).abs())
}

/// A kernel in a store's terms: the density part and the point masses `(time, weight)`.
pub type Resolved = (Option<Density>, Vec<(f64, f64)>);

/// What one requested average is.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// A power or classic EMA.
    Profile(Profile),
    /// The uniform average over `(t - width, t]`.
    Window {
        /// End of the window.
        t: f64,
        /// Its length.
        width: f64,
    },
    /// The uniform average of the last `count` plain checkpoints at or before `t`.
    Last {
        /// Time read at.
        t: f64,
        /// How many checkpoints.
        count: usize,
    },
    /// A decay-emulating merge over `(t - width, t]`.
    Merge {
        /// End of the window.
        t: f64,
        /// Its length.
        width: f64,
        /// The decay emulated.
        shape: Shape,
    },
    /// BEMA read at `t`.
    Bema {
        /// Time read at.
        t: f64,
        /// Its parameters.
        bema: Bema,
    },
}

fn check_t(t: f64) -> Result<()> {
    if t > 0.0 && t.is_finite() {
        Ok(())
    } else {
        Err(PhemaError::OutOfRange {
            name: "t",
            value: t,
            expected: "must be a finite number > 0".into(),
        })
    }
}

fn check_width(name: &'static str, t: f64, width: f64) -> Result<()> {
    if !(width > 0.0 && width.is_finite()) {
        return Err(PhemaError::OutOfRange {
            name,
            value: width,
            expected: "must be a finite length > 0".into(),
        });
    }
    if width > t * (1.0 + 1e-12) {
        return Err(PhemaError::OutOfRange {
            name,
            value: width,
            expected: format!("is longer than the run up to t={t}"),
        });
    }
    Ok(())
}

impl Kernel {
    /// The uniform average over `(t - width, t]`, `0 < width <= t`.
    pub fn window(t: f64, width: f64) -> Result<Self> {
        check_t(t)?;
        check_width("window", t, width)?;
        Ok(Kernel::Window {
            t,
            width: width.min(t),
        })
    }

    /// The last `count >= 1` checkpoints at or before `t`.
    pub fn last(t: f64, count: usize) -> Result<Self> {
        check_t(t)?;
        if count == 0 {
            return Err(PhemaError::Invalid(
                "last=0: an average of no checkpoints".into(),
            ));
        }
        Ok(Kernel::Last { t, count })
    }

    /// A merge of `shape` over `(t - width, t]`.
    pub fn merge(t: f64, width: f64, shape: Shape) -> Result<Self> {
        check_t(t)?;
        check_width("merge window", t, width)?;
        Ok(Kernel::Merge {
            t,
            width: width.min(t),
            shape,
        })
    }

    /// BEMA read at `t` (checked now: `tau < t`, an update by `t`).
    pub fn bema(t: f64, bema: Bema) -> Result<Self> {
        check_t(t)?;
        bema.masses(t)?;
        Ok(Kernel::Bema { t, bema })
    }

    /// The time the average is read at.
    pub fn t(&self) -> f64 {
        match self {
            Kernel::Profile(p) => p.t(),
            Kernel::Window { t, .. }
            | Kernel::Last { t, .. }
            | Kernel::Merge { t, .. }
            | Kernel::Bema { t, .. } => *t,
        }
    }

    /// The kernel in terms a store answers: a density of mass `1 - sum of the point masses`
    /// and point masses `(time, weight)`. `raw` are the times of the store's raw weights
    /// (ascending): merges and `last` are defined on them when there are any.
    pub fn resolve(&self, raw: &[f64]) -> Result<Resolved> {
        match self {
            Kernel::Profile(p) => Ok((Some(Density::Profile(*p)), Vec::new())),
            Kernel::Window { t, width } => Ok((
                Some(Density::Window {
                    t: *t,
                    width: *width,
                }),
                Vec::new(),
            )),
            Kernel::Last { t, count } => {
                let upto = raw.partition_point(|&r| r <= t * (1.0 + SAME_TIME));
                if upto < *count {
                    return Err(PhemaError::Unsolvable(format!(
                        "last={count} at t={t}: the store holds {upto} raw checkpoint(s) at or \
                         before it"
                    )));
                }
                let w = 1.0 / *count as f64;
                Ok((
                    None,
                    raw[upto - count..upto].iter().map(|&r| (r, w)).collect(),
                ))
            }
            Kernel::Merge { t, width, shape } => {
                if let (true, Shape::Table(v)) = (raw.is_empty(), shape) {
                    let (d, end) = Shape::table_density(v, *t, *width)?;
                    let masses = if end > 0.0 { vec![(*t, end)] } else { vec![] };
                    return Ok((d, masses));
                }
                if raw.is_empty() {
                    let d = match shape {
                        Shape::Linear => Density::Window {
                            t: *t,
                            width: *width,
                        },
                        _ => Density::Merge {
                            t: *t,
                            width: *width,
                            shape: shape.clone(),
                        },
                    };
                    if !d.square_integrable() {
                        return Err(PhemaError::Unsolvable(format!(
                            "merge {}:{width} at t={t}: its density 1/(2 sqrt u) is not \
                             square-integrable, so no least-squares fit from averaged snapshots \
                             exists; it needs plain checkpoints (or raw=True)",
                            shape.name()
                        )));
                    }
                    return Ok((Some(d), Vec::new()));
                }
                let end = raw.partition_point(|&r| r <= t * (1.0 + SAME_TIME));
                if end == 0 || !same_time(raw[end - 1], *t) {
                    return Err(PhemaError::Unsolvable(format!(
                        "merge {}:{width} at t={t}: the store has no raw weights at t={t}, \
                         where the merge ends",
                        shape.name()
                    )));
                }
                let lo = t - width;
                let start = raw.partition_point(|&r| r < lo - SAME_TIME * t);
                let n = end - start;
                if n < 2 {
                    return Err(PhemaError::Unsolvable(format!(
                        "merge {}:{width} at t={t}: the window ({lo}, {t}] holds {n} raw \
                         checkpoint(s); a merge needs at least two",
                        shape.name()
                    )));
                }
                let c = merge_coefficients(shape, n);
                Ok((None, raw[start..end].iter().copied().zip(c).collect()))
            }
            Kernel::Bema { t, bema } => Ok((None, bema.masses(*t)?)),
        }
    }
}

fn same_time(a: f64, b: f64) -> bool {
    (a - b).abs() <= SAME_TIME * a.abs().max(b.abs())
}

/// Weights on raw checkpoints at `raw` (ascending) putting `weight` on the weights at `time`:
/// the checkpoint at that time, or the two around it (the trajectory is linear between
/// checkpoints). A time outside the checkpoints' span is refused. Returns whether the time is a
/// checkpoint's.
pub fn point_mass(raw: &[f64], time: f64, weight: f64, out: &mut [f64]) -> Result<bool> {
    if raw.is_empty() {
        return Err(PhemaError::Unsolvable(format!(
            "the weights at t={time} are needed and the store holds no raw weights (keep \
             plain checkpoints, or track with raw=True)"
        )));
    }
    let j = raw.partition_point(|&r| r < time);
    for k in [j.wrapping_sub(1), j] {
        if let Some(&r) = raw.get(k) {
            if same_time(r, time) {
                out[k] += weight;
                return Ok(true);
            }
        }
    }
    if j == 0 || j == raw.len() {
        return Err(PhemaError::Unsolvable(format!(
            "the weights at t={time} are needed and the raw weights span only [{}, {}]",
            raw[0],
            raw[raw.len() - 1]
        )));
    }
    let (a, b) = (raw[j - 1], raw[j]);
    out[j - 1] += weight * (b - time) / (b - a);
    out[j] += weight * (time - a) / (b - a);
    Ok(false)
}

#[cfg(test)]
// The tests write the conventions out index by index, as their sources state them.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::math::profile::tests::simpson;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn kronrod_rule_is_exact_for_polynomials_and_adaptive_handles_singular_ends() {
        for deg in 0..=22 {
            let got = kronrod(&|x: f64| x.powi(deg), 0.0, 1.0).0;
            assert!(close(got, 1.0 / (deg as f64 + 1.0), 1e-14), "{deg}: {got}");
        }
        assert!(close(adaptive(&|x| x.sin(), 0.0, PI), 2.0, 1e-12));
        // 1/(2 sqrt u) on (0, 1] integrates to 1; u^-0.9 to 10.
        assert!(close(
            adaptive(&|u: f64| 0.5 / u.sqrt(), 0.0, 1.0),
            1.0,
            1e-10
        ));
        assert!(close(
            adaptive(&|u: f64| u.powf(-0.9), 0.0, 1.0),
            10.0,
            1e-6
        ));
    }

    /// Megatron's `schedule_to_merge_coefficients`, written out as its file states it.
    fn megatron(f: impl Fn(f64) -> f64, n: usize) -> Vec<f64> {
        let decay: Vec<f64> = (0..n).map(|i| f(i as f64 / n as f64)).collect();
        let mut c = vec![0.0; n];
        c[n - 1] = decay[n - 1];
        for i in 1..n - 1 {
            c[i] = decay[i] - decay[i + 1];
        }
        c[0] = 1.0 - c.iter().sum::<f64>();
        c
    }

    #[test]
    fn merge_coefficients_follow_the_convention() {
        for n in [2, 3, 5, 21] {
            let lin = merge_coefficients(&Shape::Linear, n);
            assert!(
                lin.iter().all(|c| close(*c, 1.0 / n as f64, 1e-12)),
                "{lin:?}"
            );
            for shape in [Shape::Linear, Shape::Cosine, Shape::OneMinusSqrt] {
                let c = merge_coefficients(&shape, n);
                assert!(close(c.iter().sum(), 1.0, 1e-14));
                // c_i = f(i/n) - f((i+1)/n) for the inner ones, f((n-1)/n) for the last.
                for i in 1..n - 1 {
                    let want = shape.f(i as f64 / n as f64) - shape.f((i + 1) as f64 / n as f64);
                    assert!((c[i] - want).abs() < 1e-12);
                }
                assert!((c[n - 1] - shape.f((n - 1) as f64 / n as f64)).abs() < 1e-12);
            }
            let ms = megatron(|x| 1.0 - x.sqrt(), n);
            let ours = merge_coefficients(&Shape::OneMinusSqrt, n);
            for (a, b) in ms.iter().zip(&ours) {
                assert!((a - b).abs() < 1e-12, "{ms:?} {ours:?}");
            }
            let ml = megatron(|x| 1.0 - x, n);
            for (a, b) in ml.iter().zip(&lin) {
                assert!((a - b).abs() < 1e-12);
            }
        }
        // Five checkpoints of minus-sqrt by hand: w = 1 - sqrt(i/5).
        let w: Vec<f64> = (0..5).map(|i| 1.0 - (i as f64 / 5.0).sqrt()).collect();
        let c = merge_coefficients(&Shape::OneMinusSqrt, 5);
        assert!((c[4] - w[4]).abs() < 1e-15 && (c[2] - (w[2] - w[3])).abs() < 1e-15);
        assert!((c[0] - (1.0 - w[1])).abs() < 1e-15);
        assert_eq!(merge_coefficients(&Shape::Cosine, 1), vec![1.0]);
    }

    /// BEMA step by step on one-hot trajectories: `theta_s = e_s`, so every buffer is the vector
    /// of weights per step.
    fn simulate_bema(b: &Bema, t: usize) -> Vec<f64> {
        let tau = b.tau as usize;
        let phi = b.phi as usize;
        let one_hot = |s: usize| {
            let mut v = vec![0.0; t + 1];
            v[s] = 1.0;
            v
        };
        let theta0 = one_hot(tau);
        let mut ema = theta0.clone();
        let mut out = theta0.clone();
        for step in tau + 1..=t {
            if (step - tau).is_multiple_of(phi) {
                let x = one_hot(step);
                let beta = (b.rho + b.gamma * step as f64).powf(-b.kappa);
                let alpha = (b.rho + b.gamma * step as f64).powf(-b.eta);
                for i in 0..=t {
                    ema[i] = (1.0 - beta) * ema[i] + beta * x[i];
                    out[i] = ema[i] + alpha * (x[i] - theta0[i]);
                }
            }
        }
        out
    }

    #[test]
    fn bema_masses_equal_the_step_by_step_recursion() {
        for (b, t) in [
            (Bema::default(), 5000usize),
            (
                Bema {
                    tau: 100.0,
                    phi: 7.0,
                    kappa: 0.8,
                    eta: 0.4,
                    rho: 3.0,
                    gamma: 2.0,
                },
                1003,
            ),
            (
                Bema {
                    tau: 10.0,
                    phi: 1.0,
                    kappa: 0.3,
                    eta: 0.0,
                    rho: 1.0,
                    gamma: 0.5,
                },
                300,
            ),
        ] {
            let want = simulate_bema(&b, t);
            let mut got = vec![0.0; t + 1];
            for (s, w) in b.masses(t as f64).unwrap() {
                got[s as usize] += w;
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-13, "{b:?} step {i}: {g} vs {w}");
            }
            assert!(close(got.iter().sum(), 1.0, 1e-12));
        }
    }

    #[test]
    fn bema_refuses_bad_parameters_naming_them() {
        let ok = Bema::default();
        for (b, name) in [
            (Bema { kappa: -0.1, ..ok }, "kappa"),
            (
                Bema {
                    eta: f64::NAN,
                    ..ok
                },
                "eta",
            ),
            (Bema { phi: 0.0, ..ok }, "phi"),
            (Bema { rho: 0.5, ..ok }, "rho"),
            (Bema { tau: -1.0, ..ok }, "tau"),
        ] {
            let e = Kernel::bema(5000.0, b).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let e = Kernel::bema(500.0, Bema { tau: 600.0, ..ok }).unwrap_err();
        assert!(e.to_string().contains("tau=600"), "{e}");
        assert!(Kernel::bema(500.0, Bema { tau: 200.0, ..ok }).is_err());
    }

    #[test]
    fn inner_products_of_every_kind_match_simpson() {
        let steps = Steps::new(
            vec![0.0, 100.0, 300.0, 650.0, 900.0],
            vec![0.1, 0.2, 0.3, 0.4],
        )
        .unwrap();
        let ds = [
            Density::Profile(Profile::power(900.0, 6.9).unwrap()),
            Density::Profile(Profile::power(700.0, 0.0).unwrap()),
            Density::Profile(Profile::from_beta(800.0, 0.995, 1.0).unwrap()),
            Density::Window {
                t: 850.0,
                width: 170.0,
            },
            Density::Merge {
                t: 900.0,
                width: 300.0,
                shape: Shape::Cosine,
            },
            Density::Merge {
                t: 640.0,
                width: 400.0,
                shape: Shape::Cosine,
            },
            Density::Steps(Arc::new(steps)),
        ];
        for p in &ds {
            let mass = simpson(|x| p.density(x), 0.0, 900.0, 360_000);
            assert!(close(mass, 1.0, 1e-4), "{p:?} {mass}");
            for q in &ds {
                // Split at every break so Simpson sees smooth pieces.
                let mut cuts = vec![0.0, 900.0];
                cuts.extend(p.breaks());
                cuts.extend(q.breaks());
                cuts.extend([p.t(), q.t()]);
                cuts.sort_by(f64::total_cmp);
                cuts.dedup();
                let want: f64 = cuts
                    .windows(2)
                    // Inside each piece only: the densities jump at its ends.
                    .map(|w| {
                        let e = 1e-9 * (w[1] - w[0]);
                        simpson(|x| p.density(x) * q.density(x), w[0] + e, w[1] - e, 20_000)
                    })
                    .sum();
                let got = inner(p, q);
                assert!(close(got, want, 1e-7), "{p:?} {q:?}: {got} vs {want}");
                assert!(close(inner(q, p), got, 1e-12));
            }
        }
        // Cosine merge: integral of (pi/2 sin(pi u))^2 / W = pi^2 / (8 W).
        let m = &ds[4];
        assert!(close(inner(m, m), PI * PI / (8.0 * 300.0), 1e-11));
        let w = Density::Window {
            t: 300.0,
            width: 300.0,
        };
        assert!(close(w.sigma_rel(), profile::SIGMA_REL_MAX, 1e-14));
        assert!(close(
            Density::Merge {
                t: 300.0,
                width: 300.0,
                shape: Shape::Linear
            }
            .sigma_rel(),
            profile::SIGMA_REL_MAX,
            1e-10
        ));
    }

    #[test]
    fn merges_on_checkpoints_are_the_convention_and_refused_where_undefined() {
        let raw: Vec<f64> = (1..=50).map(|i| 100.0 * i as f64).collect();
        let k = Kernel::merge(5000.0, 1000.0, Shape::OneMinusSqrt).unwrap();
        let (d, masses) = k.resolve(&raw).unwrap();
        assert!(d.is_none());
        assert_eq!(masses.len(), 11); // 4000, 4100, ..., 5000
        assert_eq!(masses[0].0, 4000.0);
        let c = merge_coefficients(&Shape::OneMinusSqrt, 11);
        for ((_, w), c) in masses.iter().zip(&c) {
            assert!((w - c).abs() < 1e-15);
        }
        let e = Kernel::merge(5000.0, 50.0, Shape::Linear)
            .unwrap()
            .resolve(&raw)
            .unwrap_err();
        assert!(e.to_string().contains("at least two"), "{e}");
        let e = Kernel::merge(4950.0, 500.0, Shape::Linear)
            .unwrap()
            .resolve(&raw)
            .unwrap_err();
        assert!(e.to_string().contains("no raw weights at t=4950"), "{e}");
        // Without raw weights: 1-sqrt is refused, cosine is a density.
        let e = k.resolve(&[]).unwrap_err().to_string();
        assert!(e.contains("square-integrable"), "{e}");
        let (d, m) = Kernel::merge(5000.0, 1000.0, Shape::Cosine)
            .unwrap()
            .resolve(&[])
            .unwrap();
        assert!(matches!(d, Some(Density::Merge { .. })) && m.is_empty());
        assert!(Kernel::window(100.0, 101.0)
            .unwrap_err()
            .to_string()
            .contains("longer than the run"));
        assert!(Kernel::window(100.0, f64::NAN).is_err());
    }

    #[test]
    fn point_masses_are_exact_at_checkpoints_interpolated_between_refused_outside() {
        let raw = [0.0, 100.0, 200.0];
        let mut w = [0.0; 3];
        assert!(point_mass(&raw, 100.0 * (1.0 + 1e-12), 1.0, &mut w).unwrap());
        assert_eq!(w, [0.0, 1.0, 0.0]);
        let mut w = [0.0; 3];
        assert!(!point_mass(&raw, 150.0, 2.0, &mut w).unwrap());
        assert_eq!(w, [0.0, 1.0, 1.0]);
        let e = point_mass(&raw, 250.0, 1.0, &mut w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t=250"), "{e}");
        let e = point_mass(&[], 7.0, 1.0, &mut []).unwrap_err().to_string();
        assert!(e.contains("t=7") && e.contains("no raw weights"), "{e}");
    }

    #[test]
    fn a_user_defined_shape_is_its_samples_interpolated() {
        let n = 4097;
        let samples = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
            (0..n).map(|j| f(j as f64 / (n - 1) as f64)).collect()
        };
        // Sampled cosine: within the linear interpolation error h^2 max|f''| / 8 of the cosine.
        let table = Shape::table(samples(&|u| Shape::Cosine.f(u))).unwrap();
        let h2 = (1.0 / (n - 1) as f64).powi(2);
        for m in [2, 7, 21, 100] {
            let (a, b) = (
                merge_coefficients(&table, m),
                merge_coefficients(&Shape::Cosine, m),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= h2 * PI * PI / 8.0 + 1e-15,
                    "{m}: {x} vs {y}"
                );
            }
        }
        // Over a span: a step density of mass 1 - f(1) and the point mass f(1) at the end.
        let half = Shape::table(samples(&|u| 1.0 - 0.5 * u)).unwrap();
        let k = Kernel::merge(1000.0, 400.0, half).unwrap();
        let (d, masses) = k.resolve(&[]).unwrap();
        assert_eq!(masses, vec![(1000.0, 0.5)]);
        let d = d.unwrap();
        assert!(close(d.cdf(800.0), 0.5, 1e-12) && d.cdf(600.0) == 0.0);
        assert!(close(d.density(700.0), 1.0 / 400.0, 1e-9));
        for (bad, why) in [
            (vec![1.0, 1.1], "increases"),
            (vec![1.0, f64::NAN], "finite"),
            (vec![0.9, 0.5], "f(0)"),
            (vec![1.0, -0.1], "below 0"),
            (vec![1.0], "samples"),
        ] {
            let e = Shape::table(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn cosine_merge_against_profiles_matches_adaptive_quadrature_to_1e_11() {
        // Power profiles from the running mean to very narrow ones and exponential ones, ending
        // before, inside and after windows from 0.3 % to the whole run.
        for gamma in [0.0, 0.3, 1.0, 6.94, 16.97, 100.0, 2000.0, 50_000.0] {
            for frac in [0.003, 0.2, 0.7, 1.0] {
                for tp in [0.5, 0.85, 0.999, 1.0, 1.3, 40.0] {
                    let t = 1e6;
                    let p = Density::Profile(Profile::power(tp * t, gamma).unwrap());
                    let m = Density::Merge {
                        t,
                        width: frac * t,
                        shape: Shape::Cosine,
                    };
                    let want = generic(&p, &m);
                    let got = inner(&p, &m);
                    let rel = (got - want).abs() / want.abs().max(1e-300);
                    assert!(
                        rel < 1e-11 || (got - want).abs() < 1e-300,
                        "{gamma} {frac} {tp}: {got} {want}"
                    );
                }
            }
        }
        for rate in [1e-7, 1e-5, 1e-3, 0.1] {
            for frac in [0.01, 0.5, 1.0] {
                for tp in [0.9, 1.0, 2.0] {
                    let t = 1e5;
                    let p = Density::Profile(Profile::Exponential { t: tp * t, rate });
                    let m = Density::Merge {
                        t,
                        width: frac * t,
                        shape: Shape::Cosine,
                    };
                    let (got, want) = (inner(&m, &p), generic(&p, &m));
                    let rel = (got - want).abs() / want.abs().max(1e-300);
                    assert!(
                        rel < 1e-11 || (got - want).abs() < 1e-300,
                        "{rate} {frac} {tp}: {got} {want}"
                    );
                }
            }
        }
    }

    /// `<p, q>` by adaptive Gauss-Kronrod over `q`'s window, whatever the pair.
    fn generic(p: &Density, q: &Density) -> f64 {
        let lo = (q.t()
            - match q {
                Density::Merge { width, .. } => *width,
                _ => 0.0,
            })
        .max(0.0);
        let hi = p.t().min(q.t());
        if hi <= lo {
            return 0.0;
        }
        adaptive(&|x| p.density(x) * q.density(x), lo, hi)
    }

    #[test]
    fn bad_step_profiles_are_refused() {
        assert!(Steps::new(vec![0.0, 1.0], vec![1.0]).is_ok());
        assert!(Steps::new(vec![0.0, 1.0], vec![0.5]).is_err());
        assert!(Steps::new(vec![1.0, 0.0], vec![1.0]).is_err());
        assert!(Steps::new(vec![0.0, 1.0, 2.0], vec![f64::NAN, 1.0]).is_err());
        assert!(Steps::new(vec![0.0], vec![]).is_err());
        assert!(Steps::new(vec![0.0, 1.0, 2.0], vec![1.5, -0.5]).is_err());
    }
}
