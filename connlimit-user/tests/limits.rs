//! The total limit and per-network limits of the user-space core, in the
//! style of go-connlimit's suite: real loopback connections from many
//! addresses, held until every one has been judged.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use connlimit::{Config, Limiter, NetworkLimit};

/// `n` connections from 127.1.0.0..`sources`-1 (round robin) to a server
/// judging each with `limiter`; admitted ones are held until all are
/// judged. Returns how many were denied.
async fn denied(limiter: Limiter, n: usize, sources: usize) -> u64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let denied = Arc::new(AtomicU64::new(0));
    let (judged_tx, judged_rx) = tokio::sync::watch::channel(0usize);
    let server = {
        let denied = denied.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..n {
                let (conn, _) = listener.accept().await.unwrap();
                let (limiter, denied) = (limiter.clone(), denied.clone());
                let (judged_tx, mut judged_rx) = (judged_tx.clone(), judged_rx.clone());
                tasks.push(tokio::spawn(async move {
                    let verdict = limiter.accept(&conn);
                    judged_tx.send_modify(|j| *j += 1);
                    match verdict {
                        Ok(_slot) => {
                            let _ = judged_rx.wait_for(|&j| j == n).await;
                        }
                        Err(e) => {
                            assert!(e.is_limit_reached());
                            denied.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(conn);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(limiter.total_open(), 0, "every slot freed");
        })
    };
    let clients: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                let source = Ipv4Addr::new(127, 1, 0, (i % sources) as u8);
                socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
                let mut conn = socket.connect(addr).await.unwrap();
                let mut buf = [0u8; 1];
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut conn, &mut buf))
                        .await;
            })
        })
        .collect();
    server.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    denied.load(Ordering::Relaxed)
}

/// go-connlimit issue 12: 1000 concurrent connections from 100 addresses,
/// no per-client limit, 120 in total: exactly 880 denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_total_limit_concurrency_fuzz() {
    let limiter = Limiter::new(Config::new(0).with_max_conns_total(120)).unwrap();
    assert_eq!(denied(limiter.clone(), 1000, 100).await, 880);
    assert_eq!(limiter.stats().total_refused, 880);
}

/// Per-client 5 and 300 in total: the per-client limits alone would admit
/// 500, the total holds it to 300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_total_and_per_client_limits_together() {
    let limiter = Limiter::new(Config::new(5).with_max_conns_total(300)).unwrap();
    assert_eq!(denied(limiter.clone(), 1000, 100).await, 700);
    let stats = limiter.stats();
    assert_eq!((stats.accepted, stats.refused), (300, 700));
}

/// Network limits: 127.1.0.0/26 (addresses 0-63) get 2 each, the rest the
/// default 5, and 127.1.0.99 (a /32 of 0) is unlimited: 10 connections
/// from each of 100 addresses admit 64 * 2 + 35 * 5 + 10 = 313.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_network_limits_concurrency_fuzz() {
    let networks: Vec<NetworkLimit> = ["127.1.0.0/26=2", "127.1.0.99=0"].iter().map(|s| s.parse().unwrap()).collect();
    let limiter = Limiter::new(Config::new(5).with_network_limits(networks)).unwrap();
    assert_eq!(denied(limiter, 1000, 100).await, 1000 - 313);
}

/// Lowering the total closes nothing; raising it admits at once.
#[test]
fn test_total_limit_changes_live() {
    let limiter = Limiter::new(Config::new(0).with_max_conns_total(2)).unwrap();
    let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
    let a = limiter.accept(&ip(1)).unwrap();
    let _b = limiter.accept(&ip(2)).unwrap();
    assert!(limiter.accept(&ip(3)).unwrap_err().is_limit_reached());
    limiter.set_config(Config::new(0).with_max_conns_total(3)).unwrap();
    let _c = limiter.accept(&ip(3)).unwrap();
    limiter.set_config(Config::new(0).with_max_conns_total(1)).unwrap();
    assert_eq!(limiter.total_open(), 3);
    drop(a);
    assert!(limiter.accept(&ip(4)).is_err(), "2 open, total 1");
    // Dry run admits over the total and says so.
    limiter.set_config(Config::new(0).with_max_conns_total(1).with_dry_run(true)).unwrap();
    let _d = limiter.accept(&ip(4)).unwrap();
    assert_eq!(limiter.total_open(), 3);
    assert_eq!(limiter.stats().dry_run_refused, 1);
}
