//! Profiles, kernels and the solver: targets in, weights and fit reports out.

use super::*;

/// `gamma` of the power profile with relative width `sigma_rel`.
#[pyfunction]
fn sigma_rel_to_gamma(sigma_rel: f64) -> PyResult<f64> {
    profile::sigma_rel_to_gamma(sigma_rel).map_err(err)
}

/// Relative width `sigma_rel` of the power profile with exponent `gamma`.
#[pyfunction]
fn gamma_to_sigma_rel(gamma: f64) -> PyResult<f64> {
    profile::gamma_to_sigma_rel(gamma).map_err(err)
}

/// The profile a spec names (`Profile::from_spec`).
fn make_profile(spec: &ProfileSpec) -> PyResult<Profile> {
    Profile::from_spec(&spec.0, spec.1, spec.2, spec.3).map_err(err)
}

type ProfileSpec = (String, f64, f64, f64);

/// Density of a profile at the times `tau` (for plots).
#[pyfunction]
fn profile_density<'py>(
    py: Python<'py>,
    spec: ProfileSpec,
    tau: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let p = make_profile(&spec)?;
    let v: Vec<f64> = tau.as_slice()?.iter().map(|&x| p.density(x)).collect();
    Ok(v.into_pyarray(py))
}

/// The `[n_snapshots, n_targets]` numpy matrix of per-target weight columns.
fn weight_matrix<'py>(
    py: Python<'py>,
    n: usize,
    columns: &[&[f64]],
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    let k = columns.len();
    let mut w = vec![0.0; n * k];
    for (j, col) in columns.iter().enumerate() {
        // At most `n` rows: every index is below `n * k`.
        for (i, x) in col.iter().take(n).enumerate() {
            w[i * k + j] = *x;
        }
    }
    w.into_pyarray(py).reshape([n, k])
}

/// Equivalent `sigma_rel` and initial-weight mass of a profile.
#[pyfunction]
fn profile_info(spec: ProfileSpec) -> PyResult<(f64, f64)> {
    let p = make_profile(&spec)?;
    Ok((p.sigma_rel(), p.initial_mass()))
}

/// `<p, q>`: the integral of the product of two profiles.
#[pyfunction]
fn inner(p: ProfileSpec, q: ProfileSpec) -> PyResult<f64> {
    let p = make_profile(&p)?;
    let q = make_profile(&q)?;
    Ok(profile::inner(&p, &q))
}

/// A snapshot for `solve_kernels`: `(kind, t, gamma, steps)` with kind `power` (gamma), `raw`,
/// or `steps` (`steps` = (edges, weights)).
type SnapshotSpec = (String, f64, f64, Option<(Vec<f64>, Vec<f64>)>);
/// A target for `solve_kernels`: `(kind, t, params, shape)`, kinds and params as in
/// `phema/_core.pyi`.
type KernelSpec = (String, f64, Vec<f64>, String);

fn make_snapshot(spec: SnapshotSpec) -> PyResult<solver::Snapshot> {
    let (kind, t, gamma, steps) = spec;
    match (kind.as_str(), steps) {
        ("power", _) => Ok(solver::Snapshot::Average(
            Profile::power(t, gamma).map_err(err)?.into(),
        )),
        ("raw", _) => solver::Snapshot::raw(t).map_err(err),
        ("steps", Some((edges, weights))) => Ok(solver::Snapshot::Average(kernel::Density::Steps(
            Arc::new(kernel::Steps::new(edges, weights).map_err(err)?),
        ))),
        (other, _) => Err(invalid(format!(
            "snapshot kind {other:?} unknown or without its steps (power, raw, steps)"
        ))),
    }
}

fn make_kernel(spec: KernelSpec) -> PyResult<Kernel> {
    let (kind, t, p, shape) = spec;
    let want = |n: usize| -> PyResult<()> {
        if p.len() == n {
            Ok(())
        } else {
            Err(invalid(format!(
                "{kind} takes {n} parameter(s), not {}",
                p.len()
            )))
        }
    };
    match kind.as_str() {
        "power" | "halflife" => {
            want(1)?;
            Profile::from_spec(&kind, t, p[0], 1.0)
                .map(Kernel::Profile)
                .map_err(err)
        }
        "beta" => {
            want(2)?;
            Profile::from_spec(&kind, t, p[0], p[1])
                .map(Kernel::Profile)
                .map_err(err)
        }
        "window" => {
            want(1)?;
            Kernel::window(t, p[0]).map_err(err)
        }
        "last" => {
            want(1)?;
            if !(p[0] >= 1.0 && p[0] <= 1e9 && p[0].fract() == 0.0) {
                return Err(invalid(format!(
                    "last={}: expected a whole number >= 1",
                    p[0]
                )));
            }
            Kernel::last(t, p[0] as usize).map_err(err)
        }
        // A user-defined shape: the window, then the samples of `f` (`kernel::Shape::table`).
        "merge" if shape == "table" && !p.is_empty() => {
            let table = kernel::Shape::table(p[1..].to_vec()).map_err(err)?;
            Kernel::merge(t, p[0], table).map_err(err)
        }
        "merge" => {
            want(1)?;
            let shape = kernel::Shape::parse(&shape).map_err(err)?;
            Kernel::merge(t, p[0], shape).map_err(err)
        }
        "bema" => {
            want(6)?;
            let bema = kernel::Bema {
                tau: p[0],
                phi: p[1],
                kappa: p[2],
                eta: p[3],
                rho: p[4],
                gamma: p[5],
            };
            Kernel::bema(t, bema).map_err(err)
        }
        other => Err(invalid(format!(
            "unknown target kind {other:?} (power, beta, halflife, window, last, merge, bema)"
        ))),
    }
}

/// Snapshot weights of every kernel target over snapshots of any kind; a dict of numpy arrays.
#[pyfunction]
#[pyo3(signature = (snapshots, kernels, noise, causal=false))]
fn solve_kernels<'py>(
    py: Python<'py>,
    snapshots: Vec<SnapshotSpec>,
    kernels: Vec<KernelSpec>,
    noise: f64,
    causal: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let snaps = snapshots
        .into_iter()
        .map(make_snapshot)
        .collect::<PyResult<Vec<_>>>()?;
    let kernels = kernels
        .into_iter()
        .map(make_kernel)
        .collect::<PyResult<Vec<_>>>()?;
    let options = SolveOptions { noise, causal };
    let fits = py
        .detach(|| solver::solve_kernels(&snaps, &kernels, &options))
        .map_err(err)?;
    fits_dict(
        py,
        &fits,
        snaps.len(),
        |f| &f.weights,
        &[
            ("fit_error", |f| f.fit_error),
            ("cdf_error", |f| f.cdf_error),
            ("noise_error", |f| f.noise_error),
            ("gain", |f| f.gain),
            ("norm", |f| f.norm),
            ("mass", |f| f.mass),
            ("initial_mass", |f| f.initial_mass),
            ("sigma_rel", |f| f.sigma_rel),
            ("lstsq_fit_error", |f| f.lstsq_fit_error),
            ("lstsq_gain", |f| f.lstsq_gain),
            ("resolution", |f| f.resolution),
            ("extrapolated_mass", |f| f.extrapolated_mass),
            ("interpolated_mass", |f| f.interpolated_mass),
            ("point_mass", |f| f.point_mass),
        ],
        &[
            ("regularized", |f| f.regularized),
            ("poor", |f| f.poor),
            ("rank_deficient", |f| f.rank_deficient),
        ],
    )
}

/// A named figure of every target's fit.
type Column<'a, F, T> = (&'a str, fn(&F) -> T);

/// A solve's figures per target as a dict of numpy arrays: `weights` (snapshots x targets), a
/// float array for each of `floats`, a bool array for each of `flags`.
fn fits_dict<'py, F>(
    py: Python<'py>,
    fits: &[F],
    snapshots: usize,
    weights: fn(&F) -> &Vec<f64>,
    floats: &[Column<F, f64>],
    flags: &[Column<F, bool>],
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    let columns: Vec<&[f64]> = fits.iter().map(|f| weights(f).as_slice()).collect();
    out.set_item("weights", weight_matrix(py, snapshots, &columns)?)?;
    for (name, f) in floats {
        out.set_item(
            *name,
            fits.iter().map(f).collect::<Vec<f64>>().into_pyarray(py),
        )?;
    }
    for (name, f) in flags {
        out.set_item(
            *name,
            fits.iter().map(f).collect::<Vec<bool>>().into_pyarray(py),
        )?;
    }
    Ok(out)
}

/// Solves for the snapshot weights of every target; returns a dict of numpy arrays.
#[pyfunction]
#[pyo3(signature = (snapshot_t, snapshot_gamma, targets, noise, causal=false))]
fn solve<'py>(
    py: Python<'py>,
    snapshot_t: Vec<f64>,
    snapshot_gamma: Vec<f64>,
    targets: Vec<ProfileSpec>,
    noise: f64,
    causal: bool,
) -> PyResult<Bound<'py, PyDict>> {
    if snapshot_t.len() != snapshot_gamma.len() {
        return Err(invalid("snapshot_t and snapshot_gamma differ in length"));
    }
    let snaps = snapshot_t
        .iter()
        .zip(&snapshot_gamma)
        .map(|(&t, &g)| Profile::power(t, g).map_err(err))
        .collect::<PyResult<Vec<_>>>()?;
    let targets = targets
        .iter()
        .map(make_profile)
        .collect::<PyResult<Vec<_>>>()?;
    let fits = py
        .detach(|| solver::solve(&snaps, &targets, &SolveOptions { noise, causal }))
        .map_err(err)?;
    fits_dict(
        py,
        &fits,
        snaps.len(),
        |f| &f.weights,
        &[
            ("fit_error", |f| f.fit_error),
            ("gain", |f| f.gain),
            ("norm", |f| f.norm),
            ("mass", |f| f.mass),
            ("initial_mass", |f| f.initial_mass),
            ("sigma_rel", |f| f.target.sigma_rel()),
            ("lstsq_fit_error", |f| f.lstsq_fit_error),
            ("lstsq_gain", |f| f.lstsq_gain),
            ("noise_error", |f| f.noise_error),
            ("cdf_error", |f| f.cdf_error),
        ],
        &[
            ("regularized", |f| f.regularized),
            ("poor", |f| f.poor),
            ("rank_deficient", |f| f.rank_deficient),
        ],
    )
}

/// Weights on plain checkpoints at `times` for every target (linear interpolation in time).
#[pyfunction]
#[pyo3(signature = (times, targets, causal=false))]
fn solve_raw<'py>(
    py: Python<'py>,
    times: Vec<f64>,
    targets: Vec<ProfileSpec>,
    causal: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let targets = targets
        .iter()
        .map(make_profile)
        .collect::<PyResult<Vec<_>>>()?;
    let fits = py
        .detach(|| solver::solve_raw_targets(&times, &targets, causal))
        .map_err(err)?;
    let out = PyDict::new(py);
    let columns: Vec<&[f64]> = fits.iter().map(|f| f.weights.as_slice()).collect();
    out.set_item("weights", weight_matrix(py, times.len(), &columns)?)?;
    let col = |f: fn(&solver::RawFit) -> f64| fits.iter().map(f).collect::<Vec<f64>>();
    out.set_item("fit_error", col(|f| f.fit_error).into_pyarray(py))?;
    out.set_item("resolution", col(|f| f.resolution).into_pyarray(py))?;
    out.set_item(
        "extrapolated_mass",
        col(|f| f.extrapolated_mass).into_pyarray(py),
    )?;
    out.set_item("initial_mass", col(|f| f.initial_mass).into_pyarray(py))?;
    out.set_item("sigma_rel", col(|f| f.target.sigma_rel()).into_pyarray(py))?;
    let poor: Vec<bool> = fits.iter().map(|f| f.poor).collect();
    out.set_item("poor", poor.into_pyarray(py))?;
    Ok(out)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sigma_rel_to_gamma, m)?)?;
    m.add_function(wrap_pyfunction!(gamma_to_sigma_rel, m)?)?;
    m.add_function(wrap_pyfunction!(profile_density, m)?)?;
    m.add_function(wrap_pyfunction!(profile_info, m)?)?;
    m.add_function(wrap_pyfunction!(solve, m)?)?;
    m.add_function(wrap_pyfunction!(inner, m)?)?;
    m.add_function(wrap_pyfunction!(solve_raw, m)?)?;
    m.add_function(wrap_pyfunction!(solve_kernels, m)?)?;
    Ok(())
}
