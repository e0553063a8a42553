//! `config`, `top` and `status`: reading instances, for people and machines.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use connlimit::{
    Config, Stat, Stats,
    ebpf::{ClientCount, Instance, Ownership, PinRoot, RefuseWith, hash_hex, listeners, netns},
};
use serde::Serialize;

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

/// `config`: one instance's configuration, as JSON (`--json`) or a table.
#[derive(Serialize)]
pub(crate) struct ConfigView {
    name: String,
    ports: Vec<u16>,
    max_conns_per_client_ip: u32,
    ipv4_prefix_len: u8,
    ipv6_prefix_len: u8,
    /// CIDRs.
    exempt: Vec<String>,
    /// `CIDR=N`.
    network_limits: Vec<String>,
    /// 0 = no total limit.
    max_conns_total: u32,
    /// Shown in the table beside the total limit; machines read it from
    /// `status --json`.
    #[serde(skip)]
    total_open: u64,
    dry_run: bool,
    reservation_epoch_ms: u64,
    /// `closed` or `open`.
    when_full: String,
    /// `reset` or `http-429`.
    refuse_with: String,
}

impl ConfigView {
    pub(crate) fn read(instance: &Instance) -> Result<Self> {
        let config = instance.config()?;
        Ok(Self {
            name: instance.name().to_owned(),
            ports: instance.ports()?,
            max_conns_per_client_ip: config.max_conns_per_client_ip,
            ipv4_prefix_len: config.ipv4_prefix_len,
            ipv6_prefix_len: config.ipv6_prefix_len,
            exempt: config.exempt.iter().map(ToString::to_string).collect(),
            network_limits: config.network_limits.iter().map(ToString::to_string).collect(),
            max_conns_total: config.max_conns_total,
            total_open: instance.total_open()?,
            dry_run: config.dry_run,
            reservation_epoch_ms: instance.reservation_epoch()?.as_millis() as u64,
            when_full: instance.when_full()?.to_string(),
            refuse_with: instance.refuse_with()?.to_string(),
        })
    }

    fn table(&self) -> String {
        self.rows(true).iter().map(|(key, value)| format!("{key:<24} {value}\n")).collect()
    }

    /// What changed from `before` to `self`, one `field: old -> new` line
    /// each, in the order of `config`'s table (what `set` prints).
    pub(crate) fn changes_since(&self, before: &ConfigView) -> Vec<String> {
        before
            .rows(false)
            .into_iter()
            .zip(self.rows(false))
            .filter(|((_, old), (_, new))| old != new)
            .map(|((key, old), (_, new))| format!("{key}: {old} -> {new}"))
            .collect()
    }

    /// The table's rows; `with_open` adds how many are open to the total limit.
    fn rows(&self, with_open: bool) -> Vec<(&'static str, String)> {
        let list = |items: &[String]| if items.is_empty() { "none".to_owned() } else { items.join(", ") };
        let unlimited_if_0 = |n: u32| if n == 0 { "0 (unlimited)".to_owned() } else { n.to_string() };
        let rows = [
            ("instance", self.name.clone()),
            ("ports", self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")),
            ("max conns per client IP", unlimited_if_0(self.max_conns_per_client_ip)),
            ("IPv4 prefix length", format!("/{}", self.ipv4_prefix_len)),
            ("IPv6 prefix length", format!("/{}", self.ipv6_prefix_len)),
            ("exempt", list(&self.exempt)),
            ("network limits", list(&self.network_limits)),
            (
                "max conns total",
                match self.max_conns_total {
                    0 => unlimited_if_0(0),
                    n if with_open => format!("{n} ({} open)", self.total_open),
                    n => n.to_string(),
                },
            ),
            ("dry run", if self.dry_run { "on".into() } else { "off".into() }),
            ("reservation epoch", format!("{} ms", self.reservation_epoch_ms)),
            ("when a map is full", self.when_full.clone()),
            ("refuse with", self.refuse_with.clone()),
        ];
        rows.into()
    }
}

pub fn config(name: &str, json: bool) -> Result<()> {
    let view = ConfigView::read(&Instance::open(name)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", view.table());
    }
    Ok(())
}

/// A client key as people write it (see [`refusals::client_label`]).
fn client_label(c: &ClientCount) -> String {
    refusals::client_label(c.client, c.prefix_len, c.exempt)
}

/// One screen of `top`, as JSON (`--json`) or a table.
#[derive(Serialize)]
struct TopView {
    instance: String,
    max_conns_per_client_ip: u32,
    /// The first `--rows` clients, in the order asked for.
    clients: Vec<ClientRow>,
    totals: TopTotals,
    /// The table's header: the guarded ports, comma-separated.
    #[serde(skip)]
    ports: String,
    /// The table's header and footer: what the instance enforces.
    #[serde(skip)]
    config: Config,
    /// `--sort refused`: the table has a LAST REFUSED column.
    #[serde(skip)]
    by_refused: bool,
}

/// One client of [`TopView`].
#[derive(Serialize)]
struct ClientRow {
    client: String,
    open: u32,
    reserved: u32,
    refused: u64,
    accepted: u64,
    /// With `--sort refused` only: seconds since this client was last seen
    /// refused, null when it was not seen refused since the command started.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_refused_secs_ago: Option<Option<f64>>,
}

/// Totals over every client listed (not only the rows shown) and since attach.
#[derive(Serialize)]
struct TopTotals {
    /// Clients listed: with connections open or reserved, or (`--all`,
    /// `--sort refused`) with refusals on record.
    clients: usize,
    open: u32,
    /// Every statistic since attach (`Stat::ALL`), under its field name.
    #[serde(flatten)]
    stats: StatFields,
}

/// Every statistic, serialized as one field each, named and ordered by the
/// table in `connlimit-common` (`Stat::ALL`), so `status --json`, `top
/// --json` and `/metrics` show the same set.
struct StatFields(Stats);

impl Serialize for StatFields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(Stat::ALL.len()))?;
        for (name, value) in self.0.named() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

impl TopView {
    /// Reads `instance`, whose guarded `ports` are given (reading them walks
    /// a 65,536-entry table: done once per command).
    ///
    /// With `--sort refused`, `tracker` holds the previous reading: clients
    /// whose refused counter went up since are shown first, the most recent
    /// first, then the others by refusals on record.
    fn read(args: &TopArgs, instance: &Instance, ports: &str, tracker: &mut Tracker) -> Result<Self> {
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
        let clients: Vec<ClientCount> = clients
            .into_iter()
            .filter(|c| c.open > 0 || c.reserved > 0 || ((args.all || by_refused) && c.refused > 0))
            .collect();
        let rows = clients
            .iter()
            .take(args.rows)
            .map(|c| ClientRow {
                client: client_label(c),
                open: c.open,
                reserved: c.reserved,
                refused: c.refused,
                accepted: c.accepted,
                last_refused_secs_ago: by_refused
                    .then(|| tracker.last_refused(c.client).map(|t| now.duration_since(t).as_secs_f64())),
            })
            .collect();
        Ok(Self {
            instance: instance.name().to_owned(),
            max_conns_per_client_ip: config.max_conns_per_client_ip,
            clients: rows,
            totals: TopTotals {
                clients: clients.len(),
                open: clients.iter().map(|c| c.open).sum(),
                stats: StatFields(stats),
            },
            ports: ports.to_owned(),
            config,
            by_refused,
        })
    }

    fn table(&self) -> Result<String> {
        let mut out = String::new();
        writeln!(out, "instance {} · port {} · {}", self.instance, self.ports, describe(&self.config))?;
        write!(out, "{:<40} {:>6} {:>9} {:>9} {:>9}", "CLIENT", "OPEN", "RESERVED", "REFUSED", "ACCEPTED")?;
        writeln!(out, "{}", if self.by_refused { format!(" {:>13}", "LAST REFUSED") } else { String::new() })?;
        for c in &self.clients {
            write!(out, "{:<40} {:>6} {:>9} {:>9} {:>9}", c.client, c.open, c.reserved, c.refused, c.accepted)?;
            let last = match c.last_refused_secs_ago {
                None => String::new(),
                Some(Some(secs)) => format!(" {:>13}", format!("{secs:.0} s ago")),
                Some(None) => format!(" {:>13}", "-"),
            };
            writeln!(out, "{last}")?;
        }
        let t = &self.totals;
        if t.clients > self.clients.len() {
            writeln!(out, "… {} more (--rows)", t.clients - self.clients.len())?;
        }
        writeln!(
            out,
            "{} clients, {} open · since attach: {} accepted, {} refused{}",
            t.clients,
            t.open,
            t.stats.0.accepted,
            t.stats.0.refused,
            if self.config.dry_run {
                format!(", {} dry-run refusals", t.stats.0.dry_run_refused)
            } else {
                String::new()
            }
        )?;
        Ok(out)
    }
}

/// One screen of `top` for `instance`, as `args` asks for it.
fn top_once(args: &TopArgs, instance: &Instance, ports: &str, tracker: &mut Tracker) -> Result<String> {
    let view = TopView::read(args, instance, ports, tracker)?;
    if args.json.json { Ok(serde_json::to_string_pretty(&view)? + "\n") } else { view.table() }
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

/// `status`: one instance, a line of the table or an element of the JSON
/// array (`--json`).
#[derive(Serialize)]
struct StatusView {
    name: String,
    ports: Vec<u16>,
    max_conns_per_client_ip: u32,
    /// 0 = no total limit.
    max_conns_total: u32,
    /// Established connections across all clients.
    total_open: u64,
    /// `reset` or `http-429`.
    refuse_with: String,
    dry_run: bool,
    persistent: bool,
    /// "running", "exited" (orphaned) or "none".
    owner: &'static str,
    pid: u32,
    started_unix_secs: u64,
    open: u32,
    /// Every statistic (`Stat::ALL`), under its field name.
    #[serde(flatten)]
    stats: StatFields,
    /// Problems with the guarded ports' listeners (checked when the
    /// instance guards this process's network namespace).
    listener_problems: Vec<String>,
    /// `false` while the guarded cgroup is gone (its service stopped);
    /// absent when it cannot be told.
    enforcing: Option<bool>,
    /// Short hash of the kernel object the instance runs (`connlimit --version`).
    object: String,
    /// Whether the lookups of local socket-diagnostics queries are told
    /// from packets (the `connlimit_diag` hook is attached).
    diag_probe: bool,
}

impl StatusView {
    fn read(root: &PinRoot, name: &str) -> Result<Self> {
        let instance = Instance::open_in(root, name)?;
        let (config, info, stats) = (instance.config()?, instance.info()?, instance.stats()?);
        let ports = instance.ports()?;
        let here = Path::new(netns::OWN_NETNS);
        let enforcing = instance.enforcing()?;
        let listener_problems = match netns::NetnsId::of(here) {
            Ok(id) if enforcing != Some(false) && (id.dev, id.ino) == (info.netns_dev, info.netns_ino) => {
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
            refuse_with: instance.refuse_with()?.to_string(),
            dry_run: config.dry_run,
            persistent: instance.is_persistent(),
            owner,
            pid: info.pid,
            started_unix_secs: info.started_unix_secs,
            open: instance.clients()?.iter().map(|c| c.open).sum(),
            stats: StatFields(stats),
            listener_problems: listener_problems.iter().map(ToString::to_string).collect(),
            enforcing,
            object: hash_hex(info.object_hash),
            diag_probe: info.flags & connlimit_common::maps::INFO_DIAG_PROBE != 0,
        })
    }

    fn mode(&self) -> String {
        let mut mode = if self.enforcing == Some(false) {
            // Until the owner attaches to the cgroup made again at the path.
            "not enforcing: the guarded cgroup is gone".to_owned()
        } else if self.dry_run {
            "dry-run".to_owned()
        } else {
            "enforcing".to_owned()
        };
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
            if self.stats.0.total_refused > 0 {
                let _ = write!(mode, " ({} refused at the total)", self.stats.0.total_refused);
            }
        }
        if self.refuse_with == RefuseWith::Http429.to_string() {
            if self.owner == "running" {
                let _ = write!(mode, ", refusing with HTTP 429 ({} answered)", self.stats.0.responded);
            } else {
                // Its listeners died with their owner: the kernel resets.
                mode.push_str(", 429 responder down: refusing with a reset");
            }
            if self.stats.0.responder_missing > 0 {
                let _ = write!(mode, ", {} refusals reset for want of a responder", self.stats.0.responder_missing);
            }
        }
        // Signs of trouble, each explained in the README.
        if self.stats.0.steered > 0 {
            let _ = write!(mode, ", {} refusals overridden by another sk_lookup program", self.stats.0.steered);
        }
        if self.stats.0.untracked > 0 {
            let _ = write!(mode, ", {} connections untracked (maps full)", self.stats.0.untracked);
        }
        if self.stats.0.ended > 0 {
            let _ = write!(mode, ", {} connections ended after their handshake", self.stats.0.ended);
        }
        if self.stats.0.endings_lost > 0 {
            let _ = write!(mode, ", {} endings lost (ring buffer full)", self.stats.0.endings_lost);
        }
        if !self.diag_probe {
            mode.push_str(", socket-diagnostics lookups not told from packets (no kprobe or fentry here)");
        }
        for problem in &self.listener_problems {
            let _ = write!(mode, "; {problem}");
        }
        mode
    }
}

pub fn status(json: bool) -> Result<()> {
    connlimit::ebpf::capabilities::require_access(&connlimit::ebpf::pin_root())?;
    let mut rows = Vec::new();
    if let Some(root) = PinRoot::read()? {
        for name in root.names()? {
            match StatusView::read(&root, &name) {
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
            r.stats.0.accepted,
            r.stats.0.refused,
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
    use connlimit::Config;
    use serde_json::{Value, json};

    use connlimit::{Stat, Stats};

    use super::{ClientRow, ConfigView, StatFields, TopTotals, TopView};

    /// The names of an object's fields, sorted.
    fn keys(value: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = value.as_object().expect("an object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    // The JSON of `config` and `top` is an interface (docs/CLI.md, scripts):
    // renaming a field is a change to record in CHANGELOG.md.
    #[test]
    fn config_json_keeps_its_fields() {
        let view = ConfigView {
            name: "api".into(),
            ports: vec![8080],
            max_conns_per_client_ip: 10,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 128,
            exempt: vec!["10.0.0.0/8".into()],
            network_limits: vec!["192.0.2.0/24=5".into()],
            max_conns_total: 0,
            total_open: 3,
            dry_run: false,
            reservation_epoch_ms: 1000,
            when_full: "closed".into(),
            refuse_with: "reset".into(),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            keys(&json),
            [
                "dry_run",
                "exempt",
                "ipv4_prefix_len",
                "ipv6_prefix_len",
                "max_conns_per_client_ip",
                "max_conns_total",
                "name",
                "network_limits",
                "ports",
                "refuse_with",
                "reservation_epoch_ms",
                "when_full",
            ]
        );
        assert_eq!((&json["ports"], &json["exempt"]), (&json!([8080]), &json!(["10.0.0.0/8"])));
        assert!(view.table().contains("max conns total          0 (unlimited)\n"), "{}", view.table());
    }

    #[test]
    fn top_json_keeps_its_fields_and_has_last_refused_only_when_sorted_by_it() {
        let row = |last_refused_secs_ago| ClientRow {
            client: "127.0.0.1".into(),
            open: 2,
            reserved: 0,
            refused: 1,
            accepted: 2,
            last_refused_secs_ago,
        };
        let view = TopView {
            instance: "api".into(),
            max_conns_per_client_ip: 2,
            clients: vec![row(None), row(Some(None)), row(Some(Some(1.5)))],
            totals: TopTotals {
                clients: 4,
                open: 6,
                stats: StatFields(Stats { accepted: 6, refused: 3, ..Stats::default() }),
            },
            ports: "8080".into(),
            config: Config::new(2),
            by_refused: false,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(keys(&json), ["clients", "instance", "max_conns_per_client_ip", "totals"]);
        // Every statistic of the table, plus the clients listed and open.
        let mut totals: Vec<&str> = Stat::ALL.iter().map(|s| s.info().name).chain(["clients", "open"]).collect();
        totals.sort_unstable();
        assert_eq!(keys(&json["totals"]), totals);
        for old in ["accepted", "dry_run_refused", "refused"] {
            assert!(totals.contains(&old), "{old} kept");
        }
        assert_eq!((&json["totals"]["accepted"], &json["totals"]["refused"]), (&json!(6), &json!(3)));
        let clients = json["clients"].as_array().unwrap();
        assert_eq!(keys(&clients[0]), ["accepted", "client", "open", "refused", "reserved"]);
        assert_eq!(clients[1]["last_refused_secs_ago"], Value::Null);
        assert_eq!(clients[2]["last_refused_secs_ago"], 1.5);
        assert!(view.table().unwrap().contains("… 1 more (--rows)"));
    }

    #[test]
    fn status_json_keeps_its_fields_and_has_every_statistic() {
        let view = super::StatusView {
            name: "api".into(),
            ports: vec![8080],
            max_conns_per_client_ip: 10,
            max_conns_total: 0,
            total_open: 1,
            refuse_with: "reset".into(),
            dry_run: false,
            persistent: false,
            owner: "running",
            pid: 1,
            started_unix_secs: 0,
            open: 1,
            stats: StatFields(Stats { ended: 4, endings_lost: 5, ..Stats::default() }),
            listener_problems: Vec::new(),
            enforcing: Some(true),
            object: "0011223344556677".into(),
            diag_probe: true,
        };
        let json = serde_json::to_value(&view).unwrap();
        let mut want = vec![
            "accepted",
            "diag_probe",
            "dry_run",
            "dry_run_refused",
            "enforcing",
            "ended",
            "endings_lost",
            "listener_problems",
            "max_conns_per_client_ip",
            "max_conns_total",
            "name",
            "object",
            "open",
            "owner",
            "persistent",
            "pid",
            "ports",
            "refuse_with",
            "refused",
            "responded",
            "responder_missing",
            "started_unix_secs",
            "steered",
            "total_open",
            "total_refused",
            "unconfirmed",
            "untracked",
        ];
        want.sort_unstable();
        assert_eq!(keys(&json), want);
        assert!(Stat::ALL.iter().all(|s| json.get(s.info().name).is_some()));
        assert_eq!((&json["ended"], &json["endings_lost"]), (&json!(4), &json!(5)));
        assert!(view.mode().contains("4 connections ended after their handshake"), "{}", view.mode());
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
    }
}
