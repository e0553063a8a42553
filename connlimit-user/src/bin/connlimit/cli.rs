//! The command line: every subcommand, flag and help text.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use connlimit::{
    Cidr, MAX_CONNS_PER_CLIENT_IP, MAX_CONNS_TOTAL, NetworkLimit,
    ebpf::{RefuseWith, WhenFull},
};

/// `connlimit --version`: the release, the commit it was built from, and the
/// kernel object it loads (the hash `status` shows for each instance).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit ",
    env!("CONNLIMIT_GIT_COMMIT"),
    "\nkernel object ",
    env!("CONNLIMIT_BPF_OBJECT_HASH"),
);

/// Limits concurrent TCP connections per client IP, in the kernel, for any server.
#[derive(Parser, Debug)]
#[command(
    name = "connlimit",
    version = VERSION,
    about = "Limit concurrent TCP connections per client IP, in the kernel, for any server",
    long_about = "Limit concurrent TCP connections per client IP, in the kernel, for any server.\n\n\
        connlimit counts each client's established connections to the guarded ports (eBPF sock_ops \
        on the server's cgroup) and refuses a client's connection over the limit with an immediate \
        reset, before the server process sees it (eBPF sk_lookup). Limits change live; counts can \
        be inspected at any time. Needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, see \
        contrib/connlimit.service), a cgroup v2 hierarchy and bpffs at /sys/fs/bpf \
        (pins go to /sys/fs/bpf/connlimit, or $CONNLIMIT_PIN_ROOT: a directory on bpffs owned by \
        root or by the user connlimit runs as, that nobody else can write).\n\n\
        The kernel keeps enforcing if connlimit crashes: `status` then says \"orphaned\", the same \
        `run` command adopts the instance with its counts, and `detach` removes it.",
    after_help = "Examples:\n  \
        connlimit exec --port 8080 --max-conns-per-client-ip 10 --user nobody -- python3 -m http.server 8080\n  \
        connlimit run --port 443 --max-conns-per-client-ip 50 --pid $(pidof nginx | cut -d' ' -f1)\n  \
        connlimit set --max-conns-per-client-ip 20\n  \
        connlimit top --watch"
)]
pub struct Cli {
    /// Log lines as text for people or as JSON objects for log shippers
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (to stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    // One human-readable line per event. (Plain comments: doc comments
    // would turn every command's --help into the long form.)
    Text,
    // One JSON object per line, the event's fields at the top level.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enforce a limit on a running server until interrupted
    #[command(after_help = "Examples:\n  \
        connlimit run --port 8080 --max-conns-per-client-ip 10 --pid 1234\n  \
        connlimit run --port 80 --port 443 --max-conns-per-client-ip 50 --cgroup /sys/fs/cgroup/system.slice/nginx.service\n  \
        connlimit run --name api --port 8080 --max-conns-per-client-ip 10 --pid 1234 --persist\n  \
        connlimit run --port 80 --max-conns-per-client-ip 50 --unit nginx.service\n  \
        connlimit run --port 8080 --max-conns-per-client-ip 10 --pid $(docker inspect -f '{{.State.Pid}}' web)\n  \
        connlimit run --port 443 -m 20 --max-conns-total 5000 --network-limit 203.0.113.0/24=200 --pid 1234\n\n\
        --unit finds the unit's cgroup with `systemctl show`. A server in the root cgroup (one started \
        by hand outside any service manager) shares it with every process on the host: connlimit \
        then counts all of their connections to the guarded ports, and warns.\n\n\
        Stops on SIGINT, SIGTERM or SIGHUP (a closed terminal) and detaches, unless --persist was \
        given: then enforcement stays pinned, owned by nobody. If connlimit is killed or crashes, \
        the kernel keeps enforcing the last config and `status` says \"orphaned\"; running the \
        same command again (same --name, cgroup and namespace) adopts the instance, counts \
        intact, as does a later `run` after --persist.")]
    Run(RunArgs),
    /// Start a server in a fresh cgroup, under a limit, and exit with its status
    #[command(after_help = "Examples:\n  \
        connlimit exec --port 8080 --max-conns-per-client-ip 10 --user nobody -- python3 -m http.server 8080\n  \
        connlimit exec --port 6379 --max-conns-per-client-ip 20 --exempt 10.0.0.0/8 --user redis -- redis-server\n  \
        connlimit exec --port 80 --max-conns-per-client-ip 50 --pid-file /run/nginx.pid -- nginx\n  \
        connlimit exec --port 8080 -m 10 --refuse-with http-429 --user nobody -- python3 -m http.server 8080\n\n\
        connlimit follows the server's cgroup, as a service manager does: a server that daemonizes \
        (its first process exits with status 0, leaving others behind) stays guarded until the \
        cgroup is empty. The server runs in its own process group: SIGINT (Ctrl-C), SIGTERM and \
        SIGHUP reach connlimit, which passes each on once: to the PID in --pid-file if it names a \
        process of the cgroup, else to the first process while it runs, else to every process in \
        the cgroup. connlimit stops no process by itself; it detaches once the cgroup is empty.\n\n\
        Exit status: the first process's if it failed; else that of the server's main process (the \
        PID in --pid-file, else the last process connlimit reaped: it adopts the orphans a daemon \
        leaves), 0 if none was seen; 128 + signal number for a process killed by a signal. If \
        connlimit is killed, the server keeps running under the limit (the instance is left \
        orphaned; `connlimit detach` removes it).")]
    Exec(ExecArgs),
    /// Run every instance a service file lists, as a long-lived service
    #[command(after_help = "Examples:\n  \
        connlimit serve --config /etc/connlimit/connlimit.toml\n  \
        connlimit serve --config /etc/connlimit/connlimit.toml --metrics-listen 127.0.0.1:9100\n\n\
        SIGHUP rereads the file and applies it live: limits and ports change without dropping a \
        connection, instances are added and removed. A file with errors is reported and the \
        running configuration kept; an instance whose new settings cannot be applied keeps \
        enforcing its old ones. An instance whose target is missing (a cgroup not made yet, a \
        unit not started) is reported and attached when it appears; the others enforce \
        meanwhile. serve exits with status 1 only when no instance can enforce. A guarded cgroup \
        removed and made again (a service restart) is followed. Under systemd (Type=notify) \
        READY=1 is sent once every instance enforces; until then STATUS= names those that do \
        not. See contrib/connlimit.toml and contrib/connlimit.service.")]
    Serve(ServeArgs),
    /// Check a service file without attaching anything
    #[command(after_help = "Examples:\n  connlimit check-config /etc/connlimit/connlimit.toml\n  \
        connlimit check-config --syntax-only web-02.toml\n\n\
        Prints one error per problem, with its line, and exits with status 1 if there is any. \
        Then checks the file against this machine: each cgroup exists and is cgroup v2, each unit \
        is known to systemd (when systemd runs), each \
        pid exists, and no port is guarded twice in one network namespace. --syntax-only skips \
        that, for a file meant for another machine.")]
    CheckConfig(CheckConfigArgs),
    /// Change the live configuration of a running instance
    #[command(after_help = "Examples:\n  \
        connlimit set --max-conns-per-client-ip 20\n  \
        connlimit set --name api --ipv6-prefix-len 64 --exempt 10.0.0.0/8 --exempt 192.0.2.7\n  \
        connlimit set --dry-run false\n  \
        connlimit set --max-conns-total 5000 --network-limit 203.0.113.0/24=200 --network-limit 10.0.0.0/8=0\n  \
        connlimit set --refuse-with http-429\n\n\
        Fields not given keep their value. Lowering the limit closes nothing; it refuses new \
        connections until clients are back under it.")]
    Set(SetArgs),
    /// Print the configuration of a running instance
    #[command(after_help = "Examples:\n  connlimit config\n  connlimit config --name api --json")]
    Config(ShowArgs),
    /// Show clients with open connections, most first
    #[command(
        visible_alias = "list",
        after_help = "Examples:\n  connlimit top\n  connlimit top --rows 10 --watch\n  connlimit list --json"
    )]
    Top(TopArgs),
    /// List running instances: what they guard, since when, totals
    #[command(after_help = "Examples:\n  connlimit status\n  connlimit status --json")]
    Status(JsonArg),
    /// Stop enforcing: detach an instance and remove its pins
    #[command(after_help = "Examples:\n  connlimit detach\n  connlimit detach api\n\n\
        A running `run` or `exec` owning the instance is asked to stop (SIGTERM; only if its PID \
        still names the process that started it, so a reused PID is never signalled). An \
        orphaned or persisted instance is removed directly, as is any instance with --force.")]
    Detach(DetachArgs),
}

/// Which instance a command talks to.
#[derive(Args, Debug, Clone)]
pub struct NameArg {
    /// Instance name (several instances can guard different ports side by side)
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct JsonArg {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// The limits, shared by `run` and `exec`.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Local TCP port to guard (repeat for several)
    #[arg(long = "port", short = 'p', required = true, value_name = "PORT", value_parser = port)]
    pub ports: Vec<u16>,
    /// Most concurrent connections per client; 0 = unlimited (count only)
    #[arg(long, short = 'm', value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_CONNS_PER_CLIENT_IP as i64))]
    pub max_conns_per_client_ip: u32,
    /// Count IPv4 clients per /LEN network (32 = per address)
    #[arg(long, default_value_t = connlimit::DEFAULT_IPV4_PREFIX_LEN, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=32))]
    pub ipv4_prefix_len: u8,
    /// Count IPv6 clients per /LEN network (64, the default, makes a host one client however many addresses it uses; 128 = per address)
    #[arg(long, default_value_t = connlimit::DEFAULT_IPV6_PREFIX_LEN, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=128))]
    pub ipv6_prefix_len: u8,
    /// Never limit clients in this prefix, e.g. health checkers (repeat for several)
    #[arg(long = "exempt", value_name = "CIDR")]
    pub exempt: Vec<Cidr>,
    /// Per-client limit N for clients in CIDR, e.g. 203.0.113.0/24=200; the longest prefix wins, 0 = unlimited (repeat for several)
    #[arg(long = "network-limit", value_name = "CIDR=N")]
    pub network_limits: Vec<NetworkLimit>,
    /// Most concurrent connections across all clients; 0 = no total limit
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_CONNS_TOTAL as i64))]
    pub max_conns_total: u32,
    /// Count and report what would be refused, refuse nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Milliseconds an unfinished handshake may hold a slot: a spoofed SYN blocks a slot for 1-2 of these
    #[arg(long, default_value_t = connlimit::ebpf::DEFAULT_RESERVATION_EPOCH.as_millis() as u64, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub reservation_epoch_ms: u64,
    /// When a connection cannot be counted because a map is full: `closed` ends it, `open` admits it uncounted
    #[arg(long, default_value_t = WhenFull::Closed, value_name = "POLICY")]
    pub when_full: WhenFull,
    /// How to refuse: `reset` (TCP reset) or `http-429` (connlimit answers HTTP 429 Too Many Requests; a reset while connlimit is not running)
    #[arg(long, default_value_t = RefuseWith::Reset, value_name = "HOW")]
    pub refuse_with: RefuseWith,
}

/// The most `top --rows` shows.
pub const MAX_TOP_ROWS: usize = 1_000_000;
/// Bounds of `top --interval`, in seconds.
pub const TOP_INTERVAL: std::ops::RangeInclusive<f64> = 0.1..=86_400.0;
/// The highest PID Linux hands out (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PID: u32 = 1 << 22;

/// Seconds between `top` refreshes: a finite number in [`TOP_INTERVAL`].
pub fn interval(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) if TOP_INTERVAL.contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{s:?} is not a refresh interval; give seconds from {} to {}",
            TOP_INTERVAL.start(),
            TOP_INTERVAL.end()
        )),
    }
}

fn top_rows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_TOP_ROWS).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of rows; give 1 to {MAX_TOP_ROWS}")),
    }
}

fn pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=MAX_PID).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a process id; give 1 to {MAX_PID}")),
    }
}

/// `USER[:GROUP]`, checked for shape here and resolved at run time.
fn user_spec(s: &str) -> Result<String, String> {
    let (user, group) = s.split_once(':').map_or((s, None), |(u, g)| (u, Some(g)));
    let ok = |n: &str| !n.is_empty() && n.len() <= 256 && !n.contains('\0');
    if ok(user) && group.is_none_or(ok) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not USER or USER:GROUP (names or numeric ids)"))
    }
}

/// A systemd unit name: no path, no option, nothing systemctl would read
/// as something else.
fn unit_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b));
    if ok { Ok(s.to_owned()) } else { Err(format!("{s:?} is not a systemd unit name, e.g. nginx.service")) }
}

fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a TCP port; give 1 to 65535")),
        Ok(p) => Ok(p),
    }
}

/// What a long-running `run`, `exec` or `serve` reports besides enforcing.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100 (no authentication: use
    /// loopback or an internal address; at most 64 connections, 8 per client)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds between refusal log lines (one per refused client); 0 = off
    #[arg(long, default_value_t = crate::config_file::DEFAULT_REFUSAL_INTERVAL_SECS, value_name = "SECONDS")]
    pub refusal_log_interval: u64,
    /// Most refusal log lines per interval; the rest are summed up in one line
    #[arg(long, default_value_t = crate::config_file::DEFAULT_REFUSAL_LINES, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub refusal_log_lines: usize,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The service file (TOML) listing the instances to run
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides metrics_listen in the file; use
    /// loopback or an internal address)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct CheckConfigArgs {
    /// The service file to check
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Check the file alone, not its targets on this machine (cgroups,
    /// processes, ports shared in a network namespace): for a file meant
    /// for another machine
    #[arg(long)]
    pub syntax_only: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
pub struct RunArgs {
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub report: ReportArgs,
    /// Count the connections of the processes in this cgroup v2 directory
    #[arg(long, value_name = "PATH", group = "target")]
    pub cgroup: Option<PathBuf>,
    /// Count the connections of this process's cgroup (and refuse in its network namespace)
    #[arg(long, value_name = "PID", value_parser = pid, group = "target")]
    pub pid: Option<u32>,
    /// Count the connections of this systemd unit's cgroup (and refuse in its main process's network namespace)
    #[arg(long, value_name = "UNIT", value_parser = unit_name, group = "target")]
    pub unit: Option<String>,
    /// Keep enforcing after connlimit exits, even gracefully (detach later with `connlimit detach`)
    #[arg(long)]
    pub persist: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Run the server as this user (and its groups, or GROUP), not as root
    #[arg(long, short = 'u', value_name = "USER[:GROUP]", value_parser = user_spec)]
    pub user: Option<String>,
    /// The server's main PID is in FILE (e.g. nginx's `pid` file): signals are passed to it alone
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
    /// The server command and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// New limit per client; 0 = unlimited
    #[arg(long, short = 'm', value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_CONNS_PER_CLIENT_IP as i64))]
    pub max_conns_per_client_ip: Option<u32>,
    /// New IPv4 grouping prefix length
    #[arg(long, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=32))]
    pub ipv4_prefix_len: Option<u8>,
    /// New IPv6 grouping prefix length
    #[arg(long, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=128))]
    pub ipv6_prefix_len: Option<u8>,
    /// Replace the exempt prefixes with these (repeat for several)
    #[arg(long = "exempt", value_name = "CIDR", conflicts_with = "no_exempt")]
    pub exempt: Vec<Cidr>,
    /// Remove all exempt prefixes
    #[arg(long)]
    pub no_exempt: bool,
    /// Replace the network limits with these, CIDR=N (repeat for several)
    #[arg(long = "network-limit", value_name = "CIDR=N", conflicts_with = "no_network_limits")]
    pub network_limits: Vec<NetworkLimit>,
    /// Remove all network limits
    #[arg(long)]
    pub no_network_limits: bool,
    /// New total limit across all clients; 0 = none
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_CONNS_TOTAL as i64))]
    pub max_conns_total: Option<u32>,
    /// Turn dry-run mode on or off
    #[arg(long, value_name = "BOOL")]
    pub dry_run: Option<bool>,
    /// New full-map policy: `closed` ends a connection that cannot be counted, `open` admits it uncounted
    #[arg(long, value_name = "POLICY")]
    pub when_full: Option<WhenFull>,
    /// How to refuse from now on: `reset` or `http-429` (answered by the process running the instance)
    #[arg(long, value_name = "HOW")]
    pub refuse_with: Option<RefuseWith>,
    /// Replace the guarded ports with these (repeat for several)
    #[arg(long = "port", short = 'p', value_name = "PORT", value_parser = port)]
    pub ports: Vec<u16>,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Show at most N clients (`--limit` is an old name for it)
    #[arg(long, short = 'n', alias = "limit", value_name = "N", default_value_t = 20, value_parser = top_rows)]
    pub rows: usize,
    /// Also show clients with nothing open but refusals on record
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Order: most open first, or most recently refused first (compares two readings --interval apart)
    #[arg(long, value_enum, default_value_t = TopSort::Open, value_name = "ORDER")]
    pub sort: TopSort,
    /// Refresh like top until interrupted
    #[arg(long, short = 'w', conflicts_with = "json")]
    pub watch: bool,
    /// Seconds between refreshes with --watch, and between the two readings of --sort refused (0.1 to 86400)
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = interval)]
    pub interval: f64,
    #[command(flatten)]
    pub json: JsonArg,
}

/// How `top` orders clients.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopSort {
    // Most open connections first.
    Open,
    // Refused most recently first (see --sort).
    Refused,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// Instance to detach
    #[arg(default_value = "default", value_name = "NAME")]
    pub name: String,
    /// Remove the pins directly, without asking a running owner to stop, whatever connlimit version pinned them
    #[arg(long)]
    pub force: bool,
}
