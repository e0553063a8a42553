//! The load generator: bounded in count and time, on the namespace's
//! loopback only. Every client connects from a 127.x source of its own.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr},
    sync::{
        Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::setup::{Env, PORT};

/// Set by SIGINT: loads stop early and the run tears down cleanly.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn server() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// A client socket bound to `source` with its port left to connect(), so
/// ports in TIME_WAIT can be reused.
pub fn client(source: IpAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// Connects; `Some(latency)` if the server's byte arrives (admitted), `None`
/// if refused at connect or closed by the server.
pub fn attempt(source: IpAddr) -> (Option<Duration>, Option<Socket>) {
    let Ok(socket) = client(source) else { return (None, None) };
    let start = Instant::now();
    if socket.connect_timeout(&server().into(), Duration::from_secs(2)).is_err() {
        return (None, None);
    }
    let latency = start.elapsed();
    let mut byte = [0u8; 1];
    match (&socket).read(&mut byte) {
        Ok(1) => (Some(latency), Some(socket)),
        _ => (None, None),
    }
}

/// The `i`-th client address: 127.1.0.1 onwards (127.2.134.160 is the
/// 100,000th).
pub fn source(i: u32) -> IpAddr {
    IpAddr::from(std::net::Ipv4Addr::from(0x7f01_0001 + i))
}

pub struct Churn {
    pub per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub failed: u64,
    /// The machine's busy CPU time (every process and the kernel, all CPUs)
    /// per connection: the churn's cost even when it leaves CPUs idle.
    pub cpu_per_conn: Duration,
}

/// `clients` threads connect, read the server's byte and close, as fast as
/// they can for `duration`, cycling through `sources` addresses.
pub fn churn(env: &Env, sources: u32, clients: u32, duration: Duration) -> Churn {
    let busy_before = busy_cpu();
    let (latencies, failed) = env.netns.run(move || {
        let deadline = Instant::now() + duration;
        thread::scope(|s| {
            let workers: Vec<_> = (0..clients)
                .map(|t| {
                    s.spawn(move || {
                        let (mut latencies, mut failed) = (Vec::with_capacity(1 << 16), 0u64);
                        let mut k = t;
                        while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
                            match attempt(source(k % sources)) {
                                (Some(latency), _) => latencies.push(latency),
                                _ => failed += 1,
                            }
                            k += clients;
                        }
                        (latencies, failed)
                    })
                })
                .collect();
            let mut all = Vec::new();
            let mut failed = 0;
            for w in workers {
                let (l, f) = w.join().unwrap();
                all.extend(l);
                failed += f;
            }
            (all, failed)
        })
    });
    let busy = busy_cpu().saturating_sub(busy_before);
    let mut latencies = latencies;
    latencies.sort_unstable();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    Churn {
        per_sec: latencies.len() as f64 / duration.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
        cpu_per_conn: busy / u32::try_from(latencies.len().max(1)).unwrap_or(u32::MAX),
    }
}

/// CPU time the machine has spent busy since boot, all CPUs together: the
/// `cpu` line of `/proc/stat` less idle, I/O wait and time stolen by the
/// hypervisor.
fn busy_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(busy * 1_000_000 / hz)
}

/// 200 connects from one address, all released at once: how many were
/// admitted (got the server's byte)?
pub fn burst(env: &Env) -> usize {
    env.netns.run(|| {
        let barrier = Barrier::new(200);
        let admitted: Vec<Socket> = thread::scope(|s| {
            let handles: Vec<_> = (0..200)
                .map(|_| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let socket = client(source(0)).ok();
                        barrier.wait();
                        let socket = socket?;
                        socket.connect_timeout(&server().into(), Duration::from_secs(2)).ok()?;
                        let mut byte = [0u8; 1];
                        matches!((&socket).read(&mut byte), Ok(1)).then_some(socket)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        let n = admitted.len();
        // Reset, so no TIME_WAIT or conntrack entry outlives the run.
        for socket in admitted {
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
        n
    })
}

/// Holds `limit` connections from one address, then makes `attempts`
/// more from it (all refused), from 4 threads.
pub fn flood(env: &Env, limit: u32, attempts: u32) -> (Vec<Socket>, u32) {
    env.netns.run(move || {
        let held: Vec<Socket> = (0..limit).filter_map(|_| attempt(source(0)).1).collect();
        let refused = thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(move || {
                        let mut refused = 0;
                        for _ in 0..attempts / 4 {
                            if STOP.load(Ordering::Relaxed) {
                                break;
                            }
                            if attempt(source(0)).0.is_none() {
                                refused += 1;
                            }
                        }
                        refused
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        (held, refused)
    })
}
