//! Containers run by real container runtimes, guarded with the README's
//! commands: podman (with runc) and docker (a `dockerd` of the test's own,
//! from Debian's docker.io). The container runs a server of the test's own
//! (`hold-server`, in an image imported from a root file system holding just
//! it and the libraries it links: nothing is pulled) in a network namespace
//! of its own, with no network beyond its loopback. Clients connect to it
//! from inside that namespace. connlimit guards it by the container's PID
//! (`run --pid $(podman inspect -f '{{.State.Pid}}' NAME)`) and by its cgroup
//! (`run --cgroup DIR`, run in the container's namespace), and must still
//! guard it after `podman restart` / `docker restart`, which remove the
//! container's cgroup and make it again at the same path (and, unless the
//! namespace is the test's own, give the container a new network namespace).
//! Needs root (CI runs it as root). Every test removes the containers,
//! images, namespaces and daemons it made.

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use harness::{
    BOUND, Background, Netns, TestPinRoot, client_v4, connlimit_bin, eventually, require_command, require_kernel,
    status_row, unique,
};

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");
/// The port the server listens on inside the container.
const PORT: u16 = 8080;
const LIMIT: usize = 2;
/// How long enforcement may take to resume on a restarted container's new
/// cgroup: the operations issue asks for 1 s; the rest is slack for a busy
/// machine. A bound, not a delay.
const FOLLOW: Duration = Duration::from_secs(10);

/// A container runtime's command line: podman with runc, or docker talking
/// to a daemon of the test's own.
struct Runtime {
    cli: PathBuf,
    /// Options before the subcommand.
    global: Vec<String>,
    /// Options for `run`.
    run: Vec<String>,
    /// `docker` needs a daemon; podman has none.
    daemon: Option<Dockerd>,
    /// How the runtime names a local image.
    image_prefix: &'static str,
}

impl Runtime {
    /// podman with runc: crun, podman's default runtime, refuses hosts with
    /// cgroups in hybrid mode (cgroup v1 controllers beside a cgroup2 mount
    /// at /sys/fs/cgroup/unified, as on these machines); runc puts the
    /// container in a cgroup v2 directory (libpod_parent/libpod-ID).
    fn podman() -> Self {
        let cli = require_command("podman", "podman");
        let runc = require_command("runc", "runc");
        // podman as root raises the container's RLIMIT_NOFILE and
        // RLIMIT_NPROC to its defaults (1048576, 4194304), which runc cannot
        // do where the hard limits are lower (here 20000 open files):
        // give it our open-file limit and a modest process limit (runc was
        // refused 50000 processes here, under a hard limit of 96367).
        let mut nofile = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) }, 0);
        Self {
            cli,
            global: vec!["--runtime".into(), runc.to_str().unwrap().into()],
            run: vec![
                format!("--ulimit=nofile={}:{}", nofile.rlim_cur, nofile.rlim_max),
                "--ulimit=nproc=4096:4096".into(),
            ],
            daemon: None,
            image_prefix: "localhost/",
        }
    }

    /// docker with a `dockerd` of its own (see [`Dockerd`]).
    fn docker() -> Self {
        require_command("dockerd", "docker.io");
        // Debian's client, matching its daemon (any client on PATH would do).
        let cli = require_command("docker", "docker.io");
        let daemon = Dockerd::start();
        Self {
            cli,
            global: vec!["--host".into(), format!("unix://{}", daemon.socket().display())],
            run: Vec::new(),
            daemon: Some(daemon),
            image_prefix: "",
        }
    }

    fn name(&self) -> &'static str {
        if self.daemon.is_some() { "docker" } else { "podman" }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.cli);
        cmd.args(&self.global).args(args).stdin(Stdio::null());
        cmd
    }

    /// Runs `args`, which must succeed; returns the trimmed standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {}: {}{}",
            self.name(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.as_ref().map(|d| format!("\ndockerd: {}", d.log())).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A `dockerd` of the test's own: its own data root, state, socket and pid
/// file under a temporary directory, no iptables rules, no bridge (its
/// containers get `--network none`), the vfs storage driver (no overlay
/// mounts). Stopped, with everything it left, on drop.
struct Dockerd {
    process: Option<Background>,
    dir: PathBuf,
    /// One daemon at a time: two on one host would share paths such as
    /// /run/docker and the /docker cgroup.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static DOCKERD: Mutex<()> = Mutex::new(());

impl Dockerd {
    fn start() -> Self {
        let turn = DOCKERD.lock().unwrap_or_else(|e| e.into_inner());
        // Short: containerd's sockets live under the exec root.
        let dir = PathBuf::from("/tmp").join(unique("cl-dockerd"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let mut cmd = Command::new("dockerd");
        cmd.args([
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--data-root",
            &path("root"),
            "--exec-root",
            &path("exec"),
            "--pidfile",
            &path("dockerd.pid"),
            "--host",
            &format!("unix://{}", path("docker.sock")),
        ])
        .stdin(Stdio::null());
        let process = Background::spawn(&mut cmd).unwrap();
        let daemon = Self { process: Some(process), dir, _turn: turn };
        assert!(daemon.process().wait_for("API listen on", BOUND), "dockerd did not start: {}", daemon.log());
        daemon
    }

    fn process(&self) -> &Background {
        self.process.as_ref().expect("running")
    }

    fn log(&self) -> String {
        self.process().log()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containerd and containers, then exits.
        if let Some(process) = self.process.take() {
            let (status, log) = process.stop();
            if !status.success() {
                eprintln!("dockerd: {status}: {log}");
            }
        }
        // dockerd bind-mounts its data root onto itself.
        let root = std::ffi::CString::new(self.dir.join("root").to_str().unwrap()).unwrap();
        // SAFETY: a path we own; failing (not mounted) is harmless.
        unsafe { libc::umount2(root.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&self.dir);
        // The parent cgroup dockerd made (/docker in each hierarchy), if
        // nothing else uses it.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines() {
            if let Some((left, right)) = line.split_once(" - ")
                && matches!(right.split(' ').next(), Some("cgroup" | "cgroup2"))
                && let Some(mount) = left.split(' ').nth(4)
            {
                let _ = std::fs::remove_dir(Path::new(mount).join("docker"));
            }
        }
    }
}

/// A local image holding the test's server: a root file system with
/// `hold-server` and the shared libraries `ldd` names, imported with
/// `podman import` / `docker import` (no registry, no base image). Removed
/// on drop.
struct Image<'a> {
    runtime: &'a Runtime,
    name: String,
}

impl<'a> Image<'a> {
    fn build(runtime: &'a Runtime) -> Self {
        let dir = std::env::temp_dir().join(unique("cl-image"));
        std::fs::create_dir_all(&dir).unwrap();
        let ldd = Command::new("ldd").arg(HOLD_SERVER).output().unwrap();
        assert!(ldd.status.success(), "ldd: {}", String::from_utf8_lossy(&ldd.stderr));
        let libraries: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
            .map(str::to_owned)
            .collect();
        assert!(libraries.iter().any(|l| l.contains("libc.so")), "{libraries:?}");
        for file in libraries.iter().map(String::as_str).chain([HOLD_SERVER]) {
            let to = dir.join(file.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(file, &to).unwrap_or_else(|e| panic!("copying {file}: {e}"));
        }
        let name = format!("{}{}:latest", runtime.image_prefix, unique("connlimit-test-server"));
        let mut tar = Command::new("tar").arg("-C").arg(&dir).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
        let import = runtime.cmd(&["import", "-", &name]).stdin(tar.stdout.take().unwrap()).output().unwrap();
        assert!(tar.wait().unwrap().success());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(import.status.success(), "{} import: {}", runtime.name(), String::from_utf8_lossy(&import.stderr));
        Self { runtime, name }
    }

    /// The server's path inside the image.
    fn server(&self) -> &'static str {
        HOLD_SERVER
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        let _ = self.runtime.cmd(&["rmi", "-f", &self.name]).output();
    }
}

/// A running container named `name`, removed (killed) on drop.
struct Container<'a> {
    runtime: &'a Runtime,
    name: String,
}

impl<'a> Container<'a> {
    /// `run -d --network NETWORK IMAGE hold-server 0.0.0.0:PORT`, once its
    /// server listens.
    fn run(runtime: &'a Runtime, image: &Image, network: &str) -> Self {
        let name = unique("connlimit-test");
        let listen = format!("0.0.0.0:{PORT}");
        let mut args = vec!["run", "-d", "--name", &name, "--network", network];
        args.extend(runtime.run.iter().map(String::as_str));
        args.extend([image.name.as_str(), image.server(), &listen]);
        runtime.ok(&args);
        let container = Self { runtime, name };
        container.listening(1);
        container
    }

    /// `inspect -f '{{.State.Pid}}' NAME`, as the README has it.
    fn pid(&self) -> u32 {
        let pid = self.runtime.ok(&["inspect", "-f", "{{.State.Pid}}", &self.name]);
        pid.parse().unwrap_or_else(|_| panic!("{} inspect: pid {pid:?}", self.runtime.name()))
    }

    /// The container's cgroup v2 directory (its main process's).
    fn cgroup(&self) -> PathBuf {
        connlimit::ebpf::mounts::cgroup_of_pid(self.pid()).unwrap()
    }

    /// The server's output, over every start of the container.
    fn logs(&self) -> String {
        let out = self.runtime.cmd(&["logs", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Waits until the server has said `listening` `starts` times (once per
    /// start of the container).
    fn listening(&self, starts: usize) {
        assert!(
            eventually(BOUND, || self.logs().matches("listening").count() == starts),
            "the container's server did not start: {}",
            self.logs()
        );
    }

    /// Connections the server accepted since its last start.
    fn accepted(&self) -> usize {
        let logs = self.logs();
        let since = logs.rfind("listening").unwrap_or(0);
        logs[since..].lines().filter(|l| l.starts_with("accepted ")).count()
    }

    /// `restart`, as an operator would. The server is the container's PID 1,
    /// which ignores SIGTERM, so `-t 0` (kill at once) spares the runtime's
    /// 10 s grace period; the container is stopped and started either way.
    fn restart(&self) {
        let before = self.pid();
        self.runtime.ok(&["restart", "-t", "0", &self.name]);
        self.listening(2);
        assert_ne!(self.pid(), before, "a new process after the restart");
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        // podman's `rm -f` stops with the 10 s grace period first; docker's kills.
        let args: &[&str] = if self.runtime.daemon.is_none() { &["rm", "-f", "-t", "0"] } else { &["rm", "-f"] };
        let out = self.runtime.cmd(&[args, &[self.name.as_str()]].concat()).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("{} rm -f {}: {out:?}", self.runtime.name(), self.name);
        }
    }
}

/// A network namespace made with `ip netns add` (lo up), deleted on drop.
struct NamedNetns(String);

impl NamedNetns {
    fn new() -> Self {
        require_command("ip", "iproute2");
        let name = unique("cl-ctr");
        let ns = Self(name.clone());
        for args in [&["netns", "add", &name][..], &["-n", &name, "link", "set", "lo", "up"][..]] {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {}", args.join(" "));
        }
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Connects from `client` to the server in `netns` and reads its greeting.
fn hello(netns: &Netns, client: IpAddr) -> std::io::Result<TcpStream> {
    netns.hello_from(client, SocketAddr::from(([127, 0, 0, 1], PORT)))
}

/// Whether `client` is limited: its first `LIMIT` connections are served
/// and the next one is refused at once (ECONNREFUSED). A connection over
/// the limit that is served instead, or any other failure, is `false`.
fn limited(netns: &Netns, client: IpAddr) -> bool {
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        match hello(netns, client) {
            Ok(conn) => held.push(conn),
            Err(_) => return false,
        }
    }
    matches!(hello(netns, client), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// What connlimit must do for a container: exactly `LIMIT` connections
/// from one client reach the server, the next is refused and never reaches
/// it, the counts say so, and a hung-up client's slots serve again.
fn exactly_the_limit(netns: &Netns, root: &Path, name: &str, container: &Container) {
    let counts = || {
        let row = status_row(netns, root, name).expect("instance listed");
        (row["open"].as_u64().unwrap(), row["refused"].as_u64().unwrap())
    };
    // Connections of earlier checks may still be closing.
    assert!(eventually(BOUND, || counts().0 == 0), "no connection open: {:?}", counts());
    let refused_before = counts().1;
    let me = client_v4(1);
    let accepted = container.accepted();
    let held: Vec<TcpStream> =
        (0..LIMIT).map(|_| hello(netns, me).expect("a connection within the limit is served")).collect();
    let refused = hello(netns, me).expect_err("a connection over the limit is refused");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    // Another client has its own allowance.
    let other = hello(netns, client_v4(2)).expect("another client is served");
    assert!(
        eventually(BOUND, || container.accepted() == accepted + LIMIT + 1),
        "the server accepted the admitted connections and not the refused one: {}",
        container.logs()
    );
    assert_eq!(counts(), (LIMIT as u64 + 1, refused_before + 1));
    drop((held, other));
    assert!(eventually(BOUND, || counts().0 == 0), "counts back to zero: {:?}", counts());
    assert!(limited(netns, me), "the freed slots serve again, up to the limit");
}

/// How connlimit names the container.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// `run --pid $(RUNTIME inspect -f '{{.State.Pid}}' NAME)`, on the host.
    Pid,
    /// `nsenter --net=NETNS connlimit run --cgroup DIR`: the container's
    /// cgroup, refusing in the container's network namespace.
    Cgroup,
}

/// Guards a container of `runtime` as `target` says; with `restart`, then
/// restarts the container and checks that it is guarded again. With
/// `own_netns` the container joins a namespace the test made (`--network
/// ns:/run/netns/NAME`, podman only), which outlives a restart; otherwise
/// `--network none` gives it one of its own.
fn guarded(runtime: &Runtime, target: Target, own_netns: bool, restart: bool) {
    let image = Image::build(runtime);
    let named = own_netns.then(NamedNetns::new);
    let network = named.as_ref().map_or("none".to_owned(), |ns| format!("ns:{}", ns.path()));
    let container = Container::run(runtime, &image, &network);
    let netns_path = |container: &Container| match &named {
        Some(ns) => ns.path(),
        None => format!("/proc/{}/ns/net", container.pid()),
    };
    let netns = Netns::open(netns_path(&container)).unwrap();
    let cgroup = container.cgroup();
    assert!(cgroup.is_dir(), "{}", cgroup.display());
    if runtime.daemon.is_none() {
        // What the README shows for podman's cgroup.
        let relative = runtime.ok(&["inspect", "-f", "{{.State.CgroupPath}}", &container.name]);
        assert_eq!(connlimit::ebpf::mounts::cgroup2_mount().unwrap().join(relative.trim_start_matches('/')), cgroup);
    }

    let root = TestPinRoot::new("containers-root");
    let name = unique("ctr");
    let limits = ["run", "--name", &name, "--port", &PORT.to_string(), "-m", &LIMIT.to_string()];
    let mut cmd = match target {
        Target::Pid => {
            let mut cmd = Command::new(connlimit_bin());
            cmd.args(limits).args(["--pid", &container.pid().to_string()]);
            cmd
        }
        Target::Cgroup => {
            let mut cmd = Command::new(require_command("nsenter", "util-linux"));
            cmd.arg(format!("--net={}", netns_path(&container)))
                .arg(connlimit_bin())
                .args(limits)
                .arg("--cgroup")
                .arg(&cgroup);
            cmd
        }
    };
    cmd.env(connlimit::ebpf::PIN_ROOT_ENV, &root.path).stdin(Stdio::null());
    let guard = Background::spawn(&mut cmd).unwrap();
    assert!(guard.wait_for("enforcing;", BOUND), "connlimit did not start: {}", guard.log());

    exactly_the_limit(&netns, &root.path, &name, &container);

    if restart {
        container.restart();
        assert!(container.cgroup() == cgroup, "the same cgroup path after the restart");
        let netns = Netns::open(netns_path(&container)).unwrap();
        // Fresh clients until one is limited: enforcement has resumed.
        let mut next = 100;
        let resumed = eventually(FOLLOW, || {
            next += 1;
            limited(&netns, client_v4(next))
        });
        assert!(
            resumed,
            "{} restart: a client is not limited to {LIMIT} connections {FOLLOW:?} after the container came back \
             (connlimit: {})",
            runtime.name(),
            guard.log()
        );
        exactly_the_limit(&netns, &root.path, &name, &container);
    }

    let (status, log) = guard.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("detached"), "{log}");
    assert!(status_row(&netns, &root.path, &name).is_none());
    drop(container);
    assert!(eventually(BOUND, || !cgroup.exists()), "the runtime removed the container's cgroup");
}

#[test]
fn podman_container_is_guarded_by_its_pid() {
    require_kernel!();
    guarded(&Runtime::podman(), Target::Pid, false, false);
}

#[test]
fn podman_container_is_guarded_by_its_cgroup_in_a_namespace_of_the_tests() {
    require_kernel!();
    guarded(&Runtime::podman(), Target::Cgroup, true, false);
}

#[test]
fn podman_restart_keeps_a_container_guarded_by_its_pid() {
    require_kernel!();
    guarded(&Runtime::podman(), Target::Pid, false, true);
}

#[test]
fn podman_restart_keeps_a_container_guarded_by_its_cgroup() {
    require_kernel!();
    guarded(&Runtime::podman(), Target::Cgroup, true, true);
}

#[test]
fn docker_container_is_guarded_by_its_pid_and_by_its_cgroup() {
    require_kernel!();
    let docker = Runtime::docker();
    guarded(&docker, Target::Pid, false, false);
    guarded(&docker, Target::Cgroup, false, false);
}

#[test]
fn docker_restart_keeps_a_container_guarded_by_its_pid() {
    require_kernel!();
    guarded(&Runtime::docker(), Target::Pid, false, true);
}

/// connlimit's own image (`localhost/connlimit:VERSION`, which `cargo xtask
/// dist` builds from the release tarball), run as the DaemonSet runs it:
/// the host's network, every capability dropped but BPF, NET_ADMIN and
/// PERFMON, a read-only root, seccomp unconfined, the host's bpffs and its
/// cgroup2 root (read-only) mounted. It guards a server of the test's in a
/// cgroup of its own, on the host's loopback: exactly the limit is served,
/// the next connection is refused, and a graceful stop detaches.
#[test]
fn the_image_with_the_daemonsets_settings_enforces_on_the_host() {
    require_kernel!();
    let podman = Runtime::podman();
    let image = concat!("localhost/connlimit:", env!("CARGO_PKG_VERSION"));
    let exists = podman.cmd(&["image", "exists", image]).status().unwrap();
    assert!(exists.success(), "no image {image}: `cargo xtask dist` builds it (`cargo xtask test` runs dist first)");

    let host = Netns::open("/proc/self/ns/net").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let name = unique("image");
    let cgroup = harness::TestCgroup::create(&name).unwrap();
    let server = harness::Server::hold(
        env!("CARGO_BIN_EXE_hold-server"),
        &host,
        &cgroup,
        &[SocketAddr::from(([127, 0, 0, 1], port))],
    )
    .unwrap();
    let root = TestPinRoot::new("image-root");
    let cgroup2 = connlimit::ebpf::mounts::cgroup2_mount().unwrap();
    let (limit, port_arg) = (LIMIT.to_string(), port.to_string());
    let mut cmd = podman.cmd(&["run", "--rm", "--name", &name]);
    cmd.args(&podman.run)
        .args(["--network", "host", "--read-only", "--cap-drop", "all", "--cap-add", "BPF,NET_ADMIN,PERFMON"])
        .args(["--security-opt", "seccomp=unconfined", "-v", "/sys/fs/bpf:/sys/fs/bpf"])
        .arg("-v")
        .arg(format!("{}:/sys/fs/cgroup:ro", cgroup2.display()))
        .arg("-e")
        .arg(format!("{}={}", connlimit::ebpf::PIN_ROOT_ENV, root.path.display()))
        .args([image, "run", "--name", &name, "--port", &port_arg, "-m", &limit, "--cgroup"])
        .arg(Path::new("/sys/fs/cgroup").join(&name));
    let guard = Background::spawn(&mut cmd).unwrap();
    assert!(guard.wait_for("enforcing;", BOUND), "connlimit's image did not start: {}", guard.log());

    let server_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let me = client_v4(0x61);
    let held: Vec<TcpStream> =
        (0..LIMIT).map(|_| host.hello_from(me, server_addr).expect("a connection within the limit")).collect();
    let refused = host.hello_from(me, server_addr).expect_err("a connection over the limit is refused");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    let _other = host.hello_from(client_v4(0x62), server_addr).expect("another client is served");
    assert!(eventually(BOUND, || server.accepted() == LIMIT + 1), "the server accepted {}", server.accepted());
    drop(held);

    podman.ok(&["stop", "-t", "10", &name]);
    let (status, log) = guard.wait();
    assert!(status.success(), "{log}");
    assert!(log.contains("detached"), "{log}");
    assert!(root.entries().is_empty(), "pins left: {:?}", root.entries());
}
