//! The process's allocator setting. A blob copy moves megabyte buffers
//! (ranged parts, S3 part uploads) between threads; glibc's malloc raises
//! its mmap threshold each time such a buffer is freed, after which they
//! come from per-thread heaps that keep the freed memory: measured here, a
//! 1 GiB copy to S3 peaked at 147 MiB RSS that way and at 91 MiB with the
//! threshold fixed. Fixing it sends every buffer of 1 MiB or more to its own
//! mapping, returned to the system when freed.
//!
//! Fixing it also fixes the trim threshold, at 128 KiB: each heap then gave
//! back the HTTP client's freed read buffers (a few hundred KiB) at once and
//! faulted in zeroed pages for the next ones, about a tenth of a copy's CPU
//! under `perf`. At 4 MiB those buffers are reused (BENCHMARKS.md rows 15–19
//! give the copies' speed and peak RSS with it).

/// Fixes the mmap threshold at 1 MiB and the trim threshold at 4 MiB
/// (glibc only; elsewhere nothing).
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tunables of glibc's allocator; it is
    // called first thing in `main`, before any copy allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}
