//! `cargo xtask systemd`, also a stage of `cargo xtask test`: the release
//! .deb under a real systemd. A Debian 12 root file system (made once by
//! mmdebstrap, with systemd and nginx) goes into an ext4 disk image, and
//! QEMU boots it the way a Debian 12 virtual machine boots: Debian's own
//! kernel and initramfs, the disk over virtio, systemd as PID 1, no network
//! device. A unit in the image runs `tests/systemd/guest_test.py` once the
//! machine is up, which drives the package with systemctl as an operator
//! would, then powers the machine off; its report is read back from the
//! image. Under TCG, like [`crate::kernels`].

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{kernels, packages};

/// What the guest's root file system holds besides Debian's minimal base:
/// systemd as init, the guarded server, what the test runs.
const ROOT_PACKAGES: &str = "systemd,systemd-sysv,dbus,nginx-light,iproute2,python3,procps,kmod,adduser";
const SUITE: &str = "bookworm";
/// The kernel the machine boots: Debian 12's own.
const KERNEL_SERIES: &str = "6.1";
/// Where the test's files sit in the guest.
const GUEST_DIR: &str = "root/connlimit-test";
/// The unit that runs the test once the machine is up.
const TEST_UNIT: &str = "connlimit-guest-test.service";
/// The longest a boot, the test and the power-off may take under TCG on a
/// busy 2-core machine (it takes about 3 minutes on an idle one).
const GUEST_BOUND: Duration = Duration::from_secs(1200);

/// Tests the .deb in `dist` (the release files of `cargo xtask dist`).
pub fn run(root: &Path, dist: &Path) -> Result<()> {
    kernels::ensure_tools()?;
    packages::ensure(&[("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")])?;
    let kernel = kernels::ensure_kernel(KERNEL_SERIES)?;
    let initrd = PathBuf::from(kernel.to_string_lossy().replace("vmlinuz-", "initrd.img-"));
    if !initrd.is_file() {
        bail!("{} has no initramfs at {}; reinstall its package", kernel.display(), initrd.display());
    }
    let deb = release_deb(dist)?;
    let base = ensure_root_fs(root)?;

    // A fresh copy for each run: the test installs, edits and purges.
    let work = root.join("target").join("systemd-guest");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let tree = work.join("root");
    run_quietly(Command::new("cp").arg("-a").arg(&base).arg(&tree), "copying the root file system")?;
    let deb_name = deb.file_name().context("the .deb has no name")?.to_string_lossy().into_owned();
    stage_test(root, &tree, &deb, &deb_name)?;
    // The kernel's modules, as its package installs them on a real machine
    // (sock_diag, which connlimit uses to end and carry connections, is a
    // module in Debian's kernel).
    let release = kernel.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("vmlinuz-")).unwrap_or("");
    let modules = Path::new("/usr/lib/modules").join(release);
    run_quietly(
        Command::new("cp").arg("-a").arg(&modules).arg(tree.join("usr/lib/modules")),
        "copying the kernel's modules",
    )?;
    let image = work.join("disk.img");
    run_quietly(
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", "root", "-d"]).arg(&tree).arg(&image).arg("4G"),
        "mkfs.ext4",
    )?;
    fs::remove_dir_all(&tree)?;

    eprintln!("xtask: booting Debian 12 with systemd as PID 1 ({}) to test {deb_name}", kernel.display());
    let started = Instant::now();
    let console = work.join("console.log");
    boot(&kernel, &initrd, &image, &console)?;
    let report = read_from_image(&image, &format!("/{GUEST_DIR}/out.log"));
    let rc = read_from_image(&image, &format!("/{GUEST_DIR}/rc"));
    print!("{report}");
    eprintln!("xtask: systemd guest done in {:.0} s", started.elapsed().as_secs_f64());
    match rc.trim() {
        "0" => Ok(()),
        "" => bail!("the systemd guest never finished the test; its console is in {}", console.display()),
        code => bail!("the systemd test failed (exit {code}; its checks are above)"),
    }
}

/// Puts the .deb, the test and the unit that runs it into the guest's tree,
/// and an fstab for its disk.
fn stage_test(root: &Path, tree: &Path, deb: &Path, deb_name: &str) -> Result<()> {
    let dir = tree.join(GUEST_DIR);
    fs::create_dir_all(&dir)?;
    fs::create_dir_all(tree.join("usr/lib/modules"))?;
    fs::copy(deb, dir.join(deb_name))?;
    fs::copy(root.join("tests/systemd/guest_test.py"), dir.join("guest_test.py"))?;
    fs::write(tree.join("etc/fstab"), "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")?;
    let inside = format!("/{GUEST_DIR}");
    fs::write(
        tree.join("etc/systemd/system").join(TEST_UNIT),
        format!(
            "[Unit]\n\
             Description=connlimit's systemd test\n\
             After=multi-user.target nginx.service\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             StandardOutput=journal+console\n\
             ExecStart=/bin/sh -c 'python3 {inside}/guest_test.py {inside}/{deb_name} > {inside}/out.log 2>&1; \
             echo $? > {inside}/rc; cat {inside}/out.log; sync'\n\
             ExecStartPost=/bin/systemctl --no-block poweroff\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n"
        ),
    )?;
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    symlink(format!("/etc/systemd/system/{TEST_UNIT}"), wants.join(TEST_UNIT))?;
    Ok(())
}

/// Boots the image and waits for the machine to power off (at most
/// [`GUEST_BOUND`]). No network device: the guest reaches nothing.
fn boot(kernel: &Path, initrd: &Path, image: &Path, console: &Path) -> Result<()> {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "2G", "-smp", "2", "-nic", "none"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=0"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", image.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .spawn()
        .context("running qemu-system-x86_64")?;
    let deadline = Instant::now() + GUEST_BOUND;
    loop {
        if let Some(status) = qemu.try_wait()? {
            if !status.success() {
                eprintln!("xtask: qemu exited with {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!(
                "the systemd guest did not power off within {GUEST_BOUND:?}; its console is in {}",
                console.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A file of the guest's disk (empty if missing), read without mounting.
fn read_from_image(image: &Path, path: &str) -> String {
    Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The .deb among the release files in `dist`.
fn release_deb(dist: &Path) -> Result<PathBuf> {
    fs::read_dir(dist)
        .with_context(|| format!("reading {}", dist.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("no .deb among the release files in {}", dist.display()))
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
