//! `cargo xtask bpf-object`: rebuilds the kernel object kept in the
//! repository (`connlimit-user/bpf/connlimit.bpf.o`), with the same command
//! as connlimit-user's build script (`connlimit-user/build_bpf.rs`), so a
//! stock stable toolchain can build connlimit.

#[path = "../../connlimit-user/build_bpf.rs"]
#[allow(dead_code)]
mod build_bpf;

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

/// Builds the object fresh and writes it over the kept one, or with `check`
/// fails if they differ.
pub fn run(root: &Path, check: bool) -> Result<()> {
    let path = build_bpf::search_path();
    if let Some(why) = build_bpf::missing_toolchain(root, &path) {
        bail!("cannot build the kernel object: {why}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let built = build_bpf::build(root, &target.join("bpf-object"), &path)
        .map_err(|stderr| anyhow::anyhow!("building connlimit-ebpf failed:\n{stderr}"))?;
    let fresh = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    let kept_path = root.join("connlimit-user").join(build_bpf::KEPT_OBJECT);
    let kept = fs::read(&kept_path).unwrap_or_default();
    if kept == fresh {
        eprintln!("xtask: {} is up to date ({} bytes)", kept_path.display(), fresh.len());
        return Ok(());
    }
    if check {
        bail!("{} is stale; refresh it with `cargo xtask bpf-object` and commit it", kept_path.display());
    }
    fs::create_dir_all(kept_path.parent().context("kept object's folder")?)?;
    fs::write(&kept_path, &fresh).with_context(|| format!("writing {}", kept_path.display()))?;
    eprintln!("xtask: wrote {} ({} bytes); commit it", kept_path.display(), fresh.len());
    Ok(())
}
