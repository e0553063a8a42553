//! A reader that goes away ends `connlimit` quietly, as it ends other Unix
//! tools (`connlimit status | head -1`), instead of a panic.

use std::{
    io::Read,
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
};

const SIGPIPE: i32 = 13;

#[test]
fn a_closed_pipe_ends_a_printing_command_by_sigpipe_without_a_panic() {
    let dir = std::env::temp_dir().join(format!("connlimit-closed-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("connlimit.toml");
    let instance = format!(
        "[[instance]]\nname = \"web\"\nports = [80]\npid = {}\nmax_conns_per_client_ip = 1\n",
        std::process::id()
    );
    std::fs::write(&file, instance).unwrap();
    // Its standard output is a pipe nobody reads any more.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_connlimit"))
        .arg("check-config")
        .arg(&file)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.signal(), Some(SIGPIPE), "{status:?}: {stderr}");
}
