//! Giving freed memory back to the kernel after a reconcile pass.
//!
//! A pass over a 100,000-entry plan builds the planned and the observed
//! tree (tens of MiB) and frees them. glibc keeps freed heap pages resident
//! unless asked, so a DaemonSet agent that peaked once would look that size
//! forever to the kubelet's memory accounting.

/// Returns free heap pages to the kernel (glibc's `malloc_trim`); a no-op
/// on other C libraries.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own arenas
    // under their locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
