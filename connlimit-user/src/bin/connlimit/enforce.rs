//! `run` and `exec`: attaching, waiting, and letting go cleanly.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result};
use connlimit::{
    Config,
    ebpf::{
        AttachOptions, EbpfError, EbpfLimiter, Instance, RefuseWith, Upkeep, WhenFull, capabilities, cgroup::Cgroup,
        mounts, netns,
    },
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{ExecArgs, LimitArgs, RunArgs},
    follow, notify,
    report::Reports,
};

impl LimitArgs {
    pub(crate) fn config(&self) -> Config {
        Config {
            max_conns_per_client_ip: self.max_conns_per_client_ip,
            ipv4_prefix_len: self.ipv4_prefix_len,
            ipv6_prefix_len: self.ipv6_prefix_len,
            exempt: self.exempt.clone(),
            network_limits: self.network_limits.clone(),
            max_conns_total: self.max_conns_total,
            dry_run: self.dry_run,
        }
    }

    fn plan(&self, persist: bool) -> Plan {
        Plan {
            name: self.name.name.clone(),
            ports: self.ports.clone(),
            config: self.config(),
            reservation_epoch: Duration::from_millis(self.reservation_epoch_ms),
            when_full: self.when_full,
            refuse_with: self.refuse_with,
            persist,
        }
    }
}

/// What to enforce, from the command line or a service file.
pub(crate) struct Plan {
    pub name: String,
    pub ports: Vec<u16>,
    pub config: Config,
    pub reservation_epoch: Duration,
    pub when_full: WhenFull,
    pub refuse_with: RefuseWith,
    pub persist: bool,
}

impl Plan {
    pub(crate) fn options(&self, cgroup: &Path, netns: &Path) -> AttachOptions {
        AttachOptions::new(&self.name, cgroup)
            .netns(netns)
            .ports(self.ports.iter().copied())
            .config(self.config.clone())
            .reservation_epoch(self.reservation_epoch)
            .when_full(self.when_full)
            .refuse_with(self.refuse_with)
            .persist(self.persist)
    }
}

/// Enforcement this process owns.
pub(crate) enum Enforcement {
    Attached(EbpfLimiter),
    /// An orphaned or persisted instance found at start and taken over.
    Adopted {
        instance: Instance,
        persist: bool,
        _upkeep: Upkeep,
    },
}

impl Enforcement {
    /// Attaches instance `plan.name`, or adopts it, counts intact, if an
    /// earlier owner for the same cgroup and namespace crashed or persisted it.
    pub(crate) fn start(plan: &Plan, cgroup: &Path, netns: &Path) -> Result<Self> {
        let options = plan.options(cgroup, netns);
        if mounts::is_cgroup2_root(cgroup) {
            tracing::warn!(
                cgroup = %cgroup.display(),
                "the guarded cgroup is the cgroup2 root: every process on the host not in a cgroup of its own is counted for the guarded ports; give the server a cgroup of its own (see \"Guarding real servers\" in the README)"
            );
        }
        match EbpfLimiter::attach(options.clone()) {
            Ok(limiter) => Ok(Self::Attached(limiter)),
            Err(EbpfError::InstanceExists(_)) => {
                let mut instance = Instance::adopt(&options)?;
                let upkeep = instance.start_upkeep(netns, cgroup)?;
                tracing::info!(instance = %instance.name(), ports = ?plan.ports, "adopted the instance, counts intact");
                Ok(Self::Adopted { instance, persist: plan.persist, _upkeep: upkeep })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the kernel enforces (the guarded cgroup is there).
    pub(crate) fn enforcing(&self) -> bool {
        match self {
            Self::Attached(limiter) => limiter.is_enforcing(),
            Self::Adopted { instance, .. } => instance.enforcing().ok().flatten() != Some(false),
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

    pub(crate) fn finish(self) -> Result<()> {
        tracing::info!("{}", self.stats_line());
        match self {
            Self::Attached(limiter) => {
                let name = limiter.name().to_owned();
                let persisted = limiter.is_persistent();
                limiter.detach()?;
                if persisted {
                    tracing::info!(instance = %name, "left enforcing (--persist); stop it with `connlimit detach --name {name}`");
                } else {
                    tracing::info!(instance = %name, "detached");
                }
            }
            Self::Adopted { instance, persist, .. } => {
                let name = instance.name().to_owned();
                if instance.disown(!persist)? {
                    tracing::info!(instance = %name, "detached");
                } else {
                    tracing::info!(instance = %name, "left enforcing (--persist); stop it with `connlimit detach --name {name}`");
                }
            }
        }
        Ok(())
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment this exists: made
/// before attaching, so none of them can kill us half-way. For `run` and
/// `exec`, SIGHUP (the terminal closed) is a request to stop like the
/// others, never a crash that leaves an orphan; `serve` reloads on it.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// The event loop, and the signals caught on it.
    pub(crate) fn catch() -> Result<(tokio::runtime::Runtime, Self)> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the event loop")?;
        let _entered = runtime.enter();
        let term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        let int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
        let hup = signal(SignalKind::hangup()).context("catching SIGHUP")?;
        Ok((runtime, Self { term, int, hup }))
    }

    /// Waits for SIGINT, SIGTERM or SIGHUP; returns which.
    pub(crate) async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.int.recv() => libc::SIGINT,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let (cgroup, netns) = match (&args.cgroup, args.pid) {
        (Some(cgroup), _) => (cgroup.clone(), PathBuf::from(netns::OWN_NETNS)),
        (None, Some(pid)) => {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                anyhow::bail!(
                    "no process {pid}; give the PID of the running server (e.g. `pidof nginx`), or --cgroup or --unit"
                );
            }
            (mounts::cgroup_of_pid(pid)?, PathBuf::from(format!("/proc/{pid}/ns/net")))
        }
        (None, None) => crate::unit::resolve(args.unit.as_deref().expect("clap requires --cgroup, --pid or --unit"))?,
    };
    let (runtime, mut signals) = Signals::catch()?;
    let mut reports = Reports::start(&runtime, &args.report)?;
    let enforcement = Enforcement::start(&args.limits.plan(args.persist), &cgroup, &netns)?;
    reports.watch(&args.limits.name.name);
    crate::log_fd_limit();
    tracing::info!("enforcing; stop with Ctrl-C, SIGTERM or SIGHUP");
    notify::send("READY=1");
    let signal = runtime.block_on(signals.next());
    tracing::debug!(signal, "stopping");
    drop(reports);
    enforcement.finish()
}

pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    let limits = &args.limits;
    // Check what can be checked before creating anything.
    limits.config().validate()?;
    Instance::validate_name(&limits.name.name)?;
    capabilities::require_capabilities(&capabilities::ATTACH_CAPABILITIES)?;
    let user = args.user.as_deref().map(crate::user::Credentials::resolve).transpose()?;
    let (arg0, rest) = args.command.split_first().expect("clap requires a command");
    // Before attaching: a server that cannot start leaves nothing behind.
    let program = executable(arg0)?;
    let (runtime, mut signals) = Signals::catch()?;
    let mut reports = Reports::start(&runtime, &args.report)?;
    let cgroup = Cgroup::create(&format!("connlimit-{}-{}", limits.name.name, std::process::id()))?;
    let enforcement = Enforcement::start(&limits.plan(false), cgroup.path(), Path::new(netns::OWN_NETNS))?;
    reports.watch(&limits.name.name);
    crate::log_fd_limit();

    let mut command = std::process::Command::new(&program);
    // The server sees the name it was given, not the path found on PATH.
    std::os::unix::process::CommandExt::arg0(&mut command, arg0);
    command.args(rest);
    cgroup.add_on_exec(&mut command);
    // The server gets the descriptor limit connlimit was started with.
    connlimit::ebpf::fds::restore_on_exec(&mut command);
    // Its own process group: a Ctrl-C at the terminal reaches connlimit
    // only, which passes it on once (a server may take a second SIGINT as
    // "quit now").
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if let Some(user) = &user {
        // After joining the cgroup, which needs root.
        user.drop_on_exec(&mut command);
    }
    let code = runtime.block_on(async {
        // Both before the server starts, so no exit goes unseen.
        let mut children = signal(SignalKind::child()).context("catching SIGCHLD")?;
        follow::become_subreaper()?;
        let child = command.spawn().with_context(|| format!("starting {}", program.display()))?;
        let first = child.id() as i32;
        tracing::info!(pid = first, "server started");
        notify::send("READY=1");
        let server = follow::Server { cgroup: &cgroup, first, pid_file: args.pid_file.clone() };
        anyhow::Ok(server.supervise(&mut signals, &mut children).await)
    });
    drop(reports);
    let finished = enforcement.finish();
    drop(cgroup);
    let code = code?;
    finished?;
    tracing::info!(code, "server exited");
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The file `exec` runs for `program`: itself if it names a path (has a
/// `/`), else the first executable of that name on `PATH`, as the shell
/// finds it. Fails with what to do when there is none.
fn executable(program: &std::ffi::OsStr) -> Result<PathBuf> {
    use std::os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _};
    let runnable =
        |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let shown = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!("cannot run {shown}: no such file; give the server's full path (nothing was attached)")
            }
            Err(e) => {
                anyhow::bail!("cannot run {shown}: {e}; give a program connlimit can read (nothing was attached)")
            }
            Ok(_) if !runnable(&path) => anyhow::bail!(
                "cannot run {shown}: it is not an executable file; give the server's program, or `chmod +x` it \
                 (nothing was attached)"
            ),
            Ok(_) => Ok(path),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| runnable(candidate)).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot run {shown}: no such command on PATH; give the server's full path (nothing was attached)"
        )
    })
}
