//! Refusing HTTP clients politely: go-connlimit's default 429 handler.
//!
//! Closing an over-limit connection without a word broke SDKs and was hard
//! to diagnose (Consul issue 7527), so HTTP servers usually answer it with
//! exactly [`TOO_MANY_CONNECTIONS_RESPONSE`] and then close.

use std::{io, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The body of the 429 response.
pub const TOO_MANY_CONNECTIONS_BODY: &str =
    "Your IP is issuing too many concurrent connections, please rate limit your calls\n";

/// The whole 429 response, byte for byte what go-connlimit writes.
pub const TOO_MANY_CONNECTIONS_RESPONSE: &[u8] = concat!(
    "HTTP/1.1 429 Too Many Requests\r\n",
    "Content-Type: text/plain\r\n",
    "Content-Length: 81\r\n",
    "Connection: close\r\n",
    "\r\n",
    "Your IP is issuing too many concurrent connections, please rate limit your calls\n",
)
.as_bytes();

/// How long a refused client may keep sending before the socket is closed
/// under it, when no write deadline is given.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Writes the 429 response to `stream` and closes the write side.
///
/// With a `write_deadline`, a client that does not take the response within
/// it is dropped, so slow clients cannot hold the server. Afterwards the
/// request the client may still be sending is read and discarded for a short
/// while: closing a socket with unread data makes the kernel send a reset,
/// which could destroy the response before the client reads it.
pub async fn write_too_many_connections<S>(stream: &mut S, write_deadline: Option<Duration>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        stream.write_all(TOO_MANY_CONNECTIONS_RESPONSE).await?;
        stream.shutdown().await
    };
    match write_deadline {
        Some(deadline) => tokio::time::timeout(deadline, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "429 response not written within the deadline"))??,
        None => write.await?,
    }
    let drain = async {
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(write_deadline.unwrap_or(DRAIN_LIMIT).min(DRAIN_LIMIT), drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_matches_the_body() {
        assert_eq!(TOO_MANY_CONNECTIONS_BODY.len(), 81);
        assert!(TOO_MANY_CONNECTIONS_RESPONSE.ends_with(TOO_MANY_CONNECTIONS_BODY.as_bytes()));
    }
}
