//! connlimit as a service: the service file with live reload, the systemd
//! notify protocol, Prometheus metrics scraped by a real Prometheus, the
//! refusal log, least privilege, and the shipped unit and manifest. Tests
//! that load eBPF programs need root (CI runs them as root).

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use connlimit::ebpf::Instance;
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, client_v4, connlimit_bin, eventually, require_command,
    require_kernel, unique,
};
use serde_json::Value;

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn running(name: &str) -> bool {
    Instance::list().unwrap().iter().any(|n| n == name)
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` from `addr`, inside `netns`: (status line, body).
fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    netns.run(move || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
    })
}

/// A datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self { socket, path }
    }

    /// The next message, waiting up to 20 s.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn serve_reloads_the_file_live_and_notifies_systemd() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("svc-serve")).unwrap();
    let addrs = [SocketAddr::from(([0, 0, 0, 0], 8090)), SocketAddr::from(([0, 0, 0, 0], 8091))];
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &addrs).unwrap();
    let (a, b) = (unique("svc-a"), unique("svc-b"));
    let dir = TempDir::new("svc-serve");
    let file = dir.0.join("connlimit.toml");
    let cgroup_path = cgroup.path().display().to_string();
    let instance = |name: &str, port: u16, limit: u32| {
        format!(
            "[[instance]]\nname = \"{name}\"\nports = [{port}]\ncgroup = \"{cgroup_path}\"\nmax_conns_per_client_ip = {limit}\n\n"
        )
    };
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9101));
    let header = format!("metrics_listen = \"{metrics}\"\n\n[log]\nrefusal_log_interval = 1\n\n");
    std::fs::write(&file, format!("{header}{}", instance(&a, 8090, 1))).unwrap();
    let notify = NotifySocket::new(&dir.0);

    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["serve", "--config"]).arg(&file).env("NOTIFY_SOCKET", &notify.path).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let serve = Background::spawn(&mut cmd).unwrap();
    // READY=1 comes once the instance is attached.
    let ready = notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(running(&a), "READY before attaching: {}", serve.log());

    let (port_a, port_b) = (SocketAddr::from(([127, 0, 0, 1], 8090)), SocketAddr::from(([127, 0, 0, 1], 8091)));
    let me = client_v4(0x31);
    let held = netns.hello_from(me, port_a).unwrap();
    for _ in 0..2 {
        assert_eq!(netns.hello_from(me, port_a).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    }
    // The refusal log names the client, the count, the port and the holdings.
    let line = "client 127.1.0.49 refused 2 times on port 8090 in the last 1 s, holds 1 of 1";
    assert!(serve.wait_for(line, BOUND), "{}", serve.log());

    // Raise A's limit and add B: live, without dropping A's connection.
    std::fs::write(&file, format!("{header}{}{}", instance(&a, 8090, 2), instance(&b, 8091, 1))).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    let reloading = notify.next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let ready = notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(running(&b), "{}", serve.log());
    let (_, text) = http_get(&netns, metrics, "/metrics").unwrap();
    for name in [&a, &b] {
        assert!(text.contains(&format!("connlimit_accepted_total{{connlimit_instance=\"{name}\"}}")), "{text}");
    }
    assert!(text.contains(&format!("connlimit_max_conns_per_client{{connlimit_instance=\"{a}\"}} 2\n")), "{text}");
    let second = netns.hello_from(me, port_a).unwrap();
    assert_eq!(netns.hello_from(me, port_a).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let _b1 = netns.hello_from(me, port_b).unwrap();
    assert_eq!(netns.hello_from(me, port_b).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    // The connection made before the reload is still up and counted.
    let mut held = held;
    held.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(matches!(held.read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock), "dropped by the reload");
    assert_eq!(Instance::open(&a).unwrap().num_open(me).unwrap(), 2);

    // A bad file changes nothing and says what is wrong, with the line.
    let bad = format!(
        "[[instance]]\nname = \"{a}\"\nports = [8090]\ncgroup = \"{cgroup_path}\"\nmax_conns_per_client_ip = \"lots\"\n"
    );
    std::fs::write(&file, format!("{header}{bad}")).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    assert!(notify.next().contains("RELOADING=1"));
    assert!(notify.next().contains("READY=1"));
    // (The log comes through a pipe: it may trail the notification.)
    assert!(serve.wait_for("keeping the running configuration", BOUND), "{}", serve.log());
    assert!(
        serve.log().contains(&format!(
            "connlimit.toml:{}: `max_conns_per_client_ip` must be a whole number",
            header.lines().count() + 5
        )),
        "{}",
        serve.log()
    );
    assert!(running(&b));
    assert_eq!(Instance::open(&a).unwrap().config().unwrap().max_conns_per_client_ip, 2);

    // Removing B from the file detaches it.
    std::fs::write(&file, format!("{header}{}", instance(&a, 8090, 2))).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    assert!(notify.next().contains("RELOADING=1"));
    assert!(notify.next().contains("READY=1"));
    assert!(!running(&b), "{}", serve.log());
    let _b2 = netns.hello_from(me, port_b).unwrap();
    let (_, text) = http_get(&netns, metrics, "/metrics").unwrap();
    assert!(!text.contains(&format!("connlimit_instance=\"{b}\"")), "{text}");

    // SIGTERM: STOPPING=1, everything detached, exit 0.
    let (status, log) = serve.stop();
    assert!(notify.next().contains("STOPPING=1"));
    assert!(status.success(), "{log}");
    assert!(!running(&a), "{log}");
    drop((second, held));
}

#[test]
fn persisted_instances_survive_a_crash_and_are_adopted_by_the_next_serve() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("svc-crash")).unwrap();
    let addrs = [SocketAddr::from(([0, 0, 0, 0], 8095)), SocketAddr::from(([0, 0, 0, 0], 8096))];
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &addrs).unwrap();
    let (p, q) = (unique("svc-p"), unique("svc-q"));
    let dir = TempDir::new("svc-crash");
    let file = dir.0.join("connlimit.toml");
    let cgroup_path = cgroup.path().display().to_string();
    let instance = |name: &str, port: u16, persist: bool| {
        format!(
            "[[instance]]\nname = \"{name}\"\nports = [{port}]\ncgroup = \"{cgroup_path}\"\n\
             max_conns_per_client_ip = 1\npersist = {persist}\n\n"
        )
    };
    std::fs::write(&file, instance(&p, 8095, true)).unwrap();
    let start = || {
        let mut cmd = Command::new(connlimit_bin());
        cmd.args(["serve", "--config"]).arg(&file).stdin(Stdio::null());
        netns.enter_on_exec(&mut cmd);
        let serve = Background::spawn(&mut cmd).unwrap();
        assert!(serve.wait_for("enforcing;", BOUND), "{}", serve.log());
        serve
    };
    let server = SocketAddr::from(([127, 0, 0, 1], 8095));
    let me = client_v4(0x71);

    let serve = start();
    let _held = netns.hello_from(me, server).unwrap();
    // A crash: no chance to clean up.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGKILL) };
    let (status, _) = serve.wait();
    assert!(!status.success());
    // Nobody holds the instance, yet the kernel still enforces.
    assert!(running(&p));
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);

    // The restarted service adopts it, counts intact.
    let serve = start();
    assert!(serve.log().contains("adopted the instance, counts intact"), "{}", serve.log());
    assert_eq!(Instance::open(&p).unwrap().num_open(me).unwrap(), 1);
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);

    // Taking it out of the file detaches it for good, persisted or not.
    std::fs::write(&file, instance(&q, 8096, false)).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    assert!(eventually(BOUND, || !running(&p) && running(&q)), "{}", serve.log());
    let _free = netns.hello_from(me, server).unwrap();
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
    assert!(!running(&q), "{log}");
}

#[test]
fn check_config_reports_every_problem_with_its_line() {
    // The shipped example is valid (its cgroups are another machine's).
    let out = Command::new(connlimit_bin())
        .args(["check-config", "--syntax-only"])
        .arg(repo().join("contrib/connlimit.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (syntax only), 1 instances: web"));

    let dir = TempDir::new("svc-check");
    let file = dir.0.join("bad.toml");
    std::fs::write(
        &file,
        "metrics_listen = \"nowhere\"\n[[instance]]\nname = \"x\"\nports = [80, 0]\ncgroup = \"/sys/fs/cgroup/x\"\n\
         max_conns_per_client_ip = 10\nexempt = [\"10.0.0.0/33\"]\n",
    )
    .unwrap();
    let out = Command::new(connlimit_bin()).arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    let at = |n: usize| format!("connlimit: error: {}:{n}: ", file.display());
    assert!(lines[0].starts_with(&at(1)) && lines[0].contains("not an address"), "{stderr}");
    assert!(lines[1].starts_with(&at(4)) && lines[1].contains("0 is not a TCP port"), "{stderr}");
    assert!(lines[2].starts_with(&at(7)) && lines[2].contains("invalid prefix length"), "{stderr}");
}

#[test]
fn check_config_checks_the_targets_on_this_machine_unless_told_syntax_only() {
    let dir = TempDir::new("svc-check-machine");
    let file = dir.0.join("machine.toml");
    let root = connlimit::ebpf::mounts::cgroup2_mount().unwrap();
    let missing = root.join(unique("no-such-unit.service"));
    // A pid that does not exist: past the kernel's pid_max.
    let no_pid = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse::<u32>().unwrap() + 1;
    let me = std::process::id();
    let instance = |name: &str, port: u16, target: String| {
        format!("[[instance]]\nname = \"{name}\"\nports = [{port}]\n{target}\nmax_conns_per_client_ip = 1\n\n")
    };
    let text = [
        instance("root", 80, format!("cgroup = \"{}\"", root.display())),
        instance("missing", 81, format!("cgroup = \"{}\"", missing.display())),
        instance("notcg", 82, format!("cgroup = \"{}\"", dir.0.display())),
        instance("gone", 83, format!("pid = {no_pid}")),
        // This test process shares connlimit's namespace: port 80 twice.
        instance("twice", 80, format!("pid = {me}")),
    ]
    .concat();
    std::fs::write(&file, text).unwrap();
    let out = Command::new(connlimit_bin()).arg("check-config").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let at = format!("connlimit: error: {}: ", file.display());
    let want = [
        format!("instance \"missing\": the cgroup {} does not exist", missing.display()),
        format!("instance \"notcg\": {} is not a cgroup v2 directory", dir.0.display()),
        format!("instance \"gone\": process {no_pid} does not exist"),
        "instance \"twice\": port 80 is guarded by instance \"root\" in the same network namespace".to_owned(),
    ];
    for w in &want {
        assert!(stderr.lines().any(|l| l.starts_with(&format!("{at}{w}"))), "no {w:?} in {stderr}");
    }
    assert!(stderr.contains("--syntax-only"), "{stderr}");
    assert!(!stderr.contains("instance \"root\":"), "{stderr}");

    let out = Command::new(connlimit_bin()).args(["check-config", "--syntax-only"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn prometheus_scrapes_the_refusals_and_promtool_accepts_the_metrics() {
    require_kernel!();
    require_command("prometheus", "prometheus");
    require_command("promtool", "prometheus");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("svc-prom")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8092))]).unwrap();
    let name = unique("svc-prom");
    // The test's own namespace: its loopback ports are all free.
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9100));
    let prometheus_addr = SocketAddr::from(([127, 0, 0, 1], 9090));

    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["--log-format", "json", "run", "--name", &name, "-p", "8092", "-m", "1", "--cgroup"])
        .arg(cgroup.path())
        .args(["--metrics-listen", &metrics.to_string(), "--refusal-log-interval", "1"])
        .stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let run = Background::spawn(&mut cmd).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());

    // One held, three refused.
    let server = SocketAddr::from(([127, 0, 0, 1], 8092));
    let me = client_v4(0x41);
    let _held = netns.hello_from(me, server).unwrap();
    for _ in 0..3 {
        assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    }

    let (status, text) = http_get(&netns, metrics, "/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    let label = format!("{{connlimit_instance=\"{name}\"}}");
    for (metric, value) in [
        ("connlimit_refused_total", "3"),
        ("connlimit_accepted_total", "1"),
        ("connlimit_dry_run_refused_total", "0"),
        ("connlimit_untracked_total", "0"),
        ("connlimit_open_connections", "1"),
        ("connlimit_clients", "1"),
        ("connlimit_max_conns_per_client", "1"),
    ] {
        let sample = format!("{metric}{label} {value}\n");
        assert!(text.contains(&sample), "no {sample:?} in:\n{text}");
    }
    assert!(
        text.contains(&format!("connlimit_map_fill_ratio{{connlimit_instance=\"{name}\",map=\"clients\"}} ")),
        "{text}"
    );
    assert!(!text.contains("127.1."), "no client address may be a label:\n{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The refusal log, as JSON for log shippers.
    assert!(run.wait_for("refused 3 times", BOUND), "{}", run.log());
    let event: Value = run
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["client"] == "127.1.0.65")
        .expect("a JSON refusal line");
    assert_eq!(event["refused"], 3);
    assert_eq!(event["open"], 1);
    assert_eq!(event["level"], "WARN");
    assert!(event["message"].as_str().unwrap().contains("on port 8092"), "{event}");

    // A real Prometheus scrapes it every second.
    let dir = TempDir::new("svc-prom");
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            // No honor_labels: connlimit's label (`connlimit_instance`)
            // leaves Prometheus's `instance` (the target) alone.
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: connlimit\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
        .arg(format!("--web.listen-address={prometheus_addr}"))
        .stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let prometheus = Background::spawn(&mut cmd).unwrap();
    // Both labels are kept: the connlimit instance's and the target's.
    let query = format!(
        "/api/v1/query?query=connlimit_refused_total%7Bconnlimit_instance%3D%22{name}%22%2Cinstance%3D%22{metrics}%22%7D"
    );
    let mut last = String::new();
    let scraped = eventually(Duration::from_secs(60), || {
        let Ok((_, body)) = http_get(&netns, prometheus_addr, &query) else { return false };
        last = body;
        let Ok(v) = serde_json::from_str::<Value>(&last) else { return false };
        v["data"]["result"].as_array().and_then(|r| r.first()).is_some_and(|r| r["value"][1] == "3")
    });
    assert!(
        scraped,
        "Prometheus never returned 3 refusals; last answer: {last}\nprometheus log:\n{}",
        prometheus.log()
    );
    drop(prometheus);

    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn top_sort_refused_shows_the_most_recently_refused_first() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("svc-top")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8093))]).unwrap();
    let name = unique("svc-top");
    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["run", "--name", &name, "-p", "8093", "-m", "1", "--refusal-log-interval", "0", "--cgroup"])
        .arg(cgroup.path())
        .stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let run = Background::spawn(&mut cmd).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());
    let server = SocketAddr::from(([127, 0, 0, 1], 8093));
    // The old offender: refused many times, but before `top` starts.
    let (old, recent) = (client_v4(0x51), client_v4(0x52));
    let _o = netns.hello_from(old, server).unwrap();
    for _ in 0..5 {
        assert!(netns.hello_from(old, server).is_err());
    }
    let _r = netns.hello_from(recent, server).unwrap();

    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["top", "--name", &name, "--sort", "refused", "--interval", "2", "--json"]).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let top = Background::spawn(&mut cmd).unwrap();
    // Refused while `top` watches: until it has taken both readings and
    // printed, so that some refusal falls between them however late its
    // first reading comes on a busy machine.
    let started = Instant::now();
    while !top.output_closed() && started.elapsed() < BOUND {
        assert!(netns.hello_from(recent, server).is_err());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, out) = top.wait();
    assert!(status.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let clients = v["clients"].as_array().unwrap();
    assert_eq!(clients[0]["client"], "127.1.0.82", "{out}");
    assert_eq!(clients[1]["client"], "127.1.0.81", "{out}");
    assert!(clients[0]["last_refused_secs_ago"].is_number(), "{out}");
    assert!(clients[1]["last_refused_secs_ago"].is_null(), "{out}");
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
}

/// The capabilities the shipped unit grants, as setpriv wants them.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(repo().join("contrib/connlimit.service")).unwrap();
    let list = |key: &str| -> Vec<String> {
        let line = unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in the unit"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let ambient = list("AmbientCapabilities=");
    assert_eq!(ambient, list("CapabilityBoundingSet="), "the unit must grant exactly what it bounds");
    ambient
}

/// A pin root of the test's own, on bpffs, owned by `uid` as the unit's
/// ExecStartPre makes it (the shared root stays root's: other tests use it
/// meanwhile). Removed on drop.
struct PinRootOwner(PathBuf);

impl PinRootOwner {
    fn give(uid: u32) -> Self {
        let root = std::path::Path::new("/sys/fs/bpf").join(unique("svc-caps-root"));
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&root, Some(uid), Some(uid)).unwrap();
        Self(root)
    }

    /// Whether instance `name` is pinned in this root.
    fn holds(&self, name: &str) -> bool {
        self.0.join(name).exists()
    }
}

impl Drop for PinRootOwner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn least_privilege_the_units_capabilities_are_enough_and_each_is_needed() {
    require_kernel!();
    let caps = unit_capabilities();
    let setpriv_caps = |caps: &[String]| -> String {
        let mut list = vec!["-all".to_owned()];
        list.extend(caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())));
        list.join(",")
    };
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("svc-caps")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8094))]).unwrap();
    // An unprivileged user of no importance (no passwd entry needed).
    let uid = 61_000 + std::process::id() % 1000;
    let root = PinRootOwner::give(uid);
    let start = |caps: &[String], name: &str| {
        let set = setpriv_caps(caps);
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            &format!("--inh-caps={set}"),
            &format!("--ambient-caps={set}"),
            &format!("--bounding-set={set}"),
        ])
        .arg(connlimit_bin())
        .args(["run", "--name", name, "-p", "8094", "-m", "1", "--cgroup"])
        .arg(cgroup.path())
        .env(connlimit::ebpf::PIN_ROOT_ENV, &root.0)
        .stdin(Stdio::null());
        netns.enter_on_exec(&mut cmd);
        Background::spawn(&mut cmd).unwrap()
    };

    // With exactly the unit's capabilities: attaches and enforces.
    let name = unique("svc-caps");
    let run = start(&caps, &name);
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());
    let status = std::fs::read_to_string(format!("/proc/{}/status", run.pid())).unwrap();
    assert!(status.contains(&format!("Uid:\t{uid}")), "not running as {uid}: {status}");
    let server = SocketAddr::from(([127, 0, 0, 1], 8094));
    let me = client_v4(0x61);
    let _held = netns.hello_from(me, server).unwrap();
    assert_eq!(netns.hello_from(me, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
    assert!(!root.holds(&name), "{log}");

    // Without any one of them it fails, with an error naming what is missing.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let name = unique("svc-caps");
        let started = Instant::now();
        let (status, log) = start(&fewer, &name).wait();
        assert!(!status.success(), "ran without {missing}: {log}");
        assert!(started.elapsed() < BOUND, "a start without {missing} hung");
        let hint = if missing == "CAP_DAC_READ_SEARCH" { "permission denied on /sys/fs/bpf" } else { missing };
        assert!(log.contains(hint), "without {missing}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "one line: {log}");
        assert!(!root.holds(&name));
    }
}

#[test]
fn systemd_accepts_the_unit() {
    require_command("systemd-analyze", "systemd");
    let dir = TempDir::new("svc-unit");
    // verify checks that ExecStart= programs exist: point them at this build.
    let unit = std::fs::read_to_string(repo().join("contrib/connlimit.service")).unwrap();
    let unit = unit.replace("/usr/bin/connlimit", &connlimit_bin().display().to_string());
    for key in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "NoNewPrivileges=yes"] {
        assert!(unit.lines().any(|l| l == key), "the unit lacks {key}");
    }
    let path = dir.0.join("connlimit.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Warnings (an unknown setting, a bad value) are printed, not fatal.
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_daemonset_mounts_bpffs_and_cgroup2_with_capabilities_not_privileged() {
    let text = std::fs::read_to_string(repo().join("contrib/kubernetes/daemonset.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k} in the manifest"));
    let ds = kind("DaemonSet");
    let config_map = kind("ConfigMap");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"], true);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let port = annotations["prometheus.io/port"].as_str().unwrap();

    let containers = spec["containers"].as_sequence().unwrap();
    let c = &containers[0];
    let security = &c["securityContext"];
    assert_ne!(security["privileged"], true, "capabilities, not privileged");
    let add: Vec<&str> =
        security["capabilities"]["add"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    // Root in the container owns the pins: the unit's CAP_DAC_READ_SEARCH
    // (for its unprivileged user) is not needed. Kubernetes names
    // capabilities without the CAP_ prefix.
    for cap in unit_capabilities().iter().filter(|c| *c != "CAP_DAC_READ_SEARCH") {
        assert!(add.contains(&cap.trim_start_matches("CAP_")), "{cap} missing from {add:?}");
    }
    assert!(!add.contains(&"SYS_ADMIN"), "{add:?}");
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert!(
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"].as_u64().map(|n| n.to_string()) == Some(port.to_owned()))
    );

    let volumes = spec["volumes"].as_sequence().unwrap();
    let host_path = |path: &str| {
        volumes.iter().find(|v| v["hostPath"]["path"] == path).unwrap_or_else(|| panic!("no hostPath volume {path}"))
    };
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount_of = |volume: &serde_yaml::Value| {
        mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{:?} not mounted", volume["name"]))
    };
    let bpffs_volume = host_path("/sys/fs/bpf");
    let bpffs = mount_of(bpffs_volume);
    assert_eq!(bpffs["mountPath"], "/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");
    // Mounting bpffs for the node takes Bidirectional propagation, which
    // Kubernetes allows only in a privileged container: a one-shot init
    // container.
    let init = spec["initContainers"].as_sequence().unwrap();
    let mounter = init
        .iter()
        .find(|i| {
            i["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|m| m["name"] == bpffs_volume["name"] && m["mountPropagation"] == "Bidirectional")
        })
        .expect("an init container mounting bpffs with Bidirectional propagation");
    // Root-only, as the CLI mounts it (the kernel's default 1777 lets any
    // user take /sys/fs/bpf/connlimit first), with what the image has: its
    // static busybox (which has no `mountpoint` applet).
    let command: Vec<&str> = mounter["command"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(command[..3], ["/bin/busybox", "sh", "-c"], "{command:?}");
    assert!(command[3].contains("/bin/busybox mount -t bpf -o mode=0700 bpf /sys/fs/bpf"), "{command:?}");
    assert!(!command[3].contains("mountpoint"), "busybox-static has no mountpoint applet: {command:?}");
    // Both containers run the image contrib/Containerfile builds, under the
    // name `cargo xtask dist` gives it.
    assert!(repo().join("contrib/Containerfile").is_file());
    for container in init.iter().chain(containers) {
        assert_eq!(container["image"], concat!("localhost/connlimit:", env!("CARGO_PKG_VERSION")));
    }
    // bpf(2) passes the runtimes' default seccomp profiles only with
    // CAP_SYS_ADMIN.
    assert_eq!(security["seccompProfile"]["type"], "Unconfined");
    let cgroup = mount_of(host_path("/sys/fs/cgroup"));
    assert_eq!(cgroup["mountPath"], "/sys/fs/cgroup");

    // The config is the ConfigMap, mounted where `serve --config` reads it.
    let config_volume =
        volumes.iter().find(|v| v["configMap"]["name"] == config_map["metadata"]["name"]).expect("ConfigMap volume");
    let config_dir = mount_of(config_volume)["mountPath"].as_str().unwrap().to_owned();
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    let file = args.iter().position(|a| *a == "--config").map(|i| args[i + 1]).expect("--config");
    let key = file.strip_prefix(&format!("{config_dir}/")).expect("config file in the ConfigMap mount");
    let toml = config_map["data"][key].as_str().expect("the config file in the ConfigMap");
    // The shipped config is valid.
    let dir = TempDir::new("svc-k8s");
    std::fs::write(dir.0.join("c.toml"), toml).unwrap();
    let out = Command::new(connlimit_bin())
        .args(["check-config", "--syntax-only"])
        .arg(dir.0.join("c.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // /metrics is bound to the node's internal IP from the downward API,
    // on the annotated port, never to every address.
    let listen = args.iter().position(|a| *a == "--metrics-listen").map(|i| args[i + 1]).expect("--metrics-listen");
    assert_eq!(listen, format!("$(NODE_IP):{port}"));
    let env = c["env"].as_sequence().expect("env");
    let node_ip = env.iter().find(|e| e["name"] == "NODE_IP").expect("NODE_IP in env");
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    assert!(!toml.contains("metrics_listen = \"0.0.0.0") && !toml.contains("[::]"), "{toml}");
    assert!(!text.contains("0.0.0.0:"), "nothing listens on every address");
}

/// Waits for the next notification holding `want`, skipping others (a
/// STATUS= line may come between); returns it.
fn next_with(notify: &NotifySocket, want: &str) -> String {
    loop {
        let message = notify.next();
        if message.contains(want) {
            return message;
        }
    }
}

#[test]
fn serve_starts_what_it_can_waits_for_missing_targets_and_survives_a_bad_reload() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let (good_port, late_port) = (8191, 8192);
    let cgroup = TestCgroup::create(&unique("svc-part")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], good_port))]).unwrap();
    let late_name = unique("svc-late");
    let late_path = harness_cgroup_path(&late_name);
    let (a, b) = (unique("svc-good"), unique("svc-late"));
    let dir = TempDir::new("svc-part");
    let file = dir.0.join("connlimit.toml");
    let instance = |name: &str, port: u16, cgroup: &str| {
        format!(
            "[[instance]]\nname = \"{name}\"\nports = [{port}]\ncgroup = \"{cgroup}\"\nmax_conns_per_client_ip = 1\n\n"
        )
    };
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9102));
    let header = format!("metrics_listen = \"{metrics}\"\n\n");
    let good = instance(&a, good_port, &cgroup.path().display().to_string());
    let late = instance(&b, late_port, &late_path.display().to_string());
    std::fs::write(&file, format!("{header}{good}{late}")).unwrap();
    let notify = NotifySocket::new(&dir.0);
    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["serve", "--config"]).arg(&file).env("NOTIFY_SOCKET", &notify.path).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let serve = Background::spawn(&mut cmd).unwrap();

    // One target is missing: the other enforces, systemd hears which does
    // not, and READY=1 waits.
    let first = notify.next();
    assert!(!first.contains("READY=1"), "{first:?}");
    assert!(first.contains(&format!("STATUS=not enforcing: {b} (the cgroup {}", late_path.display())), "{first:?}");
    assert!(running(&a) && !running(&b), "{}", serve.log());
    let me = client_v4(0x51);
    let (good_addr, late_addr) =
        (SocketAddr::from(([127, 0, 0, 1], good_port)), SocketAddr::from(([127, 0, 0, 1], late_port)));
    let held = netns.hello_from(me, good_addr).unwrap();
    assert_eq!(netns.hello_from(me, good_addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert!(serve.log().contains("start the service it belongs to"), "{}", serve.log());
    let (_, text) = http_get(&netns, metrics, "/metrics").unwrap();
    assert!(text.contains(&format!("connlimit_enforcing{{connlimit_instance=\"{a}\"}} 1\n")), "{text}");
    assert!(text.contains(&format!("connlimit_enforcing{{connlimit_instance=\"{b}\"}} 0\n")), "{text}");

    // The missing target appears (a unit that starts after connlimit): it
    // is attached by itself, and now READY=1.
    let late_cgroup = TestCgroup::create(&late_name).unwrap();
    let appeared = Instant::now();
    let _late_server =
        Server::hold(HOLD_SERVER, &netns, &late_cgroup, &[SocketAddr::from(([0, 0, 0, 0], late_port))]).unwrap();
    // Attached by itself (no bound on how soon: attaching takes a second or
    // more on a busy machine; `next_with` waits as long as the notify
    // socket's own timeout).
    let ready = next_with(&notify, "READY=1");
    eprintln!("the late target was attached {:?} after its cgroup appeared", appeared.elapsed());
    assert!(ready.contains("STATUS=enforcing 2 instances: "), "{ready:?}");
    assert!(running(&b));
    let _late_held = netns.hello_from(me, late_addr).unwrap();
    assert_eq!(netns.hello_from(me, late_addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);

    // A reload with a mistake check-config's syntax check cannot see: a
    // typo in A's cgroup. A keeps enforcing with its old settings; systemd
    // hears which instance and why, and no READY=1.
    let typo = instance(&a, good_port, &format!("{}-typo", cgroup.path().display()));
    std::fs::write(&file, format!("{header}{typo}{late}")).unwrap();
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    assert!(notify.next().contains("RELOADING=1"));
    let status = notify.next();
    assert!(!status.contains("READY=1"), "{status:?}");
    assert!(status.contains(&format!("STATUS=not enforcing: {a} keeps its old settings (the cgroup")), "{status:?}");
    assert!(running(&a), "the running instance was let go: {}", serve.log());
    for _ in 0..5 {
        assert_eq!(netns.hello_from(me, good_addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    }
    assert_eq!(Instance::open(&a).unwrap().num_open(me).unwrap(), 1);
    assert!(serve.wait_for("it keeps enforcing with its old settings", BOUND), "{}", serve.log());

    // The file fixed: applied without a SIGHUP (systemd, still waiting for
    // the reload's READY=1, would hold another reload back), READY=1 again.
    std::fs::write(&file, format!("{header}{good}{late}")).unwrap();
    let ready = notify.next();
    assert!(ready.contains("READY=1"), "{ready:?}");
    // (The log comes through a pipe: it may trail the notification.)
    assert!(serve.wait_for("the service file changed while an instance does not enforce", BOUND), "{}", serve.log());

    // B's service restarts: its cgroup goes (systemd hears so), and comes
    // back at the same path (followed, READY=1 again).
    drop((_late_held, _late_server));
    drop(late_cgroup);
    let gone = next_with(&notify, "STATUS=");
    assert!(gone.contains(&format!("not enforcing: {b} (the guarded cgroup is gone")), "{gone:?}");
    assert!(!gone.contains("READY=1"), "{gone:?}");
    let (_, text) = http_get(&netns, metrics, "/metrics").unwrap();
    assert!(text.contains(&format!("connlimit_enforcing{{connlimit_instance=\"{b}\"}} 0\n")), "{text}");
    let late_cgroup = TestCgroup::create(&late_name).unwrap();
    let appeared = Instant::now();
    let ready = next_with(&notify, "READY=1");
    // The upkeep looks every 200 ms; how soon is printed, not asserted (a
    // busy machine delays any process).
    eprintln!("followed the cgroup made again {:?} after it appeared", appeared.elapsed());
    let _late_server =
        Server::hold(HOLD_SERVER, &netns, &late_cgroup, &[SocketAddr::from(([0, 0, 0, 0], late_port))]).unwrap();
    let _late_held = netns.hello_from(me, late_addr).unwrap();
    assert_eq!(netns.hello_from(me, late_addr).unwrap_err().kind(), ErrorKind::ConnectionRefused, "{ready:?}");
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
    drop(held);
}

/// Where `TestCgroup::create(name)` makes its directory.
fn harness_cgroup_path(name: &str) -> PathBuf {
    connlimit::ebpf::mounts::cgroup2_mount().unwrap().join(name)
}

#[test]
fn serve_exits_non_zero_only_when_it_can_enforce_nothing() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let dir = TempDir::new("svc-none");
    let file = dir.0.join("connlimit.toml");
    let missing = harness_cgroup_path(&unique("svc-none"));
    std::fs::write(
        &file,
        format!(
            "[[instance]]\nname = \"{}\"\nports = [8193]\ncgroup = \"{}\"\nmax_conns_per_client_ip = 1\n",
            unique("svc-none"),
            missing.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["serve", "--config"]).arg(&file).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let (status, log) = Background::spawn(&mut cmd).unwrap().wait();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("no instance of") && log.contains("can enforce"), "{log}");
    assert!(log.contains(&format!("the cgroup {} does not exist", missing.display())), "{log}");
}
