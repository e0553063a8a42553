//! The cost of refusing: how fast each configuration turns attempts away
//! when the machine does nothing else, against the kernel's own RST for a
//! port with no listener and a minimal sk_lookup program that refuses
//! without counting (the floors).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    load::{STOP, attempt, client, server, source},
    setup::{Env, PORT},
};

pub struct Refusals {
    pub per_sec: f64,
    /// Attempts that got through (none should).
    pub admitted: u64,
    /// Attempts that failed otherwise than by a refusal.
    pub errors: u64,
}

/// A client at its limit of 1 holds one connection; `threads` threads from
/// its address then connect as fast as they can for `duration`.
pub fn refusals(env: &Env, threads: u32, duration: Duration) -> Refusals {
    env.netns.run(move || {
        // Nothing to hold in front of the floors (a closed port, a program
        // that refuses everything): the attempt just fails.
        let held = attempt(source(0)).1;
        let deadline = Instant::now() + duration;
        let counts: Vec<(u64, u64, u64)> = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(move || {
                        let (mut refused, mut admitted, mut errors) = (0, 0, 0);
                        while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
                            let Ok(socket) = client(source(0)) else {
                                errors += 1;
                                continue;
                            };
                            match socket.connect(&server().into()) {
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                                Err(_) => errors += 1,
                                Ok(()) => {
                                    admitted += 1;
                                    let _ = socket.set_linger(Some(Duration::ZERO));
                                }
                            }
                        }
                        (refused, admitted, errors)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
        });
        drop(held);
        let refused: u64 = counts.iter().map(|c| c.0).sum();
        Refusals {
            per_sec: refused as f64 / duration.as_secs_f64(),
            admitted: counts.iter().map(|c| c.1).sum(),
            errors: counts.iter().map(|c| c.2).sum(),
        }
    })
}

pub struct Flood {
    pub syns_per_sec: f64,
    /// CPU time of the sending threads per SYN. Without IRQ time
    /// accounting, a softirq's ticks count to the task it interrupts, and
    /// loopback runs the receive path (limiter, RST) in the sender's own
    /// softirq: so this is the whole kernel path of a SYN, send and refusal,
    /// and nothing that other processes on the machine run.
    pub cpu_ns_per_syn: f64,
}

/// CPU time (user + system) of the calling thread so far.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// SYNs from random 127.x sources and ports, from a raw socket in the
/// namespace, as fast as `threads` threads can send them for `duration`.
/// Sending on loopback runs the receive path (limiter, RST) in the sender's
/// own context, so the rate compares what each configuration costs per SYN.
pub fn syn_flood(env: &Env, threads: u32, duration: Duration) -> Flood {
    env.netns.run(move || {
        let deadline = Instant::now() + duration;
        let started = Instant::now();
        let (sent, cpu) = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let cpu0 = thread_cpu();
                        let sent = flood_thread(t, deadline);
                        (sent, thread_cpu().saturating_sub(cpu0))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .fold((0, Duration::ZERO), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        let elapsed = started.elapsed();
        Flood {
            syns_per_sec: sent as f64 / elapsed.as_secs_f64(),
            cpu_ns_per_syn: if sent == 0 { f64::NAN } else { cpu.as_nanos() as f64 / sent as f64 },
        }
    })
}

fn flood_thread(seed: u32, deadline: Instant) -> u64 {
    let Ok(raw) = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)) else { return 0 };
    // We write the IP header, so every SYN can come from its own source.
    if raw.set_header_included_v4(true).is_err() {
        return 0;
    }
    let to = SockAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut sent = 0u64;
    let mut packet = [0u8; 40];
    loop {
        if sent.is_multiple_of(256) && (Instant::now() >= deadline || STOP.load(Ordering::Relaxed)) {
            return sent;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // 127.0.0.2 to 127.127.255.255: never 127.0.0.1 nor a broadcast.
        let src = Ipv4Addr::from(0x7f00_0002 + (rng as u32 & 0x007f_fffd));
        let sport = ((rng >> 32) as u16) | 1024;
        syn(&mut packet, src, sport, (rng >> 48) as u32);
        if raw.send_to(&packet, &to).is_ok() {
            sent += 1;
        }
    }
}

/// An IPv4 SYN to 127.0.0.1:`PORT` (the kernel fills in the IP checksum,
/// length and id).
fn syn(p: &mut [u8; 40], src: Ipv4Addr, sport: u16, seq: u32) {
    *p = [0; 40];
    p[0] = 0x45;
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = harness::TCP_SYN;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // Checksum over the pseudo-header (addresses, protocol, length) and the segment.
    let mut sum = 0u32;
    for pair in p[12..20].chunks(2).chain(p[20..40].chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum += 6 + 20;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}
