//! A tokio listener that applies a [`Limiter`] to every connection it accepts.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{Limited, Limiter, http};

/// Refused connections being answered with a 429 at once, at most; past this
/// they are closed without an answer, so a flood cannot pile up tasks.
const MAX_PENDING_429: usize = 1024;

/// What a [`LimitedListener`] does with a connection over the limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Refusal {
    /// Close it at once: the client reads end-of-file (go-connlimit's
    /// `HTTPConnStateFunc`).
    #[default]
    Close,
    /// Answer with [`http::TOO_MANY_CONNECTIONS_RESPONSE`], then close
    /// (go-connlimit's `HTTPConnStateFuncWithDefault429Handler`). A client
    /// that does not take the answer within `write_deadline` is dropped.
    TooManyRequests {
        /// How long writing the answer may take; `None` for no deadline.
        write_deadline: Option<Duration>,
    },
}

/// Accepts TCP connections, counts each under its client, and hands out only
/// those within the limit, as [`Limited`] streams that free their slot when
/// dropped. Connections over the limit never reach the caller.
///
/// Works with any tokio-based server; with hyper:
///
/// ```no_run
/// use connlimit::{Config, LimitedListener, Limiter, Refusal};
/// use std::time::Duration;
/// # async fn serve() -> std::io::Result<()> {
/// let limiter = Limiter::new(Config::new(10)).expect("valid config");
/// let listener = LimitedListener::new(tokio::net::TcpListener::bind("127.0.0.1:8080").await?, limiter)
///     .refuse_with(Refusal::TooManyRequests { write_deadline: Some(Duration::from_secs(10)) });
/// loop {
///     let (stream, _peer) = listener.accept().await?;
///     tokio::spawn(async move {
///         // e.g. hyper::server::conn::http1::Builder::new()
///         //     .serve_connection(hyper_util::rt::TokioIo::new(stream), service).await
///         drop(stream); // the slot is freed here
///     });
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct LimitedListener {
    listener: TcpListener,
    limiter: Limiter,
    refusal: Refusal,
    answering: Arc<Semaphore>,
}

impl LimitedListener {
    /// Limits `listener` with `limiter`; over-limit connections are closed.
    pub fn new(listener: TcpListener, limiter: Limiter) -> Self {
        Self { listener, limiter, refusal: Refusal::Close, answering: Arc::new(Semaphore::new(MAX_PENDING_429)) }
    }

    /// Sets what happens to connections over the limit.
    pub fn refuse_with(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }

    /// The next connection within the limit.
    pub async fn accept(&self) -> io::Result<(Limited<TcpStream>, SocketAddr)> {
        loop {
            let (stream, peer) = self.listener.accept().await?;
            match self.limiter.accept(&peer) {
                Ok(slot) => return Ok((Limited::new(stream, slot), peer)),
                Err(_) => self.refuse(stream),
            }
        }
    }

    fn refuse(&self, mut stream: TcpStream) {
        let Refusal::TooManyRequests { write_deadline } = self.refusal else { return };
        let Ok(permit) = self.answering.clone().try_acquire_owned() else { return };
        tokio::spawn(async move {
            if let Err(e) = http::write_too_many_connections(&mut stream, write_deadline).await {
                tracing::debug!(error = %e, "could not send the 429 answer");
            }
            drop(permit);
        });
    }

    /// The limiter in use (to change its config live, or read counts).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
