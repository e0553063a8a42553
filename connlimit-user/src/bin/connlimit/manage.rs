//! `set` and `detach`: changing a running instance.

use anyhow::{Result, bail};
use connlimit::ebpf::{Detached, Instance, PinRoot, capabilities, mounts};

use crate::{
    cli::{DetachArgs, SetArgs},
    show::ConfigView,
};

pub fn set(args: SetArgs) -> Result<()> {
    // Setting a field to the value it has is fine (scripts re-apply
    // configs); giving no field at all is a mistake.
    let given = args.max_conns_per_client_ip.is_some()
        || args.ipv4_prefix_len.is_some()
        || args.ipv6_prefix_len.is_some()
        || !args.exempt.is_empty()
        || args.no_exempt
        || !args.network_limits.is_empty()
        || args.no_network_limit
        || args.max_conns_total.is_some()
        || args.dry_run.is_some()
        || args.no_dry_run
        || args.when_full.is_some()
        || args.refuse_with.is_some()
        || !args.ports.is_empty();
    Instance::validate_name(&args.name.name)?;
    capabilities::require_access(&connlimit::ebpf::pin_root())?;
    // Exclusive from reading the config to writing it back: concurrent
    // `set`s changing different fields keep each other's changes.
    let root = PinRoot::write()?;
    let mut instance = Instance::open_in(&root, &args.name.name)?;
    let mut config = instance.config()?;
    let before = ConfigView::read(&instance)?;
    connlimit::ebpf::pin_root::test_delay("set");
    if let Some(max) = args.max_conns_per_client_ip {
        config.max_conns_per_client_ip = max;
    }
    if let Some(len) = args.ipv4_prefix_len {
        config.ipv4_prefix_len = len;
    }
    if let Some(len) = args.ipv6_prefix_len {
        config.ipv6_prefix_len = len;
    }
    if args.no_exempt {
        config.exempt.clear();
    } else if !args.exempt.is_empty() {
        config.exempt = args.exempt;
    }
    if args.no_network_limit {
        config.network_limits.clear();
    } else if !args.network_limits.is_empty() {
        config.network_limits = args.network_limits;
    }
    if let Some(max) = args.max_conns_total {
        config.max_conns_total = max;
    }
    if let Some(dry_run) = args.dry_run {
        config.dry_run = dry_run;
    }
    if args.no_dry_run {
        config.dry_run = false;
    }
    if !given {
        bail!(
            "nothing to change; give at least one field, e.g. --max-conns-per-client-ip 20 (see `connlimit set --help`)"
        );
    }
    if !args.ports.is_empty() {
        instance.replace_ports(&root, &args.ports)?;
    }
    instance.set_config(&config)?;
    if let Some(when_full) = args.when_full {
        instance.set_when_full(when_full)?;
    }
    if let Some(refuse_with) = args.refuse_with {
        instance.set_refuse_with(refuse_with)?;
    }
    // What changed, old -> new: the whole configuration is `connlimit config`.
    let changes = ConfigView::read(&instance)?.changes_since(&before);
    if changes.is_empty() {
        println!("{}: nothing changed (every field given already had that value)", instance.name());
    }
    for change in changes {
        println!("{}: {change}", instance.name());
    }
    Ok(())
}

pub fn detach(args: DetachArgs) -> Result<()> {
    let name = args.positional_name.as_deref().unwrap_or(&args.name.name);
    // Read before detaching: an `exec` instance's owner passes the SIGTERM
    // on to its server, which the operator should hear about.
    let exec_server = exec_server_of(name);
    match Instance::detach(name, args.force)? {
        Detached::Removed => println!("{name}: detached"),
        Detached::StoppedOwner(pid) => match exec_server {
            Some(cgroup) => println!(
                "{name}: detached; its owner, `connlimit exec` (process {pid}), was asked to stop and passes that on \
                 to its server (cgroup {cgroup}), which stops too; `connlimit set --name {name} -m 0` lifts a limit \
                 and stops nothing"
            ),
            None => println!("{name}: detached (process {pid}, its owner, stopped)"),
        },
    }
    Ok(())
}

/// The cgroup `connlimit exec` made for instance `name`'s server, if an
/// `exec` runs it: its cgroups are named `connlimit-NAME-PID`, PID the
/// exec's own.
fn exec_server_of(name: &str) -> Option<String> {
    let root = PinRoot::read().ok()??;
    let instance = Instance::open_in(&root, name).ok()?;
    let info = instance.info().ok()?;
    // As `enforce::exec` names it.
    let path = mounts::cgroup2_mount().ok()?.join(format!("connlimit-{name}-{}", info.pid));
    (mounts::inode(&path).ok() == Some(info.cgroup_ino)).then(|| path.display().to_string())
}
