//! What a worker says about its connections: the one line a connection
//! gets when it closes (a warning when the upstream could not be reached or
//! a routed head was refused, else at debug level), each in the
//! connection's span (id, service, client, upstream), and the warnings a
//! worker throttles so that a flood of failures cannot flood the log.

use std::time::{Duration, Instant};

use socket2::Socket;

use crate::config::{Service, Upstream};
use crate::conn::{Connection, Ending};
use crate::error::{ConnError, Op, Side};
use crate::hint::{self, Step};
use crate::route::Decision;
use crate::socket;
use crate::throttle::Throttle;

/// The warnings a worker throttles (see [`Throttle`]).
pub(super) struct Warnings {
    pub unreachable: Throttle,
    pub refused: Throttle,
    pub no_upstream_socket: Throttle,
    pub accept: Throttle,
    pub bad_head: Throttle,
}

impl Warnings {
    pub fn new() -> Self {
        Warnings {
            unreachable: Throttle::new("cannot reach the upstream"),
            refused: Throttle::new("client refused"),
            no_upstream_socket: Throttle::new("cannot open an upstream socket"),
            accept: Throttle::new("cannot accept: out of resources"),
            bad_head: Throttle::new("routed client closed: its head was refused"),
        }
    }

    pub fn all(&mut self) -> [&mut Throttle; 5] {
        [
            &mut self.unreachable,
            &mut self.refused,
            &mut self.no_upstream_socket,
            &mut self.accept,
            &mut self.bad_head,
        ]
    }

    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.all().into_iter().filter_map(|t| t.deadline()).min()
    }
}

/// Logs a closed connection's line (see the module's doc).
pub(super) fn closed(
    conn: &Connection,
    service: &Service,
    ending: &Ending,
    lasted: Duration,
    warnings: &mut Warnings,
    now: Instant,
    worker: usize,
) {
    if let Ending::Failed(ConnError { side: Side::Upstream, op: Op::Connect, source }) = ending {
        if warnings.unreachable.admit(now, worker) {
            // What to do about it, where the table knows (a fixed vsock target).
            let source = match &service.upstream {
                Upstream::Fixed(target) => match socket::endpoint_of(&target.current()) {
                    Some(endpoint) => hint::hint(Step::Connect, &endpoint, source)
                        .map_or_else(|| source.to_string(), |hint| format!("{source}. {hint}")),
                    None => source.to_string(),
                },
                Upstream::Routed(_) => source.to_string(),
            };
            connection_span(conn, service).in_scope(|| {
                tracing::warn!(worker, error = %source, "cannot reach the upstream; client reset");
            });
        }
        return;
    }
    // Destinations refused are logged by the router, which decided.
    if let Ending::Refused { decision: Decision::BadHead | Decision::HeadTimeout, reason } = ending {
        if warnings.bad_head.admit(now, worker) {
            connection_span(conn, service).in_scope(|| {
                tracing::warn!(worker, %reason, "routed client closed: its head was refused");
            });
        }
        return;
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (to_upstream, to_client) = conn.bytes();
        let outcome = match ending {
            Ending::Finished => "finished".to_string(),
            Ending::Refused { decision, reason } => format!("refused ({}): {reason}", decision.label()),
            Ending::Failed(e) => e.to_string(),
            Ending::Idle(idle) => format!("reset: idle for {idle:?} (--idle-timeout)"),
        };
        let ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX);
        connection_span(conn, service).in_scope(|| {
            tracing::debug!(worker, to_upstream, to_client, ms, %outcome, "connection closed");
        });
    }
}

/// A client's address for a log line (a system call: off the common path).
pub(super) fn peer_name(client: &Socket) -> String {
    socket::peer_name(client).unwrap_or_else(|| "(unknown)".to_string())
}

/// The span a connection's log lines are in: its id, service, client and
/// upstream on every line. Made only when a line is logged.
fn connection_span(conn: &Connection, service: &Service) -> tracing::Span {
    let client = match conn.client_name.as_str() {
        "" => peer_name(&conn.client),
        name => name.to_string(),
    };
    match conn.destination() {
        Some(destination) => tracing::info_span!("conn", id = conn.id, service = %service.name, %client,
            upstream = %destination),
        None => tracing::info_span!("conn", id = conn.id, service = %service.name, %client,
            upstream = %service.upstream),
    }
}
