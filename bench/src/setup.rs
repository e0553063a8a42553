//! One configuration under test, set up in a fresh network namespace and
//! torn down with it (the namespace takes its iptables/nftables rules along).

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfLimiter},
};
use harness::{Background, Netns, TestCgroup, unique};

use crate::drop_floor::DropFloor;

/// The guarded port.
pub const PORT: u16 = 9000;
/// Where the server listens for [`Kind::ClosedPort`], leaving [`PORT`] closed.
const CLOSED_PORT_SERVER: u16 = PORT + 1;
/// The port [`Kind::HooksOnly`] guards: nothing listens or connects there.
const IDLE_PORT: u16 = PORT + 2;

/// What stands between the clients and the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing: the baseline.
    Baseline,
    /// connlimit's eBPF programs.
    Connlimit,
    /// connlimit's programs attached but guarding another port, so they
    /// return before touching any client's state: what the hooks alone
    /// cost, the floor of any limiter built on them.
    HooksOnly,
    /// `iptables -m connlimit ... -j REJECT --reject-with tcp-reset`.
    Iptables,
    /// nftables `ct count over N` in a dynamic set, `reject with tcp reset`.
    Nftables,
    /// The user-space `Limiter` in the server's accept loop (tokio server only).
    Userspace,
    /// No listener on the guarded port: the kernel's own RST, the floor of
    /// what refusing can cost.
    ClosedPort,
    /// A minimal sk_lookup program that refuses every SYN for the guarded
    /// port and counts nothing ([`DropFloor`]): the floor of refusing in
    /// that hook.
    DropFloor,
}

impl Kind {
    /// Churn configurations in front of the minimal server.
    pub const MINIMAL: [Kind; 5] = [Kind::Baseline, Kind::Connlimit, Kind::HooksOnly, Kind::Iptables, Kind::Nftables];
    /// Scale configurations (minimal server; the hooks alone touch no map,
    /// so a full one cannot change them).
    pub const SCALE: [Kind; 4] = [Kind::Baseline, Kind::Connlimit, Kind::Iptables, Kind::Nftables];
    /// Churn configurations in front of the tokio server.
    pub const TOKIO: [Kind; 5] = [Kind::Baseline, Kind::Connlimit, Kind::Iptables, Kind::Nftables, Kind::Userspace];
    /// The limiters, for bursts and floods.
    pub const LIMITERS: [Kind; 4] = [Kind::Connlimit, Kind::Iptables, Kind::Nftables, Kind::Userspace];
    /// Refusal rate: the closed port first (the reference of every ratio),
    /// the other floor, then the kernel limiters.
    pub const REFUSERS: [Kind; 5] =
        [Kind::ClosedPort, Kind::DropFloor, Kind::Connlimit, Kind::Iptables, Kind::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "no limiter",
            Kind::Connlimit => "connlimit (eBPF)",
            Kind::HooksOnly => "connlimit's hooks only",
            Kind::Iptables => "iptables connlimit",
            Kind::Nftables => "nftables ct count",
            Kind::Userspace => "userspace core",
            Kind::ClosedPort => "closed port (floor)",
            Kind::DropFloor => "sk_lookup refusing, no count (floor)",
        }
    }
}

/// The server behind the limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `bench-server-min`: one thread, epoll, no runtime.
    Minimal,
    /// `bench-server`: a tokio accept loop, a task per connection.
    Tokio,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Minimal => "epoll (minimal)",
            Server::Tokio => "tokio",
        }
    }
}

/// Paths of the two server binaries.
pub struct Bins {
    pub minimal: String,
    pub tokio: String,
}

/// How an environment is set up, besides its [`Kind`].
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    pub server: Server,
    pub limit: u32,
    /// IPv4 prefix length clients are grouped by (32: each address alone).
    pub prefix_v4: u8,
    pub bins: &'a Bins,
}

/// A namespace with the bench server in its own cgroup, behind one limiter.
pub struct Env {
    pub netns: Netns,
    pub server: Background,
    /// The connlimit instance's name, when there is one.
    pub instance: Option<String>,
    /// connlimit, attached while the environment lives.
    pub ebpf: Option<EbpfLimiter>,
    _drop_floor: Option<DropFloor>,
    _cgroup: TestCgroup,
}

impl Env {
    pub fn new(kind: Kind, setup: Setup<'_>) -> Result<Self> {
        let Setup { server, limit, prefix_v4, bins } = setup;
        let netns = Netns::new()?;
        tune(&netns)?;
        let cgroup = TestCgroup::create(&unique("connlimit-bench"))?;
        let instance = matches!(kind, Kind::Connlimit | Kind::HooksOnly).then(|| unique("bench"));
        let ebpf = match kind {
            Kind::Connlimit | Kind::HooksOnly => Some(EbpfLimiter::attach(
                AttachOptions::new(instance.clone().unwrap_or_default(), cgroup.path())
                    .netns(netns.path())
                    .port(if kind == Kind::HooksOnly { IDLE_PORT } else { PORT })
                    .config(Config::new(limit).with_ipv4_prefix_len(prefix_v4)),
            )?),
            Kind::Iptables => {
                let limit = limit.to_string();
                run_in(
                    &netns,
                    "iptables",
                    &[
                        "-A",
                        "INPUT",
                        "-p",
                        "tcp",
                        "--syn",
                        "--dport",
                        &PORT.to_string(),
                        "-m",
                        "connlimit",
                        "--connlimit-above",
                        &limit,
                        "--connlimit-mask",
                        &prefix_v4.to_string(),
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "tcp-reset",
                    ],
                )?;
                None
            }
            Kind::Nftables => {
                let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_v4)).unwrap_or(0));
                let rules = format!(
                    "table inet bench {{\n\
                       set clients {{ type ipv4_addr; flags dynamic; }}\n\
                       chain input {{ type filter hook input priority 0; policy accept;\n\
                         tcp dport {PORT} ct state new add @clients {{ ip saddr & {mask} ct count over {limit} }} reject with tcp reset\n\
                       }}\n\
                     }}\n"
                );
                nft_stdin(&netns, &rules)?;
                None
            }
            Kind::Baseline | Kind::Userspace | Kind::ClosedPort | Kind::DropFloor => None,
        };
        let drop_floor = (kind == Kind::DropFloor).then(|| DropFloor::attach(&netns.path(), PORT)).transpose()?;
        let bin = match server {
            Server::Minimal => &bins.minimal,
            Server::Tokio => &bins.tokio,
        };
        let mut cmd = Command::new(bin);
        // With a closed port the server listens elsewhere, so the guarded port has no listener.
        let port = if kind == Kind::ClosedPort { CLOSED_PORT_SERVER } else { PORT };
        cmd.arg(SocketAddr::from(([0, 0, 0, 0], port)).to_string()).stdin(Stdio::piped());
        if kind == Kind::Userspace {
            cmd.arg(limit.to_string());
        }
        cgroup.add_on_exec(&mut cmd);
        netns.enter_on_exec(&mut cmd);
        let server = Background::spawn(&mut cmd)?;
        if !server.wait_for("listening", Duration::from_secs(10)) {
            bail!("the bench server did not start: {}", server.log());
        }
        Ok(Self { netns, server, instance, ebpf, _drop_floor: drop_floor, _cgroup: cgroup })
    }

    /// (connections accepted, connections refused by the user-space core)
    /// so far, as the server counts them.
    pub fn server_counts(&mut self) -> Result<(u64, u64)> {
        let before = self.server.log().matches("accepted ").count();
        writeln!(self.server.stdin().context("server stdin")?, "stats")?;
        if !harness::eventually(Duration::from_secs(5), || self.server.log().matches("accepted ").count() > before) {
            bail!("the bench server did not answer");
        }
        let log = self.server.log();
        let line = log.lines().rev().find(|l| l.starts_with("accepted ")).context("no counts")?;
        let numbers: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
        Ok((numbers[0], numbers[1]))
    }

    /// CPU time the server process has used (user + system).
    pub fn server_cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.server.pid()))?;
        // Fields after the parenthesised command name; utime and stime are 14th and 15th overall.
        let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }
}

/// Enough ports and quick reuse of TIME_WAIT ports for sustained churn.
fn tune(netns: &Netns) -> Result<()> {
    netns.run(|| -> Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        Ok(())
    })
}

fn run_in(netns: &Netns, program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    netns.enter_on_exec(&mut cmd);
    let out = cmd.output().with_context(|| format!("running {program} (install it: apt-get install {program})"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn nft_stdin(netns: &Netns, rules: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    netns.enter_on_exec(&mut cmd);
    let mut child = cmd.spawn().context("running nft (install it: apt-get install nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
