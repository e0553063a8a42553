//! `connlimit`: per-client-IP TCP connection limits for unmodified servers.
//!
//! Exit status: 0 on success, 1 on a runtime error, 2 on a usage error;
//! `exec` exits with its server's status.

mod assets;
mod check_config;
mod cli;
mod config_file;
mod enforce;
mod follow;
#[cfg(test)]
mod fuzz;
mod logging;
mod manage;
mod metrics;
mod notify;
mod refusals;
mod report;
mod serve;
mod show;
mod target;
mod unit;
mod user;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Config(_) | Command::Top(_) | Command::Status(_) | Command::CheckConfig(_)) {
        end_quietly_on_a_closed_pipe();
    }
    let format = cli.log_format.unwrap_or_else(|| match &cli.command {
        Command::Serve(args) => serve::log_format(&args.config).unwrap_or(LogFormat::Text),
        _ => LogFormat::Text,
    });
    logging::init(format, cli.log_format.is_some());
    if matches!(cli.command, Command::Run(_) | Command::Exec(_) | Command::Serve(_)) {
        raise_fd_limit();
    }
    let result = match cli.command {
        Command::Run(args) => enforce::run(args).map(|()| ExitCode::SUCCESS),
        Command::Exec(args) => enforce::exec(args),
        Command::Serve(args) => serve::serve(args).map(|()| ExitCode::SUCCESS),
        Command::CheckConfig(args) => check_config::check_config(args),
        Command::Set(args) => manage::set(args).map(|()| ExitCode::SUCCESS),
        Command::Detach(args) => manage::detach(args).map(|()| ExitCode::SUCCESS),
        Command::Config(args) => show::config(&args.name.name, args.json.json).map(|()| ExitCode::SUCCESS),
        Command::Top(args) => show::top(args).map(|()| ExitCode::SUCCESS),
        Command::Status(args) => show::status(args.json).map(|()| ExitCode::SUCCESS),
        Command::GenerateAssets(args) => assets::generate(&args.out_dir).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        // As JSON under --log-format json, like every other line.
        logging::fatal(&e);
        ExitCode::FAILURE
    })
}

/// Lets SIGPIPE end the process, as it ends other Unix tools, when what
/// reads its output goes away (`connlimit status | head -1`); Rust ignores
/// the signal, and a print to the closed pipe would panic. Only for the
/// commands that print and exit: a process that enforces keeps running
/// whatever happens to its output.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: restoring a signal's default action, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// What raising the descriptor limit gave, logged once enforcing starts
/// (an error before then stays the one line of output).
static FD_LIMIT: std::sync::OnceLock<std::io::Result<connlimit::ebpf::fds::Raised>> = std::sync::OnceLock::new();

/// Raises the descriptor limit of a process that enforces (it holds the
/// instances' maps and links, the 429 responder's connections and the
/// metrics endpoint's) to the hard limit. The network endpoints keep a
/// reserve of it free (`connlimit::ebpf::fds`).
fn raise_fd_limit() {
    let _ = FD_LIMIT.set(connlimit::ebpf::fds::raise_limit());
}

/// Says what [`raise_fd_limit`] got, once.
pub(crate) fn log_fd_limit() {
    use connlimit::ebpf::fds;
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| match FD_LIMIT.get() {
        Some(Ok(r)) => tracing::info!(
            soft = r.soft,
            hard = r.hard,
            was = r.before,
            reserve = fds::reserve(r.soft),
            "file descriptor limit set; the network endpoints leave the reserve free"
        ),
        Some(Err(e)) => tracing::warn!(error = %e, limit = fds::limit(), "cannot raise the file descriptor limit"),
        None => {}
    });
}
