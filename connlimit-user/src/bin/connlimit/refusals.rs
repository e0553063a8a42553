//! Who was refused, and when: found by comparing each client's `refused`
//! counter between two readings of the kernel's client map. The log and
//! `top --sort refused` both use this.
//!
//! The per-client counters are per instance, not per port: an instance
//! guarding several ports can say which ports a client was refused on, not
//! which one of them.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use connlimit::{Config, ebpf::ClientCount};

/// Refusals of one client key since the previous reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub client: IpAddr,
    /// The key's prefix length within its family.
    pub prefix_len: u8,
    /// An exempt client's own key.
    pub exempt: bool,
    /// Refusals since the previous reading.
    pub times: u64,
    /// Connections it holds now.
    pub open: u32,
}

/// Each client's `refused` counter at the previous reading, and when it
/// last went up.
#[derive(Debug, Default)]
pub struct Tracker {
    /// `None` until the first reading: the counters before it are history,
    /// not news.
    last: Option<HashMap<IpAddr, u64>>,
    last_refused: HashMap<IpAddr, Instant>,
}

impl Tracker {
    /// Takes a reading; returns the clients refused since the previous one,
    /// most refusals first. A client key new since the previous reading
    /// counts all its refusals (it was evicted or never seen before).
    pub fn update(&mut self, clients: &[ClientCount], now: Instant) -> Vec<Refused> {
        let current: HashMap<IpAddr, u64> = clients.iter().map(|c| (c.client, c.refused)).collect();
        let mut refused = Vec::new();
        if let Some(last) = &self.last {
            for c in clients {
                // A counter lower than before belongs to a key evicted and
                // made again: all of it is new.
                let before = last.get(&c.client).copied().filter(|&b| b <= c.refused).unwrap_or(0);
                if c.refused > before {
                    refused.push(Refused {
                        client: c.client,
                        prefix_len: c.prefix_len,
                        exempt: c.exempt,
                        times: c.refused - before,
                        open: c.open,
                    });
                    self.last_refused.insert(c.client, now);
                }
            }
        }
        self.last_refused.retain(|client, _| current.contains_key(client));
        self.last = Some(current);
        refused.sort_by(|a, b| b.times.cmp(&a.times).then(a.client.cmp(&b.client)));
        refused
    }

    /// When `client` was last seen refused, if since tracking began.
    pub fn last_refused(&self, client: IpAddr) -> Option<Instant> {
        self.last_refused.get(&client).copied()
    }
}

/// A client key as people write it: the address, with its prefix when
/// grouped, marked when exempt.
pub fn client_label(client: IpAddr, prefix_len: u8, exempt: bool) -> String {
    let full = if client.is_ipv4() { 32 } else { 128 };
    let label = if prefix_len == full { client.to_string() } else { format!("{client}/{prefix_len}") };
    if exempt { format!("{label} (exempt)") } else { label }
}

/// "port 443" or "ports 80, 443".
pub fn ports_phrase(ports: &[u16]) -> String {
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    if ports.len() == 1 { format!("port {list}") } else { format!("ports {list}") }
}

/// The sentence for one client, e.g. "client 203.0.113.7 refused 412 times
/// on port 443 in the last 10 s, holds 50 of 50".
pub fn sentence(r: &Refused, config: &Config, ports: &[u16], interval: Duration) -> String {
    let verb = if config.dry_run { "would have been refused (dry run)" } else { "refused" };
    let holds = match config.max_conns_per_client_ip {
        0 => format!("holds {} (no limit)", r.open),
        max => format!("holds {} of {max}", r.open),
    };
    format!(
        "client {} {verb} {} {} on {} in the last {} s, {holds}",
        client_label(r.client, r.prefix_len, r.exempt),
        r.times,
        if r.times == 1 { "time" } else { "times" },
        ports_phrase(ports),
        interval.as_secs_f64().round() as u64
    )
}

/// Logs one line per refused client, at most `max_lines`, then one line
/// counting the rest: a flood of clients cannot flood the log.
pub fn log(instance: &str, refused: &[Refused], config: &Config, ports: &[u16], interval: Duration, max_lines: usize) {
    for r in refused.iter().take(max_lines) {
        tracing::warn!(
            instance,
            client = %client_label(r.client, r.prefix_len, r.exempt),
            refused = r.times,
            ports = ?ports,
            interval_secs = interval.as_secs(),
            open = r.open,
            limit = config.max_conns_per_client_ip,
            dry_run = config.dry_run,
            "{}",
            sentence(r, config, ports, interval)
        );
    }
    if refused.len() > max_lines {
        let rest = &refused[max_lines..];
        let times: u64 = rest.iter().map(|r| r.times).sum();
        tracing::warn!(
            instance,
            clients = rest.len(),
            refused = times,
            interval_secs = interval.as_secs(),
            "{} more clients refused ({times} times) on {} in the last {} s",
            rest.len(),
            ports_phrase(ports),
            interval.as_secs_f64().round() as u64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(i: u8, open: u32, refused: u64) -> ClientCount {
        ClientCount {
            client: IpAddr::from([203, 0, 113, i]),
            prefix_len: 32,
            exempt: false,
            open,
            reserved: 0,
            accepted: 0,
            refused,
        }
    }

    #[test]
    fn refusals_are_the_counter_differences() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        // The first reading is a baseline.
        assert!(t.update(&[client(7, 50, 100)], t0).is_empty());
        let t1 = t0 + Duration::from_secs(10);
        let got = t.update(&[client(7, 50, 512), client(8, 1, 0), client(9, 2, 3)], t1);
        assert_eq!(
            got,
            [
                Refused { client: IpAddr::from([203, 0, 113, 7]), prefix_len: 32, exempt: false, times: 412, open: 50 },
                Refused { client: IpAddr::from([203, 0, 113, 9]), prefix_len: 32, exempt: false, times: 3, open: 2 },
            ]
        );
        assert_eq!(t.last_refused(IpAddr::from([203, 0, 113, 7])), Some(t1));
        assert_eq!(t.last_refused(IpAddr::from([203, 0, 113, 8])), None);
        // Nothing new; an evicted and re-made key counts from zero.
        assert!(t.update(&[client(7, 50, 512), client(9, 2, 3)], t1).is_empty());
        let got = t.update(&[client(7, 0, 2)], t1);
        assert_eq!(got[0].times, 2);
        assert_eq!(t.last_refused(IpAddr::from([203, 0, 113, 9])), None, "forgotten with its key");
    }

    #[test]
    fn sentences_name_the_client_port_and_holdings() {
        let config = Config::new(50);
        let r = Refused { client: IpAddr::from([203, 0, 113, 7]), prefix_len: 32, exempt: false, times: 412, open: 50 };
        assert_eq!(
            sentence(&r, &config, &[443], Duration::from_secs(10)),
            "client 203.0.113.7 refused 412 times on port 443 in the last 10 s, holds 50 of 50"
        );
        let grouped = Config::new(0).with_ipv4_prefix_len(24).with_dry_run(true);
        let r = Refused { client: IpAddr::from([203, 0, 113, 0]), prefix_len: 24, exempt: false, times: 1, open: 3 };
        assert_eq!(
            sentence(&r, &grouped, &[80, 443], Duration::from_secs(5)),
            "client 203.0.113.0/24 would have been refused (dry run) 1 time on ports 80, 443 in the last 5 s, holds 3 (no limit)"
        );
    }
}
