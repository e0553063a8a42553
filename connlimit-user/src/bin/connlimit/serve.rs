//! `serve` and `check-config`: every instance of a service file in one
//! process, reloaded live on SIGHUP.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use connlimit::ebpf::{EbpfError, Instance, PinRoot, mounts, netns};

use crate::{
    cli::{CheckConfigArgs, ReportArgs, ServeArgs},
    config_file::{self, InstanceSpec, ServiceFile, Target},
    enforce::{Enforcement, Plan, Signals},
    notify,
    report::Reports,
    show::describe,
};

/// `connlimit check-config FILE`.
pub fn check_config(args: CheckConfigArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the service file {}", args.file.display()))?;
    match config_file::parse(&text) {
        Ok(file) => {
            let names: Vec<&str> = file.instances.iter().map(|i| i.name.as_str()).collect();
            println!("{}: OK, {} instances: {}", args.file.display(), names.len(), names.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            for line in config_file::render(&args.file, &problems).lines() {
                eprintln!("connlimit: error: {line}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// An instance this process runs, and the spec it runs with.
struct Running {
    spec: InstanceSpec,
    enforcement: Enforcement,
}

/// `connlimit serve --config FILE`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let file = config_file::load(&args.config)?;
    let (runtime, mut signals) = Signals::catch()?;
    let mut service = Service {
        path: args.config.clone(),
        metrics_override: args.metrics_listen,
        reports: Reports::start(&runtime, &report_args(&file, args.metrics_listen))?,
        running: BTreeMap::new(),
    };
    for spec in &file.instances {
        if let Err(e) = service.start(spec) {
            service.stop_all();
            return Err(e);
        }
    }
    tracing::info!(
        instances = file.instances.len(),
        file = %args.config.display(),
        "enforcing; reload the file with SIGHUP, stop with SIGTERM"
    );
    notify::send(&format!("READY=1\nSTATUS={}", service.status()));
    runtime.block_on(async {
        while signals.next().await == libc::SIGHUP {
            service.reload();
        }
    });
    notify::send("STOPPING=1");
    service.stop_all();
    Ok(())
}

fn report_args(file: &ServiceFile, metrics_override: Option<std::net::SocketAddr>) -> ReportArgs {
    ReportArgs {
        metrics_listen: metrics_override.or(file.metrics_listen),
        refusal_log_interval: file.log.refusal_interval.as_secs(),
        refusal_log_lines: file.log.refusal_lines,
    }
}

struct Service {
    path: PathBuf,
    metrics_override: Option<std::net::SocketAddr>,
    reports: Reports,
    running: BTreeMap<String, Running>,
}

impl Service {
    fn status(&self) -> String {
        let names: Vec<&str> = self.running.keys().map(String::as_str).collect();
        format!("enforcing {} instances: {}", names.len(), names.join(", "))
    }

    /// Attaches (or adopts) `spec` and watches it.
    fn start(&mut self, spec: &InstanceSpec) -> Result<()> {
        let (cgroup, netns) = resolve(&spec.target).with_context(|| format!("instance {:?}", spec.name))?;
        let plan = Plan {
            name: spec.name.clone(),
            ports: spec.ports.clone(),
            config: spec.config.clone(),
            reservation_epoch: spec.reservation_epoch,
            when_full: spec.when_full,
            refuse_with: spec.refuse_with,
            persist: spec.persist,
        };
        let enforcement =
            Enforcement::start(&plan, &cgroup, &netns).with_context(|| format!("instance {:?}", spec.name))?;
        self.reports.watch(&spec.name);
        self.running.insert(spec.name.clone(), Running { spec: spec.clone(), enforcement });
        Ok(())
    }

    /// Stops enforcing instance `name`; a persisted one too, since the
    /// file no longer asks for it.
    fn remove(&mut self, name: &str) {
        let Some(running) = self.running.remove(name) else { return };
        self.reports.unwatch(name);
        let persisted = running.spec.persist;
        if let Err(e) = running.enforcement.finish() {
            tracing::error!(instance = %name, error = %format!("{e:#}"), "detaching failed");
        }
        if persisted
            && Instance::dir_of(name).exists()
            && let Err(e) = Instance::remove(name)
        {
            tracing::error!(instance = %name, error = %e, "detaching the persisted instance failed");
        }
    }

    /// Stops everything (persisted instances stay enforcing).
    fn stop_all(&mut self) {
        self.reports.set_refusal_log(std::time::Duration::ZERO, 1);
        for (name, running) in std::mem::take(&mut self.running) {
            self.reports.unwatch(&name);
            if let Err(e) = running.enforcement.finish() {
                tracing::error!(instance = %name, error = %format!("{e:#}"), "detaching failed");
            }
        }
    }

    /// SIGHUP: rereads the file and applies what changed. A file with
    /// errors changes nothing.
    fn reload(&mut self) {
        notify::send(&format!("RELOADING=1\n{}", notify::monotonic_usec()));
        tracing::info!(file = %self.path.display(), "SIGHUP: rereading the service file");
        match config_file::load(&self.path) {
            Ok(file) => self.apply(&file),
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    tracing::error!("{line}");
                }
                tracing::error!("the service file has errors; keeping the running configuration");
            }
        }
        notify::send(&format!("READY=1\nSTATUS={}", self.status()));
    }

    fn apply(&mut self, file: &ServiceFile) {
        let wanted: BTreeMap<&str, &InstanceSpec> = file.instances.iter().map(|s| (s.name.as_str(), s)).collect();
        // Removals first: they free ports that others may take.
        let gone: Vec<String> = self.running.keys().filter(|n| !wanted.contains_key(n.as_str())).cloned().collect();
        for name in gone {
            self.remove(&name);
            tracing::info!(instance = %name, "removed: no longer in the service file");
        }
        for spec in &file.instances {
            let Some(old) = self.running.get(&spec.name).map(|r| r.spec.clone()) else { continue };
            if old == *spec {
                continue;
            }
            if old.needs_reattach(spec) {
                tracing::warn!(
                    instance = %spec.name,
                    "its target, persist or reservation epoch changed: attaching it again (its counts start over)"
                );
                self.remove(&spec.name);
                continue; // started below, with the additions
            }
            match update(spec) {
                Ok(()) => {
                    tracing::info!(instance = %spec.name, ports = ?spec.ports, "updated live: {}", describe(&spec.config));
                    if let Some(r) = self.running.get_mut(&spec.name) {
                        r.spec = spec.clone();
                    }
                }
                Err(e) => tracing::error!(instance = %spec.name, error = %format!("{e:#}"), "updating failed"),
            }
        }
        for spec in &file.instances {
            if !self.running.contains_key(&spec.name) {
                match self.start(spec) {
                    Ok(()) => tracing::info!(instance = %spec.name, "added"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "starting an instance failed"),
                }
            }
        }
        let args = report_args(file, self.metrics_override);
        if let Err(e) = self.reports.set_metrics(args.metrics_listen) {
            tracing::error!(error = %format!("{e:#}"), "keeping the old metrics address");
        }
        self.reports.set_refusal_log(file.log.refusal_interval, file.log.refusal_lines);
        tracing::info!("{}", self.status());
    }
}

/// Changes a running instance's ports and limits in place: nothing is
/// detached, no connection dropped, no count lost.
fn update(spec: &InstanceSpec) -> Result<()> {
    // Serialized with other writers (`connlimit set`), as they are.
    let root = PinRoot::write()?;
    let mut instance = Instance::open_in(&root, &spec.name)?;
    instance.replace_ports(&root, &spec.ports)?;
    instance.set_config(&spec.config)?;
    instance.set_when_full(spec.when_full)?;
    instance.set_refuse_with(spec.refuse_with)?;
    Ok(())
}

/// The cgroup and network namespace of a target.
fn resolve(target: &Target) -> Result<(PathBuf, PathBuf)> {
    match target {
        Target::Cgroup(path) => Ok((path.clone(), PathBuf::from(netns::OWN_NETNS))),
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

/// For `main`: the log format the file asks for.
pub fn log_format(path: &Path) -> Option<crate::cli::LogFormat> {
    config_file::peek_log_format(path)
}
