//! The one gate in front of every kernel test: [`require_kernel!`].
//!
//! A kernel test loads the real programs, so it needs root, bpffs at
//! /sys/fs/bpf, a cgroup v2 hierarchy and a kernel with the program types
//! and helpers connlimit uses. The test binary decides once whether all of
//! that is present; a test then runs, or fails with what is missing and the
//! fix. Only `CONNLIMIT_SKIP_KERNEL_TESTS=1` skips them, explicitly: a
//! machine that cannot run them never passes them silently.

use std::sync::OnceLock;

use connlimit::ebpf::{kernel_features, mounts};

/// The variable that skips the kernel tests when it is `1`.
pub const SKIP_KERNEL_TESTS: &str = "CONNLIMIT_SKIP_KERNEL_TESTS";

/// Returns from the calling test when the kernel tests are skipped
/// (`CONNLIMIT_SKIP_KERNEL_TESTS=1`, with one line saying so), and fails
/// it when the host lacks one of their requirements
/// ([`missing_requirements`]). Put it first in every kernel test:
///
/// ```no_run
/// use harness::require_kernel;
///
/// fn refusal_is_an_immediate_reset() {
///     require_kernel!();
///     // ...
/// }
/// # refusal_is_an_immediate_reset();
/// ```
#[macro_export]
macro_rules! require_kernel {
    () => {
        if !$crate::kernel_tests_run() {
            return;
        }
    };
}

enum Decision {
    Run,
    Skip,
    Missing(Vec<String>),
}

/// What [`require_kernel!`] calls: `true` when the kernel tests run, `false`
/// when they are skipped; panics with the fix when a requirement is missing.
/// Decided once per process.
pub fn kernel_tests_run() -> bool {
    static DECISION: OnceLock<Decision> = OnceLock::new();
    let decision = DECISION.get_or_init(|| {
        if std::env::var(SKIP_KERNEL_TESTS).is_ok_and(|v| v == "1") {
            return Decision::Skip;
        }
        match missing_requirements() {
            missing if missing.is_empty() => Decision::Run,
            missing => Decision::Missing(missing),
        }
    });
    match decision {
        Decision::Run => true,
        Decision::Skip => {
            eprintln!("skipped: {SKIP_KERNEL_TESTS}=1");
            false
        }
        Decision::Missing(missing) => panic!(
            "the kernel tests load eBPF programs and cannot run here: {}; run them as root on Linux {MIN_LINUX} or later with \
             cgroup v2 and bpffs (`cargo xtask test` mounts it), or set {SKIP_KERNEL_TESTS}=1 to skip them explicitly",
            missing.join("; "),
            MIN_LINUX = kernel_features::MIN_LINUX
        ),
    }
}

/// What this host lacks for loading and attaching connlimit's programs, one
/// entry per requirement; empty when it has everything.
pub fn missing_requirements() -> Vec<String> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Without root neither the mounts nor the kernel can be probed.
        return vec!["not running as root".into()];
    }
    let mut missing = Vec::new();
    if let Err(e) = mounts::require_bpffs() {
        missing.push(e.to_string());
    }
    if let Err(e) = mounts::cgroup2_mount() {
        missing.push(e.to_string());
    }
    // The same probe as attaching: one line per feature the kernel lacks.
    if let Err(e) = kernel_features::require() {
        missing.push(e.to_string());
    }
    missing
}
