//! The servers people actually run, started as their users start them:
//! nginx and lighttpd from Debian in their default daemonizing mode under
//! `connlimit exec`, shell daemons for the exit-status and signal rules,
//! `run --unit` through a `systemctl` that prints what systemd prints, and
//! the root cgroup warning. Each test has its own network namespace (every
//! server listens on that namespace's loopback only), cgroup and pin root.
//! Needs root (CI runs it as root).

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use harness::{
    BOUND, Background, Netns, Server, TestCgroup, TestPinRoot, client_v4, connlimit_under, eventually, require_command,
    require_kernel, status_row, unique,
};

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");

fn connlimit(netns: &Netns, root: &Path, args: &[&str]) -> Output {
    connlimit_under(netns, root, args).output().unwrap()
}

/// Runs a command that must fail with one line saying `message`.
fn fails(cmd: &mut Command, message: &str) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "wanted {message:?} in: {stderr}");
    assert_eq!(stderr.trim().lines().filter(|l| l.contains("error")).count(), 1, "{stderr}");
}

/// `(open, refused)` of instance `name`.
fn counts(netns: &Netns, root: &Path, name: &str) -> (u64, u64) {
    let row = status_row(netns, root, name).expect("instance listed");
    (row["open"].as_u64().unwrap(), row["refused"].as_u64().unwrap())
}

/// A fresh temporary directory that servers running as www-data can read,
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects from `client`, makes one keep-alive HTTP request and checks the
/// server answered 200; the connection stays open.
fn http_hold(netns: &Netns, client: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let mut conn = netns.connect_from(client, server)?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&response);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(conn)
}

/// The checks every real server must pass under limit `limit`: each of
/// `clients` gets exactly `limit` served connections and has its next one
/// refused; counts go back to zero once the clients hang up.
fn exactly_the_limit(netns: &Netns, root: &Path, name: &str, server: SocketAddr, limit: u64, clients: u32) {
    let mut held = Vec::new();
    for c in 0..clients {
        let client = client_v4(100 + c);
        for _ in 0..limit {
            held.push(http_hold(netns, client, server).expect("a connection within the limit is served"));
        }
        let refused = netns.connect_from(client, server).expect_err("a connection over the limit is refused");
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    }
    assert_eq!(counts(netns, root, name), (limit * u64::from(clients), u64::from(clients)));
    drop(held);
    assert!(
        eventually(BOUND, || counts(netns, root, name).0 == 0),
        "counts back to zero: {:?}",
        counts(netns, root, name)
    );
    // A freed slot serves again.
    drop(http_hold(netns, client_v4(100), server).unwrap());
}

/// `connlimit exec ... -- server...` in the background, with the cgroup it
/// made. Dropped (a failed test), it stops connlimit and then kills
/// whatever is left in the cgroup, so no server outlives its test.
struct Exec {
    exec: Option<Background>,
    cgroup: PathBuf,
}

impl Exec {
    fn start(netns: &Netns, root: &Path, name: &str, limits: &[&str], server: &[&str]) -> Self {
        let mut args = vec!["exec", "--name", name];
        args.extend(limits);
        args.push("--");
        args.extend(server);
        let exec = Background::spawn(&mut connlimit_under(netns, root, &args)).unwrap();
        let cgroup = connlimit::ebpf::mounts::cgroup2_mount().unwrap().join(format!("connlimit-{name}-{}", exec.pid()));
        Self { exec: Some(exec), cgroup }
    }

    fn log(&self) -> String {
        self.exec.as_ref().map(Background::log).unwrap_or_default()
    }

    fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        self.exec.as_ref().expect("running").wait_for(text, timeout)
    }

    fn pid(&self) -> i32 {
        self.exec.as_ref().expect("running").pid() as i32
    }

    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The sockets (by inode) the server's processes hold open: what
    /// `/proc/PID/fd` names `socket:[INODE]`. A connection's socket leaves
    /// this set only when the server has closed it.
    fn sockets(&self) -> BTreeSet<u64> {
        self.procs()
            .into_iter()
            .flat_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten())
            .filter_map(|fd| {
                let target = std::fs::read_link(fd.ok()?.path()).ok()?;
                target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
    }

    /// Waits until the first process has exited 0 and left a daemon.
    fn daemonized(&self) {
        assert!(
            self.wait_for("guarding until they exit", BOUND),
            "the launcher did not exit leaving a daemon: {}",
            self.log()
        );
    }

    /// SIGTERM to connlimit; the exit status and the log, once it exited.
    fn stop(mut self) -> (Option<i32>, String) {
        let (status, log) = self.exec.take().unwrap().stop();
        assert!(!self.cgroup.exists(), "the cgroup is removed once empty: {log}");
        (status.code(), log)
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        drop(self.exec.take());
        for _ in 0..200 {
            let procs = self.procs();
            if procs.is_empty() && (!self.cgroup.exists() || std::fs::remove_dir(&self.cgroup).is_ok()) {
                return;
            }
            for pid in procs {
                // SAFETY: killing the test's own server.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn nginx_conf(dir: &TempDir, port: u16, workers: u32, reuseport: bool) -> String {
    let conf = format!(
        "user www-data;\n\
         worker_processes {workers};\n\
         pid {pid};\n\
         error_log {error};\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
           log_format workers '$pid $remote_addr $status';\n\
           access_log {access} workers;\n\
           client_body_temp_path {dir}/body;\n\
           proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n\
           uwsgi_temp_path {dir}/uwsgi;\n\
           scgi_temp_path {dir}/scgi;\n\
           keepalive_timeout 120s;\n\
           server {{\n\
             listen 127.0.0.1:{port}{reuseport};\n\
             location / {{ return 200 \"hello\\n\"; }}\n\
           }}\n\
         }}\n",
        pid = dir.file("nginx.pid"),
        error = dir.file("error.log"),
        access = dir.file("access.log"),
        dir = dir.0.display(),
        reuseport = if reuseport { " reuseport" } else { "" },
    );
    let path = dir.file("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

#[test]
fn nginx_daemonizing_by_default_stays_guarded_until_it_stops() {
    require_kernel!();
    let nginx = require_command("nginx", "nginx");
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let dir = TempDir::new("servers-nginx");
    let port = 18800;
    let conf = nginx_conf(&dir, port, 1, false);
    let name = unique("srv-nginx");
    let pid_file = dir.file("nginx.pid");
    // As the user ran it, plus where nginx writes its PID.
    let exec = Exec::start(
        &netns,
        &root.path,
        &name,
        &["--port", "18800", "-m", "2", "--pid-file", &pid_file],
        &[nginx.to_str().unwrap(), "-c", &conf, "-e", &dir.file("error.log")],
    );
    exec.daemonized();
    // nginx's launcher exits as soon as it has forked the master, which
    // then creates the pid file (empty at first), writes its PID and only
    // then starts its worker: wait for each.
    let read_pid = || std::fs::read_to_string(&pid_file).ok()?.trim().parse::<i32>().ok();
    assert!(eventually(BOUND, || read_pid().is_some()), "{}", exec.log());
    let master = read_pid().unwrap();
    assert!(exec.procs().contains(&master), "the master runs in the guarded cgroup: {:?}", exec.procs());
    assert!(eventually(BOUND, || exec.procs().len() == 2), "master and one worker: {:?}", exec.procs());

    let server = SocketAddr::from(([127, 0, 0, 1], port));
    exactly_the_limit(&netns, &root.path, &name, server, 2, 2);

    // SIGHUP reaches the master alone, which reloads: a new worker, the
    // same master and listener, still guarded.
    let old_worker: Vec<i32> = exec.procs().into_iter().filter(|&p| p != master).collect();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(exec.pid(), libc::SIGHUP) };
    assert!(
        eventually(BOUND, || {
            let procs = exec.procs();
            procs.len() == 2 && procs.contains(&master) && !old_worker.iter().any(|p| procs.contains(p))
        }),
        "nginx reloaded: {:?} {}",
        exec.procs(),
        exec.log()
    );
    let _a = http_hold(&netns, client_v4(9), server).unwrap();
    let _b = http_hold(&netns, client_v4(9), server).unwrap();
    assert_eq!(netns.connect_from(client_v4(9), server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    drop((_a, _b));

    // SIGTERM reaches the master (the pid file's), which stops its worker
    // and exits 0; connlimit detaches once the cgroup is empty.
    let (code, log) = exec.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("pids=[{master}]")), "{log}");
    assert!(log.contains("detached"), "{log}");
    assert!(!alive(master));
    assert!(status_row(&netns, &root.path, &name).is_none());
}

#[test]
fn nginx_with_two_reuseport_workers_is_limited_across_both() {
    require_kernel!();
    let nginx = require_command("nginx", "nginx");
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let dir = TempDir::new("servers-nginx2");
    let port = 18801;
    let conf = nginx_conf(&dir, port, 2, true);
    let name = unique("srv-nginx2");
    let exec = Exec::start(
        &netns,
        &root.path,
        &name,
        &["--port", "18801", "-m", "3"],
        &[nginx.to_str().unwrap(), "-c", &conf, "-e", &dir.file("error.log")],
    );
    exec.daemonized();
    assert!(eventually(BOUND, || exec.procs().len() == 3), "master and two workers: {:?}", exec.procs());
    // One listening socket per worker.
    let listeners = netns.run(move || {
        use connlimit::ebpf::sock_diag::SockDiag;
        let sockets = SockDiag::open().and_then(|d| d.listeners()).expect("sock_diag dump");
        sockets.iter().filter(|s| s.local_port == port).count()
    });
    assert_eq!(listeners, 2);

    exactly_the_limit(&netns, &root.path, &name, SocketAddr::from(([127, 0, 0, 1], port)), 3, 8);
    // Both workers served: the access log names each request's worker.
    let access = std::fs::read_to_string(dir.file("access.log")).unwrap();
    let mut workers: Vec<&str> = access.lines().filter_map(|l| l.split(' ').next()).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 2, "{access}");

    // No pid file: SIGTERM goes to every process of the cgroup.
    let procs = exec.procs();
    let (code, log) = exec.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("detached"), "{log}");
    assert!(procs.iter().all(|&p| !alive(p)), "{procs:?}");
}

#[test]
fn lighttpd_daemonizing_by_default_is_limited() {
    require_kernel!();
    let lighttpd = require_command("lighttpd", "lighttpd");
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let dir = TempDir::new("servers-lighttpd");
    std::fs::create_dir(dir.0.join("www")).unwrap();
    std::fs::write(dir.0.join("www/index.html"), "hello\n").unwrap();
    let port = 18802;
    let conf = dir.file("lighttpd.conf");
    std::fs::write(
        &conf,
        format!(
            "server.document-root = \"{www}\"\n\
             server.bind = \"127.0.0.1\"\n\
             server.port = {port}\n\
             server.pid-file = \"{pid}\"\n\
             server.errorlog = \"{error}\"\n\
             server.username = \"www-data\"\n\
             server.groupname = \"www-data\"\n\
             server.max-keep-alive-idle = 120\n\
             index-file.names = ( \"index.html\" )\n",
            www = dir.file("www"),
            pid = dir.file("lighttpd.pid"),
            error = dir.file("error.log"),
        ),
    )
    .unwrap();
    // lighttpd opens its error log after dropping to www-data.
    std::fs::write(dir.file("error.log"), "").unwrap();
    let chown = Command::new("chown").args(["www-data:www-data", &dir.file("error.log")]).status().unwrap();
    assert!(chown.success());
    let name = unique("srv-lighttpd");
    let exec = Exec::start(
        &netns,
        &root.path,
        &name,
        &["--port", "18802", "-m", "2"],
        &[lighttpd.to_str().unwrap(), "-f", &conf],
    );
    exec.daemonized();
    let daemon = exec.procs();
    assert_eq!(daemon.len(), 1, "{daemon:?}: {}", exec.log());
    let listener = exec.sockets();
    assert_eq!(listener.len(), 1, "lighttpd holds its listener alone before any client comes");

    exactly_the_limit(&netns, &root.path, &name, SocketAddr::from(([127, 0, 0, 1], port)), 2, 3);

    // lighttpd's status on SIGTERM is 0 only if it has no connection left
    // open (1.4.69's main(): `if (NULL == srv->conns) rc = 0;`, else 1).
    // Every client has hung up, but on a busy machine the daemon may not
    // have read the last FIN and closed its side yet: wait until it has.
    assert!(
        eventually(BOUND, || exec.sockets() == listener),
        "lighttpd closed the connections its clients hung up: holds {:?}, listener {listener:?}",
        exec.sockets()
    );
    let (code, log) = exec.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("detached"), "{log}");
    assert!(!alive(daemon[0]));
}

#[test]
fn shell_daemons_keep_exec_guarding_and_set_its_status() {
    require_kernel!();
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let dir = TempDir::new("servers-sh");
    let pid_file = dir.file("main.pid");
    // A launcher that leaves a main process (exits 7 on SIGTERM) and a
    // helper behind, and writes the main PID.
    let script = format!(
        "sh -c 'trap \"exit 7\" TERM; while :; do sleep 0.05; done' & echo $! > {pid_file}; sleep 300 & exit 0"
    );
    let name = unique("srv-sh");
    let exec = Exec::start(
        &netns,
        &root.path,
        &name,
        &["-p", "18803", "-m", "1", "--pid-file", &pid_file],
        &["sh", "-c", &script],
    );
    exec.daemonized();
    let main: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(status_row(&netns, &root.path, &name).is_some(), "still enforcing after the launcher exited");

    // SIGTERM goes to the main PID alone; the helper nobody asked to stop
    // lives on, and so does the guard.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(exec.pid(), libc::SIGTERM) };
    assert!(eventually(BOUND, || !alive(main)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(exec.procs().len(), 1, "the helper is left alone: {}", exec.log());
    assert!(status_row(&netns, &root.path, &name).is_some(), "still guarding the helper");

    // The pid file is stale now: the next SIGTERM goes to every process of
    // the cgroup. The main process's status (7) is connlimit's.
    let (code, log) = exec.stop();
    assert_eq!(code, Some(7), "{log}");
    assert!(log.contains("the pid file names no process of the server"), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
}

#[test]
fn a_failed_first_process_sets_the_status_and_nothing_is_killed_unasked() {
    require_kernel!();
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let name = unique("srv-fail");
    let exec = Exec::start(&netns, &root.path, &name, &["-p", "18804", "-m", "1"], &["sh", "-c", "sleep 300 & exit 3"]);
    assert!(exec.wait_for("first process failed", BOUND), "{}", exec.log());
    assert_eq!(exec.procs().len(), 1, "the leftover is not killed");
    let (code, log) = exec.stop();
    assert_eq!(code, Some(3), "{log}");

    // A server that exits 0 alone: exec ends at once with status 0.
    let out = connlimit(&netns, &root.path, &["exec", "--name", &name, "-p", "18804", "-m", "1", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A `systemctl` first on PATH that prints `shown` for `show`, as systemd's
/// prints a unit's properties (`Key=Value` lines), or fails like systemctl
/// on a host not booted with systemd.
fn fake_systemctl(dir: &TempDir, shown: &str) -> String {
    let script = dir.0.join("systemctl");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$*\" >> {}\n{shown}\n", dir.file("calls"))).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:{}", dir.0.display(), std::env::var("PATH").unwrap_or_default())
}

#[test]
fn run_unit_guards_the_units_cgroup_and_names_what_is_wrong() {
    require_kernel!();
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("srv-unit")).unwrap();
    let port = 18805;
    let server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], port))]).unwrap();
    let dir = TempDir::new("servers-unit");
    let mount = connlimit::ebpf::mounts::cgroup2_mount().unwrap();
    let relative = cgroup.path().strip_prefix(&mount).unwrap().display().to_string();
    let main_pid = cgroup.procs()[0];
    let name = unique("srv-unit");
    let run = |path: &str, unit: &str| {
        let mut cmd =
            connlimit_under(&netns, &root.path, &["run", "--name", &name, "-p", "18805", "-m", "1", "--unit", unit]);
        cmd.env("PATH", path);
        cmd
    };

    // A running unit: its ControlGroup is guarded, in its main PID's namespace.
    let path = fake_systemctl(
        &dir,
        &format!(
            "echo LoadState=loaded; echo ActiveState=active; echo ControlGroup=/{relative}; echo MainPID={main_pid}"
        ),
    );
    let guard = Background::spawn(&mut run(&path, "hold.service")).unwrap();
    assert!(guard.wait_for("enforcing;", BOUND), "{}", guard.log());
    let me = client_v4(7);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _held = netns.hello_from(me, addr).unwrap();
    assert_eq!(netns.hello_from(me, addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert!(eventually(BOUND, || server.accepted() == 1), "the refused one never reached the server");
    let (status, log) = guard.stop();
    assert!(status.success() && log.contains("detached"), "{log}");
    let calls = std::fs::read_to_string(dir.file("calls")).unwrap();
    assert!(calls.starts_with("show ") && calls.trim_end().ends_with("-- hold.service"), "{calls}");

    // What systemctl says about a unit that does not exist, one that is
    // stopped, and on a host not booted with systemd.
    let path =
        fake_systemctl(&dir, "echo LoadState=not-found; echo ActiveState=inactive; echo ControlGroup=; echo MainPID=0");
    fails(&mut run(&path, "nope.service"), "no systemd unit named \"nope.service\"");
    let path =
        fake_systemctl(&dir, "echo LoadState=loaded; echo ActiveState=inactive; echo ControlGroup=; echo MainPID=0");
    fails(&mut run(&path, "web.service"), "the systemd unit \"web.service\" has no processes (it is inactive)");
    let path = fake_systemctl(
        &dir,
        "echo 'System has not been booted with systemd as init system (PID 1). Can'\\''t operate.' >&2; exit 1",
    );
    fails(&mut run(&path, "web.service"), "System has not been booted with systemd");
    let empty = TempDir::new("servers-nopath");
    fails(&mut run(empty.0.to_str().unwrap(), "web.service"), "systemctl not found: --unit needs systemd");
    assert!(status_row(&netns, &root.path, &name).is_none());
}

#[test]
fn guarding_the_root_cgroup_warns_that_every_process_counts() {
    require_kernel!();
    let root = TestPinRoot::new("servers-root");
    let netns = Netns::new().unwrap();
    let mount = connlimit::ebpf::mounts::cgroup2_mount().unwrap();
    let name = unique("srv-rootcg");
    let args = ["run", "--name", &name, "-p", "18806", "-m", "1", "--cgroup", mount.to_str().unwrap()];
    let guard = Background::spawn(&mut connlimit_under(&netns, &root.path, &args)).unwrap();
    assert!(guard.wait_for("enforcing;", BOUND), "{}", guard.log());
    let (status, log) = guard.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("the guarded cgroup is the cgroup2 root: every process on the host"), "{log}");

    // A cgroup of its own: no warning.
    let cgroup = TestCgroup::create(&unique("srv-rootcg")).unwrap();
    let args = ["run", "--name", &name, "-p", "18806", "-m", "1", "--cgroup", cgroup.path().to_str().unwrap()];
    let guard = Background::spawn(&mut connlimit_under(&netns, &root.path, &args)).unwrap();
    assert!(guard.wait_for("enforcing;", BOUND), "{}", guard.log());
    let (status, log) = guard.stop();
    assert!(status.success() && !log.contains("cgroup2 root"), "{log}");
}
