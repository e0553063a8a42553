//! Network namespaces: which one to guard, how to tell them apart, and the
//! cookie the kernel programs know one by.

use std::{
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use super::EbpfError;

/// This process's network namespace, as an nsfs path (the default
/// namespace to guard).
pub const OWN_NETNS: &str = "/proc/self/ns/net";

/// A network namespace's identity: the device and inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace file `path` (e.g. `/proc/self/ns/net`).
    pub fn of(path: &Path) -> Result<Self, EbpfError> {
        let meta = fs::metadata(path).map_err(|e| EbpfError::Netns(path.to_owned(), e))?;
        Ok(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

/// The cookie of the network namespace at `netns` (`SO_NETNS_COOKIE`, Linux
/// 5.14+), or 0 when the kernel cannot say: then sock_ops counts the
/// guarded cgroup's sockets of every namespace.
pub fn netns_cookie(netns: &Path) -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let cookie = super::sock_diag::in_netns(netns, || {
        // SAFETY: plain syscalls on a socket we own.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a u64 out-buffer of the stated length.
        let rc = unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
        };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
    });
    cookie.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the network namespace's cookie (Linux 5.14+); sockets of the cgroup in other namespaces will be counted too");
        0
    })
}
