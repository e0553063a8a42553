//! `connlimit-bench`: connlimit against what operators would use instead,
//! side by side on one machine, in one run. Run it through `cargo xtask
//! bench` (as root); it prints a Markdown report on stdout and progress on
//! stderr. It measures and never judges: no figure makes it fail.
//!
//! Every run of every configuration gets a fresh network namespace (and
//! cgroup) that is torn down after it, configurations are interleaved within
//! each repetition in a rotating order, and ratios are taken per repetition
//! against the baseline of the same repetition, so machine drift cancels.

mod load;
mod memory;
mod setup;

use std::{
    fmt::Write as _,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use setup::{Env, Kind};

/// "High enough that nothing is refused" for the churn runs.
const CHURN_LIMIT: u32 = 100_000;
const BURST_LIMIT: u32 = 10;
const FLOOD_ATTEMPTS: u32 = 10_000;

struct Args {
    reps: usize,
    duration: Duration,
    clients: u32,
    burst_runs: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { reps: 5, duration: Duration::from_secs(5), clients: 64, burst_runs: 20 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => args.reps = value()?.parse()?,
            "--seconds" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--clients" => args.clients = value()?.parse()?,
            "--burst-runs" => args.burst_runs = value()?.parse()?,
            "--help" | "-h" => {
                println!("connlimit-bench [--reps N (5)] [--seconds S (5)] [--clients N (64)] [--burst-runs N (20)]");
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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
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
    failed: u64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    harness::require_root();
    // Built by the same `cargo build` as this binary, next to it.
    let server = std::env::current_exe()?.with_file_name("bench-server");
    if !server.exists() {
        bail!("{} is missing; run this through `cargo xtask bench`", server.display());
    }
    let server = server.to_str().context("non-UTF-8 path")?;
    let started = Instant::now();

    // Churn: kinds × {1, 1000} sources × reps, rotating the order per rep.
    let sources = [1u32, 1000];
    let mut churn: Vec<Vec<ChurnRuns>> =
        Kind::ALL.iter().map(|_| sources.iter().map(|_| ChurnRuns::default()).collect()).collect();
    for rep in 0..args.reps {
        for (si, &n) in sources.iter().enumerate() {
            for k in 0..Kind::ALL.len() {
                let ki = (k + rep) % Kind::ALL.len();
                let kind = Kind::ALL[ki];
                let env = Env::new(kind, CHURN_LIMIT, server)?;
                let r = load::churn(&env, n, args.clients, args.duration);
                drop(env);
                interrupted()?;
                eprintln!(
                    "churn rep {rep} {n:>4} IPs {:<20} {:>8.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  failed {}",
                    kind.name(),
                    r.per_sec,
                    r.p50.as_secs_f64() * 1e6,
                    r.p99.as_secs_f64() * 1e6,
                    r.failed
                );
                let runs = &mut churn[ki][si];
                runs.per_sec.push(r.per_sec);
                runs.p50_us.push(r.p50.as_secs_f64() * 1e6);
                runs.p99_us.push(r.p99.as_secs_f64() * 1e6);
                runs.failed += r.failed;
            }
        }
    }

    // Burst exactness: one environment per limiter, many runs each.
    let mut bursts: Vec<Vec<usize>> = Vec::new();
    for kind in Kind::LIMITERS {
        let env = Env::new(kind, BURST_LIMIT, server)?;
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

    // Over-limit flood: server CPU and accept() calls per 10,000 refusals.
    let mut floods = Vec::new();
    for kind in Kind::LIMITERS {
        let mut env = Env::new(kind, BURST_LIMIT, server)?;
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

    let memory = memory::measure()?;
    let profile = profile(&args, server)?;
    let results = Results { churn, sources, bursts, floods, memory, profile, took: started.elapsed() };
    print!("{}", report(&args, &results)?);
    Ok(())
}

/// Everything one run measured, for the report.
struct Results {
    churn: Vec<Vec<ChurnRuns>>,
    sources: [u32; 2],
    bursts: Vec<Vec<usize>>,
    floods: Vec<(Kind, u32, f64, f64)>,
    memory: Vec<memory::Footprint>,
    profile: Profile,
    took: Duration,
}

/// Time and calls of connlimit's programs during one churn run from 1000
/// IPs, with the kernel's BPF run-time statistics on (for that run only:
/// they cost two clock reads per program run).
struct Profile {
    connections: f64,
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

fn profile(args: &Args, server: &str) -> Result<Profile> {
    let env = Env::new(Kind::Connlimit, CHURN_LIMIT, server)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let before = program_totals();
    let run = load::churn(&env, 1000, args.clients, args.duration);
    let after = program_totals();
    interrupted()?;
    let programs =
        before.iter().zip(&after).map(|((label, t0, c0), (_, t1, c1))| (*label, *t1 - *t0, c1 - c0)).collect();
    Ok(Profile { connections: run.per_sec * args.duration.as_secs_f64(), programs })
}

fn report(args: &Args, results: &Results) -> Result<String> {
    let Results { churn, sources, bursts, floods, memory, profile, took } = results;
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
        "Machine: {cores} CPUs ({cpu}), Linux {}. {} repetitions of {} s churn with {} clients; {} burst runs per \
         limiter; run took {:.0} s.\n",
        kernel.trim(),
        args.reps,
        args.duration.as_secs_f64(),
        args.clients,
        args.burst_runs,
        took.as_secs_f64()
    )?;

    writeln!(out, "### Connection churn (connect, accept, close)\n")?;
    writeln!(
        out,
        "Medians over repetitions; ratios are the median of per-repetition ratios to the no-limiter run of the \
         same repetition (churn: higher is better; p99: lower is better).\n"
    )?;
    writeln!(out, "| configuration | sources | conn/s | ratio | p50 µs | p99 µs | p99 ratio | failed |")?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for (ki, kind) in Kind::ALL.iter().enumerate() {
        for (si, n) in sources.iter().enumerate() {
            let runs: &ChurnRuns = &churn[ki][si];
            let base = &churn[0][si];
            let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
            writeln!(
                out,
                "| {} | {n} IP{} | {:.0} | {:.3}× | {:.0} | {:.0} | {:.3}× | {} |",
                kind.name(),
                if *n == 1 { "" } else { "s" },
                median(runs.per_sec.clone()),
                ratio(&runs.per_sec, &base.per_sec),
                median(runs.p50_us.clone()),
                median(runs.p99_us.clone()),
                ratio(&runs.p99_us, &base.p99_us),
                runs.failed
            )?;
        }
    }

    writeln!(
        out,
        "\nWhere connlimit's time goes (one profiled churn run from 1000 IPs, {:.0} connections, kernel BPF statistics on):\n",
        profile.connections
    )?;
    writeln!(out, "| program | runs per connection | ns per run | ns per connection |")?;
    writeln!(out, "|---|---|---|---|")?;
    for (label, time, count) in &profile.programs {
        let per_run = time.as_nanos() as f64 / (*count).max(1) as f64;
        let per_conn = time.as_nanos() as f64 / profile.connections.max(1.0);
        writeln!(
            out,
            "| {label} | {:.2} | {per_run:.0} | {per_conn:.0} |",
            *count as f64 / profile.connections.max(1.0)
        )?;
    }

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

    writeln!(out, "\n### Over-limit flood: a client at its limit keeps connecting\n")?;
    writeln!(
        out,
        "| configuration | refused attempts | server CPU per 10,000 refused | server accept() per 10,000 refused |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (kind, refused, cpu_ms, accepts) in floods {
        writeln!(out, "| {} | {refused} | {cpu_ms:.1} ms | {accepts:.0} |", kind.name())?;
    }

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
    Ok(out)
}
