//! The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`): listing the TCP
//! listeners of a network namespace with their cgroups, and ending a
//! connection (`SOCK_DESTROY`, which needs `CONFIG_INET_DIAG_DESTROY`).
//!
//! A socket of this kind talks about the network namespace it was opened
//! in; [`in_netns`] opens one elsewhere.

use std::{
    io,
    mem::size_of,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use connlimit_common::{addr::is_v4_mapped, maps::FlowKey};

use crate::addr;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_LISTEN: u32 = 10;
const INET_DIAG_CGROUP_ID: u16 = 21;

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`, the head of each answer.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Answer {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// A TCP socket, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// Its TCP state (`TCP_ESTABLISHED` = 1, `TCP_LISTEN` = 10, ...).
    pub state: u8,
    /// The local address.
    pub local: IpAddr,
    /// The local port.
    pub local_port: u16,
    /// The peer's address (unspecified for a listener).
    pub remote: IpAddr,
    /// The peer's port.
    pub remote_port: u16,
    /// The id (cgroupfs inode) of the cgroup v2 it belongs to.
    pub cgroup_id: u64,
}

/// `TcpSocket::state` of an established connection.
pub const TCP_ESTABLISHED: u8 = 1;

/// A `NETLINK_SOCK_DIAG` socket.
#[derive(Debug)]
pub struct SockDiag {
    fd: OwnedFd,
}

/// Runs `f` on a thread inside the network namespace at `netns` (sockets
/// it opens stay in that namespace).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a namespace fd we hold; only this thread moves.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a thread in the network namespace panicked")))
    })
}

impl SockDiag {
    /// Opens a socket in the caller's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Self { fd })
    }

    /// Ends the server-side socket of `flow` whose cookie is `cookie` (it
    /// sends the client a RST; the server's next read or write fails).
    /// `NotFound` if that socket is gone already.
    pub fn destroy(&self, flow: &FlowKey, cookie: u64) -> io::Result<()> {
        let v4 = is_v4_mapped(&flow.client);
        let (src, dst) = if v4 { ([flow.local[3], 0, 0, 0], [flow.client[3], 0, 0, 0]) } else { (flow.local, flow.client) };
        let request = Request {
            family: if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: u32::MAX,
            id: SockId {
                sport: flow.local_port.to_be(),
                dport: flow.client_port.to_be(),
                src,
                dst,
                interface: 0,
                cookie: [cookie as u32, (cookie >> 32) as u32],
            },
            ..Request::default()
        };
        self.send(SOCK_DESTROY, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16, &request)?;
        let mut buf = vec![0u8; 8192];
        let n = self.recv(&mut buf)?;
        for (kind, payload) in messages(&buf[..n]) {
            if kind == libc::NLMSG_ERROR as u16 && payload.len() >= 4 {
                let errno = -i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(errno)) };
            }
        }
        Err(io::Error::other("no answer to SOCK_DESTROY"))
    }

    /// Every TCP listener of the namespace (IPv4 and IPv6).
    pub fn listeners(&self) -> io::Result<Vec<TcpSocket>> {
        self.sockets(1 << TCP_LISTEN)
    }

    /// Every TCP socket of the namespace in one of `states` (a bit mask:
    /// `1 << state`), IPv4 and IPv6.
    pub fn sockets(&self, states: u32) -> io::Result<Vec<TcpSocket>> {
        let mut found = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let request =
                Request { family: family as u8, protocol: libc::IPPROTO_TCP as u8, states, ..Request::default() };
            self.send(SOCK_DIAG_BY_FAMILY, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, &request)?;
            let mut buf = vec![0u8; 64 * 1024];
            'dump: loop {
                let n = self.recv(&mut buf)?;
                for (kind, payload) in messages(&buf[..n]) {
                    match kind {
                        k if k == libc::NLMSG_DONE as u16 => break 'dump,
                        k if k == libc::NLMSG_ERROR as u16 => {
                            let errno = payload.get(..4).map_or(0, |e| -i32::from_ne_bytes(e.try_into().expect("4")));
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        SOCK_DIAG_BY_FAMILY => found.extend(socket(payload)),
                        _ => {}
                    }
                }
            }
        }
        Ok(found)
    }

    fn send(&self, kind: u16, flags: u16, request: &Request) -> io::Result<()> {
        let header = libc::nlmsghdr {
            nlmsg_len: (size_of::<libc::nlmsghdr>() + size_of::<Request>()) as u32,
            nlmsg_type: kind,
            nlmsg_flags: flags,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        };
        let mut bytes = Vec::with_capacity(header.nlmsg_len as usize);
        bytes.extend_from_slice(as_bytes(&header));
        bytes.extend_from_slice(as_bytes(request));
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address for sendto.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: a valid buffer for recv.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }
}

/// The netlink messages in a datagram: (type, payload).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header_len = size_of::<libc::nlmsghdr>();
        if buf.len() < header_len {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        if len < header_len || len > buf.len() {
            return None;
        }
        let payload = &buf[header_len..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

fn socket(payload: &[u8]) -> Option<TcpSocket> {
    if payload.len() < size_of::<Answer>() {
        return None;
    }
    // SAFETY: `Answer` is plain integers; the length was checked.
    let answer: Answer = unsafe { payload.as_ptr().cast::<Answer>().read_unaligned() };
    let v4 = u32::from(answer.family) == libc::AF_INET as u32;
    let ip = |words: [u32; 4]| addr::from_words(if v4 { connlimit_common::addr::v4_mapped(words[0]) } else { words });
    let mut cgroup_id = 0;
    let mut attrs = &payload[size_of::<Answer>()..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = u64::from_ne_bytes(attrs[4..12].try_into().ok()?);
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    Some(TcpSocket {
        state: answer.state,
        local: ip(answer.id.src),
        local_port: u16::from_be(answer.id.sport),
        remote: ip(answer.id.dst),
        remote_port: u16::from_be(answer.id.dport),
        cgroup_id,
    })
}

fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: `T` is a plain `repr(C)` struct of integers without padding.
    unsafe { std::slice::from_raw_parts((value as *const T).cast(), size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<Request>(), 56);
        assert_eq!(size_of::<Answer>(), 72);
    }

    #[test]
    fn truncated_answers_are_skipped() {
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
        assert!(socket(&[0; 10]).is_none());
    }
}
