//! Many concurrent connections through one relay process, and its memory.

use std::io::{Read, Write};
use std::time::Duration;

use vsock_relay_testkit::servers::{echo, Server, Stream};

use crate::util::{backend_arg, wait_for_unix, Proc, TempDir, BACKENDS};

const CONNECTIONS: usize = 2000;

/// Bound on the relay's resident memory with 2,000 connections open.
///
/// Measured here: 5.5 MiB with the 2,000 connections open (the binary, two
/// rings, the connection slabs). The bound leaves about 10 MiB on top, i.e.
/// about 5 KiB per connection: an idle connection holds only its state (a
/// few hundred bytes), never a pipe or a buffer. A relay that kept even one
/// 8 KiB buffer per direction would need over 30 MiB and fail here.
const RSS_BOUND_KIB: u64 = 16 * 1024;

#[test]
fn two_thousand_concurrent_connections_in_bounded_memory() {
    vsock_relay_engine::raise_open_files_limit().unwrap();
    for backend in BACKENDS {
        two_thousand_connections(backend_arg(backend));
    }
}

fn two_thousand_connections(backend: &str) {
    let server = Server::tcp(echo);
    let dir = TempDir::new("scale");
    let listen = dir.path("relay.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let to_arg = server.endpoint().to_string();
    let mut relay = Proc::spawn(
        "vsock-relay",
        &["relay", "--backend", backend, "--listen", &listen_arg, "--to", &to_arg],
    );
    relay.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&listen, Duration::from_secs(5));

    let endpoint = listen_arg.parse().unwrap();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut client = Stream::connect(&endpoint).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        client.write_all(&(i as u64).to_le_bytes()).unwrap();
        clients.push(client);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut echoed = [0u8; 8];
        client.read_exact(&mut echoed).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(u64::from_le_bytes(echoed), i as u64);
    }
    let rss = relay.rss_kib();
    println!(
        "{backend} relay RSS with {CONNECTIONS} open connections: {rss} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(rss < RSS_BOUND_KIB, "{backend} relay RSS {rss} KiB over the bound {RSS_BOUND_KIB} KiB");

    // All still work, and closing them leaves the relay serving.
    for client in &mut clients {
        client.write_all(b"x").unwrap();
    }
    for client in &mut clients {
        let mut one = [0u8; 1];
        client.read_exact(&mut one).unwrap();
    }
    drop(clients);
    let mut last = Stream::connect(&endpoint).unwrap();
    last.write_all(b"still here").unwrap();
    let mut reply = [0u8; 10];
    last.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"still here");
    assert!(relay.child.try_wait().unwrap().is_none());
}
