//! Per-network limits: a different per-client limit for the clients of one
//! network prefix (an office NAT, a partner's range).

use std::{fmt, str::FromStr};

use crate::{Cidr, CidrError, MAX_CONNS_PER_CLIENT_IP};

/// A per-client limit for the clients in `cidr`, written `CIDR=N`.
///
/// The longest prefix holding a client gives its limit (exempt prefixes
/// take part as limit 0); `0` means unlimited, like an exempt prefix.
///
/// ```
/// use connlimit::NetworkLimit;
/// let office: NetworkLimit = "203.0.113.0/24=100".parse()?;
/// assert_eq!((office.cidr.to_string().as_str(), office.limit), ("203.0.113.0/24", 100));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetworkLimit {
    /// The clients it applies to.
    pub cidr: Cidr,
    /// Most concurrent connections per client key in `cidr`; 0 = unlimited.
    pub limit: u32,
}

impl NetworkLimit {
    /// A limit of `limit` per client in `cidr`.
    pub fn new(cidr: Cidr, limit: u32) -> Self {
        Self { cidr, limit }
    }
}

/// Why a string is not `CIDR=N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkLimitError {
    /// No `=`.
    #[error("{0:?} is not CIDR=N; write a prefix and its per-client limit, e.g. 10.0.0.0/8=100")]
    Shape(String),
    /// The prefix does not parse.
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// The limit is not a number in range.
    #[error("{0:?} is not a limit; give 0 (unlimited) to {MAX_CONNS_PER_CLIENT_IP}")]
    Limit(String),
}

impl FromStr for NetworkLimit {
    type Err = NetworkLimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cidr, limit) = s.split_once('=').ok_or_else(|| NetworkLimitError::Shape(s.to_owned()))?;
        let cidr: Cidr = cidr.trim().parse()?;
        let limit = match limit.trim().parse::<u32>() {
            Ok(n) if n <= MAX_CONNS_PER_CLIENT_IP => n,
            _ => return Err(NetworkLimitError::Limit(limit.to_owned())),
        };
        Ok(Self { cidr, limit })
    }
}

impl fmt::Display for NetworkLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.cidr, self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_explains() {
        let n: NetworkLimit = " 10.1.2.3/8 = 7".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8=7");
        assert_eq!("2001:db8::/32=0".parse::<NetworkLimit>().unwrap().limit, 0);
        assert_eq!(
            "10.0.0.0/8".parse::<NetworkLimit>().unwrap_err().to_string(),
            "\"10.0.0.0/8\" is not CIDR=N; write a prefix and its per-client limit, e.g. 10.0.0.0/8=100"
        );
        assert!(matches!("10.0.0.0/8=x".parse::<NetworkLimit>(), Err(NetworkLimitError::Limit(_))));
        assert!(matches!("10.0.0.0/8=2000000".parse::<NetworkLimit>(), Err(NetworkLimitError::Limit(_))));
        assert!(matches!("10.0.0.0/40=1".parse::<NetworkLimit>(), Err(NetworkLimitError::Cidr(_))));
    }
}
