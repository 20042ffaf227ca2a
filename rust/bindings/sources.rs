//! Snapshots written, stores listed, and the engine run over listed sources.

use super::*;

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
    py.detach(|| output::write_snapshot(&path, &data, dtype, &metadata))
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
            store::Kind::Steps { sigma_rel } => {
                let steps = crate::format::meta::steps(s.header()).map_err(err)?;
                d.set_item("kind", "steps")?;
                d.set_item("gamma", py.None())?;
                d.set_item("sigma_rel", sigma_rel)?;
                d.set_item("steps", (steps.edges().to_vec(), steps.mass().to_vec()))?;
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
        let Some(id) = crate::format::meta::shard_id(&header)? else {
            return Ok(None);
        };
        let blocks = crate::format::meta::blocks(&header)?
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(per_rank_to_files, m)?)?;
    m.add_function(wrap_pyfunction!(write_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(scan_store, m)?)?;
    m.add_function(wrap_pyfunction!(shard_layout, m)?)?;
    m.add_class::<Sources>()?;
    m.add_class::<EngineProgress>()?;
    Ok(())
}
