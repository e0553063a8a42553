//! Who listens on the guarded ports, and whether the limit can see them.
//!
//! sock_ops counts only sockets of the guarded cgroup, and a connection
//! belongs to its listener's cgroup. A listener outside it (systemd socket
//! activation, a server moved after it opened its socket) has its
//! connections neither counted nor limited, so this is said out loud.

use std::path::Path;

use super::{mounts, sock_diag};

/// What is wrong with a guarded port's listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerProblem {
    /// Nothing listens on the port (yet).
    NoListener {
        /// The guarded port.
        port: u16,
    },
    /// A listener of the port belongs to a cgroup outside the guarded one
    /// and those below it: its connections are neither counted nor limited.
    OutsideCgroup {
        /// The guarded port.
        port: u16,
        /// The id of the listener's cgroup.
        cgroup_id: u64,
    },
}

impl std::fmt::Display for ListenerProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoListener { port } => write!(f, "nothing listens on port {port} yet"),
            Self::OutsideCgroup { port, cgroup_id } => write!(
                f,
                "a listener on port {port} is in a cgroup outside the guarded one (id {cgroup_id}), so its connections are neither \
                 counted nor limited; start the server inside the guarded cgroup, or guard the server's own cgroup \
                 (`--pid` of the process that opened the listener)"
            ),
        }
    }
}

/// Checks the listeners of `ports` in the network namespace `netns` against
/// the guarded cgroup (its id: the inode of its directory) and the cgroups
/// below it, whose sockets are counted too.
pub fn check(netns: &Path, ports: &[u16], cgroup_id: u64) -> std::io::Result<Vec<ListenerProblem>> {
    let guarded = mounts::cgroup_subtree(cgroup_id);
    let listeners = sock_diag::in_netns(netns, || sock_diag::SockDiag::open()?.listeners())?;
    let mut problems = Vec::new();
    for &port in ports {
        let on_port: Vec<_> = listeners.iter().filter(|l| l.local_port == port).collect();
        if on_port.is_empty() {
            problems.push(ListenerProblem::NoListener { port });
        }
        if let Some(outside) = on_port.iter().find(|l| !guarded.contains(&l.cgroup_id)) {
            problems.push(ListenerProblem::OutsideCgroup { port, cgroup_id: outside.cgroup_id });
        }
    }
    Ok(problems)
}

/// Logs what [`check`] finds: a warning for listeners the limit cannot see.
pub(crate) fn warn_about(netns: &Path, ports: &[u16], cgroup: &Path) {
    let checked = mounts::inode(cgroup).map_err(std::io::Error::other).and_then(|id| check(netns, ports, id));
    match checked {
        Ok(problems) => {
            for problem in problems {
                match problem {
                    ListenerProblem::NoListener { .. } => tracing::info!("{problem}"),
                    ListenerProblem::OutsideCgroup { .. } => tracing::warn!("{problem}"),
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not list the guarded ports' listeners"),
    }
}
