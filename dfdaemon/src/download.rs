//! The task engine: one pipeline for every download (plain URLs today; OCI blobs and
//! pre-warm layers use the same engine with another task id and expected digest).
//!
//! One driver task per running download:
//! 1. open the task in the store (a complete, verified task is served from there);
//! 2. register with the supernode; learn the layout and the recorded piece digests (or
//!    probe the origin, when the supernode hands this peer the probe lease);
//! 3. loop: ask the supernode for assignments, run up to `concurrent_pieces` fetch jobs
//!    (parents over QUIC, the origin by Range under a lease, or another host's origin
//!    fetch while it lands, see [`crate::landing`]), each of which verifies and stores
//!    its piece; announce pieces as they land so others can fetch them at once;
//! 4. check the whole-content digest when one is expected.
//!
//! If the supernode stops answering, the driver carries on by itself: digests and parents
//! it already learned, then the origin. Readers follow progress through a `watch`
//! channel and read verified pieces from the store in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use proto::api::{ApiError, DownloadRequest, ErrorKind, TaskState, TaskStatus};
use proto::control::{
    AnnounceSource, ControlErrorCode, ControlRequest, ControlResponse, ParentRef, PieceFailure,
    PieceRecord, PieceSource,
};
use proto::layout::LayoutRule;
use proto::{PieceIndex, PieceLayout, PieceSet, Sha256Digest, TaskId};
use reqwest::header::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{ControlClient, ControlError};
use crate::landing::{Landing, Landings};
use crate::metrics::Metrics;
use crate::origin::{BodyStream, Origin, OriginError, header_map};
use crate::peer::{PeerClient, PeerError};
use crate::store::{Store, StoreError};

/// Query parameters that sign or expire a URL without changing what it points at; they
/// are left out of the task id so one file is one task however it was signed.
pub const DEFAULT_FILTERED_QUERY: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "Expires",
    "Signature",
    "AWSAccessKeyId",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "se",
    "sig",
    "sp",
    "sv",
    "st",
    "sr",
];
/// Finished downloads kept for status queries.
const KEEP_FINISHED: usize = 1024;
/// While the supernode is unreachable, try it again this often.
const SUPERNODE_RETRY: Duration = Duration::from_secs(3);
/// How long a supernode that stopped answering mid-download may take to come back
/// before pieces nobody we know holds are fetched from the origin.
const SUPERNODE_GRACE: Duration = Duration::from_secs(3);
/// Pieces nobody we know holds go to the origin only once the supernode has also been
/// silent this long (or never answered). One that still answers some calls is slow,
/// not gone, and its origin leases stand: at 32 hosts on 25 Mbit/s links a daemon whose
/// schedule calls timed out for 3 s fetched some 20 pieces from the origin that other
/// hosts were already fetching under lease. It matches the supernode's default
/// `host_timeout`, after which it forgets a silent host anyway.
const SUPERNODE_SILENCE: Duration = Duration::from_secs(10);
/// Attempts at one piece before the download fails.
const MAX_PIECE_ATTEMPTS: u32 = 12;
/// How long the last fetch jobs get to report after every piece is stored.
const JOB_DRAIN: Duration = Duration::from_secs(5);
/// A piece taken while it landed is checked against its record, asked for up to this
/// many times, this far apart.
const RECORD_ATTEMPTS: u32 = 5;
const RECORD_RETRY: Duration = Duration::from_millis(200);
/// Rounds through a piece's parents while all of them answer `Busy`.
const BUSY_ROUNDS: u32 = 4;
/// Wait before the next round, times the round number.
const BUSY_BACKOFF: Duration = Duration::from_millis(50);
/// Times a relay asks again, [`BUSY_BACKOFF`] times the round apart (1.8 s in all), when
/// the lessee of a landing piece answers busy. The lessee is the piece's only source,
/// and its landing slots free up as the relays of its previous origin piece take their
/// last bytes, usually within a second. Given up at once instead, 28% of the relay
/// copies on 16 hosts missed their landing and were fetched again, at full rate, once
/// the piece was stored: the backlog the last hosts waited on.
const LANDING_BUSY_ROUNDS: u32 = 8;
/// Origin fetches started together with piece 0 wait this long at most for it to land.
const HEAD_START: Duration = Duration::from_secs(2);

/// Origin jobs planned together with piece 0 let it go first: a reader streams the
/// content from piece 0, and ranges sharing one origin link would deliver it only when
/// they all land (measured: a cold mirror blob's first byte came after 4 pieces, not 1).
enum Gate {
    None,
    /// Piece 0's job: the others go when this sender is dropped (the job ended).
    Opens(watch::Sender<()>),
    Waits(watch::Receiver<()>),
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Pieces fetched at once per download; bounds memory at this many pieces in flight.
    /// With the supernode's default 16 origin fetches and 15 landing relays a host wants
    /// room for one landing fetch from each of 15 lessees, its own origin fetch, and
    /// relays of what they missed (16 hosts: 16 -> 23.7 / 23.9 s, 24 -> 23.4 / 23.4 s,
    /// 32 or 48 no better).
    pub concurrent_pieces: usize,
    /// A download with no verified piece for this long fails instead of hanging.
    pub stall_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            concurrent_pieces: 24,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub layout: Option<PieceLayout>,
    pub stored: PieceSet,
    pub state: TaskState,
    pub error: Option<ApiError>,
}

pub struct TaskHandle {
    pub id: TaskId,
    pub request: DownloadRequest,
    progress: watch::Sender<Progress>,
    from_origin: AtomicU64,
    from_peers: AtomicU64,
    at_start: u32,
}

impl TaskHandle {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Pieces that were already on disk when this download started: written by an
    /// earlier run or download, so not verified in memory by this one.
    pub fn pieces_at_start(&self) -> u32 {
        self.at_start
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    pub fn status(&self) -> TaskStatus {
        let p = self.progress();
        TaskStatus {
            task: self.id,
            url: self.request.url.clone(),
            state: p.state,
            content_length: p.layout.map(|l| l.content_length),
            piece_size: p.layout.map(|l| l.piece_size),
            pieces_total: p.layout.map_or(0, |l| l.piece_count()),
            pieces_stored: p.stored.count(),
            bytes_stored: p.layout.map_or(0, |l| l.bytes_in(&p.stored)),
            pieces_at_start: self.at_start,
            pieces_from_origin: self.from_origin.load(Ordering::Relaxed),
            pieces_from_peers: self.from_peers.load(Ordering::Relaxed),
            error: p.error,
        }
    }

    fn set_stored(&self, piece: PieceIndex, stored: bool) {
        self.progress.send_modify(|p| {
            if stored {
                p.stored.insert(piece);
            } else {
                p.stored.remove(piece);
            }
        });
    }

    /// Waits until `ready` yields a value for the task's progress, or the task fails.
    async fn wait_for<T>(
        &self,
        mut ready: impl FnMut(&Progress) -> Option<T>,
    ) -> Result<T, ApiError> {
        let mut rx = self.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.state == TaskState::Failed {
                    return Err(p
                        .error
                        .clone()
                        .unwrap_or_else(|| api_error(ErrorKind::Internal, "download failed")));
                }
                if let Some(v) = ready(&p) {
                    return Ok(v);
                }
            }
            if rx.changed().await.is_err() {
                return Err(api_error(ErrorKind::Internal, "download driver went away"));
            }
        }
    }

    /// Waits until `piece` is stored (or, with `verified`, the whole task is done).
    pub async fn wait_piece(&self, piece: PieceIndex, verified: bool) -> Result<(), ApiError> {
        self.wait_for(|p| {
            (p.stored.contains(piece) && (!verified || p.state == TaskState::Done)).then_some(())
        })
        .await
    }

    /// Waits until the layout is known (and the first piece stored), or failure.
    pub async fn wait_started(&self) -> Result<PieceLayout, ApiError> {
        self.wait_for(|p| {
            p.layout.filter(|l| {
                l.piece_count() == 0
                    || p.stored.contains(PieceIndex(0))
                    || p.state == TaskState::Done
            })
        })
        .await
    }
}

pub fn api_error(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError {
        kind,
        message: message.into(),
        origin_status: None,
    }
}

/// The error for a supernode whose layout of the task differs from this download's.
fn layout_mismatch(supernode: &PieceLayout, ours: &PieceLayout) -> ApiError {
    if supernode.content_length != ours.content_length {
        api_error(
            ErrorKind::OriginUnreachable,
            format!(
                "content length changed at the origin during the download ({} bytes, the supernode has {})",
                ours.content_length, supernode.content_length
            ),
        )
    } else {
        // This daemon cut the content itself (it probed while the supernode was away),
        // with the built-in piece sizes, and the supernode's settings differ.
        api_error(
            ErrorKind::Internal,
            format!(
                "the supernode cuts this content into other pieces ({supernode:?}) than this daemon did ({ours:?}); its [scheduler] piece-size settings differ from the defaults; retry"
            ),
        )
    }
}

fn origin_api_error(e: &OriginError) -> ApiError {
    match e {
        OriginError::Status { status, .. } => ApiError {
            kind: ErrorKind::OriginStatus,
            message: e.to_string(),
            origin_status: Some(*status),
        },
        OriginError::Unreachable(_) => api_error(ErrorKind::OriginUnreachable, e.to_string()),
        OriginError::Protocol(_) => api_error(ErrorKind::OriginUnreachable, e.to_string()),
        OriginError::BadHeader(_) => api_error(ErrorKind::BadRequest, e.to_string()),
    }
}

fn store_api_error(e: &StoreError) -> ApiError {
    api_error(ErrorKind::Storage, e.to_string())
}

pub struct Engine {
    pub store: Arc<Store>,
    landings: Arc<Landings>,
    pub control: Arc<ControlClient>,
    peers: Arc<PeerClient>,
    origin: Origin,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<TaskId, Arc<TaskHandle>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

enum Event {
    Stored {
        piece: PieceIndex,
        digest: Sha256Digest,
        source: AnnounceSource,
        bytes: u64,
    },
    /// `busy`: every parent was out of upload slots; not a strike against the piece.
    Failed {
        piece: PieceIndex,
        fatal: Option<ApiError>,
        busy: bool,
    },
}

/// Where a fetch job gets its piece(s).
enum Job {
    Parents {
        piece: PieceIndex,
        digest: Sha256Digest,
        parents: Vec<ParentRef>,
    },
    Origin {
        piece: PieceIndex,
        expected: Option<Sha256Digest>,
        gate: Gate,
        /// Where its bytes go as they land, for the peers sent to take them early.
        landing: Option<Arc<Landing>>,
    },
    /// Bytes of a piece another host is fetching from the origin, as they land.
    Landing {
        piece: PieceIndex,
        parent: ParentRef,
    },
    /// The whole content; with the probe's body when that request already carries it.
    OriginWhole(Option<BodyStream>),
}

/// What an [`Engine`] is built from.
pub struct EngineParts {
    pub store: Arc<Store>,
    pub landings: Arc<Landings>,
    pub control: Arc<ControlClient>,
    pub peers: Arc<PeerClient>,
    pub origin: Origin,
    pub cfg: EngineConfig,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Arc<Self> {
        let EngineParts {
            store,
            landings,
            control,
            peers,
            origin,
            cfg,
            metrics,
            tracker,
            cancel,
        } = parts;
        Arc::new(Self {
            store,
            landings,
            control,
            peers,
            origin,
            cfg,
            metrics,
            running: Mutex::new(HashMap::new()),
            tracker,
            cancel,
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<TaskHandle>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn task_id(req: &DownloadRequest) -> TaskId {
        match (&req.digest, req.content_addressed) {
            (Some(d), true) => TaskId::for_content(d),
            _ => TaskId::for_url(&req.url, DEFAULT_FILTERED_QUERY, req.digest.as_ref()),
        }
    }

    /// A client read `id`: pre-warmed content has done its job and may be evicted again.
    pub fn unpin(&self, id: &TaskId) {
        self.store.unpin(id);
    }

    /// Is the whole content of `id` verified in the local store?
    pub fn is_cached(&self, id: &TaskId) -> bool {
        self.store.meta(id).is_some_and(|m| m.complete)
    }

    pub fn status(&self, id: &TaskId) -> Option<TaskStatus> {
        self.running().get(id).map(|h| h.status())
    }

    pub fn statuses(&self) -> Vec<TaskStatus> {
        let mut v: Vec<TaskStatus> = self.running().values().map(|h| h.status()).collect();
        v.sort_by_key(|a| a.task);
        v
    }

    /// Starts (or joins) the download for `req`.
    pub fn start(self: &Arc<Self>, req: DownloadRequest) -> Result<Arc<TaskHandle>, ApiError> {
        let parsed = url::Url::parse(&req.url).map_err(|e| {
            api_error(
                ErrorKind::BadRequest,
                format!("invalid URL {:?}: {e}", req.url),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(api_error(
                ErrorKind::BadRequest,
                format!("unsupported URL scheme {:?}", parsed.scheme()),
            ));
        }
        if req.url.len() > proto::control::MAX_URL_LEN {
            return Err(api_error(ErrorKind::BadRequest, "URL too long"));
        }
        let headers = header_map(&req.headers).map_err(|e| origin_api_error(&e))?;
        let id = Self::task_id(&req);
        let mut running = self.running();
        if let Some(h) = running.get(&id) {
            let p = h.progress.borrow();
            let intact =
                p.state != TaskState::Done || self.store.meta(&id).is_some_and(|m| m.complete);
            if p.state != TaskState::Failed && intact {
                drop(p);
                return Ok(h.clone());
            }
        }
        if running.len() >= KEEP_FINISHED {
            running.retain(|_, h| h.progress.borrow().state == TaskState::Running);
        }
        let stored = self.store.stored(&id);
        let layout = self.store.meta(&id).and_then(|m| m.layout);
        let stored = stored.unwrap_or_default();
        let at_start = stored.count();
        let (tx, _) = watch::channel(Progress {
            layout,
            stored,
            state: TaskState::Running,
            error: None,
        });
        let handle = Arc::new(TaskHandle {
            id,
            request: req,
            progress: tx,
            from_origin: AtomicU64::new(0),
            from_peers: AtomicU64::new(0),
            at_start,
        });
        running.insert(id, handle.clone());
        drop(running);
        let engine = self.clone();
        let h = handle.clone();
        self.tracker.spawn(async move {
            let result = engine.drive(&h, headers).await;
            match result {
                Ok(()) => {
                    engine.metrics.downloads.get_or_create(&crate::metrics::ReasonLabels { reason: "ok" }).inc();
                    h.progress.send_modify(|p| p.state = TaskState::Done);
                }
                Err(e) => {
                    tracing::warn!(task = %h.id, url = %h.request.url, error = %e.message, "download failed");
                    engine.metrics.downloads.get_or_create(&crate::metrics::ReasonLabels { reason: "failed" }).inc();
                    h.progress.send_modify(|p| {
                        p.state = TaskState::Failed;
                        p.error = Some(e);
                    });
                }
            }
        });
        Ok(handle)
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| api_error(ErrorKind::Internal, e.to_string()))
    }

    async fn drive(
        self: &Arc<Self>,
        h: &Arc<TaskHandle>,
        headers: HeaderMap,
    ) -> Result<(), ApiError> {
        let id = h.id;
        let url = h.request.url.clone();
        let digest = h.request.digest;
        let _lease = self
            .store
            .open_task(id, &url, digest)
            .map_err(|e| store_api_error(&e))?;
        // Whatever is still landing when this download ends has failed.
        let _landings = self.landings.task(id);
        let meta = self
            .store
            .meta(&id)
            .ok_or_else(|| api_error(ErrorKind::Internal, "task vanished from store"))?;
        if meta.complete
            && let Some(layout) = meta.layout
        {
            self.metrics.got_piece("cache", layout.content_length);
            h.progress.send_modify(|p| {
                p.layout = Some(layout);
                p.stored = PieceSet::full(layout.piece_count());
            });
            return Ok(());
        }
        let host = self.control.host().clone();
        let mut known: HashMap<PieceIndex, Sha256Digest> =
            self.store.digests(&id).into_iter().collect();
        let mut parents: HashMap<PieceIndex, Vec<ParentRef>> = HashMap::new();
        let mut all_parents: Vec<ParentRef> = Vec::new();

        // Register; the view tells the layout, recorded digests and who probes.
        let mut sn_ok = false;
        // A supernode already known to be down at the start means no grace period.
        let was_up = self.control.is_up();
        let mut probe = false;
        let mut sn_layout = None;
        let mut sn_range = false;
        match self
            .control
            .call(&ControlRequest::RegisterPeer {
                host: host.clone(),
                task: id,
                url: url.clone(),
                content_digest: digest,
            })
            .await
        {
            Ok(ControlResponse::Task(v)) => {
                sn_ok = true;
                probe = v.probe;
                sn_layout = v.layout;
                sn_range = v.supports_range;
                for r in v.digests {
                    known.insert(r.piece, r.digest);
                }
            }
            Ok(other) => tracing::warn!(?other, "unexpected register answer"),
            Err(e) => {
                tracing::info!(task = %id, error = %e, "supernode unavailable; fetching without it")
            }
        }

        let t0 = Instant::now();
        tracing::debug!(task = %id, "registered with the supernode");
        // Layout: the supernode's, else ours from the store, else probe.
        let started = Instant::now();
        let mut probe_body: Option<BodyStream> = None;
        let (layout, supports_range) = loop {
            if let Some(l) = sn_layout {
                break (l, sn_range);
            }
            if let Some(l) = meta.layout {
                if sn_ok {
                    // The supernode lost the task; tell it what we know.
                    let _ = self
                        .report_layout(id, l.content_length, meta.supports_range)
                        .await;
                }
                break (l, meta.supports_range);
            }
            if probe || !sn_ok {
                let mut p = self
                    .origin
                    .probe(&url, &headers)
                    .await
                    .map_err(|e| origin_api_error(&e))?;
                probe_body = p.body.take();
                if sn_ok {
                    match self
                        .report_layout(id, p.content_length, p.supports_range)
                        .await
                    {
                        Ok(ControlResponse::Task(v)) if v.layout.is_some() => {
                            sn_layout = v.layout;
                            sn_range = v.supports_range;
                            continue;
                        }
                        Ok(_) | Err(_) => {}
                    }
                }
                let l = PieceLayout::choose(p.content_length, &LayoutRule::default())
                    .map_err(|e| api_error(ErrorKind::OriginUnreachable, e.to_string()))?;
                break (l, p.supports_range);
            }
            // Someone else probes; wait for the layout.
            if started.elapsed() > self.cfg.stall_timeout {
                return Err(api_error(
                    ErrorKind::Stalled,
                    "no content length learned in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self
                .control
                .call(&ControlRequest::Schedule {
                    host: host.clone(),
                    task: id,
                    have: PieceSet::new(0),
                    busy: PieceSet::new(0),
                    max_assignments: 0,
                })
                .await
            {
                Ok(ControlResponse::Schedule(r)) => {
                    sn_layout = r.layout;
                    sn_range = r.supports_range;
                    probe = r.probe;
                }
                Ok(_) => {}
                Err(ControlError::Unreachable(_)) => sn_ok = false,
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for layout");
                    sn_ok = false;
                }
            }
        };
        self.store
            .set_layout(&id, layout, supports_range)
            .map_err(|e| store_api_error(&e))?;
        let stored_now = self.store.stored(&id).unwrap_or_default();
        h.progress.send_modify(|p| {
            p.layout = Some(layout);
            p.stored = stored_now;
        });
        tracing::debug!(task = %id, ms = t0.elapsed().as_secs_f64() * 1e3, "layout known");
        let count = layout.piece_count();
        // The whole-content digest is computed as the pieces land, in order, mostly from
        // memory; at the end only the tail is left to hash, instead of the whole file.
        let mut in_order = digest.is_some().then(|| {
            AbortOnDrop(tokio::spawn(hash_in_order(
                self.store.clone(),
                h.clone(),
                count,
            )))
        });

        // Announcer: batches landed pieces to the supernode off the driver's path.
        let (ann_tx, ann_rx) = mpsc::channel::<(AnnounceSource, PieceRecord)>(count as usize + 1);
        let announcer = {
            let control = self.control.clone();
            let host = host.clone();
            tokio::spawn(announce_loop(
                control,
                self.store.clone(),
                self.landings.clone(),
                host,
                id,
                ann_rx,
            ))
        };
        let mut announcer = AbortOnDrop(announcer);

        let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(64);
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut busy = PieceSet::new(count);
        let mut attempts: HashMap<PieceIndex, u32> = HashMap::new();
        let mut whole_running = false;
        let mut next_poll = Instant::now();
        let mut sn_retry_at = Instant::now();
        // Until this instant a supernode failure is treated as a blip: keep to known
        // parents and retry it, rather than sending everyone to the origin at once.
        let mut origin_fallback_at = if sn_ok || was_up {
            Instant::now() + SUPERNODE_GRACE
        } else {
            Instant::now()
        };
        // Whether the last exchange with the supernode worked (`sn_ok` only says whether
        // to try it next).
        let mut sn_healthy = sn_ok;
        let mut last_progress = Instant::now();
        loop {
            let stored = self.store.stored(&id).unwrap_or_default();
            if stored.is_full() {
                break;
            }
            let slots = self.cfg.concurrent_pieces.saturating_sub(jobs.len());
            let now = Instant::now();
            if slots > 0 && now >= next_poll && !whole_running {
                let mut planned: Vec<Job> = Vec::new();
                if !sn_ok
                    && now >= sn_retry_at
                    && (self.control.is_up() || now < origin_fallback_at)
                {
                    sn_ok = true;
                }
                if sn_ok {
                    let req = ControlRequest::Schedule {
                        host: host.clone(),
                        task: id,
                        have: stored.clone(),
                        busy: busy.clone(),
                        max_assignments: slots as u32,
                    };
                    match self.control.call(&req).await {
                        Ok(ControlResponse::Schedule(r)) => {
                            tracing::trace!(task = %id, assignments = r.assignments.len(), "scheduled");
                            sn_healthy = true;
                            if let Some(l) = r.layout.filter(|l| *l != layout) {
                                return Err(layout_mismatch(&l, &layout));
                            }
                            if r.layout.is_none() {
                                // The supernode has the task but not its layout: it
                                // restarted, or this download began while it did not know
                                // this host and probed alone. Until it hears the layout
                                // it leases nothing, and the download would stall.
                                let _ = self
                                    .report_layout(id, layout.content_length, supports_range)
                                    .await;
                            }
                            for a in r.assignments {
                                match a.source {
                                    PieceSource::Parents {
                                        digest,
                                        parents: ps,
                                    } => {
                                        known.insert(a.piece, digest);
                                        for p in &ps {
                                            if !all_parents.iter().any(|q| q.host == p.host) {
                                                all_parents.push(p.clone());
                                            }
                                        }
                                        parents.insert(a.piece, ps.clone());
                                        planned.push(Job::Parents {
                                            piece: a.piece,
                                            digest,
                                            parents: ps,
                                        });
                                    }
                                    PieceSource::Origin => planned.push(Job::Origin {
                                        piece: a.piece,
                                        expected: known.get(&a.piece).copied(),
                                        gate: Gate::None,
                                        landing: None,
                                    }),
                                    PieceSource::Landing { parent } => planned.push(Job::Landing {
                                        piece: a.piece,
                                        parent,
                                    }),
                                    PieceSource::OriginWhole => {
                                        planned.push(Job::OriginWhole(probe_body.take()))
                                    }
                                }
                            }
                            next_poll = if planned.is_empty() {
                                now + Duration::from_millis(u64::from(r.retry_after_ms.max(20)))
                            } else {
                                now
                            };
                        }
                        Ok(other) => {
                            tracing::warn!(?other, "unexpected schedule answer");
                            next_poll = now + Duration::from_millis(500);
                        }
                        Err(ControlError::Remote {
                            code: ControlErrorCode::UnknownTask | ControlErrorCode::UnknownHost,
                            ..
                        }) => {
                            // It restarted and forgot us; the heartbeat loop re-registers
                            // the host, this registers the task again.
                            let _ = self
                                .control
                                .call(&ControlRequest::RegisterPeer {
                                    host: host.clone(),
                                    task: id,
                                    url: url.clone(),
                                    content_digest: digest,
                                })
                                .await;
                            next_poll = now + Duration::from_millis(200);
                        }
                        Err(e) => {
                            tracing::info!(task = %id, error = %e, "supernode unavailable; continuing with known peers and the origin");
                            if sn_healthy {
                                origin_fallback_at = now + SUPERNODE_GRACE;
                                sn_healthy = false;
                            }
                            sn_ok = false;
                            sn_retry_at = if now < origin_fallback_at {
                                now + Duration::from_millis(500)
                            } else {
                                now + SUPERNODE_RETRY
                            };
                        }
                    }
                }
                if !sn_ok {
                    // ...or this download's own calls have failed that long (a supernode
                    // answering heartbeats but not this task must not hold it up).
                    let origin_allowed = now >= origin_fallback_at
                        && (self
                            .control
                            .silent_for()
                            .is_none_or(|s| s >= SUPERNODE_SILENCE)
                            || now >= origin_fallback_at + (SUPERNODE_SILENCE - SUPERNODE_GRACE));
                    for piece in stored.missing().filter(|p| !busy.contains(*p)).take(slots) {
                        let ps = parents
                            .get(&piece)
                            .cloned()
                            .unwrap_or_else(|| all_parents.clone());
                        match known.get(&piece) {
                            Some(d)
                                if !ps.is_empty()
                                    && attempts.get(&piece).copied().unwrap_or(0) < 2 =>
                            {
                                planned.push(Job::Parents {
                                    piece,
                                    digest: *d,
                                    parents: ps,
                                });
                            }
                            _ if !origin_allowed => {}
                            _ if !supports_range => {
                                planned.push(Job::OriginWhole(probe_body.take()));
                                break;
                            }
                            expected => planned.push(Job::Origin {
                                piece,
                                expected: expected.copied(),
                                gate: Gate::None,
                                landing: None,
                            }),
                        }
                    }
                    next_poll = now + Duration::from_millis(100);
                }
                let first_from_origin = !stored.contains(PieceIndex(0))
                    && planned
                        .iter()
                        .any(|j| matches!(j, Job::Origin { piece, .. } if piece.0 == 0));
                let (gate_tx, gate_rx) = watch::channel(());
                let mut gate_tx = first_from_origin.then_some(gate_tx);
                for mut job in planned {
                    if let Job::Origin { piece, gate, .. } = &mut job
                        && first_from_origin
                    {
                        *gate = match (piece.0, gate_tx.take()) {
                            (0, Some(tx)) => Gate::Opens(tx),
                            _ => Gate::Waits(gate_rx.clone()),
                        };
                    }
                    match &mut job {
                        Job::Parents { piece, .. } | Job::Landing { piece, .. } => {
                            if busy.contains(*piece) || stored.contains(*piece) {
                                continue;
                            }
                            busy.insert(*piece);
                        }
                        Job::Origin { piece, landing, .. } => {
                            if busy.contains(*piece) || stored.contains(*piece) {
                                continue;
                            }
                            busy.insert(*piece);
                            // Registered now rather than when the job starts: the peers
                            // the supernode sends here may already be on their way.
                            if sn_ok && let Some((_, len)) = layout.piece_range(*piece) {
                                *landing = Some(self.landings.begin(id, *piece, len));
                            }
                        }
                        Job::OriginWhole(_) => {
                            for p in stored.missing() {
                                busy.insert(p);
                            }
                            whole_running = true;
                        }
                    }
                    jobs.spawn(self.clone().run_job(
                        h.clone(),
                        layout,
                        job,
                        headers.clone(),
                        known.clone(),
                        ev_tx.clone(),
                    ));
                }
            }
            let sleep = tokio::time::sleep_until(
                next_poll
                    .max(Instant::now() + Duration::from_millis(5))
                    .into(),
            );
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(api_error(ErrorKind::Internal, "daemon shutting down")),
                ev = ev_rx.recv() => {
                    let Some(ev) = ev else { continue };
                    if let Some(p) = self.on_event(h, ev, &mut busy, &mut known, &mut attempts, &ann_tx)? {
                        last_progress = Instant::now();
                        let _ = p;
                        // A freed slot is worth a new assignment right away.
                        next_poll = next_poll.min(Instant::now());
                    }
                }
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {
                    if whole_running && jobs.is_empty() {
                        whole_running = false;
                        busy = PieceSet::new(count);
                    }
                }
                _ = sleep => {}
            }
            if last_progress.elapsed() > self.cfg.stall_timeout {
                return Err(api_error(
                    ErrorKind::Stalled,
                    format!("no piece arrived for {:?}", self.cfg.stall_timeout),
                ));
            }
        }
        // Every piece is in the store, but the events of the last jobs may still be on
        // their way: each one must be applied (announced, counted), or the last piece would
        // never be announced and others would go to the origin for it. Each job holds a
        // sender, so the channel closes when the last job is done.
        drop(ev_tx);
        let drain = async {
            while let Some(ev) = ev_rx.recv().await {
                let _ = self.on_event(h, ev, &mut busy, &mut known, &mut attempts, &ann_tx);
            }
        };
        if tokio::time::timeout(JOB_DRAIN, drain).await.is_err() {
            tracing::debug!(task = %id, "fetch jobs still running after completion; stopping them");
        }
        jobs.shutdown().await;
        let stored_now = self.store.stored(&id).unwrap_or_default();
        h.progress.send_modify(|p| p.stored = stored_now);
        // Let the announcer send what is queued; it ends when the channel is drained.
        drop(ann_tx);
        let _ = tokio::time::timeout(crate::control::CALL_TIMEOUT, &mut announcer.0).await;
        // The hasher waits for pieces in order; one dropped after the loop (a local reader
        // found it bad) would never come, so it is given up once the store lacks a piece.
        let hashed = match in_order.as_mut() {
            Some(t) => loop {
                tokio::select! {
                    r = &mut t.0 => break r.ok().flatten(),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if !self.store.stored(&id).unwrap_or_default().is_full() {
                            break None;
                        }
                    }
                }
            },
            None => None,
        };
        let store = self.store.clone();
        let ok = Self::blocking(move || store.verify_complete_with(&id, digest, hashed))
            .await?
            .map_err(|e| store_api_error(&e))?;
        if !ok {
            h.progress.send_modify(|p| p.stored = PieceSet::new(count));
            return Err(api_error(
                ErrorKind::DigestMismatch,
                format!(
                    "content does not match the expected digest {}",
                    digest.map_or_else(String::new, |d| d.to_string())
                ),
            ));
        }
        Ok(())
    }

    /// Tells the supernode a task's content length, which it lays the task out from.
    async fn report_layout(
        &self,
        task: TaskId,
        content_length: u64,
        supports_range: bool,
    ) -> Result<ControlResponse, ControlError> {
        self.control
            .call(&ControlRequest::ReportLayout {
                host: self.control.host().clone(),
                task,
                content_length,
                supports_range,
            })
            .await
    }

    /// Applies one job result; `Ok(Some(piece))` when a piece landed.
    fn on_event(
        &self,
        h: &TaskHandle,
        ev: Event,
        busy: &mut PieceSet,
        known: &mut HashMap<PieceIndex, Sha256Digest>,
        attempts: &mut HashMap<PieceIndex, u32>,
        ann_tx: &mpsc::Sender<(AnnounceSource, PieceRecord)>,
    ) -> Result<Option<PieceIndex>, ApiError> {
        match ev {
            Event::Stored {
                piece,
                digest,
                source,
                bytes,
            } => {
                busy.remove(piece);
                known.insert(piece, digest);
                h.set_stored(piece, true);
                tracing::trace!(task = %h.id, %piece, ?source, "piece stored");
                if source == AnnounceSource::Origin {
                    h.from_origin.fetch_add(1, Ordering::Relaxed);
                    self.metrics.got_piece("origin", bytes);
                } else {
                    h.from_peers.fetch_add(1, Ordering::Relaxed);
                    self.metrics.got_piece("peer", bytes);
                }
                let _ = ann_tx.try_send((source, PieceRecord { piece, digest }));
                Ok(Some(piece))
            }
            Event::Failed {
                piece,
                fatal,
                busy: all_busy,
            } => {
                busy.remove(piece);
                if let Some(e) = fatal {
                    return Err(e);
                }
                if !all_busy {
                    let n = attempts.entry(piece).or_insert(0);
                    *n += 1;
                    if *n >= MAX_PIECE_ATTEMPTS {
                        return Err(api_error(
                            ErrorKind::Stalled,
                            format!("piece {piece} failed {n} times"),
                        ));
                    }
                }
                Ok(None)
            }
        }
    }

    async fn run_job(
        self: Arc<Self>,
        h: Arc<TaskHandle>,
        layout: PieceLayout,
        job: Job,
        headers: HeaderMap,
        known: HashMap<PieceIndex, Sha256Digest>,
        events: mpsc::Sender<Event>,
    ) {
        let id = h.id;
        match job {
            Job::Parents {
                piece,
                digest,
                parents,
            } => {
                let ev = self
                    .fetch_from_parents(id, layout, piece, digest, &parents)
                    .await;
                let _ = events.send(ev).await;
            }
            Job::Landing { piece, parent } => {
                let ev = self.fetch_landing(id, layout, piece, &parent).await;
                let _ = events.send(ev).await;
            }
            Job::Origin {
                piece,
                expected,
                gate,
                landing,
            } => {
                // Held until this job ends; dropping it lets the gated jobs go.
                let _opens = match gate {
                    Gate::Waits(mut rx) => {
                        // Err once the sender is gone: piece 0's job ended, either way.
                        let _ = tokio::time::timeout(HEAD_START, rx.changed()).await;
                        None
                    }
                    Gate::Opens(tx) => Some(tx),
                    Gate::None => None,
                };
                let ev = self
                    .fetch_from_origin(&h, &headers, layout, piece, expected, landing.as_deref())
                    .await;
                if matches!(ev, Event::Failed { .. }) {
                    // Stored pieces end their landing when the announce is accepted.
                    self.landings.failed(&id, piece);
                    let _ = self
                        .control
                        .call(&ControlRequest::PieceFailed {
                            host: self.control.host().clone(),
                            task: id,
                            piece,
                            parent: None,
                            reason: PieceFailure::Origin,
                        })
                        .await;
                }
                let _ = events.send(ev).await;
            }
            Job::OriginWhole(body) => {
                self.fetch_whole(&h, &headers, layout, &known, body, &events)
                    .await
            }
        }
    }

    /// Writes a verified piece to the store; the event says how that went.
    async fn store_piece(
        &self,
        id: TaskId,
        piece: PieceIndex,
        data: Bytes,
        digest: Sha256Digest,
        source: AnnounceSource,
    ) -> Event {
        let bytes = data.len() as u64;
        let store = self.store.clone();
        let written = Self::blocking(move || store.write_piece(&id, piece, data, digest))
            .await
            .and_then(|r| r.map_err(|e| store_api_error(&e)));
        match written {
            Ok(()) => Event::Stored {
                piece,
                digest,
                source,
                bytes,
            },
            Err(e) => Event::Failed {
                piece,
                fatal: Some(e),
                busy: false,
            },
        }
    }

    async fn fetch_from_parents(
        &self,
        id: TaskId,
        layout: PieceLayout,
        piece: PieceIndex,
        digest: Sha256Digest,
        parents: &[ParentRef],
    ) -> Event {
        let Some((_, len)) = layout.piece_range(piece) else {
            return Event::Failed {
                piece,
                fatal: None,
                busy: false,
            };
        };
        let mut candidates: Vec<&ParentRef> = parents.iter().collect();
        for round in 0..BUSY_ROUNDS {
            let mut busy = Vec::new();
            for parent in candidates {
                let started = Instant::now();
                match self.peers.fetch(parent.addr, id, piece, len, digest).await {
                    Ok(data) => {
                        let fetched = started.elapsed();
                        let ev = self
                            .store_piece(id, piece, data, digest, AnnounceSource::Peer)
                            .await;
                        tracing::debug!(task = %id, %piece, parent = %parent.host, ?fetched, store = ?(started.elapsed() - fetched), "piece from parent");
                        return ev;
                    }
                    Err(PeerError::Busy { .. }) => {
                        self.metrics.failed("busy");
                        busy.push(parent);
                    }
                    Err(e) => self.parent_failed(id, piece, parent, &e).await,
                }
            }
            if busy.is_empty() {
                break;
            }
            // Every remaining parent is saturated: wait a little for a slot rather than
            // spinning through the scheduler.
            candidates = busy;
            tokio::time::sleep(BUSY_BACKOFF * (round + 1)).await;
        }
        Event::Failed {
            piece,
            fatal: None,
            busy: true,
        }
    }

    async fn parent_failed(
        &self,
        id: TaskId,
        piece: PieceIndex,
        parent: &ParentRef,
        e: &PeerError,
    ) {
        let (reason, label) = match e {
            PeerError::DigestMismatch { .. }
            | PeerError::RemoteCorrupt { .. }
            | PeerError::Length { .. } => (PieceFailure::Corrupt, "corrupt"),
            PeerError::NotFound { .. } => (PieceFailure::NotFound, "not_found"),
            _ => (PieceFailure::Unreachable, "unreachable"),
        };
        self.metrics.failed(label);
        if reason == PieceFailure::Corrupt {
            tracing::warn!(task = %id, %piece, parent = %parent.host, error = %e, "bad piece from parent");
        } else {
            tracing::debug!(task = %id, %piece, parent = %parent.host, error = %e, "parent failed");
        }
        if reason == PieceFailure::Unreachable {
            self.peers.forget(parent.addr).await;
        }
        if self.control.is_up() {
            let _ = self
                .control
                .call(&ControlRequest::PieceFailed {
                    host: self.control.host().clone(),
                    task: id,
                    piece,
                    parent: Some(parent.host.clone()),
                    reason,
                })
                .await;
        }
    }

    /// Takes a piece from a parent as it lands there from the origin, then checks it
    /// against the record that parent made when it was done.
    async fn fetch_landing(
        &self,
        id: TaskId,
        layout: PieceLayout,
        piece: PieceIndex,
        parent: &ParentRef,
    ) -> Event {
        let failed = |busy| Event::Failed {
            piece,
            fatal: None,
            busy,
        };
        let Some((_, len)) = layout.piece_range(piece) else {
            return failed(false);
        };
        let mut round = 0;
        let got = loop {
            match self.peers.fetch_landing(parent.addr, id, piece, len).await {
                Err(PeerError::Busy { .. }) if round < LANDING_BUSY_ROUNDS => {
                    round += 1;
                    tokio::time::sleep(BUSY_BACKOFF * round).await;
                }
                got => break got,
            }
        };
        let (data, actual) = match got {
            Ok(got) => got,
            Err(PeerError::Busy { .. }) => {
                self.metrics.failed("busy");
                return failed(true);
            }
            // The parent's origin fetch was slow, which says nothing against the parent.
            Err(PeerError::Timeout { .. }) => {
                self.metrics.failed("landing_timeout");
                return failed(false);
            }
            Err(e) => {
                self.parent_failed(id, piece, parent, &e).await;
                return failed(false);
            }
        };
        let mut recorded = None;
        for attempt in 0..RECORD_ATTEMPTS {
            if attempt > 0 {
                // The parent had the piece stored before its record was made (it answered
                // from the store): the announce is a moment behind.
                tokio::time::sleep(RECORD_RETRY).await;
            }
            let records = self
                .control
                .call(&ControlRequest::PieceRecords {
                    host: self.control.host().clone(),
                    task: id,
                    pieces: vec![piece],
                })
                .await;
            recorded = match records {
                Ok(ControlResponse::Records(r)) => {
                    r.iter().find(|r| r.piece == piece).map(|r| r.digest)
                }
                Ok(_) | Err(_) => None,
            };
            if recorded.is_some() {
                break;
            }
        }
        match recorded {
            Some(d) if d == actual => {
                self.metrics.landing_pieces.inc();
                self.store_piece(id, piece, data, actual, AnnounceSource::Peer)
                    .await
            }
            Some(_) => {
                let e = PeerError::DigestMismatch { addr: parent.addr };
                self.parent_failed(id, piece, parent, &e).await;
                failed(false)
            }
            // No record to check against (the supernode is unreachable, say): the bytes
            // are worthless.
            None => {
                self.metrics.failed("unrecorded");
                failed(false)
            }
        }
    }

    async fn fetch_from_origin(
        &self,
        h: &TaskHandle,
        headers: &HeaderMap,
        layout: PieceLayout,
        piece: PieceIndex,
        expected: Option<Sha256Digest>,
        landing: Option<&Landing>,
    ) -> Event {
        let (id, url) = (h.id, h.request.url.as_str());
        let Some((offset, len)) = layout.piece_range(piece) else {
            return Event::Failed {
                piece,
                fatal: None,
                busy: false,
            };
        };
        // Counts progress so the heartbeat keeps the lease while bytes arrive.
        let fetch = self.control.origin_fetches.start(id, piece);
        let relay = |chunk: &Bytes| {
            fetch.received(chunk.len());
            if let Some(l) = landing {
                l.push(chunk.clone());
            }
        };
        let (data, digest) = match self
            .origin
            .fetch_range(url, headers, offset, len, relay)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.metrics.failed("origin");
                tracing::info!(task = %id, %piece, error = %e, "origin fetch failed");
                let fatal = matches!(&e, OriginError::Status { status, .. } if (400..500).contains(status) && *status != 429)
                    .then(|| origin_api_error(&e));
                return Event::Failed {
                    piece,
                    fatal,
                    busy: false,
                };
            }
        };
        if expected.is_some_and(|e| e != digest) {
            tracing::warn!(task = %id, %piece, "origin piece differs from the recorded digest");
            return Event::Failed {
                piece,
                fatal: Some(api_error(
                    ErrorKind::DigestMismatch,
                    format!("origin content changed: piece {piece} differs from its record"),
                )),
                busy: false,
            };
        }
        self.store_piece(id, piece, data, digest, AnnounceSource::Origin)
            .await
    }

    /// Streams the whole content from an origin without Range support, cutting it into
    /// pieces as it goes.
    async fn fetch_whole(
        &self,
        h: &TaskHandle,
        headers: &HeaderMap,
        layout: PieceLayout,
        known: &HashMap<PieceIndex, Sha256Digest>,
        body: Option<BodyStream>,
        events: &mpsc::Sender<Event>,
    ) {
        let (id, url) = (h.id, h.request.url.as_str());
        let stored = self.store.stored(&id).unwrap_or_default();
        let mut next = PieceIndex(0);
        let fail_rest = |from: u32, fatal: Option<ApiError>| {
            let stored = stored.clone();
            async move {
                let mut fatal = fatal;
                for p in from..layout.piece_count() {
                    if !stored.contains(PieceIndex(p)) {
                        let _ = events
                            .send(Event::Failed {
                                piece: PieceIndex(p),
                                fatal: fatal.take(),
                                busy: false,
                            })
                            .await;
                    }
                }
            }
        };
        let opened = match body {
            Some(b) => Ok(b),
            None => self.origin.fetch_all(url, headers).await,
        };
        let mut body = match opened {
            Ok(b) => b,
            Err(e) => {
                let fatal =
                    matches!(&e, OriginError::Status { status, .. } if (400..500).contains(status))
                        .then(|| origin_api_error(&e));
                fail_rest(0, fatal).await;
                return;
            }
        };
        let mut buf = BytesMut::new();
        while next.0 < layout.piece_count() {
            let Some((_, len)) = layout.piece_range(next) else {
                break;
            };
            while buf.len() < len as usize {
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        tracing::info!(task = %id, error = %e, "origin stream broke");
                        fail_rest(next.0, None).await;
                        return;
                    }
                    None => {
                        fail_rest(
                            next.0,
                            Some(api_error(
                                ErrorKind::OriginUnreachable,
                                "origin body shorter than its Content-Length",
                            )),
                        )
                        .await;
                        return;
                    }
                }
            }
            let data = buf.split_to(len as usize).freeze();
            let piece = next;
            next = PieceIndex(next.0 + 1);
            if stored.contains(piece) {
                continue;
            }
            let check = data.clone();
            let Ok(digest) =
                Self::blocking(move || Sha256Digest::from(Sha256::digest(&check))).await
            else {
                return;
            };
            if known.get(&piece).is_some_and(|k| *k != digest) {
                let _ = events
                    .send(Event::Failed {
                        piece,
                        fatal: Some(api_error(
                            ErrorKind::DigestMismatch,
                            format!(
                                "origin content changed: piece {piece} differs from its record"
                            ),
                        )),
                        busy: false,
                    })
                    .await;
                return;
            }
            let ev = self
                .store_piece(id, piece, data, digest, AnnounceSource::Origin)
                .await;
            if events.send(ev).await.is_err() {
                return;
            }
        }
    }

    /// Reads a verified piece for a local reader. A corrupt piece is dropped from the
    /// store and the progress, so a restarted download refetches it.
    pub async fn read_piece(&self, h: &TaskHandle, piece: PieceIndex) -> Result<Bytes, StoreError> {
        let store = self.store.clone();
        let id = h.id;
        let r = tokio::task::spawn_blocking(move || store.read_piece(&id, piece))
            .await
            .map_err(|e| StoreError::Io {
                path: Default::default(),
                source: std::io::Error::other(e),
            })?;
        if let Err(StoreError::Corrupt { .. } | StoreError::Missing { .. }) = &r {
            self.metrics.corrupt_local_pieces.inc();
            h.set_stored(piece, false);
        }
        r.map(|(b, _)| b)
    }
}

/// The sha256 of a task's content, hashed piece by piece in order as each is stored
/// (read back through the store's verification, from memory while the piece is recent).
/// `None` if a piece could not be read; the caller then hashes the file.
async fn hash_in_order(store: Arc<Store>, h: Arc<TaskHandle>, count: u32) -> Option<Sha256Digest> {
    let id = h.id;
    let mut hasher = Sha256::new();
    for i in 0..count {
        let piece = PieceIndex(i);
        h.wait_piece(piece, false).await.ok()?;
        let store = store.clone();
        let (h, ok) = tokio::task::spawn_blocking(move || match store.read_piece(&id, piece) {
            Ok((bytes, _)) => {
                hasher.update(&bytes);
                (hasher, true)
            }
            Err(_) => (hasher, false),
        })
        .await
        .ok()?;
        if !ok {
            return None;
        }
        hasher = h;
    }
    Some(Sha256Digest::from(hasher.finalize()))
}

struct AbortOnDrop<T = ()>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends landed pieces to the supernode in batches; whatever is queued while one call
/// is in flight goes in the next. Each batch is made durable first (one sync for the
/// batch), so what the supernode hears of survives a crash of this daemon.
async fn announce_loop(
    control: Arc<ControlClient>,
    store: Arc<Store>,
    landings: Arc<Landings>,
    host: proto::HostId,
    task: TaskId,
    mut rx: mpsc::Receiver<(AnnounceSource, PieceRecord)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let t0 = Instant::now();
        // Peers taking an origin piece as it landed wait for its record: tell them
        // whether there is one.
        let end_landings = |recorded: bool| {
            for (_, r) in batch.iter().filter(|(s, _)| *s == AnnounceSource::Origin) {
                if recorded {
                    landings.recorded(&task, r.piece);
                } else {
                    landings.failed(&task, r.piece);
                }
            }
        };
        if let Err(e) = store.sync().await {
            tracing::error!(%task, error = %e, "syncing the piece store failed; not announcing");
            end_landings(false);
            continue;
        }
        let synced = t0.elapsed();
        for source in [AnnounceSource::Origin, AnnounceSource::Peer] {
            let pieces: Vec<PieceRecord> = batch
                .iter()
                .filter(|(s, _)| *s == source)
                .map(|(_, r)| *r)
                .collect();
            if pieces.is_empty() {
                continue;
            }
            // Pending until acknowledged: the heartbeat sends again what did not get
            // through, even after this download (and this loop) ended.
            control.pending_announces.add(task, source, &pieces);
            let announced = control.is_up()
                && match control
                    .call(&ControlRequest::AnnouncePieces {
                        host: host.clone(),
                        task,
                        source,
                        pieces: pieces.clone(),
                    })
                    .await
                {
                    Ok(_) => {
                        control.pending_announces.confirm(task, &pieces);
                        true
                    }
                    Err(e) => {
                        tracing::debug!(%task, error = %e, "announce failed; the heartbeat sends it again");
                        false
                    }
                };
            if source == AnnounceSource::Origin {
                end_landings(announced);
            }
        }
        tracing::debug!(
            target: "dfp2p::announce",
            %task,
            pieces = batch.len(),
            sync_ms = synced.as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "announced"
        );
    }
}
