//! Builds the kernel programs (`connlimit-ebpf`) for the BPF target and puts
//! the object in `OUT_DIR`, where `src/ebpf` embeds it.
//!
//! This needs the nightly toolchain with `rust-src` and a `bpf-linker` built
//! against that nightly's LLVM; `cargo xtask bootstrap` installs both (the
//! README's commands run it for you). On targets other than Linux nothing is
//! built: only the user-space limiter exists there.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap();
    for watched in ["connlimit-ebpf/src", "connlimit-ebpf/Cargo.toml", "connlimit-common/src", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let path = search_path_with_cargo_bin();
    if find_in(&path, "bpf-linker").is_none() {
        fail("bpf-linker was not found in PATH or in cargo's bin directory");
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--package", "connlimit-ebpf"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core", "--locked"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", &path)
        // ISA v3 for the atomic compare-and-swap; BTF so the kernel can
        // describe the maps (bpftool map dump).
        .env("CARGO_ENCODED_RUSTFLAGS", ["-Ctarget-cpu=v3", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"))
        // The outer build's compiler settings are for the host toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN");
    let output = cargo.output().unwrap_or_else(|e| fail(&format!("could not run rustup ({e})")));
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        fail("building connlimit-ebpf for the BPF target failed (its output is above)");
    }
    let object = target_dir.join(BPF_TARGET).join("release").join("connlimit");
    std::fs::copy(&object, out_dir.join("connlimit.bpf.o"))
        .unwrap_or_else(|e| fail(&format!("{} is missing after the build ({e})", object.display())));
}

/// PATH, plus cargo's own bin directory, where `cargo install` puts bpf-linker.
fn search_path_with_cargo_bin() -> OsString {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(home) = cargo_home {
        dirs.push(home.join("bin"));
    }
    env::join_paths(dirs).expect("PATH entries are valid")
}

fn find_in(path: &OsString, program: &str) -> Option<PathBuf> {
    env::split_paths(path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn fail(what: &str) -> ! {
    panic!(
        "\n\nconnlimit cannot build its eBPF programs: {what}.\n\
         Run `cargo xtask bootstrap` once: it installs the nightly toolchain's rust-src\n\
         and a bpf-linker built against that nightly's LLVM, then build again.\n"
    )
}
