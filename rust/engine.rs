//! The reconstruction engine (docs/design.md): `out_k[name] = sum_i x[i, k] * snapshot_i[name]` for all
//! targets in one pass over the snapshots, read in bounded chunks, spread over all cores.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::checksum::{InOrder, Verified, NOT_IN_PLACE};
use crate::codec::{decode, encode_into, has_nonfinite};
use crate::error::{PhemaError, Result};
use crate::header::{is_float, open_regular, read_header, read_open, Header, TensorEntry};
use crate::meta::{shard_id, CHECKSUM};
use crate::remote::{is_url, Object, ReadAhead};
use crate::shard::{assemble, order_ranks, Assembled, RankSetError, Segment};

/// Most elements of one tensor handled by one work item: bounds memory per thread, whatever the
/// size of the largest tensor.
pub const CHUNK: usize = 1 << 18;
/// Elements converted at once: small enough that the block and all targets' accumulators for it
/// stay in cache while every snapshot is added.
const BLOCK: usize = 256;

/// Receives finished pieces of the outputs.
pub trait Sink: Sync {
    /// The dtype (F16, BF16 or F32) float tensor `tensor` of output `output` is delivered in.
    fn dtype(&self, output: usize, tensor: usize) -> Dtype;
    /// `bytes` are elements `elem_offset..` of float tensor `tensor` of output `output`,
    /// little-endian in `self.dtype(output, tensor)`.
    fn put(&self, output: usize, tensor: usize, elem_offset: usize, bytes: &[u8]) -> Result<()>;
    /// The bytes of a non-float tensor, copied unchanged into every output.
    fn put_raw(&self, output: usize, tensor: usize, bytes: &[u8]) -> Result<()>;
    /// Whether output `output` takes tensor `tensor` (a sink writing one shard of a model takes
    /// only that shard's tensors); tensors no output takes are not computed.
    fn wants(&self, _output: usize, _tensor: usize) -> bool {
        true
    }
}

/// What a combination computes: weighted sums of the inputs (columns), and which column every
/// tensor of every output takes, so that outputs may mix EMA lengths per tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// `weights[i][c]`: the weight of input `i` in column `c`.
    pub weights: Vec<Vec<f64>>,
    /// Per output: the column of every tensor, in the output layout's order. Empty: one output
    /// per column, every tensor of output `k` from column `k`.
    pub routes: Vec<Vec<usize>>,
    /// The input whose non-float tensors are copied (default: the last input read).
    pub copy_from: Option<usize>,
    /// Whether to skip verifying the checksums of the files read whole (docs/store-format.md).
    pub skip_verify: bool,
}

impl Plan {
    /// One output per column of `weights` (`[input][column]`).
    pub fn new(weights: Vec<Vec<f64>>, copy_from: Option<usize>) -> Self {
        Plan {
            weights,
            routes: Vec::new(),
            copy_from,
            skip_verify: false,
        }
    }

    /// Number of columns (distinct weighted sums).
    pub fn columns(&self) -> usize {
        self.weights.first().map_or(0, Vec::len)
    }

    /// Number of outputs.
    pub fn outputs(&self) -> usize {
        if self.routes.is_empty() {
            self.columns()
        } else {
            self.routes.len()
        }
    }

    fn column(&self, output: usize, tensor: usize) -> usize {
        if self.routes.is_empty() {
            output
        } else {
            self.routes[output][tensor]
        }
    }

    /// Checks the routes against the output layout: one column per tensor, each existing.
    fn check_routes(&self, layout: &[TensorEntry]) -> Result<()> {
        let n = self.columns();
        for (k, r) in self.routes.iter().enumerate() {
            if r.len() != layout.len() {
                return Err(PhemaError::Invalid(format!(
                    "output {k} routes {} tensors, but the snapshots hold {}",
                    r.len(),
                    layout.len()
                )));
            }
            if let Some(c) = r.iter().find(|&&c| c >= n) {
                return Err(PhemaError::Invalid(format!(
                    "output {k} takes column {c}, but the weights have {n} columns"
                )));
            }
        }
        Ok(())
    }
}

/// Progress and cancellation shared with the caller while the engine runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Snapshot bytes processed so far.
    pub bytes_done: AtomicU64,
    /// Set by the caller to stop the work at the next chunk.
    pub cancel: AtomicBool,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Indices (into the inputs) of the snapshots that were read.
    pub read: Vec<usize>,
    /// Snapshot bytes read.
    pub bytes_read: u64,
    /// Non-float tensors whose contents differ between the inputs read.
    pub raw_mismatch: Vec<String>,
    /// Float tensors with an output element that is NaN or infinite: NaN or infinity in an
    /// input, or a value too large for the output dtype (beyond 65504 in fp16).
    pub nonfinite: Vec<String>,
}

/// One input of a combination: a checkpoint held in one safetensors file (a snapshot), in several
/// (a sharded checkpoint, every tensor whole in one file), or the rank files of a snapshot written
/// by sharded training (every tensor assembled from the ranks' blocks).
#[derive(Clone, Debug)]
pub struct Source {
    /// Its files (for a sharded snapshot: rank `r`'s file at index `r`).
    pub files: Vec<Header>,
    /// Whether the files are the ranks' parts of one sharded snapshot.
    pub sharded: bool,
}

impl Source {
    /// A single-file source.
    pub fn single(header: Header) -> Self {
        Source {
            files: vec![header],
            sharded: false,
        }
    }

    /// Reads the headers of the files at `paths` (their data is not touched) and makes a
    /// source of them, as [`Source::new`] does.
    pub fn open(paths: &[PathBuf], local: bool) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| read_header(p))
            .collect::<Result<Vec<_>>>()?;
        Source::new(files, local)
    }

    /// A source of these files. Rank files of a sharded snapshot are assembled into global
    /// tensors (all ranks must be there) unless `local`: then each is taken as it is.
    pub fn new(files: Vec<Header>, local: bool) -> Result<Self> {
        if files.is_empty() {
            return Err(PhemaError::Invalid("an input without files".into()));
        }
        let ids = files.iter().map(shard_id).collect::<Result<Vec<_>>>()?;
        if local || ids.iter().all(Option::is_none) {
            return Ok(Source {
                files,
                sharded: false,
            });
        }
        let ids = files
            .iter()
            .zip(&ids)
            .map(|(h, id)| {
                id.ok_or_else(|| {
                    PhemaError::Store(format!(
                        "{} is not a rank file, but other files of the same input are",
                        h.path.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let paths: Vec<&Path> = files.iter().map(|h| h.path.as_path()).collect();
        let order = order_ranks(&ids, &paths).map_err(|e| match e {
            RankSetError::Incomplete(why) => PhemaError::Store(format!(
                "the sharded snapshot {} is incomplete: {why}",
                files[0].path.display()
            )),
            RankSetError::Problem(e) => e,
        })?;
        let mut slots: Vec<Option<Header>> = files.into_iter().map(Some).collect();
        Ok(Source {
            files: order
                .into_iter()
                .filter_map(|i| slots.get_mut(i).and_then(Option::take))
                .collect(),
            sharded: true,
        })
    }

    /// Every tensor (global for a sharded snapshot) with where its elements are, in file order.
    pub fn layout(&self) -> Result<Vec<Assembled>> {
        if self.sharded {
            return assemble(&self.files);
        }
        Ok(self
            .files
            .iter()
            .enumerate()
            .flat_map(|(f, h)| {
                h.tensors.iter().map(move |t| {
                    let segment = Segment {
                        start: 0,
                        len: t.numel(),
                        file: f,
                        byte_offset: t.offset,
                        dtype: t.dtype,
                    };
                    (t.clone(), vec![segment])
                })
            })
            .collect())
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|h| h.file_size).sum()
    }

    /// The files, for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            many if self.sharded => format!(
                "{} (and the {} other ranks' files)",
                many[0].path.display(),
                many.len() - 1
            ),
            many => format!(
                "{} (and {} more shards)",
                many[0].path.display(),
                many.len() - 1
            ),
        }
    }

    /// Where this source's tensors are, in `layout` order, checking names, shapes and kinds agree.
    pub fn align(&self, layout: &[TensorEntry]) -> Result<Vec<Vec<Segment>>> {
        let own = self.layout()?;
        let mut by_name: HashMap<&str, &Assembled> =
            own.iter().map(|a| (a.0.name.as_str(), a)).collect();
        let aligned = layout
            .iter()
            .map(|t| {
                let Some((u, segments)) = by_name.remove(t.name.as_str()) else {
                    return Err(PhemaError::Store(format!(
                        "tensor `{}` is missing from {}",
                        t.name,
                        self.describe()
                    )));
                };
                if u.shape != t.shape || is_float(u.dtype) != is_float(t.dtype) {
                    return Err(PhemaError::Store(format!(
                        "tensor `{}` is {:?} {:?} in {} but {:?} {:?} in the other inputs",
                        t.name,
                        u.dtype,
                        u.shape,
                        self.describe(),
                        t.dtype,
                        t.shape
                    )));
                }
                Ok(segments.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(extra) = by_name.keys().next() {
            return Err(PhemaError::Store(format!(
                "tensor `{extra}` is in {} but not in the other inputs",
                self.describe()
            )));
        }
        Ok(aligned)
    }
}

/// One opened input with, per tensor in `layout` order, where its elements are.
///
/// Inputs are read with `pread` into per-item buffers rather than mapped: a mapped file that
/// shrinks under the reader kills the process with SIGBUS (the Python interpreter with it), the
/// mapped pages count towards resident memory until released, and releasing them from several
/// threads costs a TLB shootdown per release (a fifth of a 16-target run when mapped).
struct Opened {
    files: Vec<OpenFile>,
    segments: Vec<Vec<Segment>>,
}

/// An input file held open for the whole run, with the check of its checksum when it is read
/// whole.
struct OpenFile {
    backing: Backing,
    /// For an object: the work items' reads of it, fetched in large pieces.
    ahead: Option<ReadAhead>,
    path: PathBuf,
    /// Its header JSON as stored.
    json: Vec<u8>,
    check: Option<InOrder>,
}

/// Where an input's bytes come from.
enum Backing {
    /// A local file, held open.
    Local(File),
    /// An object, read by ranged requests from the version listed, of this size.
    Remote(Object, Option<String>, u64),
}

impl OpenFile {
    /// Its size now (a local file may have grown or shrunk since it was listed).
    fn size(&self) -> Result<u64> {
        match &self.backing {
            Backing::Local(file) => Ok(file
                .metadata()
                .map_err(|e| PhemaError::io(&self.path, e))?
                .len()),
            Backing::Remote(_, _, size) => Ok(*size),
        }
    }
}

impl Opened {
    /// Reads elements `start..start + len` of tensor `tensor`, which must lie in one segment,
    /// into `buf`; returns their dtype.
    fn read(&self, tensor: usize, start: usize, len: usize, buf: &mut Vec<u8>) -> Result<Dtype> {
        let (file, at, s) = self.locate(tensor, start);
        buf.resize(len * (s.dtype.bitsize() / 8), 0);
        let f = &self.files[file];
        read_at(f, at, buf)?;
        if let Some(check) = &f.check {
            check.take(at, buf, |at, b| read_at(f, at, b))?;
        }
        Ok(s.dtype)
    }

    /// Where element `start` of tensor `tensor` is: its file, byte offset and segment.
    fn locate(&self, tensor: usize, start: usize) -> (usize, u64, &Segment) {
        let segments = &self.segments[tensor];
        let i = segments
            .partition_point(|s| s.start <= start)
            .saturating_sub(1);
        let s = &segments[i];
        let at = s.byte_offset + ((start - s.start) * (s.dtype.bitsize() / 8)) as u64;
        (s.file, at, s)
    }

    /// The whole of (non-float) tensor `tensor`, gathered from its segments.
    fn whole(&self, tensor: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for s in &self.segments[tensor] {
            self.read(tensor, s.start, s.len, &mut buf)?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }
}

/// Fills `buf` from byte `at` of `f`.
fn read_at(f: &OpenFile, at: u64, buf: &mut [u8]) -> Result<()> {
    match &f.backing {
        Backing::Local(file) => file.read_exact_at(buf, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => changed(&f.path),
            _ => PhemaError::io(&f.path, e),
        }),
        Backing::Remote(object, version, _) => match &f.ahead {
            Some(ahead) => ahead.read(at, buf),
            None => object.read_at(at, buf, version.as_deref()),
        },
    }
}

/// Bytes of read-ahead the objects of one run may hold at once (about three pieces each: the
/// one being read, the next one coming, the last one's rest).
const READ_AHEAD: u64 = 128 << 20;

/// Plans the read-ahead of every object among the inputs from the work items' reads: object
/// storage wants few large requests, the items make many small reads.
fn plan_read_ahead(opened: &mut [Opened], items: &[(usize, usize, usize)]) {
    let remote: usize = opened
        .iter()
        .flat_map(|o| &o.files)
        .filter(|f| matches!(f.backing, Backing::Remote(..)))
        .count();
    if remote == 0 {
        return;
    }
    let piece = (READ_AHEAD / (3 * remote as u64)).clamp(1 << 20, 8 << 20);
    for o in opened.iter_mut() {
        let mut reads: Vec<Vec<(u64, u64)>> = vec![Vec::new(); o.files.len()];
        for &(ti, start, len) in items.iter().filter(|i| i.2 > 0) {
            let (file, at, s) = o.locate(ti, start);
            reads[file].push((at, (len * (s.dtype.bitsize() / 8)) as u64));
        }
        for (f, reads) in o.files.iter_mut().zip(reads) {
            if let Backing::Remote(object, version, _) = &f.backing {
                f.ahead = Some(ReadAhead::new(
                    object.clone(),
                    version.clone(),
                    reads,
                    piece,
                ));
            }
        }
    }
}

/// Work items in flight when inputs are on object storage (one ranged read each at a time).
const REMOTE_READS: usize = 16;

fn mismatch(path: &Path, recorded: &str, computed: &str) -> PhemaError {
    PhemaError::Store(format!(
        "{}: the data differ from the checksum recorded when it was written (recorded \
         {recorded}, computed {computed}): the file is corrupt or was changed; pass \
         verify=False (--no-verify) to read it anyway",
        path.display()
    ))
}

fn changed(path: &Path) -> PhemaError {
    PhemaError::Store(format!(
        "{} changed since it was listed; list it again",
        path.display()
    ))
}

/// Opens the file `header` was listed from. It may have been changed or replaced since: its
/// header is read again from the opened file (all later reads are of that file) and must be the
/// one listed, its metadata (with the checksum of its contents) included.
///
/// An object is read from the version its header was listed from, which nothing can change: its
/// header JSON (for the checksum) is one ranged read.
fn open(header: &Header) -> Result<OpenFile> {
    let path = &header.path;
    if let Some(url) = path.to_str().filter(|p| is_url(p)) {
        let object = Object::parse(url)?;
        let data: u64 = header.tensors.iter().map(|t| t.nbytes).sum();
        let end = header.file_size.saturating_sub(data);
        let mut json = vec![0u8; end.saturating_sub(8) as usize];
        object.read_at(8, &mut json, header.version.as_deref())?;
        return Ok(OpenFile {
            backing: Backing::Remote(object, header.version.clone(), header.file_size),
            ahead: None,
            path: path.clone(),
            json,
            check: None,
        });
    }
    let file = open_regular(path)?;
    let (now, json) = read_open(path, &file)?;
    if now.tensors != header.tensors
        || now.file_size != header.file_size
        || now.metadata != header.metadata
    {
        return Err(changed(path));
    }
    Ok(OpenFile {
        backing: Backing::Local(file),
        ahead: None,
        path: path.clone(),
        json,
        check: None,
    })
}

/// Starts the checksum check of every file of `o` that records one: `o` is read whole.
fn check_all(o: &mut Opened, headers: &[Header]) -> Result<()> {
    for (f, h) in o.files.iter_mut().zip(headers) {
        let Some(recorded) = h.metadata.get(CHECKSUM) else {
            continue;
        };
        let check = InOrder::new(&f.json, recorded.clone())
            .ok_or_else(|| mismatch(&f.path, recorded, NOT_IN_PLACE))?;
        f.check = Some(check);
    }
    Ok(())
}

/// Hashes the rest of `f`, whose checksum is being checked, and compares.
fn finish_check(f: &OpenFile, check: &InOrder) -> Result<()> {
    match check.finish(f.size()?, |at, b| read_at(f, at, b))? {
        Verified::Mismatch { recorded, computed } => Err(mismatch(&f.path, &recorded, &computed)),
        Verified::Ok | Verified::NotRecorded => Ok(()),
    }
}

/// Lets this process hold `needed` more open files: every input stays open for the whole run,
/// and a long run's store can have more snapshots than the usual soft limit of 1024.
fn allow_open_files(needed: usize) {
    // SAFETY: plain system calls on a stack value.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = (needed as libc::rlim_t).saturating_add(256);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Combines `inputs` as `plan` says into `sink`: column `c` of the plan is
/// `sum_i weights[i][c] * input_i`, and every output tensor takes the column its route names.
///
/// Inputs whose weight is zero in every column are never read, but for input `copy_from`
/// (default: the last input read), whose non-float tensors are copied to every output; they are
/// compared with every input read, and the names of those that differ are returned in the stats.
pub fn combine(
    inputs: &[Source],
    plan: &Plan,
    sink: &dyn Sink,
    progress: &Progress,
) -> Result<Stats> {
    let weights = &plan.weights;
    let n_columns = plan.columns();
    let n_outputs = plan.outputs();
    check_weights(inputs, weights, n_columns)?;
    let used: Vec<usize> = (0..inputs.len())
        .filter(|&i| weights[i].iter().any(|&w| w != 0.0))
        .collect();
    let Some(&first) = used.first() else {
        return Err(PhemaError::Invalid(
            "every weight is zero: nothing to combine".into(),
        ));
    };
    let copy_from = plan.copy_from.unwrap_or(used[used.len() - 1]);
    if copy_from >= inputs.len() {
        return Err(PhemaError::Invalid(format!(
            "input {copy_from} to copy non-float tensors from does not exist ({} inputs)",
            inputs.len()
        )));
    }
    let layout = layout_of(&inputs[first])?;
    plan.check_routes(&layout)?;
    allow_open_files(used.iter().map(|&i| inputs[i].files.len()).sum());
    let wanted: Vec<Vec<usize>> = (0..layout.len())
        .map(|ti| (0..n_outputs).filter(|&k| sink.wants(k, ti)).collect())
        .collect();
    let read_all = wanted.iter().all(|o| !o.is_empty());
    // Checksums are verified where whole files are read anyway: when every tensor is wanted.
    let verify = read_all && !plan.skip_verify;
    let mut opened = Vec::with_capacity(used.len());
    for &i in &used {
        let segments = inputs[i].align(&layout)?;
        let files = inputs[i]
            .files
            .iter()
            .map(open)
            .collect::<Result<Vec<_>>>()?;
        let mut o = Opened { files, segments };
        if verify {
            check_all(&mut o, &inputs[i].files)?;
        }
        opened.push(o);
    }
    // Non-float tensors (step counters, masks) cannot be averaged: they come from one input,
    // read for them alone when none of its float data is needed.
    let raw_only = if used.contains(&copy_from) {
        None
    } else {
        let files = inputs[copy_from]
            .files
            .iter()
            .map(open)
            .collect::<Result<Vec<_>>>()?;
        Some(Opened {
            files,
            segments: inputs[copy_from].align(&layout)?,
        })
    };
    let items = work_items(&layout, &opened, sink, &wanted);
    plan_read_ahead(&mut opened, &items);
    let raw_source = match &raw_only {
        Some(o) => o,
        None => &opened[used.iter().position(|&u| u == copy_from).unwrap_or(0)],
    };
    // Weights as f32, `[input][column]`, and the kernel chosen for this CPU.
    let w: Vec<f32> = used
        .iter()
        .flat_map(|&i| weights[i].iter().map(|&x| x as f32))
        .collect();
    let isa = Isa::detect();
    let kernel = Kernel::new(isa, &w, opened.len(), n_columns);
    let mismatched = std::sync::Mutex::new(Vec::new());
    let flagged: Vec<AtomicBool> = layout.iter().map(|_| AtomicBool::new(false)).collect();
    // Scratch buffers outlive rayon's splits: one per concurrently running item, reused.
    let pool: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());
    let run = |index: usize, &(ti, start, len): &(usize, usize, usize)| -> Result<()> {
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(PhemaError::Cancelled);
        }
        let outputs = &wanted[ti];
        if !is_float(layout[ti].dtype) {
            let bytes = raw_source.whole(ti)?;
            for o in &opened {
                if o.whole(ti)? != bytes {
                    if let Ok(mut v) = mismatched.lock() {
                        v.push(layout[ti].name.clone());
                    }
                    break;
                }
            }
            for &k in outputs {
                sink.put_raw(k, ti, &bytes)?;
            }
            return Ok(());
        }
        let mut scratch = pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        let item = Item {
            index,
            tensor: ti,
            start,
            len,
            outputs,
        };
        let result = combine_chunk(&opened, &kernel, plan, &item, &mut scratch, sink);
        if let Ok(mut p) = pool.lock() {
            p.push(scratch);
        }
        let (read, nonfinite) = result?;
        if nonfinite {
            flagged[ti].store(true, Ordering::Relaxed);
        }
        progress.bytes_done.fetch_add(read, Ordering::Relaxed);
        Ok(())
    };
    // Items are handed out in order, one at a time to whichever thread is free, so each file is
    // read front to back but for the few items in flight: its checksum is then computed as it
    // is read.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> Result<()> {
        while !failed.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(index) else {
                break;
            };
            run(index, item).inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
        }
        Ok(())
    };
    let remote = opened
        .iter()
        .flat_map(|o| &o.files)
        .any(|f| matches!(f.backing, Backing::Remote(..)));
    if remote {
        // Object storage answers each request after a round trip: its throughput needs many
        // requests in flight, more than there are cores; each worker waits on one at a time.
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..REMOTE_READS).map(|_| scope.spawn(worker)).collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(PhemaError::Invalid("a reader thread failed".into())))
            })
        })?;
    } else {
        (0..rayon::current_num_threads())
            .into_par_iter()
            .try_for_each(|_| worker())?;
    }
    opened
        .par_iter()
        .flat_map(|o| &o.files)
        .try_for_each(|f| f.check.as_ref().map_or(Ok(()), |c| finish_check(f, c)))?;
    // A cancel that came after the last item still means: commit nothing.
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(PhemaError::Cancelled);
    }
    let mut raw_mismatch = mismatched.into_inner().unwrap_or_default();
    raw_mismatch.sort();
    let nonfinite = layout
        .iter()
        .zip(&flagged)
        .filter(|(_, f)| f.load(Ordering::Relaxed))
        .map(|(t, _)| t.name.clone())
        .collect();
    Ok(Stats {
        bytes_read: if read_all {
            used.iter().map(|&i| inputs[i].size()).sum()
        } else {
            progress.bytes_done.load(Ordering::Relaxed)
        },
        read: used,
        raw_mismatch,
        nonfinite,
    })
}

/// Checks that `weights` is an `inputs x n_columns` matrix of finite numbers.
fn check_weights(inputs: &[Source], weights: &[Vec<f64>], n_columns: usize) -> Result<()> {
    if weights.len() != inputs.len()
        || n_columns == 0
        || weights.iter().any(|w| w.len() != n_columns)
    {
        return Err(PhemaError::Invalid(format!(
            "weights must be {} x (targets), at least one target, not {} rows of {:?} columns",
            inputs.len(),
            weights.len(),
            weights.iter().map(Vec::len).max().unwrap_or(0)
        )));
    }
    if let Some(bad) = weights.iter().flatten().find(|w| !w.is_finite()) {
        return Err(PhemaError::Invalid(format!("weight {bad} is not finite")));
    }
    Ok(())
}

/// The tensor layout [`combine`] gives its outputs for these weights: that of the first input
/// with a non-zero weight.
pub fn output_layout(inputs: &[Source], weights: &[Vec<f64>]) -> Result<Vec<TensorEntry>> {
    check_weights(inputs, weights, weights.first().map_or(0, Vec::len))?;
    let first = weights
        .iter()
        .position(|r| r.iter().any(|&x| x != 0.0))
        .ok_or_else(|| PhemaError::Invalid("every weight is zero: nothing to combine".into()))?;
    layout_of(&inputs[first])
}

/// Input and output bytes one work item holds, so that with the staged block it stays in L2.
const ITEM_BYTES: usize = 1 << 19;
/// Fewest elements per item, so each read stays large when there are very many inputs.
const MIN_ITEM: usize = 4096;

/// Work items `(tensor, first element, element count)`: float tensors cut where any input's
/// segment ends and into pieces whose input and output bytes fit [`ITEM_BYTES`] (at least
/// [`MIN_ITEM`], at most [`CHUNK`] elements), so each item lies in one segment of every input;
/// non-float tensors whole, as `(tensor, 0, 0)`. Tensors no output wants have none.
fn work_items(
    layout: &[TensorEntry],
    opened: &[Opened],
    sink: &dyn Sink,
    wanted: &[Vec<usize>],
) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::new();
    for (ti, t) in layout.iter().enumerate() {
        if wanted[ti].is_empty() {
            continue;
        }
        if !is_float(t.dtype) {
            items.push((ti, 0, 0));
            continue;
        }
        let per_elem: usize = opened
            .iter()
            .map(|o| {
                o.segments[ti]
                    .iter()
                    .map(|s| s.dtype.bitsize() / 8)
                    .max()
                    .unwrap_or(4)
            })
            .chain(wanted[ti].iter().map(|&k| sink.dtype(k, ti).bitsize() / 8))
            .sum();
        let step = (ITEM_BYTES / per_elem.max(1) / BLOCK * BLOCK).clamp(MIN_ITEM, CHUNK);
        let mut cuts: Vec<usize> = opened
            .iter()
            .flat_map(|o| o.segments[ti].iter().map(|s| s.start))
            .chain([t.numel()])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for pair in cuts.windows(2) {
            let mut start = pair[0];
            while start < pair[1] {
                let len = step.min(pair[1] - start);
                items.push((ti, start, len));
                start += len;
            }
        }
    }
    items
}

/// Per-item buffers, reused from item to item.
#[derive(Default)]
struct Scratch {
    /// The item's bytes of every input.
    raw: Vec<Vec<u8>>,
    /// One block of every input decoded to f32, `[input][block]`.
    staged: Vec<f32>,
    /// One block of every target, `[target][block]`.
    block: Vec<f32>,
    /// The item of every target encoded as the sink wants it, target after target.
    out: Vec<u8>,
}

/// Floats of decoded input staged per block: the block of every input stays in L1/L2 while
/// each group of targets sweeps it.
const STAGE_FLOATS: usize = 1 << 15;

/// Elements per block for `n_inputs` inputs: at most [`BLOCK`], a multiple of 16.
fn block_len(n_inputs: usize) -> usize {
    (STAGE_FLOATS / n_inputs.max(1) / 16 * 16).clamp(16, BLOCK)
}

/// One work item: elements `start..start + len` of float tensor `tensor`, for `outputs`.
struct Item<'a> {
    /// Its place in the order items are handed out.
    index: usize,
    tensor: usize,
    start: usize,
    len: usize,
    outputs: &'a [usize],
}

/// One work item for every output that wants it, handed to `sink`. Returns the snapshot bytes
/// read and whether an output element is NaN or infinite.
fn combine_chunk(
    opened: &[Opened],
    kernel: &Kernel,
    plan: &Plan,
    item: &Item,
    scratch: &mut Scratch,
    sink: &dyn Sink,
) -> Result<(u64, bool)> {
    let &Item {
        index,
        tensor: ti,
        start,
        len,
        outputs,
    } = item;
    let nm = opened.len();
    let kk = kernel.n_targets;
    let bs = block_len(nm);
    let Scratch {
        raw,
        staged,
        block,
        out,
    } = scratch;
    raw.resize_with(nm, Vec::new);
    staged.resize(nm * bs, 0.0);
    block.resize(kk * bs, 0.0);
    // Each item starts reading one input before the previous item did: a thread on the next
    // item, started at the same time, reads every file but one a step after this one, so the
    // pieces of each file mostly reach its checksum in file order (not read again for it) and
    // the threads seldom want the same file's lock at once.
    let mut dtypes = vec![Dtype::F32; nm];
    for j in 0..nm {
        let i = (j + nm - index % nm) % nm;
        dtypes[i] = opened[i].read(ti, start, len, &mut raw[i])?;
    }
    // Where each output's encoded item starts in `out`, and the column it takes.
    let mut spans = Vec::with_capacity(outputs.len());
    let mut end = 0;
    for &k in outputs {
        let dtype = sink.dtype(k, ti);
        let size = dtype.bitsize() / 8;
        spans.push((end, dtype, size, plan.column(k, ti)));
        end += len * size;
    }
    out.resize(end, 0);
    let mut b0 = 0;
    while b0 < len {
        let bl = bs.min(len - b0);
        for ((dtype, bytes), x) in dtypes
            .iter()
            .zip(raw.iter())
            .zip(staged.chunks_exact_mut(bs))
        {
            let size = dtype.bitsize() / 8;
            decode(
                kernel.isa != Isa::Portable,
                *dtype,
                &bytes[b0 * size..(b0 + bl) * size],
                &mut x[..bl],
            );
        }
        kernel.run(staged, bs, bl, block, bs, 0);
        // Encoded while the block is in L1: the item's f32 results are never stored whole.
        for &(at, dtype, size, c) in &spans {
            let dst = &mut out[at + b0 * size..at + (b0 + bl) * size];
            encode_into(&block[c * bs..c * bs + bl], dtype, dst);
        }
        b0 += bl;
    }
    let mut nonfinite = false;
    for (&k, &(at, dtype, size, _)) in outputs.iter().zip(&spans) {
        let bytes = &out[at..at + len * size];
        nonfinite |= has_nonfinite(dtype, bytes);
        sink.put(k, ti, start, bytes)?;
    }
    Ok((raw[..nm].iter().map(|b| b.len() as u64).sum(), nonfinite))
}

/// The tensor layout outputs follow: the (global) tensors of `source` in file order.
pub fn layout_of(source: &Source) -> Result<Vec<TensorEntry>> {
    Ok(source.layout()?.into_iter().map(|(t, _)| t).collect())
}

/// The instruction set the kernels use, chosen once per run from what the CPU has. Every choice
/// gives bit-identical results: each output element is `fma(x_i, w_ik, acc)` over the inputs `i`
/// in the same order, skipping zero weights, starting from `+0.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Plain Rust (`f32::mul_add`), any CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C: 8 elements x up to 8 targets in `ymm` registers.
    Avx2,
    /// x86-64 AVX-512F (with the AVX2 + F16C decoders): 32 elements x up to 8 targets in `zmm`.
    Avx512,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Targets accumulated in registers at once.
    fn group(self) -> usize {
        8
    }

    /// The instruction sets this CPU can run, for tests.
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Avx512 => vec![Isa::Portable, Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => vec![Isa::Portable, Isa::Avx2],
            Isa::Portable => vec![Isa::Portable],
        }
    }
}

/// The weights arranged for the micro-kernels.
struct Kernel {
    isa: Isa,
    n_targets: usize,
    /// `[input][target]`.
    w: Vec<f32>,
    /// Target groups `(first target, count, per input: every weight of the group non-zero)`.
    groups: Vec<(usize, usize, Vec<bool>)>,
}

impl Kernel {
    fn new(isa: Isa, w: &[f32], n_inputs: usize, n_targets: usize) -> Kernel {
        let mut groups = Vec::new();
        let mut k0 = 0;
        while k0 < n_targets {
            let width = isa.group().min(n_targets - k0);
            let dense = (0..n_inputs)
                .map(|m| {
                    w[m * n_targets + k0..m * n_targets + k0 + width]
                        .iter()
                        .all(|&x| x != 0.0)
                })
                .collect();
            groups.push((k0, width, dense));
            k0 += width;
        }
        Kernel {
            isa,
            n_targets,
            w: w.to_vec(),
            groups,
        }
    }

    /// Elements `b0..b0 + bl` of every target's row (`rows[k * len..]`) from the staged block.
    fn run(&self, staged: &[f32], bs: usize, bl: usize, rows: &mut [f32], len: usize, b0: usize) {
        let kk = self.n_targets;
        let n_inputs = self.w.len() / kk.max(1);
        // The kernels index with these bounds; checked once per block.
        assert!(
            bs.is_multiple_of(16)
                && bl <= bs
                && staged.len() >= n_inputs * bs
                && b0 + bl <= len
                && rows.len() >= kk * len
        );
        let mut b = Block {
            staged,
            bs,
            bl,
            rows,
            len,
            b0,
        };
        for (k0, width, dense) in &self.groups {
            debug_assert_eq!(dense.len(), n_inputs);
            let g = Group {
                w: &self.w,
                kk,
                k0: *k0,
                dense,
            };
            // One monomorphized kernel per group width (groups hold 1 to 8 targets).
            #[cfg(target_arch = "x86_64")]
            macro_rules! tiled {
                ($kernel:ident: $($n:literal)*) => {
                    match width {
                        // SAFETY: `Isa::detect` chose this ISA only where the CPU has its
                        // features; the bounds were checked above and `k0 + width <= kk`.
                        $($n => unsafe { $kernel::<$n>(&mut b, &g) },)*
                        _ => unreachable!("groups hold 1 to 8 targets"),
                    }
                };
            }
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => tiled!(tile_avx2: 1 2 3 4 5 6 7 8),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => tiled!(tile_avx512: 1 2 3 4 5 6 7 8),
                _ => tile_portable(&mut b, &g, *width),
            }
        }
    }
}

/// One block of the staged inputs and the target rows it fills.
struct Block<'a> {
    /// `[input][bs]`, the first `bl` of each row valid.
    staged: &'a [f32],
    bs: usize,
    bl: usize,
    /// `[target][len]`.
    rows: &'a mut [f32],
    len: usize,
    b0: usize,
}

/// The targets `k0..k0 + width` of `kk`, with their weights `w[input * kk + k]`.
struct Group<'a> {
    w: &'a [f32],
    kk: usize,
    k0: usize,
    dense: &'a [bool],
}

fn tile_portable(b: &mut Block, g: &Group, width: usize) {
    for j in 0..b.bl {
        for t in 0..width {
            let mut acc = 0.0f32;
            for m in 0..g.dense.len() {
                let wt = g.w[m * g.kk + g.k0 + t];
                if wt != 0.0 {
                    acc = b.staged[m * b.bs + j].mul_add(wt, acc);
                }
            }
            b.rows[(g.k0 + t) * b.len + b.b0 + j] = acc;
        }
    }
}

/// `T` targets x 8 elements accumulated in registers over every input.
///
/// # Safety
/// AVX2 and FMA must be available; `Kernel::run`'s bounds must hold and `k0 + T <= kk`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const T: usize>(b: &mut Block, g: &Group) {
    use std::arch::x86_64::*;
    let xs = b.staged.as_ptr();
    let wp = g.w.as_ptr().add(g.k0);
    let out = b.rows.as_mut_ptr().add(g.k0 * b.len + b.b0);
    let mut e = 0;
    while e < b.bl {
        let mut acc = [_mm256_setzero_ps(); T];
        for (m, &dense) in g.dense.iter().enumerate() {
            // SAFETY: m < n_inputs and e + 8 <= bs (bs is a multiple of 16, e < bl <= bs and
            // e is a multiple of 8): inside `staged`. The weights read are `w[m*kk + k0 + t]`
            // with `k0 + t < kk`.
            let x = _mm256_loadu_ps(xs.add(m * b.bs + e));
            let wm = wp.add(m * g.kk);
            if dense {
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*wm.add(t)), x, *a);
                }
            } else {
                for (t, a) in acc.iter_mut().enumerate() {
                    let wt = *wm.add(t);
                    if wt != 0.0 {
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(wt), x, *a);
                    }
                }
            }
        }
        let n = (b.bl - e).min(8);
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: row k0 + t < kk, elements b0 + e..b0 + e + n <= b0 + bl <= len.
            let dst = out.add(t * b.len + e);
            if n == 8 {
                _mm256_storeu_ps(dst, *a);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
            }
        }
        e += 8;
    }
}

/// `T` targets x 32 elements (two `zmm` per target) accumulated over every input: each
/// broadcast weight feeds two FMAs, so the loads keep up with both FMA pipes. A block length
/// that is an odd multiple of 16 ends with one 16-element step.
///
/// # Safety
/// AVX-512F must be available; `Kernel::run`'s bounds must hold and `k0 + T <= kk`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const T: usize>(b: &mut Block, g: &Group) {
    let mut e = 0;
    while e < b.bl {
        if e + 32 <= b.bs {
            step_avx512::<T, 2>(b, g, e);
            e += 32;
        } else {
            step_avx512::<T, 1>(b, g, e);
            e += 16;
        }
    }
}

/// Elements `e..e + 16 V` of `T` targets, `V` vectors per target in registers.
///
/// # Safety
/// As [`tile_avx512`], and `e + 16 V <= bs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn step_avx512<const T: usize, const V: usize>(b: &mut Block, g: &Group, e: usize) {
    use std::arch::x86_64::*;
    let xs = b.staged.as_ptr();
    let wp = g.w.as_ptr().add(g.k0);
    let mut acc = [[_mm512_setzero_ps(); V]; T];
    for (m, &dense) in g.dense.iter().enumerate() {
        // SAFETY: m < n_inputs and e + 16 V <= bs: inside `staged`. The weights read are
        // `w[m*kk + k0 + t]` with `k0 + t < kk`.
        let row = xs.add(m * b.bs + e);
        let x: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(row.add(16 * v)));
        let wm = wp.add(m * g.kk);
        // Branch-free when no weight of the group is zero; else zeros are skipped, as the
        // portable loop does.
        if dense {
            for (t, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*wm.add(t));
                for (a, x) in a.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(*x, w, *a);
                }
            }
        } else {
            for (t, a) in acc.iter_mut().enumerate() {
                let wt = *wm.add(t);
                if wt != 0.0 {
                    let w = _mm512_set1_ps(wt);
                    for (a, x) in a.iter_mut().zip(&x) {
                        *a = _mm512_fmadd_ps(*x, w, *a);
                    }
                }
            }
        }
    }
    let out = b.rows.as_mut_ptr().add(g.k0 * b.len + b.b0 + e);
    let n = b.bl - e;
    for (t, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            // SAFETY: row k0 + t < kk; elements b0 + e + 16 v.. up to b0 + bl <= len.
            let dst = out.add(t * b.len + 16 * v);
            let lanes = n.saturating_sub(16 * v);
            if lanes >= 16 {
                _mm512_storeu_ps(dst, *a);
            } else if lanes > 0 {
                _mm512_mask_storeu_ps(dst, ((1u32 << lanes) - 1) as u16, *a);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::read_header;
    use crate::writer::{write_snapshot, TensorData};
    use half::{bf16, f16};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Collects outputs in memory, as f32.
    pub(crate) struct VecSink(pub(crate) Mutex<Vec<Vec<Vec<f32>>>>);
    impl Sink for VecSink {
        fn dtype(&self, _: usize, _: usize) -> Dtype {
            Dtype::F32
        }
        fn put(&self, k: usize, t: usize, off: usize, b: &[u8]) -> Result<()> {
            let mut g = self.0.lock().unwrap();
            for (o, c) in g[k][t][off..].iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Ok(())
        }
        fn put_raw(&self, k: usize, t: usize, b: &[u8]) -> Result<()> {
            let mut g = self.0.lock().unwrap();
            g[k][t] = b.iter().map(|&x| x as f32).collect();
            Ok(())
        }
    }

    #[test]
    fn combination_matches_direct_sum_in_f64() {
        let dir = tempfile::tempdir().unwrap();
        let n = CHUNK + 1000; // crosses a chunk boundary
        let mut headers = Vec::new();
        let mut values = Vec::new();
        for i in 0..4 {
            let a: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i * 13) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..6).map(|j| (i * j) as f32).collect();
            let p = dir.path().join(format!("{i}.safetensors"));
            let dtype = if i == 2 { Dtype::BF16 } else { Dtype::F16 };
            let step = [i as u8];
            write_snapshot(
                &p,
                &[
                    ("a".into(), vec![n], TensorData::F32(&a)),
                    ("b".into(), vec![2, 3], TensorData::F32(&b)),
                    ("step".into(), vec![1], TensorData::Raw(Dtype::U8, &step)),
                ],
                dtype,
                &BTreeMap::new(),
            )
            .unwrap();
            headers.push(Source::single(read_header(&p).unwrap()));
            values.push((a, b, dtype));
        }
        let weights = vec![
            vec![0.5, 0.0],
            vec![0.0, 0.0],
            vec![-1.5, 1.0],
            vec![2.0, 0.25],
        ];
        let sink = VecSink(Mutex::new(vec![
            vec![vec![0.0; n], vec![0.0; 6], vec![]];
            2
        ]));
        let plan = Plan::new(weights.clone(), None);
        let stats = combine(&headers, &plan, &sink, &Progress::default()).unwrap();
        assert_eq!(stats.read, vec![0, 2, 3]);
        assert_eq!(stats.raw_mismatch, vec!["step".to_string()]);
        let out = sink.0.into_inner().unwrap();
        let round = |x: f32, d: Dtype| match d {
            Dtype::BF16 => bf16::from_f32(x).to_f32() as f64,
            _ => f16::from_f32(x).to_f32() as f64,
        };
        for k in 0..2 {
            for j in (0..n).step_by(997) {
                let want: f64 = (0..4)
                    .map(|i| weights[i][k] * round(values[i].0[j], values[i].2))
                    .sum();
                assert!((out[k][0][j] as f64 - want).abs() < 1e-5, "{k} {j}");
            }
            assert_eq!(out[k][2], vec![3.0]); // copied from the last input read
        }
    }

    #[test]
    fn a_file_shrinking_while_read_is_an_error_naming_it_not_a_crash() {
        // Mapped, this read would raise SIGBUS and kill the process (a Python interpreter
        // with it); read with pread it is an ordinary error.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let a = vec![0.5f32; 5000];
        write_snapshot(
            &p,
            &[("a".into(), vec![a.len()], TensorData::F32(&a))],
            Dtype::F16,
            &BTreeMap::new(),
        )
        .unwrap();
        let h = read_header(&p).unwrap();
        let source = Source::single(h.clone());
        let opened = Opened {
            files: vec![open(&h).unwrap()],
            segments: source.align(&layout_of(&source).unwrap()).unwrap(),
        };
        let mut buf = Vec::new();
        assert_eq!(opened.read(0, 0, 5000, &mut buf).unwrap(), Dtype::F16);
        assert!(buf
            .chunks(2)
            .all(|c| f16::from_le_bytes([c[0], c[1]]).to_f32() == 0.5));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(h.file_size / 2)
            .unwrap();
        let err = opened.read(0, 0, 5000, &mut buf).unwrap_err().to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("changed"),
            "{err}"
        );
    }

    fn two_tensor_snapshot(p: &Path, scale: f32) -> Source {
        let a: Vec<f32> = (0..CHUNK + 3000)
            .map(|j| (j % 113) as f32 * scale)
            .collect();
        let step = [7u8, 0, 0, 0, 0, 0, 0, 0];
        let meta = BTreeMap::from([("phema.t".to_string(), "100".to_string())]);
        write_snapshot(
            p,
            &[
                ("a".into(), vec![a.len()], TensorData::F32(&a)),
                ("step".into(), vec![1], TensorData::Raw(Dtype::I64, &step)),
            ],
            Dtype::F16,
            &meta,
        )
        .unwrap();
        Source::single(read_header(p).unwrap())
    }

    #[test]
    fn a_changed_data_byte_is_an_error_naming_the_file_unless_verification_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let inputs: Vec<Source> = (0..3)
            .map(|i| two_tensor_snapshot(&dir.path().join(format!("{i}.st")), 0.01 * i as f32))
            .collect();
        let n = inputs[0].files[0]
            .tensors
            .iter()
            .map(|t| t.numel())
            .max()
            .unwrap();
        let run = |skip_verify: bool| {
            let sink = VecSink(Mutex::new(vec![vec![vec![0.0; n], vec![]]]));
            let mut plan = Plan::new(vec![vec![0.25], vec![0.25], vec![0.5]], None);
            plan.skip_verify = skip_verify;
            combine(&inputs, &plan, &sink, &Progress::default())
                .map(|_| sink.0.into_inner().unwrap())
        };
        let clean = run(false).unwrap();
        // One bit of one element in the middle of the second file's data.
        let h = &inputs[1].files[0];
        let a = h.tensors.iter().find(|t| t.name == "a").unwrap();
        let at = a.offset + 2 * 70000;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&h.path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
        let err = run(false).unwrap_err().to_string();
        assert!(err.contains("1.st") && err.contains("checksum"), "{err}");
        let dirty = run(true).unwrap();
        let i = 70000 - a.offset as usize % 2;
        assert_ne!(clean[0][0][i], dirty[0][0][i]);
    }

    #[test]
    fn a_file_replaced_after_listing_by_one_of_the_same_size_and_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.st");
        let listed = two_tensor_snapshot(&p, 0.5);
        std::fs::remove_file(&p).unwrap();
        let now = two_tensor_snapshot(&p, 0.25);
        assert_eq!(now.files[0].tensors, listed.files[0].tensors);
        assert_eq!(now.files[0].file_size, listed.files[0].file_size);
        let n = listed.files[0]
            .tensors
            .iter()
            .map(|t| t.numel())
            .max()
            .unwrap();
        let sink = VecSink(Mutex::new(vec![vec![vec![0.0; n], vec![]]]));
        let mut plan = Plan::new(vec![vec![1.0]], None);
        plan.skip_verify = true;
        let err = combine(&[listed], &plan, &sink, &Progress::default()).unwrap_err();
        assert!(
            err.to_string().contains("x.st") && err.to_string().contains("changed"),
            "{err}"
        );
    }

    #[test]
    fn a_file_changed_after_listing_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let a = vec![1.0f32; 10];
        let write = |v: &[f32]| {
            // Snapshots are never written over: another writer replaces the file.
            let _ = std::fs::remove_file(&p);
            write_snapshot(
                &p,
                &[("a".into(), vec![v.len()], TensorData::F32(v))],
                Dtype::F16,
                &BTreeMap::new(),
            )
            .unwrap()
        };
        write(&a);
        let h = read_header(&p).unwrap();
        write(&a[..5]);
        let sink = VecSink(Mutex::new(vec![vec![vec![0.0; 10]]]));
        let plan = Plan::new(vec![vec![1.0]], None);
        let err = combine(&[Source::single(h)], &plan, &sink, &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("x.safetensors"), "{err}");
    }

    #[test]
    fn every_instruction_set_gives_bit_identical_results() {
        // 23 inputs x 21 targets (groups of 8 plus a remainder), zero weights scattered
        // (skipped, as the reference loop does), a length that is not a multiple of 16; then
        // 150 inputs, whose block length of 13 x 16 ends the AVX-512 kernel with a half step.
        bit_identical_across_instruction_sets(23, 21, 300);
        assert_eq!(block_len(150) % 32, 16);
        bit_identical_across_instruction_sets(150, 9, 500);
    }

    fn bit_identical_across_instruction_sets(nm: usize, kk: usize, len: usize) {
        let bs = block_len(nm);
        let mut w = vec![0f32; nm * kk];
        for (i, x) in w.iter_mut().enumerate() {
            if i % 7 != 3 {
                *x = ((i * 37 % 101) as f32 - 50.0) / 17.0;
            }
        }
        for k in 0..kk {
            w[5 * kk + k] = 0.0; // one input unused by every target
        }
        let bytes: Vec<Vec<u8>> = (0..nm)
            .map(|m| {
                (0..len)
                    .flat_map(|j| {
                        let v = ((j * 31 + m * 7) % 97) as f32 / 13.0 - 3.5;
                        if m % 2 == 0 {
                            f16::from_f32(v).to_le_bytes()
                        } else {
                            bf16::from_f32(v).to_le_bytes()
                        }
                    })
                    .collect()
            })
            .collect();
        let run = |isa: Isa| {
            let kernel = Kernel::new(isa, &w, nm, kk);
            let mut staged = vec![0f32; nm * bs];
            let mut rows = vec![f32::NAN; kk * len];
            let mut b0 = 0;
            while b0 < len {
                let bl = bs.min(len - b0);
                for (m, x) in staged.chunks_exact_mut(bs).enumerate() {
                    let dtype = if m % 2 == 0 { Dtype::F16 } else { Dtype::BF16 };
                    decode(
                        isa != Isa::Portable,
                        dtype,
                        &bytes[m][b0 * 2..(b0 + bl) * 2],
                        &mut x[..bl],
                    );
                }
                kernel.run(&staged, bs, bl, &mut rows, len, b0);
                b0 += bl;
            }
            rows
        };
        // The reference: the pre-tiling loop order (inputs outer, fma per target, zeros skipped).
        let mut want = vec![0f32; kk * len];
        for m in 0..nm {
            for j in 0..len {
                let c = [bytes[m][2 * j], bytes[m][2 * j + 1]];
                let x = if m % 2 == 0 {
                    f16::from_le_bytes(c).to_f32()
                } else {
                    bf16::from_le_bytes(c).to_f32()
                };
                for k in 0..kk {
                    let wk = w[m * kk + k];
                    if wk != 0.0 {
                        want[k * len + j] = x.mul_add(wk, want[k * len + j]);
                    }
                }
            }
        }
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        for isa in Isa::available() {
            let got: Vec<u32> = run(isa).iter().map(|x| x.to_bits()).collect();
            assert!(got == want, "{isa:?} differs");
        }
    }

    fn one_tensor_file(dir: &Path, name: &str, values: &[f32], dtype: Dtype) -> Source {
        let p = dir.join(name);
        write_snapshot(
            &p,
            &[("a".into(), vec![values.len()], TensorData::F32(values))],
            dtype,
            &BTreeMap::new(),
        )
        .unwrap();
        Source::single(read_header(&p).unwrap())
    }

    #[test]
    fn outputs_that_overflow_fp16_or_hold_nan_are_reported_by_name() {
        use crate::writer::{FileSink, OutputRequest};
        let dir = tempfile::tempdir().unwrap();
        // Kept in fp32 by the snapshot writer: 70000 does not fit fp16.
        let big = one_tensor_file(
            dir.path(),
            "big.safetensors",
            &[1.0, 70000.0, 2.0],
            Dtype::F16,
        );
        let small = one_tensor_file(
            dir.path(),
            "small.safetensors",
            &[1.0, 2.0, 3.0],
            Dtype::F16,
        );
        let run = |inputs: &[Source], dtype: Dtype| {
            let out = dir.path().join(format!("out-{dtype:?}.safetensors"));
            let requests = [OutputRequest {
                path: out,
                dtype,
                metadata: BTreeMap::new(),
                shard_size: None,
                shard: None,
                stem: None,
            }];
            let w: Vec<Vec<f64>> = inputs.iter().map(|_| vec![1.0]).collect();
            let sink = FileSink::create(&layout_of(&inputs[0]).unwrap(), &requests).unwrap();
            // The NaN is written behind the writer's back: its checksum no longer matches.
            let mut plan = Plan::new(w, None);
            plan.skip_verify = true;
            let stats = combine(inputs, &plan, &sink, &Progress::default()).unwrap();
            sink.finish(&AtomicBool::new(false)).unwrap();
            stats.nonfinite
        };
        assert_eq!(
            run(std::slice::from_ref(&big), Dtype::F16),
            vec!["a".to_string()]
        );
        assert!(run(std::slice::from_ref(&big), Dtype::F32).is_empty());
        assert!(run(&[small.clone(), small.clone()], Dtype::F16).is_empty());
        // NaN in a snapshot's data (written behind the writer's back) passes to every output.
        let p = dir.path().join("nan.safetensors");
        std::fs::copy(&small.files[0].path, &p).unwrap();
        let h = read_header(&p).unwrap();
        let nan = f16::NAN.to_le_bytes();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&nan, h.tensors[0].offset + 2)
            .unwrap();
        let nan = Source::single(h);
        assert_eq!(run(&[small, nan], Dtype::BF16), vec!["a".to_string()]);
    }

    #[test]
    fn cancellation_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = one_tensor_file(dir.path(), "a.safetensors", &[1.0; 10], Dtype::F16);
        let sink = VecSink(Mutex::new(vec![vec![vec![0.0; 10]]]));
        let progress = Progress::default();
        progress.cancel.store(true, Ordering::Relaxed);
        let plan = Plan::new(vec![vec![1.0]], None);
        let err = combine(&[s], &plan, &sink, &progress).unwrap_err();
        assert!(matches!(err, PhemaError::Cancelled), "{err}");
    }

    #[test]
    fn a_weight_matrix_of_the_wrong_shape_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = one_tensor_file(dir.path(), "a.safetensors", &[1.0; 10], Dtype::F16);
        let inputs = [s.clone(), s];
        for w in [
            vec![vec![0.0], vec![0.0], vec![1.0]],
            vec![vec![1.0]],
            vec![vec![1.0], vec![1.0, 2.0]],
            vec![],
        ] {
            let err = output_layout(&inputs, &w).unwrap_err().to_string();
            assert!(err.contains("weights must be 2 x (targets)"), "{err}");
        }
        let err = output_layout(&inputs, &[vec![0.0], vec![0.0]]).unwrap_err();
        assert!(err.to_string().contains("every weight is zero"), "{err}");
        let layout = output_layout(&inputs, &[vec![0.0], vec![2.0]]).unwrap();
        assert_eq!(layout[0].name, "a");
    }
}
