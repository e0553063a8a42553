//! What can go wrong attaching or driving the kernel limiter, and how to fix it.

use std::{fmt, io, path::PathBuf};

use super::kernel_features::{KernelFeature, MIN_LINUX, MIN_LINUX_FOR};
use crate::ConfigError;

/// An error from the eBPF limiter. Each message says what is wrong and what
/// to do about it; when one is returned, nothing was left attached or pinned.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The process lacks capabilities that attaching needs.
    #[error(
        "connlimit lacks {0}; run it as root, or grant the capabilities (systemd: AmbientCapabilities=, see contrib/connlimit.service)"
    )]
    MissingCapabilities(String),
    /// The pin directories are not accessible to this user.
    #[error(
        "permission denied on {0}; run connlimit as root, or as the user owning /sys/fs/bpf/connlimit with CAP_DAC_READ_SEARCH (see contrib/connlimit.service)"
    )]
    PinsInaccessible(PathBuf),
    /// bpffs is not mounted where pins go.
    #[error(
        "no BPF filesystem is mounted at {0}; mount it for root alone with `mount -t bpf -o mode=0700 bpf {0}` (mode 0700: nobody else may create or replace pins)"
    )]
    BpffsMissing(PathBuf),
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted; mount one, e.g. `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    /// The given directory is not a cgroup v2 directory.
    #[error("{0} is not a cgroup v2 directory; give a directory under the cgroup2 mount ({1})")]
    NotCgroup2(PathBuf, PathBuf),
    /// The given network namespace cannot be opened.
    #[error("cannot open the network namespace {0}")]
    Netns(PathBuf, #[source] io::Error),
    /// The kernel lacks features the kernel programs use (see
    /// [`kernel_features`](super::kernel_features)).
    #[error(
        "connlimit needs Linux {} or later ({}); this kernel ({release}) lacks {}",
        MIN_LINUX,
        MIN_LINUX_FOR,
        .missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    MissingKernelFeatures {
        /// The running kernel's release (`uname -r`).
        release: String,
        /// What it lacks, oldest first.
        missing: Vec<KernelFeature>,
    },
    /// The kernel cannot run sk_lookup programs.
    #[error("this kernel cannot attach sk_lookup programs (connlimit needs Linux {MIN_LINUX} or later)")]
    NoSkLookup(#[source] io::Error),
    /// Another instance already guards one of the ports in this namespace.
    #[error(
        "port {port} is already guarded by connlimit instance {instance:?} in this network namespace; detach it (`connlimit detach --name {instance}`) or guard another port"
    )]
    PortTaken {
        /// The contested port.
        port: u16,
        /// The instance guarding it.
        instance: String,
    },
    /// An instance of this name exists already.
    #[error(
        "a connlimit instance named {0:?} already exists; pick another --name, or detach it first (`connlimit detach --name {0}`)"
    )]
    InstanceExists(String),
    /// A running process owns the instance.
    #[error(
        "connlimit instance {name:?} is owned by running process {pid}; stop that process first (`connlimit detach --name {name}`), or pick another --name"
    )]
    InstanceHeld {
        /// The instance.
        name: String,
        /// Its owner.
        pid: u32,
    },
    /// An instance to adopt is attached to another cgroup or namespace.
    #[error(
        "connlimit instance {0:?} is attached to another cgroup or network namespace; detach it first (`connlimit detach --name {0}`) or pick another --name"
    )]
    AdoptMismatch(String),
    /// The instance was pinned by a connlimit with another state layout.
    #[error(
        "connlimit instance {name:?} was pinned by a connlimit with state layout version {found}{} (this one reads version {}); remove it with `connlimit detach --name {name} --force`, then attach it again",
        if *.found == 0 { " (from before versions were recorded)" } else { "" },
        connlimit_common::maps::LAYOUT_VERSION
    )]
    LayoutMismatch {
        /// The instance.
        name: String,
        /// The version that pinned it (0: before versions were recorded).
        found: u32,
    },
    /// The pin root is controlled by someone other than root.
    #[error("refusing the pin root {path}: it {problem}; {fix}")]
    UnsafePinRoot {
        /// The pin root.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// No instance of this name exists.
    #[error("no connlimit instance named {0:?}; `connlimit status` lists the running ones")]
    NoSuchInstance(String),
    /// The instance name cannot be a directory name.
    #[error("{0:?} is not a valid instance name; use 1 to 64 letters, digits, '-' or '_'")]
    BadName(String),
    /// No port to guard.
    #[error("no port to guard; give at least one port (--port)")]
    NoPorts,
    /// Port 0 cannot be guarded.
    #[error("port 0 cannot be guarded; give the port the server listens on")]
    PortZero,
    /// The reservation epoch is out of range.
    #[error("a reservation epoch of {0:?} is out of range; give 10 ms to 60 s (default 1 s)")]
    BadEpoch(std::time::Duration),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A kernel or file-system operation failed.
    #[error("{what}: {}", Chain(&**.cause))]
    System {
        /// What was being done.
        what: String,
        /// Why it failed (shown in the message with its sources, so not
        /// chained again).
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl EbpfError {
    /// Wraps a lower-level failure (an error, or a message) with what was
    /// being done.
    pub(crate) fn system(what: impl Into<String>, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::System { what: what.into(), cause: cause.into() }
    }
}

/// An error and its sources, "a: b: c", skipping a source whose message the
/// error already shows.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(source) = next {
            let message = source.to_string();
            if !shown.contains(&message) {
                write!(f, ": {message}")?;
            }
            shown = message;
            next = source.source();
        }
        Ok(())
    }
}
