//! The supernode: the cluster's scheduler.
//!
//! * [`scheduler`]: the pure state machine (tasks, piece digests, hosts, leases, parent
//!   ranking); everything decided here is unit-tested without I/O.
//! * [`server`]: the async shell: QUIC control endpoint, tick loop, sled persistence
//!   ([`store`]), HTTP API (`/healthz`, `/metrics`, `/api/v1/{tasks,hosts}`).
//! * [`tls`] and [`transport`]: cluster-CA mutual TLS and QUIC frame plumbing, shared
//!   with the daemon (which can also embed a whole supernode in-process).
//! * [`prewarm`]: pre-warm jobs (pure bookkeeping: batches, parallelism, deadlines) and
//!   [`registry`]: resolving an image reference to its blobs, registry auth.
//! * [`config`]: file and flag configuration.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod prewarm;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;
pub mod transport;

pub use server::{Supernode, SupernodeError};

/// Installs the tracing subscriber shared by all binaries: `RUST_LOG` filter (default
/// `info`), human-readable text, or one JSON object per line with `json = true`.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
