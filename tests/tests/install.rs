//! Installing connlimit like any other tool: the library and the binary
//! build with a stock stable toolchain (no nightly, no bpf-linker), and the
//! release files of `cargo xtask dist` (the static musl binary's tarball and
//! Debian package, named by `CONNLIMIT_DIST_DIR`, which `cargo xtask test`
//! sets) are what they claim, and the package installs, creates its user,
//! verifies and removes cleanly.
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
    let real_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cargo"));
    // The tests of this file run in parallel: another may have made it first.
    match std::os::unix::fs::symlink(real_home.join("registry"), &registry) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("linking {}: {e}", registry.display()),
        _ => {}
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

/// The release files of `cargo xtask dist` (`cargo xtask test` builds them
/// and names their folder in `CONNLIMIT_DIST_DIR`).
fn dist_dir() -> PathBuf {
    let Some(dir) = std::env::var_os("CONNLIMIT_DIST_DIR") else {
        panic!(
            "CONNLIMIT_DIST_DIR is not set: this test installs the release files themselves. Run it through \
             `cargo xtask test`, or run `cargo xtask dist` and set CONNLIMIT_DIST_DIR=target/dist"
        )
    };
    let dir = PathBuf::from(dir);
    assert!(dir.join("SHA256SUMS").is_file(), "{} holds no SHA256SUMS; run `cargo xtask dist`", dir.display());
    dir
}

/// The one file in `dir` whose name ends with `suffix`.
fn one_file(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "expected one *{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
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

/// `getent passwd connlimit`, split into its fields.
fn connlimit_user() -> Option<Vec<String>> {
    let out = Command::new("getent").args(["passwd", "connlimit"]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().split(':').map(str::to_owned).collect())
}

/// The subcommands with a man page of their own.
const SUBCOMMANDS: [&str; 9] = ["run", "exec", "serve", "check-config", "set", "config", "top", "status", "detach"];

#[test]
fn release_files_are_static_and_the_package_installs_creates_its_user_and_purges_cleanly() {
    require_kernel!();
    let dist = dist_dir();
    let tarball = one_file(&dist, "-x86_64-unknown-linux-musl.tar.gz");
    let deb = one_file(&dist, "_amd64.deb");

    // SHA256SUMS names exactly the tarball and the package, with their sums.
    let sums = fs::read_to_string(dist.join("SHA256SUMS")).unwrap();
    let mut named = Vec::new();
    for line in sums.lines() {
        let (digest, name) = line.split_once("  ").unwrap_or_else(|| panic!("bad SHA256SUMS line {line:?}"));
        let actual: String =
            Sha256::digest(fs::read(dist.join(name)).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, actual, "SHA256SUMS is wrong for {name}");
        named.push(name.to_owned());
    }
    named.sort();
    let mut expected =
        [tarball.file_name().unwrap(), deb.file_name().unwrap()].map(|n| n.to_string_lossy().into_owned());
    expected.sort();
    assert_eq!(named, expected);

    // The tarball's binary is static (no program interpreter) and runs.
    let unpacked = target_dir().join(format!("release-test-{}", std::process::id()));
    fs::create_dir_all(&unpacked).unwrap();
    run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpacked));
    let folder = tarball.file_name().unwrap().to_string_lossy().trim_end_matches(".tar.gz").to_owned();
    let binary = unpacked.join(&folder).join("connlimit");
    let file = String::from_utf8(run(Command::new("file").arg("-b").arg(&binary)).stdout).unwrap();
    assert!(file.contains("static") && !file.contains("interpreter"), "not a static binary: {file}");
    let released = run(Command::new(&binary).arg("--version")).stdout;
    let unit_in_tarball = fs::read_to_string(unpacked.join(&folder).join("connlimit.service")).unwrap();
    let sysusers_in_tarball = fs::read_to_string(unpacked.join(&folder).join("connlimit.sysusers")).unwrap();
    assert!(unpacked.join(&folder).join("Containerfile").is_file(), "the tarball lacks the Containerfile");
    // Completions and man pages, made from the CLI's definitions, one page per subcommand.
    for file in
        ["completions/connlimit.bash", "completions/_connlimit", "completions/connlimit.fish", "man/connlimit.1"]
            .into_iter()
            .map(str::to_owned)
            .chain(SUBCOMMANDS.iter().map(|sub| format!("man/connlimit-{sub}.1")))
    {
        let text = fs::read_to_string(unpacked.join(&folder).join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains("connlimit"), "{file}");
    }
    let _ = fs::remove_dir_all(&unpacked);
    assert!(String::from_utf8_lossy(&released).starts_with(concat!("connlimit ", env!("CARGO_PKG_VERSION"))));

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
    let user_before = connlimit_user();

    // The package's contents, before installing: completions for bash, zsh
    // and fish, and man pages, gzipped, one per subcommand.
    let listing = String::from_utf8(run(Command::new("dpkg").arg("-c").arg(&deb)).stdout).unwrap();
    let listed = |path: &str| listing.lines().any(|l| l.ends_with(&format!(".{path}")));
    for path in [
        "/usr/share/bash-completion/completions/connlimit",
        "/usr/share/zsh/vendor-completions/_connlimit",
        "/usr/share/fish/vendor_completions.d/connlimit.fish",
        "/usr/share/man/man1/connlimit.1.gz",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(SUBCOMMANDS.iter().map(|sub| format!("/usr/share/man/man1/connlimit-{sub}.1.gz")))
    {
        assert!(listed(&path), "`dpkg -c` does not list {path}:\n{listing}");
    }

    let _purge = Purge;
    run(Command::new("dpkg").arg("--install").arg(&deb));
    let files: Vec<PathBuf> = String::from_utf8(run(Command::new("dpkg").args(["--listfiles", "connlimit"])).stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    let conffile = Path::new("/etc/connlimit/connlimit.toml");
    let unit = Path::new("/usr/lib/systemd/system/connlimit.service");
    let sysusers = Path::new("/usr/lib/sysusers.d/connlimit.conf");
    for wanted in [Path::new("/usr/bin/connlimit"), unit, conffile, sysusers] {
        assert!(files.iter().any(|f| f == wanted), "the package lacks {}: {files:?}", wanted.display());
    }
    // man finds the installed pages (the gzip is whole and the page renders).
    if Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let page =
            run(Command::new("man").args(["-P", "cat", "connlimit-set"]).env("MANWIDTH", "100").env("LC_ALL", "C"))
                .stdout;
        assert!(String::from_utf8_lossy(&page).contains("--no-dry-run"), "{}", String::from_utf8_lossy(&page));
    }

    // The installed binary is the released one: same version, commit and kernel object.
    let installed = run(Command::new("/usr/bin/connlimit").arg("--version")).stdout;
    assert_eq!(String::from_utf8_lossy(&installed), String::from_utf8_lossy(&released));

    // The unit's user exists: a system user without a login shell, made by
    // postinst (or left as it was if it existed).
    let user = connlimit_user().expect("the package did not create the user connlimit");
    assert!(user[2].parse::<u32>().unwrap() < 1000, "connlimit is not a system user: {user:?}");
    assert!(user[6].ends_with("nologin"), "connlimit can log in: {user:?}");
    if let Some(before) = &user_before {
        assert_eq!(&user, before, "postinst changed an existing user connlimit");
    }
    let group = run(Command::new("id").args(["-gn", "connlimit"])).stdout;
    assert_eq!(String::from_utf8_lossy(&group).trim(), "connlimit");

    // The unit runs what the package installs, with the file it installs
    // (the tarball's unit is the same file), and the file checks.
    let unit_text = fs::read_to_string(unit).unwrap();
    assert_eq!(unit_text, unit_in_tarball);
    assert_eq!(fs::read_to_string(sysusers).unwrap(), sysusers_in_tarball);
    let exec_lines: Vec<&str> = unit_text.lines().filter(|l| l.starts_with("ExecStart")).collect();
    assert!(
        exec_lines.contains(
            &"ExecStartPre=/usr/bin/connlimit check-config --syntax-only --config /etc/connlimit/connlimit.toml"
        ),
        "{exec_lines:?}"
    );
    assert!(
        exec_lines.contains(&"ExecStart=/usr/bin/connlimit serve --config /etc/connlimit/connlimit.toml"),
        "{exec_lines:?}"
    );
    assert!(unit_text.lines().any(|l| l == "User=connlimit"));
    // As the unit checks it: its targets are the machine it is installed on.
    run(Command::new("/usr/bin/connlimit").args(["check-config", "--syntax-only", "--config"]).arg(conffile));
    // Hardening and advice agree: a pid target in another network
    // namespace needs setns, which RestrictNamespaces must let through.
    let restrict = unit_text.lines().find(|l| l.starts_with("RestrictNamespaces=")).expect("no RestrictNamespaces=");
    assert!(restrict.split(['=', ' ']).any(|w| w == "net"), "{restrict} forbids the setns its comment advises");

    // The unit is valid (systemd-analyze finds the user, the binary and
    // every directive), and installed but not enabled.
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

    // Installing again (an upgrade to the same version) keeps the user.
    run(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(connlimit_user().as_ref(), Some(&user));

    // Removing leaves only the conffile; purging removes it and its folder.
    run(Command::new("dpkg").args(["--remove", "connlimit"]));
    assert_eq!(installed_status().as_deref(), Some("deinstall ok config-files"));
    let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert_eq!(left, [conffile], "dpkg --remove should leave only the conffile");
    assert!(!Path::new("/etc/systemd/system/connlimit.service").exists(), "no mask or override is left behind");
    run(Command::new("dpkg").args(["--purge", "connlimit"]));
    assert!(!conffile.exists(), "dpkg --purge removes the conffile");
    assert!(!Path::new("/etc/connlimit").exists(), "dpkg --purge removes /etc/connlimit");
    assert!(installed_status().is_none_or(|s| s.contains("not-installed")), "{:?}", installed_status());
    // The system user stays, as Debian's packages leave theirs; one this
    // test made goes, so that the next run sees postinst create it again.
    assert!(connlimit_user().is_some(), "purge removed the system user");
    if user_before.is_none() {
        run(Command::new("userdel").arg("connlimit"));
    }
}
