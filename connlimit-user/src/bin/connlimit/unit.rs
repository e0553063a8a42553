//! `run --unit NAME` and `unit =` in a service file: the cgroup and network
//! namespace of a systemd unit, as `systemctl show` reports them.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};
use connlimit::ebpf::mounts;

/// The properties `run --unit` asks systemd for.
const PROPERTIES: [&str; 4] = ["LoadState", "ActiveState", "ControlGroup", "MainPID"];

/// What `systemctl show` says about a unit.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shown {
    load_state: String,
    active_state: String,
    /// Relative to the cgroup2 mount, e.g. `/system.slice/nginx.service`;
    /// empty while the unit has no processes.
    control_group: String,
    /// 0 when the unit has no main process.
    main_pid: u32,
}

impl Shown {
    /// Parses `Key=Value` lines, in any order; unknown keys are ignored.
    fn parse(text: &str) -> Self {
        let mut shown = Self::default();
        for (key, value) in text.lines().filter_map(|l| l.split_once('=')) {
            let value = value.trim();
            match key.trim() {
                "LoadState" => shown.load_state = value.to_owned(),
                "ActiveState" => shown.active_state = value.to_owned(),
                "ControlGroup" => shown.control_group = value.to_owned(),
                "MainPID" => shown.main_pid = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        shown
    }
}

/// The unit's cgroup directory and a network namespace path (that of its
/// main process, or of another of its processes), for `run --unit`.
pub(crate) fn resolve(unit: &str) -> Result<(PathBuf, PathBuf)> {
    locate(unit, &show(unit)?, &mounts::cgroup2_mount()?)
}

/// Whether systemd runs this machine (sd_booted(3)).
pub(crate) fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Checks that systemd knows `unit` (it need not be running), for
/// `check-config`.
pub(crate) fn require_known(unit: &str) -> Result<()> {
    require_loaded(unit, &show(unit)?)
}

/// What `systemctl show` says about `unit`.
fn show(unit: &str) -> Result<Shown> {
    let mut show = Command::new("systemctl");
    show.arg("show");
    for p in PROPERTIES {
        show.args(["-p", p]);
    }
    let output = match show.arg("--").arg(unit).output() {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("systemctl not found: --unit needs systemd; give the server's --cgroup or --pid instead")
        }
        Err(e) => bail!("running systemctl: {e}; give the server's --cgroup or --pid instead"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!("`systemctl show {unit}` failed ({}): {why}; give the server's --cgroup or --pid instead", output.status);
    }
    Ok(Shown::parse(&String::from_utf8_lossy(&output.stdout)))
}

fn require_loaded(unit: &str, shown: &Shown) -> Result<()> {
    match shown.load_state.as_str() {
        "loaded" => Ok(()),
        "not-found" | "" => bail!("no systemd unit named {unit:?}; `systemctl list-units --type=service` lists them"),
        other => bail!("the systemd unit {unit:?} is {other}, not loaded; `systemctl status {unit}` says why"),
    }
}

fn locate(unit: &str, shown: &Shown, mount: &Path) -> Result<(PathBuf, PathBuf)> {
    require_loaded(unit, shown)?;
    let no_processes = || {
        let state = if shown.active_state.is_empty() { "unknown" } else { shown.active_state.as_str() };
        anyhow::anyhow!(
            "the systemd unit {unit:?} has no processes (it is {state}); start it first (`systemctl start {unit}`)"
        )
    };
    let relative = shown.control_group.trim_start_matches('/');
    let cgroup = if !shown.control_group.is_empty() {
        mount.join(relative)
    } else if shown.main_pid != 0 {
        mounts::cgroup_of_pid(shown.main_pid)?
    } else {
        return Err(no_processes());
    };
    if !cgroup.is_dir() {
        return Err(no_processes());
    }
    let pid = Some(shown.main_pid).filter(|&p| p != 0).or_else(|| any_process(&cgroup, 4)).ok_or_else(no_processes)?;
    Ok((cgroup, PathBuf::from(format!("/proc/{pid}/ns/net"))))
}

/// A process in the cgroup `dir` or below it, looking `depth` levels down.
fn any_process(dir: &Path, depth: u32) -> Option<u32> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| any_process(&e.path(), depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemctl_show_output_parses_in_any_order() {
        let text =
            "MainPID=1234\nControlGroup=/system.slice/nginx.service\nActiveState=active\nLoadState=loaded\nOther=x=y\n";
        assert_eq!(
            Shown::parse(text),
            Shown {
                load_state: "loaded".into(),
                active_state: "active".into(),
                control_group: "/system.slice/nginx.service".into(),
                main_pid: 1234,
            }
        );
        assert_eq!(Shown::parse(""), Shown::default());
        assert_eq!(Shown::parse("MainPID=lots\n").main_pid, 0);
    }

    #[test]
    fn missing_and_stopped_units_are_named_with_the_fix() {
        let mount = mounts::cgroup2_mount().unwrap();
        let missing = Shown::parse("LoadState=not-found\nActiveState=inactive\nControlGroup=\nMainPID=0\n");
        let err = locate("nope.service", &missing, &mount).unwrap_err().to_string();
        assert!(err.starts_with("no systemd unit named \"nope.service\""), "{err}");
        let masked = Shown::parse("LoadState=masked\nActiveState=inactive\nMainPID=0\n");
        let err = locate("m.service", &masked, &mount).unwrap_err().to_string();
        assert!(err.contains("is masked, not loaded"), "{err}");
        let stopped = Shown::parse("LoadState=loaded\nActiveState=inactive\nControlGroup=\nMainPID=0\n");
        let err = locate("web.service", &stopped, &mount).unwrap_err().to_string();
        assert!(
            err.contains("has no processes (it is inactive); start it first (`systemctl start web.service`)"),
            "{err}"
        );
        // A ControlGroup that has gone away in the meantime.
        let gone =
            Shown::parse("LoadState=loaded\nActiveState=deactivating\nControlGroup=/no/such.service\nMainPID=0\n");
        let err = locate("web.service", &gone, &mount).unwrap_err().to_string();
        assert!(err.contains("has no processes (it is deactivating)"), "{err}");
    }

    #[test]
    fn a_unit_resolves_to_its_cgroup_and_its_main_process_namespace() {
        let mount = mounts::cgroup2_mount().unwrap();
        // This process's own cgroup, as systemd would name it.
        let own = mounts::cgroup_of_pid(std::process::id()).unwrap();
        let relative = format!("/{}", own.strip_prefix(&mount).unwrap().display());
        let me = std::process::id();
        let shown =
            Shown::parse(&format!("LoadState=loaded\nActiveState=active\nControlGroup={relative}\nMainPID={me}\n"));
        let (cgroup, netns) = locate("self.service", &shown, &mount).unwrap();
        assert_eq!(cgroup, own);
        assert_eq!(netns, PathBuf::from(format!("/proc/{me}/ns/net")));
        // Without a main PID, any process of the cgroup names the namespace.
        let shown =
            Shown::parse(&format!("LoadState=loaded\nActiveState=active\nControlGroup={relative}\nMainPID=0\n"));
        let (cgroup, netns) = locate("self.service", &shown, &mount).unwrap();
        assert_eq!(cgroup, own);
        assert!(netns.starts_with("/proc") && netns.ends_with("ns/net"), "{}", netns.display());
    }
}
