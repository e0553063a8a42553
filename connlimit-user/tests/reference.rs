//! go-connlimit's test suite, ported case by case, on real loopback sockets.
//!
//! Each test keeps the Go test's name (in snake case) and asserts what it
//! asserts.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use connlimit::{Config, Error, Limited, LimitedListener, Limiter, Refusal};

/// The Go suite's `runLimitedServer`: one thread per connection; admitted
/// connections get "Hello" and are held until the client closes.
fn run_limited_server(limiter: Limiter) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let limiter = limiter.clone();
            thread::spawn(move || {
                let Ok(_slot) = limiter.accept(&conn) else { return }; // dropped: closed
                conn.write_all(b"Hello").unwrap();
                let mut buf = [0u8; 10];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// The Go suite's `clientRead`: connect, read what the server says (≤ 10 bytes).
fn client_read(addr: SocketAddr) -> (TcpStream, std::io::Result<String>) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 10];
    let got = conn.read(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    (conn, got)
}

/// A refused client sees end-of-file (Go's "EOF"): the read returns nothing.
fn assert_eof(got: std::io::Result<String>) {
    match got {
        Ok(s) => assert_eq!(s, "", "expected EOF"),
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

#[test]
fn test_limiter_denies() {
    let limiter = Limiter::new(Config::new(2)).unwrap();
    let addr = run_limited_server(limiter.clone());

    let (conn1, got) = client_read(addr);
    assert_eq!(got.unwrap(), "Hello");
    let (_conn2, got) = client_read(addr);
    assert_eq!(got.unwrap(), "Hello");

    // The third client is refused (after its TCP connection was accepted).
    let (_conn3, got) = client_read(addr);
    assert_eof(got);

    drop(conn1);
    // A new one fits once the server has noticed the close.
    let mut attempts = 0;
    let _conn4 = loop {
        let (conn, got) = client_read(addr);
        match got {
            Ok(s) if s == "Hello" => break conn,
            _ if attempts < 10 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(20));
            }
            other => panic!("attempt {attempts}: {other:?}"),
        }
    };

    limiter.set_config(Config::new(3)).unwrap();
    let (conn5, got) = client_read(addr);
    assert_eq!(got.unwrap(), "Hello");
    assert_eq!(limiter.num_open(&conn5.local_addr().unwrap()), 3);

    let (_conn6, got) = client_read(addr);
    assert_eof(got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_limiter_concurrency_fuzz() {
    // 1000 real connections from 100 loopback addresses (127.1.0.0..99),
    // limit 5; every admitted connection is held for a second.
    const N: usize = 1000;
    const M: usize = 100;
    let limiter = Limiter::new(Config::new(5)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let denied = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(N);
    // Admitted connections are held for a second and, so that a slow
    // machine cannot free a slot before the last client arrives, until all
    // N have been judged.
    let (judged_tx, judged_rx) = tokio::sync::watch::channel(0usize);

    let server = {
        let denied = denied.clone();
        tokio::spawn(async move {
            for _ in 0..N {
                let (conn, _) = listener.accept().await.unwrap();
                let (limiter, denied, done) = (limiter.clone(), denied.clone(), done_tx.clone());
                let (judged_tx, mut judged_rx) = (judged_tx.clone(), judged_rx.clone());
                tokio::spawn(async move {
                    let verdict = limiter.accept(&conn);
                    judged_tx.send_modify(|n| *n += 1);
                    match verdict {
                        Ok(_slot) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = judged_rx.wait_for(|&n| n == N).await;
                        }
                        Err(e) => {
                            assert!(e.is_limit_reached());
                            denied.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(done);
                });
            }
        })
    };

    let clients: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, 0, (i % M) as u8)), 0)).unwrap();
                let mut conn = socket.connect(addr).await.unwrap();
                // Hold the connection until the server is done with it.
                let mut buf = [0u8; 1];
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut conn, &mut buf))
                        .await;
            })
        })
        .collect();

    server.await.unwrap();
    // Every server task holds a sender; all dropped means all finished.
    while done_rx.recv().await.is_some() {}
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(denied.load(Ordering::Relaxed), 500);
}

/// The Go suite's `testHTTPServerWithConnState`: 10 concurrent HTTP/1.1
/// requests, each held a second by the handler, limit 5 per client: exactly
/// 5 must be reset, closed, or answered 429.
async fn http_server_with_refusal(refusal: Refusal) {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, service::service_fn};
    use hyper_util::rt::TokioIo;

    let limiter = Limiter::new(Config::new(5)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = LimitedListener::new(listener, limiter).refuse_with(refusal);
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"OK"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(conn), service).await;
            });
        }
    });

    let requests: Vec<_> = (0..10)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                let mut conn = TcpStream::connect(addr).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                // A peer that closed first may reset our write: that is a refusal too.
                if conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").is_err() {
                    return true;
                }
                let mut response = Vec::new();
                match conn.read_to_end(&mut response) {
                    Err(e) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "unexpected error type: {e}");
                        true
                    }
                    Ok(_) if response.is_empty() => true, // EOF
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&response);
                        if text.starts_with("HTTP/1.1 429 ") {
                            assert_eq!(response, connlimit::http::TOO_MANY_CONNECTIONS_RESPONSE);
                            true
                        } else {
                            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
                            assert!(text.ends_with("OK"));
                            false
                        }
                    }
                }
            })
        })
        .collect();
    let mut reset = 0;
    for r in requests {
        reset += u32::from(r.await.unwrap());
    }
    assert_eq!(reset, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_http_server() {
    http_server_with_refusal(Refusal::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_http_server_with_429_without_duration() {
    http_server_with_refusal(Refusal::TooManyRequests { write_deadline: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_http_server_with_429_with_duration() {
    http_server_with_refusal(Refusal::TooManyRequests { write_deadline: Some(Duration::from_secs(1)) }).await;
}

#[test]
fn test_wrap_close() {
    let limit = 3;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (conn_tx, conn_rx) = mpsc::channel::<Limited<TcpStream>>();
    let (err_tx, err_rx) = mpsc::channel::<Error>();
    thread::spawn(move || {
        let limiter = Limiter::new(Config::new(limit)).unwrap();
        for conn in listener.incoming() {
            let conn = conn.unwrap();
            match limiter.accept(&conn) {
                Ok(slot) => {
                    if conn_tx.send(Limited::new(conn, slot)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = err_tx.send(e);
                    return;
                }
            }
        }
    });
    let next = || {
        let client = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        match conn_rx.recv_timeout(Duration::from_secs(2)) {
            Ok(server_side) => (client, server_side),
            Err(_) => panic!("error from server thread: {:?}", err_rx.try_recv()),
        }
    };

    let mut conns: Vec<_> = (0..limit).map(|_| next()).collect();
    // Closing (dropping) a wrapped connection frees its slot: a new one fits.
    let (_client, server_side) = conns.remove(0);
    server_side.get_ref().shutdown(Shutdown::Both).unwrap();
    drop(server_side);
    let _fourth = next();
}

#[test]
fn test_wrap_sub_limit() {
    // An already wrapped connection can be passed to a sub-limiter.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server_conn, _) = listener.accept().unwrap();
    let parent = Limiter::new(Config::new(5)).unwrap();
    let child = Limiter::new(Config::new(3)).unwrap();
    let free_parent = parent.accept(&server_conn).unwrap();
    let wrap_parent = Limited::new(server_conn, free_parent);
    let mut free_child = child.accept(&wrap_parent).unwrap();
    free_child.free();
    assert_eq!(child.num_open(&wrap_parent), 0);
    assert_eq!(parent.num_open(&wrap_parent), 1);
}

#[tokio::test]
async fn test_new_listener() {
    // go-connlimit's limited listener (its issue 7): limit 2, the third
    // connection is closed before the server sees it.
    let limiter = Limiter::new(Config::new(2)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = LimitedListener::new(listener, limiter);
    let accepted = Arc::new(AtomicU64::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                conn.write_all(b"Hello").await.unwrap();
                let mut buf = [0u8; 10];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let results = tokio::task::spawn_blocking(move || {
        let (c1, g1) = client_read(addr);
        let (c2, g2) = client_read(addr);
        let (c3, g3) = client_read(addr);
        (vec![c1, c2, c3], g1.unwrap(), g2.unwrap(), g3)
    })
    .await
    .unwrap();
    assert_eq!((results.1.as_str(), results.2.as_str()), ("Hello", "Hello"));
    assert_eof(results.3);
    assert_eq!(accepted.load(Ordering::Relaxed), 2, "the server never saw the refused connection");
}
