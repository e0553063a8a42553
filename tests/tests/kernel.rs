//! The kernel limiter against real sockets: each test loads the real eBPF
//! programs into a network namespace and a cgroup of its own, starts an
//! unmodified server there, and drives it from many loopback addresses.
//! Needs root (CI runs it as root).

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfError, EbpfLimiter, Instance, WhenFull},
};
use harness::{Ending, Netns, Server, TestCgroup, client_v4, command, eventually, require_kernel, spoofed_syn, unique};

mod common;
use common::{PORT, Setup, WAIT, assert_accepted, assert_refused, burst};

/// go-connlimit's TestLimiterDenies, against an unmodified server process.
#[test]
fn limiter_denies_against_an_unmodified_server() {
    require_kernel!();
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

    assert_accepted(&s.server, 4); // the server never sees a refused connection
    let stats = s.limiter.stats().unwrap();
    assert_eq!((stats.accepted, stats.refused), (4, 2));
}

/// The limiter's programs attached to the setup's namespace and cgroup.
fn attached(netns: &Netns, cgroup: &std::path::Path) -> (usize, usize) {
    use connlimit::ebpf::attachments::{AttachPoint, attached_programs};
    (
        attached_programs(&netns.path(), AttachPoint::SkLookup).unwrap().len(),
        attached_programs(cgroup, AttachPoint::CgroupSockOps).unwrap().len(),
    )
}

#[test]
fn counts_fall_exactly_once_on_every_close_path() {
    require_kernel!();
    // 10,000 connections from 250 addresses, ended five ways: client FIN,
    // server FIN (the server side goes through TIME_WAIT), client RST,
    // server RST, and a client that closes before reading anything.
    const CONNS: u32 = 10_000;
    const THREADS: u32 = 8;
    let s = Setup::new(Config::new(1_000));
    let server = SocketAddr::from(([127, 0, 0, 1], PORT));
    let errors: u32 = {
        let netns = &s.netns;
        thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    scope.spawn(move || {
                        let mut errors = 0;
                        for i in (t..CONNS).step_by(THREADS as usize) {
                            let source = client_v4(1 + i % 250);
                            let Ok(mut conn) = netns.connect_from(source, server) else {
                                errors += 1;
                                continue;
                            };
                            let mut hello = [0u8; 5];
                            match i % 5 {
                                0 => {
                                    conn.read_exact(&mut hello).unwrap();
                                    command(&mut conn, Ending::Hold);
                                }
                                1 => {
                                    conn.read_exact(&mut hello).unwrap();
                                    command(&mut conn, Ending::ServerFin);
                                    let _ = conn.read(&mut hello);
                                }
                                2 => {
                                    conn.read_exact(&mut hello).unwrap();
                                    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
                                }
                                3 => {
                                    conn.read_exact(&mut hello).unwrap();
                                    command(&mut conn, Ending::ServerRst);
                                    let _ = conn.read(&mut hello);
                                }
                                _ => {}
                            }
                        }
                        errors
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        })
    };
    assert_eq!(errors, 0, "no connection may be refused under a limit of 1000");
    assert!(
        eventually(Duration::from_secs(20), || {
            s.limiter.total_open().unwrap() == 0
                && s.limiter.clients().unwrap().iter().all(|c| c.open == 0 && c.reserved == 0)
        }),
        "counts left over: {:?}",
        s.limiter.clients().unwrap().iter().filter(|c| c.open > 0 || c.reserved > 0).collect::<Vec<_>>()
    );
    assert_eq!(s.limiter.stats().unwrap().accepted, u64::from(CONNS));
    assert_accepted(&s.server, CONNS as usize);
}

#[test]
fn burst_of_200_parallel_connects_gets_exactly_the_limit() {
    require_kernel!();
    let s = Setup::new(Config::new(10));
    let me = client_v4(7);
    for run in 0..5 {
        // All 200 sockets exist and are bound before any connects.
        let (held, refused) = burst(&s, &[me; 200]);
        let established = held.len();
        assert_eq!((established, refused), (10, 190), "run {run}");
        s.wait_open(me, 10);
        drop(held);
        s.wait_open(me, 0);
    }
    assert_accepted(&s.server, 50); // the server saw only admitted connections
}

#[test]
fn spoofed_syns_hold_a_slot_for_at_most_two_epochs() {
    require_kernel!();
    let epoch = Duration::from_millis(300);
    let s =
        Setup::with(|o| o.config(Config::new(2)).reservation_epoch(epoch), &[SocketAddr::from(([0, 0, 0, 0], PORT))]);
    let victim = Ipv4Addr::new(127, 1, 0, 9);
    let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    // Two handshakes that can never complete take both of the victim's slots.
    spoofed_syn(&s.netns, victim, 40_001, server);
    spoofed_syn(&s.netns, victim, 40_002, server);
    let sent = Instant::now();
    assert_refused(s.hello(IpAddr::V4(victim)));
    // ... but only until their reservations expire: between one and two epochs.
    let mut admitted = None;
    while sent.elapsed() < 3 * epoch {
        if let Ok(conn) = s.hello(IpAddr::V4(victim)) {
            admitted = Some((conn, sent.elapsed()));
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (_conn, after) = admitted.expect("the victim was locked out for more than two epochs");
    assert!(after <= 2 * epoch + Duration::from_millis(100), "locked out for {after:?}");
    assert_accepted(&s.server, 1);
}

#[test]
fn ipv6_and_ipv4_mapped_clients() {
    require_kernel!();
    // A dual-stack listener: IPv4 clients arrive on it as ::ffff:a.b.c.d.
    let s = Setup::with(|o| o.config(Config::new(1)), &[SocketAddr::from(([0u16; 8], PORT))]);
    let v6: IpAddr = "::1".parse().unwrap();
    let _a = s.hello(v6).unwrap();
    assert_refused(s.hello(v6));
    assert_eq!(s.open(v6), 1);

    let v4 = IpAddr::from([127, 0, 0, 1]);
    let _b = s.hello(v4).unwrap();
    assert_eq!(s.open(v4), 1);
    let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
    assert_eq!(s.open(mapped), 1, "the mapped form is the same client");
    // An IPv6 socket speaking to an IPv4-mapped address is the IPv4 client too.
    assert_refused(s.netns.hello_from(mapped, SocketAddr::new(mapped, PORT)));
    assert_accepted(&s.server, 2);
}

#[test]
fn prefix_grouping_counts_a_network_as_one_client() {
    require_kernel!();
    let s = Setup::new(Config::new(2).with_ipv4_prefix_len(24).with_ipv6_prefix_len(64));
    let _a = s.hello(client_v4(1)).unwrap(); // 127.1.0.1
    let _b = s.hello(client_v4(2)).unwrap(); // 127.1.0.2
    assert_refused(s.hello(client_v4(3))); // same /24
    let _c = s.hello(client_v4(0x101)).unwrap(); // 127.1.1.1: another /24
    assert_eq!(s.open(client_v4(200)), 2, "127.1.0.200 shares 127.1.0.0/24's count");
    let key = s.limiter.clients().unwrap();
    assert!(key.iter().any(|c| c.client == IpAddr::from([127, 1, 0, 0]) && c.open == 2), "{key:?}");
    // IPv6 /64: ::1 and ::2 are one client.
    let v6 = Setup::with(|o| o.config(Config::new(1).with_ipv6_prefix_len(64)), &[SocketAddr::from(([0u16; 8], PORT))]);
    let _d = v6.hello("::1".parse().unwrap()).unwrap();
    assert_eq!(v6.open("::2".parse().unwrap()), 1);
}

#[test]
fn live_limit_changes_admit_at_once_and_close_nothing() {
    require_kernel!();
    let s = Setup::new(Config::new(2));
    let me = client_v4(5);
    let mut held: Vec<_> = (0..2).map(|_| s.hello(me).unwrap()).collect();

    s.limiter.set_config(Config::new(1)).unwrap();
    assert_refused(s.hello(me));
    for conn in &mut held {
        command(conn, Ending::Hold); // still open and served
    }
    assert_eq!(s.open(me), 2);

    s.limiter.set_config(Config::new(4)).unwrap();
    held.push(s.hello(me).unwrap());
    held.push(s.hello(me).unwrap());
    assert_refused(s.hello(me));

    s.limiter.set_config(Config::new(0)).unwrap();
    held.extend((0..20).map(|_| s.hello(me).unwrap()));
    s.wait_open(me, 24);
    assert_eq!(s.limiter.config().unwrap(), Config::new(0));
}

#[test]
fn refusal_is_an_immediate_reset() {
    require_kernel!();
    let s = Setup::new(Config::new(1));
    let me = client_v4(3);
    let _held = s.hello(me).unwrap();
    for _ in 0..5 {
        let start = Instant::now();
        let result = s.netns.connect_from(me, SocketAddr::from(([127, 0, 0, 1], PORT)));
        let took = start.elapsed();
        assert_refused(result);
        // A dropped SYN is retransmitted after a second; a RST answers at
        // once (microseconds; the bound leaves room for a busy machine).
        assert!(took < Duration::from_millis(900), "refusal took {took:?}");
    }
}

#[test]
fn guarded_ports_change_live() {
    require_kernel!();
    let other_port = PORT + 1;
    let s = Setup::with(
        |o| o.config(Config::new(1)),
        &[SocketAddr::from(([0, 0, 0, 0], PORT)), SocketAddr::from(([0, 0, 0, 0], other_port))],
    );
    let me = client_v4(5);
    let to = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut instance = Instance::open(s.limiter.name()).unwrap();
    assert_eq!(instance.ports().unwrap(), [PORT]);

    // Guard the other port (in the same 64-port word) and the last port
    // instead: the first is free from then on.
    instance.set_ports(&[u16::MAX, other_port]).unwrap();
    assert_eq!(instance.ports().unwrap(), [other_port, u16::MAX]);
    assert!(instance.guards(other_port).unwrap() && !instance.guards(PORT).unwrap());
    let free: Vec<_> = (0..3).map(|_| s.netns.hello_from(me, to(PORT)).unwrap()).collect();
    let _held = s.netns.hello_from(me, to(other_port)).unwrap();
    assert_refused(s.netns.hello_from(me, to(other_port)));
    assert_eq!(s.open(me), 1, "only the guarded port counts");

    assert!(matches!(instance.set_ports(&[]), Err(EbpfError::NoPorts)));
    assert!(matches!(instance.set_ports(&[0]), Err(EbpfError::PortZero)));
    assert_eq!(instance.ports().unwrap(), [other_port, u16::MAX], "a refused change changes nothing");
    drop(free);
}

#[test]
fn other_ports_namespaces_and_cgroups_are_unaffected() {
    require_kernel!();
    let other_port = PORT + 1;
    let s = Setup::with(
        |o| o.config(Config::new(1)),
        &[SocketAddr::from(([0, 0, 0, 0], PORT)), SocketAddr::from(([0, 0, 0, 0], other_port))],
    );
    let me = client_v4(4);
    let _held = s.hello(me).unwrap();
    assert_refused(s.hello(me));
    // Another port of the same server, same namespace, same cgroup.
    let others: Vec<_> =
        (0..5).map(|_| s.netns.hello_from(me, SocketAddr::from(([127, 0, 0, 1], other_port))).unwrap()).collect();
    assert_eq!(s.open(me), 1, "connections to unguarded ports are not counted");

    // The same port in another namespace.
    let name = unique("connlimit-other");
    let (netns2, cgroup2) = (Netns::new().unwrap(), TestCgroup::create(&name).unwrap());
    let _server2 =
        Server::hold(env!("CARGO_BIN_EXE_hold-server"), &netns2, &cgroup2, &[SocketAddr::from(([0, 0, 0, 0], PORT))])
            .unwrap();
    let elsewhere: Vec<_> =
        (0..5).map(|_| netns2.hello_from(me, SocketAddr::from(([127, 0, 0, 1], PORT))).unwrap()).collect();

    // A server in another cgroup of the same namespace, on an unguarded port.
    let cgroup3 = TestCgroup::create(&unique("connlimit-other")).unwrap();
    let third_port = PORT + 2;
    let _server3 = Server::hold(
        env!("CARGO_BIN_EXE_hold-server"),
        &s.netns,
        &cgroup3,
        &[SocketAddr::from(([0, 0, 0, 0], third_port))],
    )
    .unwrap();
    let third: Vec<_> =
        (0..5).map(|_| s.netns.hello_from(me, SocketAddr::from(([127, 0, 0, 1], third_port))).unwrap()).collect();
    assert_eq!(s.limiter.clients().unwrap().iter().map(|c| c.open).sum::<u32>(), 1);
    drop((others, elsewhere, third));
}

#[test]
fn pins_are_root_only_and_gone_after_drop() {
    require_kernel!();
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new(Config::new(3));
    let name = s.limiter.name().to_owned();
    let dir = Instance::dir_of(&name);
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(Instance::list().unwrap().contains(&name));
    let cgroup = s.cgroup.path().to_owned();
    assert_eq!(attached(&s.netns, &cgroup), (1, 1));

    // Another process's view: the CLI opens the same maps by name.
    let mut other = Instance::open(&name).unwrap();
    let _conn = s.hello(client_v4(1)).unwrap();
    assert_eq!(other.num_open(client_v4(1)).unwrap(), 1);
    other.set_config(&Config::new(1)).unwrap();
    assert_eq!(s.limiter.config().unwrap(), Config::new(1));
    assert_refused(s.hello(client_v4(1)));
    drop(other);

    let Setup { limiter, netns, server, cgroup: _cgroup } = s;
    limiter.detach().unwrap();
    assert!(!dir.exists());
    assert_eq!(attached(&netns, &cgroup), (0, 0));
    drop((server, _cgroup));
}

#[test]
fn persisted_enforcement_outlives_the_limiter_until_removed() {
    require_kernel!();
    let s = Setup::with(|o| o.config(Config::new(1)).persist(true), &[SocketAddr::from(([0, 0, 0, 0], PORT))]);
    let name = s.limiter.name().to_owned();
    let Setup { limiter, netns, server, cgroup } = s;
    drop(limiter);
    let me = client_v4(1);
    let server_addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let _held = netns.hello_from(me, server_addr).unwrap();
    assert_refused(netns.hello_from(me, server_addr));
    assert_eq!(Instance::open(&name).unwrap().num_open(me).unwrap(), 1);
    assert_eq!(attached(&netns, cgroup.path()), (1, 1));

    Instance::remove(&name).unwrap();
    assert!(!Instance::dir_of(&name).exists());
    assert_eq!(attached(&netns, cgroup.path()), (0, 0));
    let _free = netns.hello_from(me, server_addr).unwrap();
    drop(server);
}

#[test]
fn bad_attach_requests_fail_cleanly() {
    require_kernel!();
    let s = Setup::new(Config::new(1));
    let cgroup = s.cgroup.path().to_owned();
    let attach = |o: AttachOptions| EbpfLimiter::attach(o.netns(s.netns.path()));
    let fresh = || unique("connlimit-bad");

    let taken = attach(AttachOptions::new(fresh(), &cgroup).port(PORT).port(9999)).unwrap_err();
    assert!(matches!(&taken, EbpfError::PortTaken { port, .. } if *port == PORT), "{taken}");
    assert!(taken.to_string().contains("already guarded by connlimit instance"), "{taken}");

    let exists = attach(AttachOptions::new(s.limiter.name(), &cgroup).port(9999)).unwrap_err();
    assert!(matches!(exists, EbpfError::InstanceExists(_)), "{exists}");
    let not_cgroup = attach(AttachOptions::new(fresh(), "/tmp").port(9999)).unwrap_err();
    assert!(matches!(not_cgroup, EbpfError::NotCgroup2(..)), "{not_cgroup}");
    let no_port = attach(AttachOptions::new(fresh(), &cgroup)).unwrap_err();
    assert!(matches!(no_port, EbpfError::NoPorts), "{no_port}");
    let bad_config =
        attach(AttachOptions::new(fresh(), &cgroup).port(9999).config(Config::new(1).with_ipv4_prefix_len(33)))
            .unwrap_err();
    assert!(matches!(bad_config, EbpfError::Config(_)), "{bad_config}");
    let bad_name = attach(AttachOptions::new("../escape", &cgroup).port(9999)).unwrap_err();
    assert!(matches!(bad_name, EbpfError::BadName(_)), "{bad_name}");

    // None of them left anything behind, and the first instance still works.
    assert_eq!(Instance::list().unwrap().iter().filter(|n| n.starts_with("connlimit-bad")).count(), 0);
    assert_eq!(attached(&s.netns, &cgroup), (1, 1));
    let _held = s.hello(client_v4(1)).unwrap();
    assert_refused(s.hello(client_v4(1)));

    // The same port in another namespace is fine.
    let netns2 = Netns::new().unwrap();
    let elsewhere = EbpfLimiter::attach(AttachOptions::new(fresh(), &cgroup).netns(netns2.path()).port(PORT)).unwrap();
    elsewhere.detach().unwrap();
}

#[test]
fn full_maps_fail_open_on_request_and_say_so() {
    require_kernel!();
    // The kernel's warning comes through aya-log and tracing: capture it.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || Capture(sink.clone()))
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);

    // Room to count a single client: the others' connections are admitted
    // uncounted.
    let s = Setup::with(
        |o| o.config(Config::new(5)).max_clients(1).when_full(WhenFull::Open),
        &[SocketAddr::from(([0, 0, 0, 0], PORT))],
    );
    let held: Vec<_> = (1..=3).map(|i| s.hello(client_v4(i)).unwrap()).collect();
    assert!(eventually(WAIT, || s.limiter.stats().unwrap().untracked == 2));
    assert_eq!(s.open(client_v4(1)), 1);
    assert!(
        eventually(WAIT, || String::from_utf8_lossy(&log.lock().unwrap()).contains("a connection is not counted")),
        "kernel warning not forwarded: {}",
        String::from_utf8_lossy(&log.lock().unwrap())
    );
    drop(held);
}

/// A `tracing` writer appending to a shared buffer.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn dry_run_counts_and_refuses_nothing() {
    require_kernel!();
    let s = Setup::new(Config::new(1).with_dry_run(true));
    let me = client_v4(6);
    let held: Vec<_> = (0..3).map(|_| s.hello(me).unwrap()).collect();
    s.wait_open(me, 3);
    let stats = s.limiter.stats().unwrap();
    assert_eq!((stats.refused, stats.dry_run_refused), (0, 2));
    let client = s.limiter.clients().unwrap().into_iter().find(|c| c.client == me).unwrap();
    assert_eq!(client.refused, 2, "reported per client as would-be refusals");
    // Leaving dry-run enforces at once.
    s.limiter.set_config(Config::new(1)).unwrap();
    assert_refused(s.hello(me));
    drop(held);
}

#[test]
fn instances_side_by_side_keep_their_own_config_and_counts() {
    require_kernel!();
    let other_port = PORT + 10;
    let s = Setup::with(
        |o| o.config(Config::new(1)),
        &[SocketAddr::from(([0, 0, 0, 0], PORT)), SocketAddr::from(([0, 0, 0, 0], other_port))],
    );
    let second = EbpfLimiter::attach(
        AttachOptions::new(unique("connlimit-second"), s.cgroup.path())
            .netns(s.netns.path())
            .port(other_port)
            .config(Config::new(3)),
    )
    .unwrap();
    let me = client_v4(8);
    let other = SocketAddr::from(([127, 0, 0, 1], other_port));
    let _a = s.hello(me).unwrap();
    assert_refused(s.hello(me));
    let b: Vec<_> = (0..3).map(|_| s.netns.hello_from(me, other).unwrap()).collect();
    assert_refused(s.netns.hello_from(me, other));
    assert_eq!((s.open(me), second.num_open(&me).unwrap()), (1, 3));
    second.detach().unwrap();
    // The first instance is untouched by the second's departure.
    assert_refused(s.hello(me));
    assert_eq!(s.open(me), 1);
    drop(b);
}
