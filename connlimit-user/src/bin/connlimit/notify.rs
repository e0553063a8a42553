//! The systemd notification protocol (sd_notify(3)): one datagram to the
//! socket named by `$NOTIFY_SOCKET`, if there is one.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager; does nothing when
/// not started by one. Failures are logged, never fatal: enforcement
/// matters more than the manager's view of it.
pub fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_to(&target, state) {
        tracing::warn!(socket = ?target, error = %e, "could not notify the service manager");
    }
}

fn send_to(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd uses these in containers).
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(target))?;
    }
    Ok(())
}

/// `MONOTONIC_USEC=...`: the clock reading systemd wants next to
/// `RELOADING=1`.
pub fn monotonic_usec() -> String {
    format!("MONOTONIC_USEC={}", connlimit::ebpf::clock::monotonic_ns() / 1000)
}
