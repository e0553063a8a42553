//! Why a connection was not admitted.

use std::io;

/// The error [`Limiter::accept`](crate::Limiter::accept) returns.
///
/// Its message for the limit case is deliberately generic (the same as
/// go-connlimit's `ErrPerClientIPLimitReached`): it may reach the client, and
/// must not tell it the limit or how many connections it holds.
///
/// ```
/// use connlimit::{Config, Error, Limiter};
/// let limiter = Limiter::new(Config::new(1))?;
/// let client: std::net::IpAddr = "192.0.2.1".parse()?;
/// let _first = limiter.accept(&client)?;
/// match limiter.accept(&client) {
///     Err(Error::LimitReached) => {} // refuse politely
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client already holds as many connections as it may.
    #[error("client connection limit reached")]
    LimitReached,
    /// The connection's peer address could not be read (it may already be closed).
    #[error("cannot read the connection's peer address: {0}")]
    PeerAddr(#[source] io::Error),
}

impl Error {
    /// Whether this is the limit case (as opposed to a failure to read the peer).
    pub fn is_limit_reached(&self) -> bool {
        matches!(self, Error::LimitReached)
    }
}
