//! The kernel object embedded in this build, and its hash, which tells an
//! operator which programs an instance runs.

/// The kernel programs: built for the BPF target by this crate's build
/// script, or the object kept in the crate when the BPF toolchain is absent.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connlimit.bpf.o"));

/// SHA-256 of the embedded kernel object, in hex.
pub const OBJECT_SHA256: &str = env!("CONNLIMIT_BPF_OBJECT_SHA256");

/// The first 8 bytes of [`OBJECT_SHA256`]: what `connlimit --version` and
/// `connlimit status` show (as 16 hex digits), and what each instance records
/// when it attaches ([`InstanceInfo::object_hash`](connlimit_common::maps::InstanceInfo::object_hash)).
pub const OBJECT_HASH: [u8; 8] = short_hash(OBJECT_SHA256.as_bytes());

/// The short hash as 16 hex digits; all zeros (an instance attached by a
/// version that did not record it) shows as "unknown".
pub fn hash_hex(hash: [u8; 8]) -> String {
    if hash == [0; 8] { "unknown".to_owned() } else { hash.iter().map(|b| format!("{b:02x}")).collect() }
}

const fn short_hash(hex: &[u8]) -> [u8; 8] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("CONNLIMIT_BPF_OBJECT_SHA256 is not lower-case hex"),
        }
    }
    let mut out = [0; 8];
    let mut i = 0;
    while i < 8 {
        out[i] = nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept object (`bpf/connlimit.bpf.o`, which builds without the BPF
    /// toolchain) must be what the sources build to. The build is
    /// reproducible across checkouts (see `build_bpf.rs`), so the whole file
    /// is compared.
    #[test]
    fn kept_object_matches_a_fresh_build() {
        let source = env!("CONNLIMIT_BPF_OBJECT_SOURCE");
        if source != "fresh" {
            if std::env::var("CONNLIMIT_SKIP_STALE_OBJECT_CHECK").is_ok_and(|v| v == "1") {
                eprintln!("skipped: CONNLIMIT_SKIP_STALE_OBJECT_CHECK=1");
                return;
            }
            panic!(
                "this build embeds the {source} kernel object, so the kept one cannot be checked against \
                 a fresh build; run `cargo xtask bootstrap` to install the BPF toolchain, or set \
                 CONNLIMIT_SKIP_STALE_OBJECT_CHECK=1 to skip this check explicitly"
            );
        }
        let kept = include_bytes!("../../bpf/connlimit.bpf.o");
        assert!(
            kept[..] == OBJECT[..],
            "connlimit-user/bpf/connlimit.bpf.o is stale: it differs from a fresh build of connlimit-ebpf \
             ({} bytes kept, {} built); refresh it with `cargo xtask bpf-object` and commit it",
            kept.len(),
            OBJECT.len()
        );
    }

    #[test]
    fn short_hash_is_the_start_of_the_sha256() {
        assert_eq!(hash_hex(OBJECT_HASH), OBJECT_SHA256[..16]);
        assert_eq!(hash_hex([0; 8]), "unknown");
        assert_eq!(short_hash(b"00ff10a0e5000000"), [0, 0xff, 0x10, 0xa0, 0xe5, 0, 0, 0]);
    }
}
