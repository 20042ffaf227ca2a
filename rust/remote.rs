//! Object storage: `s3://bucket/prefix` and `gs://bucket/prefix` locations (docs/storage.md).
//!
//! The one home of everything phema does on object storage: listing, headers by two ranged
//! reads, tensor data by ranged reads pinned to the version that was listed, and the commit rules
//! that stand in for a rename (an object appears under its final name only when whole, created
//! only if absent where that is asked). Clients come from the `object_store` crate, configured
//! from the standard `AWS_*` / `GOOGLE_*` environment variables; its requests retry with backoff
//! on throttling, 5xx answers and lost connections.
//!
//! Calls block the calling thread on one shared runtime: the engine's workers call them from
//! their own threads, so as many requests are in flight as workers ask for.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};

use crate::error::{PhemaError, Result};
use crate::format::header::{header_len, parse, Header, MAX_HEADER};

/// The schemes phema reads and writes.
const SCHEMES: [&str; 2] = ["s3://", "gs://"];

/// Files up to this size are uploaded by one create-only PUT; larger ones by a multipart upload
/// completed last (bounded memory: a few parts in flight).
const SINGLE_PUT: u64 = 64 << 20;

/// Multipart part size, and parts in flight per upload.
const PART: usize = 16 << 20;
const PARTS_IN_FLIGHT: usize = 4;

/// Small objects read whole (an index, a configuration) are refused beyond this.
pub const MAX_SMALL: u64 = 64 << 20;

/// Reads and validates the header of a safetensors file at a local path or an object-storage
/// URL (two ranged reads), without touching its data.
pub fn read_header(path: &FsPath) -> Result<Header> {
    match path.to_str().filter(|p| is_url(p)) {
        Some(url) => Object::parse(url)?.read_header(),
        None => crate::format::header::read_header(path),
    }
}

/// Whether `location` names an object-storage location rather than a local path.
pub fn is_url(location: &str) -> bool {
    SCHEMES.iter().any(|s| location.starts_with(s))
}

/// Whether `location` has a scheme phema does not read (`http://`, `az://`, ...).
pub fn unsupported_scheme(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once("://")?;
    let plain = scheme
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '+');
    (plain && !is_url(location)).then_some(scheme)
}

/// An object (or a prefix) in a bucket.
#[derive(Clone, Debug)]
pub struct Object {
    store: Arc<dyn ObjectStore>,
    key: Path,
    url: String,
}

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("phema-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| PhemaError::Invalid(format!("object storage: no I/O runtime ({e})")))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(runtime()?.block_on(f))
}

/// A number of an environment variable, or `default`.
fn env_number(name: &str, default: f64) -> Result<f64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(x) if (0.0..=1e6).contains(&x) => Ok(x),
            _ => Err(PhemaError::Invalid(format!(
                "{name}={v:?}: expected a number of 0 to 1e6"
            ))),
        },
    }
}

/// Retries on throttling, 5xx and lost connections: `PHEMA_STORAGE_RETRIES` (default 10) with
/// exponential backoff from 0.1 s, within `PHEMA_STORAGE_RETRY_TIMEOUT` seconds (default 180).
fn retry_config() -> Result<RetryConfig> {
    Ok(RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: env_number("PHEMA_STORAGE_RETRIES", 10.0)? as usize,
        retry_timeout: Duration::from_secs_f64(env_number("PHEMA_STORAGE_RETRY_TIMEOUT", 180.0)?),
    })
}

/// One client per bucket and configuration, shared by every object in it (connections reused).
fn client(scheme: &str, bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let settings: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("PHEMA_STORAGE")
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let key = format!("{scheme}{bucket}\n{}", settings.join("\n"));
    let clients = CLIENTS.get_or_init(Default::default);
    if let Some(c) = clients.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(c);
    }
    let root = format!("{scheme}{bucket}");
    let made: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
        "s3://" => AmazonS3Builder::from_env()
            .with_url(&root)
            .with_retry(retry_config()?)
            .build()
            .map(|s| Arc::new(s) as _),
        _ => GoogleCloudStorageBuilder::from_env()
            .with_url(&root)
            .with_retry(retry_config()?)
            .build()
            .map(|s| Arc::new(s) as _),
    };
    let made = made.map_err(|e| remote(url, &e))?;
    if let Ok(mut m) = clients.lock() {
        m.insert(key, made.clone());
    }
    Ok(made)
}

/// An error on `url`, phrased from what the store said.
fn remote(url: &str, e: &object_store::Error) -> PhemaError {
    let reason = match e {
        object_store::Error::NotFound { .. } => "not found".to_string(),
        object_store::Error::AlreadyExists { .. } => "already exists".to_string(),
        object_store::Error::Precondition { .. } => {
            "changed since it was listed (another version of the object is there now)".to_string()
        }
        other => {
            // The crate's messages nest the cause; its last line names it.
            let full = other.to_string();
            let mut text = full.replace('\n', " ");
            if text.len() > 400 {
                text.truncate(400);
                text.push_str("...");
            }
            text
        }
    };
    PhemaError::Remote {
        url: url.to_string(),
        reason,
    }
}

impl Object {
    /// The object at `url` (`s3://bucket/key` or `gs://bucket/key`; the key may be empty).
    pub fn parse(url: &str) -> Result<Object> {
        let Some(scheme) = SCHEMES.iter().find(|s| url.starts_with(*s)) else {
            return Err(PhemaError::Invalid(format!(
                "{url}: not an object-storage URL (s3://bucket/key or gs://bucket/key)"
            )));
        };
        let rest = &url[scheme.len()..];
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(PhemaError::Invalid(format!("{url}: no bucket named")));
        }
        let key = Path::parse(key.trim_end_matches('/'))
            .map_err(|e| PhemaError::Invalid(format!("{url}: not a valid object key ({e})")))?;
        Ok(Object {
            store: client(scheme, bucket, url)?,
            key,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// The object `name` under this prefix.
    pub fn child(&self, name: &str) -> Object {
        Object {
            store: self.store.clone(),
            key: self.key.clone().join(name),
            url: format!("{}/{name}", self.url),
        }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bytes `range` of the object, from the version `etag` names when given.
    async fn get(
        &self,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<(bytes::Bytes, u64, Option<String>)> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            if_match: etag.map(str::to_string),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&self.key, options)
            .await
            .map_err(|e| remote(&self.url, &e))?;
        let size = got.meta.size;
        let tag = got.meta.e_tag.clone();
        let bytes = got.bytes().await.map_err(|e| remote(&self.url, &e))?;
        Ok((bytes, size, tag))
    }

    /// Fills `buf` from byte `at`, from the version `etag` names.
    pub fn read_at(&self, at: u64, buf: &mut [u8], etag: Option<&str>) -> Result<()> {
        let end = at
            .checked_add(buf.len() as u64)
            .ok_or_else(|| PhemaError::Invalid(format!("{}: a range beyond 2^64", self.url)))?;
        let (bytes, _, _) = block_on(self.get(at..end, etag))??;
        if bytes.len() != buf.len() {
            return Err(PhemaError::Remote {
                url: self.url.clone(),
                reason: format!(
                    "asked for {} bytes at {at}, got {}: it changed since it was listed",
                    buf.len(),
                    bytes.len()
                ),
            });
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// The safetensors header, by two ranged reads (the length, then the JSON); the header
    /// records the version read, so later reads of the data refuse any other.
    pub fn read_header(&self) -> Result<Header> {
        block_on(async {
            let (prefix, size, tag) = self.get(0..8, None).await.map_err(|e| match e {
                PhemaError::Remote { reason, .. } if reason.contains("Range") => {
                    corrupt_short(self, 0)
                }
                e => e,
            })?;
            let prefix: [u8; 8] = prefix[..]
                .try_into()
                .map_err(|_| corrupt_short(self, size))?;
            let n = header_len(FsPath::new(&self.url), prefix, size)?;
            debug_assert!(n <= MAX_HEADER);
            let (json, _, _) = self.get(8..8 + n, tag.as_deref()).await?;
            let mut header = parse(FsPath::new(&self.url), n, &json, size)?;
            header.version = tag;
            Ok(header)
        })?
    }

    /// The whole object, refused beyond `MAX_SMALL` bytes (an index, a configuration).
    pub fn read_small(&self) -> Result<Vec<u8>> {
        block_on(async {
            let meta = self
                .store
                .head(&self.key)
                .await
                .map_err(|e| remote(&self.url, &e))?;
            if meta.size > MAX_SMALL {
                return Err(PhemaError::Remote {
                    url: self.url.clone(),
                    reason: format!("{} bytes: too large to read whole", meta.size),
                });
            }
            let got = self
                .store
                .get(&self.key)
                .await
                .map_err(|e| remote(&self.url, &e))?;
            Ok(got
                .bytes()
                .await
                .map_err(|e| remote(&self.url, &e))?
                .to_vec())
        })?
    }

    /// Whether the object exists.
    pub fn exists(&self) -> Result<bool> {
        block_on(async {
            match self.store.head(&self.key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(remote(&self.url, &e)),
            }
        })?
    }

    /// The objects directly under this prefix (name, size) and its sub-prefixes (names).
    pub fn list(&self) -> Result<Listing> {
        let found = block_on(self.store.list_with_delimiter(Some(&self.key)))?
            .map_err(|e| remote(&self.url, &e))?;
        let name = |p: &Path| p.filename().unwrap_or_default().to_string();
        let mut files: Vec<(String, u64, Option<String>)> = found
            .objects
            .iter()
            .map(|m| (name(&m.location), m.size, m.e_tag.clone()))
            .collect();
        files.sort();
        let mut dirs: Vec<String> = found.common_prefixes.iter().map(name).collect();
        dirs.sort();
        Ok(Listing { files, dirs })
    }

    /// Stores `bytes` as the object; with `create`, only if no object is there (conditional
    /// PUT): two writers cannot both succeed.
    pub fn put(&self, bytes: Vec<u8>, create: bool) -> Result<()> {
        let mode = if create {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        block_on(
            self.store
                .put_opts(&self.key, PutPayload::from(bytes), PutOptions::from(mode)),
        )?
        .map(|_| ())
        .map_err(|e| remote(&self.url, &e))
    }

    /// Uploads the local file `from` as the object. It appears under its name only when whole:
    /// one PUT, or a multipart upload completed last (aborted on any error). With `create`, an
    /// existing object is never replaced: one conditional PUT, or for a multipart upload a check
    /// before it starts (object storage has no create-only multipart completion; the store's
    /// claim keeps a second writer out, docs/storage.md).
    pub fn upload(&self, from: &FsPath, create: bool) -> Result<()> {
        crate::failpoint::reach("upload");
        let mut file = File::open(from).map_err(|e| PhemaError::io(from, e))?;
        let size = file.metadata().map_err(|e| PhemaError::io(from, e))?.len();
        if size <= SINGLE_PUT {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)
                .map_err(|e| PhemaError::io(from, e))?;
            return self.put(bytes, create);
        }
        if create && self.exists()? {
            return Err(remote(
                &self.url,
                &object_store::Error::AlreadyExists {
                    path: self.url.clone(),
                    source: "exists".into(),
                },
            ));
        }
        block_on(async {
            let upload = self
                .store
                .put_multipart(&self.key)
                .await
                .map_err(|e| remote(&self.url, &e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; PART];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = writer.abort().await;
                        return Err(PhemaError::io(from, e));
                    }
                };
                if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    let _ = writer.abort().await;
                    return Err(remote(&self.url, &e));
                }
                writer.write(&buf[..n]);
            }
            writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| remote(&self.url, &e))
        })?
    }

    /// Deletes the object (absent is fine).
    pub fn delete(&self) -> Result<()> {
        match block_on(self.store.delete(&self.key))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote(&self.url, &e)),
        }
    }

    /// Copies the object to `to` in the same bucket.
    pub fn copy_to(&self, to: &Object) -> Result<()> {
        block_on(self.store.copy(&self.key, &to.key))?.map_err(|e| remote(&self.url, &e))
    }
}

/// Read-ahead for one object: the byte ranges a job will read of it (many small reads, one per
/// work item), fetched in pieces of at most `piece` bytes (few large requests, as object storage
/// wants them). The first reader of a piece fetches it (others wait for the same request) and
/// starts fetching the next one in the background; a piece is dropped once all the bytes planned
/// in it were read. Reads outside the plan are fetched directly.
#[derive(Debug)]
pub struct ReadAhead {
    object: Object,
    version: Option<String>,
    pieces: Vec<Piece>,
}

/// One piece's data, fetched once.
type Cell = Arc<tokio::sync::OnceCell<bytes::Bytes>>;

#[derive(Debug)]
struct Piece {
    start: u64,
    len: u64,
    /// Planned bytes not read yet; at zero the data is dropped.
    left: AtomicU64,
    /// None once dropped.
    cell: Mutex<Option<Cell>>,
}

impl ReadAhead {
    /// The plan for reads `(at, len)` of `object` (its version `version`).
    pub fn new(
        object: Object,
        version: Option<String>,
        mut reads: Vec<(u64, u64)>,
        piece: u64,
    ) -> ReadAhead {
        reads.retain(|&(_, n)| n > 0);
        reads.sort_unstable();
        let piece = piece.max(1);
        let mut pieces: Vec<Piece> = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        let cut = |a: u64, b: u64, pieces: &mut Vec<Piece>| {
            let mut s = a;
            while s < b {
                let len = piece.min(b - s);
                pieces.push(Piece {
                    start: s,
                    len,
                    left: AtomicU64::new(0),
                    cell: Mutex::new(Some(Cell::default())),
                });
                s += len;
            }
        };
        for &(at, n) in &reads {
            let end = at.saturating_add(n);
            run = match run {
                Some((a, b)) if at <= b => Some((a, b.max(end))),
                Some((a, b)) => {
                    cut(a, b, &mut pieces);
                    Some((at, end))
                }
                None => Some((at, end)),
            };
        }
        if let Some((a, b)) = run {
            cut(a, b, &mut pieces);
        }
        let ahead = ReadAhead {
            object,
            version,
            pieces,
        };
        for &(at, n) in &reads {
            ahead.each_piece(at, n, |_, p, lo, hi| {
                p.left.fetch_add(hi - lo, Ordering::Relaxed);
            });
        }
        ahead
    }

    /// Calls `f(index, piece, from, to)` for the part `from..to` of `at..at + n` in each piece.
    fn each_piece(&self, at: u64, n: u64, mut f: impl FnMut(usize, &Piece, u64, u64)) {
        let end = at.saturating_add(n);
        let first = self.pieces.partition_point(|p| p.start + p.len <= at);
        for (i, p) in self.pieces[first..]
            .iter()
            .enumerate()
            .take_while(|(_, p)| p.start < end)
        {
            f(first + i, p, at.max(p.start), end.min(p.start + p.len));
        }
    }

    fn cell(&self, p: &Piece) -> Result<Option<Cell>> {
        Ok(p.cell.lock().map_err(|_| poisoned(&self.object))?.clone())
    }

    /// The request fetching piece `p`.
    fn fetch(&self, p: &Piece) -> impl std::future::Future<Output = Result<bytes::Bytes>> {
        let object = self.object.clone();
        let version = self.version.clone();
        let range = p.start..p.start + p.len;
        async move {
            let (bytes, _, _) = object.get(range.clone(), version.as_deref()).await?;
            if bytes.len() as u64 != range.end - range.start {
                return Err(PhemaError::Remote {
                    url: object.url.clone(),
                    reason: "shorter than listed: it changed since it was listed".into(),
                });
            }
            Ok(bytes)
        }
    }

    /// The data of piece `i`, fetched now unless a request for it is done or under way (then
    /// waited for); the next piece is requested in the background. None once it was dropped.
    fn data(&self, i: usize) -> Result<Option<bytes::Bytes>> {
        let p = &self.pieces[i];
        let Some(cell) = self.cell(p)? else {
            return Ok(None);
        };
        if !cell.initialized() {
            if let Some(next) = self.pieces.get(i + 1) {
                if let Some(c) = self.cell(next)?.filter(|c| !c.initialized()) {
                    let fetch = self.fetch(next);
                    // A failed read-ahead leaves the piece empty: its reader fetches it again
                    // and reports the error.
                    runtime()?.spawn(async move {
                        let _ = c.get_or_try_init(|| fetch).await;
                    });
                }
            }
        }
        let fetch = self.fetch(p);
        Ok(Some(block_on(cell.get_or_try_init(|| fetch))??.clone()))
    }

    /// Fills `buf` from byte `at`, from the pieces where planned.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let mut covered = 0u64;
        let mut failed = None;
        self.each_piece(at, buf.len() as u64, |i, p, lo, hi| {
            if failed.is_some() {
                return;
            }
            let dst = &mut buf[(lo - at) as usize..(hi - at) as usize];
            let filled = match self.data(i) {
                Ok(Some(d)) => {
                    dst.copy_from_slice(&d[(lo - p.start) as usize..(hi - p.start) as usize]);
                    Ok(())
                }
                Ok(None) => self.object.read_at(lo, dst, self.version.as_deref()),
                Err(e) => Err(e),
            };
            if let Err(e) = filled {
                failed = Some(e);
                return;
            }
            let n = hi - lo;
            covered += n;
            let before = p
                .left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    Some(l.saturating_sub(n))
                })
                .unwrap_or(0);
            if before <= n {
                if let Ok(mut cell) = p.cell.lock() {
                    *cell = None;
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if covered == buf.len() as u64 {
            return Ok(());
        }
        // Not (all) planned: read directly. A read is either inside the plan or outside it, so
        // this rereads at most a few planned bytes.
        self.object.read_at(at, buf, self.version.as_deref())
    }
}

fn poisoned(o: &Object) -> PhemaError {
    PhemaError::Remote {
        url: o.url.clone(),
        reason: "a reader failed while holding its read-ahead".into(),
    }
}

fn corrupt_short(o: &Object, size: u64) -> PhemaError {
    PhemaError::Corrupt {
        path: o.url.clone().into(),
        reason: format!("only {size} bytes, shorter than a header"),
    }
}

/// What is directly under a prefix.
#[derive(Debug, Default)]
pub struct Listing {
    /// Objects: name, size, version tag.
    pub files: Vec<(String, u64, Option<String>)>,
    /// Sub-prefixes ("directories"), by name.
    pub dirs: Vec<String>,
}

/// Uploads staged local files to their URLs in the given order (an index or the weights last,
/// so a listing accepts the output only once all of it is there), then removes the staged
/// files. On an error every object this call created is deleted again, so nothing partial stays
/// under the output's names; the error names the object.
pub fn publish(files: &[(std::path::PathBuf, String)], create: bool) -> Result<()> {
    let mut done: Vec<Object> = Vec::new();
    let result = files.iter().try_for_each(|(from, url)| {
        let o = Object::parse(url)?;
        o.upload(from, create)?;
        done.push(o);
        Ok(())
    });
    if result.is_err() {
        for o in done.iter().rev() {
            let _ = o.delete();
        }
    }
    for (from, _) in files {
        let _ = std::fs::remove_file(from);
    }
    result
}

/// Claims `url` for `content` (a run id): creates the object if absent. Returns what it holds
/// when it was there already (the claim of this run or of another).
pub fn claim(url: &str, content: &[u8]) -> Result<Option<Vec<u8>>> {
    let o = Object::parse(url)?;
    match o.put(content.to_vec(), true) {
        Ok(()) => Ok(None),
        Err(PhemaError::Remote { reason, .. })
            if reason == "already exists" || reason.starts_with("changed since") =>
        {
            Ok(Some(o.read_small()?))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://b/k"));
        assert!(is_url("gs://b"));
        assert!(!is_url("/tmp/s3://x"));
        assert!(!is_url("store"));
        assert_eq!(unsupported_scheme("http://host/x"), Some("http"));
        assert_eq!(unsupported_scheme("az://c/x"), Some("az"));
        assert_eq!(unsupported_scheme("s3://b/x"), None);
        assert_eq!(unsupported_scheme("dir/with://odd"), None);
    }

    #[test]
    fn a_url_without_bucket_or_with_a_bad_key_is_refused_naming_it() {
        for url in ["s3://", "s3:///k", "gs:///"] {
            let e = Object::parse(url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains("bucket"), "{e}");
        }
        let e = Object::parse("s3://b/a/../c").unwrap_err().to_string();
        assert!(e.contains("s3://b/a/../c"), "{e}");
    }
}
