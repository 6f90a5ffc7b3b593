//! DNS for an enclave, answered by the parent. An enclave has no network
//! and so no name server; the parent, where the allowlist lives, answers
//! its queries, so that a name the allowlist does not allow never resolves
//! and a name it allows resolves only to addresses it may reach. Two
//! halves, one wire between them (DNS over a stream socket, RFC 7766: vsock
//! has no datagrams on Nitro):
//!
//! - the enclave's forwarder, `vsock-relay dns` ([`forwarder`], its
//!   connection to the parent in [`upstream`]): UDP and TCP on the address
//!   /etc/resolv.conf names, every query over one pipelined connection;
//! - the parent's server, the routed service `route: dns` ([`server`]),
//!   which remembers what it answered each client ([`answered`]) for the
//!   `transparent` route.
//!
//! Both frame messages with [`frame`]; the forwarder reaches sockets of any
//! family with [`stream`].

pub mod answered;
pub mod forwarder;
pub mod frame;
pub mod server;
pub mod stream;
pub mod upstream;
