//! An ordinary TCP server that knows nothing of connlimit, for the kernel
//! tests: `hold-server <addr:port>...`.
//!
//! It prints `listening` once bound and `accepted <peer>` for each
//! connection, writes `Hello` to every client, then obeys one command byte:
//! [`harness::Ending`]: hold the connection until the client closes (or no
//! byte), close it (server FIN, so the server side ends in TIME_WAIT), or
//! reset it (SO_LINGER 0).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

use harness::Ending;

fn serve(mut conn: TcpStream) {
    let _ = conn.write_all(b"Hello");
    let mut command = [0u8; 1];
    match conn.read(&mut command) {
        Ok(1) if command[0] == Ending::ServerFin.byte() => {}
        Ok(1) if command[0] == Ending::ServerRst.byte() => {
            let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
        }
        Ok(n) if n > 0 => {
            let mut sink = [0u8; 64];
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        }
        _ => {}
    }
}

fn main() {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    assert!(!addrs.is_empty(), "usage: hold-server <addr:port>...");
    let listeners: Vec<TcpListener> =
        addrs.iter().map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))).collect();
    println!("listening");
    let mut threads = Vec::new();
    for listener in listeners {
        threads.push(thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                println!("accepted {}", conn.peer_addr().map(|a| a.to_string()).unwrap_or_default());
                let _ = std::io::stdout().flush();
                thread::spawn(move || serve(conn));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}
