//! The workshop's sample application, kept beside the product to show it
//! working end to end: `serve` (in the enclave: S3 IP ranges by region,
//! fetched over HTTPS through the forwarder and the proxy), `client` (on the
//! parent), the data they share (`ipranges`), and `demo`, the whole channel
//! in one process.

pub mod client;
pub mod demo;
pub mod ipranges;
pub mod serve;
