//! Debian packages the project's tasks and tests need.

use std::process::Command;

use anyhow::{Result, bail};

/// Commands the test suite runs, with the packages that provide them.
/// nginx and lighttpd are the real servers `tests/tests/servers.rs` guards.
pub const FOR_TESTS: &[(&str, &str)] = &[("iptables", "iptables"), ("nginx", "nginx"), ("lighttpd", "lighttpd")];

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
