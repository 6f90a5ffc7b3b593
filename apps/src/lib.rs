//! The apps on the relay engine: argument parsing and validation, the
//! allowlist, and glue that starts a relay and stops it on a signal. The
//! binaries in `bin/` are thin: parse, validate, hand to the engine.

#![forbid(unsafe_code)]

pub mod allowlist;
pub mod bench;
pub mod client;
pub mod demo;
pub mod forward;
pub mod ipranges;
pub mod metrics;
pub mod options;
pub mod proxy;
pub mod run;
pub mod serve;
pub mod services;
