//! The thread pool every parallel step runs on, started and checked before the first one: a
//! process that may not start threads (`ulimit -u`, or `ulimit -v` without room for their
//! stacks) gets one error naming the limit instead of a panic inside that step.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{PhemaError, Result};

/// Starts the global thread pool if it is not running; an error names why it cannot start
/// (and the next call tries again: the limit may have been raised).
pub fn ensure_pool() -> Result<()> {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.load(Ordering::Acquire) {
        return Ok(());
    }
    match rayon::ThreadPoolBuilder::new().build_global() {
        Ok(()) => {}
        // Started already, by another caller or another library in this process: rayon says
        // so only in the error's text.
        Err(e) if e.to_string().contains("already been initialized") => {}
        Err(e) => {
            return Err(PhemaError::Invalid(format!(
                "cannot start phema's worker threads ({e}): raise the limit on processes \
                 (ulimit -u) or address space (ulimit -v)"
            )))
        }
    }
    STARTED.store(true, Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_starts_once_and_later_calls_see_it_running() {
        ensure_pool().unwrap();
        ensure_pool().unwrap();
        assert!(rayon::current_num_threads() >= 1);
    }
}
