//! Crash-safe safetensors output: the header is known before any data, so it is written first and
//! tensor data is filled in place (from any thread) as it completes; the file appears under its
//! final name only after everything was written and synced.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use crate::checksum;
use crate::codec::encode_into;
use crate::engine::Sink;
use crate::error::{PhemaError, Result};
use crate::header::{is_float, TensorEntry};
use crate::meta::CHECKSUM;
use crate::remote::{is_url, Object};

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
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    /// Absolute file offset of each tensor's data.
    offsets: Vec<u64>,
    /// The header JSON as written (after its 8-byte length).
    header: Vec<u8>,
    finished: bool,
}

/// Temporary files made by this process so far: with host and pid, each writer's name is unique.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// This machine's name as temporary names carry it (docs/store-format.md): `/` and `-` replaced.
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is writable for its whole length; the name is NUL-terminated
        // unless truncated, so it is cut at the first NUL or the buffer's end.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = if ok {
            String::from_utf8_lossy(&buf[..len]).into_owned()
        } else {
            String::new()
        };
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            "localhost".into()
        } else {
            name
        }
    })
}

/// A new temporary name for writing `path`: `.{name}.tmp-{host}-{pid}-{n}` in the same directory
/// (docs/store-format.md). Hidden, and not ending in `.safetensors`, so a killed writer never
/// leaves something a store mistakes for a snapshot; unique per writer, also between threads.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let n = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{}-{n}", host(), std::process::id()))
}

/// The pid in a temporary name written on this host, if `file_name` is one.
fn temporary_pid(file_name: &str) -> Option<i32> {
    let rest = file_name.strip_prefix('.')?;
    let mut parts = rest.rsplitn(3, '-');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse::<i32>().ok().filter(|&p| p > 0)?;
    parts
        .next()?
        .ends_with(&format!(".tmp-{}", host()))
        .then_some(pid)
}

/// Whether no process `pid` exists on this machine.
fn is_dead(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the temporary files in `dir` that a writer on this host left when it died (killed
/// before it could clean up), once per directory and process. Other hosts' temporaries are
/// never touched: they may be writing to the same shared directory.
fn remove_stale_temporaries(dir: &Path) {
    static CLEANED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match CLEANED.lock() {
        Ok(mut done) if !done.iter().any(|d| d == dir) => done.push(dir.to_path_buf()),
        _ => return,
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id() as i32;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_pid) else {
            continue;
        };
        if pid != me && is_dead(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Renames `from` to `to` unless `to` exists, atomically where the file system allows
/// (`renameat2(RENAME_NOREPLACE)`), else by a hard link and an unlink.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
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
    fn write_checksum(&self, value: &str) -> Result<()> {
        let at = crate::checksum::digits_at(&self.header).ok_or_else(|| {
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
    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| PhemaError::io(&self.tmp, e))
    }

    /// Renames the synced file to its final name, replacing a file there only if `replace`.
    fn commit(&mut self, replace: bool) -> Result<PathBuf> {
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
fn sync_all(writers: &[&SafetensorsWriter]) -> Result<()> {
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

/// fsync of the directory holding `path`, so a rename survives a crash. Best effort: some
/// file systems refuse to sync directories, and the data itself is already synced.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Largest finite fp16 value.
const F16_MAX: f32 = 65504.0;

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

/// One output to produce: a single file, or a directory of shards with a Hugging Face style
/// `model.safetensors.index.json` when `shard_size` is set and the tensors do not fit in one.
#[derive(Clone, Debug)]
pub struct OutputRequest {
    /// The `.safetensors` file, or the directory when `shard_size` is set.
    pub path: PathBuf,
    /// Dtype of the float tensors (non-float tensors keep theirs).
    pub dtype: Dtype,
    /// `__metadata__` of every file written.
    pub metadata: BTreeMap<String, String>,
    /// Largest shard in bytes.
    pub shard_size: Option<u64>,
    /// Only this shard (0-based) and no index: one task of a distributed run, whose client
    /// commits every shard and writes the index (`ops::commit_staged`).
    pub shard: Option<usize>,
    /// File stem of a sharded output: `model` as transformers names it (`model.safetensors`,
    /// `model-00001-of-00002.safetensors`, `model.safetensors.index.json`), or
    /// `diffusion_pytorch_model` as diffusers does. None: `model`.
    pub stem: Option<String>,
}

impl OutputRequest {
    fn stem(&self) -> Result<&str> {
        let stem = self.stem.as_deref().unwrap_or("model");
        if stem.is_empty()
            || stem.len() > 200
            || stem.contains(['/', '\\', '\0'])
            || stem.starts_with('.')
        {
            return Err(PhemaError::Invalid(format!(
                "output file stem {stem:?}: expected a plain file name"
            )));
        }
        Ok(stem)
    }
}

/// Name of shard `i` (0-based) of `n`, as Hugging Face names them.
fn shard_name(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// The files of one output: every shard's path and tensors (layout indices), and the index
/// (its path and contents) when there are several shards.
pub struct OutputFiles {
    pub shards: Vec<(PathBuf, Vec<usize>)>,
    pub specs: Vec<TensorSpec>,
    pub index: Option<(PathBuf, Vec<u8>)>,
}

/// Where the tensors of `layout` go for `req`: greedy sharding in layout order (a tensor larger
/// than a shard gets one of its own), the same for every caller.
pub fn output_files(layout: &[TensorEntry], req: &OutputRequest) -> Result<OutputFiles> {
    if !matches!(req.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(PhemaError::Invalid(format!(
            "output dtype {:?} is not one of float16, bfloat16, float32",
            req.dtype
        )));
    }
    let specs: Vec<TensorSpec> = layout
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if is_float(t.dtype) {
                req.dtype
            } else {
                t.dtype
            },
            shape: t.shape.clone(),
        })
        .collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let b = s.nbytes() as u64;
        if let Some(limit) = req.shard_size {
            if size > 0 && size.saturating_add(b) > limit {
                members.push(Vec::new());
                size = 0;
            }
        }
        if let Some(last) = members.last_mut() {
            last.push(i);
        }
        size = size.saturating_add(b);
    }
    let n = members.len();
    let stem = req.stem()?;
    let paths: Vec<PathBuf> = match (req.shard_size, n) {
        (None, _) => vec![req.path.clone()],
        (Some(_), 1) => vec![req.path.join(format!("{stem}.safetensors"))],
        (Some(_), _) => (0..n)
            .map(|i| req.path.join(shard_name(stem, i, n)))
            .collect(),
    };
    let index = (n > 1).then(|| {
        let mut weight_map = serde_json::Map::new();
        for (m, path) in members.iter().zip(&paths) {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
            for &i in m {
                weight_map.insert(
                    specs[i].name.clone(),
                    file.clone().unwrap_or_default().into(),
                );
            }
        }
        let total: u64 = specs.iter().map(|s| s.nbytes() as u64).sum();
        let mut meta = serde_json::Map::new();
        meta.insert("total_size".into(), total.into());
        // Loaders that read only the index must still learn which names share a tensor.
        if let Some(tied) = req.metadata.get("phema.tied") {
            meta.insert("phema.tied".into(), tied.clone().into());
        }
        let json = serde_json::json!({"metadata": meta, "weight_map": weight_map});
        let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
        (
            req.path.join(format!("{stem}.safetensors.index.json")),
            bytes,
        )
    });
    Ok(OutputFiles {
        shards: paths.into_iter().zip(members).collect(),
        specs,
        index,
    })
}

/// Replaces the file at `path` with `bytes` in one step: written under a temporary name
/// ([`temporary_path`]), synced, renamed into place, the directory synced, so an interrupted
/// write leaves the old file whole and no partial one. Dead writers' temporaries in the
/// directory are removed first. For small files (an index, a results table, a figure).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(url) = path.to_str().filter(|p| is_url(p)) {
        // One PUT replaces an object whole: no partial object is ever visible.
        return Object::parse(url)?.put(bytes.to_vec(), false);
    }
    commit_file(path, |f| f.write_all(bytes))
}

/// Fills a new temporary file by `fill`, syncs it and renames it to `path` (see [`write_file`]).
fn commit_file(path: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    remove_stale_temporaries(path.parent().unwrap_or(Path::new(".")));
    let tmp = temporary_path(path);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| fill(&mut f).and_then(|_| f.sync_all()))
        .and_then(|_| {
            failpoint("file");
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(PhemaError::io(path, e));
    }
    sync_dir(path);
    Ok(())
}

struct TargetFiles {
    writers: Vec<SafetensorsWriter>,
    /// For every layout tensor this sink writes: (writer, index inside it, stored dtype).
    place: Vec<Option<(usize, usize, Dtype)>>,
    /// The dtype of float tensors.
    dtype: Dtype,
    index: Option<(PathBuf, Vec<u8>)>,
}

/// Output files of every target, filled by the engine through [`Sink`].
pub struct FileSink {
    targets: Vec<TargetFiles>,
}

impl FileSink {
    /// Creates every output file (under temporary names) for tensors laid out as `layout`.
    pub fn create(layout: &[TensorEntry], requests: &[OutputRequest]) -> Result<Self> {
        let mut targets = Vec::with_capacity(requests.len());
        for req in requests {
            let files = output_files(layout, req)?;
            let n = files.shards.len();
            if let Some(i) = req.shard.filter(|&i| i >= n) {
                return Err(PhemaError::Invalid(format!(
                    "shard {i} of {}: the output has {n} shards",
                    req.path.display()
                )));
            }
            if req.shard_size.is_some() {
                std::fs::create_dir_all(&req.path).map_err(|e| PhemaError::io(&req.path, e))?;
            }
            let mut place = vec![None; files.specs.len()];
            let mut writers = Vec::with_capacity(n);
            for (i, (path, members)) in files.shards.iter().enumerate() {
                if req.shard.is_some_and(|only| only != i) {
                    continue;
                }
                let sub: Vec<TensorSpec> =
                    members.iter().map(|&t| files.specs[t].clone()).collect();
                for (j, &t) in members.iter().enumerate() {
                    place[t] = Some((writers.len(), j, files.specs[t].dtype));
                }
                writers.push(SafetensorsWriter::create(path, &sub, &req.metadata)?);
            }
            targets.push(TargetFiles {
                writers,
                place,
                dtype: req.dtype,
                index: if req.shard.is_some() {
                    None
                } else {
                    files.index
                },
            });
        }
        Ok(FileSink { targets })
    }

    /// One sink committing the outputs of all of `sinks` together (their targets in order), so
    /// that outputs written by several engine runs (one per rank) have one commit point.
    pub fn merge(sinks: Vec<FileSink>) -> FileSink {
        FileSink {
            targets: sinks.into_iter().flat_map(|s| s.targets).collect(),
        }
    }

    /// Completes every file and returns, per target, the paths written (the index first when
    /// sharded). Called only after the engine succeeded; dropping the sink instead removes all.
    /// A `cancel` set while the data is synced still commits nothing.
    pub fn finish(mut self, cancel: &AtomicBool) -> Result<Vec<Vec<PathBuf>>> {
        // All data reaches the disk before any file takes its final name; a file already at a
        // final name is set aside first, and if a rename then fails the outputs already renamed
        // are removed and what they replaced is put back, so no partial set is left and no
        // earlier output is lost. A sharded output's index is written after its shards.
        // The files are synced in parallel, so the device sees all their writeback at once.
        let writers: Vec<&SafetensorsWriter> =
            self.targets.iter().flat_map(|t| &t.writers).collect();
        sync_all(&writers)?;
        if cancel.load(Ordering::Relaxed) {
            return Err(PhemaError::Cancelled);
        }
        let mut commit = Commit::default();
        let mut out = Vec::with_capacity(self.targets.len());
        let result = (|| {
            for t in &mut self.targets {
                let mut paths = Vec::new();
                for w in &mut t.writers {
                    let path = w.path.clone();
                    paths.push(commit.place(&path, || w.commit(true))?);
                }
                if let Some((path, bytes)) = &t.index {
                    paths.insert(
                        0,
                        commit.place(path, || write_file(path, bytes).map(|_| path.clone()))?,
                    );
                }
                out.push(paths);
            }
            Ok(())
        })();
        commit.end(result)?;
        Ok(out)
    }
}

/// One commit of several files under their final names: each file already at a final name is
/// set aside first; if a later step fails, the files placed are removed and what they replaced
/// is put back, so no partial set is left and no earlier output is lost.
#[derive(Default)]
struct Commit {
    done: Vec<PathBuf>,
    aside: Vec<(PathBuf, PathBuf)>,
}

impl Commit {
    /// Puts a file at `path` by `put` (which returns where it went), setting aside the old one.
    fn place(&mut self, path: &Path, put: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
        failpoint("commit");
        set_aside(path, &mut self.aside)?;
        let placed = put()?;
        self.done.push(placed.clone());
        Ok(placed)
    }

    /// Keeps the commit if `result` is Ok (the set-aside files go), else rolls it back.
    fn end(self, result: Result<()>) -> Result<()> {
        if let Err(e) = result {
            for p in &self.done {
                let _ = std::fs::remove_file(p);
            }
            for (path, backup) in &self.aside {
                let _ = std::fs::rename(backup, path);
            }
            return Err(e);
        }
        for (_, backup) in &self.aside {
            let _ = std::fs::remove_file(backup);
        }
        Ok(())
    }
}

/// The crash tests' kill -9 at a chosen step (`tests/test_crash.py`): with
/// `PHEMA_FAILPOINT=NAME:N` in the environment the process aborts, as if killed, when it reaches
/// step `NAME` for the `N`th time (`commit`: before a file takes its final name in a commit;
/// `file`: a small file or copy written but not yet renamed; `upload`: before an object is
/// uploaded). Read once; unset, it costs one
/// atomic load per step.
pub(crate) fn failpoint(name: &str) {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let text = std::env::var("PHEMA_FAILPOINT").ok()?;
        let (step, n) = text.split_once(':')?;
        Some((step.to_string(), n.parse().ok()?))
    });
    if let Some((step, n)) = spec {
        if step == name && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            std::process::abort();
        }
    }
}

/// Moves finished files (already synced, e.g. written by a distributed run's workers) to their
/// final names and then writes `indexes`, as one commit (see [`Commit`]); each directory is
/// synced so the renames survive a crash.
pub fn commit_files(moves: &[(PathBuf, PathBuf)], indexes: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let mut commit = Commit::default();
    let result = (|| {
        for (from, to) in moves {
            if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| PhemaError::io(parent, e))?;
            }
            commit.place(to, || {
                std::fs::rename(from, to).map_err(|e| PhemaError::io(to, e))?;
                sync_dir(to);
                Ok(to.clone())
            })?;
        }
        for (path, bytes) in indexes {
            commit.place(path, || write_file(path, bytes).map(|_| path.clone()))?;
        }
        Ok(())
    })();
    commit.end(result)
}

/// Moves files into the directory `dir` (made if missing) under their own names, never
/// replacing a file there, and syncs both directories: how a resumed run sets aside the
/// snapshots its interrupted attempt wrote after the resume point (docs/runs.md).
///
/// On object storage (no rename there) each object is copied, then deleted.
pub fn move_files(paths: &[PathBuf], dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(url) = dir.to_str().filter(|d| is_url(d)) {
        let to = Object::parse(url)?;
        return paths
            .iter()
            .map(|path| {
                let from = Object::parse(&path.to_string_lossy())?;
                let name = from
                    .url()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let dst = to.child(&name);
                from.copy_to(&dst)?;
                from.delete()?;
                Ok(PathBuf::from(dst.url()))
            })
            .collect();
    }
    std::fs::create_dir_all(dir).map_err(|e| PhemaError::io(dir, e))?;
    let mut moved = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_name()
            .ok_or_else(|| PhemaError::Invalid(format!("{}: not a file", path.display())))?;
        let to = dir.join(name);
        rename_no_replace(path, &to).map_err(|e| PhemaError::io(&to, e))?;
        moved.push(to);
    }
    if let (Some(from), Some(to)) = (paths.first(), moved.first()) {
        sync_dir(from);
        sync_dir(to);
    }
    Ok(moved)
}

/// Copies the file `from` to `to` by the rule of [`write_file`] (a configuration file beside an
/// output: never a partial copy under the final name).
///
/// `from` may be an object (a configuration beside a checkpoint on object storage).
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(url) = from.to_str().filter(|f| is_url(f)) {
        let bytes = Object::parse(url)?.read_small()?;
        return write_file(to, &bytes);
    }
    let mut source = File::open(from).map_err(|e| PhemaError::io(from, e))?;
    commit_file(to, |f| std::io::copy(&mut source, f).map(|_| ()))
}

/// Moves a file at `path` to a temporary name beside it (recorded in `aside`), so that a failed
/// commit can put it back.
fn set_aside(path: &Path, aside: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {
            let backup = temporary_path(path);
            std::fs::rename(path, &backup).map_err(|e| PhemaError::io(path, e))?;
            aside.push((path.to_path_buf(), backup));
            Ok(())
        }
        _ => Ok(()),
    }
}

impl FileSink {
    fn place(&self, target: usize, tensor: usize) -> Result<(usize, usize, Dtype)> {
        self.targets
            .get(target)
            .and_then(|t| t.place.get(tensor).copied().flatten())
            .ok_or_else(|| PhemaError::Invalid(format!("output {target} takes no tensor {tensor}")))
    }
}

impl Sink for FileSink {
    fn dtype(&self, target: usize, tensor: usize) -> Dtype {
        let t = &self.targets[target];
        t.place[tensor].map_or(t.dtype, |p| p.2)
    }

    fn put(&self, target: usize, tensor: usize, elem_offset: usize, bytes: &[u8]) -> Result<()> {
        let (w, j, dtype) = self.place(target, tensor)?;
        self.targets[target].writers[w].write_at(j, elem_offset * dtype.bitsize() / 8, bytes)
    }

    fn put_raw(&self, target: usize, tensor: usize, bytes: &[u8]) -> Result<()> {
        let (w, j, _) = self.place(target, tensor)?;
        self.targets[target].writers[w].write_at(j, 0, bytes)
    }

    fn wants(&self, target: usize, tensor: usize) -> bool {
        self.targets[target].place[tensor].is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use safetensors::SafeTensors;

    fn meta() -> BTreeMap<String, String> {
        BTreeMap::from([("format".to_string(), "pt".to_string())])
    }

    #[test]
    fn snapshot_round_trips_through_the_safetensors_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let w: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 100.0).collect();
        let big = [1e5f32, -3.0];
        let steps = 7i64.to_le_bytes();
        let tensors = vec![
            ("w".to_string(), vec![10, 100], TensorData::F32(&w)),
            ("big".to_string(), vec![2], TensorData::F32(&big)),
            (
                "steps".to_string(),
                vec![],
                TensorData::Raw(Dtype::I64, &steps),
            ),
        ];
        let promoted = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap();
        assert_eq!(promoted, vec!["big".to_string()]);
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("w").unwrap();
        assert_eq!(t.dtype(), Dtype::F16);
        assert_eq!(t.shape(), &[10, 100]);
        for (i, c) in t.data().chunks(2).enumerate() {
            let v = f16::from_le_bytes([c[0], c[1]]).to_f32();
            assert!((v - w[i]).abs() <= w[i].abs() * 1e-3, "{i}");
        }
        assert_eq!(st.tensor("big").unwrap().dtype(), Dtype::F32);
        assert_eq!(st.tensor("steps").unwrap().data(), &steps);
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
        // Only the final file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nan_is_refused_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let bad = [1.0f32, f32::NAN];
        let tensors = vec![("layer.bias".to_string(), vec![2], TensorData::F32(&bad))];
        let err = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap_err();
        assert!(err.to_string().contains("layer.bias"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn dropped_writer_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let spec = TensorSpec {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![4],
        };
        let w = SafetensorsWriter::create(&path, &[spec], &meta()).unwrap();
        let names = || -> Vec<String> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert!(
            matches!(names().as_slice(), [n] if n.starts_with(".a.safetensors.tmp-")),
            "{:?}",
            names()
        );
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unwritable_directory_is_an_error_naming_the_file() {
        let path = Path::new("/nonexistent-dir/x.safetensors");
        let err = write_snapshot(path, &[], Dtype::F16, &meta()).unwrap_err();
        assert!(err.to_string().contains("nonexistent-dir"), "{err}");
    }

    #[test]
    fn temporary_names_are_unique_per_writer_and_carry_host_and_pid() {
        let path = Path::new("/d/a.safetensors");
        let names: std::collections::HashSet<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).map(|_| temporary_path(path)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(names.len(), 400);
        let one = temporary_path(path);
        let name = one.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!(".a.safetensors.tmp-{}-", host())),
            "{name}"
        );
        assert_eq!(temporary_pid(name), Some(std::process::id() as i32));
        assert_eq!(temporary_pid(".a.safetensors.tmp-otherhost-12-0"), None);
        assert_eq!(temporary_pid("a.safetensors"), None);
    }

    #[test]
    fn a_snapshot_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        std::fs::write(&path, b"another writer's").unwrap();
        let v = [1.0f32];
        let tensors = vec![("w".to_string(), vec![1], TensorData::F32(&v))];
        let err = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap_err();
        assert!(err.to_string().contains("a.safetensors"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"another writer's");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // The fallback for file systems without RENAME_NOREPLACE behaves the same.
        let tmp = dir.path().join("t");
        std::fs::write(&tmp, b"new").unwrap();
        assert!(rename_no_replace(&tmp, &path).is_err());
        rename_no_replace(&tmp, &dir.path().join("b")).unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn temporaries_of_dead_writers_on_this_host_are_removed_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let host = host();
        let me = std::process::id();
        let stale = format!(".a.safetensors.tmp-{host}-{dead}-3");
        let kept = [
            format!(".a.safetensors.tmp-{host}-{me}-7"),
            format!(".a.safetensors.tmp-{host}-1-0"),
            format!(".a.safetensors.tmp-not{host}-{dead}-3"),
            format!(".a.safetensors.tmp-{dead}"),
            "x.safetensors".to_string(),
        ];
        for n in kept.iter().chain([&stale]) {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let spec = TensorSpec {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![1],
        };
        let w =
            SafetensorsWriter::create(&dir.path().join("b.safetensors"), &[spec], &meta()).unwrap();
        drop(w);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = kept.to_vec();
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn a_failed_commit_puts_back_the_outputs_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let layout = vec![TensorEntry {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![4],
            offset: 0,
            nbytes: 16,
        }];
        let request = |name: &str| OutputRequest {
            path: dir.path().join(name),
            dtype: Dtype::F32,
            metadata: meta(),
            shard_size: None,
            shard: None,
            stem: None,
        };
        std::fs::write(dir.path().join("a.safetensors"), b"earlier output").unwrap();
        let sink = FileSink::create(
            &layout,
            &[request("a.safetensors"), request("b.safetensors")],
        )
        .unwrap();
        for k in 0..2 {
            sink.put(k, 0, 0, &[0u8; 16]).unwrap();
        }
        // Target b's temporary file vanishes before the commit: its rename fails.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.starts_with(".b.safetensors.tmp-") {
                std::fs::remove_file(dir.path().join(name)).unwrap();
            }
        }
        assert!(sink.finish(&AtomicBool::new(false)).is_err());
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["a.safetensors".to_string()]);
        assert_eq!(
            std::fs::read(dir.path().join("a.safetensors")).unwrap(),
            b"earlier output"
        );
    }
}
