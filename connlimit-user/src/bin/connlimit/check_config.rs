//! `check-config`: a service file's syntax, then what it names on this
//! machine.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{Context, Result};
use connlimit::ebpf::{mounts, netns};

use crate::{
    cli::CheckConfigArgs,
    config_file::{self, ServiceFile, Target},
    target::{missing_target, resolve},
};

/// `connlimit check-config FILE`: the file, then (unless `--syntax-only`)
/// what it names on this machine.
pub fn check_config(args: CheckConfigArgs) -> Result<ExitCode> {
    let path = args.config.or(args.file).expect("clap requires --config or FILE");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read the service file {}", path.display()))?;
    let file = match config_file::parse(&text) {
        Ok(file) => file,
        Err(problems) => {
            for line in config_file::render(&path, &problems).lines() {
                eprintln!("connlimit: error: {line}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let problems = if args.syntax_only { Vec::new() } else { machine_problems(&file) };
    for problem in &problems {
        eprintln!("connlimit: error: {}: {problem}", path.display());
    }
    if !problems.is_empty() {
        eprintln!(
            "connlimit: error: {}: the file is valid, but not on this machine; check a file meant for another \
             machine with --syntax-only",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let names: Vec<&str> = file.instances.iter().map(|i| i.name.as_str()).collect();
    let checked = if args.syntax_only { " (syntax only)" } else { "" };
    println!("{}: OK{checked}, {} instances: {}", path.display(), names.len(), names.join(", "));
    Ok(ExitCode::SUCCESS)
}

/// What the file names that this machine lacks: targets that do not exist,
/// and ports two instances would guard in the same network namespace.
fn machine_problems(file: &ServiceFile) -> Vec<String> {
    let mut problems = Vec::new();
    let mut ports: BTreeMap<(u64, u64, u16), &str> = BTreeMap::new();
    for spec in &file.instances {
        let name = &spec.name;
        if let Target::Unit(unit) = &spec.target {
            // Known to systemd is enough: a stopped unit is waited for.
            if crate::unit::systemd_runs()
                && let Err(e) = crate::unit::require_known(unit)
            {
                problems.push(format!("instance {name:?}: {e:#}"));
            }
            continue;
        }
        let (cgroup, netns) = match resolve(&spec.target) {
            Ok(resolved) => resolved,
            Err(e) => {
                problems.push(format!("instance {name:?}: {:#}", missing_target(spec, e)));
                continue;
            }
        };
        if let Err(e) = mounts::require_cgroup2_dir(&cgroup) {
            problems.push(format!("instance {name:?}: {:#}", missing_target(spec, e.into())));
            continue;
        }
        // Cgroup targets share the namespace (the syntax check covers them).
        let Ok(netns) = netns::NetnsId::of(&netns) else { continue };
        for &port in &spec.ports {
            match ports.insert((netns.dev, netns.ino, port), name) {
                Some(other) if other != name => problems.push(format!(
                    "instance {name:?}: port {port} is guarded by instance {other:?} in the same network namespace; \
                     an instance's ports must be its own"
                )),
                _ => {}
            }
        }
    }
    problems
}
