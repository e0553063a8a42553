//! What the kernel programs need from the running kernel, probed before the
//! object is loaded: an old kernel gets one error naming what it lacks and
//! the release that brought it ([`EbpfError::MissingKernelFeatures`]),
//! rather than a verifier log.
//!
//! Each feature is probed the way libbpf and bpftool do (aya's
//! [`is_program_supported`], [`is_map_supported`], [`is_helper_supported`],
//! and a tiny program of our own for the atomic instructions), so a
//! distribution kernel with backports passes on what it has. Only when a
//! probe cannot tell (an unexpected error) does the release number from
//! `uname` decide.

use std::{fmt, io, sync::OnceLock};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::EbpfError;

/// The oldest Linux release connlimit runs on: the newest of [`REQUIRED`]'s
/// releases, which is the oldest one its kernel suites boot (`cargo xtask
/// kernels`).
pub const MIN_LINUX: KernelVersion = KernelVersion::new(6, 1);

/// The features that set [`MIN_LINUX`], as error messages name them.
pub const MIN_LINUX_FOR: &str = "sk_lookup programs, BPF atomics, bpf_map_lookup_percpu_elem, a tested verifier";

/// A Linux release, major and minor (features come with those).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    /// The major version (the 5 of 5.19).
    pub major: u32,
    /// The minor version (the 19 of 5.19).
    pub minor: u32,
}

impl KernelVersion {
    /// Release `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Reads the start of a release string as `uname -r` prints it:
    /// `5.15.0-91-generic`, `6.1.0-rc3`, `4.18.0-513.el8.x86_64`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?;
        let digits = minor.find(|c: char| !c.is_ascii_digit()).unwrap_or(minor.len());
        Some(Self::new(major, minor[..digits].parse().ok()?))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The running kernel's release string (`uname -r`).
pub fn running_release() -> io::Result<String> {
    // SAFETY: utsname is plain data the kernel fills.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel NUL-terminates the field.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// One thing the kernel programs use, and the release that brought it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelFeature {
    /// What it is, as messages name it.
    pub name: &'static str,
    /// The Linux release that brought it.
    pub since: KernelVersion,
    probe: Probe,
}

impl fmt::Display for KernelFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux {})", self.name, self.since)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    Atomics,
    /// No probe can tell: the release number decides.
    Release,
}

const fn feature(name: &'static str, since: (u32, u32), probe: Probe) -> KernelFeature {
    KernelFeature { name, since: KernelVersion::new(since.0, since.1), probe }
}

/// What the kernel object (`connlimit-ebpf`) uses, oldest first.
pub const REQUIRED: [KernelFeature; 11] = [
    feature("LRU hash maps", (4, 10), Probe::Map(MapType::LruHash)),
    feature("LPM trie maps", (4, 11), Probe::Map(MapType::LpmTrie)),
    feature("sock_ops programs", (4, 13), Probe::Program(ProgramType::SockOps)),
    feature("sockmaps", (4, 14), Probe::Map(MapType::SockMap)),
    feature("BPF ring buffers", (5, 8), Probe::Map(MapType::RingBuf)),
    // With it, bpf_sk_assign and sockmap lookups from sk_lookup (the 429
    // responder), and links for cgroups (5.7) and network namespaces.
    feature("sk_lookup programs", (5, 9), Probe::Program(ProgramType::SkLookup)),
    // Each counted connection's state (`SOCKETS`); the map type came in
    // 5.2, its helpers in sock_ops in 5.10.
    feature(
        "socket storage in sock_ops",
        (5, 10),
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    // Fetching add and compare-and-swap on map memory.
    feature("BPF atomics", (5, 12), Probe::Atomics),
    feature(
        "bpf_get_netns_cookie in sock_ops",
        (5, 15),
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "bpf_map_lookup_percpu_elem",
        (5, 19),
        Probe::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_map_lookup_percpu_elem),
    ),
    // What the verifier accepts changes from release to release (6.1's
    // rejected what 6.12's took), and no probe short of loading the
    // programs tells: releases before the oldest one the kernel suites
    // boot are refused here, with this line, not with a verifier log.
    feature("a tested verifier", (6, 1), Probe::Release),
];

impl KernelFeature {
    /// Whether the running kernel has it: `Err` when the probe cannot tell.
    fn probe(&self) -> io::Result<bool> {
        match self.probe {
            Probe::Program(program) => is_program_supported(program).map_err(io::Error::other),
            Probe::Map(map) => is_map_supported(map).map_err(io::Error::other),
            Probe::Helper(program, helper) => is_helper_supported(program, helper).map_err(io::Error::other),
            Probe::Atomics => probe_atomics(),
            Probe::Release => Err(io::Error::other("only the release number tells")),
        }
    }
}

/// What the running kernel lacks of [`REQUIRED`], probed once per process.
/// A feature whose probe cannot tell counts as present from the release
/// that brought it (as missing if `uname` fails too: loading will say).
pub fn missing() -> &'static [KernelFeature] {
    static MISSING: OnceLock<Vec<KernelFeature>> = OnceLock::new();
    MISSING.get_or_init(|| {
        let version = running_release().ok().as_deref().and_then(KernelVersion::parse);
        REQUIRED
            .iter()
            .filter(|feature| match feature.probe() {
                Ok(present) => !present,
                Err(e) => {
                    tracing::debug!(feature = feature.name, error = %e, "kernel feature probe failed; going by the release");
                    version.is_some_and(|v| v < feature.since)
                }
            })
            .copied()
            .collect()
    })
}

/// Fails with [`EbpfError::MissingKernelFeatures`] unless the running
/// kernel has everything the kernel programs use. Probing loads tiny
/// programs and creates maps, so it needs the capabilities attaching does.
pub fn require() -> Result<(), EbpfError> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    Err(EbpfError::MissingKernelFeatures {
        release: running_release().unwrap_or_else(|_| "unknown".to_owned()),
        missing: missing.to_vec(),
    })
}

/// Whether the verifier accepts the atomic instructions the programs use
/// (Linux 5.12: `BPF_ATOMIC` with `BPF_FETCH`, and `BPF_CMPXCHG`), by
/// loading a socket filter that applies them to a stack slot. Kernels
/// before 5.12 know only the non-fetching add, and reject the others'
/// `imm` with EINVAL.
fn probe_atomics() -> io::Result<bool> {
    /// `struct bpf_insn`.
    #[repr(C)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        // The register nibbles are bit fields: dst first, so low on little endian.
        let regs = if cfg!(target_endian = "little") { src << 4 | dst } else { dst << 4 | src };
        Insn { code, regs, off, imm }
    }
    const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
    const STORE_DW: u8 = 0x03 | 0x60 | 0x18; // BPF_STX | BPF_MEM | BPF_DW
    const ATOMIC_DW: u8 = 0x03 | 0xc0 | 0x18; // BPF_STX | BPF_ATOMIC | BPF_DW
    const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT
    const FETCH_ADD: i32 = 0x01; // BPF_ADD | BPF_FETCH
    const CMPXCHG: i32 = 0xf1; // BPF_CMPXCHG (includes BPF_FETCH)
    const FP: u8 = 10;
    let insns = [
        insn(MOV64_IMM, 0, 0, 0, 0),           // r0 = 0
        insn(STORE_DW, FP, 0, -8, 0),          // *(u64 *)(fp - 8) = r0
        insn(MOV64_IMM, 1, 0, 0, 1),           // r1 = 1
        insn(ATOMIC_DW, FP, 1, -8, FETCH_ADD), // r1 = atomic_fetch_add((u64 *)(fp - 8), r1)
        insn(ATOMIC_DW, FP, 1, -8, CMPXCHG),   // r0 = atomic_cmpxchg((u64 *)(fp - 8), r0, r1)
        insn(MOV64_IMM, 0, 0, 0, 0),           // r0 = 0
        insn(EXIT, 0, 0, 0, 0),
    ];
    /// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to the log buffer
    /// (the kernel reads the fields past the given size as zero).
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
    };
    // SAFETY: `attr` points at instructions and a license that outlive the
    // call; the returned descriptor is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, size_of::<ProgLoad>()) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        let v = |s| KernelVersion::parse(s);
        assert_eq!(v("5.15.0-91-generic"), Some(KernelVersion::new(5, 15)));
        assert_eq!(v("6.18.44-fc-v669"), Some(KernelVersion::new(6, 18)));
        assert_eq!(v("6.1-rc3"), Some(KernelVersion::new(6, 1)));
        assert_eq!(v("4.18.0-513.el8.x86_64"), Some(KernelVersion::new(4, 18)));
        assert_eq!(v("5.19"), Some(KernelVersion::new(5, 19)));
        assert_eq!(v("5.19\n"), Some(KernelVersion::new(5, 19)));
        for bad in ["", "5", "5.", "x.19", "5.x", "-1.2"] {
            assert_eq!(v(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn releases_compare_numerically() {
        assert!(KernelVersion::new(5, 9) < KernelVersion::new(5, 19));
        assert!(KernelVersion::new(5, 19) < KernelVersion::new(6, 0));
        assert!(KernelVersion::new(6, 1) >= MIN_LINUX);
        assert!(KernelVersion::new(6, 0) < MIN_LINUX);
        assert_eq!(MIN_LINUX.to_string(), "6.1");
    }

    #[test]
    fn the_minimum_is_the_newest_feature_and_the_list_is_oldest_first() {
        assert_eq!(REQUIRED.iter().map(|f| f.since).max(), Some(MIN_LINUX));
        assert!(REQUIRED.windows(2).all(|w| w[0].since <= w[1].since));
        for name in MIN_LINUX_FOR.split(", ") {
            assert!(REQUIRED.iter().any(|f| f.name == name), "{name} is not a required feature");
        }
    }

    #[test]
    fn the_readme_states_the_same_minimum() {
        let readme = include_str!("../../../README.md");
        let mut stated = Vec::new();
        let mut rest = readme;
        while let Some(at) = rest.find("Linux ") {
            rest = &rest[at + "Linux ".len()..];
            let end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
            let version = rest[..end].trim_end_matches('.');
            let tail = &rest[end..];
            if tail.starts_with(" or later") || tail.starts_with('+') {
                stated.push(version.to_owned());
            }
        }
        assert!(!stated.is_empty(), "the README states no minimum Linux release");
        assert!(stated.iter().all(|v| *v == MIN_LINUX.to_string()), "README minimums {stated:?}, code {MIN_LINUX}");
    }

    #[test]
    fn the_message_names_what_is_missing_and_when_it_came() {
        let e = EbpfError::MissingKernelFeatures {
            release: "5.15.0-91-generic".into(),
            missing: vec![REQUIRED[REQUIRED.len() - 1]],
        };
        assert_eq!(
            e.to_string(),
            "connlimit needs Linux 6.1 or later (sk_lookup programs, BPF atomics, bpf_map_lookup_percpu_elem, \
             a tested verifier); this kernel (5.15.0-91-generic) lacks a tested verifier (Linux 6.1)"
        );
    }

    /// This machine's kernel runs the programs (the kernel tests need it
    /// anyway), so every probe must find its feature; on a kernel older
    /// than the minimum, the probes must say so.
    #[test]
    fn probes_agree_with_this_kernel() {
        let Some(version) = running_release().ok().as_deref().and_then(KernelVersion::parse) else { return };
        if version >= MIN_LINUX {
            assert_eq!(missing(), &[], "Linux {version}");
            // Only a process that may load programs gets an answer.
            if unsafe { libc::geteuid() } == 0 {
                assert!(probe_atomics().unwrap());
            }
        } else {
            assert!(!missing().is_empty(), "Linux {version}");
        }
    }
}
