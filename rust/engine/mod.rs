//! The reconstruction engine (docs/design.md): `out_k[name] = sum_i x[i, k] * snapshot_i[name]` for all
//! targets in one pass over the snapshots, read in bounded chunks, spread over all cores.
//!
//! [`source`] opens and reads the inputs, [`simd`] holds the per-element kernels, [`memory`] is
//! the sink for outputs held in memory.

pub mod memory;
mod simd;
pub mod source;

use simd::{Isa, Kernel};
use source::{
    allow_open_files, check_all, finish_check, open, plan_read_ahead, Backing, Opened, REMOTE_READS,
};
pub use source::{layout_of, Source};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{PhemaError, Result};
use crate::format::codec::{decode, encode_into, has_nonfinite};
use crate::format::header::{is_float, TensorEntry};
use crate::format::meta::CHECKSUM;

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
    crate::threads::ensure_pool()?;
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
        opened.push(Opened { files, segments });
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
    let recorded = |j: usize, f: usize| inputs[used[j]].files[f].metadata.contains_key(CHECKSUM);
    plan_read_ahead(&mut opened, &items, |j, f| verify && recorded(j, f))?;
    if verify {
        for (o, &i) in opened.iter_mut().zip(&used) {
            check_all(o, &inputs[i].files)?;
        }
    }
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
            // As many as start (the process or address-space limit may stop some); with none,
            // this thread reads.
            let workers: Vec<_> = (0..REMOTE_READS)
                .map_while(|_| std::thread::Builder::new().spawn_scoped(scope, worker).ok())
                .collect();
            if workers.is_empty() {
                return worker();
            }
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

#[cfg(test)]
pub(crate) mod tests;
