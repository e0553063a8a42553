//! 64-bit atomics on map memory.
//!
//! The BPF target leaves out `AtomicU64`'s read-modify-write methods, but
//! the compiler intrinsics lower to the BPF atomic instructions (ISA v3,
//! kernel 5.12+). Elsewhere (clippy and `cargo check` on the host) the same
//! functions use `AtomicU64`.

/// Sets `*ptr` to `new` if it is `old`; otherwise returns what it is.
///
/// # Safety
/// `ptr` is valid, 8-byte aligned, and only ever accessed atomically.
#[inline(always)]
pub unsafe fn compare_exchange(ptr: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg};
        match unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(ptr, old, new) } {
            (_, true) => Ok(()),
            (actual, false) => Err(actual),
        }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
        unsafe { AtomicU64::from_ptr(ptr) }.compare_exchange(old, new, SeqCst, SeqCst).map(|_| ())
    }
}

/// Adds `n` to `*ptr`.
///
/// # Safety
/// As for [`compare_exchange`].
#[inline(always)]
pub unsafe fn add(ptr: *mut u64, n: u64) {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(ptr, n) };
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
        unsafe { AtomicU64::from_ptr(ptr) }.fetch_add(n, Relaxed);
    }
}

/// Adds `n` to `*ptr` and returns what it held before.
///
/// # Safety
/// As for [`compare_exchange`].
#[inline(always)]
pub unsafe fn fetch_add(ptr: *mut u64, n: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::SeqCst, atomic_xadd};
        unsafe { atomic_xadd::<u64, u64, { SeqCst }>(ptr, n) }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
        unsafe { AtomicU64::from_ptr(ptr) }.fetch_add(n, SeqCst)
    }
}
