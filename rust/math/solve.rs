//! Least-squares synthesis of target profiles from stored snapshots (EDM2 appendix C.3):
//! weights `x` with `sum_i x_i p_i ~= p_r`, their fit error and noise gain.

use faer::prelude::Solve;
use faer::{Mat, Side};
use rayon::prelude::*;

use crate::error::{number, PhemaError, Result};
use crate::math::kernel::{self, inner, Density, Kernel};
use crate::math::profile::{integrate, Profile};

/// Relative RMS rounding error of a value stored in fp16 (11-bit significand, uniform error).
pub const NOISE_FLOAT16: f64 = 2.818_926_596_e-4; // 2^-11 / sqrt(3)
/// Relative RMS rounding error of a value stored in bf16 (8-bit significand).
pub const NOISE_BFLOAT16: f64 = 2.255_141_277e-3; // 2^-8 / sqrt(3)
/// Relative RMS rounding error of a value stored in fp32.
pub const NOISE_FLOAT32: f64 = 3.440_883_e-8; // 2^-24 / sqrt(3)

/// Largest [`TargetFit::cdf_error`] phema stands behind: past it the synthesized average puts
/// its weight visibly elsewhere in time than the one requested (docs/accuracy.md).
pub const POOR_CDF_ERROR: f64 = 0.5;
/// Largest expected relative rounding noise of an output, `noise * ||x||_2`, phema stands behind:
/// past it the snapshots' rounding noise, amplified by large weights of both signs, swamps the
/// average (docs/accuracy.md).
pub const POOR_NOISE: f64 = 0.01;

/// How to solve.
#[derive(Clone, Copy, Debug)]
pub struct SolveOptions {
    /// Relative rounding noise of the stored snapshots (e.g. [`NOISE_FLOAT16`]). With `noise > 0`
    /// the solver minimises `fit_error^2 + noise^2 ||x||^2` under `sum x = 1`, the expected
    /// squared error of the reconstructed weights, whenever that beats plain least squares.
    /// `0` gives the mass-preserving least-squares solution.
    pub noise: f64,
    /// Only snapshots at or before a target's time contribute ("what could have been known
    /// then"). By default every snapshot does: differences of later profiles cancel their weight
    /// after the target time, which is what makes targets between snapshot times accurate.
    pub causal: bool,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            noise: NOISE_FLOAT16,
            causal: false,
        }
    }
}

/// The solution for one target profile.
#[derive(Clone, Debug)]
pub struct TargetFit {
    /// The profile requested.
    pub target: Density,
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
    /// Expected relative rounding noise of the output, `noise * ||x||_2`.
    pub noise_error: f64,
    /// `integral |F_synth - F_r| / (sigma_rel t_r)` with `F` the cumulative distributions: how
    /// much mass the synthesized profile misplaces, times how far, in units of the target's
    /// width. Weights move smoothly in time, so this (not the profile's L2 error, which counts
    /// detail no trajectory has) bounds the error of the average: weights drifting steadily by
    /// `d` per target width come out at most `cdf_error * d` off.
    pub cdf_error: f64,
    /// The fit cannot be trusted: `cdf_error > POOR_CDF_ERROR` or `noise_error > POOR_NOISE`.
    pub poor: bool,
}

/// Whether a fit misplacing this much mass with this output noise is one phema refuses to
/// write silently.
pub fn is_poor(cdf_error: f64, noise_error: f64) -> bool {
    !(cdf_error <= POOR_CDF_ERROR && noise_error <= POOR_NOISE)
}

/// Solves for every target at once, each under `sum x = 1`. With `options.causal`, snapshots
/// after a target's time get weight 0 for it.
pub fn solve(
    snapshots: &[Profile],
    targets: &[Profile],
    options: &SolveOptions,
) -> Result<Vec<TargetFit>> {
    let snaps: Vec<Density> = snapshots.iter().map(|&p| p.into()).collect();
    let targets: Vec<Density> = targets.iter().map(|&p| p.into()).collect();
    solve_densities(&snaps, &targets, options)
}

/// [`solve`] for snapshots and targets of any density (docs/kernels.md).
pub fn solve_densities(
    snapshots: &[Density],
    targets: &[Density],
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
    if let Some(t) = targets.iter().find(|t| !t.square_integrable()) {
        return Err(PhemaError::Unsolvable(format!(
            "the target ending at t={} is not square-integrable: no least-squares fit exists",
            t.t()
        )));
    }
    // A profile so narrow (or so early) that its squared norm overflows double precision, or a
    // window below the resolution of its end time, would give a fit error of 0, inf or NaN.
    for (what, set) in [("target", targets), ("snapshot", snapshots)] {
        for d in set {
            let norm2 = inner(d, d);
            if !(norm2.is_finite() && norm2 > 0.0) {
                return Err(PhemaError::Unsolvable(format!(
                    "the {what} ending at t={} is too narrow for double precision (its squared \
                     norm is {}): no fit can be computed; give a wider target or a later time",
                    number(d.t()),
                    number(norm2)
                )));
            }
        }
    }
    let first = snapshots
        .iter()
        .map(Density::t)
        .fold(f64::INFINITY, f64::min);
    // Targets sharing the same usable snapshots share one Gram system and its factorizations.
    let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for (k, target) in targets.iter().enumerate() {
        let t_r = target.t();
        let active: Vec<usize> = (0..snapshots.len())
            .filter(|&i| !options.causal || snapshots[i].t() <= t_r * (1.0 + 1e-12))
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
        let mut group = GramSystem::new(
            &active
                .iter()
                .map(|&i| snapshots[i].clone())
                .collect::<Vec<_>>(),
        )?;
        let group_targets: Vec<Density> = ks.iter().map(|&k| targets[k].clone()).collect();
        let solved = group.fit_all(&group_targets, options.noise, &active, snapshots.len());
        for (k, fit) in ks.into_iter().zip(solved) {
            fits[k] = Some(fit);
        }
    }
    Ok(fits.into_iter().flatten().collect())
}

/// The Gram matrix of a set of snapshots with the factorizations every target reuses.
struct GramSystem {
    profiles: Vec<Density>,
    a: Mat<f64>,
    /// Jacobi scaling `1/sqrt(A_ii)`: plain least squares is solved on the unit-diagonal matrix.
    scale: Vec<f64>,
    /// Cholesky factor of the scaled matrix, or `None` when it is numerically singular.
    llt: Option<faer::linalg::solvers::Llt<f64>>,
    /// Eigendecomposition of the scaled matrix (pseudo-inverse fallback), made when needed.
    scaled_eigen: Option<(Mat<f64>, Vec<f64>)>,
    /// Tridiagonal form of the unscaled matrix, for the noise-aware (ridge) solutions.
    tridiag: Option<Tridiagonal>,
}

/// `A = Q T Q'` with `T` tridiagonal: every ridge `(A + lambda I)^-1 b` is then two Householder
/// sequences and a tridiagonal solve, for any `lambda`, at a fraction of an eigendecomposition's
/// cost.
struct Tridiagonal {
    /// Householder vectors of `Q` below the subdiagonal (faer's `tridiag_in_place` layout).
    basis: Mat<f64>,
    /// The block factors of `Q`.
    factor: Mat<f64>,
    diag: Vec<f64>,
    off: Vec<f64>,
}

impl Tridiagonal {
    fn new(a: &Mat<f64>) -> Self {
        use faer::dyn_stack::{MemBuffer, MemStack};
        use faer::linalg::evd::tridiag;
        let n = a.nrows();
        let par = faer::get_global_parallelism();
        let mut basis = a.clone();
        let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
        let mut factor = Mat::zeros(bs, n.saturating_sub(1));
        let mut mem = MemBuffer::new(tridiag::tridiag_in_place_scratch::<f64>(
            n,
            par,
            Default::default(),
        ));
        tridiag::tridiag_in_place(
            basis.as_mut(),
            factor.as_mut(),
            par,
            MemStack::new(&mut mem),
            Default::default(),
        );
        let diag = (0..n).map(|i| basis[(i, i)]).collect();
        let off = (0..n.saturating_sub(1))
            .map(|i| basis[(i + 1, i)])
            .collect();
        Tridiagonal {
            basis,
            factor,
            diag,
            off,
        }
    }

    /// `Q' x` (`transpose`) or `Q x`, in place.
    fn apply(&self, x: &mut Mat<f64>, transpose: bool) {
        use faer::dyn_stack::{MemBuffer, MemStack};
        use faer::linalg::householder;
        let n = self.diag.len();
        if n < 2 {
            return;
        }
        let par = faer::get_global_parallelism();
        let (bs, cols) = (self.factor.nrows(), x.ncols());
        let basis = self.basis.as_ref().submatrix(1, 0, n - 1, n - 1);
        let rows = x.as_mut().subrows_mut(1, n - 1);
        if transpose {
            let mut mem = MemBuffer::new(
                householder::apply_block_householder_sequence_transpose_on_the_left_in_place_scratch::<
                    f64,
                >(n - 1, bs, cols),
            );
            householder::apply_block_householder_sequence_transpose_on_the_left_in_place_with_conj(
                basis,
                self.factor.as_ref(),
                faer::Conj::No,
                rows,
                par,
                MemStack::new(&mut mem),
            );
        } else {
            let mut mem = MemBuffer::new(
                householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
                    n - 1,
                    bs,
                    cols,
                ),
            );
            householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
                basis,
                self.factor.as_ref(),
                faer::Conj::No,
                rows,
                par,
                MemStack::new(&mut mem),
            );
        }
    }

    /// `(T + lambda I)^-1 z` by elimination without pivoting (`T + lambda I` is positive
    /// definite); `None` when a pivot is not positive (a Gram matrix indefinite beyond
    /// rounding).
    fn solve_shifted(&self, lambda: f64, z: &mut [f64]) -> Option<()> {
        let n = self.diag.len();
        let mut pivot = vec![0.0; n];
        pivot[0] = self.diag[0] + lambda;
        for i in 1..n {
            let l = self.off[i - 1] / pivot[i - 1];
            pivot[i] = self.diag[i] + lambda - l * self.off[i - 1];
            z[i] -= l * z[i - 1];
        }
        if !pivot.iter().all(|&p| p > 0.0) {
            return None;
        }
        z[n - 1] /= pivot[n - 1];
        for i in (0..n - 1).rev() {
            z[i] = (z[i] - self.off[i] * z[i + 1]) / pivot[i];
        }
        Some(())
    }
}

/// Gauss-Legendre panels per piece between knots for [`TargetFit::cdf_error`].
const CDF_PANELS: usize = 1;
/// Quadrature nodes whose snapshot distributions are held at once.
const CDF_BLOCK: usize = 1024;

/// Relative rounding of the Gram matrix's entries and of `x'Ax`'s sums, with a margin.
const GRAM_ROUNDING: f64 = 2e-15;
/// Most e-folds (or radians) any density varies by over one residual quadrature panel.
const RESIDUAL_EFOLDS: f64 = 4.0;
/// Halvings toward 0 of the first piece in the residual quadrature: below `2^-60` of it lies
/// residual no fit error reads.
const RESIDUAL_LEVELS: i32 = 60;

/// Smallest eigenvalue, relative to the largest, that plain least squares trusts.
const RCOND: f64 = 1e-13;

impl GramSystem {
    fn new(profiles: &[Density]) -> Result<Self> {
        check_headroom()?;
        let m = profiles.len();
        // The lower triangle in parallel (quadrature for some pairs), mirrored.
        let lower: Vec<Vec<f64>> = (0..m)
            .into_par_iter()
            .map(|i| (0..=i).map(|j| inner(&profiles[i], &profiles[j])).collect())
            .collect();
        let a = Mat::from_fn(m, m, |i, j| if j <= i { lower[i][j] } else { lower[j][i] });
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
            tridiag: None,
        })
    }

    /// Solves for every target of the group at once: one Cholesky solve with a right-hand side
    /// per target, and every `A x` of the fit errors as one matrix product.
    fn fit_all(
        &mut self,
        targets: &[Density],
        noise: f64,
        active: &[usize],
        n_total: usize,
    ) -> Vec<TargetFit> {
        let m = self.profiles.len();
        let kk = targets.len();
        let columns: Vec<(Vec<f64>, f64)> = targets
            .par_iter()
            .map(|t| {
                (
                    self.profiles.iter().map(|p| inner(p, t)).collect(),
                    inner(t, t),
                )
            })
            .collect();
        let b = Mat::from_fn(m, kk, |i, k| columns[k].0[i]);
        let c: Vec<f64> = columns.iter().map(|col| col.1).collect();
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
        let [fit_sq, ls_sq] =
            self.stable_squared_errors([(&x, fit_sq), (&lstsq, ls_sq)], &b, &c, targets);
        let cdf = self.cdf_errors(&x, targets);
        (0..kk)
            .map(|k| {
                let xs = x.col(k);
                let mut weights = vec![0.0; n_total];
                for (w, &i) in xs.iter().zip(active) {
                    weights[i] = *w;
                }
                let fit_error = fit_sq[k].sqrt();
                let norm = norm2(xs).sqrt();
                TargetFit {
                    target: targets[k].clone(),
                    fit_error,
                    gain: xs.iter().map(|v| v.abs()).sum(),
                    norm,
                    noise_error: noise * norm,
                    cdf_error: cdf[k],
                    poor: is_poor(cdf[k], noise * norm),
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

    /// Mass-preserving least squares, `argmin x'Ax - 2b'x` subject to `sum x = 1`, for every
    /// column of `B`: `x = A^-1 (b + mu 1)` with `mu` chosen so the weights sum to 1. Solved on
    /// the Jacobi-scaled system by Cholesky, or with the pseudo-inverse (minimum-norm) when the
    /// system is singular.
    fn lstsq(&self, b: &Mat<f64>) -> Mat<f64> {
        let (m, kk) = (b.nrows(), b.ncols());
        // Column kk is the constraint's right-hand side, the vector of ones.
        let rhs = Mat::from_fn(m, kk + 1, |i, k| {
            self.scale[i] * if k < kk { b[(i, k)] } else { 1.0 }
        });
        let y = match (&self.llt, &self.scaled_eigen) {
            // One right-hand side at a time: faer's blocked multi-column triangular solves sum
            // in another order, which moves ill-conditioned solutions by ~1e-9 of their gain.
            (Some(llt), _) => {
                let mut y = Mat::zeros(m, kk + 1);
                for k in 0..=kk {
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
        let x = Mat::from_fn(m, kk + 1, |i, k| y[(i, k)] * self.scale[i]);
        let ones = x.col(kk);
        let ones_mass: f64 = ones.iter().sum();
        let mu: Vec<f64> = (0..kk)
            .map(|k| (1.0 - x.col(k).iter().sum::<f64>()) / ones_mass)
            .collect();
        Mat::from_fn(m, kk, |i, k| x[(i, k)] + mu[k] * ones[i])
    }

    /// For every target `k`: `argmin x'Ax - 2b_k'x + lambda_k ||x||^2` subject to `sum x = 1`,
    /// with `lambda_k = nn c_k`. `None` when `A + lambda_k I` is not positive definite.
    fn ridge(&mut self, b: &Mat<f64>, c: &[f64], nn: f64) -> Option<Mat<f64>> {
        // The unscaled matrix: the ridge penalty is isotropic only in these coordinates.
        let tri = self
            .tridiag
            .get_or_insert_with(|| Tridiagonal::new(&self.a));
        let (m, kk) = (b.nrows(), b.ncols());
        // Q' [b | 1], then per target both columns through (T + lambda_k I)^-1, then Q.
        let mut z = Mat::from_fn(m, kk + 1, |i, k| if k < kk { b[(i, k)] } else { 1.0 });
        tri.apply(&mut z, true);
        let mut y = Mat::zeros(m, 2 * kk);
        for (k, ck) in c.iter().enumerate() {
            for (col, from) in [(k, k), (kk + k, kk)] {
                let mut v: Vec<f64> = z.col(from).iter().copied().collect();
                tri.solve_shifted(nn * ck, &mut v)?;
                for (i, x) in v.into_iter().enumerate() {
                    y[(i, col)] = x;
                }
            }
        }
        tri.apply(&mut y, false);
        let mut out = Mat::from_fn(m, kk, |i, k| y[(i, k)]);
        for k in 0..kk {
            let m1 = y.col(kk + k);
            let mu = (1.0 - out.col(k).iter().sum::<f64>()) / m1.iter().sum::<f64>();
            for (o, y) in out.col_mut(k).iter_mut().zip(m1.iter()) {
                *o += mu * y;
            }
        }
        Some(out)
    }

    /// [`TargetFit::cdf_error`] of every column of `x` (targets all ending at one time or not):
    /// Gauss-Legendre on the pieces between snapshot and target times, where each cumulative
    /// distribution is smooth; the snapshots' distributions at every node are formed once, in
    /// blocks, and shared by all targets as one matrix product.
    fn cdf_errors(&self, x: &Mat<f64>, targets: &[Density]) -> Vec<f64> {
        let (nodes, gl_weights) = crate::math::profile::gauss_legendre_8();
        let mut knots: Vec<f64> = self.profiles.iter().map(Density::t).collect();
        knots.extend(targets.iter().map(Density::t));
        // Where a window starts or a step ends the distribution has a kink.
        knots.extend(targets.iter().flat_map(Density::breaks));
        knots.push(0.0);
        knots.sort_by(f64::total_cmp);
        knots.dedup();
        let mut points = Vec::with_capacity(knots.len() * CDF_PANELS * nodes.len());
        for w in knots.windows(2) {
            let h = (w[1] - w[0]) / CDF_PANELS as f64;
            for p in 0..CDF_PANELS {
                let c = w[0] + (p as f64 + 0.5) * h;
                for (z, g) in nodes.iter().zip(gl_weights) {
                    points.push((c + 0.5 * h * z, 0.5 * h * g));
                }
            }
        }
        let sums = self.weighted_misfits(&points, x, targets, Density::cdf_ln, f64::abs);
        targets
            .iter()
            .zip(sums)
            .map(|(t, s)| s / (t.sigma_rel() * t.t()))
            .collect()
    }

    /// [`GramSystem::squared_errors`] of two solutions (the chosen one and plain least squares),
    /// made right where they fall to the rounding of the Gram matrix: its entries carry relative
    /// errors of a few ulps, so `x'Ax - 2x'b + c` is off by about
    /// `eps (|x|'|A||x| + 2|x|'|b| + c)`, which grows with the square of the gain (a fit with
    /// gain 4000 reads 0 or 6e-5 whatever it is). Those columns are integrated instead, in one
    /// pass: the residual `sum x_i p_i - p_r` evaluated pointwise errs by `eps * gain` only.
    fn stable_squared_errors(
        &self,
        solutions: [(&Mat<f64>, Vec<f64>); 2],
        b: &Mat<f64>,
        c: &[f64],
        targets: &[Density],
    ) -> [Vec<f64>; 2] {
        let m = b.nrows();
        let abs_a = Mat::from_fn(m, m, |i, j| self.a[(i, j)].abs());
        // (solution, target) pairs to integrate, all in one quadrature pass.
        let mut redo: Vec<(usize, usize)> = Vec::new();
        for (s, (x, sq)) in solutions.iter().enumerate() {
            let abs_x = Mat::from_fn(m, x.ncols(), |i, k| x[(i, k)].abs());
            let ax = &abs_a * &abs_x;
            for (k, &sq_k) in sq.iter().enumerate() {
                let xax: f64 = abs_x
                    .col(k)
                    .iter()
                    .zip(ax.col(k).iter())
                    .map(|(x, y)| x * y)
                    .sum();
                let xb: f64 = abs_x
                    .col(k)
                    .iter()
                    .zip(b.col(k).iter())
                    .map(|(x, b)| x * b.abs())
                    .sum();
                let floor = GRAM_ROUNDING * (xax + 2.0 * xb + c[k]) / c[k];
                // Within 100 floors the formula's fit error could be off by more than 0.5 %.
                if sq_k < 100.0 * floor {
                    redo.push((s, k));
                }
            }
        }
        let [(x, mut fit_sq), (lstsq, mut ls_sq)] = solutions;
        if !redo.is_empty() {
            let cols = Mat::from_fn(m, redo.len(), |i, j| {
                let (s, k) = redo[j];
                if s == 0 {
                    x[(i, k)]
                } else {
                    lstsq[(i, k)]
                }
            });
            let picked: Vec<Density> = redo.iter().map(|&(_, k)| targets[k].clone()).collect();
            for (&(s, k), r2) in redo.iter().zip(self.residual_norms(&cols, &picked)) {
                let sq = if s == 0 { &mut fit_sq } else { &mut ls_sq };
                sq[k] = r2 / c[k];
            }
        }
        [fit_sq, ls_sq]
    }

    /// `||sum x_i p_i - p_r||^2` of every column of `x` by quadrature: Gauss-Legendre (20
    /// points, 8 on pieces of at most half an e-fold) on the pieces between every density's end
    /// and breaks, in panels over which no density varies by more than [`RESIDUAL_EFOLDS`] (one
    /// point where all are constant), and
    /// halving toward 0 over the first piece, down to `2^-RESIDUAL_LEVELS` of it. Each term's
    /// quadrature error is then far below rounding, so only the pointwise evaluation's
    /// `eps * gain` remains.
    fn residual_norms(&self, x: &Mat<f64>, targets: &[Density]) -> Vec<f64> {
        let (nodes, gl_weights) = crate::math::profile::gauss_legendre_20();
        let (short_nodes, short_weights) = crate::math::profile::gauss_legendre_8();
        let all = || self.profiles.iter().chain(targets);
        let mut knots: Vec<f64> = all().map(Density::t).collect();
        knots.extend(all().flat_map(Density::breaks));
        knots.retain(|&k| k > 0.0);
        knots.sort_by(f64::total_cmp);
        knots.dedup();
        let mut points: Vec<(f64, f64)> = Vec::new();
        let mut panel = |a: f64, b: f64| {
            let e = all().map(|d| d.efolds(a, b)).fold(0.0, f64::max);
            if e == 0.0 {
                points.push((0.5 * (a + b), b - a));
                return;
            }
            // 8 points integrate a piece of at most half an e-fold to 1e-20 of its terms.
            let (nodes, gl_weights): (&[f64], &[f64]) = if e <= 0.5 {
                (short_nodes, short_weights)
            } else {
                (nodes, gl_weights)
            };
            let n = (e / RESIDUAL_EFOLDS).ceil() as usize;
            let h = (b - a) / n as f64;
            for p in 0..n {
                let c = a + (p as f64 + 0.5) * h;
                for (z, g) in nodes.iter().zip(gl_weights) {
                    points.push((c + 0.5 * h * z, 0.5 * h * g));
                }
            }
        };
        if let Some(&first) = knots.first() {
            for j in 0..RESIDUAL_LEVELS {
                let hi = first * 0.5f64.powi(j);
                panel(0.5 * hi, hi);
            }
        }
        for w in knots.windows(2) {
            panel(w[0], w[1]);
        }
        self.weighted_misfits(&points, x, targets, Density::density_ln, |r| r * r)
    }

    /// `sum_j w_j loss(sum_i x_ik q_i(tau_j) - q_k(tau_j))` for every column `k` of `x` over the
    /// quadrature `points` `(tau_j, w_j)`, where `q` is `value` of a snapshot's or target's
    /// density (its distribution, or the density itself). The snapshots' values at the nodes
    /// are formed once, in blocks, and shared by all targets as one matrix product.
    fn weighted_misfits(
        &self,
        points: &[(f64, f64)],
        x: &Mat<f64>,
        targets: &[Density],
        value: fn(&Density, f64, f64, f64) -> f64,
        loss: fn(f64) -> f64,
    ) -> Vec<f64> {
        let (m, kk) = (self.profiles.len(), targets.len());
        let ln_t: Vec<f64> = self.profiles.iter().map(|p| p.t().ln()).collect();
        let ln_tr: Vec<f64> = targets.iter().map(|p| p.t().ln()).collect();
        points
            .par_chunks(CDF_BLOCK)
            .map(|block| {
                let ln: Vec<f64> = block.iter().map(|&(tau, _)| tau.ln()).collect();
                let q = Mat::from_fn(block.len(), m, |j, i| {
                    value(&self.profiles[i], block[j].0, ln[j], ln_t[i])
                });
                let synth = &q * x;
                (0..kk)
                    .map(|k| {
                        block
                            .iter()
                            .zip(&ln)
                            .enumerate()
                            .map(|(j, (&(tau, w), &l))| {
                                w * loss(synth[(j, k)] - value(&targets[k], tau, l, ln_tr[k]))
                            })
                            .sum::<f64>()
                    })
                    .collect::<Vec<f64>>()
            })
            .reduce(
                || vec![0.0; kk],
                |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
            )
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

/// Address space the matrix products reserve per thread on first use (the gemm workspace of
/// faer's x86 kernels), an allocation that aborts the process when it fails.
const GEMM_WORKSPACE: usize = 64 << 20;

/// Refuses a solve, naming the limit, when the address space left (`ulimit -v`) cannot hold
/// the matrix products' per-thread workspace, instead of aborting in the middle of it. The
/// probe reserves without touching a page, so it costs a map and an unmap.
fn check_headroom() -> Result<()> {
    crate::threads::ensure_pool()?;
    let threads = rayon::current_num_threads().saturating_add(1);
    let bytes = GEMM_WORKSPACE.saturating_mul(threads);
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(bytes).map_err(|_| {
        PhemaError::Unsolvable(format!(
            "not enough address space left for the solver's matrix products ({} MiB for \
             {threads} threads): raise the address-space limit (ulimit -v)",
            bytes >> 20
        ))
    })
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
    pub target: Density,
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
    /// Fewer than [`RAW_MIN_RESOLUTION`] checkpoints per target width: a fit phema does not
    /// stand behind (docs/accuracy.md).
    pub poor: bool,
}

/// Panels per interval between checkpoints: enough for 20-point Gauss-Legendre to be exact to
/// rounding for profiles that vary by many e-folds across one interval.
const RAW_PANELS: usize = 16;

/// Weights on checkpoints at `times` (ascending, distinct) for `target`.
///
/// The trajectory is interpolated linearly between checkpoints and held constant before the
/// first and after the last; the weights are the integrals of the target profile against the
/// resulting hat functions, so an exactly linear trajectory is averaged exactly. A checkpoint
/// after the target time takes part as the end of the interval the target time falls in,
/// unless `causal`: then only checkpoints at or before it are used, the last one held.
pub fn solve_raw(times: &[f64], target: &Profile, causal: bool) -> Result<RawFit> {
    raw_fit(times, &Density::Profile(*target), causal)
}

/// [`solve_raw`] for every target, in order (in parallel: each target integrates alone).
pub fn solve_raw_targets(times: &[f64], targets: &[Profile], causal: bool) -> Result<Vec<RawFit>> {
    crate::threads::ensure_pool()?;
    targets
        .par_iter()
        .map(|t| solve_raw(times, t, causal))
        .collect()
}

/// [`solve_raw`] for a target of any density. A checkpoint may be at `t = 0` (the initial
/// weights).
pub fn raw_fit(times: &[f64], target: &Density, causal: bool) -> Result<RawFit> {
    let increasing = times
        .windows(2)
        .all(|w| w[0].partial_cmp(&w[1]) == Some(std::cmp::Ordering::Less));
    if !increasing || times.iter().any(|t| !t.is_finite() || *t < 0.0) {
        return Err(PhemaError::Invalid(
            "checkpoint times must be finite, >= 0 and strictly increasing".into(),
        ));
    }
    let t_r = target.t();
    let before = times.iter().filter(|&&t| t <= t_r * (1.0 + 1e-12)).count();
    // Knots of the interpolation: every checkpoint up to the target time, and the next one.
    let m = if causal {
        before
    } else {
        (before + 1).min(times.len())
    };
    if m == 0 {
        return Err(PhemaError::Unsolvable(format!(
            "no checkpoint at or before t={t_r} (the first is at t={})",
            times.first().copied().unwrap_or(f64::NAN)
        )));
    }
    let ts = &times[..m];
    let p = |tau: f64| target.density(tau);
    // Pieces of (0, t_r] between knots: on each, the trajectory is constant (outside the knots)
    // or linear between two knots.
    let mut edges = vec![0.0];
    edges.extend(ts.iter().copied().filter(|&t| t < t_r));
    // Where the target jumps (a window's start), so that every piece is smooth.
    edges.extend(target.breaks().into_iter().filter(|&b| b > 0.0 && b < t_r));
    edges.push(t_r);
    edges.sort_by(f64::total_cmp);
    let mut weights = vec![0.0; times.len()];
    let (mut spacing, mut extrapolated) = (0.0, 0.0);
    let (mut num, mut den) = (0.0, 0.0);
    for w in edges.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b <= a {
            continue;
        }
        let mass = integrate(p, a, b, RAW_PANELS);
        den += integrate(|x| p(x).powi(2), a, b, RAW_PANELS);
        let j = ts.partition_point(|&t| t < b); // first knot at or after b
        if j == 0 || j == m {
            // Before the first knot or after the last: held at that knot.
            weights[if j == 0 { 0 } else { m - 1 }] += mass;
            extrapolated += mass;
            spacing += mass * (b - a);
            let held = p(if j == 0 { ts[0] } else { ts[m - 1] });
            num += integrate(|x| (p(x) - held).powi(2), a, b, RAW_PANELS);
            continue;
        }
        let (k0, k1) = (ts[j - 1], ts[j]);
        let h = k1 - k0;
        weights[j - 1] += integrate(|x| p(x) * (k1 - x) / h, a, b, RAW_PANELS);
        weights[j] += integrate(|x| p(x) * (x - k0) / h, a, b, RAW_PANELS);
        spacing += mass * h;
        // Interpolation error of the profile itself on the same grid.
        let (p0, p1) = (p(k0), if k1 <= t_r { p(k1) } else { p(t_r) });
        let k1c = k1.min(t_r);
        let lin = |x: f64| {
            if k1c > k0 {
                (p0 * (k1c - x) + p1 * (x - k0)) / (k1c - k0)
            } else {
                p0
            }
        };
        num += integrate(|x| (p(x) - lin(x)).powi(2), a, b, RAW_PANELS);
    }
    let resolution = target.sigma_rel() * t_r / spacing.max(f64::MIN_POSITIVE);
    Ok(RawFit {
        target: target.clone(),
        weights,
        fit_error: (num / den).sqrt(),
        resolution,
        extrapolated_mass: extrapolated,
        initial_mass: target.initial_mass(),
        poor: resolution.is_nan() || resolution < RAW_MIN_RESOLUTION,
    })
}

/// Fewest checkpoints per target width an average of plain checkpoints needs: below it the
/// target is narrower than the checkpoint spacing and is mostly interpolation.
pub const RAW_MIN_RESOLUTION: f64 = 1.0;

/// What one snapshot holds, for [`solve_kernels`].
#[derive(Clone, Debug)]
pub enum Snapshot {
    /// An average of the run with this density over time.
    Average(Density),
    /// The weights at this time (`>= 0`).
    Raw(f64),
}

impl Snapshot {
    /// The raw weights at `t`, a finite time `>= 0` (0: the initial weights).
    pub fn raw(t: f64) -> Result<Self> {
        if t >= 0.0 && t.is_finite() {
            Ok(Snapshot::Raw(t))
        } else {
            Err(PhemaError::OutOfRange {
                name: "t",
                value: t,
                expected: "raw weights need a finite time >= 0".into(),
            })
        }
    }
}

/// The solution for one [`Kernel`].
#[derive(Clone, Debug)]
pub struct KernelFit {
    /// Weight of every snapshot.
    pub weights: Vec<f64>,
    /// Relative L2 misfit of the density part ([`TargetFit::fit_error`] from averages, the
    /// interpolation error [`RawFit::fit_error`] from checkpoints; 0 without a density part).
    pub fit_error: f64,
    /// [`TargetFit::cdf_error`] of the density part fitted from averages (NaN otherwise).
    pub cdf_error: f64,
    /// Expected relative rounding noise of the output, `noise * ||x||_2`.
    pub noise_error: f64,
    /// `sum |x_i|`.
    pub gain: f64,
    /// `||x||_2`.
    pub norm: f64,
    /// `sum x_i`.
    pub mass: f64,
    /// Mass a classic EMA leaves on the initial weights.
    pub initial_mass: f64,
    /// Width of the kernel over its time, in `sigma_rel` units.
    pub sigma_rel: f64,
    /// The noise-aware solution was chosen (averages only).
    pub regularized: bool,
    /// The Gram system was singular.
    pub rank_deficient: bool,
    /// Fit error of plain least squares (averages only; the fit error otherwise).
    pub lstsq_fit_error: f64,
    /// Gain of plain least squares.
    pub lstsq_gain: f64,
    /// Checkpoints per target width of a density integrated against plain checkpoints (NaN
    /// otherwise).
    pub resolution: f64,
    /// Density mass outside the checkpoints' span, held at the nearest one.
    pub extrapolated_mass: f64,
    /// `sum |w|` of the point masses at times between raw checkpoints, taken from the
    /// interpolated trajectory.
    pub interpolated_mass: f64,
    /// `sum |w|` of all point masses.
    pub point_mass: f64,
    /// The fit cannot be trusted ([`is_poor`] from averages, fewer than
    /// [`RAW_MIN_RESOLUTION`] checkpoints per width from checkpoints, or amplified noise).
    pub poor: bool,
}

/// Weights on every snapshot for every kernel (docs/kernels.md). Point masses go to the raw
/// weights (exact at their times, linear between them); the density part is fitted by least
/// squares from the averaged snapshots when the store has any, and integrated against the
/// checkpoints' hat functions otherwise.
pub fn solve_kernels(
    snapshots: &[Snapshot],
    kernels: &[Kernel],
    options: &SolveOptions,
) -> Result<Vec<KernelFit>> {
    let n = snapshots.len();
    if n == 0 {
        return Err(PhemaError::Unsolvable("no snapshots to solve with".into()));
    }
    let mut raw: Vec<(f64, usize)> = Vec::new();
    let mut averages: Vec<(Density, usize)> = Vec::new();
    for (i, s) in snapshots.iter().enumerate() {
        match s {
            Snapshot::Raw(t) => raw.push((*t, i)),
            Snapshot::Average(d) => averages.push((d.clone(), i)),
        }
    }
    raw.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(w) = raw.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(PhemaError::Store(format!(
            "two raw snapshots at t={}: which one the run had is unknown",
            w[0].0
        )));
    }
    let raw_t: Vec<f64> = raw.iter().map(|r| r.0).collect();
    let plans = kernels
        .iter()
        .map(|k| k.resolve(&raw_t))
        .collect::<Result<Vec<_>>>()?;
    let fitted: Vec<(usize, Density)> = plans
        .iter()
        .enumerate()
        .filter_map(|(k, (d, _))| d.clone().map(|d| (k, d)))
        .filter(|_| !averages.is_empty())
        .collect();
    let mut ls: Vec<Option<TargetFit>> = vec![None; kernels.len()];
    if !fitted.is_empty() {
        let snaps: Vec<Density> = averages.iter().map(|a| a.0.clone()).collect();
        let targets: Vec<Density> = fitted.iter().map(|f| f.1.clone()).collect();
        for ((k, _), fit) in fitted
            .iter()
            .zip(solve_densities(&snaps, &targets, options)?)
        {
            ls[*k] = Some(fit);
        }
    }
    let mut out = Vec::with_capacity(kernels.len());
    for (k, (density, masses)) in plans.iter().enumerate() {
        let t = kernels[k].t();
        let mut raw_w = vec![0.0; raw.len()];
        let (mut interpolated, mut point) = (0.0, 0.0);
        for &(time, m) in masses {
            if !kernel::point_mass(&raw_t, time, m, &mut raw_w)? {
                interpolated += m.abs();
            }
            point += m.abs();
        }
        let d_mass = 1.0 - masses.iter().map(|m| m.1).sum::<f64>();
        let mut weights = vec![0.0; n];
        let mut fit = KernelFit {
            weights: Vec::new(),
            fit_error: 0.0,
            cdf_error: f64::NAN,
            noise_error: 0.0,
            gain: 0.0,
            norm: 0.0,
            mass: 0.0,
            initial_mass: 0.0,
            sigma_rel: point_sigma_rel(masses, t),
            regularized: false,
            rank_deficient: false,
            lstsq_fit_error: 0.0,
            lstsq_gain: 0.0,
            resolution: f64::NAN,
            extrapolated_mass: 0.0,
            interpolated_mass: interpolated,
            point_mass: point,
            poor: false,
        };
        if let Some(d) = density {
            fit.sigma_rel = d.sigma_rel();
            fit.initial_mass = d.initial_mass() * d_mass;
            if let Some(f) = ls[k].take() {
                for ((_, i), w) in averages.iter().zip(&f.weights) {
                    weights[*i] += w * d_mass;
                }
                fit.fit_error = f.fit_error;
                fit.cdf_error = f.cdf_error;
                fit.regularized = f.regularized;
                fit.rank_deficient = f.rank_deficient;
                fit.lstsq_fit_error = f.lstsq_fit_error;
                fit.lstsq_gain = f.lstsq_gain * d_mass.abs();
                fit.poor = f.poor;
            } else {
                let f = raw_fit(&raw_t, d, options.causal)?;
                for (r, w) in raw_w.iter_mut().zip(&f.weights) {
                    *r += w * d_mass;
                }
                fit.fit_error = f.fit_error;
                fit.lstsq_fit_error = f.fit_error;
                fit.resolution = f.resolution;
                fit.extrapolated_mass = f.extrapolated_mass;
                fit.poor = f.poor;
            }
        }
        for ((_, i), w) in raw.iter().zip(&raw_w) {
            weights[*i] += w;
        }
        fit.gain = weights.iter().map(|w| w.abs()).sum();
        fit.norm = weights.iter().map(|w| w * w).sum::<f64>().sqrt();
        fit.mass = weights.iter().sum();
        fit.noise_error = options.noise * fit.norm;
        if fit.lstsq_gain == 0.0 {
            fit.lstsq_gain = fit.gain;
        }
        fit.poor |= fit.noise_error.is_nan() || fit.noise_error > POOR_NOISE;
        fit.weights = weights;
        out.push(fit);
    }
    Ok(out)
}

/// Standard deviation of point masses over `t` (their signed weights may cancel: then 0).
fn point_sigma_rel(masses: &[(f64, f64)], t: f64) -> f64 {
    let total: f64 = masses.iter().map(|m| m.1).sum();
    if masses.is_empty() || total == 0.0 {
        return 0.0;
    }
    let m1: f64 = masses.iter().map(|(s, w)| s * w).sum::<f64>() / total;
    let m2: f64 = masses.iter().map(|(s, w)| s * s * w).sum::<f64>() / total;
    (m2 - m1 * m1).max(0.0).sqrt() / t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::inner as inner_d;
    use crate::math::kernel::Shape;
    use crate::math::profile::{inner, sigma_rel_to_gamma};

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

    const EXACT: SolveOptions = SolveOptions {
        noise: 0.0,
        causal: false,
    };
    const CAUSAL: SolveOptions = SolveOptions {
        noise: 0.0,
        causal: true,
    };

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
            // The misplaced mass: the cumulative distributions' L1 distance over target widths.
            let mut l1 = 0.0;
            for i in 0..n {
                let tau = (i as f64 + 0.5) * h;
                let f: f64 = snaps
                    .iter()
                    .zip(&fit.weights)
                    .map(|(p, w)| w * p.cdf(tau))
                    .sum();
                l1 += (f - fit.target.cdf(tau)).abs() * h;
            }
            let want = l1 / (fit.target.sigma_rel() * fit.target.t());
            assert!(
                (fit.cdf_error - want).abs() < 1e-2 * want.max(1e-3),
                "{} vs {want}",
                fit.cdf_error
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
    fn causal_solve_gives_snapshots_after_the_target_time_zero_weight() {
        let snaps = edm2_snapshots(10, 10_000.0);
        let target = Profile::power(6_500.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap();
        let fit = &solve(&snaps, &[target], &CAUSAL).unwrap()[0];
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
        let fit = &solve(&snaps, &[at_snapshot], &CAUSAL).unwrap()[0];
        assert!(fit.fit_error < 1e-6, "{}", fit.fit_error);
        let early = Profile::power(10.0, 5.0).unwrap();
        assert!(solve(&snaps, &[early], &CAUSAL).is_err());
    }

    #[test]
    fn later_snapshots_make_targets_between_snapshot_times_accurate() {
        // A smooth trajectory theta(tau): the exact average over a target profile against the
        // same combination of the snapshots' exact averages, every integral by quadrature.
        let theta = |tau: f64| 1.0 + 0.3 * (tau / 2_500.0).sin() + tau / 20_000.0;
        let average = |p: &Density| integrate(|x| p.density(x) * theta(x), 0.0, p.t(), 2000);
        let snaps = edm2_snapshots(10, 10_000.0);
        let stored: Vec<f64> = snaps.iter().map(|&p| average(&p.into())).collect();
        let error = |fit: &TargetFit| {
            let got: f64 = stored.iter().zip(&fit.weights).map(|(a, w)| a * w).sum();
            (got - average(&fit.target)).abs() / average(&fit.target)
        };
        for s in [0.05, 0.1, 0.2] {
            let target = Profile::power(6_500.0, sigma_rel_to_gamma(s).unwrap()).unwrap();
            let causal = &solve(&snaps, &[target], &CAUSAL).unwrap()[0];
            let all = &solve(&snaps, &[target], &EXACT).unwrap()[0];
            assert!(all
                .weights
                .iter()
                .zip(&snaps)
                .any(|(w, p)| p.t() > 6_500.0 && *w != 0.0));
            assert!(all.fit_error < causal.fit_error);
            assert!(
                error(all) < 0.1 * error(causal) && error(all) < 2e-3,
                "sigma_rel {s}: {} vs causal {}",
                error(all),
                error(causal)
            );
            assert!((all.mass - 1.0).abs() < 1e-9 && (causal.mass - 1.0).abs() < 1e-9);
        }
        // Before the first snapshot only later snapshots can serve.
        let early = Profile::power(500.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap();
        let fit = &solve(&snaps, &[early], &EXACT).unwrap()[0];
        assert!((fit.mass - 1.0).abs() < 1e-9);
    }

    #[test]
    fn plain_solution_is_the_equality_constrained_least_squares_minimum() {
        // Independent check: the KKT system [[A, 1], [1', 0]] [x; mu] = [b; 1] solved densely.
        let snaps = edm2_snapshots(6, 6_000.0);
        let targets: Vec<Profile> = [0.03, 0.08, 0.15, 0.25]
            .iter()
            .map(|&s| Profile::power(4_500.0, sigma_rel_to_gamma(s).unwrap()).unwrap())
            .chain([Profile::from_beta(6_000.0, 0.999, 1.0).unwrap()])
            .collect();
        let fits = solve(&snaps, &targets, &EXACT).unwrap();
        let m = snaps.len();
        for (fit, target) in fits.iter().zip(&targets) {
            let kkt = Mat::from_fn(m + 1, m + 1, |i, j| match (i < m, j < m) {
                (true, true) => inner(&snaps[i], &snaps[j]),
                (false, false) => 0.0,
                _ => 1.0,
            });
            let rhs = Mat::from_fn(
                m + 1,
                1,
                |i, _| {
                    if i < m {
                        inner(&snaps[i], target)
                    } else {
                        1.0
                    }
                },
            );
            let want = kkt.full_piv_lu().solve(&rhs);
            let sum: f64 = fit.weights.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{sum}");
            assert!((fit.mass - sum).abs() < 1e-12);
            for (i, w) in fit.weights.iter().enumerate() {
                assert!(
                    (w - want[(i, 0)]).abs() < 1e-6 * fit.gain,
                    "{i}: {w} vs {}",
                    want[(i, 0)]
                );
            }
        }
    }

    #[test]
    fn poor_fits_are_marked_by_fit_error_or_amplified_noise() {
        let snaps = edm2_snapshots(8, 8_000.0);
        let good = Profile::power(8_000.0, sigma_rel_to_gamma(0.08).unwrap()).unwrap();
        // Far narrower than anything stored: no combination of eight snapshots makes it.
        let narrow = Profile::power(8_000.0, sigma_rel_to_gamma(0.003).unwrap()).unwrap();
        let fits = solve(&snaps, &[good, narrow], &SolveOptions::default()).unwrap();
        assert!(!fits[0].poor, "{:?}", fits[0]);
        assert!(
            fits[1].poor && fits[1].cdf_error > POOR_CDF_ERROR,
            "{:?}",
            fits[1]
        );
        assert!(is_poor(0.0, 2.0 * POOR_NOISE) && is_poor(f64::NAN, 0.0));
        assert!(!is_poor(POOR_CDF_ERROR, POOR_NOISE));
        for f in &fits {
            assert!((f.noise_error - NOISE_FLOAT16 * f.norm).abs() < 1e-15);
        }
    }

    #[test]
    fn raw_target_between_checkpoints_interpolates_toward_the_next_one() {
        // theta(tau) = tau: the average over (0, t_r] is E[tau]; holding the last checkpoint
        // before t_r biases it low, interpolating to the next one does not.
        let times: Vec<f64> = (1..=10).map(|i| 1000.0 * i as f64).collect();
        let target = Profile::power(6_500.0, sigma_rel_to_gamma(0.2).unwrap()).unwrap();
        let mean = integrate(|x| x * target.density(x), 0.0, 6_500.0, 4000);
        let avg = |f: &RawFit| -> f64 { times.iter().zip(&f.weights).map(|(t, w)| t * w).sum() };
        let all = solve_raw(&times, &target, false).unwrap();
        let causal = solve_raw(&times, &target, true).unwrap();
        let head = integrate(|x| target.density(x) * (1000.0 - x), 0.0, 1000.0, 400);
        assert!(
            (avg(&all) - head - mean).abs() < 1e-8 * mean,
            "{} {mean}",
            avg(&all)
        );
        assert!(avg(&causal) < mean - 10.0, "{} {mean}", avg(&causal));
        assert!(all.weights[6] > 0.0 && causal.weights[6] == 0.0);
        for f in [&all, &causal] {
            assert!((f.weights.iter().sum::<f64>() - 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn noise_aware_solution_trades_negligible_fit_for_much_smaller_gain() {
        let snaps = edm2_snapshots(256, 64_000.0);
        let target = Profile::power(64_000.0, sigma_rel_to_gamma(0.01).unwrap()).unwrap();
        let exact = &solve(&snaps, &[target], &EXACT).unwrap()[0];
        let robust = &solve(&snaps, &[target], &SolveOptions::default()).unwrap()[0];
        let total = |f: &TargetFit| f.fit_error.powi(2) + (NOISE_FLOAT16 * f.norm).powi(2);
        // Plain least squares on 512 snapshots: ||x|| ~ 100 for sigma_rel 0.01 (docs/accuracy.md).
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
            let fit = solve_raw(&times, &target, true).unwrap();
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
        let d = solve_raw(&dense, &target, true).unwrap();
        let s = solve_raw(&sparse, &target, true).unwrap();
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
        assert!(solve_raw(&[5.0, 5.0], &target, false).is_err());
        // The poor-fit rule of plain checkpoints: fewer than RAW_MIN_RESOLUTION per width.
        assert!(!d.poor && s.poor);
        let wide = Profile::power(10_000.0, sigma_rel_to_gamma(0.25).unwrap()).unwrap();
        let both = solve_raw_targets(&sparse, &[target, wide], true).unwrap();
        for (fit, one) in both.iter().zip([&target, &wide]) {
            let alone = solve_raw(&sparse, one, true).unwrap();
            assert_eq!(fit.weights, alone.weights);
            assert_eq!(fit.poor, alone.resolution < RAW_MIN_RESOLUTION);
        }
        assert!(both[0].poor && !both[1].poor, "{}", both[1].resolution);
    }

    fn raw_store(times: &[f64]) -> Vec<Snapshot> {
        times.iter().map(|&t| Snapshot::raw(t).unwrap()).collect()
    }

    #[test]
    fn a_window_from_two_running_means_is_exact() {
        // (t_b C(t_b) - t_a C(t_a)) / (t_b - t_a) is the uniform average over (t_a, t_b].
        let mut snaps: Vec<Snapshot> = (1..=10)
            .map(|i| Snapshot::Average(Profile::power(1000.0 * i as f64, 0.0).unwrap().into()))
            .collect();
        snaps.extend(
            edm2_snapshots(10, 10_000.0)
                .into_iter()
                .map(|p| Snapshot::Average(p.into())),
        );
        let k = Kernel::window(10_000.0, 2_000.0).unwrap();
        let fit = &solve_kernels(&snaps, &[k], &CAUSAL).unwrap()[0];
        assert!(fit.fit_error < 1e-6, "{}", fit.fit_error);
        assert!(
            (fit.weights[9] - 5.0).abs() < 1e-6,
            "{:?}",
            &fit.weights[..10]
        );
        assert!((fit.weights[7] + 4.0).abs() < 1e-6);
        assert!(!fit.poor && (fit.mass - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_window_from_checkpoints_is_the_trapezoid_rule() {
        let times: Vec<f64> = (1..=10).map(|i| 100.0 * i as f64).collect();
        let k = Kernel::window(1000.0, 400.0).unwrap();
        let fit = &solve_kernels(&raw_store(&times), &[k], &EXACT).unwrap()[0];
        let want = [0.0, 0.0, 0.0, 0.0, 0.0, 0.125, 0.25, 0.25, 0.25, 0.125];
        for (w, v) in fit.weights.iter().zip(want) {
            assert!((w - v).abs() < 1e-12, "{:?}", fit.weights);
        }
        assert!(fit.resolution > 1.0 && !fit.poor);
    }

    #[test]
    fn point_masses_need_raw_weights_and_take_them_exactly() {
        let times: Vec<f64> = (0..=20).map(|i| 50.0 * i as f64).collect();
        let last = Kernel::last(1000.0, 4).unwrap();
        let fit =
            &solve_kernels(&raw_store(&times), std::slice::from_ref(&last), &EXACT).unwrap()[0];
        assert_eq!(&fit.weights[17..], &[0.25; 4]);
        assert_eq!(fit.interpolated_mass, 0.0);
        let power: Vec<Snapshot> = edm2_snapshots(4, 1000.0)
            .into_iter()
            .map(|p| Snapshot::Average(p.into()))
            .collect();
        let e = solve_kernels(&power, &[last], &EXACT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("last=4") && e.contains("0 raw"), "{e}");
        let bema = Kernel::bema(1000.0, kernel::Bema::default()).unwrap();
        let e = solve_kernels(&power, std::slice::from_ref(&bema), &EXACT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t=0") && e.contains("no raw weights"), "{e}");
        // A store with both: the EMA length from the averages, BEMA from the raw weights
        // (updates at 400 and 800 fall on checkpoints: exact).
        let mut both = power.clone();
        both.extend(raw_store(&times));
        let ema =
            Kernel::Profile(Profile::power(1000.0, sigma_rel_to_gamma(0.1).unwrap()).unwrap());
        let fits = solve_kernels(&both, &[ema, bema], &EXACT).unwrap();
        assert!(fits[0].weights[8..].iter().all(|&w| w == 0.0));
        assert!(fits[1].weights[..8].iter().all(|&w| w == 0.0));
        assert_eq!(fits[1].interpolated_mass, 0.0);
        let mut want = vec![0.0; times.len()];
        for (s, w) in kernel::Bema::default().masses(1000.0).unwrap() {
            want[(s / 50.0) as usize] += w;
        }
        for (a, b) in fits[1].weights[8..].iter().zip(&want) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn merges_from_equally_spaced_checkpoints_are_megatrons_coefficients() {
        let times: Vec<f64> = (1..=100).map(|i| 1000.0 * i as f64).collect();
        for shape in [Shape::Linear, Shape::Cosine, Shape::OneMinusSqrt] {
            let k = Kernel::merge(100_000.0, 20_000.0, shape.clone()).unwrap();
            let fit = &solve_kernels(&raw_store(&times), &[k], &EXACT).unwrap()[0];
            let c = kernel::merge_coefficients(&shape, 21);
            for (w, c) in fit.weights[79..].iter().zip(&c) {
                assert!((w - c).abs() < 1e-12, "{shape:?}");
            }
            assert!(fit.weights[..79].iter().all(|&w| w == 0.0));
        }
    }

    #[test]
    fn a_stepwise_snapshot_serves_itself_and_its_neighbours_by_its_own_profile() {
        // A discretized power profile as steps; targets: the same steps, and a window.
        let n = 200;
        let g = 2.5;
        let edges: Vec<f64> = (0..=n).map(|k| k as f64 * 10.0).collect();
        let mass: Vec<f64> = (0..n)
            .map(|k| {
                ((k + 1) as f64 / n as f64).powf(g + 1.0) - (k as f64 / n as f64).powf(g + 1.0)
            })
            .collect();
        let steps = Density::Steps(std::sync::Arc::new(
            kernel::Steps::new(edges, mass).unwrap(),
        ));
        let snaps = vec![
            Snapshot::Average(steps.clone()),
            Snapshot::Average(Profile::power(1000.0, 0.0).unwrap().into()),
            Snapshot::Average(Profile::power(2000.0, 0.0).unwrap().into()),
        ];
        let fits = solve_densities(
            &snaps
                .iter()
                .filter_map(|s| match s {
                    Snapshot::Average(d) => Some(d.clone()),
                    Snapshot::Raw(_) => None,
                })
                .collect::<Vec<_>>(),
            &[steps],
            &EXACT,
        )
        .unwrap();
        assert!(
            (fits[0].weights[0] - 1.0).abs() < 1e-9,
            "{:?}",
            fits[0].weights
        );
        let w = Kernel::window(2000.0, 1000.0).unwrap();
        let fit = &solve_kernels(&snaps, &[w], &EXACT).unwrap()[0];
        assert!(fit.fit_error < 1e-6 && (fit.weights[2] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn fit_errors_of_large_gains_are_the_residual_not_the_gram_matrix_rounding() {
        // ema-pytorch's averages (sigma_rel 0.05 and 0.28) updated every 100 steps, a snapshot
        // every 200 up to 2000: each call's weight `(1 - beta_j) prod_{i > j} beta_i`,
        // `beta_j = (1 - 1/(100 j + 2))^(gamma + 1)`, over the 100 steps up to the next call.
        // The twenty span every step function on that grid: a window starting on it is exact,
        // with weights of gain in the thousands, where x'Ax - 2x'b + c reads ~1e-5.
        let mut snaps = Vec::new();
        let mut steps = Vec::new();
        for end in (200..=2000).step_by(200) {
            for s in [0.05, 0.28] {
                let g = sigma_rel_to_gamma(s).unwrap();
                let n = end / 100;
                let edges: Vec<f64> = (0..=n).map(|k| 100.0 * k as f64).collect();
                let beta = |j: usize| (1.0 - 1.0 / (100.0 * j as f64 + 2.0)).powf(g + 1.0);
                let mass: Vec<f64> = (0..n)
                    .map(|j| {
                        let keep: f64 = (j + 1..n).map(beta).product();
                        if j == 0 {
                            keep
                        } else {
                            (1.0 - beta(j)) * keep
                        }
                    })
                    .collect();
                steps.push((edges.clone(), mass.clone()));
                snaps.push(Density::Steps(std::sync::Arc::new(
                    kernel::Steps::new(edges, mass).unwrap(),
                )));
            }
        }
        // The residual of weights x against the window (2000 - w, 2000], summed exactly over the
        // pieces between the grid and the window's start (everything is constant on each).
        let residual = |x: &[f64], w: f64| {
            let mut cuts: Vec<f64> = (0..=20).map(|k| 100.0 * k as f64).collect();
            cuts.push(2000.0 - w);
            cuts.sort_by(f64::total_cmp);
            let mut sum = 0.0;
            for c in cuts.windows(2).filter(|c| c[1] > c[0]) {
                let mid = 0.5 * (c[0] + c[1]);
                let k = (mid / 100.0) as usize;
                let synth: f64 = x
                    .iter()
                    .zip(&steps)
                    .filter(|(_, (e, _))| k + 1 < e.len())
                    .map(|(xi, (_, m))| xi * m[k] / 100.0)
                    .sum();
                let target = if mid > 2000.0 - w { 1.0 / w } else { 0.0 };
                sum += (synth - target).powi(2) * (c[1] - c[0]);
            }
            (sum * w).sqrt()
        };
        let widths = [200.0, 600.0, 200.0 + 1e-7, 200.0 + 1e-3, 250.0];
        let targets: Vec<Density> = widths
            .iter()
            .map(|&width| Density::Window { t: 2000.0, width })
            .collect();
        for opts in [EXACT, SolveOptions::default()] {
            let fits = solve_densities(&snaps, &targets, &opts).unwrap();
            assert!(opts.noise > 0.0 || fits.iter().any(|f| f.gain > 1000.0));
            for (f, &w) in fits.iter().zip(&widths) {
                let want = residual(&f.weights, w);
                assert!(
                    (f.fit_error - want).abs() <= 1e-3 * want + 1e-11,
                    "window {w}: fit_error {:e}, residual {want:e}, gain {}",
                    f.fit_error,
                    f.gain
                );
            }
        }
    }

    #[test]
    fn the_residual_quadrature_agrees_with_the_gram_formula_where_that_is_accurate() {
        // Well-conditioned fits (few snapshots, gains near 1) of every density kind against
        // power snapshots from the running mean to very narrow ones: the Gram formula is right to
        // ~1e-12 there, so the quadrature must give the same squared error.
        let mut snaps: Vec<Density> = Vec::new();
        for (t, g) in [
            (500.0, 0.0),
            (1000.0, 0.0),
            (800.0, 7.0),
            (1000.0, 17.0),
            (1000.0, 900.0),
        ] {
            snaps.push(Profile::power(t, g).unwrap().into());
        }
        snaps.push(Profile::from_beta(1000.0, 0.99, 1.0).unwrap().into());
        let targets: Vec<Density> = vec![
            Profile::power(1000.0, 3.0).unwrap().into(),
            Profile::power(950.0, 40.0).unwrap().into(),
            Profile::from_beta(990.0, 0.995, 1.0).unwrap().into(),
            Density::Window {
                t: 1000.0,
                width: 230.0,
            },
            Density::Merge {
                t: 1000.0,
                width: 300.0,
                shape: Shape::Cosine,
            },
        ];
        let mut system = GramSystem::new(&snaps).unwrap();
        let fits = system.fit_all(
            &targets,
            0.0,
            &(0..snaps.len()).collect::<Vec<_>>(),
            snaps.len(),
        );
        let x = Mat::from_fn(snaps.len(), targets.len(), |i, k| fits[k].weights[i]);
        let b = Mat::from_fn(snaps.len(), targets.len(), |i, k| {
            inner_d(&snaps[i], &targets[k])
        });
        let c: Vec<f64> = targets.iter().map(|t| inner_d(t, t)).collect();
        let formula = system.squared_errors(&x, &b, &c);
        let quadrature = system.residual_norms(&x, &targets);
        for k in 0..targets.len() {
            let q = quadrature[k] / c[k];
            assert!(
                fits[k].gain < 50.0 && formula[k] > 1e-8,
                "{k}: {} {}",
                fits[k].gain,
                formula[k]
            );
            assert!(
                (q - formula[k]).abs() < 1e-8 * formula[k],
                "{k}: {q:e} {:e}",
                formula[k]
            );
        }
    }

    #[test]
    fn fifty_kernel_targets_over_a_thousand_snapshots_solve_in_well_under_a_second() {
        let snaps: Vec<Snapshot> = edm2_snapshots(500, 1e6)
            .into_iter()
            .map(|p| Snapshot::Average(p.into()))
            .collect();
        let kernels: Vec<Kernel> = (0..50)
            .map(|i| {
                let t = 1e6 * (0.5 + 0.01 * i as f64);
                if i % 2 == 0 {
                    Kernel::window(t, 0.1 * t).unwrap()
                } else {
                    Kernel::merge(t, 0.2 * t, Shape::Cosine).unwrap()
                }
            })
            .collect();
        let start = std::time::Instant::now();
        let fits = solve_kernels(&snaps, &kernels, &SolveOptions::default()).unwrap();
        let took = start.elapsed().as_secs_f64();
        assert_eq!(fits.len(), 50);
        for f in &fits {
            assert!(
                (f.mass - 1.0).abs() < 1e-6,
                "{} {} {}",
                f.mass,
                f.fit_error,
                f.gain
            );
        }
        // Generous for shared CI machines; benches/README.md records the measured time.
        eprintln!("50 kernels x 1000 snapshots: {took:.3} s");
        assert!(took < 5.0, "{took} s");
    }
}
