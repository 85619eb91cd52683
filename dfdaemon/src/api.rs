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
use proto::api::{
    ApiError, CONTENT_LENGTH_HEADER, DownloadRequest, ErrorKind, FileProgress, TASK_ID_HEADER,
    TaskState,
};
use proto::{PieceIndex, TaskId};

use crate::download::{Engine, Progress, TaskHandle, api_error};
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Pieces read and verified ahead of the one being sent to the client; overlaps disk,
/// hashing and socket writes at the cost of this many pieces of memory per reader.
const READ_AHEAD: usize = 3;
/// How long a handed-out data file is held from eviction for the caller to link it.
const LINK_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
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
        .route("/v1/download/file", post(download_file))
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

/// Parses a download request, starts (or joins) it and waits for its layout; failures
/// up to there are an error status.
async fn begin(
    s: &ApiState,
    body: &[u8],
) -> Result<(DownloadRequest, Arc<TaskHandle>, proto::PieceLayout), Response> {
    let req: DownloadRequest = serde_json::from_slice(body).map_err(|e| {
        error_response(api_error(
            ErrorKind::BadRequest,
            format!("bad download request: {e}"),
        ))
    })?;
    let h = s.engine.start(req.clone()).map_err(error_response)?;
    let layout = h.wait_started().await.map_err(error_response)?;
    Ok((req, h, layout))
}

async fn download(State(s): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let (req, h, layout) = match begin(&s, &body).await {
        Ok(v) => v,
        Err(r) => return r,
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
    let (first, last) = match (
        layout.piece_at(range.start),
        range.end.checked_sub(1).and_then(|e| layout.piece_at(e)),
    ) {
        (Some(f), Some(l)) if !range.is_empty() => (f.0, l.0),
        _ => (1, 0),
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
                let start = layout.piece_range(PieceIndex(i)).map_or(0, |(s, _)| s);
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

/// `POST /v1/download/file`: progress lines, then the verified data file's path for the
/// caller to link or copy (see [`proto::api::FileProgress`]).
async fn download_file(State(s): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let (req, h, layout) = match begin(&s, &body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let id = h.id.to_string();
    let stream = file_progress(s.engine.clone(), req, h);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(CONTENT_LENGTH_HEADER, layout.content_length)
        .header(TASK_ID_HEADER, id)
        .body(Body::from_stream(futures_util::stream::unfold(
            Some(stream),
            |st| async move {
                let mut st = st?;
                if st.lease.is_some() {
                    // Done was sent: keep the file from eviction while the caller links
                    // it; the caller hanging up drops this stream and the lease.
                    tokio::time::sleep(LINK_GRACE).await;
                    return None;
                }
                let (line, last) = st.next_line().await;
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(bytes)),
                    (!last || st.lease.is_some()).then_some(st),
                ))
            },
        )))
        .unwrap_or_else(|e| error_response(api_error(ErrorKind::Internal, e.to_string())))
}

/// State of one `download/file` answer.
struct FileStream {
    engine: Arc<Engine>,
    req: DownloadRequest,
    h: Arc<TaskHandle>,
    rx: tokio::sync::watch::Receiver<Progress>,
    sent: u64,
    restarts: usize,
    /// Taken when the file is handed out.
    lease: Option<crate::store::TaskLease>,
}

fn file_progress(engine: Arc<Engine>, req: DownloadRequest, h: Arc<TaskHandle>) -> FileStream {
    let rx = h.subscribe();
    FileStream {
        engine,
        req,
        h,
        rx,
        sent: 0,
        restarts: 0,
        lease: None,
    }
}

impl FileStream {
    /// The next line to send, and whether it is the last.
    async fn next_line(&mut self) -> (FileProgress, bool) {
        loop {
            let (state, error, ready, layout) = {
                let p = self.rx.borrow_and_update();
                let ready = p.layout.map_or(0, |l| l.bytes_in(&p.stored));
                (p.state, p.error.clone(), ready, p.layout)
            };
            match state {
                TaskState::Failed => {
                    let e =
                        error.unwrap_or_else(|| api_error(ErrorKind::Internal, "download failed"));
                    return (FileProgress::Failed(e), true);
                }
                TaskState::Done => {
                    let Some(layout) = layout else {
                        return (
                            FileProgress::Failed(api_error(ErrorKind::Internal, "no layout")),
                            true,
                        );
                    };
                    let store = &self.engine.store;
                    let lease = match store.open_task(self.h.id, &self.req.url, self.req.digest) {
                        Ok(l) => l,
                        Err(e) => {
                            let e = api_error(ErrorKind::Storage, e.to_string());
                            return (FileProgress::Failed(e), true);
                        }
                    };
                    // Evicted (or dropped) since it was done: fetch it again.
                    if !store.meta(&self.h.id).is_some_and(|m| m.complete) {
                        drop(lease);
                        if let Err(e) = self.restart() {
                            return (FileProgress::Failed(e), true);
                        }
                        continue;
                    }
                    // Pieces that were on disk before this download were never checked in
                    // memory, and a file handed out before may have been written through
                    // its other name: the caller gets the file without a read through us,
                    // so check it on disk now (a bad piece is dropped and refetched).
                    let must_check = self.h.pieces_at_start() > 0;
                    let (store, id) = (self.engine.store.clone(), self.h.id);
                    let ready =
                        tokio::task::spawn_blocking(move || store.prepare_handout(&id, must_check))
                            .await;
                    match ready {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => {
                            drop(lease);
                            if let Err(e) = self.restart() {
                                return (FileProgress::Failed(e), true);
                            }
                            continue;
                        }
                        Ok(Err(e)) => {
                            let e = api_error(ErrorKind::Storage, e.to_string());
                            return (FileProgress::Failed(e), true);
                        }
                        Err(e) => {
                            let e = api_error(ErrorKind::Internal, e.to_string());
                            return (FileProgress::Failed(e), true);
                        }
                    }
                    let done = FileProgress::Done {
                        path: self.engine.store.data_file(&self.h.id),
                        length: layout.content_length,
                    };
                    self.lease = Some(lease);
                    return (done, true);
                }
                TaskState::Running => {
                    if ready > self.sent {
                        self.sent = ready;
                        return (FileProgress::Ready { bytes: ready }, false);
                    }
                    if self.rx.changed().await.is_err() {
                        let e = api_error(ErrorKind::Internal, "download driver went away");
                        return (FileProgress::Failed(e), true);
                    }
                }
            }
        }
    }

    fn restart(&mut self) -> Result<(), ApiError> {
        self.restarts += 1;
        if self.restarts > READ_ATTEMPTS {
            return Err(api_error(
                ErrorKind::Storage,
                "stored content kept failing verification",
            ));
        }
        self.h = self.engine.start(self.req.clone())?;
        self.rx = self.h.subscribe();
        Ok(())
    }
}
