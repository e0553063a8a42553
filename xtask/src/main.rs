//! `cargo xtask <task>`: the project's set-up, test and demo commands.
//!
//! Every task starts with [`bootstrap`], which installs what a fresh machine
//! lacks (idempotently, and at no cost once done).

mod bench;
mod bootstrap;
mod bpf_object;
mod dist;
mod kernels;
mod packages;
mod systemd;

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "connlimit's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly rust-src, a bpf-linker
    /// matching the nightly's LLVM, and a bpffs mounted at /sys/fs/bpf (mode
    /// 0700, root only).
    Bootstrap,
    /// Bootstrap, then run clippy, build the release files (`dist`, which
    /// the package test installs; skipped when CONNLIMIT_DIST_DIR names
    /// them) and run the whole test suite (the eBPF integration tests need
    /// root), then the guest stages: `kernels` and `systemd`
    /// (CONNLIMIT_SKIP_GUEST_KERNELS=1 leaves them out).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the kernel integration suites (kernel, attacks, limits,
    /// responder, crash) on Debian 12's Linux 6.1 and on 6.12 LTS from
    /// bookworm-backports, each booted under QEMU with virtme-ng (as root;
    /// installs QEMU, virtme-ng and the kernels if missing). About 4 minutes a
    /// kernel.
    Kernels,
    /// Build the release files (`dist`) and test the .deb under a real
    /// systemd: a Debian 12 virtual machine (root file system made by
    /// mmdebstrap, systemd as PID 1) where systemctl starts, reloads,
    /// restarts and kills the packaged service guarding nginx.
    Systemd,
    /// Bootstrap, build, and run the `connlimit` CLI with ARGS (as root).
    /// Without ARGS, protect a demo server: Python's http.server on
    /// 127.0.0.1:8080, run as `nobody`, at most 10 connections per client IP.
    Connlimit {
        /// Arguments for `connlimit`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate docs/CLI.md from the CLI's --help.
    Docs,
    /// Rebuild the kernel object kept in the repository
    /// (connlimit-user/bpf/connlimit.bpf.o), which lets a stock stable
    /// toolchain build connlimit; commit the result.
    BpfObject {
        /// Only check that the kept object matches a fresh build.
        #[arg(long)]
        check: bool,
    },
    /// Build the release artifacts under target/dist/: a static (musl)
    /// x86_64 `connlimit` in a tarball, a Debian package, and SHA-256 sums;
    /// with podman installed, also the container image
    /// (contrib/Containerfile) localhost/connlimit:VERSION.
    Dist,
    /// Benchmark connlimit against no limiter, iptables, nftables and the
    /// userspace core, side by side (as root; installs iptables and nftables
    /// if missing), print the report and put it in BENCHMARKS.md.
    Bench {
        /// Print the report only; leave BENCHMARKS.md alone.
        #[arg(long)]
        no_write: bool,
        /// Arguments for connlimit-bench (--reps, --seconds, --clients, --burst-runs).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Where the tests find the release files of `cargo xtask dist`
/// (tests/tests/install.rs).
const DIST_DIR_VAR: &str = "CONNLIMIT_DIST_DIR";

/// The main job's default: one command protecting an unmodified server.
const DEMO: &[&str] = &[
    "exec",
    "--port",
    "8080",
    "--max-conns-per-client-ip",
    "10",
    "--user",
    "nobody",
    "--",
    "python3",
    "-m",
    "http.server",
    "8080",
    "--bind",
    "127.0.0.1",
];

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    bootstrap::run()?;
    match task {
        Task::Bootstrap => Ok(()),
        Task::Test { args } => {
            packages::ensure(packages::FOR_TESTS)?;
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            // The package test installs exactly the release files: build
            // them first, unless CONNLIMIT_DIST_DIR names them already.
            let dist = match std::env::var_os(DIST_DIR_VAR) {
                Some(dir) => std::path::PathBuf::from(dir),
                None => dist::run(&workspace_root())?,
            };
            let dist = dist.to_str().context("the dist folder's path is not UTF-8")?.to_owned();
            let mut test = vec!["test", "--workspace"];
            test.extend(args.iter().map(String::as_str));
            cargo_with_env(&test, &[(DIST_DIR_VAR, &dist)])?;
            // A filtered run is a developer's quick look: no guests.
            if args.is_empty() && std::env::var(kernels::SKIP_ENV).as_deref() != Ok("1") {
                kernels::run(&workspace_root())?;
                systemd::run(&workspace_root(), Path::new(&dist))?;
            }
            Ok(())
        }
        Task::Kernels => kernels::run(&workspace_root()),
        Task::Systemd => systemd::run(&workspace_root(), &dist::run(&workspace_root())?),
        Task::Connlimit { args } => {
            let args: Vec<&str> =
                if args.is_empty() { DEMO.to_vec() } else { args.iter().map(String::as_str).collect() };
            let mut run =
                vec!["run", "--quiet", "--release", "--package", "connlimit-user", "--bin", "connlimit", "--"];
            run.extend(args);
            cargo(&run)
        }
        Task::Bench { no_write, args } => bench::run(no_write, &args),
        Task::BpfObject { check } => bpf_object::run(&workspace_root(), check),
        Task::Dist => dist::run(&workspace_root()).map(drop),
        // The reference test rewrites docs/CLI.md when asked to.
        Task::Docs => cargo_with_env(
            &["test", "--package", "connlimit-user", "--test", "cli_reference"],
            &[("CONNLIMIT_UPDATE_DOCS", "1")],
        ),
    }
}

/// The workspace this xtask belongs to.
pub(crate) fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// Runs the same cargo that runs us, with bpf-linker reachable.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .env("PATH", bootstrap::path_with_cargo_bin()?)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
