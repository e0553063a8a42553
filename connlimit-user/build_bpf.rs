//! How the kernel object is built from `connlimit-ebpf`. Shared (through
//! `#[path]`) by connlimit-user's build script and `cargo xtask bpf-object`,
//! so the embedded object and the kept one come from the same command.
//!
//! The build is reproducible across checkouts: every absolute path that
//! reaches the object (debug info, BTF line info) is remapped — the
//! workspace to `.`, cargo's home to `/cargo`, the nightly's `rust-src` to
//! `/rustc-src` — and the crate is built with one codegen unit. Two
//! checkouts in different folders, with the same nightly and bpf-linker,
//! produce the same bytes.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF target the kernel programs are built for.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// The kept object, relative to connlimit-user's manifest directory.
pub const KEPT_OBJECT: &str = "bpf/connlimit.bpf.o";

/// `$CARGO_HOME`, or `~/.cargo`.
pub fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

/// PATH, plus cargo's own bin directory, where `cargo install` puts
/// bpf-linker.
pub fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = cargo_home() {
        dirs.push(home.join("bin"));
    }
    env::join_paths(dirs).unwrap_or_default()
}

/// The first `program` in `path`.
pub fn find_in(path: &OsStr, program: &str) -> Option<PathBuf> {
    env::split_paths(path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The nightly's sysroot, if rustup and the nightly toolchain are there.
fn nightly_sysroot(path: &OsStr) -> Option<PathBuf> {
    let rustup = find_in(path, "rustup")?;
    let out = Command::new(rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env("PATH", path)
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Why a fresh object cannot be built here, or `None` when it can: the
/// sources of `connlimit-ebpf` (absent from a published crate), rustup with
/// the nightly toolchain and its `rust-src`, and `bpf-linker`.
pub fn missing_toolchain(workspace: &Path, path: &OsStr) -> Option<String> {
    if !workspace.join("connlimit-ebpf").join("Cargo.toml").is_file() {
        return Some("the connlimit-ebpf sources are not next to this crate".into());
    }
    if find_in(path, "bpf-linker").is_none() {
        return Some("bpf-linker is not in PATH or in cargo's bin directory".into());
    }
    let Some(sysroot) = nightly_sysroot(path) else {
        return Some("rustup with the nightly toolchain is not installed".into());
    };
    if !rust_src(&sysroot).join("library").join("core").is_dir() {
        return Some("the nightly toolchain has no rust-src component".into());
    }
    None
}

fn rust_src(sysroot: &Path) -> PathBuf {
    sysroot.join("lib").join("rustlib").join("src").join("rust")
}

/// Builds `connlimit-ebpf` of `workspace` in `target_dir` and returns the
/// object's path, or the build's error output.
pub fn build(workspace: &Path, target_dir: &Path, path: &OsStr) -> Result<PathBuf, String> {
    let sysroot = nightly_sysroot(path).ok_or("rustup with the nightly toolchain is not installed")?;
    let remap = |from: &Path, to: &str| format!("--remap-path-prefix={}={to}", from.display());
    let mut flags = vec![
        // ISA v3 for the atomic compare-and-swap; BTF so the kernel can
        // describe the maps (bpftool map dump).
        "-Ctarget-cpu=v3".to_owned(),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Ccodegen-units=1".to_owned(),
        remap(&rust_src(&sysroot), "/rustc-src"),
    ];
    if let Some(home) = cargo_home() {
        flags.push(remap(&home, "/cargo"));
    }
    // Last: it wins when the workspace is inside cargo's home.
    flags.push(remap(workspace, "."));
    let output = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--release", "--package", "connlimit-ebpf"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core", "--locked"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        // The outer build's compiler settings are for the host toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("could not run rustup ({e})"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(target_dir.join(BPF_TARGET).join("release").join("connlimit"))
}
