//! The one error type of the crate: every variant names the value or file at fault.

use std::path::PathBuf;

/// Everything that can go wrong in phema's core, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PhemaError {
    /// A numeric argument outside its valid range (or NaN).
    #[error("{name}={} is out of range: {expected}", number(*value))]
    OutOfRange {
        /// The argument's name as the user wrote it.
        name: &'static str,
        /// The value given.
        value: f64,
        /// What would have been accepted.
        expected: String,
    },
    /// An argument that is malformed in some other way.
    #[error("{0}")]
    Invalid(String),
    /// The solver cannot serve a target with the snapshots it has.
    #[error("{0}")]
    Unsolvable(String),
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file that should be a safetensors snapshot is truncated or corrupt.
    #[error("{path}: not a valid safetensors file ({reason})")]
    Corrupt {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store whose contents contradict each other (duplicates, disagreeing tensors).
    #[error("{0}")]
    Store(String),
    /// A `phema.*` metadata value that is missing, malformed or out of range
    /// (docs/store-format.md).
    #[error("{}: `{key}` {reason}", path.display())]
    Metadata {
        /// The file at fault.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A size or position computed from a file does not fit in 64 bits.
    #[error("{}: {what} overflows", path.display())]
    Overflow {
        /// The file at fault.
        path: PathBuf,
        /// What was being computed.
        what: String,
    },
    /// An object-storage request failed (after its retries) or found the object changed.
    #[error("{url}: {reason}")]
    Remote {
        /// The object or prefix at fault.
        url: String,
        /// What the store said.
        reason: String,
    },
    /// The caller asked the work to stop; nothing was committed.
    #[error("cancelled")]
    Cancelled,
}

/// Result with [`PhemaError`].
pub type Result<T> = std::result::Result<T, PhemaError>;

impl PhemaError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let source = match source.raw_os_error() {
            Some(libc::EMFILE) => std::io::Error::new(
                source.kind(),
                format!(
                    "{source}: a run holds each output file and each input open at once; raise \
                     the open-file limit (ulimit -n, now {}) or write fewer targets per run",
                    open_file_limit()
                ),
            ),
            _ => source,
        };
        PhemaError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `x` as people write it: plain digits in the usual range, an exponent for the very small or
/// large (1e-300, not 300 zeros).
pub fn number(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-5..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// This process's limit on open files (`RLIMIT_NOFILE`, soft), as `ulimit -n` shows it.
fn open_file_limit() -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return "unknown".into();
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        limit.rlim_cur.to_string()
    }
}
