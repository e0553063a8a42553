//! `run` and `exec`: attaching, waiting, and letting go cleanly.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfError, EbpfLimiter, Instance, cgroup::Cgroup, host},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{ExecArgs, LimitArgs, RunArgs};

impl LimitArgs {
    fn config(&self) -> Config {
        Config {
            max_conns_per_client_ip: self.max_conns_per_client_ip,
            ipv4_prefix_len: self.ipv4_prefix_len,
            ipv6_prefix_len: self.ipv6_prefix_len,
            exempt: self.exempt.clone(),
            dry_run: self.dry_run,
        }
    }

    fn options(&self, cgroup: &Path, netns: &Path, persist: bool) -> AttachOptions {
        AttachOptions::new(&self.name.name, cgroup)
            .netns(netns)
            .ports(self.ports.iter().copied())
            .config(self.config())
            .reservation_epoch(Duration::from_millis(self.reservation_epoch_ms))
            .persist(persist)
    }
}

/// Enforcement this process is responsible for.
enum Enforcement {
    Attached(EbpfLimiter),
    /// A persisted instance found at start and taken over.
    Adopted {
        instance: Instance,
        persist: bool,
    },
}

impl Enforcement {
    /// Attaches instance `args.name`, or adopts it if it was persisted by
    /// an earlier `run --persist` for the same cgroup and namespace.
    fn start(args: &LimitArgs, cgroup: &Path, netns: &Path, persist: bool) -> Result<Self> {
        let name = &args.name.name;
        match EbpfLimiter::attach(args.options(cgroup, netns, persist)) {
            Ok(limiter) => Ok(Self::Attached(limiter)),
            Err(EbpfError::InstanceExists(_)) => {
                let mut instance = Instance::open(name)?;
                if !instance.is_persistent() {
                    bail!(EbpfError::InstanceExists(name.clone()));
                }
                let info = instance.info()?;
                let netns_id = host::NetnsId::of(netns)?;
                if info.cgroup_ino != host::inode(cgroup)?
                    || (info.netns_dev, info.netns_ino) != (netns_id.dev, netns_id.ino)
                {
                    bail!(
                        "instance {name:?} is persisted for another cgroup or network namespace; \
                         detach it first (`connlimit detach {name}`) or pick another --name"
                    );
                }
                instance.set_ports(&args.ports)?;
                instance.set_config(&args.config())?;
                tracing::info!(instance = %name, ports = ?args.ports, "adopted the persisted instance");
                Ok(Self::Adopted { instance, persist })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn stats_line(&self) -> String {
        let stats = match self {
            Self::Attached(limiter) => limiter.stats(),
            Self::Adopted { instance, .. } => instance.stats(),
        };
        match stats {
            Ok(s) => format!("accepted {}, refused {}, dry-run refusals {}", s.accepted, s.refused, s.dry_run_refused),
            Err(e) => format!("totals unavailable: {e}"),
        }
    }

    fn finish(self) -> Result<()> {
        tracing::info!("{}", self.stats_line());
        match self {
            Self::Attached(limiter) => {
                let name = limiter.name().to_owned();
                let persisted = limiter.is_persistent();
                limiter.detach()?;
                if persisted {
                    tracing::info!(instance = %name, "left enforcing (--persist); stop it with `connlimit detach {name}`");
                } else {
                    tracing::info!(instance = %name, "detached");
                }
            }
            Self::Adopted { instance, persist: true } => {
                let name = instance.name();
                tracing::info!(instance = %name, "left enforcing (--persist); stop it with `connlimit detach {name}`");
            }
            Self::Adopted { instance, persist: false } => {
                let name = instance.name().to_owned();
                drop(instance);
                Instance::remove(&name)?;
                tracing::info!(instance = %name, "detached");
            }
        }
        Ok(())
    }
}

/// SIGINT and SIGTERM, caught from the moment this exists: made before
/// attaching, so a signal can never kill us half-way and leave pins.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// The event loop, and the signals caught on it.
    fn catch() -> Result<(tokio::runtime::Runtime, Self)> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the event loop")?;
        let _entered = runtime.enter();
        let term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        let int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
        Ok((runtime, Self { term, int }))
    }

    /// Waits for SIGINT or SIGTERM; returns which.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.int.recv() => libc::SIGINT,
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let (cgroup, netns) = match (&args.cgroup, args.pid) {
        (Some(cgroup), _) => (cgroup.clone(), PathBuf::from("/proc/self/ns/net")),
        (None, Some(pid)) => (host::cgroup_of_pid(pid)?, PathBuf::from(format!("/proc/{pid}/ns/net"))),
        (None, None) => unreachable!("clap requires --cgroup or --pid"),
    };
    let (runtime, mut signals) = Signals::catch()?;
    let enforcement = Enforcement::start(&args.limits, &cgroup, &netns, args.persist)?;
    tracing::info!("enforcing; stop with Ctrl-C or SIGTERM");
    runtime.block_on(signals.next());
    enforcement.finish()
}

pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    let limits = &args.limits;
    // Check what can be checked before creating anything.
    limits.config().validate()?;
    Instance::validate_name(&limits.name.name)?;
    host::require_capabilities(&host::ATTACH_CAPABILITIES)?;
    let (runtime, mut signals) = Signals::catch()?;
    let cgroup = Cgroup::create(&format!("connlimit-{}-{}", limits.name.name, std::process::id()))?;
    let enforcement = Enforcement::start(limits, cgroup.path(), Path::new("/proc/self/ns/net"), false)?;

    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut command = std::process::Command::new(program);
    command.args(rest);
    cgroup.add_on_exec(&mut command);
    let status = runtime.block_on(async {
        let mut child = tokio::process::Command::from(command)
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;
        let pid = child.id().context("the server exited at once")? as i32;
        tracing::info!(pid, "server started");
        loop {
            let forward = tokio::select! {
                status = child.wait() => return anyhow::Ok(status?),
                signal = signals.next() => signal,
            };
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, forward) };
        }
    });
    let finished = enforcement.finish();
    drop(cgroup);
    let status = status?;
    finished?;
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    tracing::info!(code, "server exited");
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
