//! `cargo xtask dist`: the release artifacts, under `target/dist/`:
//!
//! - `connlimit-<version>-x86_64-unknown-linux-musl.tar.gz`: a statically
//!   linked `connlimit` with the README, the licences, the changelog, the
//!   systemd unit, its sysusers.d file, the example config, the
//!   Containerfile, shell completions (`completions/`: bash, zsh, fish) and
//!   man pages (`man/`), the last two made by the binary itself
//!   (`connlimit generate-assets`, from its clap definitions);
//! - `connlimit_<version>-1_amd64.deb`, made by cargo-deb from
//!   `[package.metadata.deb]` in connlimit-user/Cargo.toml;
//! - `SHA256SUMS`, for `sha256sum -c`;
//!
//! and, when podman is installed, the container image `contrib/Containerfile`
//! makes of the tarball and a static busybox: `localhost/connlimit:<version>`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};

use crate::bootstrap::path_with_cargo_bin;

/// The target of the released binary: musl links statically.
const TARGET: &str = "x86_64-unknown-linux-musl";
const CARGO_DEB_VERSION: &str = "3.8.0";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files that go next to the binary in the tarball: (source in the
/// workspace, name in the tarball).
const TARBALL_FILES: &[(&str, &str)] = &[
    ("README.md", "README.md"),
    ("CHANGELOG.md", "CHANGELOG.md"),
    ("LICENSE-MIT", "LICENSE-MIT"),
    ("LICENSE-APACHE", "LICENSE-APACHE"),
    ("contrib/connlimit.service", "connlimit.service"),
    ("contrib/connlimit.toml", "connlimit.toml"),
    ("contrib/connlimit.sysusers", "connlimit.sysusers"),
    ("contrib/Containerfile", "Containerfile"),
];

/// The name `dist` gives the image it builds.
pub fn image_name() -> String {
    format!("localhost/connlimit:{VERSION}")
}

/// Builds the release files and returns the folder that holds them.
pub fn run(root: &Path) -> Result<PathBuf> {
    ensure_target()?;
    crate::cargo(&[
        "build",
        "--release",
        "--locked",
        "--package",
        "connlimit-user",
        "--bin",
        "connlimit",
        "--target",
        TARGET,
    ])?;
    let target = target_dir(root);
    let binary = target.join(TARGET).join("release").join("connlimit");
    require_static(&binary)?;

    let dist = target.join("dist");
    if dist.exists() {
        fs::remove_dir_all(&dist).with_context(|| format!("clearing {}", dist.display()))?;
    }
    fs::create_dir_all(&dist)?;
    let assets = generate_assets(&binary, &target)?;
    let tarball = tarball(root, &binary, &assets, &dist)?;
    let deb = build_deb(root, &binary, &assets, &dist)?;
    fs::remove_dir_all(&assets)?;
    let sums = dist.join("SHA256SUMS");
    let mut lines = String::new();
    for file in [&tarball, &deb] {
        let bytes = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        lines.push_str(&format!("{digest}  {}\n", file_name(file)));
    }
    fs::write(&sums, &lines)?;
    eprintln!("xtask: release artifacts in {}:", dist.display());
    for file in [&tarball, &deb, &sums] {
        eprintln!("  {} ({} bytes)", file_name(file), fs::metadata(file)?.len());
    }
    image(root, &tarball, &dist)?;
    Ok(dist)
}

/// Builds the container image from the tarball with podman, if podman is
/// installed (a note says how otherwise). The build context is the tarball
/// and a static busybox (Debian's busybox-static, installed if missing);
/// the Containerfile has no RUN step, so no container runtime is needed.
fn image(root: &Path, tarball: &Path, dist: &Path) -> Result<()> {
    let name = image_name();
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!(
            "xtask: podman is not installed, so no image; build it as the README says \
             (\"Container image\") to get {name}"
        );
        return Ok(());
    }
    crate::packages::ensure(&[("busybox", "busybox-static")])?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox-static is installed but no /bin/busybox was found")?;
    require_static(busybox).context("the image needs a statically linked busybox: apt-get install busybox-static")?;
    let context = dist.join(".image-context");
    if context.exists() {
        fs::remove_dir_all(&context)?;
    }
    fs::create_dir_all(&context)?;
    fs::copy(tarball, context.join(file_name(tarball)))?;
    fs::copy(busybox, context.join("busybox"))?;
    let build = Command::new("podman")
        .arg("build")
        .arg("--file")
        .arg(root.join("contrib/Containerfile"))
        .args(["--build-arg", &format!("VERSION={VERSION}"), "--tag", &name])
        // Files and the image dated by the commit, like the tarball.
        .arg(format!("--timestamp={}", source_date_epoch(root)))
        .arg("--quiet")
        .arg(&context)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running podman build")?;
    fs::remove_dir_all(&context)?;
    if !build.status.success() {
        bail!("`podman build -f contrib/Containerfile` failed ({})", build.status);
    }
    // --quiet prints the image's ID.
    let id = String::from_utf8_lossy(&build.stdout);
    eprintln!("  image {name} ({}, podman)", id.trim().get(..12).unwrap_or_default());
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Rust's standard library for the musl target (rustup downloads it once).
fn ensure_target() -> Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET)) {
        return Ok(());
    }
    eprintln!("xtask: installing Rust's standard library for {TARGET}");
    let out = Command::new("rustup").args(["target", "add", TARGET]).output().context("running rustup")?;
    if !out.status.success() {
        bail!(
            "`rustup target add {TARGET}` failed, and the static binary needs it: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Fails unless `binary` is an ELF file without a program interpreter,
/// i.e. one that needs no dynamic loader and no shared library.
fn require_static(binary: &Path) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf.get(at..at + len).context("truncated ELF header")?;
        Ok(bytes.iter().rev().fold(0, |v, b| v << 8 | u64::from(*b)))
    };
    // 64-bit little-endian ELF.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("{} is not a 64-bit little-endian ELF file", binary.display());
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        if field((phoff + i * phentsize) as usize, 4)? == u64::from(PT_INTERP) {
            bail!("{} is dynamically linked (it has a program interpreter)", binary.display());
        }
    }
    Ok(())
}

/// Shell completions and man pages, written by the release binary itself
/// (`connlimit generate-assets`) into a fresh folder under `target`.
fn generate_assets(binary: &Path, target: &Path) -> Result<PathBuf> {
    let assets = target.join("dist-assets");
    if assets.exists() {
        fs::remove_dir_all(&assets)?;
    }
    let out = Command::new(binary)
        .arg("generate-assets")
        .arg("--out-dir")
        .arg(&assets)
        .output()
        .with_context(|| format!("running {} generate-assets", binary.display()))?;
    if !out.status.success() {
        bail!("`connlimit generate-assets` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(assets)
}

/// The files of `dir` whose names end with `suffix`, sorted.
fn files_in(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.to_string_lossy().ends_with(suffix));
    files.sort();
    Ok(files)
}

fn tarball(root: &Path, binary: &Path, assets: &Path, dist: &Path) -> Result<PathBuf> {
    let name = format!("connlimit-{VERSION}-{TARGET}");
    let staging = dist.join(".staging");
    let dir = staging.join(&name);
    fs::create_dir_all(&dir)?;
    let copy = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let to = dir.join(to);
        fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        Ok(())
    };
    copy(binary, "connlimit", 0o755)?;
    for (from, to) in TARBALL_FILES {
        copy(&root.join(from), to, 0o644)?;
    }
    // completions/ as generated; man/ with the pages uncompressed.
    for (sub, suffix) in [("completions", ""), ("man", ".1")] {
        fs::create_dir_all(dir.join(sub))?;
        for file in files_in(&assets.join(sub), suffix)? {
            copy(&file, &format!("{sub}/{}", file_name(&file)), 0o644)?;
        }
    }
    let tarball = dist.join(format!("{name}.tar.gz"));
    // The same inputs give the same tarball: sorted, owned by root, dated
    // by the commit.
    let status = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--use-compress-program=gzip -9n"])
        .arg(format!("--mtime=@{}", source_date_epoch(root)))
        .arg("-C")
        .arg(&staging)
        .arg("-cf")
        .arg(&tarball)
        .arg(&name)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed ({status})");
    }
    fs::remove_dir_all(&staging)?;
    Ok(tarball)
}

/// `SOURCE_DATE_EPOCH`, else the commit's time, else 0.
fn source_date_epoch(root: &Path) -> u64 {
    if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|e| e.parse().ok()) {
        return epoch;
    }
    Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// cargo-deb, installed once into cargo's bin directory.
fn ensure_cargo_deb() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let path = path_with_cargo_bin()?;
    let works = Command::new(&cargo).args(["deb", "--version"]).env("PATH", &path).output();
    if works.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (once)");
    let status = Command::new(&cargo)
        .args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB_VERSION])
        .env("PATH", &path)
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("`cargo install cargo-deb --locked` failed ({status})");
    }
    Ok(())
}

/// Runs cargo-deb on an already built `binary`: cargo-deb takes the binary
/// from `<target dir>/release/`, so it gets a target dir of its own.
/// The completions and gzipped man pages go next to it, in `release/assets/`,
/// where `[package.metadata.deb]` assets find them.
fn build_deb(root: &Path, binary: &Path, assets: &Path, output: &Path) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let staging = target_dir(root).join(format!("deb-staging-{}", std::process::id()));
    fs::create_dir_all(staging.join("release"))?;
    fs::copy(binary, staging.join("release").join("connlimit"))
        .with_context(|| format!("copying {}", binary.display()))?;
    for (sub, suffix) in [("completions", ""), ("man", ".1.gz")] {
        let to = staging.join("release/assets").join(sub);
        fs::create_dir_all(&to)?;
        for file in files_in(&assets.join(sub), suffix)? {
            fs::copy(&file, to.join(file_name(&file))).with_context(|| format!("copying {}", file.display()))?;
        }
    }
    fs::create_dir_all(output)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut deb = Command::new(&cargo);
    deb.args(["deb", "--package", "connlimit-user", "--no-build", "--no-dbgsym", "--locked", "--output"])
        .arg(output)
        .current_dir(root)
        .env("PATH", path_with_cargo_bin()?)
        .env("CARGO_TARGET_DIR", &staging);
    let out = deb.output().context("running cargo deb")?;
    let _ = fs::remove_dir_all(&staging);
    if !out.status.success() {
        bail!("`cargo deb` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    // cargo-deb prints the package's path.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path =
        stdout.lines().map(str::trim).rfind(|l| l.ends_with(".deb")).context("cargo deb printed no .deb path")?;
    Ok(PathBuf::from(path))
}
