//! `connlimit generate-assets --out-dir DIR` (hidden, for packagers): shell
//! completions and man pages, generated from the same clap definitions as
//! `--help`, so they never drift from it.
//!
//! - `completions/connlimit.bash`, `completions/_connlimit` (zsh),
//!   `completions/connlimit.fish`;
//! - `man/connlimit.1` and one page per subcommand, `man/connlimit-run.1`,
//!   ... (as git and cargo have them), each gzipped as `*.1.gz` too, for
//!   `/usr/share/man/man1`.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The shells and the file each one's completion goes in.
const COMPLETIONS: [(Shell, &str); 3] =
    [(Shell::Bash, "connlimit.bash"), (Shell::Zsh, "_connlimit"), (Shell::Fish, "connlimit.fish")];

/// Writes everything under `out`; returns nothing but errors that name the file.
pub fn generate(out: &Path) -> Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for (shell, file) in COMPLETIONS {
        let mut bytes = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "connlimit", &mut bytes);
        write(&completions.join(file), &bytes)?;
    }
    for (name, page) in man_pages()? {
        write(&man.join(format!("{name}.1")), &page)?;
        write(&man.join(format!("{name}.1.gz")), &gzip(&page)?)?;
    }
    Ok(())
}

/// (page name, roff) for `connlimit` and each visible subcommand.
fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut cli = Cli::command();
    cli.build();
    let mut pages = Vec::new();
    let mut page = |cmd: clap::Command| -> Result<()> {
        let mut roff = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
        pages.push((cmd.get_name().to_owned(), roff));
        Ok(())
    };
    page(cli.clone())?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        // `connlimit-run(1)`, named as it is invoked: `connlimit run`.
        // (clap takes a static name; this runs once, in a process that then exits.)
        let name: &'static str = Box::leak(format!("connlimit-{}", sub.get_name()).into_boxed_str());
        page(
            sub.clone()
                .name(name)
                .bin_name(format!("connlimit {}", sub.get_name()))
                .display_name(name)
                .version(env!("CARGO_PKG_VERSION")),
        )?;
    }
    Ok(pages)
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// `gzip -9n`: no name or time in the header, so the same page gives the
/// same bytes (reproducible packages).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut child = std::process::Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run gzip, which compresses the man pages; install gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("running gzip")?;
    writer.join().expect("the gzip writer thread").context("writing to gzip")?;
    anyhow::ensure!(out.status.success(), "gzip failed ({})", out.status);
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use clap::CommandFactory;

    use crate::cli::Cli;

    #[test]
    fn completions_and_man_pages_cover_every_visible_subcommand_and_flag() {
        let dir = std::env::temp_dir().join(format!("connlimit-assets-{}", std::process::id()));
        super::generate(&dir).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        let mut cli = Cli::command();
        cli.build();
        let visible: Vec<String> = cli
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| s.get_name().to_owned())
            .collect();
        assert!(visible.len() >= 9, "{visible:?}");
        let (bash, zsh, fish) =
            (read("completions/connlimit.bash"), read("completions/_connlimit"), read("completions/connlimit.fish"));
        assert!(bash.contains("complete -F _connlimit") && zsh.starts_with("#compdef connlimit"), "{zsh:.80}");
        for sub in &visible {
            assert!(bash.contains(sub.as_str()) && zsh.contains(sub.as_str()) && fish.contains(sub.as_str()), "{sub}");
            let page = read(&format!("man/connlimit-{sub}.1"));
            assert!(page.contains(&format!(".TH connlimit-{sub} 1 ")), "{sub}: {page:.300}");
            assert!(page.contains(&format!("\\fBconnlimit {}\\fR", sub.replace('-', "\\-"))), "{sub}: {page:.300}");
            // The gzipped page is the same page.
            let gz =
                Command::new("gzip").arg("-dc").arg(dir.join(format!("man/connlimit-{sub}.1.gz"))).output().unwrap();
            assert_eq!(String::from_utf8(gz.stdout).unwrap(), page, "{sub}");
        }
        assert!(read("completions/connlimit.fish").contains("-l no-dry-run"));
        let main = read("man/connlimit.1");
        assert!(main.contains(".TH connlimit 1") && main.contains("CAP_DAC_READ_SEARCH"), "{main:.400}");
        // Hidden: no page (clap_complete's bash script still knows it).
        assert!(!dir.join("man/connlimit-generate-assets.1").exists());
        assert!(!dir.join("man/connlimit-help.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
