//! Everything that crosses a process boundary between `supernode`, `dfdaemon` and `dfget`.
//!
//! No I/O lives here: types, their invariants and a length-prefixed frame codec, so that the
//! same bytes can be unit-tested, property-tested and fuzzed without a network.
//!
//! * [`ids`]: newtypes for task, host and piece identities and for sha256 digests.
//! * [`layout`]: how a task's content is cut into pieces; fixed once per task.
//! * [`control`]: daemon <-> supernode requests and responses (register, announce,
//!   schedule, report, leave).
//! * [`piece`]: daemon <-> daemon piece-transfer frames.
//! * [`codec`]: `[u32 length][postcard body]` frames; the length cap is checked before any
//!   allocation, and decoded messages are validated before they are handed out.
//! * [`api`]: JSON shapes of the daemon's local API that `dfget` speaks.
//! * [`prewarm`]: pre-warm jobs (supernode HTTP API) and the work they hand to daemons.
//!
//! The protocol version travels in the QUIC ALPN ([`PEER_ALPN`], [`CONTROL_ALPN`]): a peer
//! speaking another version fails the TLS handshake instead of misreading frames.
#![forbid(unsafe_code)]

pub mod api;
pub mod codec;
pub mod control;
pub mod ids;
pub mod layout;
pub mod piece;
pub mod prewarm;

pub use codec::{DecodeError, EncodeError, Frame};
pub use ids::{HostId, PieceIndex, SessionId, Sha256Digest, TaskId};
pub use layout::{PieceLayout, PieceSet};

/// ALPN for daemon-to-daemon piece transfer, version 1.
pub const PEER_ALPN: &[u8] = b"dfp2p-peer/1";
/// ALPN for daemon-to-supernode control traffic, version 1.
pub const CONTROL_ALPN: &[u8] = b"dfp2p-ctl/1";
/// TLS server name every daemon certificate carries; peers verify it against the cluster CA.
pub const PEER_SERVER_NAME: &str = "peer.dfp2p.internal";
/// TLS server name of the supernode's certificate.
pub const SUPERNODE_SERVER_NAME: &str = "supernode.dfp2p.internal";
