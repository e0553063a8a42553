//! The `connlimit` binary with a total limit, network limits and the 429
//! responder: set live, shown by `config` and `status`, and the responder's
//! fallback when its owner is killed (needs root).

use std::{
    io::{ErrorKind, Read, Write},
    net::SocketAddr,
    process::Output,
};

use connlimit::http::TOO_MANY_CONNECTIONS_RESPONSE;
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, client_v4, connlimit_in, eventually, require_kernel, unique,
};
use serde_json::{Value, json};

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");

fn connlimit(netns: &Netns, args: &[&str]) -> Output {
    connlimit_in(netns, args).output().unwrap()
}

fn ok(netns: &Netns, args: &[&str]) -> Output {
    let out = connlimit(netns, args);
    assert!(out.status.success(), "connlimit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json_of(netns: &Netns, args: &[&str]) -> Value {
    serde_json::from_slice(&ok(netns, args).stdout).unwrap()
}

fn status_of(netns: &Netns, name: &str) -> Value {
    let all = json_of(netns, &["status", "--json"]);
    all.as_array().unwrap().iter().find(|s| s["name"] == name).cloned().expect("instance listed")
}

#[test]
fn total_network_limits_and_429_through_the_cli() {
    require_kernel!();
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&unique("cli-limits")).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[SocketAddr::from(([0, 0, 0, 0], 8082))]).unwrap();
    let name = unique("limits");
    let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
    let server = SocketAddr::from(([127, 0, 0, 1], 8082));
    let mut cmd =
        connlimit_in(&netns, &["run", "--name", &name, "--port", "8082", "-m", "1", "--cgroup", &cgroup_path]);
    cmd.args(["--max-conns-total", "4", "--network-limit", "127.1.0.0/24=2", "--refuse-with", "http-429"]);
    let run = Background::spawn(&mut cmd).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());

    let config = json_of(&netns, &["config", "--name", &name, "--json"]);
    assert_eq!(config["max_conns_total"], 4);
    assert_eq!(config["network_limits"], json!(["127.1.0.0/24=2"]));
    assert_eq!(config["refuse_with"], "http-429");

    let a = client_v4(1); // in 127.1.0.0/24: limit 2
    let held = vec![netns.hello_from(a, server).unwrap(), netns.hello_from(a, server).unwrap()];
    let mut third = netns.connect_from(a, server).unwrap();
    third.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut got = Vec::new();
    third.read_to_end(&mut got).unwrap();
    assert_eq!(got, TOO_MANY_CONNECTIONS_RESPONSE);

    let status = status_of(&netns, &name);
    assert_eq!((status["max_conns_total"].as_u64(), status["total_open"].as_u64()), (Some(4), Some(2)));
    assert_eq!((status["refuse_with"].as_str(), status["responded"].as_u64()), (Some("http-429"), Some(1)));
    let table = String::from_utf8(ok(&netns, &["status"]).stdout).unwrap();
    assert!(table.contains("total 2/4 open") && table.contains("refusing with HTTP 429"), "{table}");

    // Live: network limits cleared, the total lowered, resets again.
    ok(&netns, &["set", "--name", &name, "--no-network-limits", "--max-conns-total", "2", "--refuse-with", "reset"]);
    let b = client_v4(0x101);
    assert_eq!(netns.hello_from(b, server).unwrap_err().kind(), ErrorKind::ConnectionRefused, "total of 2 reached");
    let config = json_of(&netns, &["config", "--name", &name, "--json"]);
    assert_eq!((config["network_limits"].clone(), config["refuse_with"].clone()), (json!([]), json!("reset")));

    // The owner killed: the kernel keeps enforcing, 429s fall back to resets.
    ok(&netns, &["set", "--name", &name, "--refuse-with", "http-429"]);
    run.kill();
    assert!(eventually(BOUND, || status_of(&netns, &name)["owner"] == "exited"));
    assert_eq!(netns.hello_from(b, server).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let table = String::from_utf8(ok(&netns, &["status"]).stdout).unwrap();
    assert!(table.contains("429 responder down: refusing with a reset"), "{table}");
    assert_eq!(status_of(&netns, &name)["responder_missing"], 1);
    drop(held);
    ok(&netns, &["detach", &name]);
}
