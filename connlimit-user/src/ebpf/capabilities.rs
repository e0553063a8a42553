//! What this process may do: its Linux capabilities, and access to the
//! pin directories. Checked before touching the kernel, so that a missing
//! privilege gives one clear error rather than an EPERM half-way.

use std::{ffi::CString, fs, io, os::unix::ffi::OsStrExt, path::Path};

use super::EbpfError;

/// A Linux capability connlimit may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its name, as in capabilities(7) and systemd's `AmbientCapabilities=`.
    pub name: &'static str,
    /// Its bit in the capability sets.
    pub bit: u32,
}

/// Reading pins under a root-only bpffs directory one does not own.
pub const CAP_DAC_READ_SEARCH: Capability = Capability { name: "CAP_DAC_READ_SEARCH", bit: 2 };
/// Loading and attaching networking programs (sock_ops, sk_lookup).
pub const CAP_NET_ADMIN: Capability = Capability { name: "CAP_NET_ADMIN", bit: 12 };
/// Opening another user's `/proc/<pid>/ns/net` (`run --pid`).
pub const CAP_SYS_PTRACE: Capability = Capability { name: "CAP_SYS_PTRACE", bit: 19 };
/// Full verifier latitude (pointer comparisons, Spectre-mitigation
/// exemptions) that the programs rely on.
pub const CAP_PERFMON: Capability = Capability { name: "CAP_PERFMON", bit: 38 };
/// Creating maps and loading programs.
pub const CAP_BPF: Capability = Capability { name: "CAP_BPF", bit: 39 };

/// What attaching an instance needs: checked up front so that a missing
/// one gives one clear error rather than an EPERM half-way.
pub const ATTACH_CAPABILITIES: [Capability; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// The effective capability set of this process (`CapEff` in
/// /proc/self/status).
pub fn effective_capabilities() -> Result<u64, EbpfError> {
    let status =
        fs::read_to_string("/proc/self/status").map_err(|e| EbpfError::system("reading /proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| EbpfError::system("reading /proc/self/status", "no CapEff line"))
}

/// CAP_SYS_ADMIN: the kernel accepts it in place of CAP_BPF and CAP_PERFMON
/// (`bpf_capable()`, `perfmon_capable()`), as kernels before 5.8 required.
const CAP_SYS_ADMIN_BIT: u32 = 21;

/// Fails with [`EbpfError::MissingCapabilities`], naming each missing one,
/// unless this process holds all of `needed` in its effective set.
pub fn require_capabilities(needed: &[Capability]) -> Result<(), EbpfError> {
    let effective = effective_capabilities()?;
    let held = |c: &Capability| {
        effective & (1 << c.bit) != 0
            || ([CAP_BPF.bit, CAP_PERFMON.bit].contains(&c.bit) && effective & (1 << CAP_SYS_ADMIN_BIT) != 0)
    };
    let missing: Vec<&str> = needed.iter().filter(|c| !held(c)).map(|c| c.name).collect();
    if missing.is_empty() { Ok(()) } else { Err(EbpfError::MissingCapabilities(missing.join(", "))) }
}

/// Fails with [`EbpfError::PinsInaccessible`] if this process may not
/// enter and read `path` (or, while it does not exist, its nearest existing
/// ancestor): bpffs and connlimit's pin root are root-only by default.
pub fn require_access(path: &Path) -> Result<(), EbpfError> {
    let mut at = path;
    loop {
        let c = CString::new(at.as_os_str().as_bytes()).map_err(|e| EbpfError::system("checking a path", e))?;
        // SAFETY: `c` is NUL-terminated. AT_EACCESS checks with the
        // effective ids and capabilities, as opening will.
        if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::R_OK | libc::X_OK, libc::AT_EACCESS) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match (e.kind(), at.parent()) {
            (io::ErrorKind::NotFound, Some(parent)) => at = parent,
            (io::ErrorKind::PermissionDenied, _) => return Err(EbpfError::PinsInaccessible(at.to_owned())),
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_and_checked() {
        let effective = effective_capabilities().unwrap();
        // Whatever this process holds, it holds; what it lacks is named.
        let mine: Vec<Capability> =
            [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON].into_iter().filter(|c| effective & (1 << c.bit) != 0).collect();
        require_capabilities(&mine).unwrap();
        let absent = Capability { name: "CAP_NOT_A_REAL_ONE", bit: 63 };
        let err = require_capabilities(&[absent]).unwrap_err().to_string();
        assert!(err.starts_with("connlimit lacks CAP_NOT_A_REAL_ONE;"), "{err}");
    }
}
