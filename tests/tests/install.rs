//! Installing connlimit like any other tool: the library and the binary
//! build with a stock stable toolchain (no nightly, no bpf-linker), and the
//! Debian package installs, runs, verifies and removes cleanly.
//!
//! The stock-toolchain builds run cargo with a PATH of the stable
//! toolchain's own directory and the system's (no rustup, no cargo bin
//! directory, so no bpf-linker) and a CARGO_HOME of their own that shares
//! only the registry, offline, in `target/stock-toolchain/` (kept between
//! runs, so only the first run compiles everything).

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use harness::require_kernel;
use sha2::{Digest, Sha256};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The target directory this test was built in (`<target>/debug/deps/install-…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `cargo ARGS` as on a machine with only a stock stable toolchain.
fn stock_cargo(args: &[&str]) -> Command {
    // The toolchain's own cargo (the one building this test), not rustup's proxy.
    let cargo = PathBuf::from(env!("CARGO"));
    let toolchain_bin = cargo.parent().unwrap();
    assert!(toolchain_bin.join("rustc").is_file(), "no rustc next to {}", cargo.display());
    let dir = target_dir().join("stock-toolchain");
    let home = dir.join("cargo-home");
    fs::create_dir_all(&home).unwrap();
    let registry = home.join("registry");
    if !registry.exists() {
        let real_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cargo"));
        std::os::unix::fs::symlink(real_home.join("registry"), &registry).unwrap();
    }
    let path =
        std::env::join_paths([toolchain_bin, Path::new("/usr/local/bin"), Path::new("/usr/bin"), Path::new("/bin")])
            .unwrap();
    let mut cmd = Command::new(&cargo);
    cmd.args(args)
        .args(["--offline", "--locked"])
        .current_dir(workspace())
        .env("PATH", path)
        .env("CARGO_HOME", &home)
        .env("CARGO_TARGET_DIR", dir.join("target"));
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTDOC", "RUSTFLAGS", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    cmd.env_remove("CONNLIMIT_BPF_OBJECT");
    cmd
}

#[test]
fn library_without_default_features_builds_on_stable_and_pulls_only_what_it_uses() {
    let out = run(&mut stock_cargo(&["build", "--package", "connlimit-user", "--no-default-features", "--lib"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("kernel object"), "no kernel object without the ebpf feature:\n{stderr}");
    run(&mut stock_cargo(&["test", "--package", "connlimit-user", "--no-default-features", "--lib"]));

    let tree = run(&mut stock_cargo(&[
        "tree",
        "--package",
        "connlimit-user",
        "--no-default-features",
        "--edges",
        "normal,build",
        "--prefix",
        "none",
    ]));
    let crates: Vec<String> = String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(crates.iter().any(|c| c == "tokio"), "{crates:?}");
    for unwanted in ["aya", "aya-log", "anyhow", "clap", "serde", "serde_json", "tracing-subscriber", "sha2"] {
        assert!(!crates.iter().any(|c| c == unwanted), "the library alone depends on {unwanted}: {crates:?}");
    }
}

#[test]
fn binary_builds_on_stable_with_the_kept_kernel_object() {
    let out = run(&mut stock_cargo(&["build", "--package", "connlimit-user", "--bin", "connlimit"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Cargo shows a build script's warnings only when it runs.
    let fresh_run = stderr.contains("Compiling connlimit-user");
    assert!(
        !fresh_run || stderr.contains("using the kept kernel object"),
        "the build should say it uses the kept object:\n{stderr}"
    );
    let kept = fs::read(workspace().join("connlimit-user/bpf/connlimit.bpf.o")).unwrap();
    let hash: String = Sha256::digest(&kept)[..8].iter().map(|b| format!("{b:02x}")).collect();
    let binary = target_dir().join("stock-toolchain/target/debug/connlimit");
    let version = String::from_utf8(run(Command::new(&binary).arg("--version")).stdout).unwrap();
    assert!(version.lines().any(|l| l == format!("kernel object {hash}")), "{version}");
}

/// The CLI binary the suite built (see cli.rs).
fn connlimit_bin() -> PathBuf {
    let bin = target_dir().join("debug").join("connlimit");
    assert!(
        bin.exists(),
        "{} is missing; build it with `cargo build -p connlimit-user --bin connlimit`",
        bin.display()
    );
    bin
}

/// Purges the package when the test ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "connlimit"]).output();
    }
}

fn installed_status() -> Option<String> {
    let out = Command::new("dpkg-query").args(["--show", "--showformat=${Status}", "connlimit"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn debian_package_installs_runs_verifies_and_removes_cleanly() {
    require_kernel!();
    // One package test at a time on this machine (dpkg's own lock fails
    // instead of waiting).
    let lock = fs::File::create("/tmp/connlimit-package-test.lock").unwrap();
    // SAFETY: a valid descriptor; the lock goes with the file.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    assert!(
        installed_status().is_none_or(|s| s.contains("not-installed")),
        "a connlimit package is already installed; this test would replace it. Purge it first (`dpkg --purge connlimit`)"
    );
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        run(Command::new("apt-get").args(["install", "-y", "-qq", "systemd"]).env("DEBIAN_FRONTEND", "noninteractive"));
    }

    // The package of the binary the suite built, made as `cargo xtask dist` makes it.
    let out_dir = target_dir().join(format!("package-test-{}", std::process::id()));
    let xtask = run(Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--package", "xtask", "--", "deb", "--binary"])
        .arg(connlimit_bin())
        .arg("--output")
        .arg(&out_dir)
        .current_dir(workspace()));
    let deb = PathBuf::from(String::from_utf8(xtask.stdout).unwrap().trim());
    assert!(deb.is_file(), "{}", deb.display());

    let _purge = Purge;
    run(Command::new("dpkg").arg("--install").arg(&deb));
    let _ = fs::remove_dir_all(&out_dir);
    let files: Vec<PathBuf> = String::from_utf8(run(Command::new("dpkg").args(["--listfiles", "connlimit"])).stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    let conffile = Path::new("/etc/connlimit/connlimit.toml");
    let unit = Path::new("/usr/lib/systemd/system/connlimit.service");
    for wanted in [Path::new("/usr/bin/connlimit"), unit, conffile] {
        assert!(files.iter().any(|f| f == wanted), "the package lacks {}: {files:?}", wanted.display());
    }

    // The installed binary is the one packaged: same version, commit and kernel object.
    let installed = run(Command::new("/usr/bin/connlimit").arg("--version")).stdout;
    assert_eq!(installed, run(Command::new(connlimit_bin()).arg("--version")).stdout);
    assert!(String::from_utf8_lossy(&installed).starts_with(concat!("connlimit ", env!("CARGO_PKG_VERSION"))));

    // The unit is valid, and installed but not enabled.
    run(Command::new("systemd-analyze").arg("verify").arg(unit));
    let enabled: Vec<_> = fs::read_dir("/etc/systemd/system")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|d| d.path().join("connlimit.service").exists())
        .map(|d| d.path())
        .collect();
    assert!(enabled.is_empty(), "the unit is enabled: {enabled:?}");

    // Removing leaves only the conffile; purging removes that too.
    run(Command::new("dpkg").args(["--remove", "connlimit"]));
    assert_eq!(installed_status().as_deref(), Some("deinstall ok config-files"));
    let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert_eq!(left, [conffile], "dpkg --remove should leave only the conffile");
    assert!(!Path::new("/etc/systemd/system/connlimit.service").exists(), "no mask or override is left behind");
    run(Command::new("dpkg").args(["--purge", "connlimit"]));
    assert!(!conffile.exists(), "dpkg --purge removes the conffile");
    assert!(installed_status().is_none_or(|s| s.contains("not-installed")), "{:?}", installed_status());
}
