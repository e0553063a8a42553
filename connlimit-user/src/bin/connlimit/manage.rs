//! `set` and `detach`: changing a running instance.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use connlimit::ebpf::Instance;

use crate::cli::SetArgs;

pub fn set(args: SetArgs) -> Result<()> {
    let mut instance = Instance::open(&args.name.name)?;
    let mut config = instance.config()?;
    let before = config.clone();
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
    if let Some(dry_run) = args.dry_run {
        config.dry_run = dry_run;
    }
    if config == before && args.ports.is_empty() && args.when_full.is_none() {
        bail!(
            "nothing to change; give at least one field, e.g. --max-conns-per-client-ip 20 (see `connlimit set --help`)"
        );
    }
    if !args.ports.is_empty() {
        instance.set_ports(&args.ports)?;
    }
    instance.set_config(&config)?;
    if let Some(when_full) = args.when_full {
        instance.set_when_full(when_full)?;
    }
    eprintln!("{}: {}", instance.name(), crate::show::describe(&config));
    Ok(())
}

pub fn detach(name: &str) -> Result<()> {
    let instance = Instance::open(name)?;
    let owner = instance.info()?.pid;
    let persistent = instance.is_persistent();
    drop(instance);
    if persistent || !process_alive(owner) {
        Instance::remove(name)?;
    } else {
        // The `run`/`exec` holding it detaches itself (and ends its server).
        // SAFETY: plain syscall.
        if unsafe { libc::kill(owner as i32, libc::SIGTERM) } != 0 {
            bail!(
                "could not signal process {owner}, which holds instance {name:?}: {}",
                std::io::Error::last_os_error()
            );
        }
        let start = Instant::now();
        while Instance::dir_of(name).exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("process {owner} did not detach instance {name:?} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("{name}: detached");
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
