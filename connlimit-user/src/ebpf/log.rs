//! Kernel-side diagnostics (aya-log) shown through `tracing`.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use aya::Ebpf;
use aya_log::EbpfLogger;

/// Forwards `log` records from aya-log to `tracing`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "connlimit::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "connlimit::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "connlimit::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "connlimit::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "connlimit::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// A thread draining the kernel's log ring buffer until dropped.
pub(crate) struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl KernelLog {
    /// Starts forwarding; `None` (with a debug note) if the object has no log map.
    pub(crate) fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let mut logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
            Ok(logger) => logger,
            Err(e) => {
                tracing::debug!(error = %e, "kernel log not forwarded");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("connlimit-klog".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let mut fd = libc::pollfd { fd: logger.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd; the 200 ms timeout bounds how long drop waits.
                    if unsafe { libc::poll(&mut fd, 1, 200) } > 0 {
                        logger.flush();
                    }
                }
            })
            .ok()?;
        Some(Self { stop, thread: Some(thread) })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
