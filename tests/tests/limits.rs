//! The total limit and per-network limits in the kernel, against an
//! unmodified server in a namespace and cgroup of its own (needs root).

use std::net::IpAddr;

use connlimit::{Config, NetworkLimit};
use harness::{client_v4, eventually, require_kernel};

mod common;
use common::{Setup, WAIT, assert_accepted, assert_refused, burst};

fn net(s: &str) -> NetworkLimit {
    s.parse().unwrap()
}

fn wait_total(s: &Setup, n: u64) {
    assert!(
        eventually(WAIT, || s.limiter.total_open().unwrap() == n),
        "total open {}, want {n}",
        s.limiter.total_open().unwrap()
    );
}

/// A burst of 200 parallel connects from 100 addresses (2 each) under a
/// total limit of 25: exactly 25 are established, whatever the order.
#[test]
fn total_limit_is_exact_under_a_burst_from_many_addresses() {
    require_kernel!();
    let s = Setup::new(Config::new(0).with_max_conns_total(25));
    let sources: Vec<IpAddr> = (0..200).map(|i| client_v4(1 + i % 100)).collect();
    for run in 0..3 {
        let (held, refused) = burst(&s, &sources);
        assert_eq!((held.len(), refused), (25, 175), "run {run}");
        wait_total(&s, 25);
        drop(held);
        wait_total(&s, 0);
    }
    assert_accepted(&s.server, 75);
    let stats = s.limiter.stats().unwrap();
    assert_eq!((stats.accepted, stats.refused, stats.total_refused), (75, 525, 525));
}

/// Per-client and total limits together: each client its 2, and the
/// instance 5 in all; raising the total live admits at once, lowering it
/// closes nothing.
#[test]
fn total_and_per_client_limits_hold_together_and_change_live() {
    require_kernel!();
    let s = Setup::new(Config::new(2).with_max_conns_total(5));
    let (a, b, c) = (client_v4(1), client_v4(2), client_v4(3));
    let mut held = vec![s.hello(a).unwrap(), s.hello(a).unwrap()];
    assert_refused(s.hello(a)); // a's own limit
    held.push(s.hello(b).unwrap());
    held.push(s.hello(b).unwrap());
    held.push(s.hello(c).unwrap());
    assert_refused(s.hello(c)); // the total: c is under its own limit
    assert_eq!(s.limiter.stats().unwrap().total_refused, 1);
    s.limiter.set_config(Config::new(2).with_max_conns_total(6)).unwrap();
    held.push(s.hello(c).unwrap());
    s.limiter.set_config(Config::new(2).with_max_conns_total(3)).unwrap();
    wait_total(&s, 6); // nothing closed
    held.truncate(3);
    wait_total(&s, 3);
    assert_refused(s.hello(client_v4(4)));
    held.pop();
    wait_total(&s, 2);
    held.push(s.hello(client_v4(4)).unwrap());
    assert_accepted(&s.server, 7);
}

/// Exempt clients are never refused by the total, but their connections
/// count toward it.
#[test]
fn exempt_clients_count_toward_the_total_but_are_never_refused() {
    require_kernel!();
    let lb = client_v4(9);
    let s = Setup::new(Config::new(1).with_max_conns_total(2).with_exempt([lb.into_cidr()]));
    let held: Vec<_> = (0..3).map(|_| s.hello(lb).unwrap()).collect();
    wait_total(&s, 3);
    assert_refused(s.hello(client_v4(1)));
    drop(held);
    wait_total(&s, 0);
    let _a = s.hello(client_v4(1)).unwrap();
}

trait IntoCidr {
    fn into_cidr(self) -> connlimit::Cidr;
}

impl IntoCidr for IpAddr {
    fn into_cidr(self) -> connlimit::Cidr {
        connlimit::Cidr::new(self, if self.is_ipv4() { 32 } else { 128 }).unwrap()
    }
}

/// Overlapping network limits: the longest prefix wins, over exempt
/// prefixes too, and 0 makes a network unlimited (exempt).
#[test]
fn the_longest_network_prefix_gives_the_limit() {
    require_kernel!();
    let config = Config::new(1).with_exempt(["127.3.0.0/16".parse().unwrap()]).with_network_limits([
        net("127.1.0.0/16=3"),
        net("127.1.5.0/24=2"),
        net("127.1.5.7=0"),
        net("127.3.3.0/24=1"),
    ]);
    let s = Setup::new(config);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let check = |client: IpAddr, admitted: usize| {
        let held: Vec<_> =
            (0..admitted).map(|i| s.hello(client).unwrap_or_else(|e| panic!("{client} #{i}: {e}"))).collect();
        if admitted < 10 {
            assert_refused(s.hello(client));
        }
        held
    };
    let _default = check(ip("127.2.0.1"), 1); // no network: the instance's 1
    let _wide = check(ip("127.1.9.9"), 3); // the /16
    let _narrow = check(ip("127.1.5.8"), 2); // the /24 inside it
    let free = check(ip("127.1.5.7"), 10); // a /32 of 0: unlimited
    let _exempt = check(ip("127.3.9.9"), 10); // exempt /16
    let _limited = check(ip("127.3.3.3"), 1); // a limit inside an exempt prefix
    assert_eq!(s.open(ip("127.1.5.7")), 10, "unlimited clients are counted under their own address");
    assert!(s.limiter.clients().unwrap().iter().any(|c| c.client == ip("127.1.5.7") && c.exempt));
    // A network limit of 0 is an exempt prefix, and reads back as one.
    let back = s.limiter.config().unwrap();
    assert_eq!((back.network_limits.len(), back.exempt.len()), (3, 2));
    drop(free);
}

/// Network limits with prefix grouping: a network limit sets the limit of
/// each client key (here a /24) in it; changing them live takes effect for
/// the next SYN.
#[test]
fn network_limits_change_live() {
    require_kernel!();
    let s = Setup::new(Config::new(1).with_ipv4_prefix_len(24));
    let (a, b) = (client_v4(1), client_v4(2)); // both in 127.1.0.0/24
    let _a = s.hello(a).unwrap();
    assert_refused(s.hello(b));
    s.limiter.set_config(Config::new(1).with_ipv4_prefix_len(24).with_network_limits([net("127.1.0.0/16=3")])).unwrap();
    let _b = s.hello(b).unwrap();
    let _c = s.hello(b).unwrap();
    assert_refused(s.hello(a));
    assert_eq!(s.open(a), 3, "one /24 key, limit 3");
    s.limiter.set_config(Config::new(1).with_ipv4_prefix_len(24)).unwrap();
    assert_refused(s.hello(client_v4(3)));
    assert_eq!(s.limiter.config().unwrap().network_limits, []);
}
