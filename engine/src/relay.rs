//! A relay: one or more services (a listener and a target each) and worker
//! threads (each with its own driver: an io_uring ring, or epoll) that
//! accept, connect upstream and pump bytes for all of them. Apps describe a relay with [`RelayConfig`] and hand it here;
//! they hold no socket loops of their own.

use std::fs::File;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::Socket;

use crate::config::{RelayConfig, Service, Upstream};
use crate::driver::{self, Backend};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::route::router::{Mailbox, Router, ServiceRoute};
use crate::socket;
use crate::stats::Stats;
use crate::sys;
use crate::vocab::DataPath;
use crate::worker::{self, Control, WorkerSetup};

/// Stops a running relay from anywhere (a signal handler thread, a test).
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<Control>);

impl StopHandle {
    /// Stops accepting; open connections get the drain timeout to finish.
    pub fn stop(&self) {
        self.0.stop();
    }

    /// Stops accepting and resets the open connections at once (a second
    /// stop during the drain).
    pub fn stop_now(&self) {
        self.0.stop_now();
    }
}

/// A started relay.
pub struct Relay {
    /// Per service, the endpoint listened on.
    local: Vec<Endpoint>,
    backend: Backend,
    data_path: DataPath,
    stats: Arc<Stats>,
    control: Arc<Control>,
    config: Arc<RelayConfig>,
    workers: Vec<JoinHandle<Result<(), Error>>>,
}

impl Relay {
    /// Checks the config, picks the backend, binds the listeners, starts
    /// the router (for routed services) and the workers.
    pub fn start(config: RelayConfig) -> Result<Relay, Error> {
        check(&config)?;
        let backend = driver::choose(config.backend)?;
        if let Err(e) = sys::raise_open_files_limit() {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (local, listeners) = listen(&config, workers)?;
        let Wakers { for_control, wakes, mailboxes } = Wakers::new(workers)?;
        let control = Arc::new(Control::new(for_control));
        let stats = Arc::new(Stats::new(config.services.iter().map(|s| s.name.clone()).collect(), workers));
        let config = Arc::new(config);
        let router = start_router(&config, &mailboxes)?;
        for (service, listen) in config.services.iter().zip(&local) {
            tracing::info!(service = %service.name, listen = %listen, upstream = %service.upstream,
                workers, backend = %backend, "relay listening");
        }
        let shared = Shared {
            config: Arc::clone(&config),
            stats: Arc::clone(&stats),
            control: Arc::clone(&control),
            router,
        };
        let handles = spawn_workers(backend, listeners, wakes, mailboxes, shared)?;
        let data_path = config.data_path;
        Ok(Relay { local, backend, data_path, stats, control, config, workers: handles })
    }

    /// The endpoint the first service listens on (with the real port after port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local[0]
    }

    /// The endpoints listened on, one per service in the config's order.
    pub fn local_endpoints(&self) -> &[Endpoint] {
        &self.local
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The services, in the config's order (their gates and targets are
    /// the running ones).
    pub fn services(&self) -> &[Service] {
        &self.config.services
    }

    /// The data path asked for (`Auto` picks per direction).
    pub fn data_path(&self) -> DataPath {
        self.data_path
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.control))
    }

    /// Waits until every worker ended (after a stop, or on a fatal error,
    /// which stops the others too).
    pub fn wait(mut self) -> Result<(), Error> {
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        let mut first_error = None;
        for (worker, handle) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            let result = handle.join().unwrap_or_else(|_| {
                Err(Error::Worker { worker, source: std::io::Error::other("worker thread panicked") })
            });
            if let Err(e) = result {
                self.control.stop();
                first_error.get_or_insert(e);
            }
        }
        for local in &self.local {
            if let Endpoint::Unix { path } = local {
                let _ = std::fs::remove_file(path);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops and waits.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.control.stop();
        self.join()
    }
}

impl Drop for Relay {
    /// A relay dropped without `wait` or `shutdown` stops and is joined, so
    /// that its sockets are closed when the drop returns.
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.control.stop();
            let _ = self.join();
        }
    }
}

/// Refuses a config no relay can run, before any socket opens.
fn check(config: &RelayConfig) -> Result<(), Error> {
    if config.connect_timeout.is_zero() {
        return Err(Error::ZeroConnectTimeout);
    }
    if config.services.is_empty() {
        return Err(Error::NoService);
    }
    for service in &config.services {
        if service.rules.allow_cids.is_some() && !matches!(service.listen, Endpoint::Vsock { .. }) {
            return Err(Error::AllowCidNeedsVsock(service.listen.clone()));
        }
    }
    Ok(())
}

/// One listening socket per service, shared by the `workers`: no
/// SO_REUSEPORT, so a second process on the same address gets "address in
/// use" instead of silently taking a share of the clients. Returns the
/// endpoints listened on (the real port after port 0) and, per worker, its
/// handle of each service's listener.
fn listen(config: &RelayConfig, workers: usize) -> Result<(Vec<Endpoint>, Vec<Vec<Socket>>), Error> {
    let mut local = Vec::with_capacity(config.services.len());
    let mut listeners: Vec<Vec<Socket>> = (0..workers).map(|_| Vec::new()).collect();
    for service in &config.services {
        let listen_error = |source| Error::Listen { endpoint: service.listen.clone(), source };
        let listener = socket::listen(&service.listen, &config.socket).map_err(listen_error)?;
        local.push(socket::local_endpoint(&listener, &service.listen).map_err(listen_error)?);
        for each in &mut listeners[1..] {
            each.push(listener.try_clone().map_err(listen_error)?);
        }
        listeners[0].push(listener);
    }
    Ok((local, listeners))
}

/// One eventfd per worker, seen three ways: the stop control writes it,
/// the router's mailbox writes it, the worker's driver reads it.
struct Wakers {
    for_control: Vec<File>,
    wakes: Vec<File>,
    mailboxes: Vec<Arc<Mailbox>>,
}

impl Wakers {
    fn new(workers: usize) -> Result<Wakers, Error> {
        let for_control = (0..workers)
            .map(|_| sys::eventfd().map(File::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Start)?;
        let wakes =
            for_control.iter().map(File::try_clone).collect::<Result<Vec<_>, _>>().map_err(Error::Start)?;
        let mailboxes = for_control
            .iter()
            .map(|w| w.try_clone().map(|waker| Arc::new(Mailbox::new(waker))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Start)?;
        Ok(Wakers { for_control, wakes, mailboxes })
    }
}

/// The router, when the relay has routed services: it gets the services'
/// names and routes and the DNS options, nothing else of the config.
fn start_router(config: &RelayConfig, mailboxes: &[Arc<Mailbox>]) -> Result<Option<Arc<Router>>, Error> {
    if !config.services.iter().any(|s| matches!(s.upstream, Upstream::Routed(_))) {
        return Ok(None);
    }
    let services =
        config.services.iter().map(|s| ServiceRoute { name: s.name.clone(), route: s.route().cloned() });
    Ok(Some(Arc::new(Router::start(&config.dns, services.collect(), mailboxes.to_vec())?)))
}

/// What every worker shares: the config, the counters, the stop control and
/// the router.
struct Shared {
    config: Arc<RelayConfig>,
    stats: Arc<Stats>,
    control: Arc<Control>,
    router: Option<Arc<Router>>,
}

/// Starts one worker thread per handle set of listeners (with its waker and
/// mailbox); a thread that cannot start stops the others.
fn spawn_workers(
    backend: Backend,
    listeners: Vec<Vec<Socket>>,
    wakes: Vec<File>,
    mailboxes: Vec<Arc<Mailbox>>,
    shared: Shared,
) -> Result<Vec<JoinHandle<Result<(), Error>>>, Error> {
    let mut handles = Vec::with_capacity(listeners.len());
    let inboxes = listeners.into_iter().zip(wakes).zip(mailboxes);
    for (index, ((listeners, wake), mailbox)) in inboxes.enumerate() {
        let setup = WorkerSetup {
            index,
            listeners,
            wake,
            mailbox,
            router: shared.router.clone(),
            config: Arc::clone(&shared.config),
            stats: Arc::clone(&shared.stats),
            control: Arc::clone(&shared.control),
        };
        let handle = std::thread::Builder::new()
            .name(format!("relay-worker-{index}"))
            .spawn(move || worker::run(backend, setup))
            .map_err(|e| {
                shared.control.stop();
                Error::Start(e)
            })?;
        handles.push(handle);
    }
    Ok(handles)
}
