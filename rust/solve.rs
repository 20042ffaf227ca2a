//! Least-squares synthesis of target profiles from stored snapshots (EDM2 appendix C.3):
//! weights `x` with `sum_i x_i p_i ~= p_r`, their fit error and noise gain.

use faer::prelude::Solve;
use faer::{Mat, Side};

use crate::error::{PhemaError, Result};
use crate::profile::{inner, integrate, Profile};

/// Relative RMS rounding error of a value stored in fp16 (11-bit significand, uniform error).
pub const NOISE_FLOAT16: f64 = 2.818_926_596_e-4; // 2^-11 / sqrt(3)
/// Relative RMS rounding error of a value stored in bf16 (8-bit significand).
pub const NOISE_BFLOAT16: f64 = 2.255_141_277e-3; // 2^-8 / sqrt(3)
/// Relative RMS rounding error of a value stored in fp32.
pub const NOISE_FLOAT32: f64 = 3.440_883_e-8; // 2^-24 / sqrt(3)

/// How to solve.
#[derive(Clone, Copy, Debug)]
pub struct SolveOptions {
    /// Relative rounding noise of the stored snapshots (e.g. [`NOISE_FLOAT16`]). With `noise > 0`
    /// the solver minimises `fit_error^2 + noise^2 ||x||^2` under `sum x = 1`, the expected
    /// squared error of the reconstructed weights, whenever that beats plain least squares.
    /// `0` gives the plain least-squares solution of the paper.
    pub noise: f64,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            noise: NOISE_FLOAT16,
        }
    }
}

/// The solution for one target profile.
#[derive(Clone, Debug)]
pub struct TargetFit {
    /// The profile requested.
    pub target: Profile,
    /// Weight of every snapshot (0 for snapshots after the target time).
    pub weights: Vec<f64>,
    /// `||sum x_i p_i - p_r|| / ||p_r||`.
    pub fit_error: f64,
    /// `sum |x_i|`: amplification of the snapshots' rounding noise.
    pub gain: f64,
    /// `||x||_2`.
    pub norm: f64,
    /// `sum x_i`: the mass of the synthesized profile (1 for a perfect fit).
    pub mass: f64,
    /// Mass a classic EMA leaves on the initial weights, which no snapshot can supply.
    pub initial_mass: f64,
    /// Whether the noise-aware solution was chosen over plain least squares.
    pub regularized: bool,
    /// Fit error of plain least squares, for comparison.
    pub lstsq_fit_error: f64,
    /// Gain of plain least squares, for comparison.
    pub lstsq_gain: f64,
    /// The Gram system was singular (e.g. duplicated snapshots); the minimum-norm solution is used.
    pub rank_deficient: bool,
}

/// Solves for every target at once. Snapshots after a target's time get weight 0 for it.
pub fn solve(
    snapshots: &[Profile],
    targets: &[Profile],
    options: &SolveOptions,
) -> Result<Vec<TargetFit>> {
    if snapshots.is_empty() {
        return Err(PhemaError::Unsolvable("no snapshots to solve with".into()));
    }
    if !(options.noise >= 0.0 && options.noise.is_finite()) {
        return Err(PhemaError::OutOfRange {
            name: "noise",
            value: options.noise,
            expected: "must be a finite number >= 0".into(),
        });
    }
    let first = snapshots
        .iter()
        .map(Profile::t)
        .fold(f64::INFINITY, f64::min);
    // Targets sharing the same usable snapshots share one Gram system and its factorizations.
    let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for (k, target) in targets.iter().enumerate() {
        let t_r = target.t();
        let active: Vec<usize> = (0..snapshots.len())
            .filter(|&i| snapshots[i].t() <= t_r * (1.0 + 1e-12))
            .collect();
        if active.is_empty() {
            return Err(PhemaError::Unsolvable(format!(
                "no snapshot at or before t={t_r} (the first is at t={first})"
            )));
        }
        match groups.iter_mut().find(|(a, _)| *a == active) {
            Some((_, ks)) => ks.push(k),
            None => groups.push((active, vec![k])),
        }
    }
    let mut fits: Vec<Option<TargetFit>> = vec![None; targets.len()];
    for (active, ks) in groups {
        let mut group = GramSystem::new(&active.iter().map(|&i| snapshots[i]).collect::<Vec<_>>())?;
        let group_targets: Vec<Profile> = ks.iter().map(|&k| targets[k]).collect();
        let solved = group.fit_all(&group_targets, options.noise, &active, snapshots.len());
        for (k, fit) in ks.into_iter().zip(solved) {
            fits[k] = Some(fit);
        }
    }
    Ok(fits.into_iter().flatten().collect())
}

/// The Gram matrix of a set of snapshots with the factorizations every target reuses.
struct GramSystem {
    profiles: Vec<Profile>,
    a: Mat<f64>,
    /// Jacobi scaling `1/sqrt(A_ii)`: plain least squares is solved on the unit-diagonal matrix.
    scale: Vec<f64>,
    /// Cholesky factor of the scaled matrix, or `None` when it is numerically singular.
    llt: Option<faer::linalg::solvers::Llt<f64>>,
    /// Eigendecomposition of the scaled matrix (pseudo-inverse fallback), made when needed.
    scaled_eigen: Option<(Mat<f64>, Vec<f64>)>,
    /// Eigendecomposition of the unscaled matrix, for the noise-aware (ridge) solutions.
    eigen: Option<(Mat<f64>, Vec<f64>)>,
}

/// Smallest eigenvalue, relative to the largest, that plain least squares trusts.
const RCOND: f64 = 1e-13;

impl GramSystem {
    fn new(profiles: &[Profile]) -> Result<Self> {
        let m = profiles.len();
        let a = Mat::from_fn(m, m, |i, j| inner(&profiles[i], &profiles[j]));
        let scale: Vec<f64> = (0..m).map(|i| 1.0 / a[(i, i)].sqrt()).collect();
        let scaled = Mat::from_fn(m, m, |i, j| a[(i, j)] * scale[i] * scale[j]);
        let llt = scaled.llt(Side::Lower).ok().filter(|llt| {
            // Cholesky succeeds on matrices singular to rounding; its diagonal says whether the
            // factor can be trusted (the condition number is at least (max/min L_ii)^2).
            let l = llt.L();
            let d: Vec<f64> = (0..m).map(|i| l[(i, i)]).collect();
            let (lo, hi) = d.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &x| {
                (lo.min(x.abs()), hi.max(x.abs()))
            });
            lo * lo > RCOND.sqrt() * hi * hi
        });
        let scaled_eigen = if llt.is_none() {
            Some(eigen(&scaled)?)
        } else {
            None
        };
        Ok(GramSystem {
            profiles: profiles.to_vec(),
            a,
            scale,
            llt,
            scaled_eigen,
            eigen: None,
        })
    }

    /// Solves for every target of the group at once: one Cholesky solve with a right-hand side
    /// per target, and every `A x` of the fit errors as one matrix product.
    fn fit_all(
        &mut self,
        targets: &[Profile],
        noise: f64,
        active: &[usize],
        n_total: usize,
    ) -> Vec<TargetFit> {
        let m = self.profiles.len();
        let kk = targets.len();
        let b = Mat::from_fn(m, kk, |i, k| inner(&self.profiles[i], &targets[k]));
        let c: Vec<f64> = targets.iter().map(|t| inner(t, t)).collect();
        let lstsq = self.lstsq(&b);
        let ls_sq = self.squared_errors(&lstsq, &b, &c);
        let nn = noise * noise;
        let mut x = lstsq.clone();
        let mut regularized = vec![false; kk];
        // The ridge solution's total is at least its squared fit error, which is at least plain
        // least squares' (the unconstrained minimum): it can win by 5% only when
        // 0.05 fit_ls^2 < 0.95 noise^2 ||x_ls||^2. Targets failing that (with a margin for
        // rounding) are never regularized, and when none passes no eigendecomposition is made.
        let candidates: Vec<bool> = (0..kk)
            .map(|k| {
                noise > 0.0
                    && m > 1
                    && 0.05 * ls_sq[k] * (1.0 - 1e-6) < 0.95 * nn * norm2(lstsq.col(k))
            })
            .collect();
        if candidates.iter().any(|&w| w) {
            if let Some(ridge) = self.ridge(&b, &c, nn) {
                let ridge_sq = self.squared_errors(&ridge, &b, &c);
                for k in (0..kk).filter(|&k| candidates[k]) {
                    let total_ridge = ridge_sq[k] + nn * norm2(ridge.col(k));
                    let total_ls = ls_sq[k] + nn * norm2(lstsq.col(k));
                    // Only a clear improvement is worth moving away from the paper's solution.
                    if total_ridge < 0.95 * total_ls {
                        x.col_mut(k).copy_from(ridge.col(k));
                        regularized[k] = true;
                    }
                }
            }
        }
        // Weights at rounding level would make the engine read whole snapshots for nothing.
        for k in 0..kk {
            let largest = x.col(k).iter().fold(0.0_f64, |mx, v| mx.max(v.abs()));
            for v in x.col_mut(k).iter_mut() {
                if v.abs() < 1e-10 * largest {
                    *v = 0.0;
                }
            }
        }
        let fit_sq = self.squared_errors(&x, &b, &c);
        (0..kk)
            .map(|k| {
                let xs = x.col(k);
                let mut weights = vec![0.0; n_total];
                for (w, &i) in xs.iter().zip(active) {
                    weights[i] = *w;
                }
                TargetFit {
                    target: targets[k],
                    fit_error: fit_sq[k].sqrt(),
                    gain: xs.iter().map(|v| v.abs()).sum(),
                    norm: norm2(xs).sqrt(),
                    mass: xs.iter().sum(),
                    initial_mass: targets[k].initial_mass(),
                    regularized: regularized[k],
                    lstsq_fit_error: ls_sq[k].sqrt(),
                    lstsq_gain: lstsq.col(k).iter().map(|v| v.abs()).sum(),
                    rank_deficient: self.llt.is_none(),
                    weights,
                }
            })
            .collect()
    }

    /// Plain least squares `A X = B` on the Jacobi-scaled system: Cholesky, or the
    /// minimum-norm pseudo-inverse solution when the system is singular.
    fn lstsq(&self, b: &Mat<f64>) -> Mat<f64> {
        let (m, kk) = (b.nrows(), b.ncols());
        let rhs = Mat::from_fn(m, kk, |i, k| b[(i, k)] * self.scale[i]);
        let y = match (&self.llt, &self.scaled_eigen) {
            // One right-hand side at a time: faer's blocked multi-column triangular solves sum
            // in another order, which moves ill-conditioned solutions by ~1e-9 of their gain.
            (Some(llt), _) => {
                let mut y = Mat::zeros(m, kk);
                for k in 0..kk {
                    let yk = llt.solve(rhs.col(k).as_mat());
                    y.col_mut(k).copy_from(yk.col(0));
                }
                y
            }
            (None, Some((v, lambda))) => {
                let max = lambda.iter().cloned().fold(0.0, f64::max);
                apply_spectral(
                    v,
                    lambda,
                    &rhs,
                    |l, _| {
                        if l > RCOND * max {
                            1.0 / l
                        } else {
                            0.0
                        }
                    },
                )
            }
            (None, None) => unreachable!("GramSystem::new makes one of the two"),
        };
        Mat::from_fn(m, kk, |i, k| y[(i, k)] * self.scale[i])
    }

    /// For every target `k`: `argmin x'Ax - 2b_k'x + lambda_k ||x||^2` subject to `sum x = 1`,
    /// with `lambda_k = nn c_k`. `None` when the eigendecomposition fails.
    fn ridge(&mut self, b: &Mat<f64>, c: &[f64], nn: f64) -> Option<Mat<f64>> {
        if self.eigen.is_none() {
            // The unscaled decomposition: the ridge penalty is isotropic only in these coordinates.
            self.eigen = eigen(&self.a).ok();
        }
        let (v, ev) = self.eigen.as_ref()?;
        let (m, kk) = (b.nrows(), b.ncols());
        let inv = |l: f64, k: usize| 1.0 / (l.max(0.0) + nn * c[k]);
        let mb = apply_spectral(v, ev, b, inv);
        let ones = Mat::from_fn(m, kk, |_, _| 1.0);
        let m1 = apply_spectral(v, ev, &ones, inv);
        let mut out = mb;
        for k in 0..kk {
            let mu = (1.0 - out.col(k).iter().sum::<f64>()) / m1.col(k).iter().sum::<f64>();
            for (o, y) in out.col_mut(k).iter_mut().zip(m1.col(k).iter()) {
                *o += mu * y;
            }
        }
        Some(out)
    }

    /// Squared relative fit errors `||sum x_i p_i - p_r||^2 / ||p_r||^2` of every column of `x`,
    /// from `x'Ax - 2x'b + c`.
    fn squared_errors(&self, x: &Mat<f64>, b: &Mat<f64>, c: &[f64]) -> Vec<f64> {
        let ax = &self.a * x;
        (0..x.ncols())
            .map(|k| {
                let (xk, axk, bk) = (x.col(k), ax.col(k), b.col(k));
                let xax: f64 = xk.iter().zip(axk.iter()).map(|(x, y)| x * y).sum();
                let xb: f64 = xk.iter().zip(bk.iter()).map(|(x, b)| x * b).sum();
                ((xax - 2.0 * xb + c[k]) / c[k]).max(0.0)
            })
            .collect()
    }
}

/// `||x||^2`.
fn norm2(x: faer::ColRef<'_, f64>) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// Symmetric eigendecomposition `A = V diag(lambda) V'`.
fn eigen(a: &Mat<f64>) -> Result<(Mat<f64>, Vec<f64>)> {
    let evd = a.self_adjoint_eigen(Side::Lower).map_err(|e| {
        PhemaError::Unsolvable(format!(
            "eigendecomposition of the Gram matrix failed: {e:?}"
        ))
    })?;
    let s = evd.S();
    let lambda: Vec<f64> = (0..a.nrows()).map(|i| s[i]).collect();
    Ok((evd.U().to_owned(), lambda))
}

/// `V diag(f(lambda_j, k)) V' b_k` for every column `k` of `b`.
fn apply_spectral(
    v: &Mat<f64>,
    lambda: &[f64],
    b: &Mat<f64>,
    f: impl Fn(f64, usize) -> f64,
) -> Mat<f64> {
    let z = v.transpose() * b;
    let zs = Mat::from_fn(z.nrows(), z.ncols(), |j, k| z[(j, k)] * f(lambda[j], k));
    v * &zs
}

/// Weights on plain checkpoints (snapshots of kind `raw`: the weights at time `t_i`) for one
/// target profile.
#[derive(Clone, Debug)]
pub struct RawFit {
    /// The profile requested.
    pub target: Profile,
    /// Weight of every checkpoint (0 after the target time). They are positive and sum to 1.
    pub weights: Vec<f64>,
    /// `||p_r - I p_r|| / ||p_r||` with `I` the interpolation below: how well the checkpoint
    /// spacing resolves the target's shape.
    pub fit_error: f64,
    /// Standard deviation of the target over the (mass-weighted) checkpoint spacing under it:
    /// checkpoints per target width. Below ~2 the average is poorly resolved.
    pub resolution: f64,
    /// Target mass outside the checkpoints' span (before the first, after the last before `t`),
    /// where the weights are held constant.
    pub extrapolated_mass: f64,
    /// Mass a classic EMA leaves on the initial weights.
    pub initial_mass: f64,
}

/// Panels per interval between checkpoints: enough for 20-point Gauss-Legendre to be exact to
/// rounding for profiles that vary by many e-folds across one interval.
const RAW_PANELS: usize = 16;

/// Weights on checkpoints at `times` (ascending, distinct) for `target`.
///
/// The trajectory is interpolated linearly between checkpoints and held constant before the
/// first and after the last one before the target time; the weights are the integrals of the
/// target profile against the resulting hat functions, so an exactly linear trajectory is
/// averaged exactly.
pub fn solve_raw(times: &[f64], target: &Profile) -> Result<RawFit> {
    let increasing = times
        .windows(2)
        .all(|w| w[0].partial_cmp(&w[1]) == Some(std::cmp::Ordering::Less));
    if !increasing || times.iter().any(|t| t.is_nan() || *t <= 0.0) {
        return Err(PhemaError::Invalid(
            "checkpoint times must be positive and strictly increasing".into(),
        ));
    }
    let t_r = target.t();
    let m = times.iter().filter(|&&t| t <= t_r * (1.0 + 1e-12)).count();
    if m == 0 {
        return Err(PhemaError::Unsolvable(format!(
            "no checkpoint at or before t={t_r} (the first is at t={})",
            times.first().copied().unwrap_or(f64::NAN)
        )));
    }
    let ts = &times[..m];
    let p = |tau: f64| target.density(tau);
    let mut weights = vec![0.0; times.len()];
    // Held constant on (0, t_1] and on (t_m, t_r].
    let head = integrate(p, 0.0, ts[0], RAW_PANELS);
    let tail = if t_r > ts[m - 1] {
        integrate(p, ts[m - 1], t_r, RAW_PANELS)
    } else {
        0.0
    };
    weights[0] += head;
    weights[m - 1] += tail;
    let mut spacing = head * ts[0];
    for i in 1..m {
        let (a, b) = (ts[i - 1], ts[i]);
        let h = b - a;
        weights[i - 1] += integrate(|x| p(x) * (b - x) / h, a, b, RAW_PANELS);
        weights[i] += integrate(|x| p(x) * (x - a) / h, a, b, RAW_PANELS);
        spacing += integrate(p, a, b, RAW_PANELS) * h;
    }
    spacing += tail * (t_r - ts[m - 1]).max(0.0);
    // Interpolation error of the profile itself on the same grid.
    let interp = |x: f64| -> f64 {
        if x <= ts[0] {
            return p(ts[0]);
        }
        if x >= ts[m - 1] {
            return p(ts[m - 1]);
        }
        let i = ts.partition_point(|&t| t < x);
        let (a, b) = (ts[i - 1], ts[i]);
        (p(a) * (b - x) + p(b) * (x - a)) / (b - a)
    };
    let mut edges = vec![0.0];
    edges.extend_from_slice(ts);
    if t_r > ts[m - 1] {
        edges.push(t_r);
    }
    let (mut num, mut den) = (0.0, 0.0);
    for w in edges.windows(2) {
        num += integrate(|x| (p(x) - interp(x)).powi(2), w[0], w[1], RAW_PANELS);
        den += integrate(|x| p(x).powi(2), w[0], w[1], RAW_PANELS);
    }
    Ok(RawFit {
        target: *target,
        weights,
        fit_error: (num / den).sqrt(),
        resolution: target.sigma_rel() * t_r / spacing.max(f64::MIN_POSITIVE),
        extrapolated_mass: head + tail,
        initial_mass: target.initial_mass(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::sigma_rel_to_gamma;

    /// Snapshots as in EDM2: two profiles, `n` times evenly spaced up to `t_end`.
    fn edm2_snapshots(n: usize, t_end: f64) -> Vec<Profile> {
        let mut out = Vec::new();
        for i in 1..=n {
            let t = t_end * i as f64 / n as f64;
            for s in [0.05, 0.10] {
                out.push(Profile::power(t, sigma_rel_to_gamma(s).unwrap()).unwrap());
            }
        }
        out
    }

    const EXACT: SolveOptions = SolveOptions { noise: 0.0 };

    #[test]
    fn target_equal_to_a_stored_profile_gets_weight_one() {
        let snaps = edm2_snapshots(16, 16_000.0);
        let target = snaps[31];
        for opts in [EXACT, SolveOptions::default()] {
            let fit = &solve(&snaps, &[target], &opts).unwrap()[0];
            assert!(fit.fit_error < 1e-6, "{}", fit.fit_error);
            for (i, w) in fit.weights.iter().enumerate() {
                let want = if i == 31 { 1.0 } else { 0.0 };
                assert!((w - want).abs() < 1e-6, "{i}: {w}");
            }
        }
    }

    #[test]
    fn fit_error_falls_as_snapshots_are_added() {
        let target = Profile::power(16_000.0, sigma_rel_to_gamma(0.08).unwrap()).unwrap();
        let mut last = f64::INFINITY;
        for n in [2, 4, 8, 16, 32] {
            let fit = &solve(&edm2_snapshots(n, 16_000.0), &[target], &EXACT).unwrap()[0];
            assert!(fit.fit_error < last, "n={n}: {} !< {last}", fit.fit_error);
            last = fit.fit_error;
        }
        assert!(last < 1e-2);
    }

    #[test]
    fn fit_error_agrees_with_direct_integration_of_the_residual() {
        let snaps = edm2_snapshots(8, 8_000.0);
        let targets = [
            Profile::power(8_000.0, sigma_rel_to_gamma(0.13).unwrap()).unwrap(),
            Profile::from_beta(8_000.0, 0.999, 1.0).unwrap(),
        ];
        for fit in solve(&snaps, &targets, &EXACT).unwrap() {
            let resid = |tau: f64| {
                let s: f64 = snaps
                    .iter()
                    .zip(&fit.weights)
                    .map(|(p, w)| w * p.density(tau))
                    .sum();
                s - fit.target.density(tau)
            };
            let n = 400_000;
            let h = 8_000.0 / n as f64;
            let (mut num, mut den) = (0.0, 0.0);
            for i in 0..n {
                let tau = (i as f64 + 0.5) * h;
                num += resid(tau).powi(2) * h;
                den += fit.target.density(tau).powi(2) * h;
            }
            let want = (num / den).sqrt();
            assert!(
                (fit.fit_error - want).abs() < 1e-4 * want.max(1e-3),
                "{} vs {want}",
                fit.fit_error
            );
        }
    }

    #[test]
    fn classic_ema_target_matches_brute_force_step_by_step_ema() {
        // Parameters theta_k = e_k (one-hot at step k): the classic EMA after T steps gives the
        // discrete weight of every step; a power snapshot gives its discrete weights likewise.
        // Combining snapshots with the solved weights must reproduce the EMA's weights on steps
        // 1..T (the renormalized target), up to the fit error.
        let t_end = 2000usize;
        let beta = 0.995;
        let mut ema = vec![0.0; t_end + 1]; // index 0 = initial weights
        ema[0] = 1.0;
        for k in 1..=t_end {
            for v in ema.iter_mut() {
                *v *= beta;
            }
            ema[k] += 1.0 - beta;
        }
        let init = ema[0];
        let target = Profile::from_beta(t_end as f64, beta, 1.0).unwrap();
        assert!((target.initial_mass() - init).abs() < 1e-12);
        let power_weights = |t: usize, gamma: f64| -> Vec<f64> {
            // Step k covers (k-1, k]: its weight is the profile's integral over that interval.
            (0..=t_end)
                .map(|k| {
                    if k == 0 || k > t {
                        0.0
                    } else {
                        let r = |x: f64| (x / t as f64).powf(gamma + 1.0);
                        r(k as f64) - r(k as f64 - 1.0)
                    }
                })
                .collect()
        };
        let mut snaps = Vec::new();
        for i in 1..=40 {
            let t = 50 * i;
            for g in [
                sigma_rel_to_gamma(0.05).unwrap(),
                sigma_rel_to_gamma(0.1).unwrap(),
            ] {
                snaps.push((t, g));
            }
        }
        let profiles: Vec<Profile> = snaps
            .iter()
            .map(|&(t, g)| Profile::power(t as f64, g).unwrap())
            .collect();
        let fit = &solve(&profiles, &[target], &EXACT).unwrap()[0];
        let mut synth = vec![0.0; t_end + 1];
        for (&(t, g), w) in snaps.iter().zip(&fit.weights) {
            for (s, p) in synth.iter_mut().zip(power_weights(t, g)) {
                *s += w * p;
            }
        }
        let want: Vec<f64> = ema.iter().map(|v| v / (1.0 - init)).collect();
        let num: f64 = (1..=t_end).map(|k| (synth[k] - want[k]).powi(2)).sum();
        let den: f64 = (1..=t_end).map(|k| want[k].powi(2)).sum();
        let discrete_err = (num / den).sqrt();
        assert!(discrete_err < 0.05, "{discrete_err}");
        assert!(
            discrete_err < 3.0 * fit.fit_error + 1e-3,
            "{discrete_err} vs {}",
            fit.fit_error
        );
    }

    #[test]
    fn duplicated_snapshots_give_a_sane_split() {
        let g = sigma_rel_to_gamma(0.05).unwrap();
        let p = Profile::power(1000.0, g).unwrap();
        let snaps = vec![Profile::power(500.0, g).unwrap(), p, p];
        let fit = &solve(&snaps, &[p], &EXACT).unwrap()[0];
        assert!(fit.rank_deficient);
        assert!(fit.fit_error < 1e-6);
        assert!((fit.weights[1] - 0.5).abs() < 1e-6 && (fit.weights[2] - 0.5).abs() < 1e-6);
        assert!(fit.weights[0].abs() < 1e-6);
    }

    #[test]
    fn snapshots_after_the_target_time_get_zero_weight() {
        let snaps = edm2_snapshots(10, 10_000.0);
        let target = Profile::power(6_500.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap();
        let fit = &solve(&snaps, &[target], &EXACT).unwrap()[0];
        for (p, w) in snaps.iter().zip(&fit.weights) {
            if p.t() > 6_500.0 {
                assert_eq!(*w, 0.0);
            }
        }
        // The target covers (6000, 6500], which no snapshot does: a visible but bounded misfit.
        assert!(
            fit.fit_error > 0.1 && fit.fit_error < 1.0,
            "{}",
            fit.fit_error
        );
        let at_snapshot = Profile::power(6_000.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap();
        let fit = &solve(&snaps, &[at_snapshot], &EXACT).unwrap()[0];
        assert!(fit.fit_error < 1e-6, "{}", fit.fit_error);
        let early = Profile::power(10.0, 5.0).unwrap();
        assert!(solve(&snaps, &[early], &EXACT).is_err());
    }

    #[test]
    fn noise_aware_solution_trades_negligible_fit_for_much_smaller_gain() {
        let snaps = edm2_snapshots(256, 64_000.0);
        let target = Profile::power(64_000.0, sigma_rel_to_gamma(0.01).unwrap()).unwrap();
        let exact = &solve(&snaps, &[target], &EXACT).unwrap()[0];
        let robust = &solve(&snaps, &[target], &SolveOptions::default()).unwrap()[0];
        let total = |f: &TargetFit| f.fit_error.powi(2) + (NOISE_FLOAT16 * f.norm).powi(2);
        // Plain least squares on 512 snapshots: ||x|| ~ 100 for sigma_rel 0.01 (SPEC §1).
        assert!(exact.norm > 50.0, "{}", exact.norm);
        assert!(robust.regularized);
        assert!(
            robust.norm < 0.9 * exact.norm,
            "{} vs {}",
            robust.norm,
            exact.norm
        );
        assert!(total(robust) < 0.95 * total(exact));
        assert!((robust.mass - 1.0).abs() < 1e-9);
        assert!((robust.lstsq_gain - exact.gain).abs() < 1e-6 * exact.gain);
    }

    #[test]
    fn many_targets_at_once_equal_separate_solves() {
        let snaps = edm2_snapshots(20, 20_000.0);
        let targets: Vec<Profile> = [0.03, 0.07, 0.2]
            .iter()
            .map(|&s| Profile::power(20_000.0, sigma_rel_to_gamma(s).unwrap()).unwrap())
            .chain([Profile::from_beta(15_000.0, 0.9995, 1.0).unwrap()])
            .collect();
        let all = solve(&snaps, &targets, &SolveOptions::default()).unwrap();
        for (k, t) in targets.iter().enumerate() {
            let one = &solve(&snaps, &[*t], &SolveOptions::default()).unwrap()[0];
            // Solved together the products are blocked differently: equal to rounding.
            assert_eq!(one.regularized, all[k].regularized);
            for (a, b) in one.weights.iter().zip(&all[k].weights) {
                assert!((a - b).abs() <= 1e-12 * one.gain, "{k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn raw_weights_average_a_linear_trajectory_exactly() {
        // theta(tau) = 3 + 2 tau is linear: the interpolated average equals the exact one,
        // E[theta] = 3 + 2 E[tau], as long as the target mass lies between checkpoints.
        let times: Vec<f64> = (1..=40).map(|i| 250.0 * i as f64).collect();
        for target in [
            Profile::power(10_000.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap(),
            Profile::from_beta(8_000.0, 0.999, 1.0).unwrap(),
        ] {
            let fit = solve_raw(&times, &target).unwrap();
            let mean = integrate(|x| x * target.density(x), 0.0, target.t(), 4000);
            let got: f64 = times
                .iter()
                .zip(&fit.weights)
                .map(|(t, w)| w * (3.0 + 2.0 * t))
                .sum();
            let head = fit.extrapolated_mass;
            // The mass before the first checkpoint is held at theta(t_1): a known, reported bias.
            let bias = integrate(|x| target.density(x) * 2.0 * (250.0 - x), 0.0, 250.0, 400);
            assert!(head < 0.05, "{head}");
            assert!(
                (got - bias - (3.0 + 2.0 * mean)).abs() < 1e-8 * got,
                "{got} {mean}"
            );
            assert!((fit.weights.iter().sum::<f64>() - 1.0).abs() < 1e-10);
            assert!(fit.weights.iter().all(|&w| w >= 0.0));
        }
    }

    #[test]
    fn raw_resolution_and_fit_error_track_the_spacing() {
        let target = Profile::power(10_000.0, sigma_rel_to_gamma(0.05).unwrap()).unwrap();
        let dense: Vec<f64> = (1..=200).map(|i| 50.0 * i as f64).collect();
        let sparse: Vec<f64> = (1..=5).map(|i| 2000.0 * i as f64).collect();
        let d = solve_raw(&dense, &target).unwrap();
        let s = solve_raw(&sparse, &target).unwrap();
        assert!(
            d.resolution > 5.0 && s.resolution < 0.5,
            "{} {}",
            d.resolution,
            s.resolution
        );
        assert!(
            d.fit_error < 0.01 && s.fit_error > 0.1,
            "{} {}",
            d.fit_error,
            s.fit_error
        );
        assert!(solve_raw(&[5.0, 5.0], &target).is_err());
    }
}
