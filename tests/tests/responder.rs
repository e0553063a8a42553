//! `--refuse-with http-429`: over-limit connections are handed to
//! connlimit's own responder, which answers go-connlimit's exact 429 bytes;
//! the server never sees them (needs root).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    thread,
};

use connlimit::{
    Config,
    ebpf::{Instance, MAX_RESPONDING, RefuseWith},
    http::TOO_MANY_CONNECTIONS_RESPONSE,
};
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, TestPinRoot, client_v4, connlimit_bin, eventually, require_kernel,
    status_row, unique,
};

mod common;
use common::{PORT, Setup, assert_accepted, assert_refused, loopback_like};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";

/// A dual-stack server guarded with a limit of 1 per client, refusing with 429.
fn setup(config: Config, persist: bool) -> Setup {
    Setup::with(
        |o| o.config(config).refuse_with(RefuseWith::Http429).persist(persist),
        &[SocketAddr::from(([0u16; 8], PORT))],
    )
}

/// Sends a request from `source` and reads everything until the close.
fn request(netns: &Netns, source: IpAddr) -> std::io::Result<Vec<u8>> {
    let mut conn = netns.connect_from(source, SocketAddr::new(loopback_like(source), PORT))?;
    conn.write_all(REQUEST)?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn over_limit_clients_read_the_exact_429_and_the_server_sees_nothing() {
    require_kernel!();
    let s = setup(Config::new(1), false);
    for me in [client_v4(1), "::1".parse().unwrap()] {
        let _held = s.hello(me).unwrap();
        for _ in 0..3 {
            assert_eq!(request(&s.netns, me).unwrap(), TOO_MANY_CONNECTIONS_RESPONSE, "{me}");
        }
        assert_eq!(s.open(me), 1, "the responder's connections are never counted");
    }
    assert_accepted(&s.server, 2);
    let stats = s.limiter.stats().unwrap();
    assert_eq!((stats.accepted, stats.refused, stats.responded, stats.responder_missing), (2, 6, 6, 0));
    // Switched live to resets, and back.
    s.limiter.set_refuse_with(RefuseWith::Reset).unwrap();
    let me = client_v4(1);
    let _held = s.hello(me).unwrap();
    assert_refused(s.hello(me));
    s.limiter.set_refuse_with(RefuseWith::Http429).unwrap();
    assert_eq!(request(&s.netns, me).unwrap(), TOO_MANY_CONNECTIONS_RESPONSE);
    assert_eq!(s.limiter.refuse_with().unwrap(), RefuseWith::Http429);
}

/// connlimit inside the cgroup it guards, as a DaemonSet guarding
/// `kubepods.slice` is: the connections its responder accepts carry the
/// guarded port and run the guarded cgroup's sock_ops program, yet are its
/// own, never counted or ended: each of 10 over-limit requests reads its
/// 429 (before, 2 of 10 did), and the client still holds 1 of 1.
#[test]
fn connlimit_inside_its_guarded_cgroup_answers_every_refusal() {
    require_kernel!();
    let name = unique("inside");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&name).unwrap();
    let inside = TestCgroup::create(&format!("{name}/connlimit")).unwrap();
    let listen = [SocketAddr::from(([0, 0, 0, 0], PORT))];
    let server = Server::hold(env!("CARGO_BIN_EXE_hold-server"), &netns, &cgroup, &listen).unwrap();
    let root = TestPinRoot::new("responder-inside");
    let mut cmd = Command::new(connlimit_bin());
    cmd.args(["run", "--name", &name, "--port", &PORT.to_string(), "-m", "1", "--refuse-with", "http-429"])
        .args(["--pid", &server.pid().to_string()])
        .env(connlimit::ebpf::PIN_ROOT_ENV, &root.path)
        .stdin(Stdio::null());
    inside.add_on_exec(&mut cmd);
    let run = Background::spawn(&mut cmd).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());

    let me = client_v4(1);
    let _held = netns.hello_from(me, SocketAddr::from(([127, 0, 0, 1], PORT))).unwrap();
    let answered =
        (0..10).filter(|_| request(&netns, me).ok().as_deref() == Some(TOO_MANY_CONNECTIONS_RESPONSE)).count();
    assert_eq!(answered, 10, "{}", run.log());
    assert_accepted(&server, 1);
    let row = status_row(&netns, &root.path, &name).expect("instance listed");
    assert_eq!((row["open"].as_u64(), row["refused"].as_u64()), (Some(1), Some(10)), "{row}");
    assert!(!run.log().contains("ended a connection"), "the responder's connections are never ended: {}", run.log());
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
}

/// The total limit refuses with 429 too.
#[test]
fn the_total_limit_answers_429() {
    require_kernel!();
    let s = setup(Config::new(0).with_max_conns_total(2), false);
    let _a = s.hello(client_v4(1)).unwrap();
    let _b = s.hello(client_v4(2)).unwrap();
    assert_eq!(request(&s.netns, client_v4(3)).unwrap(), TOO_MANY_CONNECTIONS_RESPONSE);
    assert_accepted(&s.server, 2);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// 2,000 over-limit requests from 200 addresses, 8 at a time, then a burst
/// of clients that hold their connections without reading: the server's
/// accept count never moves, past the cap the responder resets, and the
/// responder's memory and descriptors return to where they were.
#[test]
fn a_flood_of_over_limit_clients_is_bounded() {
    require_kernel!();
    let s = setup(Config::new(1), false);
    let clients: Vec<IpAddr> = (1..=200).map(client_v4).collect();
    let held: Vec<_> = clients.iter().map(|&c| s.hello(c).unwrap()).collect();
    assert_accepted(&s.server, 200);
    let (rss_before, fds_before) = (rss_kib(), open_fds());

    let answered: usize = thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let (s, clients) = (&s, &clients);
                scope.spawn(move || {
                    (t..2000)
                        .step_by(8)
                        .filter(|i| {
                            request(&s.netns, clients[i % 200]).ok().as_deref() == Some(TOO_MANY_CONNECTIONS_RESPONSE)
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(answered, 2000);

    // More silent clients at once than the responder answers at once: each
    // connects (the kernel completes the handshake) and waits.
    let silent = MAX_RESPONDING + 200;
    let conns: Vec<_> =
        (0..silent).map(|i| s.netns.connect_from(clients[i % 200], SocketAddr::from(([127, 0, 0, 1], PORT)))).collect();
    let (mut got_429, mut reset, mut not_connected) = (0, 0, 0);
    for conn in conns {
        let Ok(mut conn) = conn else {
            // The responder's accept queue was full: the kernel turned it away.
            not_connected += 1;
            continue;
        };
        let mut got = Vec::new();
        match conn.read_to_end(&mut got) {
            Ok(_) if got == TOO_MANY_CONNECTIONS_RESPONSE => got_429 += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => reset += 1,
            other => panic!("neither a 429 nor a reset: {other:?} {got:?}"),
        }
    }
    let seen = format!("{got_429} answered, {reset} reset, {not_connected} not connected of {silent}");
    // The cap holds (a few answers may end, freeing places, while the
    // later clients connect), and past it the responder resets at once.
    assert!(got_429 <= MAX_RESPONDING + 50 && reset > 0, "{seen}");
    assert!(not_connected <= silent / 10, "{seen}");

    assert_accepted(&s.server, 200);
    assert!(s.limiter.clients().unwrap().iter().all(|c| c.open == 1));
    // Descriptors come back once the last answers are drained (1 s at most).
    assert!(eventually(BOUND, || open_fds() <= fds_before + 2), "fds {} > {fds_before}", open_fds());
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "the responder grew by {grown} KiB");
    drop(held);
}

/// With no process holding the responder (a persisted instance whose owner
/// exited), refusals are resets, and the kernel says so.
#[test]
fn without_a_responder_refusals_fall_back_to_reset() {
    require_kernel!();
    let s = setup(Config::new(1), true);
    let name = s.limiter.name().to_owned();
    let Setup { limiter, netns, server, cgroup: _cgroup } = s;
    drop(limiter); // persisted: still enforcing, owned by nobody
    let me = client_v4(1);
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let _held = netns.hello_from(me, addr).unwrap();
    assert_refused(netns.hello_from(me, addr));
    let instance = Instance::open(&name).unwrap();
    assert_eq!(instance.refuse_with().unwrap(), RefuseWith::Http429);
    let stats = instance.stats().unwrap();
    assert_eq!((stats.responded, stats.responder_missing), (0, 1));
    Instance::remove(&name).unwrap();
    assert_accepted(&server, 1);
}
