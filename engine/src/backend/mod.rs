//! Backends wait for readiness and run the shared connection logic
//! (`conn.rs`, `pump.rs`). `uring` is the fast path: io_uring polls, accepts
//! and timeouts, with non-blocking splice on the worker thread.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::relay::WorkerSetup;

mod uring;

/// The backend a user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// The best one this kernel allows.
    #[default]
    Auto,
    /// io_uring, or an error if the kernel refuses it.
    Uring,
}

/// The backend a relay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Uring => "io_uring",
        })
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            other => Err(format!("unknown backend `{other}`; expected auto or uring")),
        }
    }
}

/// Probes the kernel and picks the backend; says in one log line which and why.
pub fn choose(choice: BackendChoice) -> Result<Backend, Error> {
    match crate::ring::Ring::probe() {
        Ok(()) => {
            tracing::info!(
                backend = "io_uring",
                ?choice,
                "backend chosen: io_uring setup and opcode probe passed"
            );
            Ok(Backend::Uring)
        }
        Err(why) => Err(Error::UringUnavailable(why)),
    }
}

impl Backend {
    pub(crate) fn run_worker(self, setup: WorkerSetup) -> Result<(), Error> {
        let index = setup.index;
        let control = std::sync::Arc::clone(&setup.control);
        let result = match self {
            Backend::Uring => uring::run(setup),
        };
        if let Err(source) = result {
            tracing::error!(worker = index, error = %source, "worker failed; stopping the relay");
            control.stop();
            return Err(Error::Worker {
                worker: index,
                source,
            });
        }
        Ok(())
    }
}
