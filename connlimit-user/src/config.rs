//! What a limiter enforces.

use std::net::IpAddr;

use crate::{Cidr, NetworkLimit, addr};

/// The highest per-client limit; the kernel's counters hold a little more.
pub const MAX_CONNS_PER_CLIENT_IP: u32 = 1_000_000;
/// The highest total limit.
pub const MAX_CONNS_TOTAL: u32 = 100_000_000;
/// The most exempt prefixes and network limits one limiter takes, together.
pub const MAX_EXEMPT: usize = connlimit_common::maps::capacity::EXEMPT as usize;

/// A limiter's configuration. The default limits nothing.
///
/// ```
/// use connlimit::Config;
/// let config = Config::new(10)            // at most 10 per client...
///     .with_ipv6_prefix_len(64)            // ...where a client is an IPv6 /64
///     .with_exempt(["10.0.0.0/8".parse()?])  // load balancers are never limited
///     .with_network_limits(["203.0.113.0/24=100".parse()?]) // the office NAT gets 100
///     .with_max_conns_total(5000);         // and the server 5000 in all
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most concurrent connections one client may hold; 0 means unlimited.
    pub max_conns_per_client_ip: u32,
    /// IPv4 clients are grouped by this many leading bits: 32 (the default)
    /// makes every address its own client, 24 counts a /24 as one, 0 counts
    /// all IPv4 clients together.
    pub ipv4_prefix_len: u8,
    /// IPv6 clients are grouped by this many leading bits: 128 by default;
    /// 64 stops one host from dodging the limit with many addresses.
    pub ipv6_prefix_len: u8,
    /// Clients in these prefixes are counted under their own address and
    /// never refused (like a network limit of 0).
    pub exempt: Vec<Cidr>,
    /// Per-client limits for the clients of some networks: the longest
    /// prefix holding a client (exempt prefixes included) gives its limit.
    pub network_limits: Vec<NetworkLimit>,
    /// Most concurrent connections across all clients; 0 means unlimited.
    /// Exempt clients' connections count toward it but are never refused.
    pub max_conns_total: u32,
    /// Count and report what would be refused, but refuse nothing.
    pub dry_run: bool,
}

/// The default IPv4 grouping: each address is a client (as go-connlimit).
pub const DEFAULT_IPV4_PREFIX_LEN: u8 = 32;
/// The default IPv6 grouping: each /64 is a client. One host usually owns a
/// whole /64 and can bind any of its addresses without privilege
/// (`IPV6_FREEBIND`), so counting per address (go-connlimit's /128) would
/// let it hold the limit once per address, and fill the client map.
pub const DEFAULT_IPV6_PREFIX_LEN: u8 = 64;

impl Default for Config {
    fn default() -> Self {
        Self {
            max_conns_per_client_ip: 0,
            ipv4_prefix_len: DEFAULT_IPV4_PREFIX_LEN,
            ipv6_prefix_len: DEFAULT_IPV6_PREFIX_LEN,
            exempt: Vec::new(),
            network_limits: Vec::new(),
            max_conns_total: 0,
            dry_run: false,
        }
    }
}

/// Why a [`Config`] was rejected. Nothing is changed when it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The limit is above [`MAX_CONNS_PER_CLIENT_IP`].
    #[error("max connections per client IP {0} is above the maximum of {MAX_CONNS_PER_CLIENT_IP}; use 0 for no limit")]
    LimitTooHigh(u32),
    /// The IPv4 prefix length is above 32.
    #[error("IPv4 prefix length {0} is out of range; use 0 to 32 (32 counts each address apart)")]
    Ipv4PrefixLen(u8),
    /// The IPv6 prefix length is above 128.
    #[error("IPv6 prefix length {0} is out of range; use 0 to 128 (128 counts each address apart, 64 each /64)")]
    Ipv6PrefixLen(u8),
    /// Too many exempt prefixes and network limits.
    #[error(
        "{0} exempt prefixes and network limits are more than the maximum of {MAX_EXEMPT}; merge them into wider prefixes"
    )]
    TooManyExempt(usize),
    /// The total limit is above [`MAX_CONNS_TOTAL`].
    #[error("max connections in total {0} is above the maximum of {MAX_CONNS_TOTAL}; use 0 for no total limit")]
    TotalTooHigh(u32),
    /// A prefix is given two limits (or is both exempt and limited).
    #[error("{0} is given more than one limit (or is also exempt); give each prefix one")]
    DuplicateNetwork(Cidr),
}

impl Config {
    /// A configuration allowing `max_conns_per_client_ip` connections per
    /// client (0 for unlimited), with the other fields at their defaults.
    pub fn new(max_conns_per_client_ip: u32) -> Self {
        Self { max_conns_per_client_ip, ..Self::default() }
    }

    /// Sets [`ipv4_prefix_len`](Self::ipv4_prefix_len).
    pub fn with_ipv4_prefix_len(mut self, len: u8) -> Self {
        self.ipv4_prefix_len = len;
        self
    }

    /// Sets [`ipv6_prefix_len`](Self::ipv6_prefix_len).
    pub fn with_ipv6_prefix_len(mut self, len: u8) -> Self {
        self.ipv6_prefix_len = len;
        self
    }

    /// Sets [`exempt`](Self::exempt).
    pub fn with_exempt(mut self, exempt: impl IntoIterator<Item = Cidr>) -> Self {
        self.exempt = exempt.into_iter().collect();
        self
    }

    /// Sets [`network_limits`](Self::network_limits).
    pub fn with_network_limits(mut self, limits: impl IntoIterator<Item = NetworkLimit>) -> Self {
        self.network_limits = limits.into_iter().collect();
        self
    }

    /// Sets [`max_conns_total`](Self::max_conns_total).
    pub fn with_max_conns_total(mut self, max: u32) -> Self {
        self.max_conns_total = max;
        self
    }

    /// Sets [`dry_run`](Self::dry_run).
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Checks every field; the limiters call this before taking a config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_conns_per_client_ip > MAX_CONNS_PER_CLIENT_IP {
            return Err(ConfigError::LimitTooHigh(self.max_conns_per_client_ip));
        }
        if self.ipv4_prefix_len > 32 {
            return Err(ConfigError::Ipv4PrefixLen(self.ipv4_prefix_len));
        }
        if self.ipv6_prefix_len > 128 {
            return Err(ConfigError::Ipv6PrefixLen(self.ipv6_prefix_len));
        }
        if self.exempt.len() + self.network_limits.len() > MAX_EXEMPT {
            return Err(ConfigError::TooManyExempt(self.exempt.len() + self.network_limits.len()));
        }
        if self.max_conns_total > MAX_CONNS_TOTAL {
            return Err(ConfigError::TotalTooHigh(self.max_conns_total));
        }
        if let Some(n) = self.network_limits.iter().find(|n| n.limit > MAX_CONNS_PER_CLIENT_IP) {
            return Err(ConfigError::LimitTooHigh(n.limit));
        }
        let mut seen = std::collections::HashSet::new();
        for cidr in self.network_limits.iter().map(|n| &n.cidr).chain(self.exempt.iter()) {
            if !seen.insert(*cidr) {
                // The same exempt prefix twice is harmless.
                if self.network_limits.iter().any(|n| n.cidr == *cidr) {
                    return Err(ConfigError::DuplicateNetwork(*cidr));
                }
            }
        }
        Ok(())
    }

    /// Whether a limit is set (per client, per network or in total).
    pub fn is_limited(&self) -> bool {
        self.max_conns_per_client_ip > 0 || self.max_conns_total > 0 || self.network_limits.iter().any(|n| n.limit > 0)
    }

    /// The per-client limit of `ip` (0 = unlimited) and whether it is
    /// exempt: the longest prefix holding it among the exempt prefixes
    /// (limit 0, exempt) and the network limits (a network limit of 0 is
    /// exempt too) decides; without one, [`max_conns_per_client_ip`](Self::max_conns_per_client_ip).
    pub fn limit_for(&self, ip: IpAddr) -> (u32, bool) {
        let exempt = self.exempt.iter().filter(|c| c.contains(ip)).map(|c| (c.prefix_len(), 0));
        let networks =
            self.network_limits.iter().filter(|n| n.cidr.contains(ip)).map(|n| (n.cidr.prefix_len(), n.limit));
        match exempt.chain(networks).max_by_key(|(len, _)| *len) {
            Some((_, limit)) => (limit, limit == 0),
            None => (self.max_conns_per_client_ip, false),
        }
    }

    /// The key `ip` is counted under: its canonical form cut to the prefix
    /// length of its family.
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        addr::client_key(ip, self.ipv4_prefix_len, self.ipv6_prefix_len)
    }

    /// Whether `ip` is exempt: the longest prefix holding it is exempt or
    /// has a network limit of 0.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.limit_for(ip).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_unlimited_per_ipv4_address_and_ipv6_slash_64() {
        let c = Config::default();
        assert!(!c.is_limited());
        assert_eq!((c.ipv4_prefix_len, c.ipv6_prefix_len), (32, 64));
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        let e = Config::new(5).with_ipv4_prefix_len(33).validate().unwrap_err();
        assert_eq!(e.to_string(), "IPv4 prefix length 33 is out of range; use 0 to 32 (32 counts each address apart)");
        assert!(matches!(Config::new(5).with_ipv6_prefix_len(129).validate(), Err(ConfigError::Ipv6PrefixLen(129))));
        assert!(matches!(Config::new(2_000_000).validate(), Err(ConfigError::LimitTooHigh(_))));
        let many = vec!["10.0.0.1".parse().unwrap(); MAX_EXEMPT + 1];
        assert!(matches!(Config::new(1).with_exempt(many).validate(), Err(ConfigError::TooManyExempt(_))));
    }

    #[test]
    fn the_longest_prefix_gives_the_limit() {
        let c = Config::new(5).with_exempt(["10.0.0.0/8".parse().unwrap()]).with_network_limits([
            "10.1.0.0/16=50".parse().unwrap(),
            "10.1.2.0/24=0".parse().unwrap(),
            "2001:db8::/32=7".parse().unwrap(),
        ]);
        c.validate().unwrap();
        let at = |s: &str| c.limit_for(s.parse().unwrap());
        assert_eq!(at("192.0.2.1"), (5, false));
        assert_eq!(at("10.9.9.9"), (0, true));
        assert_eq!(at("10.1.9.9"), (50, false), "a longer limited prefix inside an exempt one");
        assert_eq!(at("::ffff:10.1.2.3"), (0, true));
        assert_eq!(at("2001:db8::1"), (7, false));
        assert!(c.is_exempt("10.1.2.3".parse().unwrap()) && !c.is_exempt("10.1.3.3".parse().unwrap()));
        assert!(Config::default().with_network_limits(["10.0.0.0/8=1".parse().unwrap()]).is_limited());
        assert!(Config::default().with_max_conns_total(1).is_limited());
    }

    #[test]
    fn conflicting_network_limits_are_refused() {
        let twice =
            Config::new(1).with_network_limits(["10.0.0.0/8=1".parse().unwrap(), "10.0.0.0/8=2".parse().unwrap()]);
        assert_eq!(
            twice.validate().unwrap_err().to_string(),
            "10.0.0.0/8 is given more than one limit (or is also exempt); give each prefix one"
        );
        let both = Config::new(1)
            .with_exempt(["10.0.0.0/8".parse().unwrap()])
            .with_network_limits(["10.0.0.0/8=2".parse().unwrap()]);
        assert!(matches!(both.validate(), Err(ConfigError::DuplicateNetwork(_))));
        assert!(matches!(
            Config::new(1).with_max_conns_total(MAX_CONNS_TOTAL + 1).validate(),
            Err(ConfigError::TotalTooHigh(_))
        ));
    }

    #[test]
    fn keys_group_by_prefix() {
        let c = Config::new(1).with_ipv4_prefix_len(24).with_ipv6_prefix_len(64);
        assert_eq!(c.client_key("10.0.0.9".parse().unwrap()), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(c.client_key("::ffff:10.0.0.9".parse().unwrap()), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(c.client_key("2001:db8::1:2:3:4".parse().unwrap()), "2001:db8::".parse::<IpAddr>().unwrap());
    }
}
