//! Property tests: no argument vector, built from the real subcommands and
//! flags with arbitrary values, makes the parser or the checks that follow
//! it panic; each gives a parse or an error.

use clap::{CommandFactory, Parser};
use connlimit::{Cidr, Config, ebpf::Instance};
use proptest::prelude::*;

use crate::cli::{Cli, Command, TopArgs};

/// Every subcommand with its flags (`--long` and `-s`), read from clap.
fn vocabulary() -> Vec<(String, Vec<String>)> {
    Cli::command()
        .get_subcommands()
        .map(|sub| {
            let flags = sub
                .get_arguments()
                .flat_map(|a| {
                    a.get_long().map(|l| format!("--{l}")).into_iter().chain(a.get_short().map(|s| format!("-{s}")))
                })
                .collect();
            (sub.get_name().to_owned(), flags)
        })
        .collect()
}

/// Values that have broken parsers before, and anything else.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("inf".to_owned()),
        Just("-inf".to_owned()),
        Just("NaN".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("1e308".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("4294967295".to_owned()),
        Just("::ffff:1.2.3.4/200".to_owned()),
        Just("nobody:".to_owned()),
        Just("".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[0-9a-f:./-]{0,24}",
        ".{0,16}",
    ]
}

/// The checks the subcommands make before touching the kernel.
fn check(cli: Cli) {
    match cli.command {
        Command::Run(args) => {
            let _ = args.limits.config().validate();
            let _ = Instance::validate_name(&args.limits.name.name);
        }
        Command::Exec(args) => {
            let _ = args.limits.config().validate();
            let _ = Instance::validate_name(&args.limits.name.name);
            if let Some(user) = &args.user {
                let _ = crate::user::Credentials::resolve(user);
            }
        }
        Command::Set(args) => {
            let _ = Instance::validate_name(&args.name.name);
        }
        Command::Top(TopArgs { interval, rows, .. }) => {
            assert!(crate::cli::TOP_INTERVAL.contains(&interval), "{interval}");
            assert!((1..=crate::cli::MAX_TOP_ROWS).contains(&rows));
            assert!(std::time::Duration::try_from_secs_f64(interval).is_ok());
        }
        Command::Config(args) => {
            let _ = Instance::validate_name(&args.name.name);
        }
        Command::Detach(args) => {
            let _ = Instance::validate_name(args.positional_name.as_deref().unwrap_or(&args.name.name));
        }
        Command::Status(_) | Command::Serve(_) | Command::CheckConfig(_) | Command::GenerateAssets(_) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_argument_vector_parses_or_errs(
        sub in 0usize..16,
        picks in proptest::collection::vec((any::<prop::sample::Index>(), value(), any::<bool>()), 0..8),
        trailing in proptest::collection::vec(value(), 0..3),
    ) {
        let vocabulary = vocabulary();
        let mut argv = vec!["connlimit".to_owned()];
        if let Some((name, flags)) = vocabulary.get(sub) {
            argv.push(name.clone());
            for (flag, value, with_value) in picks {
                if !flags.is_empty() {
                    argv.push(flag.get(flags).clone());
                }
                if with_value {
                    argv.push(value);
                }
            }
        }
        if !trailing.is_empty() {
            argv.push("--".to_owned());
            argv.extend(trailing);
        }
        if let Ok(cli) = Cli::try_parse_from(&argv) {
            check(cli);
        }
    }

    #[test]
    fn any_config_validates_or_errs(
        max in any::<u32>(),
        v4 in any::<u8>(),
        v6 in any::<u8>(),
        exempt in proptest::collection::vec(value(), 0..6),
        dry_run in any::<bool>(),
        total in any::<u32>(),
    ) {
        let exempt: Vec<Cidr> = exempt.iter().filter_map(|s| s.parse().ok()).collect();
        let network_limits: Vec<connlimit::NetworkLimit> = exempt.iter().map(|c| connlimit::NetworkLimit::new(*c, max)).collect();
        let config = Config {
            max_conns_per_client_ip: max,
            ipv4_prefix_len: v4,
            ipv6_prefix_len: v6,
            exempt,
            network_limits: Vec::new(),
            max_conns_total: total,
            dry_run,
        };
        let ok = config.validate().is_ok();
        prop_assert_eq!(ok, max <= connlimit::MAX_CONNS_PER_CLIENT_IP && v4 <= 32 && v6 <= 128 && total <= connlimit::MAX_CONNS_TOTAL);
        // Any of them as network limits too: valid or a clear error, never a panic.
        let _ = Config { network_limits, ..config }.validate();
    }

    /// Service files: arbitrary text, and arbitrary values under the real
    /// keys, parse or give problems with lines, never a panic.
    #[test]
    fn any_service_file_parses_or_errs(
        noise in ".{0,200}",
        values in proptest::collection::vec((0usize..16, value()), 0..10),
    ) {
        let _ = crate::config_file::parse(&noise);
        let keys = ["name", "ports", "cgroup", "pid", "max_conns_per_client_ip", "ipv4_prefix_len",
            "ipv6_prefix_len", "exempt", "dry_run", "persist", "reservation_epoch_ms", "when_full",
            "metrics_listen", "bogus", "port", "[[instance]]"];
        let mut text = String::from("[[instance]]\n");
        for (key, value) in values {
            match keys[key] {
                "[[instance]]" => text.push_str("[[instance]]\n"),
                key => text.push_str(&format!("{key} = {value:?}\n{key}x = {value}\n")),
            }
        }
        if let Err(problems) = crate::config_file::parse(&text) {
            prop_assert!(problems.iter().all(|p| p.line >= 1 && p.line <= text.lines().count().max(1)));
        }
    }
}

#[test]
fn every_subcommand_and_flag_is_in_the_vocabulary() {
    let vocabulary = vocabulary();
    assert_eq!(vocabulary.len(), 10, "9 subcommands and the hidden generate-assets");
    let top = &vocabulary.iter().find(|(n, _)| n == "top").unwrap().1;
    assert!(top.contains(&"--interval".to_owned()) && top.contains(&"-n".to_owned()));
}

#[test]
fn top_interval_out_of_range_is_a_usage_error() {
    for bad in ["inf", "-inf", "NaN", "-1", "0", "0.01", "1e300", "86401", "soon"] {
        let e = Cli::try_parse_from(["connlimit", "top", "--watch", "--interval", bad]).unwrap_err();
        // "-inf" reads as an unknown flag: a usage error all the same.
        assert_eq!(e.exit_code(), 2, "{bad}");
        let e = Cli::try_parse_from(["connlimit", "top", "--watch", &format!("--interval={bad}")]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
    }
    assert!(Cli::try_parse_from(["connlimit", "top", "--watch", "--interval", "0.5"]).is_ok());
}

#[test]
fn numeric_flags_are_range_checked() {
    let bad: [&[&str]; 7] = [
        &["top", "-n", "0"],
        &["top", "-n", "99999999999999999999"],
        &["run", "-p", "80", "-m", "1", "--pid", "0"],
        &["run", "-p", "80", "-m", "1", "--pid", "4194305"],
        &["run", "-p", "0", "-m", "1", "--pid", "1"],
        &["run", "-p", "80", "-m", "1000001", "--pid", "1"],
        &["exec", "-p", "80", "-m", "1", "--reservation-epoch-ms", "5", "--", "true"],
    ];
    for args in bad {
        let e = Cli::try_parse_from(std::iter::once("connlimit").chain(args.iter().copied())).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{args:?}");
    }
}

#[test]
fn top_rows_keeps_limit_as_a_hidden_alias() {
    for flag in ["--rows", "--limit", "-n"] {
        let Command::Top(args) = Cli::try_parse_from(["connlimit", "top", flag, "5"]).unwrap().command else {
            panic!("not top");
        };
        assert_eq!(args.rows, 5, "{flag}");
    }
    let help = Cli::command().find_subcommand_mut("top").unwrap().render_long_help().to_string();
    assert!(help.contains("--rows") && !help.contains("--limit <"), "{help}");
}
