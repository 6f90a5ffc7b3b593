//! A relay: a listener, a target, and worker threads (one ring each) that
//! accept, connect upstream and pump bytes. Apps describe a relay with
//! [`RelayConfig`] and hand it here; they hold no socket loops of their own.

use std::fs::File;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::RelayConfig;
use crate::driver::{self, Backend};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::socket;
use crate::stats::Stats;
use crate::sys;
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
    local: Endpoint,
    backend: Backend,
    stats: Arc<Stats>,
    control: Arc<Control>,
    workers: Vec<JoinHandle<Result<(), Error>>>,
}

impl Relay {
    /// Binds the listener(s), picks the backend and starts the workers.
    pub fn start(config: RelayConfig) -> Result<Relay, Error> {
        if config.connect_timeout.is_zero() {
            return Err(Error::ZeroConnectTimeout);
        }
        if config.allow_cids.is_some() && !matches!(config.listen, Endpoint::Vsock { .. }) {
            return Err(Error::AllowCidNeedsVsock(config.listen.clone()));
        }
        let backend = driver::choose(config.backend)?;
        if let Err(e) = sys::raise_open_files_limit() {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let listen_error = |source| Error::Listen { endpoint: config.listen.clone(), source };
        // One listening socket, shared by the workers: no SO_REUSEPORT, so a
        // second process on the same address gets "address in use" instead
        // of silently taking a share of the clients.
        let listener = socket::listen(&config.listen, &config.socket).map_err(listen_error)?;
        let local = socket::local_endpoint(&listener, &config.listen).map_err(listen_error)?;
        let mut listeners = Vec::with_capacity(workers);
        for _ in 1..workers {
            listeners.push(listener.try_clone().map_err(listen_error)?);
        }
        listeners.push(listener);
        let wakers = (0..workers)
            .map(|_| sys::eventfd().map(File::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Start)?;
        let worker_wakes =
            wakers.iter().map(|w| w.try_clone()).collect::<Result<Vec<_>, _>>().map_err(Error::Start)?;
        let control = Arc::new(Control::new(wakers));
        let stats = Arc::new(Stats::default());
        let config = Arc::new(config);
        tracing::info!(listen = %local, target = %config.target.endpoint(), workers, backend = %backend,
            "relay listening");
        let mut handles = Vec::with_capacity(workers);
        for (index, (listener, wake)) in listeners.into_iter().zip(worker_wakes).enumerate() {
            let setup = WorkerSetup {
                index,
                listener,
                wake,
                config: Arc::clone(&config),
                stats: Arc::clone(&stats),
                control: Arc::clone(&control),
            };
            let handle = std::thread::Builder::new()
                .name(format!("relay-worker-{index}"))
                .spawn(move || worker::run(backend, setup))
                .map_err(|e| {
                    control.stop();
                    Error::Start(e)
                })?;
            handles.push(handle);
        }
        Ok(Relay { local, backend, stats, control, workers: handles })
    }

    /// The endpoint actually listened on (with the real port after port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }

    pub fn backend(&self) -> Backend {
        self.backend
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
        if let Endpoint::Unix { path } = &self.local {
            let _ = std::fs::remove_file(path);
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
