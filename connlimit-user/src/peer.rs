//! Anything a limiter can tell the client address of.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// A connection, or an address, whose client IP the limiter counts.
///
/// Implemented for addresses and for std's and tokio's TCP streams, so
/// `limiter.accept(&stream)` and `limiter.accept(&peer_addr)` both work.
pub trait PeerAddr {
    /// The client's IP address.
    fn peer_ip(&self) -> io::Result<IpAddr>;
}

impl PeerAddr for IpAddr {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        Ok(*self)
    }
}

impl PeerAddr for Ipv4Addr {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        Ok(IpAddr::V4(*self))
    }
}

impl PeerAddr for Ipv6Addr {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        Ok(IpAddr::V6(*self))
    }
}

impl PeerAddr for SocketAddr {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        Ok(self.ip())
    }
}

impl PeerAddr for std::net::TcpStream {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        self.peer_addr().map(|a| a.ip())
    }
}

impl PeerAddr for tokio::net::TcpStream {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        self.peer_addr().map(|a| a.ip())
    }
}

impl<T: PeerAddr + ?Sized> PeerAddr for &T {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        (**self).peer_ip()
    }
}
