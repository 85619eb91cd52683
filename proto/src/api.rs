//! JSON shapes of the daemon's local API (a Unix socket) that `dfget` speaks.
//!
//! `POST /v1/download` with a [`DownloadRequest`] answers `200` with the content streamed
//! in order, or an error status with an [`ApiError`] body. Headers are only sent once the
//! task's layout is known and the first piece is verified, so most failures (origin 404,
//! unreachable origin) arrive as a status, not as a broken stream. If a stream breaks,
//! `GET /v1/tasks/{id}` (id from the [`TASK_ID_HEADER`]) says why.
//!
//! `POST /v1/download/file` takes the same request for a caller that wants the content in
//! a file on this host: the answer is JSON lines of [`FileProgress`], ending with the path
//! of the verified data file in the daemon's store. The caller hard-links it into place
//! (or copies it in the kernel), so the bytes are written to disk once, not streamed
//! through a socket and written again.

use serde::{Deserialize, Serialize};

use crate::ids::{Sha256Digest, TaskId};

/// Response header carrying the task id of a download.
pub const TASK_ID_HEADER: &str = "x-dfp2p-task-id";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    pub url: String,
    /// Headers forwarded to the origin (e.g. `Authorization`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Expected sha256 of the whole content; checked before the download counts as done.
    #[serde(default)]
    pub digest: Option<Sha256Digest>,
    /// The content is identified by `digest` alone (an OCI blob): the same bytes fetched
    /// through any registry, mirror or redirect are one task.
    #[serde(default)]
    pub content_addressed: bool,
}

/// Response header of `POST /v1/download/file`: the content length, known before the
/// first progress line.
pub const CONTENT_LENGTH_HEADER: &str = "x-dfp2p-content-length";

/// One line of the `POST /v1/download/file` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileProgress {
    /// Bytes of the content stored and verified piece by piece so far.
    Ready { bytes: u64 },
    /// The whole content is stored at `path` and verified (against the request's digest,
    /// when it had one). The last line of a successful answer.
    Done {
        path: std::path::PathBuf,
        length: u64,
    },
    /// The download failed; the last line of a failed answer.
    Failed(ApiError),
}

/// What went wrong, in terms a user can act on. `dfget` prints `message` and picks its
/// exit code from `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    /// The origin answered with an error status (in `origin_status`).
    OriginStatus,
    OriginUnreachable,
    DigestMismatch,
    /// No progress for too long (no origin, no peer delivered).
    Stalled,
    /// The local store failed (disk full, I/O error).
    Storage,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_status: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    Done,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: TaskId,
    pub url: String,
    pub state: TaskState,
    pub content_length: Option<u64>,
    pub piece_size: Option<u32>,
    pub pieces_total: u32,
    pub pieces_stored: u32,
    /// Bytes in the stored pieces (pieces differ in size, so not a product of the above).
    /// Defaulted so a client still reads a daemon from before it.
    #[serde(default)]
    pub bytes_stored: u64,
    /// Pieces already in the local store when this download started (a restart resumes
    /// from these).
    pub pieces_at_start: u32,
    /// Pieces this daemon fetched since it started, by source.
    pub pieces_from_origin: u64,
    pub pieces_from_peers: u64,
    pub error: Option<ApiError>,
}
