//! `connlimit-bench`: connlimit against what operators would use instead,
//! side by side on one machine, in one run. Run it through `cargo xtask
//! bench` (as root); it prints a Markdown report on stdout and progress on
//! stderr. It measures and never judges: no figure makes it fail.
//!
//! Every run of every configuration gets a fresh network namespace (and
//! cgroup) that is torn down after it, configurations are interleaved within
//! each repetition in a rotating order, and ratios are taken per repetition
//! against the baseline of the same repetition, so machine drift cancels.

mod drop_floor;
mod load;
mod memory;
mod refuse;
mod setup;
mod stats;

use std::{
    fmt::Write as _,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use connlimit_common::maps::capacity;
use setup::{Bins, Env, Kind, Server, Setup};
use stats::{Ratio, median};

/// "High enough that nothing is refused" for the churn runs.
const CHURN_LIMIT: u32 = 100_000;
const BURST_LIMIT: u32 = 10;
const FLOOD_ATTEMPTS: u32 = 10_000;
/// Entries left free in `CLIENTS` by the scale runs' filler: the minimal
/// server falls thousands of connections behind in reading the clients'
/// EOFs, and each of those still counts.
const SCALE_HEADROOM: u32 = 16_384;

struct Args {
    reps: usize,
    duration: Duration,
    clients: u32,
    burst_runs: usize,
    refuse_threads: u32,
    flood_threads: u32,
    scale_clients: u32,
    scale_fill: u32,
    only: Option<Vec<String>>,
}

impl Args {
    fn wants(&self, section: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|s| s == section))
    }
}

const SECTIONS: &str = "churn,scale,refuse,synflood,burst,flood,memory,profile";

fn parse_args() -> Result<Args> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let mut args = Args {
        reps: 5,
        duration: Duration::from_secs(5),
        clients: 64,
        burst_runs: 20,
        refuse_threads: 64,
        flood_threads: cores,
        scale_clients: 100_000,
        scale_fill: capacity::CLIENTS - SCALE_HEADROOM,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => args.reps = value()?.parse()?,
            "--seconds" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--clients" => args.clients = value()?.parse()?,
            "--burst-runs" => args.burst_runs = value()?.parse()?,
            "--refuse-threads" => args.refuse_threads = value()?.parse()?,
            "--flood-threads" => args.flood_threads = value()?.parse()?,
            "--scale-clients" => args.scale_clients = value()?.parse()?,
            "--scale-fill" => args.scale_fill = value()?.parse()?,
            "--only" => {
                let list: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = list.iter().find(|s| !SECTIONS.split(',').any(|k| k == s.as_str())) {
                    bail!("--only: unknown section {bad:?}; sections are {SECTIONS}");
                }
                args.only = Some(list);
            }
            "--help" | "-h" => {
                println!(
                    "connlimit-bench [--reps N (5)] [--seconds S (5)] [--clients N (64)] [--burst-runs N (20)] \
                     [--refuse-threads N (64)] [--flood-threads N (CPUs)] [--scale-clients N (100000)] [--scale-fill N (CLIENTS capacity - 16384)] \
                     [--only {SECTIONS}]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(args)
}

extern "C" fn on_sigint(_: libc::c_int) {
    load::STOP.store(true, Ordering::Relaxed);
}

/// `items` with their indices, starting at the `rep`-th and wrapping
/// around: each repetition runs the configurations in another order, so
/// none always runs first (or right after another).
fn rotated<T: Copy>(items: &[T], rep: usize) -> impl Iterator<Item = (usize, T)> + '_ {
    (0..items.len()).map(move |k| {
        let i = (k + rep) % items.len();
        (i, items[i])
    })
}

fn interrupted() -> Result<()> {
    if load::STOP.load(Ordering::Relaxed) {
        bail!("interrupted; everything set up so far has been torn down");
    }
    Ok(())
}

/// Per (configuration, source count): per-repetition results.
#[derive(Default)]
struct ChurnRuns {
    per_sec: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    cpu_us: Vec<f64>,
    failed: u64,
}

impl ChurnRuns {
    fn push(&mut self, r: &load::Churn) {
        self.per_sec.push(r.per_sec);
        self.p50_us.push(r.p50.as_secs_f64() * 1e6);
        self.p99_us.push(r.p99.as_secs_f64() * 1e6);
        self.cpu_us.push(r.cpu_per_conn.as_secs_f64() * 1e6);
        self.failed += r.failed;
    }
}

/// Churn configurations: the minimal server's set first, its baseline first.
fn churn_configs() -> Vec<(Server, Kind)> {
    let minimal = Kind::MINIMAL.iter().map(|&k| (Server::Minimal, k));
    minimal.chain(Kind::TOKIO.iter().map(|&k| (Server::Tokio, k))).collect()
}

fn log_churn(what: &str, rep: usize, n: u32, server: Server, kind: Kind, r: &load::Churn) {
    eprintln!(
        "{what} rep {rep} {n:>6} IPs {:<16} {:<24} {:>8.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  CPU {:>5.1} µs/conn  failed {}",
        server.name(),
        kind.name(),
        r.per_sec,
        r.p50.as_secs_f64() * 1e6,
        r.p99.as_secs_f64() * 1e6,
        r.cpu_per_conn.as_secs_f64() * 1e6,
        r.failed
    );
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let missing = harness::missing_requirements();
    if !missing.is_empty() {
        bail!("connlimit-bench loads eBPF programs and cannot run here: {}", missing.join("; "));
    }
    // Built by the same `cargo build` as this binary, next to it.
    let exe = std::env::current_exe()?;
    let bin = |name: &str| -> Result<String> {
        let path = exe.with_file_name(name);
        if !path.exists() {
            bail!("{} is missing; run this through `cargo xtask bench`", path.display());
        }
        Ok(path.to_str().context("non-UTF-8 path")?.to_owned())
    };
    let bins = Bins { minimal: bin("bench-server-min")?, tokio: bin("bench-server")? };
    let setup = |server, limit, prefix_v4| Setup { server, limit, prefix_v4, bins: &bins };
    let started = Instant::now();
    let load_before = loadavg();

    // Churn: configurations × {1, 1000} sources × reps, rotating the order per rep.
    let sources = [1u32, 1000];
    let configs = churn_configs();
    let mut churn: Vec<Vec<ChurnRuns>> =
        configs.iter().map(|_| sources.iter().map(|_| ChurnRuns::default()).collect()).collect();
    if args.wants("churn") {
        for rep in 0..args.reps {
            for (si, &n) in sources.iter().enumerate() {
                for (ci, (server, kind)) in rotated(&configs, rep) {
                    let env = Env::new(kind, setup(server, CHURN_LIMIT, 32))?;
                    let r = load::churn(&env, n, args.clients, args.duration);
                    drop(env);
                    interrupted()?;
                    log_churn("churn", rep, n, server, kind, &r);
                    churn[ci][si].push(&r);
                }
            }
        }
    }

    // Scale: many distinct clients, connlimit's client map nearly full.
    let mut scale: Vec<ChurnRuns> = Kind::SCALE.iter().map(|_| ChurnRuns::default()).collect();
    let mut scale_fill = 0;
    if args.wants("scale") {
        for rep in 0..args.reps {
            for (ki, kind) in rotated(&Kind::SCALE, rep) {
                let env = Env::new(kind, setup(Server::Minimal, CHURN_LIMIT, 32))?;
                if let Some(name) = &env.instance {
                    scale_fill = memory::fill_clients(name, args.scale_fill)?;
                }
                let r = load::churn(&env, args.scale_clients, args.clients, args.duration);
                if let (Some(ebpf), Some(name)) = (&env.ebpf, &env.instance) {
                    eprintln!(
                        "scale rep {rep} connlimit: {:?}; CLIENTS entries after: {}",
                        ebpf.stats()?,
                        memory::count_clients(name)?
                    );
                }
                drop(env);
                interrupted()?;
                log_churn("scale", rep, args.scale_clients, Server::Minimal, kind, &r);
                scale[ki].push(&r);
            }
        }
    }

    // Refusal rate: a client at its limit of 1, many threads from its address.
    let mut refusals: Vec<Vec<f64>> = Kind::REFUSERS.iter().map(|_| Vec::new()).collect();
    let mut refusal_leaks = (0, 0);
    if args.wants("refuse") {
        for rep in 0..args.reps {
            for (ki, kind) in rotated(&Kind::REFUSERS, rep) {
                let env = Env::new(kind, setup(Server::Minimal, 1, 32))?;
                let r = refuse::refusals(&env, args.refuse_threads, args.duration);
                drop(env);
                interrupted()?;
                eprintln!(
                    "refuse rep {rep} {:<36} {:>8.0} refused/s  admitted {}  other errors {}",
                    kind.name(),
                    r.per_sec,
                    r.admitted,
                    r.errors
                );
                refusals[ki].push(r.per_sec);
                refusal_leaks.0 += r.admitted;
                refusal_leaks.1 += r.errors;
            }
        }
    }

    // Spoofed-source SYN flood: every source in 127/8, counted as one client
    // (prefix /8) that is at its limit of 1, so every SYN is refused.
    let mut synflood: Vec<(Vec<f64>, Vec<f64>)> = Kind::REFUSERS.iter().map(|_| (Vec::new(), Vec::new())).collect();
    let mut synflood_refused = (0u64, 0f64);
    if args.wants("synflood") {
        for rep in 0..args.reps {
            for (ki, kind) in rotated(&Kind::REFUSERS, rep) {
                let env = Env::new(kind, setup(Server::Minimal, 1, 8))?;
                let held = env.netns.run(|| load::attempt(load::source(0)).1);
                let refused0 = env.ebpf.as_ref().map(|e| e.stats().map(|s| s.refused)).transpose()?;
                let r = refuse::syn_flood(&env, args.flood_threads, args.duration);
                let refused1 = env.ebpf.as_ref().map(|e| e.stats().map(|s| s.refused)).transpose()?;
                drop(held);
                drop(env);
                interrupted()?;
                if let (Some(a), Some(b)) = (refused0, refused1) {
                    synflood_refused.0 += b - a;
                    synflood_refused.1 += r.syns_per_sec * args.duration.as_secs_f64();
                }
                eprintln!(
                    "synflood rep {rep} {:<36} {:>8.0} SYN/s  sender CPU {:>5.0} ns per SYN",
                    kind.name(),
                    r.syns_per_sec,
                    r.cpu_ns_per_syn
                );
                synflood[ki].0.push(r.syns_per_sec);
                synflood[ki].1.push(r.cpu_ns_per_syn);
            }
        }
    }

    // Burst exactness: one environment per limiter, many runs each.
    let mut bursts: Vec<Vec<usize>> = Vec::new();
    if args.wants("burst") {
        for kind in Kind::LIMITERS {
            let env = Env::new(kind, setup(Server::Tokio, BURST_LIMIT, 32))?;
            let mut runs = Vec::new();
            for _ in 0..args.burst_runs {
                runs.push(load::burst(&env));
                interrupted()?;
                // Let resets and closes settle before the next burst.
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("burst {:<20} established per run: {runs:?}", kind.name());
            bursts.push(runs);
        }
    }

    // Over-limit flood: server CPU and accept() calls per 10,000 refusals.
    let mut floods = Vec::new();
    if args.wants("flood") {
        for kind in Kind::LIMITERS {
            let mut env = Env::new(kind, setup(Server::Tokio, BURST_LIMIT, 32))?;
            let (cpu0, (accepted0, _)) = (env.server_cpu()?, env.server_counts()?);
            let (held, refused) = load::flood(&env, BURST_LIMIT, FLOOD_ATTEMPTS);
            let (cpu1, (accepted1, _)) = (env.server_cpu()?, env.server_counts()?);
            drop(held);
            interrupted()?;
            let per10k = |x: f64| if refused == 0 { f64::NAN } else { x * 10_000.0 / f64::from(refused) };
            let cpu_ms = per10k((cpu1 - cpu0).as_secs_f64() * 1e3);
            let accepts = per10k((accepted1 - accepted0).saturating_sub(u64::from(BURST_LIMIT)) as f64);
            eprintln!(
                "flood {:<20} refused {refused}  server CPU {cpu_ms:.1} ms  accepts {accepts:.0} per 10k",
                kind.name()
            );
            floods.push((kind, refused, cpu_ms, accepts));
        }
    }

    let memory = if args.wants("memory") { memory::measure()? } else { Vec::new() };
    let profiles = if args.wants("profile") { profiles(&args, setup)? } else { Vec::new() };
    let load_after = loadavg();
    let results = Results {
        configs,
        churn,
        sources,
        scale,
        scale_fill,
        refusals,
        refusal_leaks,
        synflood,
        synflood_refused,
        bursts,
        floods,
        memory,
        profiles,
        load: (load_before, load_after),
        took: started.elapsed(),
    };
    print!("{}", report(&args, &results)?);
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
}

/// Everything one run measured, for the report.
struct Results {
    configs: Vec<(Server, Kind)>,
    churn: Vec<Vec<ChurnRuns>>,
    sources: [u32; 2],
    scale: Vec<ChurnRuns>,
    scale_fill: u32,
    refusals: Vec<Vec<f64>>,
    refusal_leaks: (u64, u64),
    synflood: Vec<(Vec<f64>, Vec<f64>)>,
    synflood_refused: (u64, f64),
    bursts: Vec<Vec<usize>>,
    floods: Vec<(Kind, u32, f64, f64)>,
    memory: Vec<memory::Footprint>,
    profiles: Vec<Profile>,
    load: (String, String),
    took: Duration,
}

/// Time and calls of connlimit's programs during one run, with the kernel's
/// BPF run-time statistics on (for that run only: they cost two clock reads
/// per program run).
struct Profile {
    what: &'static str,
    unit: &'static str,
    units: f64,
    programs: Vec<(&'static str, Duration, u64)>,
}

fn program_totals() -> Vec<(&'static str, Duration, u64)> {
    // Program names are cut to 15 bytes by the kernel.
    [("sk_lookup", "connlimit_looku"), ("sock_ops", "connlimit_sock_")]
        .into_iter()
        .map(|(label, prefix)| {
            let (time, count) = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with(prefix)))
                .fold((Duration::ZERO, 0), |(t, c), p| (t + p.run_time(), c + p.run_count()));
            (label, time, count)
        })
        .collect()
}

/// Runs `f` (which returns how many units of work it did) with BPF
/// statistics on, and returns connlimit's programs' share of it.
fn profiled(what: &'static str, unit: &'static str, f: impl FnOnce() -> Result<f64>) -> Result<Profile> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let before = program_totals();
    let units = f()?;
    let after = program_totals();
    interrupted()?;
    let programs =
        before.iter().zip(&after).map(|((label, t0, c0), (_, t1, c1))| (*label, *t1 - *t0, c1 - c0)).collect();
    Ok(Profile { what, unit, units, programs })
}

fn profiles<'a>(args: &Args, setup: impl Fn(Server, u32, u8) -> Setup<'a>) -> Result<Vec<Profile>> {
    let secs = args.duration.as_secs_f64();
    let mut out = Vec::new();
    let env = Env::new(Kind::Connlimit, setup(Server::Minimal, CHURN_LIMIT, 32))?;
    out.push(profiled("churn from 1,000 IPs, minimal server", "connection", || {
        Ok(load::churn(&env, 1000, args.clients, args.duration).per_sec * secs)
    })?);
    drop(env);
    let env = Env::new(Kind::Connlimit, setup(Server::Minimal, 1, 32))?;
    out.push(profiled("refusals, a client at its limit of 1", "refused attempt", || {
        Ok(refuse::refusals(&env, args.refuse_threads, args.duration).per_sec * secs)
    })?);
    drop(env);
    let env = Env::new(Kind::Connlimit, setup(Server::Minimal, 1, 8))?;
    let held = env.netns.run(|| load::attempt(load::source(0)).1);
    out.push(profiled("spoofed-source SYN flood", "SYN", || {
        Ok(refuse::syn_flood(&env, args.flood_threads, args.duration).syns_per_sec * secs)
    })?);
    drop(held);
    Ok(out)
}

fn report(args: &Args, results: &Results) -> Result<String> {
    let Results {
        configs,
        churn,
        sources,
        scale,
        scale_fill,
        refusals,
        refusal_leaks,
        synflood,
        synflood_refused,
        bursts,
        floods,
        memory,
        profiles,
        load,
        took,
    } = results;
    let mut out = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    writeln!(
        out,
        "Machine: {cores} CPUs ({cpu}), Linux {}. {} repetitions of {} s per run; {} client threads for churn, {} \
         for refusals, {} SYN-flood threads; {} burst runs per limiter; run took {:.0} s. Load average (1, 5, 15 \
         min) before: {}; after: {}.\n",
        kernel.trim(),
        args.reps,
        args.duration.as_secs_f64(),
        args.clients,
        args.refuse_threads,
        args.flood_threads,
        args.burst_runs,
        took.as_secs_f64(),
        load.0,
        load.1
    )?;
    writeln!(out, "{}\n", stats::intervals_explained(args.reps))?;

    if args.wants("churn") {
        writeln!(out, "### Connection churn (connect, accept, close)\n")?;
        writeln!(
            out,
            "Medians over repetitions; ratios are the median of per-repetition ratios to the no-limiter run of the \
             same server in the same repetition (churn: higher is better; p99 and CPU: lower is better). CPU is the \
             whole machine's busy time (every process and the kernel, all CPUs, from `/proc/stat`) per connection: \
             what a connection costs, including when the churn leaves CPUs idle. \"connlimit's hooks only\" is \
             connlimit attached but guarding another port, so both programs return before touching any client's \
             state: what the hooks alone cost, the floor of any limiter built on them.\n"
        )?;
        writeln!(
            out,
            "| server | configuration | sources | conn/s | ratio | p50 µs | p99 µs | p99 ratio | CPU µs/conn | CPU ratio | failed |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for (ci, (server, kind)) in configs.iter().enumerate() {
            let base = configs.iter().position(|c| *c == (*server, Kind::Baseline)).unwrap_or(0);
            for (si, n) in sources.iter().enumerate() {
                let runs: &ChurnRuns = &churn[ci][si];
                let base = &churn[base][si];
                writeln!(
                    out,
                    "| {} | {} | {n} IP{} | {:.0} | {} | {:.0} | {:.0} | {} | {:.1} | {} | {} |",
                    server.name(),
                    kind.name(),
                    if *n == 1 { "" } else { "s" },
                    median(runs.per_sec.clone()),
                    Ratio::of(&runs.per_sec, &base.per_sec),
                    median(runs.p50_us.clone()),
                    median(runs.p99_us.clone()),
                    Ratio::of(&runs.p99_us, &base.p99_us),
                    median(runs.cpu_us.clone()),
                    Ratio::of(&runs.cpu_us, &base.cpu_us),
                    runs.failed
                )?;
            }
        }
    }

    if args.wants("scale") {
        writeln!(out, "\n### Churn from {} distinct clients, client map nearly full\n", args.scale_clients)?;
        writeln!(
            out,
            "Each connection from its own 127.x address, cycling through {} addresses; connlimit's `CLIENTS` map \
             (capacity {}) was first filled with {scale_fill} other clients' entries, leaving room for the \
             connections in flight (the server falls thousands of connections behind in closing), and its `PENDING` map fills \
             with the churning clients. Minimal server; ratios as above.\n",
            args.scale_clients,
            capacity::CLIENTS
        )?;
        writeln!(out, "| server | configuration | conn/s | ratio | p50 µs | p99 µs | p99 ratio | failed |")?;
        writeln!(out, "|---|---|---|---|---|---|---|---|")?;
        for (ki, kind) in Kind::SCALE.iter().enumerate() {
            let (runs, base) = (&scale[ki], &scale[0]);
            writeln!(
                out,
                "| {} | {} | {:.0} | {} | {:.0} | {:.0} | {} | {} |",
                Server::Minimal.name(),
                kind.name(),
                median(runs.per_sec.clone()),
                Ratio::of(&runs.per_sec, &base.per_sec),
                median(runs.p50_us.clone()),
                median(runs.p99_us.clone()),
                Ratio::of(&runs.p99_us, &base.p99_us),
                runs.failed
            )?;
        }
    }

    if args.wants("refuse") {
        writeln!(out, "\n### The cost of refusing: a client at its limit keeps connecting\n")?;
        writeln!(
            out,
            "A client at its limit of 1 (holding one connection to the minimal server) and {} threads from its \
             address connecting as fast as they can, so the machine's CPUs are saturated and refusals per second \
             compare cost. The closed port (no listener: the kernel's own RST) is the floor the ratios are \
             taken to; the second floor is a minimal sk_lookup program that refuses the port's SYNs and counts \
             nothing: what refusing in that hook costs before any counting. Attempts admitted over the whole \
             section: {}; failed otherwise than by a refusal: {}.\n",
            args.refuse_threads, refusal_leaks.0, refusal_leaks.1
        )?;
        writeln!(out, "| server | configuration | refused/s | ratio to the floor |")?;
        writeln!(out, "|---|---|---|---|")?;
        for (ki, kind) in Kind::REFUSERS.iter().enumerate() {
            writeln!(
                out,
                "| {} | {} | {:.0} | {} |",
                Server::Minimal.name(),
                kind.name(),
                median(refusals[ki].clone()),
                Ratio::of(&refusals[ki], &refusals[0])
            )?;
        }
    }

    if args.wants("synflood") {
        writeln!(out, "\n### Spoofed-source SYN flood\n")?;
        writeln!(
            out,
            "{} threads send SYNs from random 127.x sources and ports through a raw socket in the namespace; \
             clients are grouped by /8 (connlimit `ipv4_prefix_len` 8, iptables `--connlimit-mask 8`, nftables \
             `ip saddr & 255.0.0.0`) and the group holds its limit of 1, so every SYN is refused (connlimit \
             counted {} refusals for {:.0} SYNs sent). On loopback the receive path runs in the sender's context, \
             so SYNs per second compare cost. CPU per SYN is the sending threads' own CPU time (getrusage \
             RUSAGE_THREAD) per SYN: with tick-based accounting the softirq that receives and refuses a SYN on \
             loopback is charged to the sender it interrupts, so this is the kernel's whole path of a SYN (raw \
             send, limiter, RST) and excludes other processes on the machine. The floors are those of the \
             refusal table.\n",
            args.flood_threads, synflood_refused.0, synflood_refused.1
        )?;
        writeln!(out, "| configuration | SYN/s | ratio to the floor | CPU per SYN | ratio to the floor |")?;
        writeln!(out, "|---|---|---|---|---|")?;
        for (ki, kind) in Kind::REFUSERS.iter().enumerate() {
            let (rate, cpu) = &synflood[ki];
            writeln!(
                out,
                "| {} | {:.0} | {} | {:.0} ns | {} |",
                kind.name(),
                median(rate.clone()),
                Ratio::of(rate, &synflood[0].0),
                median(cpu.clone()),
                Ratio::of(cpu, &synflood[0].1)
            )?;
        }
    }

    for p in profiles {
        writeln!(
            out,
            "\nWhere connlimit's time goes: {} ({:.0} per run, kernel BPF statistics on):\n",
            p.what, p.units
        )?;
        writeln!(out, "| program | runs per {} | ns per run | ns per {} |", p.unit, p.unit)?;
        writeln!(out, "|---|---|---|---|")?;
        for (label, time, count) in &p.programs {
            let per_run = time.as_nanos() as f64 / (*count).max(1) as f64;
            let per_unit = time.as_nanos() as f64 / p.units.max(1.0);
            writeln!(out, "| {label} | {:.2} | {per_run:.0} | {per_unit:.0} |", *count as f64 / p.units.max(1.0))?;
        }
    }

    if !bursts.is_empty() {
        writeln!(out, "\n### Burst exactness: 200 parallel connects from one IP, limit {BURST_LIMIT}\n")?;
        writeln!(
            out,
            "| configuration | runs | established per run (min / median / max) | runs with exactly {BURST_LIMIT} |"
        )?;
        writeln!(out, "|---|---|---|---|")?;
        for (kind, runs) in Kind::LIMITERS.iter().zip(bursts) {
            let mut sorted = runs.clone();
            sorted.sort_unstable();
            let exact = runs.iter().filter(|&&n| n == BURST_LIMIT as usize).count();
            writeln!(
                out,
                "| {} | {} | {} / {} / {} | {exact} of {} |",
                kind.name(),
                runs.len(),
                sorted.first().unwrap_or(&0),
                sorted.get(sorted.len() / 2).unwrap_or(&0),
                sorted.last().unwrap_or(&0),
                runs.len()
            )?;
        }
    }
    if !floods.is_empty() {
        writeln!(out, "\n### Over-limit flood: a client at its limit keeps connecting\n")?;
        writeln!(
            out,
            "| configuration | refused attempts | server CPU per 10,000 refused | server accept() per 10,000 refused |"
        )?;
        writeln!(out, "|---|---|---|---|")?;
        for (kind, refused, cpu_ms, accepts) in floods {
            writeln!(out, "| {} | {refused} | {cpu_ms:.1} ms | {accepts:.0} |", kind.name())?;
        }
    }
    if !memory.is_empty() {
        writeln!(out, "\n### Kernel memory of connlimit's maps\n")?;
        writeln!(
            out,
            "From the kernel's own accounting (`memlock` in the maps' fdinfo), with the `CLIENTS` map sized for and \
             filled with that many client keys.\n"
        )?;
        writeln!(out, "| tracked clients | CLIENTS + PENDING maps | per client | all maps of the instance |")?;
        writeln!(out, "|---|---|---|---|")?;
        for m in memory {
            writeln!(
                out,
                "| {}{} | {:.1} MiB | {:.0} B | {:.1} MiB |",
                m.clients,
                if m.is_default { " (default maximum)" } else { "" },
                m.clients_map_bytes as f64 / 1_048_576.0,
                m.clients_map_bytes as f64 / m.clients as f64,
                m.all_maps_bytes as f64 / 1_048_576.0
            )?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::rotated;

    #[test]
    fn every_repetition_runs_every_configuration_once_from_another_start() {
        let items = ['a', 'b', 'c'];
        assert_eq!(rotated(&items, 0).collect::<Vec<_>>(), [(0, 'a'), (1, 'b'), (2, 'c')]);
        assert_eq!(rotated(&items, 4).collect::<Vec<_>>(), [(1, 'b'), (2, 'c'), (0, 'a')]);
    }
}
