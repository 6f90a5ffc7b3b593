//! `vsock-relay bench`: every workload against its sink, directly over a
//! Unix socket and through a relay over TCP, with the JSON a script reads;
//! and its errors.

use std::time::Duration;

use serde_json::Value;

use crate::util::{run_capturing, run_to_exit, wait_for_unix, Proc, TempDir};

/// Runs `vsock-relay bench ARGS --json` and returns the workload's object.
fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend(args);
    all.push("--json");
    let out = run_capturing("vsock-relay", &all, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{all:?}: {}", out.stderr);
    let value: Value = serde_json::from_str(&out.stdout).unwrap();
    value.as_object().unwrap().values().next().unwrap().clone()
}

fn assert_latency(latency: &Value) {
    let (p50, p99, max) = (
        latency["p50_us"].as_f64().unwrap(),
        latency["p99_us"].as_f64().unwrap(),
        latency["max_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
}

/// A `bench sink` on a Unix socket in `dir`, and its endpoint.
fn sink(dir: &TempDir) -> (Proc, String) {
    let path = dir.path("sink.sock");
    let endpoint = format!("unix:{}", path.display());
    let sink = Proc::spawn("vsock-relay", &["bench", "sink", "--listen", &endpoint]);
    wait_for_unix(&path, Duration::from_secs(20));
    (sink, endpoint)
}

#[test]
fn every_workload_directly_and_through_a_relay() {
    let dir = TempDir::new("bench");
    let (_sink, sink_endpoint) = sink(&dir);
    let mut relay =
        Proc::spawn("vsock-relay", &["relay", "--listen", "tcp:127.0.0.1:0", "--to", &sink_endpoint]);
    let relayed = format!("tcp:127.0.0.1:{}", relay.logged_tcp_port());

    for to in [sink_endpoint.as_str(), relayed.as_str()] {
        let bulk = bench(&["bulk", "--to", to, "--streams", "3", "--bytes", "32MiB"]);
        assert_eq!(bulk["streams"], 3);
        assert_eq!(bulk["bytes_per_stream"], 32 << 20);
        assert!(bulk["total_gib_per_s"].as_f64().unwrap() > 0.0, "{bulk}");
        assert_eq!(bulk["per_stream_gib_per_s"].as_array().unwrap().len(), 3);

        let rpc = bench(&["rpc", "--to", to, "--connections", "4", "--requests", "200", "--size", "1KiB"]);
        assert_eq!((rpc["connections"].as_u64(), rpc["size"].as_u64()), (Some(4), Some(1024)));
        assert!(rpc["requests_per_s"].as_f64().unwrap() > 0.0, "{rpc}");
        assert_latency(&rpc["latency"]);

        let churn = bench(&["churn", "--to", to, "--connections", "300", "--parallel", "3"]);
        assert_eq!(churn["connections"], 300);
        assert_latency(&churn["latency"]);
        // The parts of a connection, each no longer than the whole.
        for part in ["connect", "first_reply", "close"] {
            assert_latency(&churn[part]);
            assert!(churn[part]["p50_us"].as_f64() <= churn["latency"]["max_us"].as_f64(), "{churn}");
        }

        let idle = bench(&["idle", "--to", to, "--connections", "500", "--hold", "0.5"]);
        assert_eq!(idle["confirmed"], 500, "{idle}");
        assert_eq!(idle["new_served"], idle["new_tried"], "{idle}");

        let burst = bench(&["burst", "--to", to, "--connections", "300"]);
        assert_eq!((burst["served"].as_u64(), burst["failed"].as_u64()), (Some(300), Some(0)), "{burst}");
        assert_eq!(burst["failures"], serde_json::json!({}), "{burst}");
        assert!(burst["all_served_seconds"].as_f64().unwrap() > 0.0, "{burst}");
        assert_latency(&burst["latency"]);
    }
}

#[test]
fn a_burst_counts_each_failure_by_its_cause() {
    let dir = TempDir::new("bench-burst");
    let missing = format!("unix:{}", dir.path("no-sink.sock").display());
    let burst = bench(&["burst", "--to", &missing, "--connections", "20", "--limit", "2"]);
    assert_eq!((burst["served"].as_u64(), burst["failed"].as_u64()), (Some(0), Some(20)), "{burst}");
    assert_eq!(burst["failures"], serde_json::json!({"connect: No such file or directory (os error 2)": 20}));
    assert_eq!(burst["latency"], Value::Null, "{burst}");
}

#[test]
fn text_output_names_the_workload() {
    let dir = TempDir::new("bench-text");
    let (_sink, to) = sink(&dir);
    let out = run_capturing(
        "vsock-relay",
        &["bench", "rpc", "--to", &to, "--requests", "10"],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(&format!("rpc: 1 connection(s) x 10 round trips of 64 B to {to}: ")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("requests/s; latency p50 "), "{}", out.stdout);
}

#[test]
fn bench_errors() {
    let (code, stderr) =
        run_to_exit("vsock-relay", &["bench", "bulk", "--to", "unix:/nonexistent/sink.sock"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot connect to unix:/nonexistent/sink.sock"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, stderr) =
        run_to_exit("vsock-relay", &["bench", "bulk", "--to", "tcp:127.0.0.1:9", "--bytes", "1TB"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("expected a number of bytes with an optional KiB, MiB or GiB"), "{stderr}");
}
