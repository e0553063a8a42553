//! Debian packages the project's tasks and tests need.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// Commands the test suite runs, with the packages that provide them.
/// nginx and lighttpd are the real servers `tests/tests/servers.rs` guards;
/// podman (run with runc: its default runtime, crun, refuses hosts with
/// hybrid cgroups) and docker.io's dockerd are the container runtimes
/// `tests/tests/containers.rs` runs.
pub const FOR_TESTS: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("nginx", "nginx"),
    ("lighttpd", "lighttpd"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("dockerd", "docker.io"),
];

/// Installs Debian packages whose commands are missing.
pub fn ensure(commands: &[(&str, &str)]) -> Result<()> {
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
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    apt(&install)
}

/// `apt-get ARGS`, non-interactive.
pub fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Adds Debian suite `suite` (e.g. `bookworm-backports`) to apt's sources,
/// from the same mirror as the machine's own Debian entry, and refreshes
/// the package lists. Does nothing if a source already names it.
pub fn ensure_suite(suite: &str) -> Result<()> {
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut sources = String::new();
    for path in [Path::new("/etc/apt/sources.list").to_owned()]
        .into_iter()
        .chain(fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())))
    {
        if path.extension().is_none_or(|e| e == "list" || e == "sources") {
            sources.push_str(&fs::read_to_string(&path).unwrap_or_default());
        }
    }
    let named = sources
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.split_whitespace().any(|word| word == suite));
    if !named {
        // The mirror of the deb822 entry that carries the base release.
        let base = suite.split('-').next().unwrap_or(suite);
        // A deb822 entry (`URIs:` and `Suites:`) or a one-line `deb URI SUITE ...`.
        let deb822 = sources
            .split("\n\n")
            .find(|entry| entry.lines().any(|l| l.starts_with("Suites:") && l.split_whitespace().any(|w| w == base)))
            .and_then(|entry| entry.lines().find_map(|l| l.strip_prefix("URIs:")))
            .and_then(|uris| uris.split_whitespace().next());
        let one_line = || {
            sources.lines().map(str::split_whitespace).find_map(|mut words| {
                // Past any `[options]`, the URI, then the suite.
                (words.next() == Some("deb"))
                    .then(|| words.find(|w| w.contains("://")))
                    .flatten()
                    .filter(|_| words.next() == Some(base))
            })
        };
        let mirror = deb822
            .or_else(one_line)
            .map(str::to_owned)
            .filter(|uri| !uri.is_empty())
            .with_context(|| format!("no apt source for Debian {base} to take the mirror of {suite} from"))?;
        let file = dir.join(format!("{suite}.sources"));
        eprintln!("xtask: adding Debian {suite} to apt's sources ({})", file.display());
        fs::write(
            &file,
            format!(
                "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("writing {}", file.display()))?;
    }
    apt(&["update", "-qq"])
}
