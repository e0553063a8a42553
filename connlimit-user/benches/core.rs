//! Cost of the user-space limiter's hot path: one `accept` plus the free of
//! its slot, from one and two threads, with one client and with 100,000
//! clients each already holding a connection (so the counts are big maps).
//!
//! `cargo bench -p connlimit-user --bench core`; figures go in BENCHMARKS.md.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use connlimit::{Config, Limiter};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MANY: u32 = 100_000;

fn client(i: u32) -> IpAddr {
    // 10.x.y.z, distinct for i < 2^24.
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// `iters` accept+free pairs over `clients`, starting at `offset`.
fn pairs(limiter: &Limiter, clients: &[IpAddr], offset: usize, iters: u64) {
    let mut i = offset;
    for _ in 0..iters {
        i = if i + 1 == clients.len() { 0 } else { i + 1 };
        let slot = limiter.accept(black_box(&clients[i])).expect("under the limit");
        drop(black_box(slot));
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("accept_free");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (name, count) in [("1_ip", 1), ("100k_ips", MANY)] {
        let limiter = Limiter::new(Config::new(1_000)).unwrap();
        let clients: Vec<IpAddr> = (0..count).map(client).collect();
        // Every client already holds one connection: the maps are full-size.
        let _held: Vec<_> = clients.iter().map(|c| limiter.accept(c).unwrap()).collect();

        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("1_thread/{name}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                pairs(&limiter, &clients, 0, iters);
                start.elapsed()
            })
        });

        // Both threads run `iters` pairs; the elapsed time covers both.
        group.throughput(Throughput::Elements(2));
        group.bench_function(format!("2_threads/{name}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                thread::scope(|s| {
                    for t in 0..2 {
                        let (limiter, clients) = (&limiter, &clients);
                        s.spawn(move || pairs(limiter, clients, t * clients.len() / 2, iters));
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
