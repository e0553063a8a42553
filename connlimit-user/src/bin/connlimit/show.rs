//! `config`, `top` and `status`: reading instances, for people and machines.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use connlimit::{
    Config,
    ebpf::{ClientCount, Instance, Ownership, PinRoot, RefuseWith, hash_hex, host, listeners},
};
use serde_json::json;

use crate::{
    cli::{TopArgs, TopSort},
    refusals::{self, Tracker},
};

/// One line saying what a config enforces.
pub fn describe(config: &Config) -> String {
    let limit = match config.max_conns_per_client_ip {
        0 => "no limit (counting only)".to_owned(),
        n => format!("limit {n} per client"),
    };
    let exempt = if config.exempt.is_empty() {
        "none".to_owned()
    } else {
        config.exempt.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    let mut out = format!(
        "{limit}, clients grouped by IPv4 /{} and IPv6 /{}, exempt: {exempt}, dry run {}",
        config.ipv4_prefix_len,
        config.ipv6_prefix_len,
        if config.dry_run { "on" } else { "off" }
    );
    if !config.network_limits.is_empty() {
        let _ = write!(out, ", network limits: {}", network_limits(config));
    }
    if config.max_conns_total > 0 {
        let _ = write!(out, ", total limit {}", config.max_conns_total);
    }
    out
}

/// `CIDR=N, ...` of a config's network limits.
fn network_limits(config: &Config) -> String {
    config.network_limits.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn config_json(instance: &Instance, config: &Config) -> Result<serde_json::Value> {
    Ok(json!({
        "name": instance.name(),
        "ports": instance.ports()?,
        "max_conns_per_client_ip": config.max_conns_per_client_ip,
        "ipv4_prefix_len": config.ipv4_prefix_len,
        "ipv6_prefix_len": config.ipv6_prefix_len,
        "exempt": config.exempt.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "network_limits": config.network_limits.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "max_conns_total": config.max_conns_total,
        "dry_run": config.dry_run,
        "reservation_epoch_ms": instance.reservation_epoch()?.as_millis() as u64,
        "when_full": instance.when_full()?.to_string(),
        "refuse_with": instance.refuse_with()?.to_string(),
    }))
}

pub fn config(name: &str, json: bool) -> Result<()> {
    let instance = Instance::open(name)?;
    let config = instance.config()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&config_json(&instance, &config)?)?);
        return Ok(());
    }
    let ports = instance.ports()?.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let exempt = config.exempt.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let rows = [
        ("instance", instance.name().to_owned()),
        ("ports", ports),
        (
            "max conns per client IP",
            if config.max_conns_per_client_ip == 0 {
                "0 (unlimited)".into()
            } else {
                config.max_conns_per_client_ip.to_string()
            },
        ),
        ("IPv4 prefix length", format!("/{}", config.ipv4_prefix_len)),
        ("IPv6 prefix length", format!("/{}", config.ipv6_prefix_len)),
        ("exempt", if exempt.is_empty() { "none".into() } else { exempt }),
        ("network limits", if config.network_limits.is_empty() { "none".into() } else { network_limits(&config) }),
        (
            "max conns total",
            match config.max_conns_total {
                0 => "0 (unlimited)".into(),
                n => format!("{n} ({} open)", instance.total_open()?),
            },
        ),
        ("dry run", if config.dry_run { "on".into() } else { "off".into() }),
        ("reservation epoch", format!("{} ms", instance.reservation_epoch()?.as_millis())),
        ("when a map is full", instance.when_full()?.to_string()),
        ("refuse with", instance.refuse_with()?.to_string()),
    ];
    for (key, value) in rows {
        println!("{key:<24} {value}");
    }
    Ok(())
}

/// A client key as people write it (see [`refusals::client_label`]).
fn client_label(c: &ClientCount) -> String {
    refusals::client_label(c.client, c.prefix_len, c.exempt)
}

/// One screen of `top` for `instance`, whose guarded `ports` are given
/// (reading them walks a 65,536-entry table: done once per command).
///
/// With `--sort refused`, `tracker` holds the previous reading: clients
/// whose refused counter went up since are shown first, the most recent
/// first, then the others by refusals on record.
fn top_once(args: &TopArgs, instance: &Instance, ports: &str, tracker: &mut Tracker) -> Result<String> {
    let config = instance.config()?;
    let stats = instance.stats()?;
    let by_refused = args.sort == TopSort::Refused;
    let now = Instant::now();
    let mut clients = instance.clients()?;
    if by_refused {
        tracker.update(&clients, now);
        clients.sort_by(|a, b| {
            tracker
                .last_refused(b.client)
                .cmp(&tracker.last_refused(a.client))
                .then(b.refused.cmp(&a.refused))
                .then(b.open.cmp(&a.open))
                .then(a.client.cmp(&b.client))
        });
    }
    let ago = |c: &ClientCount| tracker.last_refused(c.client).map(|t| now.duration_since(t).as_secs_f64());
    let clients: Vec<ClientCount> = clients
        .into_iter()
        .filter(|c| c.open > 0 || c.reserved > 0 || ((args.all || by_refused) && c.refused > 0))
        .collect();
    let open: u32 = clients.iter().map(|c| c.open).sum();
    let shown = &clients[..clients.len().min(args.rows)];
    if args.json.json {
        let rows: Vec<_> = shown
            .iter()
            .map(|c| {
                let mut row = json!({
                    "client": client_label(c),
                    "open": c.open,
                    "reserved": c.reserved,
                    "refused": c.refused,
                    "accepted": c.accepted,
                });
                if by_refused {
                    row["last_refused_secs_ago"] = json!(ago(c));
                }
                row
            })
            .collect();
        let value = json!({
            "instance": instance.name(),
            "max_conns_per_client_ip": config.max_conns_per_client_ip,
            "clients": rows,
            "totals": {
                "clients": clients.len(),
                "open": open,
                "accepted": stats.accepted,
                "refused": stats.refused,
                "dry_run_refused": stats.dry_run_refused,
            },
        });
        return Ok(serde_json::to_string_pretty(&value)? + "\n");
    }
    let mut out = String::new();
    writeln!(out, "instance {} · port {ports} · {}", instance.name(), describe(&config))?;
    write!(out, "{:<40} {:>6} {:>9} {:>9} {:>9}", "CLIENT", "OPEN", "RESERVED", "REFUSED", "ACCEPTED")?;
    writeln!(out, "{}", if by_refused { format!(" {:>13}", "LAST REFUSED") } else { String::new() })?;
    for c in shown {
        write!(out, "{:<40} {:>6} {:>9} {:>9} {:>9}", client_label(c), c.open, c.reserved, c.refused, c.accepted)?;
        let last = match ago(c) {
            _ if !by_refused => String::new(),
            Some(secs) => format!(" {:>13}", format!("{secs:.0} s ago")),
            None => format!(" {:>13}", "-"),
        };
        writeln!(out, "{last}")?;
    }
    if clients.len() > shown.len() {
        writeln!(out, "… {} more (--rows)", clients.len() - shown.len())?;
    }
    writeln!(
        out,
        "{} clients, {open} open · since attach: {} accepted, {} refused{}",
        clients.len(),
        stats.accepted,
        stats.refused,
        if config.dry_run { format!(", {} dry-run refusals", stats.dry_run_refused) } else { String::new() }
    )?;
    Ok(out)
}

pub fn top(args: TopArgs) -> Result<()> {
    let instance = Instance::open(&args.name.name)?;
    let ports = instance.ports()?.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    // The parser bounds it; stay panic-free whatever a caller passes.
    let interval = Duration::try_from_secs_f64(args.interval.clamp(0.1, 86_400.0)).unwrap_or(Duration::from_secs(1));
    let mut tracker = Tracker::default();
    if args.sort == TopSort::Refused {
        // Refusals are seen between two readings: take the first now.
        tracker.update(&instance.clients()?, Instant::now());
        std::thread::sleep(interval);
    }
    if !args.watch {
        print!("{}", top_once(&args, &instance, &ports, &mut tracker)?);
        return Ok(());
    }
    loop {
        if !Instance::dir_of(&args.name.name).exists() {
            anyhow::bail!("instance {:?} was detached", args.name.name);
        }
        let screen = top_once(&args, &instance, &ports, &mut tracker)?;
        // Clear the screen and home the cursor, as top does.
        print!("\x1b[2J\x1b[H{screen}");
        std::io::stdout().flush()?;
        std::thread::sleep(interval);
    }
}

/// One line of `status`.
#[derive(serde::Serialize)]
struct InstanceStatus {
    name: String,
    ports: Vec<u16>,
    max_conns_per_client_ip: u32,
    /// 0 = no total limit.
    max_conns_total: u32,
    /// Established connections across all clients.
    total_open: u64,
    /// Refusals because the total limit was reached.
    total_refused: u64,
    /// `reset` or `http-429`.
    refuse_with: String,
    /// Refusals answered with HTTP 429.
    responded: u64,
    /// Refusals that were to get a 429 but got a reset (no responder).
    responder_missing: u64,
    dry_run: bool,
    persistent: bool,
    /// "running", "exited" (orphaned) or "none".
    owner: &'static str,
    pid: u32,
    started_unix_secs: u64,
    open: u32,
    accepted: u64,
    refused: u64,
    dry_run_refused: u64,
    steered: u64,
    untracked: u64,
    ended: u64,
    unconfirmed: u64,
    endings_lost: u64,
    /// Problems with the guarded ports' listeners (checked when the
    /// instance guards this process's network namespace).
    listener_problems: Vec<String>,
    /// Short hash of the kernel object the instance runs (`connlimit --version`).
    object: String,
}

impl InstanceStatus {
    fn read(root: &PinRoot, name: &str) -> Result<Self> {
        let instance = Instance::open_in(root, name)?;
        let (config, info, stats) = (instance.config()?, instance.info()?, instance.stats()?);
        let ports = instance.ports()?;
        let here = Path::new(host::OWN_NETNS);
        let listener_problems = match host::NetnsId::of(here) {
            Ok(id) if (id.dev, id.ino) == (info.netns_dev, info.netns_ino) => {
                listeners::check(here, &ports, info.cgroup_ino).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let owner = match Ownership::of(&info) {
            Ownership::Owned(_) => "running",
            Ownership::Orphaned(_) => "exited",
            Ownership::Unowned => "none",
        };
        Ok(Self {
            name: name.to_owned(),
            ports,
            max_conns_per_client_ip: config.max_conns_per_client_ip,
            max_conns_total: config.max_conns_total,
            total_open: instance.total_open()?,
            total_refused: stats.total_refused,
            refuse_with: instance.refuse_with()?.to_string(),
            responded: stats.responded,
            responder_missing: stats.responder_missing,
            dry_run: config.dry_run,
            persistent: instance.is_persistent(),
            owner,
            pid: info.pid,
            started_unix_secs: info.started_unix_secs,
            open: instance.clients()?.iter().map(|c| c.open).sum(),
            accepted: stats.accepted,
            refused: stats.refused,
            dry_run_refused: stats.dry_run_refused,
            steered: stats.steered,
            untracked: stats.untracked,
            ended: stats.ended,
            unconfirmed: stats.unconfirmed,
            endings_lost: stats.endings_lost,
            listener_problems: listener_problems.iter().map(ToString::to_string).collect(),
            object: hash_hex(info.object_hash),
        })
    }

    fn mode(&self) -> String {
        let mut mode = if self.dry_run { "dry-run".to_owned() } else { "enforcing".to_owned() };
        match (self.owner, self.persistent) {
            ("running", true) => mode.push_str(", persistent"),
            ("running", false) => {}
            // Its owner crashed or was killed: the kernel still enforces,
            // and the same `run` adopts it (README: crashes and restarts).
            ("exited", false) => {
                let _ = write!(mode, ", orphaned (pid {} exited)", self.pid);
            }
            ("exited", true) => {
                let _ = write!(mode, ", persisted (pid {} exited)", self.pid);
            }
            _ => mode.push_str(", persisted (no owner)"),
        }
        if self.max_conns_total > 0 {
            let _ = write!(mode, ", total {}/{} open", self.total_open, self.max_conns_total);
            if self.total_refused > 0 {
                let _ = write!(mode, " ({} refused at the total)", self.total_refused);
            }
        }
        if self.refuse_with == RefuseWith::Http429.to_string() {
            if self.owner == "running" {
                let _ = write!(mode, ", refusing with HTTP 429 ({} answered)", self.responded);
            } else {
                // Its listeners died with their owner: the kernel resets.
                mode.push_str(", 429 responder down: refusing with a reset");
            }
            if self.responder_missing > 0 {
                let _ = write!(mode, ", {} refusals reset for want of a responder", self.responder_missing);
            }
        }
        // Signs of trouble, each explained in the README.
        if self.steered > 0 {
            let _ = write!(mode, ", {} refusals overridden by another sk_lookup program", self.steered);
        }
        if self.untracked > 0 {
            let _ = write!(mode, ", {} connections untracked (maps full)", self.untracked);
        }
        if self.ended > 0 {
            let _ = write!(mode, ", {} connections ended after their handshake", self.ended);
        }
        if self.endings_lost > 0 {
            let _ = write!(mode, ", {} endings lost (ring buffer full)", self.endings_lost);
        }
        for problem in &self.listener_problems {
            let _ = write!(mode, "; {problem}");
        }
        mode
    }
}

pub fn status(json: bool) -> Result<()> {
    connlimit::ebpf::host::require_access(&connlimit::ebpf::pin_root())?;
    let mut rows = Vec::new();
    if let Some(root) = PinRoot::read()? {
        for name in root.names()? {
            match InstanceStatus::read(&root, &name) {
                Ok(row) => rows.push(row),
                Err(e) => eprintln!("connlimit: warning: {name}: {e:#}"),
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no connlimit instances are running");
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>6} {:>6} {:>9} {:>9} {:>8}  {:<19}  {:<16}  MODE",
        "NAME", "PORTS", "LIMIT", "OPEN", "ACCEPTED", "REFUSED", "PID", "SINCE (UTC)", "OBJECT"
    );
    for r in &rows {
        let ports = r.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        println!(
            "{:<16} {:<12} {:>6} {:>6} {:>9} {:>9} {:>8}  {:<19}  {:<16}  {}",
            r.name,
            ports,
            r.max_conns_per_client_ip,
            r.open,
            r.accepted,
            r.refused,
            if r.pid == 0 { "-".to_owned() } else { r.pid.to_string() },
            utc(r.started_unix_secs),
            r.object,
            r.mode()
        );
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
    }
}
