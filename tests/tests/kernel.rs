//! The kernel limiter against real sockets: each test loads the real eBPF
//! programs into a network namespace and a cgroup of its own, starts an
//! unmodified server there, and drives it from many loopback addresses.
//! Needs root (CI runs it as root).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfError, EbpfLimiter, Instance},
};
use harness::{Netns, Server, TestCgroup, client_v4, command, eventually, require_root, spoofed_syn, unique};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);

/// A namespace, a cgroup, a hold-server in both, and a limiter guarding it.
struct Setup {
    limiter: EbpfLimiter,
    server: Server,
    netns: Netns,
    _cgroup: TestCgroup,
}

impl Setup {
    fn new(config: Config) -> Self {
        Self::with(|o| o.config(config), &[SocketAddr::from(([0, 0, 0, 0], PORT))])
    }

    fn with(options: impl FnOnce(AttachOptions) -> AttachOptions, listen: &[SocketAddr]) -> Self {
        let name = unique("connlimit-test");
        let netns = Netns::new().unwrap();
        let cgroup = TestCgroup::new(&name).unwrap();
        let limiter =
            EbpfLimiter::attach(options(AttachOptions::new(&name, cgroup.path()).netns(netns.path()).port(PORT)))
                .unwrap();
        let server = Server::hold(env!("CARGO_BIN_EXE_hold-server"), &netns, &cgroup, listen).unwrap();
        Self { limiter, server, netns, _cgroup: cgroup }
    }

    fn hello(&self, source: IpAddr) -> std::io::Result<std::net::TcpStream> {
        self.netns.hello_from(source, SocketAddr::new(loopback_like(source), PORT))
    }

    fn open(&self, client: IpAddr) -> u32 {
        self.limiter.num_open(&client).unwrap()
    }

    /// Waits until the kernel counts `n` open for `client`.
    fn wait_open(&self, client: IpAddr, n: u32) {
        assert!(eventually(WAIT, || self.open(client) == n), "{client}: {} open, want {n}", self.open(client));
    }
}

fn loopback_like(source: IpAddr) -> IpAddr {
    if source.is_ipv6() { IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]) } else { IpAddr::from([127, 0, 0, 1]) }
}

fn assert_refused(result: std::io::Result<std::net::TcpStream>) {
    match result {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("connection admitted over the limit"),
    }
}

/// go-connlimit's TestLimiterDenies, against an unmodified server process.
#[test]
fn limiter_denies_against_an_unmodified_server() {
    if !require_root() {
        return;
    }
    let s = Setup::new(Config::new(2));
    let me = client_v4(1);
    let conn1 = s.hello(me).unwrap();
    let _conn2 = s.hello(me).unwrap();
    assert_refused(s.hello(me));

    drop(conn1);
    s.wait_open(me, 1);
    let _conn4 = s.hello(me).unwrap();

    s.limiter.set_config(Config::new(3)).unwrap();
    let _conn5 = s.hello(me).unwrap();
    assert_eq!(s.open(me), 3);
    assert_refused(s.hello(me));

    assert_eq!(s.server.accepted(), 4, "the server never sees a refused connection");
    let stats = s.limiter.stats().unwrap();
    assert_eq!((stats.accepted, stats.refused), (4, 2));
}
