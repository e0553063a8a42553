#!/usr/bin/env python3
"""connlimit under a real systemd, as an operator meets it.

Runs as root inside a Debian 12 virtual machine whose PID 1 is systemd
(`cargo xtask systemd` builds the root file system and boots it). It
installs the release .deb given as the first argument, guards nginx with
the packaged unit, and drives it with systemctl: start, reload, restart,
kill -9, a restart of the guarded nginx, `run --unit`, then remove and
purge. Each check prints `ok` or `FAIL`, and the last line counts them.
Clients connect from 127.0.0.1 to the guest's own nginx: nothing leaves
the machine.
"""

import errno
import json
import os
import pwd
import socket
import subprocess
import sys
import time

CONFIG = "/etc/connlimit/connlimit.toml"
PORT = 80
# A second port of the same nginx, guarded by `connlimit run --unit`.
RUN_UNIT_PORT = 8081
# CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF: the unit's set.
UNIT_CAPS = (1 << 2) | (1 << 12) | (1 << 38) | (1 << 39)
# Every wait is for an event; this bounds it (the guest runs under TCG).
WAIT_S = 60

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok - {name}", flush=True)
    else:
        failed += 1
        print(f"FAIL - {name}: {detail}", flush=True)
    return ok


def sh(*cmd, check_rc=False):
    # Bounded: a start that never gets READY=1 fails this run, not the guest.
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def wait_for(what, probe):
    """Polls `probe` (a cheap check of systemd's or the kernel's state) until
    it is true; False after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.05)
    print(f"# gave up waiting for {what}", flush=True)
    return False


def prop(unit, name):
    return sh("systemctl", "show", "-p", name, "--value", unit).stdout.strip()


def connect(port):
    """A connection to nginx from 127.0.0.1, or the errno that refused it."""
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        return s
    except OSError as e:
        s.close()
        return e.errno or errno.ETIMEDOUT


def connect_n(port, n):
    results = [connect(port) for _ in range(n)]
    held = [r for r in results if isinstance(r, socket.socket)]
    refused = [r for r in results if r == errno.ECONNREFUSED]
    return held, len(refused), len(results) - len(held) - len(refused)


def close_all(socks):
    for s in socks:
        s.close()


def open_count(name):
    """What `connlimit top` says 127.0.0.1 holds in instance `name`."""
    r = sh("connlimit", "top", "--name", name, "--json")
    if r.returncode != 0:
        return None
    rows = json.loads(r.stdout)["clients"]
    return next((row["open"] for row in rows if row["client"] == "127.0.0.1"), 0)


def write_config(limit):
    with open(CONFIG, "w") as f:
        f.write(
            f"""# written by the systemd test
[[instance]]
name = "web"
ports = [{PORT}]
cgroup = "/sys/fs/cgroup/system.slice/nginx.service"
max_conns_per_client_ip = {limit}
persist = true
"""
        )


def main(deb):
    # nginx keeps idle connections without a request for 60 s by default;
    # the test holds some longer than that under TCG.
    with open("/etc/nginx/conf.d/connlimit-test.conf", "w") as f:
        f.write("client_header_timeout 600s;\n")
    with open("/etc/nginx/sites-enabled/connlimit-test", "w") as f:
        f.write(f"server {{ listen {RUN_UNIT_PORT}; return 204; }}\n")
    sh("systemctl", "restart", "nginx", check_rc=True)

    r = sh("dpkg", "-i", deb)
    check("dpkg -i installs the release package", r.returncode == 0, r.stderr.strip())
    try:
        user = pwd.getpwnam("connlimit")
        check("the package made the system user connlimit", user.pw_uid < 1000, f"uid {user.pw_uid}")
    except KeyError:
        check("the package made the system user connlimit", False, "no such user")
    check("the package installs its config where the unit reads it", os.path.isfile(CONFIG), CONFIG)
    r = sh("systemd-analyze", "verify", "connlimit.service")
    check("systemd-analyze verify accepts the unit", r.returncode == 0, r.stderr.strip())

    # The packaged config, as shipped, starts.
    r = sh("systemctl", "start", "connlimit")
    check(
        "systemctl start connlimit with the packaged config",
        r.returncode == 0 and prop("connlimit", "ActiveState") == "active",
        r.stderr.strip() + sh("journalctl", "-u", "connlimit", "--no-pager", "-n", "20").stdout,
    )
    sh("systemctl", "stop", "connlimit")
    sh("connlimit", "detach", "web")

    write_config(2)
    r = sh("systemctl", "start", "connlimit")
    check("systemctl start connlimit guarding nginx", r.returncode == 0, r.stderr.strip())
    status = prop("connlimit", "StatusText")
    check("systemd shows the notify STATUS line", "web" in status, repr(status))
    shown = sh("systemctl", "status", "--no-pager", "connlimit").stdout
    check("systemctl status prints it", "Status:" in shown, shown)

    main_pid = prop("connlimit", "MainPID")
    with open(f"/proc/{main_pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    uid = int(fields["Uid"].split()[1])
    check("the service runs as user connlimit", uid == pwd.getpwnam("connlimit").pw_uid, fields["Uid"])
    for kind in ("CapEff", "CapPrm", "CapBnd"):
        caps = int(fields[kind], 16)
        check(f"{kind} holds only the unit's capabilities", caps == UNIT_CAPS, f"{caps:#x} != {UNIT_CAPS:#x}")

    held, refused, other = connect_n(PORT, 3)
    check("limit 2: the third connection is refused", (len(held), refused, other) == (2, 1, 0), (len(held), refused, other))

    write_config(3)
    r = sh("systemctl", "reload", "connlimit")
    check("systemctl reload applies the edited file", r.returncode == 0, r.stderr.strip())
    check("counts survive the reload", open_count("web") == 2, open_count("web"))
    more, refused, other = connect_n(PORT, 2)
    held += more
    check("limit 3 after the reload: one more, then refused", (len(more), refused, other) == (1, 1, 0), (len(more), refused, other))

    r = sh("systemctl", "restart", "connlimit")
    check("systemctl restart connlimit", r.returncode == 0, r.stderr.strip())
    check("counts survive the restart (persist = true)", open_count("web") == 3, open_count("web"))
    extra, refused, other = connect_n(PORT, 1)
    check("still enforcing after the restart", (len(extra), refused) == (0, 1), (len(extra), refused, other))

    old_pid = prop("connlimit", "MainPID")
    sh("systemctl", "kill", "-s", "KILL", "connlimit", check_rc=True)
    # In the gap before Restart=on-failure starts the service again.
    extra, refused, other = connect_n(PORT, 1)
    check("enforcing while connlimit is dead (kill -9)", (len(extra), refused) == (0, 1), (len(extra), refused, other))
    restarted = wait_for(
        "systemd to restart connlimit",
        lambda: prop("connlimit", "MainPID") not in ("0", old_pid) and prop("connlimit", "ActiveState") == "active",
    )
    check("Restart=on-failure brings it back after kill -9", restarted, prop("connlimit", "ActiveState"))
    check("counts survive kill -9", open_count("web") == 3, open_count("web"))
    close_all(held)
    check(
        "closed connections are given back",
        wait_for("the count to drop", lambda: open_count("web") == 0),
        open_count("web"),
    )

    # The guarded service restarts: systemd removes its cgroup and makes a
    # new one at the same path.
    sh("systemctl", "restart", "nginx", check_rc=True)
    followed = wait_for(
        "connlimit to follow nginx's new cgroup",
        lambda: "not enforcing" not in sh("connlimit", "status").stdout,
    )
    check("connlimit follows the restarted nginx's cgroup", followed, sh("connlimit", "status").stdout)
    held, refused, other = connect_n(PORT, 4)
    check(
        "nginx restarted by systemctl is still limited",
        (len(held), refused, other) == (3, 1, 0),
        (len(held), refused, other),
    )
    close_all(held)

    # `run --unit` against the real systemctl, on nginx's second port.
    run = subprocess.Popen(
        ["connlimit", "run", "--unit", "nginx.service", "--port", str(RUN_UNIT_PORT),
         "--max-conns-per-client-ip", "1", "--name", "by-unit"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    attached = wait_for("run --unit to attach", lambda: run.poll() is not None or open_count("by-unit") is not None)
    held, refused, other = connect_n(RUN_UNIT_PORT, 2)
    check(
        "run --unit nginx.service enforces",
        attached and (len(held), refused, other) == (1, 1, 0),
        (attached, len(held), refused, other, run.poll()),
    )
    close_all(held)
    run.terminate()
    out, _ = run.communicate(timeout=WAIT_S)
    check("run --unit stops cleanly on SIGTERM", run.returncode == 0, f"exit {run.returncode}: {out[-2000:]}")

    # What the service logged at level ERROR, for whoever reads the run.
    errors = [l for l in sh("journalctl", "-u", "connlimit", "--no-pager").stdout.splitlines() if " ERROR " in l]
    for line in errors:
        print(f"# connlimit logged: {line}", flush=True)
    sh("systemctl", "stop", "connlimit")
    sh("connlimit", "detach", "web")
    r = sh("dpkg", "-r", "connlimit")
    check("dpkg -r removes the package", r.returncode == 0 and not os.path.exists("/usr/bin/connlimit"), r.stderr)
    check("the unit is gone", prop("connlimit", "LoadState") == "not-found", prop("connlimit", "LoadState"))
    r = sh("dpkg", "-P", "connlimit")
    check("dpkg -P purges its config", r.returncode == 0 and not os.path.exists(CONFIG), r.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # a broken step fails the run, with what broke
        check("the test ran to its end", False, repr(e))
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)
