//! Daemon-to-daemon piece transfer over QUIC.
//!
//! Server: every piece is read from the store *and verified* before a byte goes out (or
//! comes from the store's memory of pieces verified since they arrived); a
//! bounded number of uploads run at once (upload slots) and a request beyond that gets an
//! immediate `Busy`, so the requester moves to another parent instead of queueing.
//!
//! Client: one connection per parent, reused; the answer's length is checked against the
//! layout before reading, and the bytes against the supernode's digest after.

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

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Time to connect to a parent before trying another.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A parent must start answering a piece request within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-piece deadline; a parent slower than ~0.5 MiB/s on a 16 MiB piece is dropped
/// for this piece.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Serves one accepted peer connection until it closes.
pub async fn serve_connection(
    conn: quinn::Connection,
    store: Arc<Store>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let (store, slots, metrics) = (store.clone(), slots.clone(), metrics.clone());
        tracker.spawn(async move {
            if let Err(e) = serve_stream(send, recv, store, slots, metrics).await {
                tracing::debug!(error = %e, "piece request failed");
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: Arc<Store>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
) -> Result<(), FrameIoError> {
    let req: PieceRequest = match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await
    {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let Ok(_permit) = slots.try_acquire() else {
        metrics.upload_busy.inc();
        write_frame(&mut send, &PieceResponse::Busy).await?;
        send.finish()?;
        return Ok(());
    };
    let read = match store.recent_piece(&req.task, req.piece) {
        Some(hit) => Ok(Ok(hit)),
        None => {
            let store = store.clone();
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
            metrics.upload_bytes.inc_by(data.len() as u64);
            // Wait for the peer to take the data before releasing the slot, so the slot
            // count really bounds concurrent uploads.
            let _ = tokio::time::timeout(PIECE_TIMEOUT, send.stopped()).await;
        }
        Err(r) => {
            if r == PieceResponse::Corrupt {
                metrics.corrupt_local_pieces.inc();
            }
            write_frame(&mut send, &r).await?;
            send.finish()?;
        }
    }
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
        let conn = self.connection(addr).await?;
        let work = async {
            let frame = |source| PeerError::Frame { addr, source };
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
                .map_err(frame)?;
            let got = match header {
                PieceResponse::Data { len: got, .. } => got,
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
                let chunk = recv
                    .read_chunk(len as usize - buf.len(), true)
                    .await
                    .map_err(|e| PeerError::Stream {
                        addr,
                        reason: e.to_string(),
                    })?
                    .ok_or(PeerError::Length {
                        addr,
                        got: buf.len() as u32,
                        want: len,
                    })?;
                hasher.update(&chunk.bytes);
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok((buf.freeze(), Sha256Digest::from(hasher.finalize())))
        };
        let (data, actual) = tokio::time::timeout(PIECE_TIMEOUT, work)
            .await
            .map_err(|_| PeerError::Timeout { addr })??;
        if actual != digest {
            return Err(PeerError::DigestMismatch { addr });
        }
        Ok(data)
    }
}
