//! The inputs of a combination: a checkpoint's files opened once, checked against their
//! listing, and read by `pread` (or by ranged GETs from object storage) into work items' buffers.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{PhemaError, Result};
use crate::format::checksum::{InOrder, Verified, NOT_IN_PLACE};
use crate::format::header::{is_float, open_regular, read_open, Header, TensorEntry};
use crate::format::meta::{shard_id, CHECKSUM};
use crate::format::shard::{assemble, order_ranks, Assembled, RankSetError, Segment};
use crate::remote::{is_url, read_header, Object, ReadAhead};

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
pub(super) struct Opened {
    pub(super) files: Vec<OpenFile>,
    pub(super) segments: Vec<Vec<Segment>>,
}

/// An input file held open for the whole run, with the check of its checksum when it is read
/// whole.
pub(super) struct OpenFile {
    pub(super) backing: Backing,
    /// For an object: the work items' reads of it, fetched in large pieces.
    pub(super) ahead: Option<ReadAhead>,
    pub(super) path: PathBuf,
    /// Its header JSON as stored.
    pub(super) json: Vec<u8>,
    pub(super) check: Option<InOrder>,
}

/// Where an input's bytes come from.
pub(super) enum Backing {
    /// A local file, held open.
    Local(File),
    /// An object, read by ranged requests from the version listed, of this size.
    Remote(Object, Option<String>, u64),
}

impl OpenFile {
    /// Its size now (a local file may have grown or shrunk since it was listed).
    pub(super) fn size(&self) -> Result<u64> {
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
    pub(super) fn read(
        &self,
        tensor: usize,
        start: usize,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<Dtype> {
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
    pub(super) fn locate(&self, tensor: usize, start: usize) -> (usize, u64, &Segment) {
        let segments = &self.segments[tensor];
        let i = segments
            .partition_point(|s| s.start <= start)
            .saturating_sub(1);
        let s = &segments[i];
        let at = s.byte_offset + ((start - s.start) * (s.dtype.bitsize() / 8)) as u64;
        (s.file, at, s)
    }

    /// The whole of (non-float) tensor `tensor`, gathered from its segments.
    pub(super) fn whole(&self, tensor: usize) -> Result<Vec<u8>> {
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
pub(super) fn read_at(f: &OpenFile, at: u64, buf: &mut [u8]) -> Result<()> {
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
pub(super) const READ_AHEAD: u64 = 128 << 20;

/// Plans the read-ahead of every object among the inputs from the work items' reads: object
/// storage wants few large requests, the items make many small reads.
pub(super) fn plan_read_ahead(opened: &mut [Opened], items: &[(usize, usize, usize)]) {
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
pub(super) const REMOTE_READS: usize = 16;

pub(super) fn mismatch(path: &Path, recorded: &str, computed: &str) -> PhemaError {
    PhemaError::Store(format!(
        "{}: the data differ from the checksum recorded when it was written (recorded \
         {recorded}, computed {computed}): the file is corrupt or was changed; pass \
         verify=False (--no-verify) to read it anyway",
        path.display()
    ))
}

pub(super) fn changed(path: &Path) -> PhemaError {
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
pub(super) fn open(header: &Header) -> Result<OpenFile> {
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
pub(super) fn check_all(o: &mut Opened, headers: &[Header]) -> Result<()> {
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
pub(super) fn finish_check(f: &OpenFile, check: &InOrder) -> Result<()> {
    match check.finish(f.size()?, |at, b| read_at(f, at, b))? {
        Verified::Mismatch { recorded, computed } => Err(mismatch(&f.path, &recorded, &computed)),
        Verified::Ok | Verified::NotRecorded => Ok(()),
    }
}

/// Lets this process hold `needed` more open files: every input stays open for the whole run,
/// and a long run's store can have more snapshots than the usual soft limit of 1024.
pub(super) fn allow_open_files(needed: usize) {
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

/// The tensor layout outputs follow: the (global) tensors of `source` in file order.
pub fn layout_of(source: &Source) -> Result<Vec<TensorEntry>> {
    Ok(source.layout()?.into_iter().map(|(t, _)| t).collect())
}
