//! Control plane: what a daemon says to the supernode and what it answers.
//!
//! Every exchange is one request frame and one response frame on its own QUIC
//! bidirectional stream, so a slow answer never blocks another and there is no request-id
//! bookkeeping.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::codec::{Frame, ValidationError};
use crate::ids::{HostId, PieceIndex, SessionId, Sha256Digest, TaskId};
use crate::layout::{MAX_PIECES, PieceLayout, PieceSet};

/// Most labels a host may carry, and their key/value length; bounds supernode memory per host.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_LEN: usize = 128;
/// Longest URL accepted; longer ones are refused rather than stored.
pub const MAX_URL_LEN: usize = 8 << 10;
/// Most parents listed for one piece; the downloader needs a few to fall back on, not all.
pub const MAX_PARENTS_PER_PIECE: usize = 8;
/// Most assignments in one schedule reply.
pub const MAX_ASSIGNMENTS: u32 = 1024;
/// Control frames carry at most this many bytes (a full digest list of the largest task).
pub const MAX_CONTROL_FRAME: usize = 48 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host: HostId,
    pub session: SessionId,
    /// Where other daemons reach this host's QUIC piece server.
    pub peer_addr: SocketAddr,
    /// Topology and free-form labels (`idc`, `zone`, `rack`, ...).
    pub labels: Vec<(String, String)>,
    /// Concurrent piece uploads this host serves; the scheduler spreads load by it.
    pub upload_slots: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRecord {
    pub piece: PieceIndex,
    pub digest: Sha256Digest,
}

/// Where an announced piece came from; decides whether its digest may become the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnnounceSource {
    /// Fetched from the origin under this host's lease: its digest becomes the record.
    Origin,
    /// Fetched from a parent and verified against the record.
    Peer,
    /// Held in the local store across a restart (of the daemon or of the supernode):
    /// accepted where it matches the record, recorded where the supernode has none.
    Restored,
}

/// Why a piece could not be obtained; `Corrupt` makes the supernode distrust the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceFailure {
    /// The parent's bytes did not match the recorded digest.
    Corrupt,
    /// The parent did not answer, refused, or the connection broke.
    Unreachable,
    /// The parent says it does not hold the piece.
    NotFound,
    /// The origin fetch under a lease failed.
    Origin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    RegisterHost(HostInfo),
    Heartbeat {
        host: HostId,
        session: SessionId,
        uploads_in_flight: u32,
    },
    /// "I want this task." Answers what is known of it.
    RegisterPeer {
        host: HostId,
        task: TaskId,
        url: String,
        content_digest: Option<Sha256Digest>,
    },
    /// Answer to a probe lease: what the origin said about the content.
    ReportLayout {
        host: HostId,
        task: TaskId,
        content_length: u64,
        supports_range: bool,
    },
    AnnouncePieces {
        host: HostId,
        task: TaskId,
        source: AnnounceSource,
        pieces: Vec<PieceRecord>,
    },
    /// "Tell me where to get pieces I lack." `have` is the daemon's full bitmap of stored
    /// pieces; `busy` the pieces it is fetching now, not to be assigned again.
    Schedule {
        host: HostId,
        task: TaskId,
        have: PieceSet,
        busy: PieceSet,
        max_assignments: u32,
    },
    PieceFailed {
        host: HostId,
        task: TaskId,
        piece: PieceIndex,
        parent: Option<HostId>,
        reason: PieceFailure,
    },
    /// The host drops the task (or, with `None`, leaves the cluster).
    Leave {
        host: HostId,
        task: Option<TaskId>,
    },
    /// The recorded digests of these pieces (those that have one), answered with
    /// [`ControlResponse::Records`].
    PieceRecords {
        host: HostId,
        task: TaskId,
        pieces: Vec<PieceIndex>,
    },
    /// "What should I pre-warm?", with how far the host got on what it was given.
    /// Answered with [`ControlResponse::Prewarm`].
    PrewarmPoll {
        host: HostId,
        progress: Vec<crate::prewarm::WorkProgress>,
    },
    /// "My origin fetches of these pieces are still receiving bytes": extends this
    /// host's origin leases on them, so a slow but live fetch is not handed to another
    /// host (which would make the origin send the piece twice).
    RenewOriginLeases {
        host: HostId,
        task: TaskId,
        pieces: Vec<PieceIndex>,
    },
}

/// What the supernode knows of a task, handed to a peer that registers for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub layout: Option<PieceLayout>,
    pub supports_range: bool,
    pub content_digest: Option<Sha256Digest>,
    /// Every piece digest recorded so far.
    pub digests: Vec<PieceRecord>,
    /// This peer holds the probe lease: it must ask the origin for the content length and
    /// answer with `ReportLayout`. Others wait for the layout meanwhile.
    pub probe: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub host: HostId,
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceSource {
    /// Fetch from one of these (best first); check the bytes against `digest`.
    Parents {
        digest: Sha256Digest,
        parents: Vec<ParentRef>,
    },
    /// This host holds the origin lease for the piece: fetch it by Range.
    Origin,
    /// The origin can't do Range: this host fetches the whole content once, in order.
    OriginWhole,
    /// Nobody holds the piece yet, but `parent` is fetching it from the origin now: take
    /// its bytes as they land instead of waiting for it to finish, so relaying starts
    /// with the origin's first byte. No digest is recorded yet; the bytes count only once
    /// they match the record the parent makes when it is done (ask with
    /// [`ControlRequest::PieceRecords`]).
    Landing { parent: ParentRef },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub piece: PieceIndex,
    pub source: PieceSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleReply {
    pub layout: Option<PieceLayout>,
    pub supports_range: bool,
    /// Set when this host now holds the probe lease (the previous holder went away).
    pub probe: bool,
    pub assignments: Vec<Assignment>,
    /// Ask again after this long if nothing was assigned (pieces are being fetched by
    /// others and will be announced soon).
    pub retry_after_ms: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlErrorCode {
    BadRequest,
    UnknownHost,
    UnknownTask,
    LayoutConflict,
    DigestConflict,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Ack,
    Task(TaskView),
    Schedule(ScheduleReply),
    /// Pre-warm work for the polling host: everything it should hold now (work it
    /// already has is listed again; work no longer listed is cancelled).
    Prewarm(Vec<crate::prewarm::PrewarmWork>),
    /// Recorded digests, for [`ControlRequest::PieceRecords`].
    Records(Vec<PieceRecord>),
    Error {
        code: ControlErrorCode,
        message: String,
    },
}

/// Pre-warm blobs one host works on at once (a few jobs of a few tens of layers).
pub const MAX_PREWARM_WORK: usize = 1024;

fn check(cond: bool, what: &'static str) -> Result<(), ValidationError> {
    if cond {
        Ok(())
    } else {
        Err(ValidationError(what))
    }
}

impl Frame for ControlRequest {
    const MAX_LEN: usize = MAX_CONTROL_FRAME;

    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            ControlRequest::RegisterHost(h) => {
                check(h.labels.len() <= MAX_LABELS, "too many labels")?;
                check(
                    h.labels.iter().all(|(k, v)| {
                        !k.is_empty() && k.len() <= MAX_LABEL_LEN && v.len() <= MAX_LABEL_LEN
                    }),
                    "label key or value length",
                )
            }
            ControlRequest::RegisterPeer { url, .. } => {
                check(!url.is_empty() && url.len() <= MAX_URL_LEN, "url length")
            }
            ControlRequest::AnnouncePieces { pieces, .. } => check(
                pieces.len() <= MAX_PIECES as usize
                    && pieces.iter().all(|p| p.piece.0 < MAX_PIECES),
                "piece list",
            ),
            ControlRequest::Schedule {
                have,
                busy,
                max_assignments,
                ..
            } => {
                check(
                    have.is_well_formed() && busy.is_well_formed() && have.len() == busy.len(),
                    "malformed piece bitmap",
                )?;
                check(*max_assignments <= MAX_ASSIGNMENTS, "max_assignments")
            }
            ControlRequest::PrewarmPoll { progress, .. } => {
                check(progress.len() <= MAX_PREWARM_WORK, "prewarm progress count")
            }
            ControlRequest::PieceRecords { pieces, .. }
            | ControlRequest::RenewOriginLeases { pieces, .. } => {
                check(pieces.len() <= MAX_ASSIGNMENTS as usize, "piece list")
            }
            ControlRequest::ReportLayout { .. }
            | ControlRequest::Heartbeat { .. }
            | ControlRequest::PieceFailed { .. }
            | ControlRequest::Leave { .. } => Ok(()),
        }
    }
}

impl Frame for ControlResponse {
    const MAX_LEN: usize = MAX_CONTROL_FRAME;

    fn validate(&self) -> Result<(), ValidationError> {
        let layout_ok = |l: &Option<PieceLayout>| l.as_ref().is_none_or(|l| l.validate().is_ok());
        match self {
            ControlResponse::Task(v) => check(layout_ok(&v.layout), "layout"),
            ControlResponse::Schedule(s) => {
                check(layout_ok(&s.layout), "layout")?;
                check(
                    s.assignments.len() <= MAX_ASSIGNMENTS as usize,
                    "assignment count",
                )?;
                check(
                    s.assignments.iter().all(|a| match &a.source {
                        PieceSource::Parents { parents, .. } => {
                            !parents.is_empty() && parents.len() <= MAX_PARENTS_PER_PIECE
                        }
                        _ => true,
                    }),
                    "parent list",
                )
            }
            ControlResponse::Prewarm(w) => check(
                w.len() <= MAX_PREWARM_WORK && w.iter().all(|w| w.url.len() <= MAX_URL_LEN),
                "prewarm work",
            ),
            ControlResponse::Records(r) => {
                check(r.len() <= MAX_ASSIGNMENTS as usize, "record count")
            }
            ControlResponse::Ack | ControlResponse::Error { .. } => Ok(()),
        }
    }
}
