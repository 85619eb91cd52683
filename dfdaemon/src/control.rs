//! The daemon's side of the control plane: a supernode client that reconnects on demand,
//! and a heartbeat loop that notices when the supernode forgot us (it restarted, or timed
//! us out) and registers again, re-announcing every stored piece.
//!
//! Calls fail fast ([`CALL_TIMEOUT`]) so a dead supernode costs a download seconds, not
//! minutes; the downloader then carries on with its cache, known peers and the origin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::control::{
    AnnounceSource, ControlErrorCode, ControlRequest, ControlResponse, HostInfo, PieceRecord,
};
use proto::{HostId, SessionId};
use supernode::transport::{FrameIoError, read_frame, write_frame};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// Connecting plus one request/response must finish within this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeat period; the supernode drops hosts after a few missed ones.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("supernode unreachable: {0}")]
    Unreachable(String),
    #[error("supernode refused: {code:?}: {message}")]
    Remote {
        code: ControlErrorCode,
        message: String,
    },
    #[error("supernode protocol: {0}")]
    Protocol(String),
}

impl ControlError {
    pub fn is_unknown_host(&self) -> bool {
        matches!(
            self,
            ControlError::Remote {
                code: ControlErrorCode::UnknownHost,
                ..
            }
        )
    }
}

pub struct ControlClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    up: AtomicBool,
    pub info: HostInfo,
    metrics: Arc<Metrics>,
}

impl ControlClient {
    pub fn new(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        info: HostInfo,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            endpoint,
            config,
            addr,
            conn: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            info,
            metrics,
        }
    }

    pub fn host(&self) -> &HostId {
        &self.info.host
    }

    /// Whether the last exchange with the supernode worked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.supernode_up.set(i64::from(up));
    }

    async fn connection(&self) -> Result<quinn::Connection, ControlError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), self.addr, proto::SUPERNODE_SERVER_NAME)
            .map_err(|e| ControlError::Unreachable(e.to_string()))?
            .await
            .map_err(|e| ControlError::Unreachable(e.to_string()))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    pub async fn call(&self, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
        let result = tokio::time::timeout(CALL_TIMEOUT, async {
            let conn = self.connection().await?;
            let io = |e: FrameIoError| ControlError::Unreachable(e.to_string());
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| ControlError::Unreachable(e.to_string()))?;
            write_frame(&mut send, req).await.map_err(io)?;
            send.finish().map_err(|e| io(e.into()))?;
            read_frame::<ControlResponse>(&mut recv)
                .await
                .map_err(|e| match e {
                    FrameIoError::Decode(d) => ControlError::Protocol(d.to_string()),
                    other => io(other),
                })
        })
        .await
        .unwrap_or_else(|_| Err(ControlError::Unreachable("timed out".into())));
        match result {
            Ok(ControlResponse::Error { code, message }) => {
                self.set_up(true);
                Err(ControlError::Remote { code, message })
            }
            Ok(r) => {
                self.set_up(true);
                Ok(r)
            }
            Err(e) => {
                if matches!(e, ControlError::Unreachable(_)) {
                    self.set_up(false);
                    // Force a fresh connection next time: the old one may be half dead.
                    *self.conn.lock().await = None;
                }
                Err(e)
            }
        }
    }

    /// Registers the host, then re-announces everything in the store.
    pub async fn register(&self, store: &Store) -> Result<(), ControlError> {
        self.call(&ControlRequest::RegisterHost(self.info.clone()))
            .await?;
        let mut announced = 0usize;
        for (task, meta) in store.tasks() {
            let Some(layout) = meta.layout else { continue };
            let pieces: Vec<PieceRecord> = store
                .digests(&task)
                .into_iter()
                .map(|(piece, digest)| PieceRecord { piece, digest })
                .collect();
            if pieces.is_empty() {
                continue;
            }
            let view = self
                .call(&ControlRequest::RegisterPeer {
                    host: self.info.host.clone(),
                    task,
                    url: meta.url.clone(),
                    content_digest: meta.content_digest,
                })
                .await?;
            if let ControlResponse::Task(v) = view
                && v.layout.is_none()
            {
                // The supernode lost this task; our layout is as good as any.
                self.call(&ControlRequest::ReportLayout {
                    host: self.info.host.clone(),
                    task,
                    content_length: layout.content_length,
                    supports_range: meta.supports_range,
                })
                .await?;
            }
            announced += pieces.len();
            match self
                .call(&ControlRequest::AnnouncePieces {
                    host: self.info.host.clone(),
                    task,
                    source: AnnounceSource::Restored,
                    pieces,
                })
                .await
            {
                Ok(_) => {}
                Err(ControlError::Remote {
                    code: ControlErrorCode::DigestConflict,
                    message,
                }) => {
                    tracing::warn!(%task, %message, "supernode disagrees with some stored pieces");
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(supernode = %self.addr, pieces = announced, "registered with supernode");
        Ok(())
    }

    /// Heartbeats until cancelled; re-registers whenever the supernode doesn't know us.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<Store>,
        uploads: Arc<tokio::sync::Semaphore>,
        upload_slots: u32,
        registered: bool,
        cancel: CancellationToken,
    ) {
        let mut registered = registered;
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = every.tick() => {}
            }
            if !registered {
                match self.register(&store).await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        tracing::debug!(error = %e, "supernode registration failed; will retry")
                    }
                }
                continue;
            }
            let in_flight = upload_slots.saturating_sub(uploads.available_permits() as u32);
            let hb = ControlRequest::Heartbeat {
                host: self.info.host.clone(),
                session: self.info.session,
                uploads_in_flight: in_flight,
            };
            match self.call(&hb).await {
                Ok(_) => {}
                Err(e) if e.is_unknown_host() => {
                    tracing::info!(
                        "supernode does not know this host (it restarted?); registering again"
                    );
                    registered = false;
                    every.reset_immediately();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "supernode heartbeat failed");
                    // Re-register once it answers again: it may have restarted meanwhile.
                    registered = false;
                }
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            self.call(&ControlRequest::Leave {
                host: self.info.host.clone(),
                task: None,
            }),
        )
        .await;
    }
}

/// A fresh random session id for this process.
pub fn new_session() -> SessionId {
    SessionId(rand::random())
}
