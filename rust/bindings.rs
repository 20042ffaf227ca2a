//! The Python extension `phema._core`: type conversion and releasing the interpreter around long
//! work. No logic of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use numpy::{
    IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};
use safetensors::Dtype;

use crate::engine::{self, Progress, Source};
use crate::error::PhemaError as CoreError;
use crate::kernel::{self, Kernel};
use crate::ops;
use crate::profile::{self, Profile};
use crate::solve::{self as solver, SolveOptions};
use crate::store::{self, Header};
use crate::writer::{self, OutputRequest, TensorData};

create_exception!(
    phema,
    PhemaError,
    PyException,
    "The base of every error phema raises for a value, file or store it cannot use; the message \
     names it."
);

create_exception!(
    phema,
    Cancelled,
    PhemaError,
    "The work was cancelled (`EngineProgress.cancel`); nothing was written."
);

/// The error classes with a builtin base beside `PhemaError`, so that `except ValueError` and
/// `except OSError` code written before the base existed keeps catching them.
struct Errors {
    store: Py<PyType>,
    invalid: Py<PyType>,
    storage: Py<PyType>,
}

static ERRORS: PyOnceLock<Errors> = PyOnceLock::new();

/// `class NAME(PhemaError, BUILTIN)` in module `phema`.
fn subclass(
    py: Python<'_>,
    name: &str,
    builtin: Bound<'_, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, [py.get_type::<PhemaError>(), builtin])?;
    let dict = PyDict::new(py);
    dict.set_item("__doc__", doc)?;
    dict.set_item("__module__", "phema")?;
    let made = py.get_type::<PyType>().call1((name, bases, dict))?;
    Ok(made.cast_into::<PyType>()?.unbind())
}

fn errors(py: Python<'_>) -> PyResult<&Errors> {
    ERRORS.get_or_try_init(py, || {
        Ok(Errors {
            store: subclass(
                py,
                "StoreError",
                py.get_type::<PyValueError>(),
                "A store, snapshot or output file is unusable; the message names the file.",
            )?,
            invalid: subclass(
                py,
                "InvalidValueError",
                py.get_type::<PyValueError>(),
                "A value given to phema is out of range or cannot be used; the message names it.",
            )?,
            storage: subclass(
                py,
                "StorageError",
                py.get_type::<PyOSError>(),
                "Reading or writing a file failed; the message names the file and the cause.",
            )?,
        })
    })
}

/// A value the caller passed that the binding cannot convert, as `InvalidValueError`.
fn invalid(message: impl Into<String>) -> PyErr {
    err(CoreError::Invalid(message.into()))
}

fn err(e: CoreError) -> PyErr {
    Python::attach(|py| {
        let ty = match errors(py) {
            Ok(errors) => match e {
                CoreError::Io { .. } | CoreError::Remote { .. } => &errors.storage,
                CoreError::Corrupt { .. }
                | CoreError::Store(_)
                | CoreError::Metadata { .. }
                | CoreError::Overflow { .. } => &errors.store,
                CoreError::Cancelled => return Cancelled::new_err(e.to_string()),
                CoreError::OutOfRange { .. } | CoreError::Invalid(_) | CoreError::Unsolvable(_) => {
                    &errors.invalid
                }
            },
            Err(made) => return made,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| invalid(format!("unknown safetensors dtype {name:?}")))
}

fn dtype_name(d: Dtype) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{d:?}"))
}

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

/// A profile from `(kind, t, value, dt)`: kind `power` (value = gamma), `beta` (value = beta per
/// `dt`) or `halflife` (value = half-life).
fn make_profile(kind: &str, t: f64, value: f64, dt: f64) -> PyResult<Profile> {
    match kind {
        "power" => Profile::power(t, value),
        "beta" => Profile::from_beta(t, value, dt),
        "halflife" => Profile::from_halflife(t, value),
        other => {
            return Err(invalid(format!(
                "unknown profile kind {other:?} (power, beta, halflife)"
            )))
        }
    }
    .map_err(err)
}

type ProfileSpec = (String, f64, f64, f64);

/// Density of a profile at the times `tau` (for plots).
#[pyfunction]
fn profile_density<'py>(
    py: Python<'py>,
    spec: ProfileSpec,
    tau: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let p = make_profile(&spec.0, spec.1, spec.2, spec.3)?;
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
    let p = make_profile(&spec.0, spec.1, spec.2, spec.3)?;
    Ok((p.sigma_rel(), p.initial_mass()))
}

/// `<p, q>`: the integral of the product of two profiles.
#[pyfunction]
fn inner(p: ProfileSpec, q: ProfileSpec) -> PyResult<f64> {
    let p = make_profile(&p.0, p.1, p.2, p.3)?;
    let q = make_profile(&q.0, q.1, q.2, q.3)?;
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
            make_profile(&kind, t, p[0], 1.0).map(Kernel::Profile)
        }
        "beta" => {
            want(2)?;
            make_profile(&kind, t, p[0], p[1]).map(Kernel::Profile)
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
        .map(|s| make_profile(&s.0, s.1, s.2, s.3))
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
        .map(|s| make_profile(&s.0, s.1, s.2, s.3))
        .collect::<PyResult<Vec<_>>>()?;
    let fits = py
        .detach(|| {
            targets
                .iter()
                .map(|t| solver::solve_raw(&times, t, causal))
                .collect::<crate::Result<Vec<_>>>()
        })
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
    Ok(out)
}

/// Writes one snapshot file crash-safely; returns the names of tensors kept in fp32 because they
/// exceed the fp16 range.
#[pyfunction]
fn write_snapshot(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyUntypedArray>)>,
    dtype: &str,
    metadata: BTreeMap<String, String>,
) -> PyResult<Vec<String>> {
    let dtype = parse_dtype(dtype)?;
    let f32_dtype = numpy::dtype::<f32>(py);
    // Borrow every array first (under the interpreter), then write without it.
    enum Held<'py> {
        F32(PyReadonlyArrayDyn<'py, f32>),
        Raw(Dtype, PyReadonlyArrayDyn<'py, u8>),
    }
    let mut held = Vec::with_capacity(tensors.len());
    for (name, arr) in &tensors {
        let shape = arr.shape().to_vec();
        if arr.dtype().is_equiv_to(&f32_dtype) {
            let a = arr.cast::<PyArrayDyn<f32>>()?.readonly();
            held.push((name.clone(), shape, Held::F32(a)));
        } else {
            let code: String = arr.dtype().getattr("str")?.extract()?;
            let d = numpy_to_safetensors(&code).ok_or_else(|| {
                invalid(format!(
                    "tensor `{name}`: numpy dtype {} cannot be stored",
                    arr.dtype()
                ))
            })?;
            let bytes = arr
                .call_method1("reshape", (-1,))?
                .call_method1("view", ("uint8",))?;
            let a = bytes.cast_into::<PyArrayDyn<u8>>()?.readonly();
            held.push((name.clone(), shape, Held::Raw(d, a)));
        }
    }
    let mut data = Vec::with_capacity(held.len());
    for (name, shape, h) in &held {
        let d = match h {
            Held::F32(a) => TensorData::F32(
                a.as_slice()
                    .map_err(|_| invalid(format!("tensor `{name}` is not C-contiguous")))?,
            ),
            Held::Raw(d, a) => TensorData::Raw(*d, a.as_slice()?),
        };
        data.push((name.clone(), shape.clone(), d));
    }
    py.detach(|| writer::write_snapshot(&path, &data, dtype, &metadata))
        .map_err(err)
}

/// numpy `dtype.str` (e.g. `<i8`) to the safetensors dtype storing the same bytes.
fn numpy_to_safetensors(s: &str) -> Option<Dtype> {
    Some(match s.trim_start_matches(['<', '=', '|']) {
        "f2" => Dtype::F16,
        "f4" => Dtype::F32,
        "f8" => Dtype::F64,
        "i1" => Dtype::I8,
        "i2" => Dtype::I16,
        "i4" => Dtype::I32,
        "i8" => Dtype::I64,
        "u1" => Dtype::U8,
        "u2" => Dtype::U16,
        "u4" => Dtype::U32,
        "u8" => Dtype::U64,
        "b1" => Dtype::BOOL,
        _ => return None,
    })
}

/// Progress of a running combination, readable (and cancellable) from another Python thread.
#[pyclass(frozen)]
struct EngineProgress(Arc<Progress>);

#[pymethods]
impl EngineProgress {
    #[new]
    fn new() -> Self {
        EngineProgress(Arc::new(Progress::default()))
    }
    /// Snapshot bytes processed so far.
    #[getter]
    fn bytes_done(&self) -> u64 {
        self.0.bytes_done.load(Ordering::Relaxed)
    }
    /// Asks the engine to stop at the next chunk; it then raises `Cancelled`.
    fn cancel(&self) {
        self.0.cancel.store(true, Ordering::Relaxed);
    }
}

/// Parsed headers of a set of inputs (checkpoints of one or more safetensors files each), in
/// the order given.
#[pyclass(frozen)]
struct Sources(Vec<Source>);

fn source_dict<'py>(py: Python<'py>, s: &Source) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let first: &Header = &s.files[0];
    d.set_item("path", first.path.to_string_lossy())?;
    let files: Vec<String> = s
        .files
        .iter()
        .map(|h| h.path.to_string_lossy().into_owned())
        .collect();
    d.set_item("files", files)?;
    d.set_item("sharded", s.sharded)?;
    d.set_item("metadata", first.metadata.clone())?;
    d.set_item("file_size", s.size())?;
    let tensors = PyList::empty(py);
    for t in engine::layout_of(s).map_err(err)? {
        tensors.append((t.name, dtype_name(t.dtype), t.shape))?;
    }
    d.set_item("tensors", tensors)?;
    Ok(d)
}

#[pymethods]
impl Sources {
    /// Reads the headers of these inputs, each a list of files (data is not touched). The rank
    /// files of a snapshot of sharded training are assembled into global tensors, unless `local`:
    /// then each file is taken as it is (one rank's part).
    #[new]
    #[pyo3(signature = (inputs, local=false))]
    fn new(py: Python<'_>, inputs: Vec<Vec<PathBuf>>, local: bool) -> PyResult<Self> {
        let sources = py
            .detach(|| {
                inputs
                    .iter()
                    .map(|files| Source::open(files, local))
                    .collect::<crate::Result<Vec<_>>>()
            })
            .map_err(err)?;
        Ok(Sources(sources))
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// One dict per input: path (of its first file), files, metadata (of its first file),
    /// file_size (total), tensors [(name, dtype, shape)].
    fn describe<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.0.iter().map(|s| source_dict(py, s)).collect()
    }

    /// Every input's files (a sharded snapshot's rank files in rank order), as given.
    fn files(&self) -> Vec<Vec<PathBuf>> {
        self.0
            .iter()
            .map(|s| s.files.iter().map(|h| h.path.clone()).collect())
            .collect()
    }

    /// The inputs at these positions.
    fn select(&self, indices: Vec<usize>) -> PyResult<Sources> {
        indices
            .iter()
            .map(|&i| {
                self.0
                    .get(i)
                    .cloned()
                    .ok_or_else(|| invalid(format!("no file at index {i}")))
            })
            .collect::<PyResult<Vec<_>>>()
            .map(Sources)
    }

    /// Writes `sum_i weights[i, c] * input_i` for every column `c` to the requested outputs
    /// (dicts with path, dtype, metadata, shard_size); returns (paths per output, stats).
    /// Non-float tensors come from input `copy_from` (default: the last input read). With `mix`
    /// (a list of `(column, {tensor name: column})` per output) outputs mix columns per tensor.
    /// Unless `verify` is false, the checksum of every file read whole is verified.
    #[pyo3(signature = (weights, outputs, progress, copy_from=None, mix=None, verify=true))]
    // Python keyword arguments, each optional.
    #[allow(clippy::too_many_arguments)]
    fn combine_to_files<'py>(
        &self,
        py: Python<'py>,
        weights: PyReadonlyArray2<'py, f64>,
        outputs: Vec<Bound<'py, PyDict>>,
        progress: &EngineProgress,
        copy_from: Option<usize>,
        mix: Option<Vec<(usize, BTreeMap<String, usize>)>>,
        verify: bool,
    ) -> PyResult<(Vec<Vec<String>>, Bound<'py, PyDict>)> {
        let w = rows(&weights)?;
        let requests = outputs
            .iter()
            .map(output_request)
            .collect::<PyResult<Vec<_>>>()?;
        let inputs = &self.0;
        let progress = Arc::clone(&progress.0);
        let mix = mix.map(to_mix);
        let (paths, stats) = py
            .detach(|| {
                let mut plan = ops::plan(inputs, w, copy_from, mix.as_ref())?;
                plan.skip_verify = !verify;
                ops::to_files(inputs, &plan, &requests, &progress)
            })
            .map_err(err)?;
        let paths = paths
            .into_iter()
            .map(|ps| {
                ps.iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect()
            })
            .collect();
        Ok((paths, stats_dict(py, &stats)?))
    }

    /// Like `combine_to_files`, into caller-owned buffers: `buffers[k][j]` is a writable,
    /// C-contiguous uint8 array holding tensor `j` (in the first used file's order) of output `k`
    /// as float32 (float tensors) or in its stored dtype (others, from input `copy_from`).
    #[pyo3(signature = (weights, buffers, progress, copy_from=None, mix=None, verify=true))]
    // Python keyword arguments, each optional.
    #[allow(clippy::too_many_arguments)]
    fn combine_to_memory<'py>(
        &self,
        py: Python<'py>,
        weights: PyReadonlyArray2<'py, f64>,
        buffers: Vec<Vec<Bound<'py, PyArrayDyn<u8>>>>,
        progress: &EngineProgress,
        copy_from: Option<usize>,
        mix: Option<Vec<(usize, BTreeMap<String, usize>)>>,
        verify: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let w = rows(&weights)?;
        let mut held = Vec::with_capacity(buffers.len());
        for per_output in &buffers {
            let mut v = Vec::with_capacity(per_output.len());
            for b in per_output {
                v.push(b.try_readwrite().map_err(|_| {
                    invalid("an output buffer is given twice or is in use elsewhere")
                })?);
            }
            held.push(v);
        }
        let mut slices: Vec<Vec<&mut [u8]>> = Vec::with_capacity(held.len());
        for per_output in held.iter_mut() {
            let mut v = Vec::with_capacity(per_output.len());
            for b in per_output.iter_mut() {
                v.push(
                    b.as_slice_mut()
                        .map_err(|_| invalid("output buffers must be C-contiguous"))?,
                );
            }
            slices.push(v);
        }
        let inputs = &self.0;
        let progress = Arc::clone(&progress.0);
        let mix = mix.map(to_mix);
        let stats = py
            .detach(|| {
                let mut plan = ops::plan(inputs, w, copy_from, mix.as_ref())?;
                plan.skip_verify = !verify;
                ops::to_memory(inputs, &plan, slices, &progress)
            })
            .map_err(err)?;
        stats_dict(py, &stats)
    }

    /// The files `output` makes of the outputs of `weights`: `([(path, [tensor names])],
    /// index path or None)`, one entry per shard (the tasks of a distributed run).
    fn output_files(
        &self,
        weights: PyReadonlyArray2<'_, f64>,
        output: Bound<'_, PyDict>,
    ) -> PyResult<(Vec<ShardFiles>, Option<String>)> {
        let (shards, index) =
            ops::output_files(&self.0, &rows(&weights)?, &output_request(&output)?).map_err(err)?;
        let text = |p: PathBuf| p.to_string_lossy().into_owned();
        Ok((
            shards.into_iter().map(|(p, n)| (text(p), n)).collect(),
            index.map(text),
        ))
    }

    /// Commits a distributed run (`ops::commit_staged`): the files of `staged` moved to the
    /// paths of `finals`, indexes last; returns each output's paths.
    fn commit_staged(
        &self,
        py: Python<'_>,
        weights: PyReadonlyArray2<'_, f64>,
        finals: Vec<Bound<'_, PyDict>>,
        staged: Vec<Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Vec<PathBuf>>> {
        let w = rows(&weights)?;
        let requests =
            |ds: &[Bound<'_, PyDict>]| ds.iter().map(output_request).collect::<PyResult<Vec<_>>>();
        let (finals, staged) = (requests(&finals)?, requests(&staged)?);
        py.detach(|| ops::commit_staged(&self.0, &w, &finals, &staged))
            .map_err(err)
    }
}

/// A shard's path and tensor names, as `output_files` returns them.
type ShardFiles = (String, Vec<String>);

fn to_mix(per_output: Vec<(usize, BTreeMap<String, usize>)>) -> ops::Mix {
    let (defaults, overrides) = per_output.into_iter().unzip();
    ops::Mix {
        defaults,
        overrides,
    }
}

fn rows(weights: &PyReadonlyArray2<'_, f64>) -> PyResult<Vec<Vec<f64>>> {
    let a = weights.as_array();
    Ok(a.rows().into_iter().map(|r| r.to_vec()).collect())
}

fn output_request(d: &Bound<'_, PyDict>) -> PyResult<OutputRequest> {
    let get = |k: &str| {
        d.get_item(k)?
            .ok_or_else(|| invalid(format!("output lacks `{k}`")))
    };
    let optional = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(d.get_item(k)?.filter(|v| !v.is_none()))
    };
    Ok(OutputRequest {
        path: get("path")?.extract()?,
        dtype: parse_dtype(&get("dtype")?.extract::<String>()?)?,
        metadata: get("metadata")?.extract()?,
        shard_size: optional("shard_size")?.map(|v| v.extract()).transpose()?,
        shard: optional("shard")?.map(|v| v.extract()).transpose()?,
        stem: optional("stem")?.map(|v| v.extract()).transpose()?,
    })
}

fn stats_dict<'py>(py: Python<'py>, s: &engine::Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("read", s.read.clone())?;
    d.set_item("bytes_read", s.bytes_read)?;
    d.set_item("raw_mismatch", s.raw_mismatch.clone())?;
    d.set_item("nonfinite", s.nonfinite.clone())?;
    Ok(d)
}

/// What `scan_store` returns: the sources, their records, ignored files, problems and
/// incomplete snapshots.
type ScanResult<'py> = (
    Sources,
    Vec<Bound<'py, PyDict>>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<String>,
);

/// Lists a store directory; returns (headers of the snapshots, their records, ignored, problems,
/// incomplete snapshots).
#[pyfunction]
fn scan_store<'py>(py: Python<'py>, path: PathBuf) -> PyResult<ScanResult<'py>> {
    let scan = py.detach(|| store::scan(&path)).map_err(err)?;
    let sources = scan
        .snapshots
        .iter()
        .map(|s| Source::new(s.files.clone(), false))
        .collect::<crate::Result<Vec<_>>>()
        .map_err(err)?;
    let mut records = Vec::with_capacity(scan.snapshots.len());
    for (s, source) in scan.snapshots.iter().zip(&sources) {
        let d = source_dict(py, source)?;
        d.set_item("t", s.t)?;
        match s.kind {
            store::Kind::Power { gamma } => {
                d.set_item("kind", "power")?;
                d.set_item("gamma", gamma)?;
            }
            store::Kind::Raw => {
                d.set_item("kind", "raw")?;
                d.set_item("gamma", py.None())?;
            }
        }
        records.push(d);
    }
    let ignored = scan
        .ignored
        .iter()
        .map(|(p, r)| (p.to_string_lossy().into_owned(), r.clone()))
        .collect();
    Ok((
        Sources(sources),
        records,
        ignored,
        scan.problems,
        scan.incomplete,
    ))
}

/// Block layout: `{name: (global shape, offset)}`.
type Blocks = BTreeMap<String, (Vec<usize>, Vec<usize>)>;

/// The rank part a file is of sharded training: `(rank, world_size, blocks)`, or None for an
/// ordinary file; the metadata is validated as for a store.
#[pyfunction]
fn shard_layout(py: Python<'_>, path: PathBuf) -> PyResult<Option<(usize, usize, Blocks)>> {
    py.detach(|| {
        let header = store::read_header(&path)?;
        let Some(id) = crate::meta::shard_id(&header)? else {
            return Ok(None);
        };
        let blocks = crate::meta::blocks(&header)?
            .into_iter()
            .map(|(name, b)| (name, (b.shape, b.offset)))
            .collect();
        Ok(Some((id.rank, id.world_size, blocks)))
    })
    .map_err(err)
}

/// Paths written, per rank and output.
type PathsPerRank = Vec<Vec<Vec<String>>>;

/// Writes the outputs of a sharded run once per rank (`inputs[rank][input]` are file lists,
/// `outputs[rank]` that rank's output dicts), all committed together; returns (paths per rank
/// and output, stats).
#[pyfunction]
#[pyo3(signature = (inputs, weights, outputs, progress, copy_from=None, mix=None, verify=true))]
// Python keyword arguments, each optional.
#[allow(clippy::too_many_arguments)]
fn per_rank_to_files<'py>(
    py: Python<'py>,
    inputs: Vec<Vec<Vec<PathBuf>>>,
    weights: PyReadonlyArray2<'py, f64>,
    outputs: Vec<Vec<Bound<'py, PyDict>>>,
    progress: &EngineProgress,
    copy_from: Option<usize>,
    mix: Option<Vec<(usize, BTreeMap<String, usize>)>>,
    verify: bool,
) -> PyResult<(PathsPerRank, Bound<'py, PyDict>)> {
    let w = rows(&weights)?;
    let requests = outputs
        .iter()
        .map(|rank| {
            rank.iter()
                .map(output_request)
                .collect::<PyResult<Vec<_>>>()
        })
        .collect::<PyResult<Vec<_>>>()?;
    let progress = Arc::clone(&progress.0);
    let mix = mix.map(to_mix);
    let (paths, stats) = py
        .detach(|| {
            let sources = inputs
                .iter()
                .map(|rank| {
                    rank.iter()
                        .map(|files| Source::open(files, true))
                        .collect::<crate::Result<Vec<_>>>()
                })
                .collect::<crate::Result<Vec<_>>>()?;
            let first = sources.first().map(Vec::as_slice).unwrap_or_default();
            let mut plan = ops::plan(first, w, copy_from, mix.as_ref())?;
            plan.skip_verify = !verify;
            ops::per_rank_to_files(&sources, &plan, &requests, &progress)
        })
        .map_err(err)?;
    let text = |p: &PathBuf| p.to_string_lossy().into_owned();
    let paths = paths
        .iter()
        .map(|rank| {
            rank.iter()
                .map(|ps| ps.iter().map(text).collect())
                .collect()
        })
        .collect();
    Ok((paths, stats_dict(py, &stats)?))
}

/// Moves files into `directory`, never replacing one there (`writer::move_files`).
#[pyfunction]
fn move_files(py: Python<'_>, paths: Vec<PathBuf>, directory: PathBuf) -> PyResult<Vec<PathBuf>> {
    py.detach(|| writer::move_files(&paths, &directory))
        .map_err(err)
}

/// Copies `source` to `path` by the same rule (`writer::copy_file`).
#[pyfunction]
fn copy_file(py: Python<'_>, source: PathBuf, path: PathBuf) -> PyResult<()> {
    py.detach(|| writer::copy_file(&source, &path)).map_err(err)
}

/// Whether `location` is an object-storage URL (`remote::is_url`).
#[pyfunction]
fn is_url(location: &str) -> bool {
    crate::remote::is_url(location)
}

/// The scheme of a URL phema does not read (`http`, `az`, ...), or None.
#[pyfunction]
fn unsupported_scheme(location: &str) -> Option<String> {
    crate::remote::unsupported_scheme(location).map(str::to_string)
}

/// Objects `(name, size)` and sub-prefixes under a prefix.
type RemoteListing = (Vec<(String, u64)>, Vec<String>);

/// What is directly under the prefix `url`: `([(name, size)], [sub-prefix])`.
#[pyfunction]
fn remote_list(py: Python<'_>, url: &str) -> PyResult<RemoteListing> {
    let listing = py
        .detach(|| crate::remote::Object::parse(url)?.list())
        .map_err(err)?;
    let files = listing.files.into_iter().map(|(n, s, _)| (n, s)).collect();
    Ok((files, listing.dirs))
}

/// The whole (small) object at `url`.
#[pyfunction]
fn remote_read<'py>(py: Python<'py>, url: &str) -> PyResult<Bound<'py, PyBytes>> {
    let bytes = py
        .detach(|| crate::remote::Object::parse(url)?.read_small())
        .map_err(err)?;
    Ok(PyBytes::new(py, &bytes))
}

/// Whether the object at `url` exists.
#[pyfunction]
fn remote_exists(py: Python<'_>, url: &str) -> PyResult<bool> {
    py.detach(|| crate::remote::Object::parse(url)?.exists())
        .map_err(err)
}

/// Deletes the objects at `urls` (absent ones are fine).
#[pyfunction]
fn remote_delete(py: Python<'_>, urls: Vec<String>) -> PyResult<()> {
    py.detach(|| {
        urls.iter()
            .try_for_each(|u| crate::remote::Object::parse(u)?.delete())
    })
    .map_err(err)
}

/// Uploads staged local files to their URLs in order (`remote::publish`).
#[pyfunction]
fn publish(py: Python<'_>, files: Vec<(PathBuf, String)>, create: bool) -> PyResult<()> {
    py.detach(|| crate::remote::publish(&files, create))
        .map_err(err)
}

/// Creates the claim object `url` holding `content` unless one is there; returns what an
/// existing claim holds (`remote::claim`).
#[pyfunction]
fn claim<'py>(py: Python<'py>, url: &str, content: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let found = py
        .detach(|| crate::remote::claim(url, content))
        .map_err(err)?;
    Ok(found.map(|b| PyBytes::new(py, &b)))
}

/// Replaces the file at `path` with `data` in one step (`writer::write_file`).
#[pyfunction]
fn write_file(py: Python<'_>, path: PathBuf, data: &[u8]) -> PyResult<()> {
    py.detach(|| writer::write_file(&path, data)).map_err(err)
}

/// Verifies the checksum a snapshot records (docs/store-format.md): `("ok" | "not recorded" |
/// "mismatch", recorded, computed)`.
#[pyfunction]
fn verify_checksum(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(&'static str, Option<String>, Option<String>)> {
    use crate::checksum::{verify, Verified};
    let found = py.detach(|| verify(&path)).map_err(err)?;
    Ok(match found {
        Verified::Ok => ("ok", None, None),
        Verified::NotRecorded => ("not recorded", None, None),
        Verified::Mismatch { recorded, computed } => ("mismatch", Some(recorded), Some(computed)),
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let py = m.py();
    m.add("PhemaError", py.get_type::<PhemaError>())?;
    let errors = errors(py)?;
    m.add("StoreError", errors.store.bind(py))?;
    m.add("InvalidValueError", errors.invalid.bind(py))?;
    m.add("StorageError", errors.storage.bind(py))?;
    m.add("Cancelled", m.py().get_type::<Cancelled>())?;
    m.add("NOISE_FLOAT16", solver::NOISE_FLOAT16)?;
    m.add("NOISE_BFLOAT16", solver::NOISE_BFLOAT16)?;
    m.add("NOISE_FLOAT32", solver::NOISE_FLOAT32)?;
    m.add("CHUNK", engine::CHUNK)?;
    m.add("POOR_CDF_ERROR", solver::POOR_CDF_ERROR)?;
    m.add("POOR_NOISE", solver::POOR_NOISE)?;
    m.add_function(wrap_pyfunction!(sigma_rel_to_gamma, m)?)?;
    m.add_function(wrap_pyfunction!(verify_checksum, m)?)?;
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(is_url, m)?)?;
    m.add_function(wrap_pyfunction!(unsupported_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(remote_list, m)?)?;
    m.add_function(wrap_pyfunction!(remote_read, m)?)?;
    m.add_function(wrap_pyfunction!(remote_exists, m)?)?;
    m.add_function(wrap_pyfunction!(remote_delete, m)?)?;
    m.add_function(wrap_pyfunction!(publish, m)?)?;
    m.add_function(wrap_pyfunction!(claim, m)?)?;
    m.add_function(wrap_pyfunction!(copy_file, m)?)?;
    m.add_function(wrap_pyfunction!(move_files, m)?)?;
    m.add_function(wrap_pyfunction!(per_rank_to_files, m)?)?;
    m.add_function(wrap_pyfunction!(gamma_to_sigma_rel, m)?)?;
    m.add_function(wrap_pyfunction!(profile_density, m)?)?;
    m.add_function(wrap_pyfunction!(profile_info, m)?)?;
    m.add_function(wrap_pyfunction!(solve, m)?)?;
    m.add_function(wrap_pyfunction!(inner, m)?)?;
    m.add_function(wrap_pyfunction!(solve_raw, m)?)?;
    m.add_function(wrap_pyfunction!(solve_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(write_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(scan_store, m)?)?;
    m.add_function(wrap_pyfunction!(shard_layout, m)?)?;
    m.add_class::<Sources>()?;
    m.add_class::<EngineProgress>()?;
    Ok(())
}
