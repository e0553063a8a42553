//! The targets of a service file's instances: the cgroup and network
//! namespace each names, and what to tell the operator when one is missing.

use std::path::{Path, PathBuf};

use anyhow::Result;
use connlimit::ebpf::{EbpfError, mounts, netns};

use crate::config_file::{InstanceSpec, Target};

/// `e`, said as what the operator can do about it when the target is
/// missing: the cgroup directory or process does not exist (yet).
pub(crate) fn missing_target(spec: &InstanceSpec, e: anyhow::Error) -> anyhow::Error {
    match &spec.target {
        Target::Cgroup(path) if !path.exists() => anyhow::anyhow!(
            "the cgroup {} does not exist; start the service it belongs to (connlimit attaches it when it \
             appears) or correct `cgroup =` in the service file",
            path.display()
        ),
        Target::Pid(pid) if !Path::new(&format!("/proc/{pid}")).exists() => anyhow::anyhow!(
            "process {pid} does not exist; give the server's `cgroup =` instead of a pid that changes, \
             or correct `pid =` in the service file"
        ),
        _ => e,
    }
}

/// The cgroup and network namespace of a target.
pub(crate) fn resolve(target: &Target) -> Result<(PathBuf, PathBuf)> {
    match target {
        Target::Cgroup(path) => Ok((path.clone(), PathBuf::from(netns::OWN_NETNS))),
        Target::Unit(unit) => crate::unit::resolve(unit),
        Target::Pid(pid) => {
            let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Err(EbpfError::Netns(_, e)) = netns::NetnsId::of(&netns)
                && e.kind() == std::io::ErrorKind::PermissionDenied
            {
                anyhow::bail!(
                    "cannot open {}: guarding another user's process by pid needs CAP_SYS_PTRACE; \
                     add it to the unit's capabilities, or give the process's cgroup instead",
                    netns.display()
                );
            }
            Ok((mounts::cgroup_of_pid(*pid)?, netns))
        }
    }
}
