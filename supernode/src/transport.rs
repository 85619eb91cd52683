//! QUIC plumbing shared by the supernode's control server and the daemon's piece server:
//! frame I/O on streams and one bounded accept loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::{DecodeError, EncodeError, Frame};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Error)]
pub enum FrameIoError {
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Reads one frame; the length cap is checked before the body buffer is allocated.
pub async fn read_frame<F: Frame>(recv: &mut quinn::RecvStream) -> Result<F, FrameIoError> {
    let mut header = [0u8; proto::codec::HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let len = F::body_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(F::decode_body(&body)?)
}

pub async fn write_frame<F: Frame>(
    send: &mut quinn::SendStream,
    msg: &F,
) -> Result<(), FrameIoError> {
    send.write_all(&msg.to_bytes()?).await?;
    Ok(())
}

/// A peer that can't finish a TLS handshake in this long is dropped, freeing its slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `cancel` fires, at most `max_connections` at once (further
/// handshakes wait for a slot), and runs `handler` for each on `tracker`.
pub async fn accept_loop<H, Fut>(
    endpoint: quinn::Endpoint,
    max_connections: usize,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    H: Fn(quinn::Connection) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let handler = handler.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "refused incoming connection");
                    return;
                }
            };
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("handshake timed out");
                    return;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => conn.close(0u32.into(), b"shutdown"),
                _ = handler(conn.clone()) => {}
            }
        });
    }
}
