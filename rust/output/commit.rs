//! The commit rule (docs/store-format.md): a file is written under a temporary name, synced,
//! and takes its final name in one step; several files commit together or not at all.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{PhemaError, Result};
use crate::remote::{is_url, Object};

/// Temporary files made by this process so far: with host and pid, each writer's name is unique.
pub(super) static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// This machine's name as temporary names carry it (docs/store-format.md): `/` and `-` replaced.
pub(super) fn host() -> &'static str {
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
pub(super) fn temporary_pid(file_name: &str) -> Option<i32> {
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
pub(super) fn is_dead(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the temporary files in `dir` that a writer on this host left when it died (killed
/// before it could clean up), once per directory and process. Other hosts' temporaries are
/// never touched: they may be writing to the same shared directory.
pub(super) fn remove_stale_temporaries(dir: &Path) {
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
pub(super) fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
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
pub(super) fn commit_file(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    remove_stale_temporaries(path.parent().unwrap_or(Path::new(".")));
    let tmp = temporary_path(path);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| fill(&mut f).and_then(|_| f.sync_all()))
        .and_then(|_| {
            crate::failpoint::reach("file");
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(PhemaError::io(path, e));
    }
    sync_dir(path);
    Ok(())
}

/// One commit of several files under their final names: each file already at a final name is
/// set aside first; if a later step fails, the files placed are removed and what they replaced
/// is put back, so no partial set is left and no earlier output is lost.
#[derive(Default)]
pub(super) struct Commit {
    pub(super) done: Vec<PathBuf>,
    pub(super) aside: Vec<(PathBuf, PathBuf)>,
}

impl Commit {
    /// Puts a file at `path` by `put` (which returns where it went), setting aside the old one.
    pub(super) fn place(
        &mut self,
        path: &Path,
        put: impl FnOnce() -> Result<PathBuf>,
    ) -> Result<PathBuf> {
        crate::failpoint::reach("commit");
        set_aside(path, &mut self.aside)?;
        let placed = put()?;
        self.done.push(placed.clone());
        Ok(placed)
    }

    /// Keeps the commit if `result` is Ok (the set-aside files go), else rolls it back.
    pub(super) fn end(self, result: Result<()>) -> Result<()> {
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
pub(super) fn set_aside(path: &Path, aside: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
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
