//! `soak`: mixed traffic through forwarder -> proxy for a given time while a
//! seeded chaos schedule breaks things, then every connection accounted for
//! against the relays' counters (see the testkit's `soak` module). Exit 0
//! when everything is accounted for, 1 with the problems otherwise, 2 on a
//! usage error. perf/soak-report turns its folder into a report.

use std::path::PathBuf;
use std::process::ExitCode;

use vsock_relay_testkit::soak::{self, Options};

const USAGE: &str = "usage: soak [--seconds N] [--seed N] [--out DIR] [--backend auto|uring|portable] [--rate F] [--inject-corruption]

  --seconds N          length of the run (default 120, at least 20)
  --seed N             the chaos schedule's and the traffic's seed (default: from the clock, printed)
  --out DIR            logs, samples.csv, schedule.txt, summary.json (default target/soak)
  --backend B          both relays' --backend (default auto)
  --rate F             traffic rate factor (default 1)
  --inject-corruption  test only: flip one byte of one connection; the run must fail

On the host it runs in a network namespace of its own (root, or a user namespace),
where tc netem shapes the upstream link; it never opens AF_VSOCK.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
    let mut options = Options::new(120, seed, PathBuf::from("target/soak"));
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let parsed: Result<(), String> = match arg.as_str() {
            "--seconds" => value("--seconds")
                .and_then(|v| v.parse().map(|s| options.seconds = s).map_err(|e| format!("--seconds: {e}"))),
            "--seed" => value("--seed")
                .and_then(|v| v.parse().map(|s| options.seed = s).map_err(|e| format!("--seed: {e}"))),
            "--out" => value("--out").map(|v| options.out = PathBuf::from(v)),
            "--backend" => value("--backend").map(|v| options.backend = v),
            "--rate" => value("--rate").and_then(|v| match v.parse::<f64>() {
                Ok(r) if r > 0.0 && r <= 10.0 => {
                    options.rate = r;
                    Ok(())
                }
                _ => Err(format!("--rate: `{v}` is not a factor between 0 and 10")),
            }),
            "--inject-corruption" => {
                options.inject_corruption = true;
                Ok(())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument `{other}`")),
        };
        if let Err(e) = parsed {
            eprintln!("soak: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    // The relay binaries are those built beside this one, unless told.
    if std::env::var_os("VSOCK_RELAY_BIN_DIR").is_none() {
        if let Some(dir) = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.to_path_buf())) {
            if !dir.join("vsock-relay").exists() {
                eprintln!(
                    "soak: no vsock-relay beside {} (cargo build --bins first, or set VSOCK_RELAY_BIN_DIR)",
                    dir.display()
                );
                return ExitCode::from(2);
            }
            std::env::set_var("VSOCK_RELAY_BIN_DIR", dir);
        }
    }
    println!("soak: seed {} ({} s, backend {})", options.seed, options.seconds, options.backend);
    // A namespace of the run's own: its loopback may be shaped by tc, and
    // nothing it does can reach the machine's network.
    let outcome = match vsock_relay_testkit::netns::in_empty_network(|| {
        let mut options = options.clone();
        options.netem = true;
        soak::run(&options)
    }) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("soak: no network namespace of its own here ({e}); running on the machine's loopback without netem");
            soak::run(&options)
        }
    };
    match outcome {
        Ok(outcome) if outcome.problems.is_empty() => {
            println!(
                "soak: PASSED: every connection accounted for, no corrupted byte, no growth ({})",
                options.out.display()
            );
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            for problem in &outcome.problems {
                println!("soak: problem: {problem}");
            }
            println!("soak: FAILED ({} problem(s); {})", outcome.problems.len(), options.out.display());
            ExitCode::from(1)
        }
        Err(e) => {
            println!("soak: FAILED to run: {e}");
            ExitCode::from(1)
        }
    }
}
