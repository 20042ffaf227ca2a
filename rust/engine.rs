//! The reconstruction engine (SPEC §3): `out_k[name] = sum_i x[i, k] * snapshot_i[name]` for all
//! targets in one pass over the snapshots, streamed in chunks through mmap, spread over all cores.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{PhemaError, Result};
use crate::store::{is_float, read_header, Header, TensorEntry};

/// Elements of one tensor handled by one work item: bounds memory per thread to
/// `targets x CHUNK x 4` bytes, whatever the size of the largest tensor.
pub const CHUNK: usize = 1 << 18;
/// Elements converted at once: small enough that the block and all targets' accumulators for it
/// stay in cache while every snapshot is added.
const BLOCK: usize = 2048;

/// Receives finished pieces of the outputs.
pub trait Sink: Sync {
    /// `values` are elements `elem_offset..` of float tensor `tensor` of target `target`.
    fn put_f32(
        &self,
        target: usize,
        tensor: usize,
        elem_offset: usize,
        values: &[f32],
    ) -> Result<()>;
    /// The bytes of a non-float tensor, copied unchanged into every target.
    fn put_raw(&self, target: usize, tensor: usize, bytes: &[u8]) -> Result<()>;
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
}

/// One input of a combination: a checkpoint held in one safetensors file (a snapshot) or in
/// several (a sharded checkpoint).
#[derive(Clone, Debug)]
pub struct Source {
    /// Its files.
    pub files: Vec<Header>,
}

impl Source {
    /// A single-file source.
    pub fn single(header: Header) -> Self {
        Source {
            files: vec![header],
        }
    }

    /// Every tensor with the index of its file, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorEntry)> {
        self.files
            .iter()
            .enumerate()
            .flat_map(|(f, h)| h.tensors.iter().map(move |t| (f, t)))
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|h| h.file_size).sum()
    }

    /// The files, for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!(
                "{} (and {} more shards)",
                many[0].path.display(),
                many.len() - 1
            ),
        }
    }

    /// This source's tensors in `layout` order, checking names, shapes and kinds agree.
    pub fn align(&self, layout: &[TensorEntry]) -> Result<Vec<(usize, TensorEntry)>> {
        let by_name: std::collections::HashMap<&str, (usize, &TensorEntry)> = self
            .tensors()
            .map(|(f, t)| (t.name.as_str(), (f, t)))
            .collect();
        if by_name.len() > layout.len() {
            let known: std::collections::HashSet<&str> =
                layout.iter().map(|t| t.name.as_str()).collect();
            if let Some(extra) = by_name.keys().find(|n| !known.contains(**n)) {
                return Err(PhemaError::Store(format!(
                    "tensor `{extra}` is in {} but not in the other inputs",
                    self.describe()
                )));
            }
        }
        layout
            .iter()
            .map(|t| {
                let Some(&(f, u)) = by_name.get(t.name.as_str()) else {
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
                        self.files[f].path.display(),
                        t.dtype,
                        t.shape
                    )));
                }
                Ok((f, u.clone()))
            })
            .collect()
    }
}

/// One mapped input with its tensors in `layout` order.
struct Mapped {
    maps: Vec<Mmap>,
    entries: Vec<(usize, TensorEntry)>,
}

impl Mapped {
    fn bytes(&self, tensor: usize, byte_lo: usize, len: usize) -> (&Mmap, &[u8], usize) {
        let (f, e) = &self.entries[tensor];
        let lo = e.offset as usize + byte_lo;
        let map = &self.maps[*f];
        (map, &map[lo..lo + len], lo)
    }
}

fn open(header: &Header) -> Result<Mmap> {
    let changed = || {
        PhemaError::Store(format!(
            "{} changed since it was listed; list it again",
            header.path.display()
        ))
    };
    // The file may have changed since it was listed: re-read its header and compare.
    let now = read_header(&header.path)?;
    if now.tensors != header.tensors || now.file_size != header.file_size {
        return Err(changed());
    }
    let file = File::open(&header.path).map_err(|e| PhemaError::io(&header.path, e))?;
    // SAFETY: the file is only read. A file truncated while mapped would fault; phema writes
    // snapshots by atomic rename, so a live file is never rewritten in place by phema itself.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| PhemaError::io(&header.path, e))?;
    if map.len() as u64 != header.file_size {
        return Err(changed());
    }
    // Chunks visit each file front to back: let the kernel read ahead.
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

/// Combines `inputs` with `weights[i][k]` (input `i`, target `k`) into `sink`.
///
/// Inputs whose weight is zero for every target are never opened. Non-float tensors are copied
/// from input `copy_from` (which must be read; by default the last input read) and compared
/// with every other input read: the names of those that differ are returned in the stats.
pub fn combine(
    inputs: &[Source],
    weights: &[Vec<f64>],
    n_targets: usize,
    copy_from: Option<usize>,
    sink: &dyn Sink,
    progress: &Progress,
) -> Result<Stats> {
    if weights.len() != inputs.len() || weights.iter().any(|w| w.len() != n_targets) {
        return Err(PhemaError::Invalid(format!(
            "weights must be {} x {n_targets}",
            inputs.len()
        )));
    }
    if let Some(bad) = weights.iter().flatten().find(|w| !w.is_finite()) {
        return Err(PhemaError::Invalid(format!("weight {bad} is not finite")));
    }
    let used: Vec<usize> = (0..inputs.len())
        .filter(|&i| weights[i].iter().any(|&w| w != 0.0))
        .collect();
    let Some(&first) = used.first() else {
        return Err(PhemaError::Invalid(
            "every weight is zero: nothing to combine".into(),
        ));
    };
    let copy_from = match copy_from {
        None => used.len() - 1,
        Some(i) => used.iter().position(|&u| u == i).ok_or_else(|| {
            PhemaError::Invalid(format!(
                "input {i} to copy non-float tensors from is not read"
            ))
        })?,
    };
    let layout = layout_of(&inputs[first]);
    let mut mapped = Vec::with_capacity(used.len());
    for &i in &used {
        let entries = inputs[i].align(&layout)?;
        let maps = inputs[i]
            .files
            .iter()
            .map(open)
            .collect::<Result<Vec<_>>>()?;
        mapped.push(Mapped { maps, entries });
    }
    let w: Vec<Vec<f32>> = used
        .iter()
        .map(|&i| weights[i].iter().map(|&x| x as f32).collect())
        .collect();

    // Work items: (tensor, first element, element count) for floats; raw tensors whole.
    let mut items = Vec::new();
    for (ti, t) in layout.iter().enumerate() {
        if is_float(t.dtype) {
            let n = t.numel();
            let mut start = 0;
            while start < n {
                let len = CHUNK.min(n - start);
                items.push((ti, start, len));
                start += len;
            }
        } else {
            items.push((ti, 0, 0));
        }
    }
    let mismatched = std::sync::Mutex::new(Vec::new());
    items.par_iter().try_for_each_init(
        || (vec![0f32; n_targets * CHUNK], vec![0f32; BLOCK]),
        |(acc, block), &(ti, start, len)| -> Result<()> {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err(PhemaError::Invalid("cancelled".into()));
            }
            if !is_float(layout[ti].dtype) {
                let nbytes = mapped[copy_from].entries[ti].1.nbytes as usize;
                let (_, bytes, _) = mapped[copy_from].bytes(ti, 0, nbytes);
                if mapped.iter().any(|m| m.bytes(ti, 0, nbytes).1 != bytes) {
                    if let Ok(mut v) = mismatched.lock() {
                        v.push(layout[ti].name.clone());
                    }
                }
                for k in 0..n_targets {
                    sink.put_raw(k, ti, bytes)?;
                }
                return Ok(());
            }
            let acc = &mut acc[..n_targets * len];
            acc.fill(0.0);
            let mut read = 0u64;
            for (m, wm) in mapped.iter().zip(&w) {
                let dtype = m.entries[ti].1.dtype;
                let size = dtype.bitsize() / 8;
                let (map, bytes, lo) = m.bytes(ti, start * size, len * size);
                read += bytes.len() as u64;
                let mut b0 = 0;
                while b0 < len {
                    let bl = BLOCK.min(len - b0);
                    let x = &mut block[..bl];
                    decode(dtype, &bytes[b0 * size..(b0 + bl) * size], x);
                    for (k, &wk) in wm.iter().enumerate() {
                        if wk != 0.0 {
                            axpy(&mut acc[k * len + b0..k * len + b0 + bl], wk, x);
                        }
                    }
                    b0 += bl;
                }
                release(map, lo, bytes.len());
            }
            for k in 0..n_targets {
                sink.put_f32(k, ti, start, &acc[k * len..(k + 1) * len])?;
            }
            progress.bytes_done.fetch_add(read, Ordering::Relaxed);
            Ok(())
        },
    )?;
    let mut raw_mismatch = mismatched.into_inner().unwrap_or_default();
    raw_mismatch.sort();
    Ok(Stats {
        bytes_read: used.iter().map(|&i| inputs[i].size()).sum(),
        read: used,
        raw_mismatch,
    })
}

/// The tensor layout outputs follow: the tensors of `source` in file order.
pub fn layout_of(source: &Source) -> Vec<TensorEntry> {
    source.tensors().map(|(_, t)| t.clone()).collect()
}

/// Drops the pages of a processed range from this process, so resident memory stays bounded by
/// the chunks in flight instead of growing to the size of the snapshots.
fn release(map: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: a read-only file mapping; dropped pages are read again from the file on access.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Little-endian bytes of a float dtype to f32.
fn decode(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            let (pre, mid, post) = unsafe { bytes.align_to::<f16>() };
            if pre.is_empty() && post.is_empty() {
                mid.convert_to_f32_slice(out);
            } else {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        Dtype::BF16 => {
            let (pre, mid, post) = unsafe { bytes.align_to::<bf16>() };
            if pre.is_empty() && post.is_empty() {
                mid.convert_to_f32_slice(out);
            } else {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunks of 8")) as f32;
            }
        }
        other => unreachable!("decode called on non-float {other:?}"),
    }
}

/// `acc += w * x`, with an AVX2/FMA version chosen at run time where the CPU has it.
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { axpy_avx2(acc, w, x) };
        }
    }
    axpy_portable(acc, w, x)
}

#[inline(always)]
fn axpy_portable(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = v.mul_add(w, *a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(acc: &mut [f32], w: f32, x: &[f32]) {
    axpy_portable(acc, w, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::read_header;
    use crate::writer::{write_snapshot, TensorData};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Collects outputs in memory.
    struct VecSink(Mutex<Vec<Vec<Vec<f32>>>>);
    impl Sink for VecSink {
        fn put_f32(&self, k: usize, t: usize, off: usize, v: &[f32]) -> Result<()> {
            let mut g = self.0.lock().unwrap();
            g[k][t][off..off + v.len()].copy_from_slice(v);
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
        let stats = combine(&headers, &weights, 2, None, &sink, &Progress::default()).unwrap();
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
    fn a_file_changed_after_listing_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let a = vec![1.0f32; 10];
        let write = |v: &[f32]| {
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
        let err = combine(
            &[Source::single(h)],
            &[vec![1.0]],
            1,
            None,
            &sink,
            &Progress::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("x.safetensors"), "{err}");
    }
}
