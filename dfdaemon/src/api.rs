//! The local API on a Unix socket, for `dfget` (and anything else on the host).
//!
//! `POST /v1/download` streams the content in order as verified pieces land; the status
//! line is only sent once the layout is known and the first piece is verified, so origin
//! errors arrive as an HTTP status with an [`ApiError`] body. When a whole-content digest
//! is expected, the last piece is held back until the whole content has been checked:
//! a reader never receives a complete body that fails its digest.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use proto::api::{ApiError, DownloadRequest, ErrorKind, TASK_ID_HEADER};
use proto::{PieceIndex, TaskId};

use crate::download::{Engine, api_error};
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Pieces read and verified ahead of the one being sent to the client; overlaps disk,
/// hashing and socket writes at the cost of this many pieces of memory per reader.
const READ_AHEAD: usize = 3;
/// A reader retries a piece this often when it is found corrupt and refetched.
const READ_ATTEMPTS: usize = 3;

pub struct ApiState {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/download", post(download))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .with_state(state)
}

pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::OriginStatus | ErrorKind::OriginUnreachable | ErrorKind::DigestMismatch => {
            StatusCode::BAD_GATEWAY
        }
        ErrorKind::Stalled => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Storage => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(e: ApiError) -> Response {
    (status_for(e.kind), Json(e)).into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn list_tasks(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    Json(s.engine.statuses())
}

async fn get_task(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<TaskId>() else {
        return error_response(api_error(
            ErrorKind::BadRequest,
            "task id must be 64 hex characters",
        ));
    };
    match s.engine.status(&id) {
        Some(st) => Json(st).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(api_error(
                ErrorKind::BadRequest,
                format!("unknown task {id}"),
            )),
        )
            .into_response(),
    }
}

async fn download(State(s): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let req: DownloadRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(api_error(
                ErrorKind::BadRequest,
                format!("bad download request: {e}"),
            ));
        }
    };
    let h = match s.engine.start(req.clone()) {
        Ok(h) => h,
        Err(e) => return error_response(e),
    };
    let layout = match h.wait_started().await {
        Ok(l) => l,
        Err(e) => return error_response(e),
    };
    let stream = content_stream(
        s.engine.clone(),
        req,
        layout,
        0..layout.content_length,
        None,
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, layout.content_length)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(TASK_ID_HEADER, h.id.to_string())
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error_response(api_error(ErrorKind::Internal, e.to_string())))
}

/// The verified bytes `range` of a download, in order, as pieces land. With `stall`, a
/// piece that does not arrive in that long ends the stream with an error (so a client
/// that can fall back, like containerd, does instead of waiting).
pub fn content_stream(
    engine: Arc<Engine>,
    req: DownloadRequest,
    layout: proto::PieceLayout,
    range: std::ops::Range<u64>,
    stall: Option<std::time::Duration>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let count = layout.piece_count();
    let hold_last = req.digest.is_some();
    let piece_size = u64::from(layout.piece_size);
    let (first, last) = if range.is_empty() {
        (1, 0)
    } else {
        (
            (range.start / piece_size) as u32,
            ((range.end - 1) / piece_size) as u32,
        )
    };
    futures_util::stream::iter(first..=last)
        .map(move |i| {
            let engine = engine.clone();
            let req = req.clone();
            let range = range.clone();
            async move {
                let read = read_in_order(engine, req, PieceIndex(i), hold_last && i + 1 == count);
                let data = match stall {
                    Some(t) => tokio::time::timeout(t, read)
                        .await
                        .map_err(|_| io_err(format!("piece {i} made no progress in {t:?}")))??,
                    None => read.await?,
                };
                // Trim the first and last piece to the requested range.
                let start = u64::from(i) * piece_size;
                let from = range.start.saturating_sub(start) as usize;
                let to = ((range.end - start) as usize).min(data.len());
                Ok(data.slice(from..to))
            }
        })
        .buffered(READ_AHEAD)
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

async fn read_in_order(
    engine: Arc<Engine>,
    req: DownloadRequest,
    piece: PieceIndex,
    verified: bool,
) -> Result<bytes::Bytes, std::io::Error> {
    for _ in 0..READ_ATTEMPTS {
        // Joins the running download, or restarts it when a piece went missing.
        let h = engine.start(req.clone()).map_err(|e| io_err(e.message))?;
        h.wait_piece(piece, verified)
            .await
            .map_err(|e| io_err(e.message))?;
        match engine.read_piece(&h, piece).await {
            Ok(b) => return Ok(b),
            Err(StoreError::Corrupt { .. } | StoreError::Missing { .. }) => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    Err(io_err(format!("piece {piece} kept failing verification")))
}
