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
        be inspected at any time. Needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and \
        CAP_DAC_READ_SEARCH (the last to reach the pins through a root-only /sys/fs/bpf; see \
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
        orphaned; `connlimit detach` removes it).\n\n\
        COMMAND is checked (a file that exists and is executable, or a command on PATH) before \
        anything is attached. `connlimit detach --name NAME` stops an exec'ed server too (the \
        SIGTERM is passed on to it); `connlimit set --name NAME -m 0` lifts the limit and stops \
        nothing.")]
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
    #[command(after_help = "Examples:\n  connlimit check-config --config /etc/connlimit/connlimit.toml\n  \
        connlimit check-config --syntax-only --config web-02.toml\n\n\
        --config FILE, as for serve; `connlimit check-config FILE` works too.\n\n\
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
        connlimit set --no-dry-run\n  \
        connlimit set --max-conns-total 5000 --network-limit 203.0.113.0/24=200 --network-limit 10.0.0.0/8=0\n  \
        connlimit set --refuse-with http-429\n\n\
        Fields not given keep their value. Lowering the limit closes nothing; it refuses new \
        connections until clients are back under it; `set -m 0` lifts the limit and stops nothing. \
        Prints each field that changed, old -> new (nothing if none did).\n\n\
        A network limit of 0 is an exempt prefix (the kernel keeps the two in one list, and `config` \
        shows such limits under exempt): --exempt and --no-exempt replace or clear them too, \
        --network-limit and --no-network-limit leave them alone.")]
    Set(SetArgs),
    /// Print the configuration of a running instance
    #[command(after_help = "Examples:\n  connlimit config\n  connlimit config --name api --json")]
    Config(ShowArgs),
    /// Show clients with open connections, most first
    #[command(
        visible_alias = "list",
        after_help = "Examples:\n  connlimit top\n  connlimit top --rows 10 --watch\n  connlimit list --json\n\n\
        Columns (per client key: an address, or a /LEN network with prefix grouping):\n  \
        OPEN          established connections counted now\n  \
        RESERVED      handshakes admitted and not yet established\n  \
        REFUSED       connections refused over the limit, including those ended right after their \
        handshake and dry-run's would-be refusals; kept while the key has handshake state (an LRU \
        map: a key quiet for long may be forgotten)\n  \
        ACCEPTED      connections established since the key last held none: it starts again at 0 \
        once the key's last connection closes (REFUSED does not)\n  \
        LAST REFUSED  (--sort refused) when this command last saw the key's REFUSED go up; `-` if it \
        has not seen a refusal since it started (the kernel keeps no time)\n\n\
        The footer's totals (--json: `totals`) are the instance's, since attach: `refused` counts \
        connections refused at their SYN, and dry-run's would-be refusals are apart (`dry-run \
        refusals`, `dry_run_refused`), so they need not add up to the clients' REFUSED."
    )]
    Top(TopArgs),
    /// List running instances: what they guard, since when, totals
    #[command(after_help = "Examples:\n  connlimit status\n  connlimit status --json\n\n\
        Columns, totals since attach: OPEN established connections now; ACCEPTED connections \
        admitted; REFUSED connections refused (dry-run's would-be refusals are `dry_run_refused` \
        in --json); PID the owning process (- for none); OBJECT the kernel object's hash \
        (`connlimit --version`); MODE enforcing, dry-run or not enforcing, the owner's state and \
        signs of trouble.\n\n\
        --json adds: total_open and total_refused (open connections across all clients, and \
        refusals because the total limit --max-conns-total was reached, also counted in refused \
        or dry_run_refused); responded and responder_missing (refusals answered with HTTP 429, \
        and those reset for want of a responder); steered (refusals another sk_lookup program \
        overrode); untracked (admitted uncounted: a map was full); ended (connections ended \
        right after their handshake: judged over the limit then, or a full map with --when-full \
        closed); unconfirmed (handshake reservations released because no listener of the guarded \
        cgroup took the packet: nothing listening yet, stray packets, or a listener outside the \
        cgroup; harmless unless it grows with real traffic); endings_lost (connections to end \
        that connlimit was not told of: its ring buffer was full).")]
    Status(JsonArg),
    /// Stop enforcing: detach an instance and remove its pins
    #[command(after_help = "Examples:\n  connlimit detach\n  connlimit detach --name api\n\n\
        A running `run` or `exec` owning the instance is asked to stop (SIGTERM; only if its PID \
        still names the process that started it, so a reused PID is never signalled). An `exec` \
        passes that SIGTERM on to its server: detaching an `exec` instance stops its server too, \
        and says so. To lift a limit and stop nothing, use `connlimit set --name NAME -m 0` \
        (counting goes on). An orphaned or persisted instance is removed directly, as is any \
        instance with --force. `connlimit detach NAME` works too.")]
    Detach(DetachArgs),
    /// Write shell completions (bash, zsh, fish) and man pages for this CLI into a folder
    /// (for packagers; `cargo xtask dist` puts them in the release files)
    #[command(hide = true)]
    GenerateAssets(GenerateAssetsArgs),
}

#[derive(Args, Debug)]
pub struct GenerateAssetsArgs {
    /// The folder to write `completions/` and `man/` into (made if missing)
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
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
    /// Count and report what would be refused, refuse nothing (as `set --dry-run`; `--dry-run false` is the default)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value_t = false, default_missing_value = "true", hide_possible_values = true, hide_default_value = true, action = clap::ArgAction::Set)]
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
#[command(override_usage = "connlimit check-config [OPTIONS] --config <FILE>")]
#[command(group = clap::ArgGroup::new("service_file").required(true).multiple(false))]
pub struct CheckConfigArgs {
    /// The service file (TOML) to check
    #[arg(long, short = 'c', value_name = "FILE", group = "service_file")]
    pub config: Option<PathBuf>,
    /// The service file, given without --config (the spelling of 0.1.0)
    #[arg(value_name = "FILE", hide = true, group = "service_file")]
    pub file: Option<PathBuf>,
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
    /// Replace the exempt prefixes (network limits of 0 included) with these (repeat for several)
    #[arg(long = "exempt", value_name = "CIDR", conflicts_with = "no_exempt")]
    pub exempt: Vec<Cidr>,
    /// Remove all exempt prefixes (network limits of 0 included)
    #[arg(long, alias = "no-exempts")]
    pub no_exempt: bool,
    /// Replace the network limits above 0 with these, CIDR=N (repeat for several; CIDR=0 adds an exempt prefix)
    #[arg(long = "network-limit", value_name = "CIDR=N", conflicts_with = "no_network_limit")]
    pub network_limits: Vec<NetworkLimit>,
    /// Remove all network limits above 0 (`--no-network-limits` is an old name for it)
    #[arg(long, alias = "no-network-limits")]
    pub no_network_limit: bool,
    /// New total limit across all clients; 0 = none
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_CONNS_TOTAL as i64))]
    pub max_conns_total: Option<u32>,
    /// Count and report what would be refused, refuse nothing (`--dry-run true|false` also works)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", hide_possible_values = true, conflicts_with = "no_dry_run")]
    pub dry_run: Option<bool>,
    /// Leave dry-run mode: refuse over the limit again
    #[arg(long)]
    pub no_dry_run: bool,
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
    #[command(flatten)]
    pub name: NameArg,
    /// The instance's name, given without --name (the spelling of 0.1.0)
    #[arg(value_name = "NAME", hide = true, conflicts_with = "name")]
    pub positional_name: Option<String>,
    /// Remove the pins directly, without asking a running owner to stop, whatever connlimit version pinned them
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("connlimit").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn long_help(sub: &str) -> String {
        Cli::command().find_subcommand_mut(sub).unwrap().render_long_help().to_string()
    }

    #[test]
    fn dry_run_is_a_switch_everywhere_and_true_or_false_still_parse() {
        let set = |args: &[&str]| match parse(&[&["set"], args].concat()) {
            Command::Set(a) => (a.dry_run, a.no_dry_run),
            _ => unreachable!(),
        };
        assert_eq!(set(&["--dry-run"]), (Some(true), false));
        assert_eq!(set(&["--dry-run", "true"]), (Some(true), false));
        assert_eq!(set(&["--dry-run", "false"]), (Some(false), false));
        assert_eq!(set(&["--dry-run=false"]), (Some(false), false));
        assert_eq!(set(&["--dry-run", "--name", "x"]), (Some(true), false));
        assert_eq!(set(&["--no-dry-run"]), (None, true));
        assert!(Cli::try_parse_from(["connlimit", "set", "--dry-run", "--no-dry-run"]).is_err());
        assert!(Cli::try_parse_from(["connlimit", "set", "--dry-run", "maybe"]).is_err());
        let run = |extra: &[&str]| {
            let args = [&["run", "-p", "80", "-m", "1", "--pid", "1"], extra].concat();
            match parse(&args) {
                Command::Run(a) => a.limits.dry_run,
                _ => unreachable!(),
            }
        };
        assert!(!run(&[]));
        assert!(run(&["--dry-run"]));
        assert!(run(&["--dry-run", "true"]));
        assert!(!run(&["--dry-run", "false"]));
    }

    #[test]
    fn detach_takes_name_like_every_command_and_still_a_positional_name() {
        let name = |args: &[&str]| match parse(&[&["detach"], args].concat()) {
            Command::Detach(a) => a.positional_name.unwrap_or(a.name.name),
            _ => unreachable!(),
        };
        assert_eq!(name(&[]), "default");
        assert_eq!(name(&["--name", "api"]), "api");
        assert_eq!(name(&["api"]), "api");
        assert_eq!(name(&["api", "--force"]), "api");
        assert!(Cli::try_parse_from(["connlimit", "detach", "--name", "a", "b"]).is_err());
        let help = long_help("detach");
        assert!(help.contains("--name <NAME>") && !help.contains("[NAME]"), "{help}");
    }

    #[test]
    fn check_config_takes_config_like_serve_and_still_a_positional_file() {
        let file = |args: &[&str]| match parse(&[&["check-config"], args].concat()) {
            Command::CheckConfig(a) => a.config.or(a.file).unwrap(),
            _ => unreachable!(),
        };
        for args in [&["--config", "f.toml"][..], &["-c", "f.toml"], &["f.toml"], &["--syntax-only", "f.toml"]] {
            assert_eq!(file(args), std::path::Path::new("f.toml"), "{args:?}");
        }
        assert!(Cli::try_parse_from(["connlimit", "check-config"]).is_err());
        assert!(Cli::try_parse_from(["connlimit", "check-config", "--config", "a", "b"]).is_err());
        let help = long_help("check-config");
        assert!(help.contains("--config <FILE>") && !help.contains("|FILE"), "{help}");
    }

    #[test]
    fn clearing_flags_are_named_after_the_flag_they_clear_and_old_names_work() {
        for flag in ["--no-network-limit", "--no-network-limits"] {
            let Command::Set(a) = parse(&["set", flag]) else { unreachable!() };
            assert!(a.no_network_limit, "{flag}");
        }
        for flag in ["--no-exempt", "--no-exempts"] {
            let Command::Set(a) = parse(&["set", flag]) else { unreachable!() };
            assert!(a.no_exempt, "{flag}");
        }
        let help = long_help("set");
        assert!(help.contains("--no-network-limit ") && help.contains("--no-dry-run"), "{help}");
    }

    #[test]
    fn help_names_every_capability_the_unit_grants() {
        let unit = include_str!("../../../../contrib/connlimit.service");
        let granted = unit.lines().find_map(|l| l.strip_prefix("AmbientCapabilities=")).unwrap();
        let help = Cli::command().render_long_help().to_string();
        for cap in granted.split_whitespace() {
            assert!(help.contains(cap), "--help does not name {cap}, which contrib/connlimit.service grants");
        }
        assert_eq!(granted.split_whitespace().count(), 4);
    }
}
