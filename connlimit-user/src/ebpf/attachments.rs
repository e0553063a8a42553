//! Which programs are attached to a network namespace or a cgroup.
//!
//! Used to notice other sk_lookup programs in the namespace: when several sk_lookup programs are attached, the kernel runs them all
//! and a refusal (`SK_DROP`) holds only if no program selected a socket. A
//! socket-steering program (Cloudflare's tubular, for one) therefore
//! overrides connlimit for the connections it steers. We cannot prevent
//! that, so we say so at attach time; the lookup program also counts the
//! refusals it sees overridden (`Stats::steered`).

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

const BPF_PROG_QUERY: libc::c_long = 16;

/// Where a program can be attached (values of `enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachPoint {
    /// sock_ops programs of a cgroup.
    CgroupSockOps = 3,
    /// sk_lookup programs of a network namespace.
    SkLookup = 36,
}

/// The query part of `union bpf_attr`, zero-padded to the size the kernel
/// knows (it rejects non-zero bytes past what it understands).
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: [u32; 17],
}

/// IDs of the programs attached at `point` of `target` (a cgroup directory
/// or a network namespace file).
pub fn attached_programs(target: &Path, point: AttachPoint) -> io::Result<Vec<u32>> {
    query(&File::open(target)?, point)
}

fn query(target: &File, point: AttachPoint) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQuery {
        target_fd: target.as_raw_fd() as u32,
        attach_type: point as u32,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..ProgQuery::default()
    };
    // SAFETY: `attr` is a valid, fully initialised query; `ids` outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut attr as *mut ProgQuery, size_of::<ProgQuery>() as u32)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt.min(64) as usize);
    Ok(ids)
}

/// Logs a warning if sk_lookup programs other than connlimit's are
/// attached: `ours`, and other connlimit instances guarding other ports of
/// the namespace (recognised by [`is_connlimit_lookup`]), which never
/// select a socket and so cannot override a refusal.
pub(crate) fn warn_about_others(netns: &File, ours: Option<u32>) {
    match query(netns, AttachPoint::SkLookup) {
        Ok(ids) => {
            let others: Vec<u32> = ids.into_iter().filter(|id| Some(*id) != ours).collect();
            if others.is_empty() {
                return;
            }
            let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .filter(|p| others.contains(&p.id()))
                .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
                .collect();
            let (own, foreign): (Vec<u32>, Vec<u32>) =
                others.into_iter().partition(|id| names.get(id).is_some_and(|n| is_connlimit_lookup(n)));
            if !own.is_empty() {
                tracing::debug!(program_ids = ?own, "other connlimit instances guard other ports of this namespace");
            }
            if !foreign.is_empty() {
                let foreign_names: Vec<&str> =
                    foreign.iter().map(|id| names.get(id).map_or("?", String::as_str)).collect();
                tracing::warn!(
                    program_ids = ?foreign,
                    program_names = ?foreign_names,
                    "other sk_lookup programs are attached in this network namespace; if one steers connections \
                     to sockets (as tubular does), connlimit cannot refuse those connections. `connlimit status` \
                     counts such overridden refusals as 'steered'"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not list the namespace's sk_lookup programs"),
    }
}

/// Whether a loaded program's name (as the kernel keeps it: at most 15
/// bytes) is that of connlimit's sk_lookup program.
pub fn is_connlimit_lookup(kernel_name: &str) -> bool {
    let ours = connlimit_common::maps::programs::LOOKUP;
    !kernel_name.is_empty() && kernel_name == &ours[..ours.len().min(15)]
}

/// Waits (up to a second) until the kernel has freed the programs `ids`.
/// The last reference to a link is released on a kernel work queue, and the
/// link leaves the ID table before it detaches its program; a program's ID
/// goes only once nothing holds it, so that is what we watch.
pub(crate) fn wait_until_freed(ids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        let alive = aya::programs::loaded_programs().filter_map(Result::ok).any(|prog| ids.contains(&prog.id()));
        if !alive {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tracing::warn!(?ids, "programs still loaded a second after their release");
}

#[cfg(test)]
mod tests {
    #[test]
    fn connlimit_lookup_is_recognised_by_its_kernel_name_only() {
        // The kernel keeps 15 bytes of a program's name.
        assert!(super::is_connlimit_lookup("connlimit_looku"));
        for foreign in ["", "tubular", "connlimit_sock_", "connlimit", "dispatcher"] {
            assert!(!super::is_connlimit_lookup(foreign), "{foreign}");
        }
    }
}
