//! `serve`: every instance of a service file in one process, reloaded live
//! on SIGHUP, with instances whose target is missing retried until it
//! appears.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Result;
use connlimit::ebpf::{Instance, PinRoot};

use crate::{
    cli::{ReportArgs, ServeArgs},
    config_file::{self, InstanceSpec, ServiceFile},
    enforce::{Enforcement, Plan, Signals},
    notify,
    report::Reports,
    show::describe,
    target::{missing_target, resolve},
};

/// How often instances that do not enforce are tried again, and the
/// guarded cgroups looked at: a target that appears is attached within it.
const RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// An instance this process runs, and the spec it runs with.
struct Running {
    spec: InstanceSpec,
    enforcement: Enforcement,
}

/// A configured instance that does not enforce as the file says, and why
/// (with the fix).
struct Unmet {
    spec: InstanceSpec,
    why: String,
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
        waiting: BTreeMap::new(),
        stale: BTreeMap::new(),
        announced: None,
        read_mtime: mtime(&args.config),
    };
    for spec in &file.instances {
        service.start_or_wait(spec);
    }
    if service.running.is_empty() {
        service.stop_all();
        anyhow::bail!(
            "no instance of {} can enforce (each is logged above with its fix); exiting",
            args.config.display()
        );
    }
    crate::log_fd_limit();
    tracing::info!(
        instances = service.running.len(),
        file = %args.config.display(),
        "enforcing; reload the file with SIGHUP, stop with SIGTERM"
    );
    service.announce(true);
    runtime.block_on(async {
        let mut tick = tokio::time::interval(RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    libc::SIGHUP => service.reload(),
                    _ => break,
                },
                _ = tick.tick() => {
                    service.retry();
                    service.reread_if_changed();
                    service.announce(false);
                }
            }
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
    /// Configured but not attached: tried again every [`RETRY`].
    waiting: BTreeMap<String, Unmet>,
    /// Running with their old settings: the file's could not be applied
    /// (tried again on the next reload).
    stale: BTreeMap<String, Unmet>,
    /// The last state told to the service manager.
    announced: Option<String>,
    /// When the file last read was modified.
    read_mtime: Option<std::time::SystemTime>,
}

fn plan(spec: &InstanceSpec) -> Plan {
    Plan {
        name: spec.name.clone(),
        ports: spec.ports.clone(),
        config: spec.config.clone(),
        reservation_epoch: spec.reservation_epoch,
        when_full: spec.when_full,
        refuse_with: spec.refuse_with,
        persist: spec.persist,
    }
}

impl Service {
    /// Instances that do not enforce as configured, each with why.
    fn unmet(&self) -> Vec<String> {
        let mut unmet: Vec<String> = self.waiting.values().map(|u| format!("{} ({})", u.spec.name, u.why)).collect();
        unmet.extend(self.stale.values().map(|u| format!("{} keeps its old settings ({})", u.spec.name, u.why)));
        for (name, running) in &self.running {
            if !running.enforcement.enforcing() {
                unmet.push(format!("{name} (the guarded cgroup is gone; waiting for it to be made again)"));
            }
        }
        unmet
    }

    /// The notify `STATUS=` line: what enforces, and what does not and why.
    fn status(&self) -> (bool, String) {
        let names: Vec<&str> = self.running.keys().map(String::as_str).collect();
        let enforcing = format!("enforcing {} instances: {}", names.len(), names.join(", "));
        let unmet = self.unmet();
        if unmet.is_empty() {
            (true, enforcing)
        } else {
            (false, format!("not enforcing: {}; {enforcing}", unmet.join("; ")))
        }
    }

    /// Tells the service manager the state if it changed (or `always`):
    /// READY=1 only when every configured instance enforces as configured,
    /// else a STATUS= line naming those that do not.
    fn announce(&mut self, always: bool) {
        let (ready, status) = self.status();
        let state = if ready { format!("READY=1\nSTATUS={status}") } else { format!("STATUS={status}") };
        if !always && self.announced.as_ref() == Some(&state) {
            return;
        }
        if !ready && self.announced.as_ref() != Some(&state) {
            tracing::warn!("{status}");
        }
        notify::send(&state);
        self.announced = Some(state);
    }

    /// Attaches (or adopts) `spec` and watches it.
    fn start(&mut self, spec: &InstanceSpec) -> Result<()> {
        let (cgroup, netns) = resolve(&spec.target).map_err(|e| missing_target(spec, e))?;
        let enforcement = Enforcement::start(&plan(spec), &cgroup, &netns).map_err(|e| missing_target(spec, e))?;
        self.reports.watch(&spec.name);
        self.running.insert(spec.name.clone(), Running { spec: spec.clone(), enforcement });
        Ok(())
    }

    /// Starts `spec`, or logs why not and tries again every [`RETRY`].
    fn start_or_wait(&mut self, spec: &InstanceSpec) {
        match self.start(spec) {
            Ok(()) => {
                self.waiting.remove(&spec.name);
                self.reports.set_unattached(&spec.name, false);
            }
            Err(e) => self.wait_for(spec, e),
        }
    }

    fn wait_for(&mut self, spec: &InstanceSpec, e: anyhow::Error) {
        let why = format!("{e:#}");
        let unchanged = self.waiting.get(&spec.name).is_some_and(|u| u.why == why);
        if !unchanged {
            tracing::error!(
                instance = %spec.name,
                "not enforcing: {why}; the other instances enforce, and this one is tried again every {} ms",
                RETRY.as_millis()
            );
        }
        self.reports.set_unattached(&spec.name, true);
        self.waiting.insert(spec.name.clone(), Unmet { spec: spec.clone(), why });
    }

    /// Tries again the instances whose target was missing, once it exists.
    fn retry(&mut self) {
        let specs: Vec<InstanceSpec> = self.waiting.values().map(|u| u.spec.clone()).collect();
        for spec in specs {
            // Cheap first: most ticks, the target is still missing.
            if resolve(&spec.target).is_ok_and(|(cgroup, _)| cgroup.is_dir()) {
                self.start_or_wait(&spec);
                if self.running.contains_key(&spec.name) {
                    tracing::info!(instance = %spec.name, "its target appeared: attached, enforcing");
                }
            }
        }
    }

    /// Stops enforcing instance `name`; a persisted one too, since the
    /// file no longer asks for it.
    fn remove(&mut self, name: &str) {
        self.stale.remove(name);
        if self.waiting.remove(name).is_some() {
            self.reports.set_unattached(name, false);
        }
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

    /// SIGHUP: rereads the file and applies what changed.
    fn reload(&mut self) {
        notify::send(&format!("RELOADING=1\n{}", notify::monotonic_usec()));
        tracing::info!(file = %self.path.display(), "SIGHUP: rereading the service file");
        self.reread();
    }

    /// While an instance does not enforce, READY=1 is withheld, so systemd
    /// holds back further reloads: a fix to the file is applied without one.
    fn reread_if_changed(&mut self) {
        if self.status().0 || mtime(&self.path) == self.read_mtime {
            return;
        }
        tracing::info!(file = %self.path.display(), "the service file changed while an instance does not enforce: applying it");
        self.reread();
    }

    /// Rereads the file and applies what changed. A file with errors
    /// changes nothing.
    fn reread(&mut self) {
        self.read_mtime = mtime(&self.path);
        match config_file::load(&self.path) {
            Ok(file) => self.apply(&file),
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    tracing::error!("{line}");
                }
                tracing::error!("the service file has errors; keeping the running configuration");
            }
        }
        self.announce(true);
    }

    fn apply(&mut self, file: &ServiceFile) {
        // First, so that what follows is logged as the file asks.
        crate::logging::apply_file_format(file.log.format);
        let wanted: BTreeMap<&str, &InstanceSpec> = file.instances.iter().map(|s| (s.name.as_str(), s)).collect();
        // Removals first: they free ports that others may take.
        let gone: Vec<String> = (self.running.keys().chain(self.waiting.keys()))
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name);
            tracing::info!(instance = %name, "removed: no longer in the service file");
        }
        for spec in &file.instances {
            let Some(old) = self.running.get(&spec.name).map(|r| r.spec.clone()) else { continue };
            if old == *spec {
                self.stale.remove(&spec.name);
                continue;
            }
            let result = if old.needs_reattach(spec) { self.replace(&old, spec) } else { self.update(spec) };
            match result {
                Ok(()) => {
                    self.stale.remove(&spec.name);
                }
                Err(e) if self.running.contains_key(&spec.name) => {
                    let why = format!("{e:#}");
                    tracing::error!(
                        instance = %spec.name,
                        "the new settings cannot be applied: {why}; it keeps enforcing with its old settings \
                         until the file is fixed (applied as soon as it is saved)"
                    );
                    self.stale.insert(spec.name.clone(), Unmet { spec: spec.clone(), why });
                }
                Err(e) => tracing::error!(instance = %spec.name, error = %format!("{e:#}"), "not enforcing"),
            }
        }
        for spec in &file.instances {
            if !self.running.contains_key(&spec.name) {
                self.start_or_wait(spec);
                if self.running.contains_key(&spec.name) {
                    tracing::info!(instance = %spec.name, "added");
                }
            }
        }
        let args = report_args(file, self.metrics_override);
        if let Err(e) = self.reports.set_metrics(args.metrics_listen) {
            tracing::error!(error = %format!("{e:#}"), "keeping the old metrics address");
        }
        self.reports.set_refusal_log(file.log.refusal_interval, file.log.refusal_lines);
        tracing::info!("{}", self.status().1);
    }

    /// Live changes: ports and limits, in place.
    fn update(&mut self, spec: &InstanceSpec) -> Result<()> {
        update(spec)?;
        tracing::info!(instance = %spec.name, ports = ?spec.ports, "updated live: {}", describe(&spec.config));
        if let Some(r) = self.running.get_mut(&spec.name) {
            r.spec = spec.clone();
        }
        Ok(())
    }

    /// A change that needs attaching again (target, persist, reservation
    /// epoch): the new settings are checked first, while the old instance
    /// still enforces; if attaching still fails, the old is put back.
    fn replace(&mut self, old: &InstanceSpec, spec: &InstanceSpec) -> Result<()> {
        let (cgroup, netns) = resolve(&spec.target).map_err(|e| missing_target(spec, e))?;
        plan(spec).options(&cgroup, &netns).check(Some(&spec.name)).map_err(|e| missing_target(spec, e.into()))?;
        tracing::warn!(
            instance = %spec.name,
            "its target, persist or reservation epoch changed: attaching it again (its counts start over)"
        );
        self.remove(&spec.name);
        let Err(e) = self.start(spec) else { return Ok(()) };
        match self.start(old) {
            Ok(()) => Err(e),
            Err(again) => {
                self.wait_for(spec, e);
                Err(again.context("putting back the old settings failed too"))
            }
        }
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

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// For `main`: the log format the file asks for.
pub fn log_format(path: &Path) -> Option<crate::cli::LogFormat> {
    config_file::peek_log_format(path)
}
