//! The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`): listing the TCP
//! sockets of a network namespace with their cgroups (and, for connections,
//! the state connlimit's kernel side keeps in their socket storage), and
//! ending a connection (`SOCK_DESTROY`, which needs
//! `CONFIG_INET_DIAG_DESTROY`).
//!
//! A socket of this kind talks about the network namespace it was opened
//! in; [`in_netns`] opens one elsewhere.

use std::{
    io,
    mem::size_of,
    net::IpAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use connlimit_common::{
    addr::is_v4_mapped,
    maps::{ClientKey, FlowKey, SocketState},
};

use crate::addr;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_LISTEN: u32 = 10;
// Attribute numbers of `linux/inet_diag.h` and `linux/sock_diag.h`.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 1 << 14);

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
    /// The socket's cookie (what `bpf_get_socket_cookie` returns).
    pub cookie: u64,
    /// The key the kernel counts this connection under, from its socket
    /// storage; only asked for by [`SockDiag::connections`].
    pub counted_under: Option<ClientKey>,
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
            enter_netns(&file)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a thread in the network namespace panicked")))
    })
}

/// Moves the calling thread into the network namespace `netns` (an nsfs
/// file). Nothing to do, and no privilege needed (`setns` wants
/// CAP_SYS_ADMIN), when the thread is in it already.
pub(crate) fn enter_netns(netns: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (target, here) = (netns.metadata()?, std::fs::metadata("/proc/thread-self/ns/net")?);
    if (target.dev(), target.ino()) == (here.dev(), here.ino()) {
        return Ok(());
    }
    // SAFETY: setns on a namespace fd we hold; only this thread moves.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl SockDiag {
    /// Opens a socket in the caller's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
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
        let (src, dst) =
            if v4 { ([flow.local[3], 0, 0, 0], [flow.client[3], 0, 0, 0]) } else { (flow.local, flow.client) };
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
        self.send(SOCK_DESTROY, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16, &request, &[])?;
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
        self.dump(states, None)
    }

    /// Every established TCP connection of the namespace, each with the key
    /// the kernel counts it under (read from socket storage map `states`,
    /// an instance's `SOCKETS`; asking needs `CAP_BPF`).
    pub fn connections(&self, states: BorrowedFd<'_>) -> io::Result<Vec<TcpSocket>> {
        self.dump(1 << TCP_ESTABLISHED, Some(states))
    }

    fn dump(&self, states: u32, storage: Option<BorrowedFd<'_>>) -> io::Result<Vec<TcpSocket>> {
        // Asks for the socket storage of one map: a nested attribute
        // holding the map's file descriptor.
        let attrs = storage.map_or_else(Vec::new, |map| {
            let mut a = Vec::with_capacity(12);
            a.extend_from_slice(&12u16.to_ne_bytes());
            a.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
            a.extend_from_slice(&8u16.to_ne_bytes());
            a.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
            a.extend_from_slice(&map.as_raw_fd().to_ne_bytes());
            a
        });
        let mut found = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let request =
                Request { family: family as u8, protocol: libc::IPPROTO_TCP as u8, states, ..Request::default() };
            self.send(SOCK_DIAG_BY_FAMILY, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, &request, &attrs)?;
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

    fn send(&self, kind: u16, flags: u16, request: &Request, attrs: &[u8]) -> io::Result<()> {
        let header = libc::nlmsghdr {
            nlmsg_len: (size_of::<libc::nlmsghdr>() + size_of::<Request>() + attrs.len()) as u32,
            nlmsg_type: kind,
            nlmsg_flags: flags,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        };
        let mut bytes = Vec::with_capacity(header.nlmsg_len as usize);
        bytes.extend_from_slice(as_bytes(&header));
        bytes.extend_from_slice(as_bytes(request));
        bytes.extend_from_slice(attrs);
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
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    records(buf, size_of::<libc::nlmsghdr>(), |h| {
        (u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize, u16::from_ne_bytes([h[4], h[5]]))
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
    let mut counted_under = None;
    for (kind, value) in attributes(&payload[size_of::<Answer>()..]) {
        match kind {
            INET_DIAG_CGROUP_ID if value.len() >= 8 => cgroup_id = u64::from_ne_bytes(value[..8].try_into().ok()?),
            // One storage asked for: its value is the only one there.
            INET_DIAG_SK_BPF_STORAGES => {
                counted_under = attributes(value)
                    .filter(|&(kind, _)| kind == SK_DIAG_BPF_STORAGE)
                    .flat_map(|(_, storage)| attributes(storage))
                    .find(|&(kind, _)| kind == SK_DIAG_BPF_STORAGE_MAP_VALUE)
                    .and_then(|(_, value)| counted_key(value));
            }
            _ => {}
        }
    }
    Some(TcpSocket {
        state: answer.state,
        local: ip(answer.id.src),
        local_port: u16::from_be(answer.id.sport),
        remote: ip(answer.id.dst),
        remote_port: u16::from_be(answer.id.dport),
        cgroup_id,
        cookie: u64::from(answer.id.cookie[0]) | u64::from(answer.id.cookie[1]) << 32,
        counted_under,
    })
}

/// The netlink attributes in `buf`: (type without flags, value).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    records(buf, 4, |h| (u16::from_ne_bytes([h[0], h[1]]) as usize, u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK))
}

/// Netlink's length-prefixed records, messages and attributes alike: each
/// starts with a `header_len`-byte header that `header` reads as (length
/// including the header, type), and the next starts 4-byte aligned after
/// it. Yields (type, the bytes after the header); stops at the first record
/// that does not fit.
fn records(
    mut buf: &[u8],
    header_len: usize,
    header: impl Fn(&[u8]) -> (usize, u16),
) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < header_len {
            return None;
        }
        let (len, kind) = header(buf);
        if len < header_len || len > buf.len() {
            return None;
        }
        let value = &buf[header_len..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, value))
    })
}

/// The key a `SOCKETS` value says its connection is counted under.
fn counted_key(value: &[u8]) -> Option<ClientKey> {
    if value.len() < size_of::<SocketState>() {
        return None;
    }
    // SAFETY: `SocketState` is plain integers; the length was checked.
    let state: SocketState = unsafe { value.as_ptr().cast::<SocketState>().read_unaligned() };
    (state.counted != 0).then_some(state.client)
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
        assert_eq!(attributes(&[8, 0, 1, 0, 0]).count(), 0, "an attribute longer than the buffer");
    }

    #[test]
    fn the_counted_key_is_read_from_nested_storage_attributes() {
        let key = ClientKey { addr: [0, 0, 0xffff_u32.to_be(), 7], prefix_len: 128 };
        let state = SocketState { counted: 1, client: key, _pad: 0 };
        let attr = |kind: u16, value: &[u8]| {
            let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
            a.extend_from_slice(&kind.to_ne_bytes());
            a.extend_from_slice(value);
            a.resize(a.len().next_multiple_of(4), 0);
            a
        };
        let answer = |state: &SocketState| {
            let storage = [attr(2, &9u32.to_ne_bytes()), attr(SK_DIAG_BPF_STORAGE_MAP_VALUE, as_bytes(state))].concat();
            let mut payload = vec![0; size_of::<Answer>()];
            payload[0] = libc::AF_INET6 as u8;
            payload.extend(attr(
                INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
                &attr(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage),
            ));
            payload.extend(attr(INET_DIAG_CGROUP_ID, &42u64.to_ne_bytes()));
            socket(&payload).unwrap()
        };
        let counted = answer(&state);
        assert_eq!((counted.counted_under, counted.cgroup_id), (Some(key), 42));
        assert_eq!(answer(&SocketState { counted: 0, ..state }).counted_under, None, "its close was counted");
    }
}
