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
    crate::packages::ensure(&[("iptables", "iptables"), ("nft", "nftables")])?;
    crate::cargo(&["build", "--release", "--package", "connlimit-bench", "--bins"])?;
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
