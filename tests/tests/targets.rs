//! Guarded cgroups that come and go: a service restart removes its cgroup
//! and makes a new one at the same path; enforcement follows it by itself,
//! and connections that outlive the old cgroup stay counted. Listeners and
//! connections in cgroups below the guarded one are counted. Needs root.

use std::{net::SocketAddr, time::Instant};

use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfLimiter, listeners},
};
use harness::{
    BOUND, Background, Netns, Server, TestCgroup, client_v4, connlimit_in, eventually, require_kernel, unique,
};

mod common;
use common::{WAIT, assert_refused};

const HOLD_SERVER: &str = env!("CARGO_BIN_EXE_hold-server");

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Moves process `pid` (and its sockets, which keep their cgroup) into `to`.
fn move_to(pid: u32, to: &TestCgroup) {
    std::fs::write(to.path().join("cgroup.procs"), pid.to_string()).unwrap();
}

/// The line of `connlimit status` about instance `name`.
fn status_line(netns: &Netns, name: &str) -> String {
    let out = connlimit_in(netns, &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
        .to_owned()
}

/// The `connlimit status --json` row of instance `name`.
fn status_json(netns: &Netns, name: &str) -> serde_json::Value {
    let out = connlimit_in(netns, &["status", "--json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or_else(|| panic!("{name}: {rows}"))
}

#[test]
fn a_library_limiter_follows_its_cgroup_when_it_is_made_again_and_keeps_surviving_counts() {
    require_kernel!();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (old_port, new_port) = (8301, 8302);
    let name = unique("follow-lib");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&name).unwrap();
    let parking = TestCgroup::create(&unique("follow-park")).unwrap();
    let old_server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(old_port)]).unwrap();
    let limiter = EbpfLimiter::attach(
        AttachOptions::new(&name, cgroup.path()).netns(netns.path()).ports([old_port, new_port]).config(Config::new(3)),
    )
    .unwrap();
    let me = client_v4(0x41);
    let survivor = netns.hello_from(me, local(old_port)).unwrap();
    let _survivor2 = netns.hello_from(me, local(old_port)).unwrap();
    assert!(eventually(WAIT, || limiter.num_open(&me).unwrap() == 2));
    assert!(limiter.is_enforcing());

    // The service stops: its cgroup is removed, but this server process
    // (moved out) keeps its two connections, as a draining worker would.
    move_to(old_server.pid(), &parking);
    let path = cgroup.path().to_owned();
    drop(cgroup);
    assert!(!path.exists());
    assert!(eventually(WAIT, || !limiter.is_enforcing()), "still said to enforce with its cgroup gone");

    // It starts again: a new cgroup at the same path, a new server in it.
    let cgroup = TestCgroup::create(&name).unwrap();
    let appeared = Instant::now();
    let new_server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(new_port)]).unwrap();
    // The upkeep looks every 200 ms; how soon is printed, not asserted (a
    // busy machine delays any process).
    assert!(eventually(BOUND, || limiter.is_enforcing()), "not following the cgroup made again");
    eprintln!("followed the new cgroup {:?} after it appeared", appeared.elapsed());

    // The two surviving connections still count: one more, then refused.
    assert_eq!(limiter.num_open(&me).unwrap(), 2);
    let third = netns.hello_from(me, local(new_port)).unwrap();
    assert!(eventually(WAIT, || limiter.num_open(&me).unwrap() == 3));
    assert_refused(netns.hello_from(me, local(new_port)));
    // A survivor's close is still seen (its old cgroup's program runs for it).
    drop(survivor);
    assert!(eventually(WAIT, || limiter.num_open(&me).unwrap() == 2), "a survivor's close was not seen");
    let _fourth = netns.hello_from(me, local(new_port)).unwrap();
    assert_refused(netns.hello_from(me, local(new_port)));
    // Another client meets the limit on the new cgroup's server alone.
    let other = client_v4(0x42);
    let held: Vec<_> = (0..3).map(|_| netns.hello_from(other, local(new_port)).unwrap()).collect();
    assert_refused(netns.hello_from(other, local(new_port)));
    assert!(eventually(WAIT, || new_server.accepted() == 5));
    drop((held, third, new_server, old_server));
}

#[test]
fn run_follows_a_cgroup_made_again_and_says_when_it_is_gone() {
    require_kernel!();
    let port = 8311;
    let name = unique("follow-run");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&name).unwrap();
    let server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();
    let path = cgroup.path().display().to_string();
    let mut cmd = connlimit_in(
        &netns,
        &["run", "--name", &name, "--cgroup", &path, "--port", "8311", "--max-conns-per-client-ip", "3"],
    );
    let run = Background::spawn(&mut cmd).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());

    // The unit stops: its processes go, its cgroup is removed.
    drop(server);
    drop(cgroup);
    assert!(run.wait_for("not enforcing: the guarded cgroup is gone", BOUND), "{}", run.log());
    let line = status_line(&netns, &name);
    assert!(line.contains("not enforcing: the guarded cgroup is gone"), "{line}");
    let row = status_json(&netns, &name);
    assert_eq!(row["enforcing"], false, "{row}");
    assert_eq!(
        row["listener_problems"],
        serde_json::json!([]),
        "a listener warning instead of the real problem: {row}"
    );

    // The unit starts again: enforcement resumes with no operator action.
    let cgroup = TestCgroup::create(&name).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();
    assert!(run.wait_for("enforcing on the new one, counts kept", BOUND), "{}", run.log());
    let me = client_v4(0x43);
    let held: Vec<_> = (0..3).map(|_| netns.hello_from(me, local(port)).unwrap()).collect();
    for _ in 0..9 {
        let refused = netns.hello_from(me, local(port)).map_err(|e| e.kind());
        assert_eq!(
            refused.err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "admitted over the limit: {}",
            run.log()
        );
    }
    let line = status_line(&netns, &name);
    assert!(!line.contains("not enforcing"), "{line}");
    assert_eq!(status_json(&netns, &name)["enforcing"], true);
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
    drop(held);
}

#[test]
fn listeners_and_connections_below_the_guarded_cgroup_are_counted_and_not_warned_about() {
    require_kernel!();
    let (port, outside_port) = (8321, 8322);
    let name = unique("subtree");
    let netns = Netns::new().unwrap();
    let parent = TestCgroup::create(&name).unwrap();
    let child = TestCgroup::create(&format!("{name}/worker")).unwrap();
    let elsewhere = TestCgroup::create(&unique("subtree-out")).unwrap();
    let server = Server::hold(HOLD_SERVER, &netns, &child, &[any(port)]).unwrap();
    let _outside = Server::hold(HOLD_SERVER, &netns, &elsewhere, &[any(outside_port)]).unwrap();
    let me = client_v4(0x44);
    // Open before attaching, in the sub-cgroup: carried.
    let before: Vec<_> = (0..2).map(|_| netns.hello_from(me, local(port)).unwrap()).collect();

    let limiter = EbpfLimiter::attach(
        AttachOptions::new(&name, parent.path()).netns(netns.path()).ports([port, outside_port]).config(Config::new(3)),
    )
    .unwrap();
    assert!(eventually(WAIT, || limiter.num_open(&me).unwrap() == 2), "connections in a sub-cgroup not carried");
    let _third = netns.hello_from(me, local(port)).unwrap();
    for _ in 0..3 {
        assert_refused(netns.hello_from(me, local(port)));
    }
    assert!(eventually(WAIT, || server.accepted() == 3));

    let ino = std::fs::metadata(parent.path()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    let problems = listeners::check(&netns.path(), &[port, outside_port], ino).unwrap();
    assert!(
        !problems.iter().any(|p| matches!(p, listeners::ListenerProblem::OutsideCgroup { port: p, .. } if *p == port)),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, listeners::ListenerProblem::OutsideCgroup { port: p, .. } if *p == outside_port)),
        "{problems:?}"
    );
    drop((before, limiter, server));
    drop(child);
}

#[test]
fn a_restarted_run_adopts_its_instance_after_the_cgroup_was_made_again_while_it_was_down() {
    require_kernel!();
    let port = 8331;
    let name = unique("follow-adopt");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&name).unwrap();
    let server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();
    let path = cgroup.path().display().to_string();
    let args = ["run", "--name", &name, "--cgroup", &path, "--port", "8331", "--max-conns-per-client-ip", "2"];
    let run = Background::spawn(&mut connlimit_in(&netns, &args)).unwrap();
    assert!(run.wait_for("enforcing;", BOUND), "{}", run.log());
    // connlimit is killed; while it is down, the service restarts.
    run.kill();
    drop(server);
    drop(cgroup);
    let cgroup = TestCgroup::create(&name).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();

    let run = Background::spawn(&mut connlimit_in(&netns, &args)).unwrap();
    assert!(run.wait_for("enforcing on the new one, counts kept", BOUND), "{}", run.log());
    assert!(run.log().contains("adopted the instance, counts intact"), "{}", run.log());
    let me = client_v4(0x45);
    let held: Vec<_> = (0..2).map(|_| netns.hello_from(me, local(port)).unwrap()).collect();
    assert_refused(netns.hello_from(me, local(port)));
    let (status, log) = run.stop();
    assert!(status.success(), "{log}");
    drop(held);
}

#[test]
fn serve_follows_the_cgroup_of_a_pid_target_after_the_process_exits() {
    require_kernel!();
    let port = 8341;
    let name = unique("follow-pid");
    let netns = Netns::new().unwrap();
    let cgroup = TestCgroup::create(&name).unwrap();
    let server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();
    let file = std::env::temp_dir().join(format!("{name}.toml"));
    let text = format!(
        "[[instance]]\nname = \"{name}\"\nports = [{port}]\npid = {}\nmax_conns_per_client_ip = 1\n",
        server.pid()
    );
    std::fs::write(&file, text).unwrap();
    let mut cmd = connlimit_in(&netns, &["serve", "--config", file.to_str().unwrap()]);
    let serve = Background::spawn(&mut cmd).unwrap();
    assert!(serve.wait_for("enforcing;", BOUND), "{}", serve.log());

    // The process exits and its service restarts: a new process, with
    // another pid, in a cgroup made again at the same path.
    drop(server);
    drop(cgroup);
    assert!(serve.wait_for("not enforcing: the guarded cgroup is gone", BOUND), "{}", serve.log());
    let cgroup = TestCgroup::create(&name).unwrap();
    let _server = Server::hold(HOLD_SERVER, &netns, &cgroup, &[any(port)]).unwrap();
    assert!(serve.wait_for("enforcing on the new one, counts kept", BOUND), "{}", serve.log());
    let me = client_v4(0x46);
    let _held = netns.hello_from(me, local(port)).unwrap();
    assert_refused(netns.hello_from(me, local(port)));
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_file(&file);
}
