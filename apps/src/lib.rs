//! The apps on the relay engine. Two folders keep the product and the
//! sample apart:
//!
//! - [`relay`]: the product, the relaying commands (`vsock-proxy`, `proxy`,
//!   `forward`) and their rules (allowlist, services file, options,
//!   metrics, signals);
//! - [`sample`]: the workshop's sample application (`serve`, `client`, the
//!   IP-ranges data, `demo`), which shows the product at work;
//!
//! and [`dns`], DNS for the enclave: its forwarder (`vsock-relay dns`), the
//! parent's service that answers as the allowlist allows, and the framing
//! both speak; [`bench`], the load generator and sink both sides use; [`about`]:
//! `--version`, manual pages and shell completions. The binaries in `bin/`
//! are thin: parse, validate, hand to the engine.

#![forbid(unsafe_code)]

pub mod about;
pub mod bench;
pub mod dns;
pub mod relay;
pub mod sample;
