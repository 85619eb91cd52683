//! Piece transfer between daemons. One QUIC bidirectional stream carries one piece: the
//! requester sends a [`PieceRequest`] frame; the server answers a [`PieceResponse`] frame
//! and, for `Data` or `Landing`, exactly `len` raw bytes after it, then finishes the
//! stream.
//!
//! The digest a server sends is informational; the requester checks the bytes against the
//! supernode's record, never against what the sender claims.

use serde::{Deserialize, Serialize};

use crate::codec::{Frame, ValidationError};
use crate::ids::{PieceIndex, Sha256Digest, TaskId};
use crate::layout::MAX_PIECE_SIZE;

/// Piece frames are tiny; anything bigger is garbage.
pub const MAX_PIECE_FRAME: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    pub task: TaskId,
    pub piece: PieceIndex,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceResponse {
    /// `len` bytes of piece data follow.
    Data { len: u32, digest: Sha256Digest },
    /// The server doesn't hold that piece (any more).
    NotFound,
    /// All upload slots are taken; ask another parent.
    Busy,
    /// The server found its stored copy damaged and dropped it.
    Corrupt,
    /// The server is fetching the piece from the origin: `len` bytes follow as they land,
    /// and the stream finishes once the server's digest is recorded at the supernode (it
    /// is reset if the fetch fails). The requester checks them against that record.
    Landing { len: u32 },
}

impl Frame for PieceRequest {
    const MAX_LEN: usize = MAX_PIECE_FRAME;
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

impl Frame for PieceResponse {
    const MAX_LEN: usize = MAX_PIECE_FRAME;
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            PieceResponse::Data { len, .. } | PieceResponse::Landing { len }
                if *len > MAX_PIECE_SIZE =>
            {
                Err(ValidationError("piece length over MAX_PIECE_SIZE"))
            }
            _ => Ok(()),
        }
    }
}
