//! IP prefixes (`10.0.0.0/8`, `2001:db8::/32`) for exempt lists.

use std::{fmt, net::IpAddr, str::FromStr};

use crate::addr;

/// An IP prefix: an address and how many of its leading bits matter.
///
/// IPv4-mapped IPv6 prefixes (`::ffff:10.0.0.0/104`) are stored as their IPv4
/// form, so they match IPv4 clients however those connected.
///
/// ```
/// use connlimit::Cidr;
/// let lb: Cidr = "10.1.0.0/16".parse()?;
/// assert!(lb.contains("10.1.200.3".parse()?));
/// assert!(!lb.contains("10.2.0.1".parse()?));
/// let one: Cidr = "2001:db8::7".parse()?; // a bare address is a /128
/// assert_eq!(one.prefix_len(), 128);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a string is not an IP prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part does not parse.
    #[error("{0:?} is not an IP address; write a prefix like 10.0.0.0/8 or 2001:db8::/32")]
    BadAddress(String),
    /// The length part is not a number or too long for the family.
    #[error("{input:?} has an invalid prefix length; use /0 to /{max} for this address family")]
    BadLength {
        /// The whole input.
        input: String,
        /// Longest prefix of the family.
        max: u8,
    },
}

impl Cidr {
    /// A prefix; bits past `prefix_len` are cleared. Errors when `prefix_len`
    /// is longer than the family allows.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let (addr, prefix_len) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix_len >= 96 => (IpAddr::V4(v4), prefix_len - 96),
                _ => (addr, prefix_len),
            },
            IpAddr::V4(_) => (addr, prefix_len),
        };
        let max = max_len(addr);
        if prefix_len > max {
            return Err(CidrError::BadLength { input: format!("{addr}/{prefix_len}"), max });
        }
        Ok(Self { addr: addr::mask(addr, prefix_len), prefix_len })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Leading bits that matter: 0..=32 for IPv4, 0..=128 for IPv6.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside this prefix. IPv4-mapped IPv6 addresses match
    /// as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = addr::canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && addr::mask(ip, self.prefix_len) == self.addr
    }

    /// The prefix over the 128-bit form the kernel keys on (IPv4 as
    /// `::ffff:a.b.c.d`): `(prefix length, address words)`.
    pub fn to_kernel(&self) -> (u32, connlimit_common::addr::AddrWords) {
        let extra = if self.addr.is_ipv4() { connlimit_common::addr::V4_MAPPED_PREFIX_LEN } else { 0 };
        (extra + u32::from(self.prefix_len), addr::to_words(self.addr))
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| CidrError::BadAddress(ip.to_owned()))?;
        let max = match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 128,
            _ => max_len(addr),
        };
        let bad_length = || CidrError::BadLength { input: s.to_owned(), max };
        let prefix_len = match len {
            Some(len) => len.trim().parse::<u8>().map_err(|_| bad_length())?,
            None => max,
        };
        if prefix_len > max {
            return Err(bad_length());
        }
        Self::new(addr, prefix_len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!("::ffff:10.0.0.0/104".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn rejects_bad_input_with_the_fix() {
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.0/33\" has an invalid prefix length; use /0 to /32 for this address family"
        );
        let e = "10.0.0/8".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("is not an IP address"), "{e}");
        assert!("::/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn contains_matches_mapped_clients_as_ipv4() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(c.contains("::ffff:192.0.2.9".parse().unwrap()));
        assert!(!c.contains("2001:db8::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
    }

    #[test]
    fn kernel_form_is_the_mapped_prefix() {
        let (len, words) = "10.0.0.0/8".parse::<Cidr>().unwrap().to_kernel();
        assert_eq!(len, 104);
        assert_eq!(words, connlimit_common::addr::v4_mapped(u32::from_ne_bytes([10, 0, 0, 0])));
    }
}
