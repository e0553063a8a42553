//! What the kernel tests share: a guarded server in a namespace and a
//! cgroup of its own, and assertions on what its clients see.
#![allow(dead_code, reason = "each test file uses its own subset")]

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfLimiter},
};
use harness::{Netns, Server, TestCgroup, eventually, unique};

pub const PORT: u16 = 8080;
pub const WAIT: Duration = Duration::from_secs(5);

/// A namespace, a cgroup, a hold-server in both, and a limiter guarding it.
pub struct Setup {
    pub limiter: EbpfLimiter,
    pub server: Server,
    pub netns: Netns,
    pub cgroup: TestCgroup,
}

impl Setup {
    pub fn new(config: Config) -> Self {
        Self::with(|o| o.config(config), &[SocketAddr::from(([0, 0, 0, 0], PORT))])
    }

    pub fn with(options: impl FnOnce(AttachOptions) -> AttachOptions, listen: &[SocketAddr]) -> Self {
        let name = unique("connlimit-test");
        let netns = Netns::new().unwrap();
        let cgroup = TestCgroup::create(&name).unwrap();
        let limiter =
            EbpfLimiter::attach(options(AttachOptions::new(&name, cgroup.path()).netns(netns.path()).port(PORT)))
                .unwrap();
        let server = Server::hold(env!("CARGO_BIN_EXE_hold-server"), &netns, &cgroup, listen).unwrap();
        Self { limiter, server, netns, cgroup }
    }

    pub fn hello(&self, source: IpAddr) -> std::io::Result<std::net::TcpStream> {
        self.netns.hello_from(source, SocketAddr::new(loopback_like(source), PORT))
    }

    pub fn open(&self, client: IpAddr) -> u32 {
        self.limiter.num_open(&client).unwrap()
    }

    /// Waits until the kernel counts `n` open for `client`.
    pub fn wait_open(&self, client: IpAddr, n: u32) {
        assert!(eventually(WAIT, || self.open(client) == n), "{client}: {} open, want {n}", self.open(client));
    }
}

/// The server reports each accept on its output, read asynchronously: wait
/// for `n`, then make sure no more arrive.
pub fn assert_accepted(server: &Server, n: usize) {
    assert!(eventually(WAIT, || server.accepted() >= n), "server accepted {}, want {n}", server.accepted());
    thread::sleep(Duration::from_millis(100));
    assert_eq!(server.accepted(), n, "the server accepted more than was admitted");
}

pub fn loopback_like(source: IpAddr) -> IpAddr {
    if source.is_ipv6() { IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]) } else { IpAddr::from([127, 0, 0, 1]) }
}

pub fn assert_refused(result: std::io::Result<std::net::TcpStream>) {
    match result {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("connection admitted over the limit"),
    }
}

/// Connects from every source at once (sockets bound first, released
/// together by a barrier); returns the ones established and how many were
/// refused with a reset.
pub fn burst(s: &Setup, sources: &[IpAddr]) -> (Vec<socket2::Socket>, usize) {
    let server = SocketAddr::from(([127, 0, 0, 1], PORT));
    let sockets: Vec<socket2::Socket> = sources
        .iter()
        .map(|&source| {
            let socket = s.netns.socket(false);
            socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
            socket
        })
        .collect();
    let barrier = std::sync::Barrier::new(sockets.len());
    let results: Vec<std::io::Result<socket2::Socket>> = thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .into_iter()
            .map(|socket| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    socket.connect_timeout(&server.into(), Duration::from_secs(5)).map(|()| socket)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = results.iter().filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionRefused)).count();
    (results.into_iter().filter_map(Result::ok).collect(), refused)
}
