//! Prometheus metrics: read from the kernel's maps at scrape time and served
//! at `/metrics` in the Prometheus text format. Labelled by instance only:
//! a client address is never a label (it would make one series per client).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result};
use connlimit::{Stats, ebpf::Instance};
use connlimit_common::maps::names;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// An instance whose figures are exported and refusals logged, with its
/// maps' capacities.
pub struct Watched {
    pub instance: Instance,
    /// Refusal counters as last read: the first reading is taken when
    /// watching begins, so refusals right after attaching are news.
    pub refusals: crate::refusals::Tracker,
    clients_capacity: u32,
}

impl Watched {
    /// Opens instance `name`'s pins.
    pub fn open(name: &str) -> Result<Self> {
        let instance = Instance::open(name)?;
        let capacity = |map: &str| -> Result<u32> {
            let path = Instance::dir_of(name).join(map);
            Ok(aya::maps::MapInfo::from_pin(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .max_entries())
        };
        let mut refusals = crate::refusals::Tracker::default();
        refusals.update(&instance.clients()?, std::time::Instant::now());
        Ok(Self { instance, refusals, clients_capacity: capacity(names::CLIENTS)? })
    }
}

/// The instances a process exports, by name; shared with whoever adds and
/// removes them (`serve` on reload).
pub type Instances = Arc<Mutex<BTreeMap<String, Watched>>>;

/// Instances a process should enforce but has not attached (a `serve`
/// instance waiting for its target): exported as not enforcing.
pub type Unattached = Arc<Mutex<std::collections::BTreeSet<String>>>;

/// Locks the shared instances, even if a thread panicked holding them.
pub fn lock(instances: &Instances) -> std::sync::MutexGuard<'_, BTreeMap<String, Watched>> {
    instances.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One instance's figures, read in one go.
struct Reading {
    name: String,
    stats: Stats,
    open: u64,
    clients: u64,
    limit: u32,
    total_limit: u32,
    keys: u64,
    keys_capacity: u32,
    enforcing: bool,
}

fn read(name: &str, w: &Watched) -> Result<Reading> {
    let clients = w.instance.clients()?;
    Ok(Reading {
        name: name.to_owned(),
        stats: w.instance.stats()?,
        open: clients.iter().map(|c| u64::from(c.open)).sum(),
        clients: clients.iter().filter(|c| c.open > 0 || c.reserved > 0).count() as u64,
        limit: w.instance.config()?.max_conns_per_client_ip,
        total_limit: w.instance.config()?.max_conns_total,
        keys: clients.len() as u64,
        keys_capacity: w.clients_capacity,
        enforcing: w.instance.enforcing()? != Some(false),
    })
}

#[derive(Debug)]
struct Kernel(Instances, Unattached);

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("instance", &self.instance).finish_non_exhaustive()
    }
}

type Label<'a> = [(&'static str, &'a str); 1];
/// A metric family: name, help, and how to get its value.
type Family<T, V> = (&'static str, &'static str, fn(&T) -> V);

impl Collector for Kernel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings: Vec<Reading> = lock(&self.0)
            .iter()
            .filter_map(|(name, w)| {
                read(name, w).map_err(|e| tracing::warn!(instance = %name, error = %e, "metrics: cannot read")).ok()
            })
            .collect();
        let counters: [Family<Stats, u64>; 8] = [
            ("connlimit_accepted", "Connections admitted and counted", |s| s.accepted),
            ("connlimit_refused", "Connections refused because their client was at the limit", |s| s.refused),
            ("connlimit_dry_run_refused", "Connections over the limit that dry-run mode let through", |s| {
                s.dry_run_refused
            }),
            ("connlimit_untracked", "Connections admitted uncounted because a kernel map was full", |s| s.untracked),
            ("connlimit_steered", "Refusals overridden by another sk_lookup program steering the connection", |s| {
                s.steered
            }),
            ("connlimit_total_limit_refused", "Connections refused because the instance was at its total limit", |s| {
                s.total_refused
            }),
            ("connlimit_responded", "Refused connections answered with HTTP 429 by the responder", |s| s.responded),
            ("connlimit_responder_missing", "Refusals reset because no process held the 429 responder", |s| {
                s.responder_missing
            }),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in &readings {
                let label: Label = [("instance", &r.name)];
                ConstCounter::new(value(&r.stats)).encode(family.encode_family(&label)?)?;
            }
        }
        let gauges: [Family<Reading, i64>; 4] = [
            ("connlimit_open_connections", "Established connections counted now", |r| r.open as i64),
            ("connlimit_clients", "Client keys holding at least one connection", |r| r.clients as i64),
            ("connlimit_max_conns_per_client", "The limit per client key (0 = no limit)", |r| i64::from(r.limit)),
            ("connlimit_total_limit", "The limit across all clients (0 = no limit)", |r| i64::from(r.total_limit)),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &readings {
                let label: Label = [("instance", &r.name)];
                ConstGauge::new(value(r)).encode(family.encode_family(&label)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "connlimit_enforcing",
            "1 while the kernel enforces the instance, 0 while its guarded cgroup is gone or it is not attached",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            ConstGauge::new(i64::from(r.enforcing)).encode(family.encode_family(&[("instance", r.name.as_str())])?)?;
        }
        for name in self.1.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            ConstGauge::new(0i64).encode(family.encode_family(&[("instance", name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "connlimit_map_fill_ratio",
            "How full a kernel map is, 0 to 1 (clients: client keys holding connections)",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            let labels = [("instance", r.name.as_str()), ("map", "clients")];
            let ratio = if r.keys_capacity == 0 { 0.0 } else { r.keys as f64 / f64::from(r.keys_capacity) };
            ConstGauge::new(ratio).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The text of /metrics now.
pub fn render(instances: &Instances, unattached: &Unattached) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Kernel(instances.clone(), unattached.clone())));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).context("encoding metrics")?;
    Ok(text)
}

/// Binds `addr` and serves /metrics on the current tokio runtime until the
/// returned task is aborted.
pub fn serve(addr: SocketAddr, instances: Instances, unattached: Unattached) -> Result<JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} for metrics; pick a free address with --metrics-listen"))?;
    std_listener.set_nonblocking(true).context("setting up the metrics listener")?;
    let listener = TcpListener::from_std(std_listener).context("setting up the metrics listener")?;
    tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let (instances, unattached) = (instances.clone(), unattached.clone());
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(Duration::from_secs(10), answer(conn, instances, unattached)).await
                {
                    tracing::debug!(error = %e, "metrics request timed out");
                }
            });
        }
    }))
}

/// Answers one HTTP/1 request and closes the connection.
async fn answer(mut conn: TcpStream, instances: Instances, unattached: Unattached) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => {
            // Walking the maps can take a while: off the event loop.
            match tokio::task::spawn_blocking(move || render(&instances, &unattached)).await {
                Ok(Ok(text)) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                Ok(Err(e)) => ("500 Internal Server Error", "text/plain", format!("{e:#}\n")),
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            }
        }
        (b"GET" | b"HEAD", b"/") => ("200 OK", "text/plain", "connlimit: metrics at /metrics\n".to_owned()),
        (b"GET" | b"HEAD", _) => ("404 Not Found", "text/plain", "not found; metrics are at /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET is served\n".to_owned()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != b"HEAD" {
        response.push_str(&body);
    }
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}
