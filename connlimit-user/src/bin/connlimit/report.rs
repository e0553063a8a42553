//! What a long-running `run`, `exec` or `serve` reports while it enforces:
//! Prometheus metrics and the refusal log.

use std::{
    net::SocketAddr,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{runtime::Runtime, task::JoinHandle};

use crate::{
    cli::ReportArgs,
    metrics::{self, Instances, Unattached, Watched},
    refusals,
};

/// The metrics endpoint and the refusal log of the instances this process
/// enforces. Dropping it stops both.
pub struct Reports {
    pub instances: Instances,
    unattached: Unattached,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    refusal_log: Option<RefusalLog>,
    handle: tokio::runtime::Handle,
}

impl Reports {
    /// Starts what `args` asks for, watching no instance yet. Binds the
    /// metrics address first so that a taken one fails before attaching.
    pub fn start(runtime: &Runtime, args: &ReportArgs) -> Result<Self> {
        let mut reports = Self {
            instances: Instances::default(),
            unattached: Unattached::default(),
            metrics: None,
            refusal_log: None,
            handle: runtime.handle().clone(),
        };
        reports.set_metrics(args.metrics_listen)?;
        reports.set_refusal_log(Duration::from_secs(args.refusal_log_interval), args.refusal_log_lines);
        Ok(reports)
    }

    /// Serves metrics at `addr` from now on (or nowhere); keeps the old
    /// endpoint if the new address cannot be bound.
    pub fn set_metrics(&mut self, addr: Option<SocketAddr>) -> Result<()> {
        if self.metrics.as_ref().map(|(a, _)| *a) == addr {
            return Ok(());
        }
        let new = match addr {
            Some(addr) => {
                // Free the old address first: the new one may be the same port on another IP.
                if let Some((_, task)) = self.metrics.take() {
                    task.abort();
                }
                let _in = self.handle.enter();
                Some((addr, metrics::serve(addr, self.instances.clone(), self.unattached.clone())?))
            }
            None => None,
        };
        if let Some((_, task)) = std::mem::replace(&mut self.metrics, new) {
            task.abort();
        }
        Ok(())
    }

    /// Logs refusals every `interval` (zero: never), at most `lines` a time.
    pub fn set_refusal_log(&mut self, interval: Duration, lines: usize) {
        if self.refusal_log.as_ref().is_some_and(|l| (l.interval, l.lines) == (interval, lines)) {
            return;
        }
        self.refusal_log = None;
        if !interval.is_zero() {
            self.refusal_log = Some(RefusalLog::start(self.instances.clone(), interval, lines));
        }
    }

    /// Exports and logs instance `name` from now on. A failure is logged:
    /// it costs visibility, not enforcement.
    pub fn watch(&mut self, name: &str) {
        match Watched::open(name) {
            Ok(w) => {
                metrics::lock(&self.instances).insert(name.to_owned(), w);
            }
            Err(e) => tracing::warn!(instance = %name, error = %format!("{e:#}"), "no metrics or refusal log for it"),
        }
    }

    /// Exports instance `name` as configured but not attached (`true`), or
    /// stops (`false`).
    pub fn set_unattached(&mut self, name: &str, unattached: bool) {
        let mut set = self.unattached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if unattached {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Stops exporting instance `name`.
    pub fn unwatch(&mut self, name: &str) {
        metrics::lock(&self.instances).remove(name);
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        if let Some((_, task)) = self.metrics.take() {
            task.abort();
        }
    }
}

/// A thread that reads every watched instance's clients each interval and
/// logs who was refused.
struct RefusalLog {
    interval: Duration,
    lines: usize,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RefusalLog {
    fn start(instances: Instances, interval: Duration, lines: usize) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("connlimit-refusals".into())
            .spawn(move || {
                loop {
                    poll(&instances, interval, lines);
                    // Sleeps for the interval; a message or a hang-up ends it.
                    if !matches!(stopped.recv_timeout(interval), Err(mpsc::RecvTimeoutError::Timeout)) {
                        return;
                    }
                }
            })
            .ok();
        Self { interval, lines, stop: Some(stop), thread }
    }
}

impl Drop for RefusalLog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn poll(instances: &Instances, interval: Duration, lines: usize) {
    let mut instances = metrics::lock(instances);
    for (name, watched) in instances.iter_mut() {
        let i = &watched.instance;
        let refused = match i.clients() {
            Ok(clients) => watched.refusals.update(&clients, Instant::now()),
            Err(e) => {
                tracing::debug!(instance = %name, error = %e, "refusal log: cannot read");
                continue;
            }
        };
        if refused.is_empty() {
            continue;
        }
        // Read only when there is something to say: the port table has
        // 65,536 entries.
        match i.config().and_then(|config| Ok((config, i.ports()?))) {
            Ok((config, ports)) => refusals::log(name, &refused, &config, &ports, interval, lines),
            Err(e) => tracing::debug!(instance = %name, error = %e, "refusal log: cannot read"),
        }
    }
}
