//! Per-client-IP concurrent TCP connection limits.
//!
//! "Client X may hold at most N open connections; connection N+1 is
//! refused." This crate gives Rust programs the API of HashiCorp's
//! [go-connlimit] (as used by Consul and Nomad), and on Linux enforces the
//! same configuration in the kernel, with eBPF, for servers that were never
//! written to know about it.
//!
//! - [`Limiter`]: the user-space limiter, on any OS. [`Limiter::accept`]
//!   counts a connection under its client and returns a [`Slot`] that frees
//!   itself when dropped, or [`Error::LimitReached`].
//! - [`LimitedListener`]: a tokio listener that applies a limiter and hands
//!   out [`Limited`] streams; over-limit connections are closed or answered
//!   with go-connlimit's exact [HTTP 429](http::TOO_MANY_CONNECTIONS_RESPONSE).
//! - `ebpf::EbpfLimiter` (Linux, default feature `ebpf`): the same limits
//!   enforced by the kernel for any server process.
//!
//! Features: `ebpf` (the kernel limiter) and `cli` (what only the `connlimit`
//! binary needs) are on by default. With `default-features = false` the crate
//! is the user-space limiter alone and builds with stable Rust on any OS.
//!
//! ```
//! use connlimit::{Config, LimitedListener, Limiter};
//! use tokio::io::AsyncWriteExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let limiter = Limiter::new(Config::new(2))?; // 2 connections per client IP
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let listener = LimitedListener::new(listener, limiter.clone());
//!
//! tokio::spawn(async move {
//!     while let Ok((mut conn, _peer)) = listener.accept().await {
//!         tokio::spawn(async move { let _ = conn.write_all(b"hello\n").await; });
//!     }
//! });
//!
//! let _a = tokio::net::TcpStream::connect(addr).await?;
//! let _b = tokio::net::TcpStream::connect(addr).await?;
//! # tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! // A third connection from 127.0.0.1 would be closed at once.
//! limiter.set_config(Config::new(3))?; // raise the limit live
//! assert_eq!(limiter.config().max_conns_per_client_ip, 3);
//! # Ok(()) }
//! ```
//!
//! [go-connlimit]: https://github.com/hashicorp/go-connlimit
#![warn(missing_docs)]

pub mod addr;
mod cidr;
mod config;
#[cfg(all(feature = "ebpf", target_os = "linux"))]
pub mod ebpf;
mod error;
pub mod http;
mod limited;
mod limiter;
mod listener;
mod network_limit;
mod peer;

/// The README's example compiles (checked by `cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub use cidr::{Cidr, CidrError};
pub use config::{
    Config, ConfigError, DEFAULT_IPV4_PREFIX_LEN, DEFAULT_IPV6_PREFIX_LEN, MAX_CONNS_PER_CLIENT_IP, MAX_CONNS_TOTAL,
    MAX_EXEMPT,
};
pub use connlimit_common::maps::{Stat, StatInfo, StatKind};
#[cfg(all(feature = "ebpf", target_os = "linux"))]
pub use ebpf::EbpfLimiter;
pub use error::Error;
pub use limited::Limited;
pub use limiter::{Limiter, Slot, Stats};
pub use listener::{LimitedListener, Refusal};
pub use network_limit::{NetworkLimit, NetworkLimitError};
pub use peer::PeerAddr;
