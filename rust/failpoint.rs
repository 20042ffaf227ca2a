//! Failpoints for the crash tests: a process killed at a chosen step of a commit or upload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The crash tests' kill -9 at a chosen step (`tests/test_crash.py`): with
/// `PHEMA_FAILPOINT=NAME:N` in the environment the process aborts, as if killed, when it reaches
/// step `NAME` for the `N`th time (`commit`: before a file takes its final name in a commit;
/// `file`: a small file or copy written but not yet renamed; `upload`: before an object is
/// uploaded). Read once; unset, it costs one
/// atomic load per step.
pub fn reach(name: &str) {
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
