//! The server the benchmarks measure: `bench-server <addr:port> [limit]`.
//!
//! An ordinary tokio accept loop: each connection gets one byte (`H`) and is
//! kept until the client closes. With a `limit`, it applies the user-space
//! `connlimit::Limiter` (the "userspace core" configuration): connections
//! over the limit are closed at once, after paying for the accept.
//! It prints `listening` once bound, and `accepted <n> refused <n>` for each
//! line read on stdin; it exits at stdin's end.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use connlimit::{Config, Limited, Limiter, Slot};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[tokio::main(worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: bench-server <addr:port> [limit]");
    let limiter = args.next().map(|l| Limiter::new(Config::new(l.parse().expect("limit"))).expect("config"));
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    {
        let (accepted, refused) = (accepted.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                let slot = match &limiter {
                    None => Slot::empty(),
                    Some(limiter) => match limiter.accept(&peer) {
                        Ok(slot) => slot,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            continue; // dropped: closed
                        }
                    },
                };
                tokio::spawn(async move {
                    let mut conn = Limited::new(conn, slot);
                    let _ = conn.write_all(b"H").await;
                    let mut sink = [0u8; 64];
                    while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
        });
    }
    println!("listening");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        println!("accepted {} refused {}", accepted.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    }
}
