//! From an accepted client to a connection: the accept -> connect pipeline,
//! kept out of the worker's loop.
//!
//! For each new client of a service: the service's rules first (a refused
//! client never becomes a connection), the accepted socket tuned, then the
//! connection's plan: for a fixed target its upstream socket opened now,
//! each direction's data path chosen by the families of both sockets (and
//! whether the driver has a buffer ring), the connect's deadline; for a
//! route, the head to read and its deadline. A PROXY protocol header, when
//! the service sends one, is written here from the client's socket (for a
//! transparent forwarder: with the destination it was redirected from). The
//! same dial serves a routed connection once the router allowed its
//! destination. What the worker keeps: the slots, the driver, the counters
//! and the log.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, SockAddr, Socket};

use super::admission::{self, Refusal};
use crate::config::{RelayConfig, Upstream};
use crate::conn::{Connection, Dial, Plan};
use crate::hint;
use crate::proxy_header;
use crate::socket;
use crate::vocab::Trigger;

/// What became of a new client. (The connection is not boxed: it is moved
/// once, into its slot; a box would cost an allocation per client.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Opened {
    /// A connection, to be given a slot; its first action says what next.
    Connection(Connection),
    /// The service's rules refuse the client (reset it, count and log why).
    Refused { client: Socket, refusal: Refusal },
    /// No upstream socket could be opened for a fixed target (out of
    /// descriptors, most likely): the client is reset.
    NoUpstreamSocket { client: Socket, failure: NoSocket },
}

/// Where a redirected TCP client was going. A connection made to the
/// listener itself (not redirected) has its own listener as the original
/// destination: the parent refuses it as loopback.
fn original_destination(client: &Socket) -> io::Result<std::net::SocketAddr> {
    // An IPv4 client of an IPv6 listener (::ffff:a.b.c.d) was tracked as IPv4.
    let ipv6 = client.local_addr()?.as_socket().is_some_and(|local| local.ip().to_canonical().is_ipv6());
    crate::sys::original_destination(std::os::fd::AsFd::as_fd(client), ipv6)
}

/// No upstream socket could be opened for `address`.
pub(super) struct NoSocket {
    /// Boxed: an error path only, kept small.
    address: Box<SockAddr>,
    error: io::Error,
}

impl NoSocket {
    /// Why no socket could be opened.
    pub fn error(&self) -> &io::Error {
        &self.error
    }

    /// The error, with what to do about it where the hint table knows (a
    /// vsock target): for the log line, so made only when one is written.
    pub fn explained(self) -> io::Error {
        match socket::endpoint_of(&self.address) {
            Some(endpoint) => hint::with_hint(hint::Step::Connect, &endpoint, self.error),
            None => self.error,
        }
    }
}

/// Makes the connections of one worker.
pub(super) struct Opener {
    config: Arc<RelayConfig>,
    /// The family of each service's accepted sockets (its listener's).
    client_domains: Vec<Domain>,
    trigger: Trigger,
    /// Whether the driver has a buffer ring (the `ring` data path).
    buffer_ring: bool,
    /// The last connection id given; a worker's ids start at its index
    /// shifted into the high bits, so ids are unique in the relay.
    last_id: u64,
}

impl Opener {
    pub fn new(config: Arc<RelayConfig>, worker: usize, trigger: Trigger, buffer_ring: bool) -> Self {
        let client_domains = config.services.iter().map(|s| socket::domain(&s.listen)).collect();
        Opener { config, client_domains, trigger, buffer_ring, last_id: (worker as u64) << 48 }
    }

    /// A new `client` of `service`, which has `active` connections open.
    pub fn open(&mut self, service: usize, client: Socket, active: u64) -> Opened {
        let served = &self.config.services[service];
        if let Some(refusal) = admission::refusal(served, active, &client) {
            return Opened::Refused { client, refusal };
        }
        if let Err(e) = socket::tune_accepted(&client, self.client_domains[service], &self.config.socket) {
            tracing::debug!(error = %e, "cannot tune an accepted socket");
        }
        let plan = match &served.upstream {
            Upstream::Fixed(target) => match self.dial(service, target.current()) {
                Ok(dial) => Plan::Fixed(dial),
                Err(failure) => return Opened::NoUpstreamSocket { client, failure },
            },
            Upstream::Routed(route) => Plan::route(route),
        };
        let proxy_header = if served.transparent || served.rules.sends_proxy_header() {
            // The header's destination: where a redirected client was going,
            // or the listener it reached.
            let destination = match served.transparent {
                true => match original_destination(&client) {
                    Ok(destination) => Some(destination),
                    Err(e) => {
                        tracing::debug!(error = %e, "no original destination");
                        return Opened::Refused { client, refusal: Refusal::NoOriginalDestination };
                    }
                },
                false => client.local_addr().ok().and_then(|a| a.as_socket()),
            };
            proxy_header::encode(client.peer_addr().ok().and_then(|a| a.as_socket()), destination)
        } else {
            Vec::new()
        };
        self.last_id += 1;
        Opened::Connection(Connection::new(self.last_id, client, plan, self.trigger, proxy_header))
    }

    /// An upstream socket for a client of `service` to `address`, each
    /// direction's data path, and the connect's deadline.
    pub fn dial(&self, service: usize, address: SockAddr) -> Result<Dial, NoSocket> {
        let socket = match socket::socket_for(&address, &self.config.socket) {
            Ok(socket) => socket,
            Err(error) => return Err(NoSocket { address: Box::new(address), error }),
        };
        let (path, ring) = (self.config.data_path, self.buffer_ring);
        let (from_client, from_upstream) = (self.client_domains[service], address.domain());
        let paths = [
            path.for_direction(from_client, from_upstream, ring),
            path.for_direction(from_upstream, from_client, ring),
        ];
        Ok(Dial { socket, address, paths, deadline: Instant::now() + self.config.connect_timeout })
    }
}
