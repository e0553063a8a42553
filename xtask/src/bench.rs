//! `cargo xtask bench`: installs the anchors, builds and runs
//! `connlimit-bench`, and records its report in BENCHMARKS.md.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const BEGIN: &str = "<!-- cargo xtask bench: begin -->";
const END: &str = "<!-- cargo xtask bench: end -->";

pub fn run(no_write: bool, args: &[String]) -> Result<()> {
    ensure_packages(&[("iptables", "iptables"), ("nft", "nftables")])?;
    crate::cargo(&["build", "--release", "--package", "connlimit-tests", "--bins"])?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let output = Command::new(target.join("release").join("connlimit-bench"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("running connlimit-bench")?;
    if !output.status.success() {
        bail!("connlimit-bench failed ({})", output.status);
    }
    let report = String::from_utf8(output.stdout)?;
    print!("{report}");
    if no_write {
        return Ok(());
    }
    let path = root.join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).context("reading BENCHMARKS.md")?;
    let (Some(start), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("BENCHMARKS.md lacks the {BEGIN} / {END} markers");
    };
    let updated = format!("{}{BEGIN}\n{report}{}", &doc[..start], &doc[end..]);
    std::fs::write(&path, updated)?;
    eprintln!("xtask: BENCHMARKS.md updated");
    Ok(())
}

/// Installs Debian packages whose commands are missing.
fn ensure_packages(commands: &[(&str, &str)]) -> Result<()> {
    let on_path = |cmd: &str| {
        std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(cmd).is_file())
        })
    };
    let missing: Vec<&str> = commands.iter().filter(|(cmd, _)| !on_path(cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(", "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        if !status.success() {
            bail!("apt-get {} failed ({status}); install {} yourself", args.join(" "), missing.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    apt(&install)
}
