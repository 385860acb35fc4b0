//! Upstream registries: the HTTP client (`client`: token flow, retries,
//! redirects, rate-limit headers), the set of configured registries with
//! their back-off (`registry`), and credentials (`credentials`).

mod client;
mod credentials;
mod registry;
mod wire;

pub use client::*;
pub use credentials::*;
pub mod limits;
pub use limits::UpstreamLimits;
pub use registry::*;
pub use wire::{Result, UpstreamError, parse_challenge};
