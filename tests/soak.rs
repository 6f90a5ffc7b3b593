//! The soak tool itself (testkit/bin/soak.rs): a run with one byte flipped
//! on its way must fail, naming the corrupted connection: the CI soak's
//! guard against passing whatever happens.

use std::process::Command;

#[test]
fn the_soak_fails_on_a_corrupted_byte() {
    let relay = vsock_relay_testkit::binary("vsock-relay");
    let out = std::env::temp_dir().join(format!("soak-corrupt-{}", std::process::id()));
    // 24 s of traffic, bounded by the soak's own phases (and its clients'
    // 60 s stall limit).
    let run = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(["--seconds", "24", "--seed", "3", "--inject-corruption", "--out"])
        .arg(&out)
        .env("VSOCK_RELAY_BIN_DIR", relay.parent().unwrap())
        .env(vsock_relay_engine::socket::NO_VSOCK_ENV, "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "the soak passed with a flipped byte:\n{stdout}");
    assert!(stdout.contains("corrupted connection(s), first: connection"), "{stdout}");
    assert!(stdout.contains("soak: FAILED"), "{stdout}");
}
