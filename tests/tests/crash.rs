//! Crashes, restarts, hangups, races and hostile pin roots, tried on the
//! real `connlimit` binary against the real kernel, as an on-call operator
//! would meet them. Each test has its own network namespace, cgroup and pin
//! root (`CONNLIMIT_PIN_ROOT`). Needs root (CI runs it as root).

use std::{
    io::ErrorKind,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use aya::maps::{Array, Map, MapData};
use connlimit::ebpf::attachments::{AttachPoint, attached_programs};
use connlimit_common::maps::InstanceInfo;
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, TestPinRoot, client_v4, connlimit_under, eventually, require_kernel,
    status_row, unique,
};
use serde_json::Value;

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");
const SIGINT_SERVER: &str = env!("CARGO_BIN_EXE_sigint-server");

fn connlimit(netns: &Netns, root: &Path, args: &[&str]) -> Output {
    connlimit_under(netns, root, args).output().unwrap()
}

fn succeeds(netns: &Netns, root: &Path, args: &[&str]) -> String {
    let out = connlimit(netns, root, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "connlimit {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &stderr
}

/// Runs a command that must fail with one line saying `message`.
fn fails(netns: &Netns, root: &Path, args: &[&str], message: &str) -> String {
    let out = connlimit(netns, root, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "connlimit {args:?}: {stderr}");
    assert!(stderr.contains(message), "connlimit {args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    stderr
}

/// `connlimit run` in the background, once it enforces.
fn start(netns: &Netns, root: &Path, args: &[&str]) -> Background {
    let child = Background::spawn(&mut connlimit_under(netns, root, args)).unwrap();
    assert!(child.wait_for("enforcing;", BOUND), "{}", child.log());
    child
}

fn lookup_programs(netns: &Netns) -> usize {
    attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().len()
}

/// Rewrites what instance `name` records about itself, as another
/// connlimit version or a crashed owner would have left it.
fn rewrite_info(root: &Path, name: &str, edit: impl FnOnce(&mut InstanceInfo)) {
    let data = MapData::from_pin(root.join(name).join("INSTANCE")).unwrap();
    let mut info: Array<MapData, InstanceInfo> = Map::Array(data).try_into().unwrap();
    let mut value = info.get(&0, 0).unwrap();
    edit(&mut value);
    info.set(0, value, 0).unwrap();
}

/// Field 22 of /proc/<pid>/stat: the start time in clock ticks.
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn run_killed_keeps_enforcing_then_the_same_run_adopts_and_detach_cleans_the_orphan() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-run")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8091))]).unwrap();
    let name = unique("crash-run");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let args = ["run", "--name", &name, "--port", "8091", "-m", "2", "--cgroup", &cgroup_path];
    let server = SocketAddr::from(([127, 0, 0, 1], 8091));
    let me = client_v4(3);

    let first = start(&netns, &root.path, &args);
    let first_pid = first.pid();
    let _a = netns.hello_from(me, server).unwrap();
    let _b = netns.hello_from(me, server).unwrap();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);

    // kill -9: the window between the crash and the restart.
    first.kill();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let _other = netns.hello_from(client_v4(4), server).unwrap();
    let row = status_row(&netns, &root.path, &name).expect("still listed");
    assert_eq!((row["owner"].as_str(), row["pid"].as_u64()), (Some("exited"), Some(u64::from(first_pid))));
    assert_eq!(row["open"], 3);
    assert_eq!(row["refused"], 2);
    let table = succeeds(&netns, &root.path, &["status"]);
    assert!(table.contains(&format!("orphaned (pid {first_pid} exited)")), "{table}");

    // The supervisor runs the same command again: it adopts, counts intact.
    let second = start(&netns, &root.path, &args);
    assert!(second.log().contains("adopted"), "{}", second.log());
    let row = status_row(&netns, &root.path, &name).unwrap();
    assert_eq!((row["owner"].as_str(), row["pid"].as_u64()), (Some("running"), Some(u64::from(second.pid()))));
    assert_eq!((row["open"].as_u64(), row["refused"].as_u64()), (Some(3), Some(2)));
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert_eq!(lookup_programs(&netns), 1, "adopting attaches nothing new");

    // Killed again; this time the operator detaches the orphan.
    second.kill();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let out = succeeds(&netns, &root.path, &["detach", &name]);
    assert!(out.contains("detached"), "{out}");
    assert!(status_row(&netns, &root.path, &name).is_none());
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));
    let _free = netns.hello_from(me, server).unwrap();
}

#[test]
fn exec_killed_keeps_enforcing_for_its_server() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let name = unique("crash-exec");
    let server = SocketAddr::from(([127, 0, 0, 1], 8092));
    let me = client_v4(5);
    let exec = Background::spawn(&mut connlimit_under(
        &netns,
        &root.path,
        &["exec", "--name", &name, "--port", "8092", "-m", "1", "--", HOLD_SERVER, "0.0.0.0:8092"],
    ))
    .unwrap();
    assert!(exec.wait_for("listening", BOUND), "{}", exec.log());
    let exec_pid = exec.pid();
    let _a = netns.hello_from(me, server).unwrap();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);

    exec.kill();
    // The server lives on in its cgroup, still under the limit.
    let cgroup = connlimit::ebpf::mounts::cgroup2_mount().unwrap().join(format!("connlimit-{name}-{exec_pid}"));
    let procs = || std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    assert!(!procs().trim().is_empty(), "the server was killed too");
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let row = status_row(&netns, &root.path, &name).expect("still listed");
    assert_eq!(row["owner"], "exited");

    // The operator adopts the orphan with `run` on the server's cgroup...
    let cgroup_path = cgroup.to_str().unwrap();
    let run = start(&netns, &root.path, &["run", "--name", &name, "-p", "8092", "-m", "1", "--cgroup", cgroup_path]);
    assert!(run.log().contains("adopted"), "{}", run.log());
    assert_eq!(status_row(&netns, &root.path, &name).unwrap()["open"], 1);
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    // ...or detaches it; either way the server is free again.
    let (status, log) = run.stop();
    assert!(status.success() && log.contains("detached"), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
    let _b = netns.hello_from(me, server).unwrap();
    for pid in procs().lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: killing the test's own server.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(eventually(BOUND, || std::fs::remove_dir(&cgroup).is_ok()));
}

#[test]
fn concurrent_sets_on_different_fields_lose_none() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-set")).unwrap();
    let name = unique("crash-set");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let _run =
        start(&netns, &root.path, &["run", "--name", &name, "--port", "8093", "-m", "1", "--cgroup", &cgroup_path]);

    for round in 0..3u8 {
        let (limit, v4, v6, exempt) =
            ((7 + round).to_string(), (24 - round).to_string(), (64 - round).to_string(), format!("10.{round}.0.0/16"));
        let dry_run = if round % 2 == 0 { "true" } else { "false" };
        let fields: [[&str; 2]; 5] = [
            ["--max-conns-per-client-ip", &limit],
            ["--ipv4-prefix-len", &v4],
            ["--ipv6-prefix-len", &v6],
            ["--dry-run", dry_run],
            ["--exempt", &exempt],
        ];
        // 20 at once, four per field, each holding its read-change-write
        // window open for 30 ms: without serialization, updates get lost.
        let children: Vec<_> = (0..20)
            .map(|i| {
                let mut args = vec!["set", "--name", &name];
                args.extend(fields[i % fields.len()]);
                connlimit_under(&netns, &root.path, &args)
                    .env("CONNLIMIT_TEST_DELAY_AT", "set:30")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let out = succeeds(&netns, &root.path, &["config", "--name", &name, "--json"]);
        let config: Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
        assert_eq!(config["max_conns_per_client_ip"].to_string(), limit, "round {round}: {config}");
        assert_eq!(config["ipv4_prefix_len"].to_string(), v4, "round {round}: {config}");
        assert_eq!(config["ipv6_prefix_len"].to_string(), v6, "round {round}: {config}");
        assert_eq!(config["dry_run"].to_string(), dry_run, "round {round}: {config}");
        assert_eq!(config["exempt"], serde_json::json!([exempt]), "round {round}: {config}");
    }
}

#[test]
fn a_crash_in_the_middle_of_attach_leaves_nothing_listed_or_in_the_way() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-mid")).unwrap();
    let name = unique("crash-mid");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let args = ["run", "--name", &name, "--port", "8094", "-m", "1", "--cgroup", &cgroup_path];

    // Killed after pinning everything, before the rename into place.
    let out =
        connlimit_under(&netns, &root.path, &args).env("CONNLIMIT_TEST_CRASH_AT", "before-commit").output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.entries().iter().any(|e| e.starts_with("@staging-")), "{:?}", root.entries());
    assert!(status_row(&netns, &root.path, &name).is_none());
    let table = succeeds(&netns, &root.path, &["status"]);
    assert!(table.contains("no connlimit instances"), "{table}");

    // The next attach clears the leftover (and its pinned links) and proceeds.
    let run = start(&netns, &root.path, &args);
    assert_eq!(root.entries(), vec![name.clone()]);
    assert!(eventually(BOUND, || lookup_programs(&netns) == 1));
    assert_eq!(status_row(&netns, &root.path, &name).unwrap()["owner"], "running");
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));
    assert!(root.entries().is_empty(), "{:?}", root.entries());
}

#[test]
fn hostile_pin_roots_are_refused_and_nothing_outside_is_touched() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-hostile")).unwrap();
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let run = |name: &str| {
        ["run", "--name", name, "--port", "8095", "-m", "1", "--cgroup", cgroup_path.as_str()].map(String::from)
    };
    let args = run("hostile");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Pre-created world-writable, as the kernel's default bpffs mode allows.
    let open = TestPinRoot::new("crash-ww");
    std::fs::create_dir(&open.path).unwrap();
    std::fs::set_permissions(&open.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    fails(&netns, &open.path, &args, "is writable by group or others (mode 0777)");
    fails(&netns, &open.path, &["status"], "chmod 0700");
    fails(&netns, &open.path, &["detach", "hostile", "--force"], "refusing the pin root");
    assert!(open.entries().is_empty());

    // Owned by another user.
    let theirs = TestPinRoot::new("crash-owned");
    std::fs::create_dir(&theirs.path).unwrap();
    std::fs::set_permissions(&theirs.path, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs.path, Some(65534), Some(65534)).unwrap();
    fails(&netns, &theirs.path, &args, "is owned by uid 65534, not root");
    assert!(theirs.entries().is_empty());

    // The root itself a symbolic link to a directory elsewhere.
    let target = TestPinRoot::new("crash-target");
    std::fs::create_dir(&target.path).unwrap();
    let link = TestPinRoot::new("crash-link");
    std::os::unix::fs::symlink(&target.path, &link.path).unwrap();
    fails(&netns, &link.path, &args, "is a symbolic link");
    fails(&netns, &link.path, &["status"], "is a symbolic link");
    assert!(target.entries().is_empty());
    assert_eq!(lookup_programs(&netns), 0);

    // A good root with a symbolic link planted as an instance, pointing at
    // files elsewhere that must survive every command.
    let victim = std::env::temp_dir().join(unique("connlimit-victim"));
    std::fs::create_dir(&victim).unwrap();
    for file in ["CONFIG", "INSTANCE", "link_lookup", "precious"] {
        std::fs::write(victim.join(file), "keep").unwrap();
    }
    let good = TestPinRoot::new("crash-good");
    let name = unique("crash-good");
    let args = run(&name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let enforcing = start(&netns, &good.path, &args);
    std::os::unix::fs::symlink(&victim, good.path.join("planted")).unwrap();
    assert!(status_row(&netns, &good.path, "planted").is_none());
    assert!(status_row(&netns, &good.path, &name).is_some());
    fails(&netns, &good.path, &["detach", "planted"], "no connlimit instance named \"planted\"");
    fails(&netns, &good.path, &["detach", "planted", "--force"], "no connlimit instance named \"planted\"");
    fails(&netns, &good.path, &["set", "--name", "planted", "-m", "3"], "no connlimit instance named");
    let (status, log) = enforcing.stop();
    assert!(status.success(), "{log}");
    // The writer that cleaned up left the planted link and its target alone.
    assert_eq!(good.entries(), vec!["planted".to_owned()]);
    let mut left: Vec<_> = std::fs::read_dir(&victim).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["CONFIG", "INSTANCE", "link_lookup", "precious"]);
    std::fs::remove_dir_all(&victim).unwrap();
}

#[test]
fn detach_never_signals_a_reused_pid() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-pid")).unwrap();
    let name = unique("crash-pid");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let args = ["run", "--name", &name, "--port", "8096", "-m", "1", "--cgroup", &cgroup_path];
    let mut decoy = Command::new("sleep").arg("60").spawn().unwrap();
    let decoy_pid = decoy.id();

    // The owner crashed and its PID now belongs to an unrelated process.
    start(&netns, &root.path, &args).kill();
    rewrite_info(&root.path, &name, |info| {
        info.pid = decoy_pid;
        info.owner_start_ticks = start_ticks(decoy_pid) + 1;
    });
    let table = succeeds(&netns, &root.path, &["status"]);
    assert!(table.contains(&format!("orphaned (pid {decoy_pid} exited)")), "{table}");
    succeeds(&netns, &root.path, &["detach", &name]);
    assert!(status_row(&netns, &root.path, &name).is_none());
    std::thread::sleep(Duration::from_millis(100));
    assert!(decoy.try_wait().unwrap().is_none(), "detach signalled a process that merely reused the PID");

    // The same process with the recorded start time is the owner: asked to
    // stop. (It dies without detaching, so detach removes the orphan.)
    start(&netns, &root.path, &args).kill();
    rewrite_info(&root.path, &name, |info| {
        info.pid = decoy_pid;
        info.owner_start_ticks = start_ticks(decoy_pid);
    });
    assert_eq!(status_row(&netns, &root.path, &name).unwrap()["owner"], "running");
    succeeds(&netns, &root.path, &["detach", &name]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(decoy.wait().unwrap().signal(), Some(libc::SIGTERM));
    assert!(status_row(&netns, &root.path, &name).is_none());
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));
}

#[test]
fn sighup_detaches_run_and_leaves_a_persisted_one_unowned() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-hup")).unwrap();
    let name = unique("crash-hup");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let args = ["run", "--name", &name, "--port", "8097", "-m", "1", "--cgroup", &cgroup_path];
    let hangup = |child: Background| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.pid() as i32, libc::SIGHUP) };
        let (status, log) = child.wait();
        assert!(status.success(), "{log}");
        log
    };

    let log = hangup(start(&netns, &root.path, &args));
    assert!(log.contains("detached"), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));

    let mut persist = args.to_vec();
    persist.push("--persist");
    let log = hangup(start(&netns, &root.path, &persist));
    assert!(log.contains("left enforcing"), "{log}");
    let row = status_row(&netns, &root.path, &name).unwrap();
    assert_eq!((row["owner"].as_str(), row["persistent"].as_bool()), (Some("none"), Some(true)));
    let table = succeeds(&netns, &root.path, &["status"]);
    assert!(table.contains("persisted (no owner)"), "{table}");
    succeeds(&netns, &root.path, &["detach", &name]);
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));

    // `detach` stops a running persisted owner and removes what it leaves.
    let owner = start(&netns, &root.path, &persist);
    let out = succeeds(&netns, &root.path, &["detach", &name]);
    assert!(out.contains(&format!("process {}, its owner, stopped", owner.pid())), "{out}");
    let (status, log) = owner.wait();
    assert!(status.success() && log.contains("left enforcing"), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));
}

#[test]
fn ctrl_c_on_exec_reaches_the_server_once() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let name = unique("crash-intr");
    let mut cmd = connlimit_under(
        &netns,
        &root.path,
        &["exec", "--name", &name, "--port", "8098", "-m", "1", "--", SIGINT_SERVER],
    );
    // As a shell runs a job: its own process group, the terminal's foreground.
    cmd.process_group(0);
    let exec = Background::spawn(&mut cmd).unwrap();
    assert!(exec.wait_for("ready", BOUND), "{}", exec.log());
    // Ctrl-C: the terminal signals the whole foreground process group.
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-(exec.pid() as i32), libc::SIGINT) };
    let (status, log) = exec.wait();
    assert!(log.contains("sigints 1\n"), "{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
}

#[test]
fn exec_user_runs_the_server_unprivileged() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let name = unique("crash-user");
    let out = succeeds(
        &netns,
        &root.path,
        &[
            "exec",
            "--name",
            &name,
            "-p",
            "8099",
            "-m",
            "1",
            "--user",
            "nobody",
            "--",
            "sh",
            "-c",
            "echo uid=$(id -u) gid=$(id -g) groups=$(id -G)",
        ],
    );
    assert!(out.contains("uid=65534 gid=65534 groups=65534\n"), "{out}");
    let out = succeeds(
        &netns,
        &root.path,
        &[
            "exec",
            "--name",
            &name,
            "-p",
            "8099",
            "-m",
            "1",
            "--user",
            "nobody:root",
            "--",
            "sh",
            "-c",
            "echo uid=$(id -u) gid=$(id -g)",
        ],
    );
    assert!(out.contains("uid=65534 gid=0\n"), "{out}");
    fails(
        &netns,
        &root.path,
        &["exec", "--name", &name, "-p", "8099", "-m", "1", "--user", "no-such-user", "--", "true"],
        "no user \"no-such-user\"",
    );
    fails(
        &netns,
        &root.path,
        &["exec", "--name", &name, "-p", "8099", "-m", "1", "--user", "nobody:no-such-group", "--", "true"],
        "no group \"no-such-group\"",
    );
    assert!(status_row(&netns, &root.path, &name).is_none());
}

#[test]
fn an_instance_of_another_layout_version_is_refused_with_the_fix() {
    require_kernel!();
    let root = TestPinRoot::new("crash-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("crash-layout")).unwrap();
    let name = unique("crash-layout");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let args = ["run", "--name", &name, "--port", "8100", "-m", "1", "--cgroup", &cgroup_path, "--persist"];
    let (status, log) = start(&netns, &root.path, &args).stop();
    assert!(status.success(), "{log}");
    rewrite_info(&root.path, &name, |info| info.layout_version = 999);

    let fix = format!(
        "state layout version 999 (this one reads version {}); remove it with `connlimit detach --name {name} --force`",
        connlimit_common::maps::LAYOUT_VERSION
    );
    fails(&netns, &root.path, &args, &fix);
    fails(&netns, &root.path, &["detach", &name], &fix);
    fails(&netns, &root.path, &["set", "--name", &name, "-m", "2"], &fix);
    let out = connlimit(&netns, &root.path, &["status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&fix), "{out:?}");
    assert_eq!(lookup_programs(&netns), 1, "still enforcing until removed");

    succeeds(&netns, &root.path, &["detach", &name, "--force"]);
    assert!(root.entries().is_empty(), "{:?}", root.entries());
    assert!(eventually(BOUND, || lookup_programs(&netns) == 0));
}
