//! Ending the connections the kernel asks to end.
//!
//! A handshake that completes after its reservation is gone (a client that
//! held back its final ACK, say) is judged when it completes; sock_ops
//! cannot close a socket, so when such a connection is over the limit the
//! kernel reports it in the `ENDINGS` ring buffer and this worker, in the
//! guarded network namespace, ends it with `SOCK_DESTROY`. The client gets a
//! RST; the server's next read or write on it fails.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use connlimit_common::maps::Ending;

use super::{EbpfError, sock_diag};
use crate::addr;

/// How often the worker looks at its stop flag while no ending arrives.
const POLL: Duration = Duration::from_millis(200);

/// The thread ending the connections the kernel asks to end; it stops when
/// this is dropped.
#[derive(Debug)]
pub struct EndingsWorker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The 429 responder, run by the same owner (see [`super::Responder`]).
    responder: Option<super::Responder>,
}

impl EndingsWorker {
    /// Starts ending what `ring` reports, in the network namespace `netns`.
    pub(crate) fn start(mut ring: RingBuf<MapData>, netns: &Path, instance: &str) -> Result<Self, EbpfError> {
        let netns_file = std::fs::File::open(netns).map_err(|e| EbpfError::Netns(netns.to_owned(), e))?;
        // Entering a namespace needs CAP_SYS_ADMIN, even one's own: skip it
        // when the guarded namespace is ours.
        let here = super::host::NetnsId::of(Path::new("/proc/self/ns/net")).ok();
        let enter = here.is_none() || here != super::host::NetnsId::of(netns).ok();
        let stop = Arc::new(AtomicBool::new(false));
        let instance = instance.to_owned();
        let stopping = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("connlimit-endings".into())
            .spawn(move || {
                // SAFETY: setns on a namespace fd we hold; only this thread moves.
                let diag = if enter && unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    sock_diag::SockDiag::open()
                };
                let diag = match diag {
                    Ok(diag) => {
                        let _ = ready_tx.send(Ok(()));
                        diag
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while !stopping.load(Ordering::Relaxed) {
                    while let Some(item) = ring.next() {
                        if item.len() < size_of::<Ending>() {
                            continue;
                        }
                        // SAFETY: the kernel wrote an `Ending` (plain integers); length checked.
                        let ending: Ending = unsafe { item.as_ptr().cast::<Ending>().read_unaligned() };
                        drop(item);
                        let client = addr::from_words(ending.flow.client);
                        match diag.destroy(&ending.flow, ending.cookie) {
                            Ok(()) => tracing::info!(
                                instance = %instance, %client, port = ending.flow.local_port,
                                "ended a connection over the limit (its handshake completed after its reservation expired)"
                            ),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => tracing::warn!(
                                instance = %instance, %client, error = %e,
                                "could not end a connection over the limit (needs CONFIG_INET_DIAG_DESTROY)"
                            ),
                        }
                    }
                    wait_readable(&ring, POLL);
                }
            })
            .map_err(|e| EbpfError::system("starting the endings worker", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { stop, thread: Some(thread), responder: None }),
            Ok(Err(e)) => Err(EbpfError::system("opening a socket-diagnostics socket in the guarded namespace", e)),
            Err(_) => Err(EbpfError::system("starting the endings worker", std::io::Error::other("it stopped"))),
        }
    }
}

impl EndingsWorker {
    pub(crate) fn with_responder(mut self, responder: Option<super::Responder>) -> Self {
        self.responder = responder;
        self
    }

    /// Whether this owner answers refusals with 429 when asked to.
    pub fn has_responder(&self) -> bool {
        self.responder.is_some()
    }
}

fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut fd = libc::pollfd { fd: ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) };
}

impl Drop for EndingsWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
