//! The 429 responder: with [`RefuseWith::Http429`], the kernel hands a
//! refused connection to a listener this process owns (an sk_lookup
//! `bpf_sk_assign` from the `RESPONDER` sockmap) instead of resetting it.
//! The responder answers exactly go-connlimit's
//! [429 response](crate::http::TOO_MANY_CONNECTIONS_RESPONSE), with a write
//! deadline, and closes. The server process never sees the connection.
//!
//! - Its listeners are bound to loopback on ephemeral ports in the guarded
//!   network namespace, by the process owning the instance, and marked in
//!   `OWN_SOCKETS`, whose mark the connections they accept inherit: those
//!   are never counted or ended, even when connlimit runs inside the guarded
//!   cgroup (as a DaemonSet guarding `kubepods.slice` does).
//! - Bounded: past [`MAX_RESPONDING`] connections at once, more are reset
//!   at once, and the accept queues hold at most [`BACKLOG`] each, so a
//!   flood of over-limit clients cannot exhaust this process; a connection
//!   that would use one of the descriptors kept in reserve
//!   ([`fds::reserve`](super::fds::reserve), shared with `/metrics` and
//!   every other responder of the process) is reset at once too; a failed
//!   accept pauses (never a spin).
//! - When the owner is gone (a crash), its listeners close, the kernel
//!   drops them from the sockmap, and refusals fall back to a reset.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::MapData;
use connlimit_common::maps::{FLAG_REFUSE_429, RESPONDER_V4, RESPONDER_V6};
use tokio::sync::{Semaphore, watch};

use super::EbpfError;

/// Connections the responder answers at once; more are reset.
pub const MAX_RESPONDING: usize = 512;
/// Each responder listener's accept queue.
pub const BACKLOG: i32 = 256;
/// How long a refused client has to take the 429 response.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// How the kernel refuses a connection over a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RefuseWith {
    /// An immediate TCP reset: the client's connect fails with
    /// "connection refused".
    #[default]
    Reset,
    /// The connection is accepted by connlimit's responder, which writes
    /// go-connlimit's `HTTP/1.1 429 Too Many Requests` and closes. Falls
    /// back to a reset when no connlimit process owns the instance, or past
    /// [`MAX_RESPONDING`] answers at once.
    Http429,
}

impl RefuseWith {
    pub(crate) fn flag(self) -> u16 {
        match self {
            Self::Reset => 0,
            Self::Http429 => FLAG_REFUSE_429,
        }
    }

    pub(crate) fn from_flags(flags: u16) -> Self {
        if flags & FLAG_REFUSE_429 != 0 { Self::Http429 } else { Self::Reset }
    }
}

impl std::fmt::Display for RefuseWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reset => "reset",
            Self::Http429 => "http-429",
        })
    }
}

impl std::str::FromStr for RefuseWith {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reset" => Ok(Self::Reset),
            "http-429" => Ok(Self::Http429),
            _ => Err(format!(
                "{s:?} is not a way to refuse; use `reset` (TCP reset) or `http-429` (answer HTTP 429 Too Many Requests)"
            )),
        }
    }
}

/// The maps the responder works with.
#[derive(Debug)]
pub(crate) struct ResponderMaps {
    /// Its listeners, where the lookup program sends refusals (a sockmap).
    pub(crate) listeners: MapData,
    /// connlimit's own sockets (a socket storage map).
    pub(crate) own: MapData,
}

impl ResponderMaps {
    fn duplicate(&self) -> Result<Self, EbpfError> {
        let fail = |e: String| EbpfError::system("starting the 429 responder again", e);
        let dup = |data: &MapData| {
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| fail(e.to_string()))?;
            MapData::from_fd(fd).map_err(|e| fail(e.to_string()))
        };
        Ok(Self { listeners: dup(&self.listeners)?, own: dup(&self.own)? })
    }

    /// Puts `listener` at `index` of the listeners and marks it as
    /// connlimit's own (before the lookup program can send it anything).
    fn set(&mut self, index: u32, listener: &std::net::TcpListener) -> std::io::Result<()> {
        let fd = listener.as_raw_fd();
        super::bpf_sys::map_update(self.own.fd().as_fd(), &fd, &1u32)?;
        super::bpf_sys::map_update(self.listeners.fd().as_fd(), &index, &fd)
    }
}

/// The running responder; dropping it closes its listeners (the kernel
/// then refuses with a reset).
#[derive(Debug)]
pub struct Responder {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    /// Its maps, kept to start again elsewhere (see [`Self::restart`]).
    maps: ResponderMaps,
    instance: String,
}

impl Responder {
    /// Binds the listeners in the network namespace `netns`, puts them in
    /// `sockmap` and starts answering.
    pub(crate) fn start(mut maps: ResponderMaps, netns: &File, instance: &str) -> Result<Self, EbpfError> {
        let netns_file = netns.try_clone().map_err(|e| EbpfError::system("starting the 429 responder", e))?;
        let kept = maps.duplicate()?;
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let (instance, instance_name) = (instance.to_owned(), instance.to_owned());
        let thread = std::thread::Builder::new()
            .name("connlimit-responder".into())
            .spawn(move || {
                let started = (|| {
                    super::sock_diag::enter_netns(&netns_file)?;
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
                    maps.set(RESPONDER_V4, &v4)?;
                    // A host without IPv6 gets resets for IPv6 refusals.
                    let v6 = match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))) {
                        Ok(v6) => {
                            maps.set(RESPONDER_V6, &v6)?;
                            Some(v6)
                        }
                        Err(e) => {
                            tracing::warn!(instance = %instance, error = %e, "no IPv6 429 responder: IPv6 refusals get a reset");
                            None
                        }
                    };
                    Ok((runtime, v4, v6))
                })();
                let (runtime, v4, v6) = match started {
                    Ok(parts) => {
                        let _ = ready_tx.send(Ok(()));
                        parts
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(serve(v4, v6, stopped));
            })
            .map_err(|e| EbpfError::system("starting the 429 responder", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { stop, thread: Some(thread), maps: kept, instance: instance_name }),
            Ok(Err(e)) => Err(EbpfError::system("starting the 429 responder in the guarded namespace", e)),
            Err(_) => Err(EbpfError::system("starting the 429 responder", std::io::Error::other("it stopped"))),
        }
    }
}

impl Responder {
    /// Stops answering here and starts in the network namespace `netns`
    /// (the guarded processes moved there).
    pub(crate) fn restart(self, netns: &File) -> Result<Self, EbpfError> {
        let (maps, instance) = (self.maps.duplicate()?, self.instance.clone());
        drop(self);
        Self::start(maps, netns, &instance)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    // Listening again only sets the accept queue's length.
    // SAFETY: a valid socket descriptor we own.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Answers on both listeners until told to stop.
async fn serve(v4: std::net::TcpListener, v6: Option<std::net::TcpListener>, mut stopped: watch::Receiver<bool>) {
    let responding = Arc::new(Semaphore::new(MAX_RESPONDING));
    let tasks: Vec<_> = std::iter::once(v4)
        .chain(v6)
        .filter_map(|l| tokio::net::TcpListener::from_std(l).ok())
        .map(|l| tokio::spawn(accept_loop(l, responding.clone())))
        .collect();
    let _ = stopped.wait_for(|&stop| stop).await;
    for task in tasks {
        task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, responding: Arc<Semaphore>) {
    let mut pause = super::fds::AcceptPause::default();
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            // Out of descriptors or memory: let the backlog absorb it,
            // accepting again after a pause (never a spin).
            Err(e) => {
                let (wait, starved) = pause.after_error(&e);
                if starved {
                    tracing::debug!(error = %e, "429 responder: cannot accept; pausing");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        // Descriptors near the limit are left to the upkeep and the other
        // endpoints: reset this one at once.
        if !super::fds::may_keep(conn.as_raw_fd()) {
            reset(&conn);
            continue;
        }
        pause.ok();
        match responding.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    let _ = crate::http::write_too_many_connections(&mut conn, Some(WRITE_DEADLINE)).await;
                    drop(permit);
                });
            }
            // Too many at once: reset this one now.
            Err(_) => reset(&conn),
        }
    }
}

/// Makes dropping `conn` reset it.
fn reset(conn: &tokio::net::TcpStream) {
    // A zero linger resets on drop without blocking (tokio's warning is
    // about a non-zero linger).
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for r in [RefuseWith::Reset, RefuseWith::Http429] {
            assert_eq!(r.to_string().parse::<RefuseWith>(), Ok(r));
            assert_eq!(RefuseWith::from_flags(r.flag()), r);
        }
        assert!("429".parse::<RefuseWith>().unwrap_err().contains("use `reset`"));
    }
}
