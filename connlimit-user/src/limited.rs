//! A connection that holds a slot: go-connlimit's `Wrap`.

use std::{
    io::{self, Read, Write},
    net::IpAddr,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{PeerAddr, Slot};

pin_project! {
    /// A stream together with the [`Slot`] its connection holds: dropping it
    /// closes the stream and frees the slot. Reads and writes go straight to
    /// the stream, blocking (`std::io`) or async (`tokio::io`).
    ///
    /// ```no_run
    /// use connlimit::{Config, Limited, Limiter};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let limiter = Limiter::new(Config::new(10))?;
    /// let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
    /// for stream in listener.incoming() {
    ///     let stream = stream?;
    ///     let Ok(slot) = limiter.accept(&stream) else { continue }; // over the limit: dropped, closed
    ///     let conn = Limited::new(stream, slot);
    ///     std::thread::spawn(move || { /* serve `conn`; its slot is freed when it drops */ drop(conn) });
    /// }
    /// # Ok(()) }
    /// ```
    #[derive(Debug)]
    pub struct Limited<S> {
        #[pin]
        stream: S,
        slot: Slot,
    }
}

impl<S> Limited<S> {
    /// Ties `slot` to `stream`.
    pub fn new(stream: S, slot: Slot) -> Self {
        Self { stream, slot }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Frees the slot now, keeping the stream open (idempotent).
    pub fn free(&mut self) {
        self.slot.free();
    }

    /// Separates the stream from its slot; the slot still frees when dropped.
    pub fn into_parts(self) -> (S, Slot) {
        (self.stream, self.slot)
    }
}

impl<S: PeerAddr> PeerAddr for Limited<S> {
    fn peer_ip(&self) -> io::Result<IpAddr> {
        self.stream.peer_ip()
    }
}

impl<S: Read> Read for Limited<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl<S: Write> Write for Limited<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl<S: AsyncRead> AsyncRead for Limited<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Limited<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
