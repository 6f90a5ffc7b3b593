//! DNS for the enclave, answered by the parent.
//!
//! The parent's side: [`server`] answers queries that arrive over a stream
//! (vsock) as the allowlist allows, and [`answered`] remembers what each
//! client was told, for the `transparent` route.

pub mod answered;
pub mod frame;
pub mod server;
