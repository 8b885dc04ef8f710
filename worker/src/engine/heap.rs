//! Handing the memory of dropped KV caches back to the OS.
//!
//! glibc keeps freed chunks resident, and the caches of later sequences, which grow through
//! other sizes, reuse only part of them: without this, each batch of long-lived sequences left
//! the worker's resident memory a little higher than the last, past the KV budget.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes freed since the heap was last trimmed.
static FREED: AtomicUsize = AtomicUsize::new(0);

/// Freed bytes that make a trim worth its cost (a walk of the free lists and some page faults
/// later): a few sequences' caches, not every short one.
const TRIM_AFTER: usize = 32 << 20;

/// Notes that `bytes` of KV cache were freed, and trims the heap once enough have been.
pub fn freed(bytes: usize) {
    if due(&FREED, bytes) {
        trim();
    }
}

/// Adds `bytes` to `count`; true (and the count restarted) once it reaches [`TRIM_AFTER`].
fn due(count: &AtomicUsize, bytes: usize) -> bool {
    let due = count.fetch_add(bytes, Ordering::Relaxed) + bytes >= TRIM_AFTER;
    if due {
        count.store(0, Ordering::Relaxed);
    }
    due
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the OS.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frees_add_up_until_a_trim() {
        let count = AtomicUsize::new(0);
        assert!(!due(&count, TRIM_AFTER / 2));
        assert!(!due(&count, TRIM_AFTER / 2 - 1));
        assert!(due(&count, 1));
        assert_eq!(count.load(Ordering::Relaxed), 0, "a trim restarts the count");
        assert!(due(&count, TRIM_AFTER * 3), "one large cache is enough");
    }
}
