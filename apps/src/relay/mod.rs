//! The product: the relaying commands (`vsock-proxy` and `vsock-relay
//! proxy` on the parent, `forward` in the enclave) and what they stand on:
//! the allowlist, the services file, the shared options, metrics, and the
//! glue that runs a relay until a signal stops it; `doctor` checks a
//! machine and those files before the first start.

pub mod allowlist;
pub mod doctor;
pub mod dropin;
pub mod forward;
pub mod metrics;
pub mod options;
pub mod proxy;
pub mod run;
pub mod services;
