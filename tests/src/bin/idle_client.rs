//! `idle-client SERVER COUNT FIRST_SOURCE SOURCES`: opens COUNT connections
//! to SERVER, from SOURCES consecutive IPv4 source addresses starting at
//! FIRST_SOURCE (round robin), sends nothing and holds them; what the
//! endpoint tests run as an unprivileged user against connlimit's
//! `/metrics`. Prints `connected N failed M` once every connect has ended,
//! then, for each line on its input, `closed C open O`: how many of its
//! connections the server has closed (a read gives end of file or an
//! error) and how many are still open. Exits when its input closes.

use std::{
    io::{BufRead, ErrorKind, Read},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use socket2::{Domain, SockAddr, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, count, first, sources] = &args[..] else {
        eprintln!("usage: idle-client SERVER COUNT FIRST_SOURCE SOURCES");
        std::process::exit(2);
    };
    let (Ok(server), Ok(count), Ok(first), Ok(sources)) =
        (server.parse::<SocketAddr>(), count.parse::<u32>(), first.parse::<Ipv4Addr>(), sources.parse::<u32>())
    else {
        eprintln!("idle-client: bad arguments {args:?}");
        std::process::exit(2);
    };
    // Room for every connection: the soft limit up to the hard one.
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let mut conns = Vec::new();
    let mut failed = 0;
    for i in 0..count {
        let source = Ipv4Addr::from(u32::from(first) + i % sources.max(1));
        let connected = (|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.bind(&SockAddr::from(SocketAddr::from((source, 0))))?;
            socket.connect_timeout(&SockAddr::from(server), Duration::from_secs(5))?;
            std::io::Result::Ok(TcpStream::from(socket))
        })();
        match connected {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                if failed == 0 {
                    eprintln!("idle-client: first failed connect: {e}");
                }
                failed += 1;
            }
        }
    }
    println!("connected {} failed {failed}", conns.len());
    for conn in &conns {
        let _ = conn.set_nonblocking(true);
    }
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let closed = conns
            .iter()
            .filter(|c| {
                let mut buf = [0u8; 512];
                let mut conn: &TcpStream = c;
                match conn.read(&mut buf) {
                    // End of file, or the 503 connlimit writes before it.
                    Ok(n) => n == 0 || buf[..n].starts_with(b"HTTP/1.1 503"),
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                }
            })
            .count();
        println!("closed {closed} open {}", conns.len() - closed);
    }
}
