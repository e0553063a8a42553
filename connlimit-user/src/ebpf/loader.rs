//! Loading the kernel object and attaching an instance: sizing its maps,
//! loading the sk_lookup and sock_ops programs, attaching them to the
//! network namespace and the cgroup, and pinning maps and links in a
//! staging directory that appears in the pin root all at once.

use std::{fs::File, time::SystemTime};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, FEntry, KProbe, SkLookup, SockOps, links::FdLink},
};
use connlimit_common::maps::{
    INFO_DIAG_PROBE, INFO_PERSIST, InstanceInfo, KernelConfig, LAYOUT_VERSION, names, programs,
};

use super::{
    AttachOptions, EbpfError, Instance, PinRoot, Upkeep, attachments, capabilities, guard, instance,
    kernel_config::validated_epoch_ns,
    kernel_features, listeners, log, mounts, netns,
    object::{OBJECT, OBJECT_HASH},
    owner, pin_root,
};

/// An attached instance, owned by this process: while its parts live,
/// the programs stay loaded and its upkeep runs.
pub(super) struct Attached {
    pub(super) instance: Instance,
    pub(super) program_ids: Vec<u32>,
    pub(super) upkeep: Upkeep,
    pub(super) log: Option<log::KernelLog>,
    pub(super) links: [FdLink; 2],
    pub(super) ebpf: Ebpf,
}

/// Loads the programs, writes the config, attaches, and pins the maps
/// and links; the instance appears in the pin root all at once. On
/// error nothing is left attached or pinned.
pub(super) fn attach(options: AttachOptions) -> Result<Attached, EbpfError> {
    let options_ref = options.clone();
    let AttachOptions {
        name,
        cgroup,
        netns,
        mut ports,
        config,
        persist,
        reservation_epoch,
        when_full,
        refuse_with,
        max_clients,
    } = options;
    // Where attaching spends its time, at debug level (CONNLIMIT_LOG=debug).
    let mut phases = Phases::start();
    let netns_id = preflight(&options_ref)?;
    phases.done("checks (capabilities, kernel feature probes, cgroup, namespace)");
    let epoch_ns = validated_epoch_ns(reservation_epoch)?;
    ports = guard::normalize_ports(&ports)?;
    let netns_file = File::open(&netns).map_err(|e| EbpfError::Netns(netns.clone(), e))?;
    let cgroup_file = File::open(&cgroup).map_err(|e| EbpfError::system(format!("opening {}", cgroup.display()), e))?;
    let owner = owner::Owner::current()?;
    // Held until the instance is in place: attaches, adoptions and
    // changes happen one at a time.
    let root = PinRoot::write()?;
    if root.is_instance(&name) {
        return Err(EbpfError::InstanceExists(name));
    }
    guard::refuse_taken_ports(&root, &ports, netns_id, None)?;

    phases.done("pin root lock, port check");
    // The kernel's verifier takes most of the time attaching takes (about
    // half a second on an idle machine, seconds under load): say so first.
    tracing::info!(instance = %name, "attaching: loading the kernel programs (the kernel verifies them first)");
    let mut ebpf = load_object(max_clients)?;
    let log = log::KernelLog::start(&mut ebpf);
    phases.done("object parsed, maps created");

    // Removed on error, and never listed: built aside, renamed into place.
    let staging = root.stage(&name)?;
    Instance::pin_new(&staging, ebpf.maps().filter(|(n, _)| names::ALL.contains(n)))?;
    let mut instance = Instance::from_maps(&name, |map| {
        ebpf.take_map(map).ok_or_else(|| EbpfError::system("loading the eBPF object", format!("no map {map}")))
    })?;
    let base = KernelConfig {
        epoch_ns,
        netns_cookie: netns::netns_cookie(&netns),
        flags: when_full.flag() | refuse_with.flag(),
        ..KernelConfig::default()
    };
    instance.write_config(&config, base)?;
    // A new instance guards nothing yet: no need to read the port table.
    instance.guard_ports(&ports)?;
    let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    instance.set_info(InstanceInfo {
        netns_dev: netns_id.dev,
        netns_ino: netns_id.ino,
        cgroup_ino: mounts::inode(&cgroup)?,
        started_unix_secs: started.as_secs(),
        pid: owner.pid,
        _pad: 0,
        owner_start_ticks: owner.start_ticks,
        layout_version: LAYOUT_VERSION,
        flags: if persist { INFO_PERSIST } else { 0 },
        object_hash: OBJECT_HASH,
    })?;

    phases.done("maps pinned, config written");
    let upkeep = instance.start_upkeep(&netns, &cgroup)?;
    phases.done("upkeep started (socket dumps of connections open before attach)");
    let links = attach_programs(&mut ebpf, &cgroup_file, &netns_file)?;
    phases.done("programs loaded (verifier) and attached");
    // Pinned links keep the kernel enforcing if this process crashes.
    let links = pin_links(&staging, links)?;
    match attach_diag_probe(&mut ebpf, &staging) {
        Ok(()) => {
            let info = instance.info()?;
            instance.set_info(InstanceInfo { flags: info.flags | INFO_DIAG_PROBE, ..info })?;
        }
        Err(e) => tracing::warn!(
            instance = %name, error = %e,
            "socket-diagnostics lookups are not told from packets: a local user's NETLINK_SOCK_DIAG query can \
             take a client's slot for a moment and see whether it is at its limit (needs kprobes and CAP_PERFMON)"
        ),
    }
    let sock_ops: &mut SockOps = ebpf
        .program_mut(programs::SOCK_OPS)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| EbpfError::system("loading the eBPF object", "no sock_ops program"))?;
    sock_ops
        .pin(staging.pin_path(instance::SOCK_OPS_PROGRAM_PIN))
        .map_err(|e| EbpfError::system("pinning the sock_ops program", e))?;
    staging.commit()?;
    drop(root);
    phases.done("links pinned, instance committed");
    tracing::info!(
        instance = %name, ?ports, cgroup = %cgroup.display(), netns = %netns.display(),
        limit = config.max_conns_per_client_ip, persist, "connlimit attached"
    );
    listeners::warn_about(&netns, &ports, &cgroup);
    phases.done("listener check");
    phases.total();
    let program_ids = links.iter().filter_map(|l| l.info().ok()).map(|i| i.program_id()).collect();
    Ok(Attached { instance, program_ids, upkeep, log, links, ebpf })
}

/// What [`attach`] checks before touching the kernel or the pin root:
/// the options, the capabilities, the kernel's features, the cgroup and
/// the network namespace (whose id it returns).
fn preflight(options: &AttachOptions) -> Result<netns::NetnsId, EbpfError> {
    Instance::validate_name(&options.name)?;
    options.config.validate()?;
    validated_epoch_ns(options.reservation_epoch)?;
    guard::normalize_ports(&options.ports)?;
    capabilities::require_capabilities(&capabilities::ATTACH_CAPABILITIES)?;
    // Before loading: an old kernel gets what it lacks, not a verifier log.
    kernel_features::require()?;
    capabilities::require_access(&pin_root())?;
    mounts::require_cgroup2_dir(&options.cgroup)?;
    netns::NetnsId::of(&options.netns)
}

/// Whether [`attach`] would get past its checks now, with instance
/// `replacing` (if any) out of the way: its ports do not count as taken and
/// its name as used. Changes nothing.
pub(super) fn check(options: &AttachOptions, replacing: Option<&str>) -> Result<(), EbpfError> {
    let netns_id = preflight(options)?;
    let ports = guard::normalize_ports(&options.ports)?;
    let Some(root) = PinRoot::read()? else { return Ok(()) };
    if replacing != Some(options.name.as_str()) && root.is_instance(&options.name) {
        return Err(EbpfError::InstanceExists(options.name.clone()));
    }
    guard::refuse_taken_ports(&root, &ports, netns_id, replacing)
}

/// Loads the embedded kernel object (maps created, programs not yet
/// loaded), with the client maps sized for `max_clients` if given.
fn load_object(max_clients: Option<u32>) -> Result<Ebpf, EbpfError> {
    let mut loader = EbpfLoader::new();
    if let Some(max) = max_clients {
        loader.map_max_entries(names::CLIENTS, max);
        loader.map_max_entries(names::PENDING, max);
    }
    loader.load(OBJECT).map_err(|e| EbpfError::system("loading the eBPF object", e))
}

/// Pins the links so the programs stay attached after this process exits.
fn pin_links(staging: &pin_root::Staging<'_>, [lookup, sock_ops]: [FdLink; 2]) -> Result<[FdLink; 2], EbpfError> {
    let pin = |link: FdLink, file: &str| {
        link.pin(staging.pin_path(file))
            .map(FdLink::from)
            .map_err(|e| EbpfError::system(format!("pinning link {file}"), e))
    };
    Ok([pin(lookup, instance::LINK_PINS[0])?, pin(sock_ops, instance::LINK_PINS[1])?])
}

/// Attaches the `connlimit_diag` kprobe to the kernel function every
/// socket-diagnostics query for one socket passes through, and pins its
/// link: the lookups such a query makes (no packet, a local process's
/// 4-tuple) then reserve, refuse and count nothing. The socket-diagnostics
/// modules are loaded by then (the upkeep has made its first query).
fn attach_diag_probe(ebpf: &mut Ebpf, staging: &pin_root::Staging<'_>) -> Result<(), EbpfError> {
    let fail = |e: String| EbpfError::system(format!("hooking {}", programs::DIAG_FUNCTION), e);
    let link = match kprobe_link(ebpf) {
        Ok(link) => link,
        // No kprobes (`CONFIG_KPROBES` off): fentry, where the function is
        // in the kernel image's BTF (not in a module).
        Err(kprobe) => fentry_link(ebpf).map_err(|fentry| fail(format!("kprobe: {kprobe}; fentry: {fentry}")))?,
    };
    link.pin(staging.pin_path(instance::DIAG_LINK_PIN)).map_err(|e| fail(e.to_string()))?;
    Ok(())
}

fn kprobe_link(ebpf: &mut Ebpf) -> Result<FdLink, String> {
    let probe: &mut KProbe = ebpf
        .program_mut(programs::DIAG)
        .ok_or_else(|| format!("no program {}", programs::DIAG))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    probe.load().map_err(|e| e.to_string())?;
    let id = probe.attach(programs::DIAG_FUNCTION, 0).map_err(|e| e.to_string())?;
    probe
        .take_link(id)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())
}

fn fentry_link(ebpf: &mut Ebpf) -> Result<FdLink, String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
    let probe: &mut FEntry = ebpf
        .program_mut(programs::DIAG_FENTRY)
        .ok_or_else(|| format!("no program {}", programs::DIAG_FENTRY))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    probe.load(programs::DIAG_FUNCTION, &btf).map_err(|e| e.to_string())?;
    let id = probe.attach().map_err(|e| e.to_string())?;
    Ok(probe.take_link(id).map_err(|e| e.to_string())?.into())
}

/// Loads and attaches both programs; returns their links (lookup, sock_ops)
/// detached from the programs' ownership, for pinning.
fn attach_programs(ebpf: &mut Ebpf, cgroup: &File, netns: &File) -> Result<[FdLink; 2], EbpfError> {
    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, EbpfError> {
        ebpf.program_mut(name).ok_or_else(|| EbpfError::system("loading the eBPF object", format!("no program {name}")))
    }

    let sock_ops: &mut SockOps = program(ebpf, programs::SOCK_OPS)?
        .try_into()
        .map_err(|e| EbpfError::system("loading the sock_ops program", e))?;
    let verifying = std::time::Instant::now();
    sock_ops.load().map_err(|e| EbpfError::system("loading the sock_ops program", e))?;
    tracing::debug!(ms = verifying.elapsed().as_secs_f64() * 1e3, "attach: sock_ops program verified");
    let id = sock_ops
        // A link attachment: it coexists with other programs on the cgroup.
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| EbpfError::system("attaching the sock_ops program to the cgroup", e))?;
    let sock_ops_link: FdLink = sock_ops
        .take_link(id)
        .map_err(|e| EbpfError::system("attaching the sock_ops program", e))?
        .try_into()
        .map_err(|e| EbpfError::system("attaching the sock_ops program", e))?;

    let lookup: &mut SkLookup = program(ebpf, programs::LOOKUP)?
        .try_into()
        .map_err(|e| EbpfError::system("loading the sk_lookup program", e))?;
    let verifying = std::time::Instant::now();
    let loaded = lookup.load();
    tracing::debug!(ms = verifying.elapsed().as_secs_f64() * 1e3, "attach: sk_lookup program verified");
    loaded.map_err(|e| match io_error(&e) {
        Some(io) if is_unsupported(io) => {
            EbpfError::NoSkLookup(std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)))
        }
        _ => EbpfError::system("loading the sk_lookup program", e),
    })?;
    let id = lookup.attach(netns).map_err(|e| match io_error(&e) {
        Some(io) if is_unsupported(io) => {
            EbpfError::NoSkLookup(std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)))
        }
        _ => EbpfError::system("attaching the sk_lookup program to the network namespace", e),
    })?;
    let our_id = lookup.info().map(|i| i.id()).ok();
    let lookup_link: FdLink =
        lookup.take_link(id).map_err(|e| EbpfError::system("attaching the sk_lookup program", e))?.into();

    attachments::warn_about_others(netns, our_id);
    Ok([lookup_link, sock_ops_link])
}

fn io_error(e: &aya::programs::ProgramError) -> Option<&std::io::Error> {
    match e {
        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }) => Some(io_error),
        aya::programs::ProgramError::LoadError { io_error, .. } => Some(io_error),
        _ => None,
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    // EINVAL for an unknown program or attach type; ENOTSUPP (524) from some kernels.
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524))
}

/// Times the phases of [`attach`], logged at debug level.
struct Phases {
    start: std::time::Instant,
    last: std::time::Instant,
}

impl Phases {
    fn start() -> Self {
        let now = std::time::Instant::now();
        Self { start: now, last: now }
    }

    fn done(&mut self, phase: &str) {
        let now = std::time::Instant::now();
        tracing::debug!(ms = (now - self.last).as_secs_f64() * 1e3, "attach: {phase}");
        self.last = now;
    }

    fn total(&self) {
        tracing::debug!(ms = self.start.elapsed().as_secs_f64() * 1e3, "attach: total");
    }
}
