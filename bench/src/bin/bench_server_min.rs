//! The lightest server the benchmarks measure: `bench-server-min <addr:port>`.
//!
//! One thread, one epoll set, no runtime: each accepted connection gets one
//! byte (`H`) at once and is closed on the client's EOF. Anything a limiter
//! costs shows against it undiluted, which is why it is the first baseline.
//! Like `bench-server`, it prints `listening` once bound, and `accepted <n>
//! refused 0` for each line read on stdin; it exits at stdin's end.

use std::{
    io::{self, Write as _},
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
};

use socket2::{Domain, Protocol, Socket, Type};

const STDIN: RawFd = 0;

fn main() -> io::Result<()> {
    let Some(addr) = std::env::args().nth(1).and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: bench-server-min <addr:port>");
        std::process::exit(2);
    };
    let listener = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    listener.set_reuse_address(true)?;
    listener.bind(&addr.into())?;
    listener.listen(4096)?;
    let lfd = listener.as_raw_fd();
    // SAFETY: plain syscalls on descriptors this process owns; `events` and
    // `buf` outlive every call that writes to them.
    unsafe {
        let ep = check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?;
        watch(ep, lfd)?;
        watch(ep, STDIN)?;
        println!("listening");
        io::stdout().flush()?;
        let mut accepted = 0u64;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            for ev in &events[..n as usize] {
                let fd = ev.u64 as RawFd;
                if fd == lfd {
                    loop {
                        let c = libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if c < 0 {
                            break; // EAGAIN, or an aborted connection: back to epoll
                        }
                        accepted += 1;
                        if libc::write(c, b"H".as_ptr().cast(), 1) != 1 || watch(ep, c).is_err() {
                            libc::close(c);
                        }
                    }
                } else if fd == STDIN {
                    let r = libc::read(STDIN, buf.as_mut_ptr().cast(), buf.len());
                    if r <= 0 {
                        return Ok(());
                    }
                    for _ in buf[..r as usize].iter().filter(|&&b| b == b'\n') {
                        println!("accepted {accepted} refused 0");
                    }
                    io::stdout().flush()?;
                } else {
                    let r = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if r == 0 || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock) {
                        libc::close(fd); // also leaves the epoll set
                    }
                }
            }
        }
    }
}

/// Adds `fd` to epoll set `ep` for reading.
///
/// # Safety
/// `ep` and `fd` are open descriptors.
unsafe fn watch(ep: RawFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
    // SAFETY: per this function's contract.
    check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}
