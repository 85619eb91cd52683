//! Daemon-to-daemon piece transfer over QUIC.
//!
//! Server: every stored piece is read from the store *and verified* before a byte goes
//! out (or comes from the store's memory of pieces verified since they arrived); a
//! bounded number of uploads run at once (upload slots) and a request beyond that gets an
//! immediate `Busy`, so the requester moves to another parent instead of queueing. The
//! one exception is a piece this daemon is fetching from the origin right now: its bytes
//! go out as they land (see [`crate::landing`]), on slots of their own, and the stream
//! finishes only once the digest they must match is recorded at the supernode.
//!
//! Client: one connection per parent, reused; the answer's length is checked against the
//! layout before reading, and the bytes against the supernode's digest after (a landing
//! piece comes back with its digest, and the download engine checks that against the
//! record once the parent has made it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::piece::{PieceRequest, PieceResponse};
use proto::{PieceIndex, Sha256Digest, TaskId};
use sha2::{Digest, Sha256};
use supernode::transport::{FrameIoError, read_frame, write_frame};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::landing::{Landing, LandingEnd, Landings};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Time to connect to a parent before trying another.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A parent must start answering a piece request within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-piece deadline; a parent slower than ~0.5 MiB/s on a 16 MiB piece is dropped
/// for this piece.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request for a piece this daemon is about to fetch from the origin waits for
/// that fetch to be registered.
const LANDING_WAIT: Duration = Duration::from_millis(300);
/// Stream reset code: the origin fetch whose bytes were being relayed failed.
const LANDING_FAILED: quinn::VarInt = quinn::VarInt::from_u32(1);

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("parent {addr}: {source}")]
    Frame {
        addr: SocketAddr,
        source: FrameIoError,
    },
    #[error("parent {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("parent {addr} does not have the piece")]
    NotFound { addr: SocketAddr },
    #[error("parent {addr} is busy")]
    Busy { addr: SocketAddr },
    #[error("parent {addr} reported its copy corrupt")]
    RemoteCorrupt { addr: SocketAddr },
    #[error("parent {addr} sent {got} bytes, piece is {want}")]
    Length {
        addr: SocketAddr,
        got: u32,
        want: u32,
    },
    #[error("parent {addr} sent bytes that do not match the recorded digest")]
    DigestMismatch { addr: SocketAddr },
    #[error("parent {addr}: {reason}")]
    Stream { addr: SocketAddr, reason: String },
}

/// What the piece server needs, shared by every connection it serves.
#[derive(Clone)]
pub struct ServeCtx {
    pub store: Arc<Store>,
    /// Upload slots for stored pieces.
    pub slots: Arc<Semaphore>,
    pub landings: Arc<Landings>,
    /// Uploads of pieces still landing from the origin. They go at the origin's pace,
    /// a fraction of this host's link, so they get slots of their own rather than
    /// holding the ones that keep the link busy.
    pub landing_slots: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
}

/// Serves one accepted peer connection until it closes.
pub async fn serve_connection(conn: quinn::Connection, ctx: ServeCtx, tracker: TaskTracker) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let ctx = ctx.clone();
        tracker.spawn(async move {
            if let Err(e) = serve_stream(send, recv, ctx).await {
                tracing::debug!(error = %e, "piece request failed");
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: ServeCtx,
) -> Result<(), FrameIoError> {
    let req: PieceRequest = match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await
    {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    // A piece just stored may still be listed as landing for a moment (until the
    // supernode's answer to its announce arrives): the stored copy goes first.
    let recent = ctx.store.recent_piece(&req.task, req.piece);
    if recent.is_none()
        && let Some(landing) = ctx.landings.get(&req.task, req.piece)
    {
        return serve_landing(send, landing, &ctx).await;
    }
    let Ok(permit) = ctx.slots.try_acquire() else {
        ctx.metrics.upload_busy.inc();
        return answer(send, &PieceResponse::Busy).await;
    };
    let read = match recent {
        Some(hit) => Ok(Ok(hit)),
        None => {
            let store = ctx.store.clone();
            tokio::task::spawn_blocking(move || store.read_piece(&req.task, req.piece)).await
        }
    };
    let resp = match read {
        Ok(Ok((data, digest))) => Ok((data, digest)),
        Ok(Err(StoreError::Corrupt { .. })) => Err(PieceResponse::Corrupt),
        Ok(Err(_)) | Err(_) => Err(PieceResponse::NotFound),
    };
    match resp {
        Ok((data, digest)) => {
            write_frame(
                &mut send,
                &PieceResponse::Data {
                    len: data.len() as u32,
                    digest,
                },
            )
            .await?;
            send.write_chunk(data.clone())
                .await
                .map_err(FrameIoError::Write)?;
            send.finish()?;
            ctx.metrics.upload_bytes.inc_by(data.len() as u64);
            // Wait for the peer to take the data before releasing the slot, so the slot
            // count really bounds concurrent uploads.
            let _ = tokio::time::timeout(PIECE_TIMEOUT, send.stopped()).await;
            Ok(())
        }
        Err(PieceResponse::NotFound) if ctx.landings.is_active(&req.task) => {
            drop(permit);
            // Sent here for a piece this daemon was just given to fetch from the origin,
            // before its fetch was registered.
            match ctx
                .landings
                .wait_for(&req.task, req.piece, LANDING_WAIT)
                .await
            {
                Some(landing) => serve_landing(send, landing, &ctx).await,
                None => answer(send, &PieceResponse::NotFound).await,
            }
        }
        Err(r) => {
            if r == PieceResponse::Corrupt {
                ctx.metrics.corrupt_local_pieces.inc();
            }
            answer(send, &r).await
        }
    }
}

/// Answers a request with one frame and no data.
async fn answer(mut send: quinn::SendStream, resp: &PieceResponse) -> Result<(), FrameIoError> {
    write_frame(&mut send, resp).await?;
    send.finish()?;
    Ok(())
}

/// Streams a piece's bytes as they land from the origin; see [`crate::landing`].
async fn serve_landing(
    mut send: quinn::SendStream,
    landing: Arc<Landing>,
    ctx: &ServeCtx,
) -> Result<(), FrameIoError> {
    let Ok(_permit) = ctx.landing_slots.try_acquire() else {
        ctx.metrics.upload_busy.inc();
        return answer(send, &PieceResponse::Busy).await;
    };
    write_frame(&mut send, &PieceResponse::Landing { len: landing.len }).await?;
    let mut rx = landing.subscribe();
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + PIECE_TIMEOUT;
    loop {
        let (chunks, end) = {
            let s = rx.borrow_and_update();
            (s.chunks.get(sent..).unwrap_or_default().to_vec(), s.end)
        };
        if end == Some(LandingEnd::Failed) {
            let _ = send.reset(LANDING_FAILED);
            return Ok(());
        }
        for c in chunks {
            sent += 1;
            ctx.metrics.upload_bytes.inc_by(c.len() as u64);
            send.write_chunk(c).await.map_err(FrameIoError::Write)?;
        }
        if end == Some(LandingEnd::Recorded) {
            break;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            // Too slow to be worth waiting for (the sender can't be gone: `landing` holds
            // it, and every landing is ended before it is dropped).
            Ok(Err(_)) | Err(_) => {
                let _ = send.reset(LANDING_FAILED);
                return Ok(());
            }
        }
    }
    send.finish()?;
    ctx.metrics.landing_uploads.inc();
    let _ = tokio::time::timeout(PIECE_TIMEOUT, send.stopped()).await;
    Ok(())
}

/// Fetches pieces from parents, one cached connection per parent address.
pub struct PeerClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl PeerClient {
    pub fn new(endpoint: quinn::Endpoint, config: quinn::ClientConfig) -> Self {
        Self {
            endpoint,
            config,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, PeerError> {
        if let Some(c) = self.conns.lock().await.get(&addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let err = |reason: String| PeerError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, proto::PEER_SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let mut conns = self.conns.lock().await;
        // Bound the cache: drop closed connections when it grows.
        if conns.len() > 256 {
            conns.retain(|_, c| c.close_reason().is_none());
        }
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    /// Drops a cached connection after a failure so the next attempt reconnects.
    pub async fn forget(&self, addr: SocketAddr) {
        self.conns.lock().await.remove(&addr);
    }

    /// Fetches one piece of `len` bytes and checks it against `digest`.
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        task: TaskId,
        piece: PieceIndex,
        len: u32,
        digest: Sha256Digest,
    ) -> Result<Bytes, PeerError> {
        let (data, actual) = self.fetch_unchecked(addr, task, piece, len, false).await?;
        if actual != digest {
            return Err(PeerError::DigestMismatch { addr });
        }
        Ok(data)
    }

    /// Takes a piece's bytes from a parent that is fetching it from the origin, as they
    /// land (or whole, if it is done by now). Nothing is recorded to check them against
    /// before they are complete, so this returns them with their digest, for the caller
    /// to compare with the record once there is one.
    pub async fn fetch_landing(
        &self,
        addr: SocketAddr,
        task: TaskId,
        piece: PieceIndex,
        len: u32,
    ) -> Result<(Bytes, Sha256Digest), PeerError> {
        self.fetch_unchecked(addr, task, piece, len, true).await
    }

    async fn fetch_unchecked(
        &self,
        addr: SocketAddr,
        task: TaskId,
        piece: PieceIndex,
        len: u32,
        landing: bool,
    ) -> Result<(Bytes, Sha256Digest), PeerError> {
        let conn = self.connection(addr).await?;
        let work = async {
            let frame = |source| PeerError::Frame { addr, source };
            let read_error = |e: quinn::ReadError| match e {
                // The parent's origin fetch failed: it won't have the piece.
                quinn::ReadError::Reset(code) if code == LANDING_FAILED => {
                    PeerError::NotFound { addr }
                }
                e => PeerError::Stream {
                    addr,
                    reason: e.to_string(),
                },
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PeerError::Stream {
                addr,
                reason: e.to_string(),
            })?;
            write_frame(&mut send, &PieceRequest { task, piece })
                .await
                .map_err(frame)?;
            send.finish().map_err(|e| frame(e.into()))?;
            let header: PieceResponse = tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv))
                .await
                .map_err(|_| PeerError::Timeout { addr })?
                .map_err(|e| match e {
                    // A landing that failed at once: the reset can overtake the header.
                    FrameIoError::Read(quinn::ReadExactError::ReadError(e)) => read_error(e),
                    e => frame(e),
                })?;
            let got = match header {
                PieceResponse::Data { len: got, .. } => got,
                PieceResponse::Landing { len: got } if landing => got,
                // Bytes nobody can check yet, offered to a requester that wants a stored
                // piece: not taken. The parent is about to have it stored (it was sent
                // here as a holder), so this is "ask again shortly", like busy.
                PieceResponse::Landing { .. } => return Err(PeerError::Busy { addr }),
                PieceResponse::NotFound => return Err(PeerError::NotFound { addr }),
                PieceResponse::Busy => return Err(PeerError::Busy { addr }),
                PieceResponse::Corrupt => return Err(PeerError::RemoteCorrupt { addr }),
            };
            if got != len {
                return Err(PeerError::Length {
                    addr,
                    got,
                    want: len,
                });
            }
            // Take quinn's chunks as they arrive and hash them while they are still in
            // cache: one copy into the piece buffer, no second pass over memory.
            let mut buf = crate::store::piece_buffer(len as usize);
            let mut hasher = Sha256::new();
            while buf.len() < len as usize {
                let chunk = match recv.read_chunk(len as usize - buf.len(), true).await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        return Err(PeerError::Length {
                            addr,
                            got: buf.len() as u32,
                            want: len,
                        });
                    }
                    Err(e) => return Err(read_error(e)),
                };
                hasher.update(&chunk.bytes);
                buf.extend_from_slice(&chunk.bytes);
            }
            if landing {
                // The parent finishes the stream only once its digest is recorded; the
                // record is what the caller checks against, so wait for that.
                match recv.read_chunk(1, true).await {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        return Err(PeerError::Length {
                            addr,
                            got: len + 1,
                            want: len,
                        });
                    }
                    Err(e) => return Err(read_error(e)),
                }
            }
            Ok((buf.freeze(), Sha256Digest::from(hasher.finalize())))
        };
        tokio::time::timeout(PIECE_TIMEOUT, work)
            .await
            .map_err(|_| PeerError::Timeout { addr })?
    }
}
