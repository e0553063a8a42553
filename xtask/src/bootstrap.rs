//! Brings a fresh machine to the point where connlimit builds and its kernel
//! tests run: nightly `rust-src`, a `bpf-linker` built against the nightly's
//! own LLVM, and bpffs at /sys/fs/bpf (mode 0700: root only). Each step
//! checks first, so a second run costs a few milliseconds.

use std::{
    env,
    ffi::{CString, OsString},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()
}

/// `$CARGO_HOME` (default `~/.cargo`).
fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// PATH with `$CARGO_HOME/bin` appended, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> Result<OsString> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(cargo_home()?.join("bin"));
    Ok(env::join_paths(dirs)?)
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn ensure_rust_src() -> Result<()> {
    let installed = output("rustup", &["component", "list", "--installed", "--toolchain", NIGHTLY]).context(
        "the nightly toolchain is needed to build the eBPF programs; install it with `rustup toolchain install nightly`",
    )?;
    if installed.lines().any(|c| c.trim() == "rust-src") {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the nightly toolchain");
    output("rustup", &["component", "add", "rust-src", "--toolchain", NIGHTLY])?;
    Ok(())
}

/// What bpf-linker must be built against: the nightly's LLVM major version
/// and its shared library.
struct NightlyLlvm {
    major: String,
    library: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let version = output("rustc", &["+nightly", "-vV"])?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not say its LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let lib = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim()).join("lib");
    // The real library, `libLLVM.so.<version>-rust-<release>`; the sysroot
    // also holds a small linker script named `libLLVM-<major>-….so`.
    let library = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    Ok(NightlyLlvm { major, library })
}

fn ensure_bpf_linker() -> Result<()> {
    let llvm = nightly_llvm()?;
    let library_name = llvm.library.file_name().unwrap().to_owned();
    let cache = cargo_home()?.join("connlimit-bootstrap");
    let stamp = cache.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} {}", library_name.to_string_lossy());
    let linker = cargo_home()?.join("bin").join("bpf-linker");
    let works = Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success());
    if works && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want) {
        return Ok(());
    }

    // bpf-linker links LLVM dynamically and finds it through a run path to
    // this prefix, so the prefix stays where it is after the build.
    let prefix = cache.join(&library_name);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [OsString::from("libLLVM.so"), library_name.clone()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm.library, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {} (about a minute, once)", llvm.major);
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{}", llvm.major)])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("`cargo install bpf-linker` failed ({status})");
    }
    fs::write(&stamp, want)?;
    Ok(())
}

fn ensure_bpffs() -> Result<()> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    // Fields: id parent major:minor root mount-point options ... - fstype source ...
    let mounted = mountinfo.lines().any(|line| {
        let mut halves = line.split(" - ");
        let mount_point = halves.next().and_then(|l| l.split(' ').nth(4));
        let fs_type = halves.next().and_then(|r| r.split(' ').next());
        mount_point == Some(BPFFS) && fs_type == Some("bpf")
    });
    if mounted {
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(BPFFS)?.permissions());
        if mode & 0o022 != 0 {
            eprintln!(
                "xtask: warning: {BPFFS} is writable by other users (mode {:04o}); connlimit refuses a pin root \
                 they created. Remount it for root alone: `umount {BPFFS} && mount -t bpf -o mode=0700 bpf {BPFFS}`",
                mode & 0o7777
            );
        }
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "xtask: warning: bpffs is not mounted at {BPFFS} and mounting it needs root; the eBPF tests will fail"
        );
        return Ok(());
    }
    // Mode 0700: the kernel's default mode lets any user create entries,
    // e.g. a fake /sys/fs/bpf/connlimit before root does.
    eprintln!("xtask: mounting bpffs at {BPFFS} with mode 0700 (`mount -t bpf -o mode=0700 bpf {BPFFS}`)");
    fs::create_dir_all(BPFFS)?;
    let (source, target, fs_type) = (CString::new("bpf")?, CString::new(BPFFS)?, CString::new("bpf")?);
    let options = CString::new("mode=0700")?;
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fs_type.as_ptr(), 0, options.as_ptr().cast()) };
    if rc != 0 {
        bail!("mounting bpffs at {BPFFS}: {}", std::io::Error::last_os_error());
    }
    // Pins hold the limiter's state: root only (again, for kernels that
    // ignore the option).
    fs::set_permissions(BPFFS, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}
