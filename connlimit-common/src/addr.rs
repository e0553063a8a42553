//! Client addresses as the kernel sees them, and prefix masks over them
//! (keys are made from them in [`ClientKey`](crate::maps::ClientKey)).
//!
//! An address is four `u32` words holding the 16 bytes of an IPv6 address in
//! network byte order, exactly as `bpf_sk_lookup.remote_ip6` and
//! `bpf_sock_ops.remote_ip6` present it. IPv4 addresses are stored in their
//! IPv4-mapped form (`::ffff:a.b.c.d`), so an IPv4 client is the same client
//! whether it reached an `AF_INET` or a dual-stack `AF_INET6` listener.

/// An address: 16 bytes of IPv6 in network byte order, as four words.
pub type AddrWords = [u32; 4];

/// Number of leading bits of an IPv4-mapped address that are the `::ffff:` prefix.
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

/// Word 2 of an IPv4-mapped address (`0000:ffff` in network byte order).
const V4_MAPPED_WORD2: u32 = 0x0000_ffffu32.to_be();

/// The IPv4-mapped form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> AddrWords {
    [0, 0, V4_MAPPED_WORD2, ip4_be]
}

/// Whether `addr` is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &AddrWords) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD2
}

/// Keeps the first `prefix_len` bits of `addr` (0..=128) and clears the rest.
#[inline(always)]
pub const fn mask(addr: &AddrWords, prefix_len: u32) -> AddrWords {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = i as u32 * 32;
        let bits = if prefix_len <= start {
            0
        } else if prefix_len - start >= 32 {
            32
        } else {
            prefix_len - start
        };
        // `!0 << 32` overflows, hence the two ends handled apart.
        let host_mask = match bits {
            0 => 0,
            32 => u32::MAX,
            b => u32::MAX << (32 - b),
        };
        out[i] = addr[i] & host_mask.to_be();
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_key(addr: &AddrWords, v4: u8, v6: u8) -> AddrWords {
        crate::maps::ClientKey::grouped(addr, v4, v6).addr
    }

    fn words(bytes: [u8; 16]) -> AddrWords {
        let mut w = [0u32; 4];
        for (i, chunk) in bytes.chunks(4).enumerate() {
            w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        w
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> AddrWords {
        v4_mapped(u32::from_ne_bytes([a, b, c, d]))
    }

    #[test]
    fn mapped_form_matches_the_ipv6_bytes() {
        let expect = words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(v4(10, 1, 2, 3), expect);
        assert!(is_v4_mapped(&expect));
        assert!(!is_v4_mapped(&words([0; 16])));
    }

    #[test]
    fn ipv4_prefix_groups_the_low_bits() {
        assert_eq!(client_key(&v4(10, 1, 2, 3), 24, 128), v4(10, 1, 2, 0));
        assert_eq!(client_key(&v4(10, 1, 2, 3), 32, 128), v4(10, 1, 2, 3));
        assert_eq!(client_key(&v4(10, 1, 2, 3), 0, 128), v4(0, 0, 0, 0));
        assert_eq!(client_key(&v4(10, 1, 2, 3), 12, 128), v4(10, 0, 0, 0));
    }

    #[test]
    fn ipv6_prefix_groups_the_interface_id() {
        let a = words([0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let a64 = words([0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(client_key(&a, 32, 64), a64);
        assert_eq!(client_key(&a, 32, 128), a);
        let a60 = words([0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(client_key(&a, 32, 60), a60);
    }
}
