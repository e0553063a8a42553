//! `cargo xtask systemd`, also a stage of `cargo xtask test`: the release
//! .deb under a real systemd. A Debian 12 root file system (made once by
//! mmdebstrap, with systemd and nginx) boots in a virtual machine with
//! systemd as PID 1 (virtme-ng's `--systemd`, Debian 12's kernel, under
//! TCG like [`crate::kernels`]), and `tests/systemd/guest_test.py` drives
//! the package there with systemctl as an operator would.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{dist, kernels, packages};

/// What the guest's root file system holds besides Debian's minimal base:
/// systemd as init, the guarded server, what the test runs.
const ROOT_PACKAGES: &str = "systemd,systemd-sysv,dbus,nginx-light,iproute2,python3,procps,kmod,adduser";
const SUITE: &str = "bookworm";
/// The kernel the machine boots: Debian 12's own.
const KERNEL_SERIES: &str = "6.1";
/// Where the test's files sit in the guest.
const GUEST_DIR: &str = "root/connlimit-test";

pub fn run(root: &Path) -> Result<()> {
    kernels::ensure_tools()?;
    packages::ensure(&[("mmdebstrap", "mmdebstrap")])?;
    let image = kernels::ensure_kernel(KERNEL_SERIES)?;
    let deb = release_deb(root)?;
    let base = ensure_root_fs(root)?;

    // A fresh copy for each run: the test installs, edits and purges.
    let guest = root.join("target").join("systemd-guest");
    if guest.exists() {
        fs::remove_dir_all(&guest).with_context(|| format!("clearing {}", guest.display()))?;
    }
    run_quietly(Command::new("cp").arg("-a").arg(&base).arg(&guest), "copying the root file system")?;
    let dir = guest.join(GUEST_DIR);
    fs::create_dir_all(&dir)?;
    let deb_name = deb.file_name().context("the .deb has no name")?;
    fs::copy(&deb, dir.join(deb_name))?;
    fs::copy(root.join("tests/systemd/guest_test.py"), dir.join("guest_test.py"))?;
    let inside = format!("/{GUEST_DIR}");
    let command = format!(
        "python3 {inside}/guest_test.py {inside}/{deb} > {inside}/out.log 2>&1; echo $? > {inside}/rc",
        deb = deb_name.to_string_lossy()
    );

    eprintln!("xtask: booting Debian 12 with systemd as PID 1 ({}) to test {}", image.display(), deb.display());
    let started = Instant::now();
    let status = Command::new("vng")
        .arg("-r")
        .arg(&image)
        .arg("--root")
        .arg(&guest)
        .args(["--rw", "--systemd", "--disable-microvm", "--disable-kvm", "--memory", "2G", "--exec", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running vng")?;
    let log = fs::read_to_string(dir.join("out.log")).unwrap_or_default();
    print!("{log}");
    let rc = fs::read_to_string(dir.join("rc")).unwrap_or_default();
    eprintln!("xtask: systemd guest done in {:.0} s", started.elapsed().as_secs_f64());
    match rc.trim() {
        "0" => Ok(()),
        "" => bail!("the systemd guest never ran the test (vng: {status})"),
        code => bail!("the systemd test failed (exit {code}; its checks are above)"),
    }
}

/// The .deb `cargo xtask dist` made (built now).
fn release_deb(root: &Path) -> Result<PathBuf> {
    dist::run(root)?;
    let dist = dist::target_dir(root).join("dist");
    fs::read_dir(&dist)
        .with_context(|| format!("reading {}", dist.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("cargo xtask dist left no .deb in {}", dist.display()))
}

/// The Debian root file system, made once per package list (the list is
/// its stamp).
fn ensure_root_fs(root: &Path) -> Result<PathBuf> {
    let cache = root.join("target").join("systemd-root");
    let base = cache.join("base");
    let stamp = cache.join("stamp");
    let want = format!("{SUITE} {ROOT_PACKAGES}");
    if base.join("usr/bin/python3").exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(base);
    }
    eprintln!("xtask: making a Debian {SUITE} root file system with mmdebstrap (about a minute, once)");
    let staging = cache.join("staging");
    for dir in [&staging, &base] {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
    }
    fs::create_dir_all(&cache)?;
    run_quietly(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", &format!("--include={ROOT_PACKAGES}"), SUITE])
            .arg(&staging),
        "mmdebstrap",
    )?;
    fs::rename(&staging, &base)?;
    fs::write(&stamp, want)?;
    Ok(base)
}

fn run_quietly(command: &mut Command, what: &str) -> Result<()> {
    let out = command.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
