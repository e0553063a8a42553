//! What a limiter enforces.

use std::net::IpAddr;

use crate::{Cidr, addr};

/// The highest per-client limit; the kernel's counters hold a little more.
pub const MAX_CONNS_PER_CLIENT_IP: u32 = 1_000_000;
/// The most exempt prefixes one limiter takes.
pub const MAX_EXEMPT: usize = connlimit_common::maps::capacity::EXEMPT as usize;

/// A limiter's configuration. The default limits nothing.
///
/// ```
/// use connlimit::Config;
/// let config = Config::new(10)            // at most 10 per client...
///     .with_ipv6_prefix_len(64)            // ...where a client is an IPv6 /64
///     .with_exempt(["10.0.0.0/8".parse()?]); // load balancers are never limited
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
    /// Clients in these prefixes are counted but never refused.
    pub exempt: Vec<Cidr>,
    /// Count and report what would be refused, but refuse nothing.
    pub dry_run: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_conns_per_client_ip: 0,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 128,
            exempt: Vec::new(),
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
    /// Too many exempt prefixes.
    #[error("{0} exempt prefixes are more than the maximum of {MAX_EXEMPT}; merge them into wider prefixes")]
    TooManyExempt(usize),
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
        if self.exempt.len() > MAX_EXEMPT {
            return Err(ConfigError::TooManyExempt(self.exempt.len()));
        }
        Ok(())
    }

    /// Whether a limit is set.
    pub fn is_limited(&self) -> bool {
        self.max_conns_per_client_ip > 0
    }

    /// The key `ip` is counted under: its canonical form cut to the prefix
    /// length of its family.
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        addr::client_key(ip, self.ipv4_prefix_len, self.ipv6_prefix_len)
    }

    /// Whether `ip` is in an exempt prefix.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_unlimited_per_address() {
        let c = Config::default();
        assert!(!c.is_limited());
        assert_eq!((c.ipv4_prefix_len, c.ipv6_prefix_len), (32, 128));
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
    fn keys_group_by_prefix() {
        let c = Config::new(1).with_ipv4_prefix_len(24).with_ipv6_prefix_len(64);
        assert_eq!(c.client_key("10.0.0.9".parse().unwrap()), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(c.client_key("::ffff:10.0.0.9".parse().unwrap()), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(c.client_key("2001:db8::1:2:3:4".parse().unwrap()), "2001:db8::".parse::<IpAddr>().unwrap());
    }
}
