//! An operator's walkthrough, end to end: the `connlimit` binary protecting a
//! real server from real clients, inside a network namespace of the test's
//! own. Needs root (CI runs it as root).

use std::{io::ErrorKind, net::SocketAddr, process::Output};

use connlimit::ebpf::{
    Instance,
    attachments::{AttachPoint, attached_programs},
};
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, client_v4, connlimit_in, eventually, require_kernel, unique,
};
use serde_json::Value;

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");

/// `connlimit args...` run inside `netns`, to completion.
fn connlimit(netns: &Netns, args: &[&str]) -> Output {
    connlimit_in(netns, args).output().unwrap()
}

fn ok_json(netns: &Netns, args: &[&str]) -> Value {
    let out = connlimit(netns, args);
    assert!(out.status.success(), "connlimit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails(netns: &Netns, args: &[&str], code: i32, message: &str) {
    let out = connlimit(netns, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "connlimit {args:?}: {stderr}");
    assert!(stderr.contains(message), "connlimit {args:?}: {stderr}");
    if code == 1 {
        // Runtime errors: one line saying what is wrong and how to fix it.
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("connlimit: error: "), "{stderr}");
    }
}

fn running(name: &str) -> bool {
    Instance::list().unwrap().iter().any(|n| n == name)
}

#[test]
fn operator_walkthrough_exec_set_top_status_detach() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let name = unique("walk");
    let server = SocketAddr::from(([127, 0, 0, 1], 8080));

    // One command protects an unmodified server.
    let mut exec = connlimit_in(
        &netns,
        &[
            "exec",
            "--name",
            &name,
            "--port",
            "8080",
            "--max-conns-per-client-ip",
            "2",
            "--",
            HOLD_SERVER,
            "0.0.0.0:8080",
        ],
    );
    let exec = Background::spawn(&mut exec).unwrap();
    // hold-server says "listening" once its listener is up.
    assert!(exec.wait_for("listening", BOUND), "{}", exec.log());

    let me = client_v4(1);
    let _a = netns.hello_from(me, server).unwrap();
    let _b = netns.hello_from(me, server).unwrap();
    let refused = netns.hello_from(me, server).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    let top = ok_json(&netns, &["top", "--name", &name, "--json"]);
    let row = top["clients"].as_array().unwrap().iter().find(|c| c["client"] == "127.1.0.1").expect("client listed");
    assert_eq!((row["open"].as_u64(), row["refused"].as_u64()), (Some(2), Some(1)));
    assert_eq!(top["max_conns_per_client_ip"], 2);

    // Raise the limit live; `set` says what changed, old -> new, and only that.
    let out =
        connlimit(&netns, &["set", "--name", &name, "--max-conns-per-client-ip", "3", "--exempt", "127.1.5.0/24"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{name}: max conns per client IP: 2 -> 3\n{name}: exempt: none -> 127.1.5.0/24\n")
    );
    // Dry run is a switch for `set` as for `run`, with --no-dry-run to
    // leave it; `--dry-run true|false` still works.
    let set = |args: &[&str]| {
        let out = connlimit(&netns, &[&["set", "--name", &name], args].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(set(&["--dry-run"]), format!("{name}: dry run: off -> on\n"));
    assert_eq!(
        set(&["--dry-run", "true"]),
        format!("{name}: nothing changed (every field given already had that value)\n")
    );
    assert_eq!(set(&["--no-dry-run"]), format!("{name}: dry run: on -> off\n"));
    assert_eq!(
        set(&["--dry-run", "false"]),
        format!("{name}: nothing changed (every field given already had that value)\n")
    );
    // Ports are shown in what changed, as in `config`.
    assert_eq!(set(&["--port", "8080", "--port", "8090"]), format!("{name}: ports: 8080 -> 8080, 8090\n"));
    assert_eq!(set(&["--port", "8080"]), format!("{name}: ports: 8080, 8090 -> 8080\n"));
    // A network limit of 0 is an exempt prefix: --exempt replaces it, and says so.
    assert_eq!(
        set(&["--network-limit", "127.1.6.0/24=0"]),
        format!("{name}: exempt: 127.1.5.0/24 -> 127.1.5.0/24, 127.1.6.0/24\n")
    );
    assert_eq!(
        set(&["--exempt", "127.1.5.0/24"]),
        format!("{name}: exempt: 127.1.5.0/24, 127.1.6.0/24 -> 127.1.5.0/24\n")
    );
    let _c = netns.hello_from(me, server).unwrap();
    let config = ok_json(&netns, &["config", "--name", &name, "--json"]);
    assert_eq!(config["max_conns_per_client_ip"], 3);
    assert_eq!(config["exempt"], serde_json::json!(["127.1.5.0/24"]));
    assert_eq!(config["ports"], serde_json::json!([8080]));
    // Exempt clients are never refused.
    let exempt: Vec<_> = (0..5).map(|_| netns.hello_from(client_v4(0x505), server).unwrap()).collect();

    let status = ok_json(&netns, &["status", "--json"]);
    let mine = status.as_array().unwrap().iter().find(|s| s["name"] == name.as_str()).expect("instance listed");
    assert_eq!(mine["open"], 8);
    assert_eq!(mine["refused"], 1);
    assert_eq!(mine["ports"], serde_json::json!([8080]));
    assert_eq!(mine["persistent"], false);
    // Each instance shows the hash of the kernel object it runs, as `--version` does.
    let version = String::from_utf8(connlimit(&netns, &["--version"]).stdout).unwrap();
    let object = mine["object"].as_str().unwrap();
    assert_eq!(object.len(), 16, "{object}");
    assert!(version.lines().any(|l| l == format!("kernel object {object}")), "{version}");
    drop(exempt);

    // Mistakes get one clear line and the right exit code, and change nothing.
    fails(&netns, &["set", "--name", "no-such-instance", "-m", "1"], 1, "no connlimit instance named");
    fails(&netns, &["set", "--name", &name, "-m", "lots"], 2, "invalid value");
    fails(&netns, &["set", "--name", &name, "--exempt", "10.0.0.0/40"], 2, "invalid prefix length");
    let cgroup = TestCgroup::create(&unique("walk-other")).unwrap();
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    fails(
        &netns,
        &["run", "--name", "second", "-p", "8080", "-m", "1", "--cgroup", &cgroup_path],
        1,
        "already guarded by connlimit instance",
    );
    assert!(!running("second"));
    assert_eq!(ok_json(&netns, &["config", "--name", &name, "--json"])["max_conns_per_client_ip"], 3);

    // Detaching ends the exec (it passes SIGTERM to its server), and says so.
    let out = connlimit(&netns, &["detach", "--name", &name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(&format!("{name}: detached; its owner, `connlimit exec`")), "{said}");
    assert!(said.contains("which stops too") && said.contains("-m 0"), "{said}");
    let (status, log) = exec.wait();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "exec exits with its server's status: {log}");
    assert!(log.contains("detached"), "{log}");
    assert!(!running(&name));
    assert!(attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().is_empty());
}

#[test]
fn run_persist_then_adopt_then_detach() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("walk-persist")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8081))]).unwrap();
    let name = unique("persist");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let server = SocketAddr::from(([127, 0, 0, 1], 8081));
    let me = client_v4(2);

    let start = |extra: &[&str]| {
        let mut cmd =
            connlimit_in(&netns, &["run", "--name", &name, "--port", "8081", "-m", "1", "--cgroup", &cgroup_path]);
        cmd.args(extra);
        let child = Background::spawn(&mut cmd).unwrap();
        assert!(child.wait_for("enforcing;", BOUND), "{}", child.log());
        child
    };
    let stop = |child: Background| {
        let (status, log) = child.stop();
        assert!(status.success(), "{log}");
        log
    };

    let log = stop(start(&["--persist"]));
    assert!(log.contains("left enforcing"), "{log}");
    // Nobody holds it now, yet the kernel still enforces.
    assert!(running(&name));
    let _held = netns.hello_from(me, server).unwrap();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let status = ok_json(&netns, &["status", "--json"]);
    assert!(status.as_array().unwrap().iter().any(|s| s["name"] == name.as_str() && s["persistent"] == true));

    // A later run adopts it instead of failing; without --persist it
    // detaches on exit.
    let log = stop(start(&[]));
    assert!(log.contains("adopted"), "{log}");
    assert!(!running(&name));
    assert!(eventually(BOUND, || attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().is_empty()));
    let _free = netns.hello_from(me, server).unwrap();
}

/// A server that cannot start is found before anything is attached, and a
/// PID that names no process is said to be one.
#[test]
fn exec_of_a_missing_program_and_run_of_a_missing_pid_attach_nothing() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let name = unique("missing");
    let cgroups_before = connlimit_cgroups(&name);
    for (program, message) in [
        ("/nonexistent/server", "cannot run /nonexistent/server: no such file"),
        ("/proc/version", "cannot run /proc/version: it is not an executable file"),
        ("no-such-server-anywhere", "cannot run no-such-server-anywhere: no such command on PATH"),
    ] {
        fails(&netns, &["exec", "--name", &name, "-p", "8082", "-m", "1", "--", program], 1, message);
        assert!(!running(&name), "{program}: an instance was left pinned");
        assert!(attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().is_empty(), "{program}");
        assert_eq!(connlimit_cgroups(&name), cgroups_before, "{program}: a cgroup was left");
    }
    // A PID that was a process a moment ago and is none now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap();
    fails(&netns, &["run", "--name", &name, "-p", "8082", "-m", "1", "--pid", &pid], 1, &format!("no process {pid}; "));
    assert!(!running(&name));
}

/// The cgroups `exec` made for instance `name` (`connlimit-NAME-PID`).
fn connlimit_cgroups(name: &str) -> Vec<String> {
    let root = connlimit::ebpf::mounts::cgroup2_mount().unwrap();
    let prefix = format!("connlimit-{name}-");
    let mut found: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    found.sort();
    found
}

/// A second connlimit instance in a namespace is no "other sk_lookup
/// program" to warn about: connlimit's programs never steer connections.
#[test]
fn a_second_instance_in_a_namespace_is_not_taken_for_a_foreign_program() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("walk-two")).unwrap();
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let start = |name: &str, port: &str| {
        let mut cmd =
            connlimit_in(&netns, &["run", "--name", name, "--port", port, "-m", "1", "--cgroup", &cgroup_path]);
        let child = Background::spawn(&mut cmd).unwrap();
        assert!(child.wait_for("enforcing;", BOUND), "{}", child.log());
        child
    };
    let first = start(&unique("two-a"), "8083");
    let second = start(&unique("two-b"), "8084");
    assert_eq!(attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().len(), 2);
    for child in [second, first] {
        let (status, log) = child.stop();
        assert!(status.success(), "{log}");
        assert!(!log.contains("other sk_lookup programs"), "{log}");
    }
}

/// Under `--log-format json` (or `[log] format = "json"`) every line is a
/// JSON object: lists are arrays, a fatal error is a JSON line too; and a
/// reload applies a changed `[log] format`.
#[test]
fn json_logs_have_arrays_and_json_fatal_errors_and_a_reload_switches_the_format() {
    require_kernel!();
    // A fatal error, as JSON (no kernel needed for this part).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap();
    let netns = Netns::new().unwrap();
    let out = connlimit(&netns, &["--log-format", "json", "run", "-p", "8085", "-m", "1", "--pid", &pid]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let line: Value = serde_json::from_str(stderr.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!((&line["level"], &line["fatal"]), (&Value::from("ERROR"), &Value::from(true)), "{line}");
    assert!(line["message"].as_str().unwrap().starts_with(&format!("connlimit: error: no process {pid}")), "{line}");

    // serve starts with text, then the file says json and SIGHUP applies it.
    let cgroup = TestCgroup::create(&unique("walk-json")).unwrap();
    let dir = std::env::temp_dir().join(unique("walk-json"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("connlimit.toml");
    let instance = |name: &str, port: u16| {
        format!(
            "[[instance]]\nname = \"{name}\"\nports = [{port}]\ncgroup = \"{}\"\nmax_conns_per_client_ip = 1\n\n",
            cgroup.path().display()
        )
    };
    let (a, b) = (unique("json-a"), unique("json-b"));
    std::fs::write(&file, format!("[log]\nformat = \"text\"\n\n{}", instance(&a, 8085))).unwrap();
    let mut cmd = connlimit_in(&netns, &["serve", "--config", file.to_str().unwrap()]);
    let serve = Background::spawn(&mut cmd).unwrap();
    assert!(serve.wait_for("enforcing;", BOUND), "{}", serve.log());
    assert!(serve.log().contains(" INFO connlimit attached"), "text first: {}", serve.log());
    std::fs::write(&file, format!("[log]\nformat = \"json\"\n\n{}{}", instance(&a, 8085), instance(&b, 8086))).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    assert!(serve.wait_for("enforcing 2 instances", BOUND), "{}", serve.log());
    let json: Vec<Value> = serve.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let attached = json
        .iter()
        .find(|v| v["message"] == "connlimit attached" && v["instance"] == b.as_str())
        .unwrap_or_else(|| panic!("no JSON attach line for {b}: {}", serve.log()));
    assert_eq!(attached["ports"], serde_json::json!([8086]), "{attached}");
    assert!(json.iter().any(|v| v["format"] == "json"), "the change is logged: {}", serve.log());
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A foreign sk_lookup program (one that is not connlimit's) is still
/// warned about, by name: here a two-instruction program of the test's own,
/// loaded and linked with raw bpf(2) calls, standing where tubular would.
#[test]
fn a_foreign_sk_lookup_program_is_still_warned_about() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let foreign = ForeignLookup::attach(&netns.path(), "steerer_test");
    let cgroup = TestCgroup::create(&unique("walk-foreign")).unwrap();
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let name = unique("foreign");
    let mut cmd =
        connlimit_in(&netns, &["run", "--name", &name, "--port", "8087", "-m", "1", "--cgroup", &cgroup_path]);
    let child = Background::spawn(&mut cmd).unwrap();
    assert!(child.wait_for("enforcing;", BOUND), "{}", child.log());
    let (status, log) = child.stop();
    assert!(status.success(), "{log}");
    let warning = log.lines().find(|l| l.contains("other sk_lookup programs")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("steerer_test"), "{warning}");
    drop(foreign);
}

/// An sk_lookup program returning SK_PASS, linked to a namespace until dropped.
struct ForeignLookup {
    _prog: std::os::fd::OwnedFd,
    _link: std::os::fd::OwnedFd,
}

impl ForeignLookup {
    fn attach(netns: &std::path::Path, name: &str) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
        const BPF_SK_LOOKUP: u32 = 36;
        // r0 = 1 (SK_PASS); exit.
        let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
        let license = c"GPL";
        let mut load = [0u8; 128];
        load[0..4].copy_from_slice(&BPF_PROG_TYPE_SK_LOOKUP.to_ne_bytes());
        load[4..8].copy_from_slice(&2u32.to_ne_bytes());
        load[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        load[48..48 + name.len()].copy_from_slice(name.as_bytes());
        load[68..72].copy_from_slice(&BPF_SK_LOOKUP.to_ne_bytes());
        // SAFETY: a bpf_attr the size we pass, pointing at live buffers.
        let prog = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, load.as_ptr(), load.len() as u32) };
        assert!(prog >= 0, "loading the foreign program: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor the kernel just gave us.
        let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
        let ns = std::fs::File::open(netns).unwrap();
        let mut link = [0u8; 64];
        link[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        link[4..8].copy_from_slice(&(ns.as_raw_fd() as u32).to_ne_bytes());
        link[8..12].copy_from_slice(&BPF_SK_LOOKUP.to_ne_bytes());
        // SAFETY: as above.
        let link_fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, link.as_ptr(), link.len() as u32) };
        assert!(link_fd >= 0, "linking the foreign program: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        Self { _prog: prog, _link: unsafe { OwnedFd::from_raw_fd(link_fd as i32) } }
    }
}
