//! Prometheus metrics: read from the kernel's maps at scrape time and served
//! at `/metrics` in the Prometheus text format. Labelled by instance only
//! (`connlimit_instance`, not `instance`, which is Prometheus's own target
//! label): a client address is never a label (it would make one series per
//! client). The statistics come from one table, [`Stat::ALL`].
//!
//! The endpoint is bounded, so that no client can exhaust the process (its
//! descriptors are shared with the 429 responder and the upkeep):
//! [`MAX_CONNECTIONS`] at once and [`MAX_PER_CLIENT`] per client address;
//! past the first, the connection that has waited longest for its request
//! is closed to make room (one being answered never is), past the second
//! the new one is closed at once. A request must arrive within
//! [`REQUEST_TIMEOUT`] and fit in [`MAX_REQUEST_BYTES`]; the response must
//! be taken within [`WRITE_TIMEOUT`]. Connections closed to make room
//! count until their descriptor is released, so the endpoint never holds
//! more than [`MAX_HELD`]. A connection that would use a descriptor of the
//! process's reserve ([`fds::reserve`]) is kept only in place of one that
//! waits for its request, and is otherwise closed at once; from then until
//! none has come in the reserve for [`REQUEST_TIMEOUT`], the endpoint
//! holds no more connections than it held then. A failed accept pauses
//! (never a spin). Scrapes
//! arriving together share one walk of the maps: at most one runs at a
//! time, and each scrape gets one that started after it arrived.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use connlimit::{
    Stat, StatKind, Stats,
    ebpf::{Instance, fds},
};
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
    task::{AbortHandle, JoinHandle},
};

/// Connections `/metrics` serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Descriptors `/metrics` holds at most: [`MAX_CONNECTIONS`] and those
/// closed to make room that the runtime has not released yet.
pub const MAX_HELD: usize = MAX_CONNECTIONS + MAX_CONNECTIONS / 4;
/// Connections `/metrics` holds at once from one client address.
pub const MAX_PER_CLIENT: usize = 8;
/// How long a client has, from its connection, to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request (line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The label naming the connlimit instance of a series. Not `instance`,
/// which Prometheus sets to the scraped target's address.
pub const INSTANCE_LABEL: &str = "connlimit_instance";

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
        for stat in Stat::ALL {
            let info = stat.info();
            let kind = match info.kind {
                StatKind::Counter => MetricType::Counter,
            };
            let mut family = encoder.encode_descriptor(info.metric, info.help, None, kind)?;
            for r in &readings {
                let label: Label = [(INSTANCE_LABEL, &r.name)];
                ConstCounter::new(r.stats.get(stat)).encode(family.encode_family(&label)?)?;
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
                let label: Label = [(INSTANCE_LABEL, &r.name)];
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
            ConstGauge::new(i64::from(r.enforcing))
                .encode(family.encode_family(&[(INSTANCE_LABEL, r.name.as_str())])?)?;
        }
        for name in self.1.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            ConstGauge::new(0i64).encode(family.encode_family(&[(INSTANCE_LABEL, name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "connlimit_map_fill_ratio",
            "How full a kernel map is, 0 to 1 (clients: client keys holding connections)",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            let labels = [(INSTANCE_LABEL, r.name.as_str()), ("map", "clients")];
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
    tracing::info!(
        %addr,
        max_connections = MAX_CONNECTIONS,
        max_per_client = MAX_PER_CLIENT,
        "serving metrics at http://{addr}/metrics"
    );
    let renders = Arc::new(Renders { instances, unattached, latest: tokio::sync::Mutex::new(None) });
    Ok(tokio::spawn(accept_loop(listener, renders)))
}

/// The connections being served, in the order they came (ids only grow).
#[derive(Default)]
struct Connections(BTreeMap<u64, Connection>, u64);

struct Connection {
    client: IpAddr,
    /// Its request has arrived: it is being answered, and is not closed to
    /// make room.
    answering: bool,
    /// Closed to make room: its task is aborted, and its descriptor is
    /// released when the runtime drops the task (then its entry goes).
    closing: bool,
    task: Option<AbortHandle>,
}

impl Connections {
    /// Entries being closed to make room.
    fn closing(&self) -> usize {
        self.0.values().filter(|c| c.closing).count()
    }
}

type Shared = Arc<Mutex<Connections>>;

fn lock_connections(connections: &Shared) -> std::sync::MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a connection from the table when its task ends, however it ends.
struct Entry(Shared, u64);

impl Drop for Entry {
    fn drop(&mut self) {
        lock_connections(&self.0).0.remove(&self.1);
    }
}

/// Why connections were closed unanswered since the last warning.
#[derive(Default)]
struct Turned {
    per_client: u64,
    full: u64,
    evicted: u64,
    reserve: u64,
    since: Option<Instant>,
}

impl Turned {
    /// Logs what was turned away, at most once a minute.
    fn warn_now_and_then(&mut self) {
        let now = Instant::now();
        if self.since.is_some_and(|since| now.duration_since(since) < Duration::from_secs(60)) {
            return;
        }
        if self.per_client + self.full + self.evicted + self.reserve > 0 {
            tracing::warn!(
                over_client_cap = self.per_client,
                over_cap = self.full,
                idle_closed_for_room = self.evicted,
                closed_for_fd_reserve = self.reserve,
                "metrics: connections closed unanswered (caps: {MAX_CONNECTIONS} at once, {MAX_PER_CLIENT} per client)"
            );
            *self = Self { since: Some(now), ..Self::default() };
        }
    }
}

async fn accept_loop(listener: TcpListener, renders: Arc<Renders>) {
    let connections = Shared::default();
    let mut pause = fds::AcceptPause::default();
    let mut turned = Turned::default();
    // Set while connections come in the descriptor reserve: the most the
    // endpoint holds meanwhile, and when one last came there.
    let mut tight: Option<(usize, Instant)> = None;
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                let (wait, starved) = pause.after_error(&e);
                if starved {
                    tracing::warn!(error = %e, pause_ms = wait.as_millis() as u64, "metrics: cannot accept; pausing");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        // Near the process's limit, a connection is kept only in place of
        // one that waits for its request: the rest is left to the
        // responder and the upkeep.
        pause.ok();
        let in_reserve = !fds::may_keep(conn.as_raw_fd());
        let client = connlimit::addr::canonical(peer.ip());
        {
            let mut table = lock_connections(&connections);
            let closing = table.closing();
            let live = table.0.len() - closing;
            // Near the process's limit the endpoint holds no more than it
            // did when it got there (a low descriptor freed later does not
            // mean there is room), until no connection has come in the
            // reserve for a request timeout.
            let now = Instant::now();
            if in_reserve {
                let cap = tight.map_or(live, |(cap, _)| cap.min(live));
                tight = Some((cap, now));
            } else if tight.is_some_and(|(_, since)| now.duration_since(since) > REQUEST_TIMEOUT) {
                tight = None;
            }
            let cap = tight.map_or(MAX_CONNECTIONS, |(cap, _)| cap.min(MAX_CONNECTIONS));
            if table.0.values().filter(|c| c.client == client && !c.closing).count() >= MAX_PER_CLIENT {
                turned.per_client += 1;
                refuse(conn);
            } else if table.0.len() >= MAX_HELD
                || (live >= cap
                    // When tight, a connection takes the place of one
                    // waiting for its request only once the last one
                    // closed for room is gone: the count stays put.
                    && ((tight.is_some() && closing > 0)
                        || evict_oldest_waiting(&mut table).inspect(|_| turned.evicted += 1).is_none()))
            {
                if tight.is_some() {
                    turned.reserve += 1;
                } else {
                    turned.full += 1;
                }
                refuse(conn);
            } else {
                let id = table.1;
                table.1 += 1;
                let entry = Entry(connections.clone(), id);
                let renders = renders.clone();
                let shared = connections.clone();
                // Spawned while the table is locked: its entry holds its
                // abort handle before anything can look for it.
                let task = tokio::spawn(async move {
                    let _entry = entry;
                    answer(conn, id, &shared, &renders).await;
                });
                let task = Some(task.abort_handle());
                table.0.insert(id, Connection { client, answering: false, closing: false, task });
            }
        }
        turned.warn_now_and_then();
    }
}

/// Closes the connection that has waited longest for its request, if one
/// is waiting.
fn evict_oldest_waiting(table: &mut Connections) -> Option<()> {
    let oldest = table.0.values_mut().find(|c| !c.answering && !c.closing)?;
    oldest.closing = true;
    if let Some(task) = &oldest.task {
        task.abort();
    }
    Some(())
}

/// Closes a connection over a cap at once, with a 503 if it fits in the
/// socket's buffer right away.
fn refuse(conn: TcpStream) {
    let body = "too many connections to the metrics endpoint\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.try_write(response.as_bytes());
}

/// The text of /metrics, or why there is none.
type Rendered = Arc<Result<String, String>>;

/// Walks of the maps, shared by the scrapes that arrive together.
struct Renders {
    instances: Instances,
    unattached: Unattached,
    /// The latest walk: when it started, and what it gave.
    latest: tokio::sync::Mutex<Option<(Instant, Rendered)>>,
}

impl Renders {
    /// The text of /metrics from a walk that started after `arrived`.
    async fn get(&self, arrived: Instant) -> Rendered {
        let mut latest = self.latest.lock().await;
        if let Some((started, text)) = latest.as_ref()
            && *started >= arrived
        {
            return text.clone();
        }
        let started = Instant::now();
        let (instances, unattached) = (self.instances.clone(), self.unattached.clone());
        // Walking the maps can take a while: off the event loop.
        let text = match tokio::task::spawn_blocking(move || render(&instances, &unattached)).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(format!("{e:#}\n")),
            Err(e) => Err(format!("{e}\n")),
        };
        let text = Arc::new(text);
        *latest = Some((started, text.clone()));
        text
    }
}

/// Reads one HTTP/1 request (within [`REQUEST_TIMEOUT`] and
/// [`MAX_REQUEST_BYTES`]), answers it (within [`WRITE_TIMEOUT`]) and closes
/// the connection.
async fn answer(mut conn: TcpStream, id: u64, connections: &Shared, renders: &Renders) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let complete = |head: &[u8]| head.windows(4).any(|w| w == b"\r\n\r\n");
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !complete(&head) && head.len() <= MAX_REQUEST_BYTES {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        // Closed, or silent for too long: close.
        return;
    }
    let arrived = Instant::now();
    if let Some(c) = lock_connections(connections).0.get_mut(&id) {
        c.answering = true;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let plain = "text/plain";
    let (status, content_type, body) = if !complete(&head) {
        ("431 Request Header Fields Too Large", plain, format!("a request is at most {MAX_REQUEST_BYTES} bytes\n"))
    } else {
        match (method, path) {
            (b"GET" | b"HEAD", b"/metrics") => match &*renders.get(arrived).await {
                Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text.clone()),
                Err(e) => ("500 Internal Server Error", plain, e.clone()),
            },
            (b"GET" | b"HEAD", b"/") => ("200 OK", plain, "connlimit: metrics at /metrics\n".to_owned()),
            (b"GET" | b"HEAD", _) => ("404 Not Found", plain, "not found; metrics are at /metrics\n".to_owned()),
            _ => ("405 Method Not Allowed", plain, "only GET is served\n".to_owned()),
        }
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != b"HEAD" {
        response.push_str(&body);
    }
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        conn.write_all(response.as_bytes()).await?;
        conn.shutdown().await
    })
    .await;
    if written.is_err() {
        tracing::debug!("metrics: a client did not take its response within {WRITE_TIMEOUT:?}");
    }
}
