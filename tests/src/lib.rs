//! Scaffolding for connlimit's kernel tests.
//!
//! Every test gets its own network namespace ([`Netns`], so its sk_lookup
//! program sees only its own traffic) and its own cgroup ([`TestCgroup`], so
//! its sock_ops program sees only its own server). Servers are unmodified
//! processes ([`Server`]) started inside both. Traffic stays inside the
//! test's namespace, on its loopback. Every kernel test starts with
//! [`require_kernel!`], which runs it, fails it with what the host lacks, or
//! skips it when `CONNLIMIT_SKIP_KERNEL_TESTS=1` says so.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

mod requirements;
pub use requirements::{SKIP_KERNEL_TESTS, kernel_tests_run, missing_requirements};

/// The `connlimit` binary of this build (`target/<profile>/connlimit`, next
/// to the test binary's `deps/`). `cargo test --workspace` builds it; a
/// narrower run needs `cargo build -p connlimit-user --bins` first.
pub fn connlimit_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").join("connlimit");
    assert!(bin.exists(), "{} is missing; build it with `cargo build -p connlimit-user --bins`", bin.display());
    bin
}

/// `connlimit args...` run inside `netns`, with no standard input.
pub fn connlimit_in(netns: &Netns, args: &[&str]) -> Command {
    let mut cmd = Command::new(connlimit_bin());
    cmd.args(args).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    cmd
}

/// `connlimit args...` run inside `netns` with pin root `root` (a
/// [`TestPinRoot`]'s path).
pub fn connlimit_under(netns: &Netns, root: &Path, args: &[&str]) -> Command {
    let mut cmd = connlimit_in(netns, args);
    cmd.env(connlimit::ebpf::PIN_ROOT_ENV, root);
    cmd
}

/// The `status --json` row of instance `name` under pin root `root`, if
/// listed.
pub fn status_row(netns: &Netns, root: &Path, name: &str) -> Option<serde_json::Value> {
    let out = connlimit_under(netns, root, &["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array().unwrap().iter().find(|r| r["name"] == name).cloned()
}

/// A unique name for this test's instance, namespace and cgroup.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh network namespace with its loopback up, alive while this is.
pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    pub fn new() -> Result<Self> {
        // unshare() moves only the calling thread, so do it on a thread of
        // our own and keep a handle on the namespace it made.
        thread::spawn(|| -> Result<Self> {
            // SAFETY: plain syscall.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            let fd = OwnedFd::from(File::open("/proc/thread-self/ns/net")?);
            set_loopback_up()?;
            Ok(Self { fd })
        })
        .join()
        .expect("netns thread")
    }

    /// An existing namespace, named by a path such as `/proc/PID/ns/net`
    /// (a container's) or `/run/netns/NAME` (made with `ip netns add`),
    /// held open while this is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fd = OwnedFd::from(File::open(path).with_context(|| format!("opening {}", path.display()))?);
        Ok(Self { fd })
    }

    /// A path naming this namespace, for `AttachOptions::netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd()))
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.fd.as_raw_fd();
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` is a namespace fd that outlives this scope.
                assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns")
        })
    }

    /// A TCP socket created inside the namespace.
    pub fn socket(&self, v6: bool) -> Socket {
        self.run(move || {
            let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
            Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket")
        })
    }

    /// Connects from `source` (port chosen by the kernel) to `server`.
    pub fn connect_from(&self, source: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(server.is_ipv6());
        socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.connect_timeout(&SockAddr::from(server), Duration::from_secs(5))?;
        Ok(socket.into())
    }

    /// Connects and reads the server's greeting.
    pub fn hello_from(&self, source: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
        let mut conn = self.connect_from(source, server)?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf)?;
        assert_eq!(&buf, b"Hello");
        Ok(conn)
    }

    /// Makes the child that `cmd` spawns enter this namespace before it
    /// executes its program.
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn set_loopback_up() -> Result<()> {
    // SAFETY: plain syscalls on a socket we own; ifreq is plain data.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            bail!("socket: {}", io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            bail!("SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            bail!("SIOCSIFFLAGS lo: {}", io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A cgroup of the test's own: killed and removed on drop.
pub type TestCgroup = connlimit::ebpf::cgroup::Cgroup;

/// An unmodified server process, started inside a namespace and a cgroup.
pub struct Server(Background);

impl Server {
    /// Starts the `hold-server` binary (`bin`, i.e. the test's
    /// `env!("CARGO_BIN_EXE_hold-server")`) listening on each of `addrs`.
    pub fn hold(bin: &str, netns: &Netns, cgroup: &TestCgroup, addrs: &[SocketAddr]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(addrs.iter().map(|a| a.to_string())).stdin(Stdio::null());
        // Into the cgroup before the listener exists: accepted sockets
        // inherit the listener's cgroup.
        cgroup.add_on_exec(&mut cmd);
        netns.enter_on_exec(&mut cmd);
        let server = Background::spawn(&mut cmd)?;
        if !server.wait_for("listening", BOUND) {
            bail!("the server did not start: {}", server.log());
        }
        Ok(Self(server))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Connections the server process has accepted so far.
    pub fn accepted(&self) -> usize {
        self.0.log().lines().filter(|l| l.starts_with("accepted ")).count()
    }
}

/// The longest a test waits for something that must happen (a server
/// listening, `connlimit` enforcing, programs detached). A bound, not a
/// delay: a passing test goes on as soon as it happens. Generous because
/// the suites run on a busy 2-core CI machine and in guests under QEMU's
/// TCG (`cargo xtask kernels`), where attaching takes several times as
/// long as on an idle host.
pub const BOUND: Duration = Duration::from_secs(60);

/// Waits until `cond` holds, for up to `timeout`.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `127.1.x.y`: the `i`-th of many client addresses on loopback.
pub fn client_v4(i: u32) -> IpAddr {
    IpAddr::from([127, 1, (i >> 8) as u8, (i & 0xff) as u8])
}

/// How a hold-server connection should end (the one command byte the
/// server reads after its greeting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Hold the connection until the client closes.
    Hold,
    /// The server closes (FIN; its side ends in TIME_WAIT).
    ServerFin,
    /// The server resets it (SO_LINGER 0).
    ServerRst,
}

impl Ending {
    /// The byte hold-server reads for this ending.
    pub const fn byte(self) -> u8 {
        match self {
            Self::Hold => b'h',
            Self::ServerFin => b'c',
            Self::ServerRst => b'r',
        }
    }
}

/// Asks a hold-server connection to end as `how`.
pub fn command(conn: &mut TcpStream, how: Ending) {
    conn.write_all(&[how.byte()]).expect("command");
}

/// Sends one TCP SYN from a spoofed `source` to `server` (IPv4) through a raw
/// socket in the namespace, as an attacker or a lost client would: the
/// handshake can never complete.
pub fn spoofed_syn(netns: &Netns, source: std::net::Ipv4Addr, source_port: u16, server: std::net::SocketAddrV4) {
    raw_segment(netns, source, source_port, server, TCP_SYN);
}

/// TCP flags for [`raw_segment`].
pub const TCP_SYN: u8 = 0x02;
/// See [`TCP_SYN`].
pub const TCP_ACK: u8 = 0x10;

/// Sends one bare TCP segment with `flags` from `source` to `server` (IPv4)
/// through a raw socket in the namespace: a spoofed SYN, or a stray ACK of
/// a connection the server no longer knows.
pub fn raw_segment(
    netns: &Netns,
    source: std::net::Ipv4Addr,
    source_port: u16,
    server: std::net::SocketAddrV4,
    flags: u8,
) {
    netns.run(move || send_segment(source, source_port, server, flags).expect("send segment"));
}

/// Sends SYNs spoofed from each of `sources` in turn (source port 40000 +
/// its index modulo 20000) to `server`, `per_second` of them in 10 ms
/// batches, until `stop` is set or the sources run out; returns how many
/// were sent. Blocks: run it on a thread of its own.
pub fn spoofed_syn_flood(
    netns: &Netns,
    sources: Vec<std::net::Ipv4Addr>,
    per_second: u32,
    server: std::net::SocketAddrV4,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    netns.run(move || {
        let batch = (per_second / 100).max(1) as usize;
        let start = std::time::Instant::now();
        let mut sent = 0;
        for (tick, chunk) in sources.chunks(batch).enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            for (i, &source) in chunk.iter().enumerate() {
                let port = 40_000 + ((tick * batch + i) % 20_000) as u16;
                sent += usize::from(send_segment(source, port, server, TCP_SYN).is_ok());
            }
            // Pacing, not waiting for an outcome: the next batch's turn.
            if let Some(rest) = (Duration::from_millis(10) * (tick as u32 + 1)).checked_sub(start.elapsed()) {
                thread::sleep(rest);
            }
        }
        sent
    })
}

/// [`raw_segment`]'s work, in the calling thread's namespace.
fn send_segment(
    source: std::net::Ipv4Addr,
    source_port: u16,
    server: std::net::SocketAddrV4,
    flags: u8,
) -> io::Result<()> {
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&source_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&server.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence
    if flags & TCP_ACK != 0 {
        tcp[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes()); // acknowledgment
    }
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes()); // window
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&server.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let checksum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    // With IPPROTO_TCP raw sockets the kernel writes the IP header, using
    // the bound address as the source.
    raw.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(source), 0)))?;
    raw.send_to(&tcp, &SockAddr::from(SocketAddr::V4(server)))?;
    Ok(())
}

/// Established server-side connections on `port` from `client`, as the
/// kernel lists them in the namespace: what the server holds, whatever it
/// has accepted.
pub fn server_connections(netns: &Netns, port: u16, client: IpAddr) -> usize {
    use connlimit::ebpf::sock_diag::{SockDiag, TCP_ESTABLISHED};
    netns.run(move || {
        let sockets = SockDiag::open().and_then(|d| d.sockets(1 << TCP_ESTABLISHED)).expect("sock_diag dump");
        sockets.iter().filter(|s| s.local_port == port && connlimit::addr::canonical(s.remote) == client).count()
    })
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A child process whose output (stdout and stderr, interleaved by line)
/// is collected as it comes, and which is asked to stop (SIGTERM, then
/// SIGKILL after 5 s) when dropped, so a failing test leaves no process,
/// pin or program behind.
pub struct Background {
    child: Option<Child>,
    log: Arc<std::sync::Mutex<String>>,
    /// How many of the two output streams have reached their end.
    ended: Arc<AtomicU32>,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("spawning")?;
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let ended = Arc::new(AtomicU32::new(0));
        let streams: [Box<dyn Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for stream in streams {
            let (log, ended) = (log.clone(), ended.clone());
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        Ok(Self { child: Some(child), log, ended })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The process's stdin, if it was piped.
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.child.as_mut()?.stdin.as_mut()
    }

    /// What the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the process has closed its output (it exited, or is exiting).
    pub fn output_closed(&self) -> bool {
        self.ended.load(Ordering::SeqCst) == 2
    }

    /// Waits until the output contains `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        eventually(timeout, || self.log().contains(text))
    }

    /// Sends SIGTERM and waits; returns the exit status and the output.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        (status, self.settled_log())
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it. Its
    /// output is not waited for: what it started (a server under `exec`)
    /// lives on and may hold the pipes open.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.take().expect("running").wait().expect("wait");
        (status, self.settled_log())
    }

    /// The output once the reader threads have seen both pipes close (the
    /// process has exited: only a descendant that kept them open, such as
    /// a server's leftover helper, can delay that, so give up after 10 s).
    fn settled_log(&self) -> String {
        eventually(Duration::from_secs(10), || self.ended.load(Ordering::SeqCst) == 2);
        self.log()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A pin root of the test's own under /sys/fs/bpf (for `CONNLIMIT_PIN_ROOT`),
/// so it can watch the root's contents, or make it hostile, without
/// disturbing other tests. Removed with whatever is left in it on drop.
pub struct TestPinRoot {
    pub path: PathBuf,
}

impl TestPinRoot {
    /// A path for a root that does not exist yet (connlimit creates it).
    pub fn new(prefix: &str) -> Self {
        Self { path: PathBuf::from("/sys/fs/bpf").join(unique(prefix)) }
    }

    /// Names in the root, sorted (empty if it does not exist).
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for TestPinRoot {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            // remove_dir_all never follows a symbolic link.
            Ok(m) if m.is_dir() => drop(std::fs::remove_dir_all(&self.path)),
            Ok(_) => drop(std::fs::remove_file(&self.path)),
            Err(_) => {}
        }
    }
}

/// Fails the test with the fix unless `command` (from Debian package
/// `package`) is installed; installs the package first if it is missing
/// and apt-get is at hand, as `cargo xtask test` does for the whole suite.
pub fn require_command(command: &str, package: &str) -> PathBuf {
    let find = || {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| PathBuf::from(d).join(command)).find(|p| p.is_file())
    };
    if let Some(path) = find() {
        return path;
    }
    eprintln!("installing {package} (for {command})");
    for args in [&["update", "-qq"][..], &["install", "-y", "-qq", package][..]] {
        let status = Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "{command} is missing and `apt-get {}` failed ({status:?}); install the Debian package {package} \
             (`apt-get install {package}`, or `cargo xtask test` does it)",
            args.join(" ")
        );
    }
    find().unwrap_or_else(|| panic!("the package {package} did not install {command}"))
}
