//! docs/CLI.md is the `connlimit` reference, generated from the `--help` of
//! every subcommand; this test fails when the two drift apart. Regenerate
//! with `cargo xtask docs`.

use std::{path::Path, process::Command};

const SUBCOMMANDS: [&str; 9] = ["run", "exec", "serve", "check-config", "set", "config", "top", "status", "detach"];

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_connlimit")).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "connlimit {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

fn reference() -> String {
    let mut doc = String::from(
        "# connlimit command reference\n\n\
         <!-- Generated from `connlimit --help` by `cargo xtask docs`; do not edit by hand. -->\n\n\
         Exit status: 0 on success, 1 on a runtime error (one line on stderr says what is wrong \
         and how to fix it), 2 on a usage error; `exec` exits with its server's status.\n\
         Logs go to stderr; set `CONNLIMIT_LOG` (e.g. `debug`) to change their level.\n\n\
         ## connlimit\n\n```text\n",
    );
    doc.push_str(&help(&[]));
    doc.push_str("```\n");
    for sub in SUBCOMMANDS {
        doc.push_str(&format!("\n## connlimit {sub}\n\n```text\n{}```\n", help(&[sub])));
    }
    doc
}

/// The subcommands `connlimit --help` lists (its "Commands:" section), but
/// `help` itself.
fn listed_subcommands() -> Vec<String> {
    let top = help(&[]);
    let commands = top.split("Commands:\n").nth(1).expect("a Commands: section in --help");
    commands
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The reference is the full reference: every subcommand has its section.
#[test]
fn cli_reference_covers_every_subcommand() {
    let listed = listed_subcommands();
    assert_eq!(listed, SUBCOMMANDS, "add the new subcommand to SUBCOMMANDS, then run `cargo xtask docs`");
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CLI.md")).unwrap();
    for sub in &listed {
        assert!(doc.contains(&format!("\n## connlimit {sub}\n")), "docs/CLI.md has no section for {sub}");
    }
}

#[test]
fn cli_reference_matches_help() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CLI.md");
    let want = reference();
    if std::env::var_os("CONNLIMIT_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "docs/CLI.md is out of date with `connlimit --help`; run `cargo xtask docs`");
}
