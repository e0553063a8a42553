//! Between `std::net` addresses and the kernel's four-word form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use connlimit_common::addr::AddrWords;

/// The address as one client: IPv4-mapped IPv6 becomes the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The kernel's form of `ip`: IPv6 bytes in network order, IPv4 mapped.
pub fn to_words(ip: IpAddr) -> AddrWords {
    let bytes = match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The address the kernel's form stands for; mapped addresses come back as IPv4.
pub fn from_words(words: AddrWords) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    canonical(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// `ip` with all but its first `prefix_len` bits cleared (bits counted within
/// its own family: 0..=32 for IPv4).
pub fn mask(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len.min(128))).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

/// The key a client is counted under, exactly as the kernel computes it.
pub fn client_key(ip: IpAddr, ipv4_prefix_len: u8, ipv6_prefix_len: u8) -> IpAddr {
    from_words(connlimit_common::maps::ClientKey::grouped(&to_words(ip), ipv4_prefix_len, ipv6_prefix_len).addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for ip in ["10.1.2.3", "::1", "2001:db8::ff", "0.0.0.0", "255.255.255.255"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_words(to_words(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(from_words(to_words(mapped)), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn client_key_agrees_with_mask() {
        let ip: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(client_key(ip, 32, 64), mask(ip, 64));
        let ip: IpAddr = "::ffff:198.51.100.77".parse().unwrap();
        assert_eq!(client_key(ip, 24, 128), "198.51.100.0".parse::<IpAddr>().unwrap());
        assert_eq!(mask("10.9.8.7".parse().unwrap(), 0), "0.0.0.0".parse::<IpAddr>().unwrap());
    }
}
