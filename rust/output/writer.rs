//! Crash-safe safetensors output: the header is known before any data, so it is written first and
//! tensor data is filled in place (from any thread) as it completes; the file appears under its
//! final name only after everything was written and synced.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use super::commit::{remove_stale_temporaries, rename_no_replace, sync_dir, temporary_path};
use crate::error::{PhemaError, Result};
use crate::format::checksum;
use crate::format::codec::encode_into;
use crate::format::meta::CHECKSUM;

/// Name, dtype and shape of one tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Tensor name (as in `state_dict()`).
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data the tensor takes.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// A safetensors file being written under a temporary name in its final directory.
///
/// Dropping it without [`SafetensorsWriter::finish`] removes the temporary file, so an error
/// anywhere leaves nothing behind.
#[derive(Debug)]
pub struct SafetensorsWriter {
    pub(super) path: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) file: File,
    /// Absolute file offset of each tensor's data.
    pub(super) offsets: Vec<u64>,
    /// The header JSON as written (after its 8-byte length).
    pub(super) header: Vec<u8>,
    pub(super) finished: bool,
}

impl SafetensorsWriter {
    /// Creates the temporary file, writes the header and reserves the data.
    pub fn create(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| PhemaError::Invalid(e.to_string()))?,
        );
        let mut offset = 0usize;
        let mut relative = Vec::with_capacity(tensors.len());
        for spec in tensors {
            if header.contains_key(&spec.name) {
                return Err(PhemaError::Invalid(format!(
                    "tensor name `{}` appears twice",
                    spec.name
                )));
            }
            let end = offset + spec.nbytes();
            let info = TensorInfo {
                dtype: spec.dtype,
                shape: spec.shape.clone(),
                data_offsets: (offset, end),
            };
            header.insert(
                spec.name.clone(),
                serde_json::to_value(info).map_err(|e| PhemaError::Invalid(e.to_string()))?,
            );
            relative.push(offset);
            offset = end;
        }
        let mut json =
            serde_json::to_vec(&header).map_err(|e| PhemaError::Invalid(e.to_string()))?;
        // Pad with spaces so tensor data starts 8-byte aligned, as safetensors recommends.
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let data_start = 8 + json.len() as u64;
        remove_stale_temporaries(path.parent().unwrap_or(Path::new(".")));
        let tmp = temporary_path(path);
        let io = |e| PhemaError::io(&tmp, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| PhemaError::io(&tmp, e))?;
        let writer = SafetensorsWriter {
            path: path.to_path_buf(),
            tmp: tmp.clone(),
            file: file.try_clone().map_err(io)?,
            offsets: relative.iter().map(|&o| data_start + o as u64).collect(),
            header: json.clone(),
            finished: false,
        };
        file.write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&json))
            .and_then(|_| file.set_len(data_start + offset as u64))
            .map_err(io)?;
        Ok(writer)
    }

    /// Writes `bytes` at `byte_offset` inside tensor `index`'s data. Safe to call from many
    /// threads at once for disjoint ranges.
    pub fn write_at(&self, index: usize, byte_offset: usize, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, self.offsets[index] + byte_offset as u64)
            .map_err(|e| PhemaError::io(&self.tmp, e))
    }

    /// Fills in the checksum the header holds as a placeholder (`checksum::placeholder`), in
    /// place: its length does not change.
    pub(super) fn write_checksum(&self, value: &str) -> Result<()> {
        let at = crate::format::checksum::digits_at(&self.header).ok_or_else(|| {
            PhemaError::Invalid("the header holds no checksum placeholder".into())
        })?;
        let digits = &value.as_bytes()[value.len().saturating_sub(32)..];
        self.file
            .write_all_at(digits, 8 + at as u64)
            .map_err(|e| PhemaError::io(&self.tmp, e))
    }

    /// Syncs the data, renames the file to its final name and syncs the directory.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.sync()?;
        self.commit(true)
    }

    /// As [`SafetensorsWriter::finish`], but fails (removing the temporary file) when a file of
    /// the final name exists: another writer's is never replaced.
    pub fn finish_new(mut self) -> Result<PathBuf> {
        self.sync()?;
        self.commit(false)
    }

    /// Flushes the data to disk under the temporary name.
    pub(super) fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| PhemaError::io(&self.tmp, e))
    }

    /// Renames the synced file to its final name, replacing a file there only if `replace`.
    pub(super) fn commit(&mut self, replace: bool) -> Result<PathBuf> {
        if replace {
            std::fs::rename(&self.tmp, &self.path)
        } else {
            rename_no_replace(&self.tmp, &self.path)
        }
        .map_err(|e| PhemaError::io(&self.path, e))?;
        self.finished = true;
        sync_dir(&self.path);
        Ok(self.path.clone())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Syncs `writers` from up to 16 threads; the first error (in `writers` order) is returned.
pub(super) fn sync_all(writers: &[&SafetensorsWriter]) -> Result<()> {
    if writers.len() <= 1 {
        return writers.iter().try_for_each(|w| w.sync());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<()>>>> = writers
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..writers.len().min(16) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(w) = writers.get(i) else { break };
                let r = w.sync();
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    for (w, slot) in writers.iter().zip(results) {
        match slot.into_inner().ok().flatten() {
            Some(r) => r?,
            // A syncing thread panicked: sync again here so nothing is committed unsynced.
            None => w.sync()?,
        }
    }
    Ok(())
}

/// Largest finite fp16 value.
pub(super) const F16_MAX: f32 = 65504.0;

/// Data of one tensor handed to [`write_snapshot`].
#[derive(Debug)]
pub enum TensorData<'a> {
    /// Float values to be stored in the snapshot's dtype.
    F32(&'a [f32]),
    /// Anything else, stored byte for byte with its own dtype (integer buffers, say).
    Raw(Dtype, &'a [u8]),
}

/// Writes one snapshot file: f32 tensors converted to `dtype`, others as they are. An existing
/// file at `path` is an error and is left as it is.
///
/// A tensor with finite values beyond the fp16 range is stored in fp32 instead (its name is
/// returned); NaN or infinity is an error naming the tensor, and nothing is written.
pub fn write_snapshot(
    path: &Path,
    tensors: &[(String, Vec<usize>, TensorData<'_>)],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(PhemaError::Invalid(format!(
            "snapshot dtype {dtype:?} is not one of float16, bfloat16, float32"
        )));
    }
    let mut promoted = Vec::new();
    let mut specs = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        let stored = match data {
            TensorData::F32(v) => {
                if v.len() != n {
                    return Err(PhemaError::Invalid(format!(
                        "tensor `{name}`: {} values for shape {shape:?}",
                        v.len()
                    )));
                }
                let mut max = 0.0f32;
                for &x in v.iter() {
                    if !x.is_finite() {
                        return Err(PhemaError::Invalid(format!(
                            "tensor `{name}` holds NaN or infinity: refusing to store it"
                        )));
                    }
                    max = max.max(x.abs());
                }
                if dtype == Dtype::F16 && max > F16_MAX {
                    promoted.push(name.clone());
                    Dtype::F32
                } else {
                    dtype
                }
            }
            TensorData::Raw(d, bytes) => {
                if bytes.len() * 8 != n * d.bitsize() {
                    return Err(PhemaError::Invalid(format!(
                        "tensor `{name}`: {} bytes for shape {shape:?} of {d:?}",
                        bytes.len()
                    )));
                }
                *d
            }
        };
        specs.push(TensorSpec {
            name: name.clone(),
            dtype: stored,
            shape: shape.clone(),
        });
    }
    let mut metadata = metadata.clone();
    metadata.insert(CHECKSUM.into(), checksum::placeholder());
    let writer = SafetensorsWriter::create(path, &specs, &metadata)?;
    // Tensors are written in file order, so the data is hashed as it is written.
    let mut hasher = checksum::Hasher::new(&writer.header);
    let mut scratch = Vec::new();
    const CHUNK: usize = 1 << 20;
    for (index, ((_, _, data), spec)) in tensors.iter().zip(&specs).enumerate() {
        match data {
            TensorData::F32(v) => {
                let size = spec.dtype.bitsize() / 8;
                for (c, chunk) in v.chunks(CHUNK).enumerate() {
                    scratch.resize(chunk.len() * size, 0);
                    encode_into(chunk, spec.dtype, &mut scratch);
                    hasher.update(&scratch);
                    writer.write_at(index, c * CHUNK * size, &scratch)?;
                }
            }
            TensorData::Raw(_, bytes) => {
                hasher.update(bytes);
                writer.write_at(index, 0, bytes)?;
            }
        }
    }
    writer.write_checksum(&hasher.value())?;
    writer.finish_new()?;
    Ok(promoted)
}
