//! `set` and `detach`: changing a running instance.

use anyhow::{Result, bail};
use connlimit::ebpf::{Detached, Instance, PinRoot, capabilities};

use crate::cli::SetArgs;

pub fn set(args: SetArgs) -> Result<()> {
    // Setting a field to the value it has is fine (scripts re-apply
    // configs); giving no field at all is a mistake.
    let given = args.max_conns_per_client_ip.is_some()
        || args.ipv4_prefix_len.is_some()
        || args.ipv6_prefix_len.is_some()
        || !args.exempt.is_empty()
        || args.no_exempt
        || !args.network_limits.is_empty()
        || args.no_network_limits
        || args.max_conns_total.is_some()
        || args.dry_run.is_some()
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
    if args.no_network_limits {
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
    eprintln!("{}: {}", instance.name(), crate::show::describe(&config));
    Ok(())
}

pub fn detach(name: &str, force: bool) -> Result<()> {
    match Instance::detach(name, force)? {
        Detached::Removed => eprintln!("{name}: detached"),
        Detached::StoppedOwner(pid) => eprintln!("{name}: detached (process {pid}, its owner, stopped)"),
    }
    Ok(())
}
