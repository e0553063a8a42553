//! Puts the kernel programs (`connlimit-ebpf`, built for the BPF target) in
//! `OUT_DIR`, where `src/ebpf` embeds them, and records the git commit for
//! `connlimit --version`.
//!
//! When the BPF toolchain is here (the nightly with `rust-src` and a
//! `bpf-linker` built against its LLVM; `cargo xtask bootstrap` installs
//! both), the object is built fresh from the sources. Otherwise the object
//! kept in the crate (`bpf/connlimit.bpf.o`, refreshed by `cargo xtask
//! bpf-object`) is used, so a stock stable toolchain builds the crate.
//! `CONNLIMIT_BPF_OBJECT=fresh` or `=kept` forces one or the other.
//!
//! Without the `ebpf` feature, or on targets other than Linux, there is no
//! kernel limiter and nothing is built.

#[cfg(feature = "ebpf")]
#[path = "build_bpf.rs"]
mod build_bpf;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rustc-env=CONNLIMIT_GIT_COMMIT={}", git_commit(&manifest_dir));
    #[cfg(feature = "ebpf")]
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        kernel_object(&manifest_dir);
    }
}

/// Puts the kernel object in `OUT_DIR` and tells the crate its hash and
/// where it came from.
#[cfg(feature = "ebpf")]
fn kernel_object(manifest_dir: &Path) {
    let workspace = manifest_dir.parent().unwrap_or(manifest_dir);
    let kept = manifest_dir.join(build_bpf::KEPT_OBJECT);
    // Paths that do not exist would make cargo rerun this script every time.
    for watched in [
        workspace.join("connlimit-ebpf/src"),
        workspace.join("connlimit-ebpf/Cargo.toml"),
        workspace.join("connlimit-common/src"),
        workspace.join("Cargo.lock"),
        kept.clone(),
    ] {
        if watched.exists() {
            println!("cargo:rerun-if-changed={}", watched.display());
        }
    }
    println!("cargo:rerun-if-changed=build_bpf.rs");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=CONNLIMIT_BPF_OBJECT");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("connlimit.bpf.o");
    let path = build_bpf::search_path();
    let wanted = env::var("CONNLIMIT_BPF_OBJECT").unwrap_or_default();
    let missing = if wanted == "kept" {
        Some("CONNLIMIT_BPF_OBJECT=kept".to_owned())
    } else {
        build_bpf::missing_toolchain(workspace, &path)
    };
    let source = match missing {
        None => {
            let built = build_bpf::build(workspace, &out_dir.join("ebpf-target"), &path).unwrap_or_else(|stderr| {
                for line in stderr.lines() {
                    println!("cargo:warning={line}");
                }
                fail("building connlimit-ebpf for the BPF target failed (its output is above)")
            });
            copy(&built, &object);
            "fresh".to_owned()
        }
        Some(why) if wanted == "fresh" => fail(&format!("CONNLIMIT_BPF_OBJECT=fresh, but {why}")),
        Some(why) => {
            if !kept.is_file() {
                fail(&format!("{why}, and the kept object {} is missing", kept.display()));
            }
            println!(
                "cargo:warning=using the kept kernel object {} ({why}); `cargo xtask bootstrap` installs what builds it fresh",
                build_bpf::KEPT_OBJECT
            );
            copy(&kept, &object);
            format!("kept ({why})")
        }
    };
    let sha256 = sha256_hex(&object);
    println!("cargo:rustc-env=CONNLIMIT_BPF_OBJECT_SHA256={sha256}");
    // What --version and status show.
    println!("cargo:rustc-env=CONNLIMIT_BPF_OBJECT_HASH={}", &sha256[..16]);
    println!("cargo:rustc-env=CONNLIMIT_BPF_OBJECT_SOURCE={source}");
}

#[cfg(feature = "ebpf")]
fn sha256_hex(file: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(file).unwrap_or_else(|e| fail(&format!("reading {}: {e}", file.display())));
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(feature = "ebpf")]
fn copy(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap_or_else(|e| fail(&format!("copying {} to {}: {e}", from.display(), to.display())));
}

/// The commit this crate was built from: git's HEAD when the crate sits in
/// its own repository, the commit `cargo package` recorded for a published
/// crate, else "unknown".
fn git_commit(manifest_dir: &Path) -> String {
    let git = |args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(manifest_dir).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // Only this crate's repository, not one it happens to be vendored into.
    let ours = git(&["rev-parse", "--show-toplevel"]).is_some_and(|top| {
        manifest_dir.starts_with(Path::new(&top)) && Path::new(&top).join("connlimit-user").is_dir()
    });
    if ours {
        if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
            for file in ["HEAD", "logs/HEAD"] {
                let file = Path::new(&git_dir).join(file);
                if file.exists() {
                    println!("cargo:rerun-if-changed={}", file.display());
                }
            }
        }
        if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
            return commit;
        }
    }
    // `cargo package` writes {"git": {"sha1": "…"}, …}.
    let vcs_info = fs::read_to_string(manifest_dir.join(".cargo_vcs_info.json")).unwrap_or_default();
    vcs_info
        .split_once("\"sha1\"")
        .and_then(|(_, rest)| rest.split('"').nth(1))
        .filter(|sha| sha.len() >= 12 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        .map_or_else(|| "unknown".to_owned(), |sha| sha[..12].to_owned())
}

#[cfg(feature = "ebpf")]
fn fail(what: &str) -> ! {
    panic!(
        "\n\nconnlimit cannot get its eBPF programs: {what}.\n\
         Run `cargo xtask bootstrap` once: it installs the nightly toolchain's rust-src\n\
         and a bpf-linker built against that nightly's LLVM, then build again.\n"
    )
}
