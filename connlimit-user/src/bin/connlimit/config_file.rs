//! The service file read by `serve` and `check-config` (TOML): every
//! problem is found in one pass and reported with its line.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use connlimit::{
    Cidr, Config, MAX_CONNS_PER_CLIENT_IP, MAX_CONNS_TOTAL, NetworkLimit,
    ebpf::{Instance, RefuseWith, WhenFull},
};
use connlimit::{DEFAULT_IPV4_PREFIX_LEN, DEFAULT_IPV6_PREFIX_LEN};
use toml_edit::{Item, Table};

use crate::cli::LogFormat;

/// Defaults shared with the command line.
pub const DEFAULT_REFUSAL_INTERVAL_SECS: u64 = 10;
pub const DEFAULT_REFUSAL_LINES: usize = 20;
const DEFAULT_EPOCH_MS: u64 = connlimit::ebpf::DEFAULT_RESERVATION_EPOCH.as_millis() as u64;

/// The whole file.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceFile {
    /// Where to serve /metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogSettings,
    pub instances: Vec<InstanceSpec>,
}

/// The `[log]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct LogSettings {
    /// `text` or `json`; a reload applies a change (unless `--log-format` chose one).
    pub format: Option<LogFormat>,
    /// How often refusals are summed up and logged; zero turns it off.
    pub refusal_interval: Duration,
    /// Most client lines per interval and instance; the rest are counted
    /// in one summary line.
    pub refusal_lines: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: None,
            refusal_interval: Duration::from_secs(DEFAULT_REFUSAL_INTERVAL_SECS),
            refusal_lines: DEFAULT_REFUSAL_LINES,
        }
    }
}

/// What a guarded server is: a cgroup v2 directory (in connlimit's own
/// network namespace), a process (its cgroup and namespace), or a systemd
/// unit (its cgroup, and its main process's namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Cgroup(PathBuf),
    Pid(u32),
    /// A systemd unit: its cgroup, and its main process's namespace.
    Unit(String),
}

/// One `[[instance]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSpec {
    pub name: String,
    pub ports: Vec<u16>,
    pub target: Target,
    pub config: Config,
    pub reservation_epoch: Duration,
    pub when_full: WhenFull,
    pub refuse_with: RefuseWith,
    pub persist: bool,
}

impl InstanceSpec {
    /// Whether going from `self` to `new` needs detaching and attaching
    /// again (anything but the ports and the limits, which change live).
    pub fn needs_reattach(&self, new: &InstanceSpec) -> bool {
        self.target != new.target || self.persist != new.persist || self.reservation_epoch != new.reservation_epoch
    }
}

/// One problem in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Reads and checks `path`; on failure the error lists every problem, one
/// per line, as `FILE:LINE: message`.
pub fn load(path: &Path) -> anyhow::Result<ServiceFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the service file {}: {e}", path.display()))?;
    parse(&text).map_err(|problems| anyhow::anyhow!("{}", render(path, &problems)))
}

/// `FILE:LINE: message`, one problem per line.
pub fn render(path: &Path, problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("{}:{}: {}", path.display(), p.line, p.message)).collect::<Vec<_>>().join("\n")
}

/// The log format the file asks for, if it can be read (for setting up
/// logging before anything else).
pub fn peek_log_format(path: &Path) -> Option<LogFormat> {
    parse(&std::fs::read_to_string(path).ok()?).ok()?.log.format
}

/// Parses and checks a whole file.
pub fn parse(text: &str) -> Result<ServiceFile, Vec<Problem>> {
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let line = line_of(text, e.span().map_or(0, |s| s.start));
            return Err(vec![Problem { line, message: format!("invalid TOML: {}", e.message().trim()) }]);
        }
    };
    let mut p = Parser { text, problems: Vec::new() };
    let root = doc.as_table();
    p.unknown_keys(root, &["metrics_listen", "log", "instance"], "the top level");
    let metrics_listen = p.get(root, "metrics_listen").and_then(|(span, item)| {
        let s = p.string(&span, item, "metrics_listen")?;
        s.parse::<SocketAddr>()
            .map_err(|_| {
                p.problem(
                    &span,
                    format!("metrics_listen {s:?} is not an address; write IP:PORT, e.g. \"127.0.0.1:9100\""),
                )
            })
            .ok()
    });
    let log = match p.get(root, "log") {
        None => LogSettings::default(),
        Some((span, item)) => match item.as_table() {
            Some(table) => p.log(table),
            None => {
                p.problem(&span, "`log` must be a table: write [log] on a line of its own".into());
                LogSettings::default()
            }
        },
    };
    let mut instances = Vec::new();
    match p.get(root, "instance") {
        None => p.problems.push(Problem {
            line: 1,
            message: "no instance to run; add an [[instance]] table (see contrib/connlimit.toml)".into(),
        }),
        Some((span, item)) => match item.as_array_of_tables() {
            Some(tables) => {
                for table in tables.iter() {
                    if let Some(spec) = p.instance(table) {
                        instances.push((table.span().unwrap_or(0..0), spec));
                    }
                }
            }
            None => p.problem(&span, "`instance` must be an array of tables: write [[instance]] before each".into()),
        },
    }
    p.across(&instances);
    if p.problems.is_empty() {
        Ok(ServiceFile { metrics_listen, log, instances: instances.into_iter().map(|(_, s)| s).collect() })
    } else {
        p.problems.sort_by_key(|p| p.line);
        Err(p.problems)
    }
}

/// The 1-based line holding byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

struct Parser<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

/// The keys of `[log]`.
const LOG_KEYS: [&str; 3] = ["format", "refusal_log_interval", "refusal_log_lines"];
/// Old names of `[log]` keys, still read: (old, new).
const LOG_KEY_ALIASES: [(&str, &str); 2] =
    [("refusal_interval_secs", "refusal_log_interval"), ("refusal_lines", "refusal_log_lines")];

const INSTANCE_KEYS: [&str; 16] = [
    "name",
    "ports",
    "cgroup",
    "pid",
    "unit",
    "max_conns_per_client_ip",
    "ipv4_prefix_len",
    "ipv6_prefix_len",
    "exempt",
    "network_limits",
    "max_conns_total",
    "dry_run",
    "persist",
    "reservation_epoch_ms",
    "when_full",
    "refuse_with",
];

impl Parser<'_> {
    fn problem(&mut self, span: &Range<usize>, message: String) {
        self.problems.push(Problem { line: line_of(self.text, span.start), message });
    }

    /// An entry with the span of its value (or of its key, if the value has none).
    fn get<'a>(&self, table: &'a Table, key: &str) -> Option<(Range<usize>, &'a Item)> {
        let (k, item) = table.get_key_value(key)?;
        let span = item.span().or_else(|| k.span()).or_else(|| table.span()).unwrap_or(0..0);
        Some((span, item))
    }

    fn unknown_keys(&mut self, table: &Table, known: &[&str], place: &str) {
        for (key, _) in table.iter() {
            if !known.contains(&key) {
                let span = table.key(key).and_then(|k| k.span()).or_else(|| table.span()).unwrap_or(0..0);
                self.problem(&span, format!("unknown key `{key}` in {place}; known keys: {}", known.join(", ")));
            }
        }
    }

    fn string<'a>(&mut self, span: &Range<usize>, item: &'a Item, key: &str) -> Option<&'a str> {
        let s = item.as_str();
        if s.is_none() {
            self.problem(span, format!("`{key}` must be a string in quotes, not {}", item.type_name()));
        }
        s
    }

    /// A string key that parses as `T`, e.g. `refuse_with = "http-429"`.
    fn parsed<T: std::str::FromStr<Err = String>>(&mut self, table: &Table, key: &str) -> Option<T> {
        let (span, item) = self.get(table, key)?;
        let text = self.string(&span, item, key)?;
        text.parse().map_err(|e| self.problem(&span, e)).ok()
    }

    /// `when_full = "open" | "closed"`.
    fn when_full(&mut self, table: &Table) -> Option<WhenFull> {
        let (span, item) = self.get(table, "when_full")?;
        let text = self.string(&span, item, "when_full")?;
        match text.parse() {
            Ok(policy) => Some(policy),
            Err(e) => {
                self.problem(&span, e);
                None
            }
        }
    }

    fn bool(&mut self, table: &Table, key: &str) -> Option<bool> {
        let (span, item) = self.get(table, key)?;
        let b = item.as_bool();
        if b.is_none() {
            self.problem(&span, format!("`{key}` must be true or false, not {}", item.type_name()));
        }
        b
    }

    /// An integer in `range`.
    fn int(&mut self, table: &Table, key: &str, range: Range<i64>, hint: &str) -> Option<i64> {
        let (span, item) = self.get(table, key)?;
        match item.as_integer() {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) => {
                self.problem(&span, format!("`{key}` = {n} is out of range; {hint}"));
                None
            }
            None => {
                self.problem(&span, format!("`{key}` must be a whole number, not {}", item.type_name()));
                None
            }
        }
    }

    fn log(&mut self, table: &Table) -> LogSettings {
        // The keys are named as the command line's flags are
        // (`--refusal-log-interval`, `--refusal-log-lines`); the names of
        // 0.1.0 are still read.
        for (key, _) in table.iter() {
            if !LOG_KEYS.contains(&key) && !LOG_KEY_ALIASES.iter().any(|(old, _)| *old == key) {
                let span = table.key(key).and_then(|k| k.span()).or_else(|| table.span()).unwrap_or(0..0);
                self.problem(&span, format!("unknown key `{key}` in [log]; known keys: {}", LOG_KEYS.join(", ")));
            }
        }
        for (old, new) in LOG_KEY_ALIASES {
            if let (Some((span, _)), Some(_)) = (self.get(table, old), self.get(table, new)) {
                self.problem(&span, format!("`{old}` is the old name of `{new}`; give `{new}` alone"));
            }
        }
        let key = |new: &'static str| {
            let old = LOG_KEY_ALIASES.iter().find(|(_, n)| *n == new).map(|(o, _)| *o);
            if table.contains_key(new) { new } else { old.filter(|o| table.contains_key(o)).unwrap_or(new) }
        };
        let mut log = LogSettings::default();
        if let Some((span, item)) = self.get(table, "format")
            && let Some(s) = self.string(&span, item, "format")
        {
            match s {
                "text" => log.format = Some(LogFormat::Text),
                "json" => log.format = Some(LogFormat::Json),
                other => self.problem(&span, format!("log format {other:?} is unknown; use \"text\" or \"json\"")),
            }
        }
        if let Some(n) = self.int(table, key("refusal_log_interval"), 0..86_401, "use 0 (off) to 86400 seconds") {
            log.refusal_interval = Duration::from_secs(n as u64);
        }
        if let Some(n) = self.int(table, key("refusal_log_lines"), 1..100_001, "use 1 to 100000 lines per interval") {
            log.refusal_lines = n as usize;
        }
        log
    }

    fn instance(&mut self, table: &Table) -> Option<InstanceSpec> {
        let before = self.problems.len();
        let header = table.span().unwrap_or(0..0);
        self.unknown_keys(table, &INSTANCE_KEYS, "[[instance]]");
        let name = match self.get(table, "name") {
            Some((span, item)) => self.string(&span, item, "name").and_then(|n| match Instance::validate_name(n) {
                Ok(()) => Some(n.to_owned()),
                Err(e) => {
                    self.problem(&span, e.to_string());
                    None
                }
            }),
            None => {
                self.problem(&header, "this [[instance]] has no `name`; add name = \"...\"".into());
                None
            }
        };
        let ports = self.ports(table, &header);
        let given: Vec<_> = ["cgroup", "pid", "unit"].into_iter().filter_map(|k| self.get(table, k)).collect();
        let target = match (self.get(table, "cgroup"), self.get(table, "pid"), self.get(table, "unit")) {
            _ if given.len() > 1 => {
                self.problem(&given[1].0, "give one of `cgroup`, `pid` or `unit`, not several".into());
                None
            }
            (None, None, Some((span, item))) => self.string(&span, item, "unit").map(|u| Target::Unit(u.to_owned())),
            (Some((span, item)), _, _) => self.string(&span, item, "cgroup").and_then(|c| {
                let path = PathBuf::from(c);
                if path.is_absolute() {
                    Some(Target::Cgroup(path))
                } else {
                    self.problem(
                        &span,
                        format!(
                            "cgroup {c:?} must be an absolute path, e.g. /sys/fs/cgroup/system.slice/nginx.service"
                        ),
                    );
                    None
                }
            }),
            (None, Some(_), _) => {
                self.int(table, "pid", 1..i64::from(i32::MAX), "give a process id").map(|p| Target::Pid(p as u32))
            }
            (None, None, None) => {
                self.problem(
                    &header,
                    "this [[instance]] has no target; add cgroup = \"/sys/fs/cgroup/...\", unit = \"NAME.service\" \
                     or pid = N"
                        .into(),
                );
                None
            }
        };
        let max = match self.get(table, "max_conns_per_client_ip") {
            Some(_) => self.int(
                table,
                "max_conns_per_client_ip",
                0..i64::from(MAX_CONNS_PER_CLIENT_IP) + 1,
                &format!("use 0 (no limit) to {MAX_CONNS_PER_CLIENT_IP}"),
            ),
            None => {
                self.problem(
                    &header,
                    "this [[instance]] has no `max_conns_per_client_ip`; add one (0 = count only)".into(),
                );
                None
            }
        };
        let v4 =
            self.int(table, "ipv4_prefix_len", 0..33, "use 0 to 32").unwrap_or(DEFAULT_IPV4_PREFIX_LEN.into()) as u8;
        let v6 =
            self.int(table, "ipv6_prefix_len", 0..129, "use 0 to 128").unwrap_or(DEFAULT_IPV6_PREFIX_LEN.into()) as u8;
        let exempt = self.list::<Cidr>(table, "exempt", "\"10.0.0.0/8\"");
        let network_limits = self.list::<NetworkLimit>(table, "network_limits", "\"10.0.0.0/8=100\"");
        let total = self
            .int(
                table,
                "max_conns_total",
                0..i64::from(MAX_CONNS_TOTAL) + 1,
                &format!("use 0 (no limit) to {MAX_CONNS_TOTAL}"),
            )
            .unwrap_or(0) as u32;
        let dry_run = self.bool(table, "dry_run").unwrap_or(false);
        let persist = self.bool(table, "persist").unwrap_or(false);
        let when_full = self.when_full(table).unwrap_or_default();
        let refuse_with = self.parsed::<RefuseWith>(table, "refuse_with").unwrap_or_default();
        let epoch = self
            .int(table, "reservation_epoch_ms", 10..60_001, "use 10 to 60000 ms")
            .unwrap_or(DEFAULT_EPOCH_MS as i64);
        let config = Config {
            max_conns_per_client_ip: max.unwrap_or(0) as u32,
            ipv4_prefix_len: v4,
            ipv6_prefix_len: v6,
            exempt,
            network_limits,
            max_conns_total: total,
            dry_run,
        };
        if let Err(e) = config.validate() {
            self.problem(&header, e.to_string());
        }
        if self.problems.len() > before {
            return None;
        }
        Some(InstanceSpec {
            name: name?,
            ports: ports?,
            target: target?,
            config,
            reservation_epoch: Duration::from_millis(epoch as u64),
            when_full,
            refuse_with,
            persist,
        })
    }

    fn ports(&mut self, table: &Table, header: &Range<usize>) -> Option<Vec<u16>> {
        let Some((span, item)) = self.get(table, "ports") else {
            self.problem(header, "this [[instance]] has no `ports`; add ports = [PORT, ...]".into());
            return None;
        };
        let Some(array) = item.as_array() else {
            self.problem(&span, format!("`ports` must be a list like [80, 443], not {}", item.type_name()));
            return None;
        };
        if array.is_empty() {
            self.problem(&span, "`ports` is empty; give at least one port".into());
            return None;
        }
        let mut ports = Vec::new();
        let mut ok = true;
        for value in array.iter() {
            let at = value.span().unwrap_or_else(|| span.clone());
            match value.as_integer() {
                Some(p @ 1..=65535) => ports.push(p as u16),
                _ => {
                    let shown = self.text.get(at.clone()).unwrap_or("this").trim().to_owned();
                    self.problem(&at, format!("{shown} is not a TCP port; give 1 to 65535"));
                    ok = false;
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        ok.then_some(ports)
    }

    /// A list of strings that each parse as `T`, e.g. `exempt`; `example`
    /// is one entry, quoted.
    fn list<T: std::str::FromStr>(&mut self, table: &Table, key: &str, example: &str) -> Vec<T>
    where
        T::Err: std::fmt::Display,
    {
        let Some((span, item)) = self.get(table, key) else { return Vec::new() };
        let Some(array) = item.as_array() else {
            self.problem(&span, format!("`{key}` must be a list like [{example}], not {}", item.type_name()));
            return Vec::new();
        };
        let mut list = Vec::new();
        for value in array.iter() {
            let at = value.span().unwrap_or_else(|| span.clone());
            match value.as_str().map(str::parse::<T>) {
                Some(Ok(entry)) => list.push(entry),
                Some(Err(e)) => self.problem(&at, e.to_string()),
                None => {
                    self.problem(&at, format!("{key} entries are strings like {example}, not {}", value.type_name()))
                }
            }
        }
        list
    }

    /// Problems between instances: names and ports must not clash.
    fn across(&mut self, instances: &[(Range<usize>, InstanceSpec)]) {
        let mut names = BTreeSet::new();
        // Instances with a cgroup target all refuse in connlimit's own
        // network namespace, so they cannot share a port.
        let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
        for (span, spec) in instances {
            if !names.insert(spec.name.as_str()) {
                self.problem(span, format!("instance name {:?} is used twice; names must be unique", spec.name));
            }
            if matches!(spec.target, Target::Cgroup(_)) {
                for &port in &spec.ports {
                    if let Some(other) = ports.insert(port, &spec.name) {
                        self.problem(
                            span,
                            format!(
                                "port {port} is guarded by instance {other:?} too; an instance's ports must be its own"
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
metrics_listen = "127.0.0.1:9100"

[log]
format = "json"
refusal_log_interval = 5

[[instance]]
name = "web"
ports = [443, 80]
cgroup = "/sys/fs/cgroup/system.slice/nginx.service"
max_conns_per_client_ip = 50
ipv6_prefix_len = 64
exempt = ["10.0.0.0/8"]
network_limits = ["203.0.113.0/24=200", "10.1.0.0/16=5"]
max_conns_total = 10000
refuse_with = "http-429"

[[instance]]
name = "db"
ports = [5432]
pid = 1234
max_conns_per_client_ip = 0
dry_run = true
persist = true
reservation_epoch_ms = 500
"#;

    #[test]
    fn a_good_file_parses() {
        let file = parse(GOOD).unwrap();
        assert_eq!(file.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(file.log.format, Some(LogFormat::Json));
        assert_eq!(file.log.refusal_interval, Duration::from_secs(5));
        assert_eq!(file.log.refusal_lines, DEFAULT_REFUSAL_LINES);
        let web = &file.instances[0];
        assert_eq!(web.ports, [80, 443]);
        assert_eq!(web.target, Target::Cgroup("/sys/fs/cgroup/system.slice/nginx.service".into()));
        assert_eq!(web.config.max_conns_per_client_ip, 50);
        assert_eq!((web.config.ipv4_prefix_len, web.config.ipv6_prefix_len), (32, 64));
        assert_eq!(web.config.exempt, ["10.0.0.0/8".parse().unwrap()]);
        let networks: Vec<String> = web.config.network_limits.iter().map(ToString::to_string).collect();
        assert_eq!(networks, ["203.0.113.0/24=200", "10.1.0.0/16=5"]);
        assert_eq!((web.config.max_conns_total, file.instances[1].config.max_conns_total), (10_000, 0));
        assert_eq!((web.refuse_with, file.instances[1].refuse_with), (RefuseWith::Http429, RefuseWith::Reset));
        assert_eq!(web.reservation_epoch, Duration::from_secs(1));
        let db = &file.instances[1];
        assert_eq!(db.target, Target::Pid(1234));
        assert!(db.config.dry_run && db.persist);
        assert_eq!(db.reservation_epoch, Duration::from_millis(500));
    }

    #[test]
    fn a_unit_target_parses_and_one_target_only_is_allowed() {
        let unit = "[[instance]]\nname = \"api\"\nports = [80]\nunit = \"api.service\"\nmax_conns_per_client_ip = 5\n";
        assert_eq!(parse(unit).unwrap().instances[0].target, Target::Unit("api.service".into()));
        let both = format!("{unit}pid = 7\n");
        let problems = parse(&both).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].message, "give one of `cgroup`, `pid` or `unit`, not several");
        let none = "[[instance]]\nname = \"api\"\nports = [80]\nmax_conns_per_client_ip = 5\n";
        assert!(parse(none).unwrap_err()[0].message.contains("unit = \"NAME.service\""));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let bad = r#"metrics_listen = "localhost"
colour = "blue"

[[instance]]
name = "web"
ports = [80, 0, 70000]
cgroup = "relative/path"
max_conns_per_client_ip = -1
exempt = ["10.0.0.0/40"]

[[instance]]
ports = [80]
pid = 12
"#;
        let problems = parse(bad).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [1, 2, 6, 6, 7, 8, 9, 11, 11], "{problems:#?}");
        assert!(problems[0].message.contains("metrics_listen \"localhost\" is not an address"));
        assert!(problems[1].message.contains("unknown key `colour`"));
        assert!(problems[2].message.contains("0 is not a TCP port"));
        assert!(problems[3].message.contains("70000 is not a TCP port"));
        assert!(problems[4].message.contains("absolute path"));
        assert!(problems[5].message.contains("out of range"));
        assert!(problems[6].message.contains("invalid prefix length"));
        let last: Vec<&str> = problems[7..].iter().map(|p| p.message.as_str()).collect();
        assert!(last.iter().any(|m| m.contains("no `name`")), "{last:?}");
        assert!(last.iter().any(|m| m.contains("no `max_conns_per_client_ip`")), "{last:?}");
    }

    #[test]
    fn syntax_errors_and_clashes() {
        let problems = parse("[[instance]]\nname = \"a\"\nports = [80,\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.starts_with("invalid TOML"), "{problems:?}");
        assert_eq!(problems[0].line, 3);

        let two = "[[instance]]\nname = \"a\"\nports = [80]\ncgroup = \"/x\"\nmax_conns_per_client_ip = 1\n\n\
                   [[instance]]\nname = \"a\"\nports = [80]\ncgroup = \"/y\"\nmax_conns_per_client_ip = 1\n";
        let problems = parse(two).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.line == 7));
        assert!(problems[0].message.contains("used twice") || problems[1].message.contains("used twice"));

        assert!(parse("").unwrap_err()[0].message.contains("no instance to run"));
        assert!(parse("[log]\nformat = \"xml\"\n[[instance]]\n").unwrap_err()[0].message.contains("unknown"));
    }

    #[test]
    fn log_keys_are_named_as_the_flags_and_the_old_names_still_work() {
        const INSTANCE: &str =
            "[[instance]]\nname = \"a\"\nports = [80]\ncgroup = \"/x\"\nmax_conns_per_client_ip = 1\n";
        let new = parse(&format!("[log]\nrefusal_log_interval = 3\nrefusal_log_lines = 7\n{INSTANCE}")).unwrap();
        let old = parse(&format!("[log]\nrefusal_interval_secs = 3\nrefusal_lines = 7\n{INSTANCE}")).unwrap();
        assert_eq!(new.log, old.log);
        assert_eq!((new.log.refusal_interval, new.log.refusal_lines), (Duration::from_secs(3), 7));
        let both =
            parse(&format!("[log]\nrefusal_log_interval = 3\nrefusal_interval_secs = 3\n{INSTANCE}")).unwrap_err();
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(both[0].message.contains("old name of `refusal_log_interval`"), "{both:?}");
        let unknown = parse(&format!("[log]\nrefusal_interval = 3\n{INSTANCE}")).unwrap_err();
        assert!(
            unknown[0].message.contains("known keys: format, refusal_log_interval, refusal_log_lines"),
            "{unknown:?}"
        );
    }

    #[test]
    fn what_needs_reattaching() {
        let file = parse(GOOD).unwrap();
        let mut changed = file.instances[0].clone();
        changed.config.max_conns_per_client_ip = 1;
        changed.ports = vec![8443];
        assert!(!file.instances[0].needs_reattach(&changed));
        changed.target = Target::Pid(1);
        assert!(file.instances[0].needs_reattach(&changed));
    }
}
