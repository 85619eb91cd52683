//! The daemon's side of the control plane: a supernode client that reconnects on demand,
//! and a heartbeat loop that notices when the supernode forgot us (it restarted, or timed
//! us out) and registers again, re-announcing every stored piece.
//!
//! Calls fail fast ([`CALL_TIMEOUT`]) so a dead supernode costs a download seconds, not
//! minutes; the downloader then carries on with its cache, known peers and the origin.
//!
//! The heartbeat also renews the origin leases of fetches that are slow but alive
//! ([`OriginFetches`]), and sends again the announces that did not get through
//! ([`PendingAnnounces`]). Either gap let an origin lease run out: the piece went to a
//! second host, and the origin sent those bytes twice.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::control::{
    AnnounceSource, ControlErrorCode, ControlRequest, ControlResponse, HostInfo, MAX_ASSIGNMENTS,
    PieceRecord,
};
use proto::{HostId, PieceIndex, SessionId, TaskId};
use supernode::transport::{FrameIoError, read_frame, write_frame};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Store, TaskMeta};

/// Connecting plus one request/response must finish within this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeat period; the supernode drops hosts after a few missed ones.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Origin fetches under a supernode lease, with the bytes each has received, so the
/// heartbeat can renew the leases of those still making progress. Fetches younger than
/// a heartbeat are not renewed: most finish well within their lease.
#[derive(Default)]
pub struct OriginFetches {
    inner: Mutex<HashMap<(TaskId, PieceIndex), Fetch>>,
}

struct Fetch {
    started: Instant,
    /// Shared with the fetch's [`OriginFetch`], which also tells its own entry by it.
    received: Arc<AtomicU64>,
    reported: u64,
}

/// One running origin fetch; counts its bytes, and leaves the table when dropped.
pub struct OriginFetch<'a> {
    table: &'a OriginFetches,
    key: (TaskId, PieceIndex),
    received: Arc<AtomicU64>,
}

impl OriginFetch<'_> {
    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for OriginFetch<'_> {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        // A later fetch of the same piece may have replaced this one's entry.
        if t.get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(&f.received, &self.received))
        {
            t.remove(&self.key);
        }
    }
}

impl OriginFetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TaskId, PieceIndex), Fetch>> {
        // The table stays consistent whatever a panicking holder was doing.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn start(&self, task: TaskId, piece: PieceIndex) -> OriginFetch<'_> {
        let received = Arc::new(AtomicU64::new(0));
        self.lock().insert(
            (task, piece),
            Fetch {
                started: Instant::now(),
                received: received.clone(),
                reported: 0,
            },
        );
        OriginFetch {
            table: self,
            key: (task, piece),
            received,
        }
    }

    /// Per task, the pieces whose fetch started at least `min_age` ago and received
    /// bytes since the last call; they are marked reported.
    pub fn progressed(&self, now: Instant, min_age: Duration) -> Vec<(TaskId, Vec<PieceIndex>)> {
        let mut by_task: HashMap<TaskId, Vec<PieceIndex>> = HashMap::new();
        let mut t = self.lock();
        for ((task, piece), f) in t.iter_mut() {
            let received = f.received.load(Ordering::Relaxed);
            if now.saturating_duration_since(f.started) >= min_age && received > f.reported {
                f.reported = received;
                by_task.entry(*task).or_default().push(*piece);
            }
        }
        by_task.into_iter().collect()
    }
}

/// Stored pieces the supernode has not confirmed hearing of. A record is added before
/// its announce is sent and removed once the supernode acknowledged it, so a call that
/// timed out, or was cut short when its download ended, is retried by the heartbeat.
/// Until then the supernode does not list this host for the piece, and an origin
/// piece's lease stays with this host until it runs out.
#[derive(Default)]
pub struct PendingAnnounces {
    inner: Mutex<HashMap<TaskId, TaskPending>>,
    /// Kept equal to [`PendingAnnounces::count`] (`dfdaemon_pending_announces`).
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// One task's unacknowledged records, by piece.
type TaskPending = BTreeMap<PieceIndex, (AnnounceSource, PieceRecord)>;

impl PendingAnnounces {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, TaskPending>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_gauge(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            inner: Mutex::default(),
            gauge,
        }
    }

    fn total(m: &HashMap<TaskId, TaskPending>) -> usize {
        m.values().map(BTreeMap::len).sum()
    }

    fn publish(&self, m: &HashMap<TaskId, TaskPending>) {
        self.gauge.set(Self::total(m) as i64);
    }

    pub fn add(&self, task: TaskId, source: AnnounceSource, records: &[PieceRecord]) {
        let mut m = self.lock();
        let t = m.entry(task).or_default();
        for r in records {
            t.insert(r.piece, (source, *r));
        }
        self.publish(&m);
    }

    /// The supernode has these records now.
    pub fn confirm(&self, task: TaskId, records: &[PieceRecord]) {
        let mut m = self.lock();
        if let Some(t) = m.get_mut(&task) {
            for r in records {
                if t.get(&r.piece).is_some_and(|(_, have)| have == r) {
                    t.remove(&r.piece);
                }
            }
            if t.is_empty() {
                m.remove(&task);
            }
        }
        self.publish(&m);
    }

    /// Forgets everything: a registration re-announces the whole store.
    pub fn clear(&self) {
        let mut m = self.lock();
        m.clear();
        self.publish(&m);
    }

    /// Per task and source, up to `max` records of each.
    fn batches(&self, max: usize) -> Vec<(TaskId, AnnounceSource, Vec<PieceRecord>)> {
        let m = self.lock();
        let mut out = Vec::new();
        for (task, t) in m.iter() {
            for source in [
                AnnounceSource::Origin,
                AnnounceSource::Peer,
                AnnounceSource::Restored,
            ] {
                let records: Vec<PieceRecord> = t
                    .values()
                    .filter(|(s, _)| *s == source)
                    .map(|(_, r)| *r)
                    .take(max)
                    .collect();
                if !records.is_empty() {
                    out.push((*task, source, records));
                }
            }
        }
        out
    }

    /// Records waiting, over all tasks.
    pub fn count(&self) -> usize {
        Self::total(&self.lock())
    }
}

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
    /// When the supernode last answered anything (an error answer included).
    last_answer: Mutex<Option<Instant>>,
    pub info: HostInfo,
    /// This host's origin fetches, renewed with each heartbeat while they progress.
    pub origin_fetches: OriginFetches,
    /// Announces not yet acknowledged, sent again with each heartbeat.
    pub pending_announces: PendingAnnounces,
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
            last_answer: Mutex::new(None),
            info,
            origin_fetches: OriginFetches::default(),
            pending_announces: PendingAnnounces::with_gauge(metrics.pending_announces.clone()),
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

    /// How long since the supernode last answered; `None` if it never did.
    pub fn silent_for(&self) -> Option<Duration> {
        let last = *self.last_answer.lock().unwrap_or_else(|e| e.into_inner());
        last.map(|t| t.elapsed())
    }

    fn set_up(&self, up: bool) {
        if up {
            *self.last_answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
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
        // Everything stored is announced below; what was pending is part of it.
        self.pending_announces.clear();
        let mut announced = 0usize;
        for (task, meta) in store.tasks() {
            announced += self.announce_stored(store, task, &meta).await?.len();
        }
        tracing::info!(supernode = %self.addr, pieces = announced, "registered with supernode");
        Ok(())
    }

    /// Registers for a stored task and announces every piece of it the store holds
    /// (restoring the task's layout on the supernode if it lost it). Returns the records
    /// announced.
    async fn announce_stored(
        &self,
        store: &Store,
        task: TaskId,
        meta: &TaskMeta,
    ) -> Result<Vec<PieceRecord>, ControlError> {
        let Some(layout) = meta.layout else {
            return Ok(Vec::new());
        };
        let pieces: Vec<PieceRecord> = store
            .digests(&task)
            .into_iter()
            .map(|(piece, digest)| PieceRecord { piece, digest })
            .collect();
        if pieces.is_empty() {
            return Ok(pieces);
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
        match self
            .call(&ControlRequest::AnnouncePieces {
                host: self.info.host.clone(),
                task,
                source: AnnounceSource::Restored,
                pieces: pieces.clone(),
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
        Ok(pieces)
    }

    /// Tells the supernode which origin fetches are still receiving bytes, so their
    /// leases outlast a slow origin. A failed call only logs: the lease then runs its
    /// course, as it would without renewal.
    async fn renew_origin_leases(&self) {
        for (task, mut pieces) in self.origin_fetches.progressed(Instant::now(), HEARTBEAT) {
            pieces.truncate(MAX_ASSIGNMENTS as usize);
            let req = ControlRequest::RenewOriginLeases {
                host: self.info.host.clone(),
                task,
                pieces,
            };
            match self.call(&req).await {
                Ok(_) => {}
                // Each further call would wait out its own timeout too.
                Err(e @ ControlError::Unreachable(_)) => {
                    tracing::debug!(%task, error = %e, "origin lease renewal failed");
                    return;
                }
                Err(e) => tracing::debug!(%task, error = %e, "origin lease renewal refused"),
            }
        }
    }

    /// Sends the announces that did not get through, for pieces still stored.
    async fn resend_announces(&self, store: &Store) {
        for (task, source, records) in self.pending_announces.batches(MAX_ASSIGNMENTS as usize) {
            let stored: HashMap<PieceIndex, proto::Sha256Digest> =
                store.digests(&task).into_iter().collect();
            let (held, gone): (Vec<PieceRecord>, Vec<PieceRecord>) = records
                .into_iter()
                .partition(|r| stored.get(&r.piece) == Some(&r.digest));
            // Evicted (or stored anew) since: nothing to announce.
            self.pending_announces.confirm(task, &gone);
            if held.is_empty() {
                continue;
            }
            let req = ControlRequest::AnnouncePieces {
                host: self.info.host.clone(),
                task,
                source,
                pieces: held.clone(),
            };
            match self.call(&req).await {
                Ok(_) => {
                    tracing::info!(%task, pieces = held.len(), "late announce went through");
                    self.pending_announces.confirm(task, &held);
                }
                // A digest conflict will not go away by asking again.
                Err(ControlError::Remote {
                    code: ControlErrorCode::DigestConflict,
                    message,
                }) => {
                    tracing::warn!(%task, %message, "supernode disagrees with some stored pieces");
                    self.pending_announces.confirm(task, &held);
                }
                // The peer registration never got through (the supernode was away when
                // the download began): register for the task with everything stored.
                Err(ControlError::Remote {
                    code: ControlErrorCode::UnknownTask,
                    ..
                }) => {
                    let Some(meta) = store.meta(&task) else {
                        self.pending_announces.confirm(task, &held);
                        continue;
                    };
                    match self.announce_stored(store, task, &meta).await {
                        Ok(sent) => {
                            tracing::info!(%task, pieces = sent.len(), "registered late for a stored task");
                            // Only what went out: the download may have stored (and
                            // failed to announce) more pieces meanwhile.
                            self.pending_announces.confirm(task, &sent);
                        }
                        Err(e) => {
                            tracing::debug!(%task, error = %e, "late registration failed; retried with the next heartbeat");
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(%task, error = %e, "announce failed again; retried with the next heartbeat");
                    return;
                }
            }
        }
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
                Ok(_) => {
                    self.renew_origin_leases().await;
                    self.resend_announces(&store).await;
                }
                Err(e) if e.is_unknown_host() => {
                    tracing::info!(
                        "supernode does not know this host (it restarted?); registering again"
                    );
                    registered = false;
                    every.reset_immediately();
                }
                // No re-registration here: a supernode that restarted or dropped us
                // meanwhile answers the next heartbeat with UnknownHost. Re-registering
                // after every slow answer re-announced every stored piece, which loaded
                // a busy supernode further (at 32 hosts, 16 daemons did so in one run).
                Err(e) => tracing::warn!(error = %e, "supernode heartbeat failed"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Sha256Digest;

    fn rec(piece: u32, tag: u8) -> PieceRecord {
        PieceRecord {
            piece: PieceIndex(piece),
            digest: Sha256Digest::of(&[tag]),
        }
    }

    #[test]
    fn pending_announces_leave_only_when_that_record_is_confirmed() {
        let p = PendingAnnounces::default();
        let task = TaskId::for_url("http://o/f", &[], None);
        p.add(task, AnnounceSource::Origin, &[rec(0, 0), rec(1, 1)]);
        p.add(task, AnnounceSource::Peer, &[rec(2, 2)]);
        assert_eq!(p.count(), 3);
        // One batch per source, each with its own records.
        let mut b = p.batches(16);
        b.sort_by_key(|(_, s, _)| *s == AnnounceSource::Peer);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].2, vec![rec(0, 0), rec(1, 1)]);
        assert_eq!(b[1].2, vec![rec(2, 2)]);
        assert_eq!(p.batches(1)[0].2.len(), 1, "batches are capped");
        // A confirmation of an older record of the piece (it was stored again since)
        // does not drop the newer one.
        p.add(task, AnnounceSource::Origin, &[rec(1, 9)]);
        p.confirm(task, &[rec(0, 0), rec(1, 1)]);
        assert_eq!(p.count(), 2);
        p.confirm(task, &[rec(1, 9), rec(2, 2)]);
        assert_eq!(p.count(), 0);
        assert!(p.batches(16).is_empty());
    }

    #[test]
    fn origin_fetches_report_progress_once_old_enough() {
        let f = OriginFetches::default();
        let task = TaskId::for_url("http://o/f", &[], None);
        let a = f.start(task, PieceIndex(3));
        let start = Instant::now();
        assert!(
            f.progressed(start, Duration::ZERO).is_empty(),
            "no bytes yet"
        );
        a.received(100);
        assert!(
            f.progressed(start, Duration::from_secs(60)).is_empty(),
            "too young"
        );
        let later = start + Duration::from_secs(61);
        assert_eq!(
            f.progressed(later, Duration::from_secs(60)),
            vec![(task, vec![PieceIndex(3)])]
        );
        assert!(
            f.progressed(later, Duration::from_secs(60)).is_empty(),
            "reported already"
        );
        a.received(1);
        assert_eq!(f.progressed(later, Duration::from_secs(60)).len(), 1);
        // Bytes that came in just before the fetch ended renew nothing: it left.
        a.received(5);
        drop(a);
        assert!(f.progressed(later, Duration::ZERO).is_empty());
        // A fetch that replaced an older one of the same piece outlives the older guard.
        let old = f.start(task, PieceIndex(5));
        let new = f.start(task, PieceIndex(5));
        drop(old);
        new.received(1);
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            f.progressed(later, Duration::ZERO),
            vec![(task, vec![PieceIndex(5)])]
        );
    }
}
