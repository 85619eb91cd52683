//! The async shell around the [`Scheduler`]: QUIC control server, a tick loop that expires
//! quiet hosts and leases, persistence of task records, and the HTTP API.
//!
//! The scheduler sits behind a plain mutex: every decision takes microseconds, never
//! awaits, and so never holds the lock across I/O.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use proto::TaskId;
use proto::control::{ControlRequest, ControlResponse, PieceSource};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SupernodeConfig;
use crate::metrics::{Metrics, RequestLabels};
use crate::prewarm::{JobBook, JobRecord, new_batches, split_batches};
use crate::registry::{ImageRef, RegistryError};
use crate::scheduler::{SchedError, Scheduler};
use crate::store::{StoreError, TaskStore};
use crate::tls::{ClusterCa, TlsError};
use crate::transport::{accept_loop, read_frame, write_frame};

/// Daemon control connections served at once; each is one host, so this bounds the
/// cluster size one supernode takes before new hosts wait.
pub const MAX_CONTROL_CONNECTIONS: usize = 20_000;
/// How often quiet hosts and stale leases are swept.
const TICK: Duration = Duration::from_millis(500);
/// A request that can't be read and answered in this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum SupernodeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("creating data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("binding control endpoint {addr}: {source}")]
    BindControl {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("binding HTTP API {addr}: {source}")]
    BindApi {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registry HTTP client: {0}")]
    Http(String),
}

struct Shared {
    sched: Mutex<Scheduler>,
    jobs: Mutex<JobBook>,
    store: TaskStore,
    metrics: Metrics,
    /// Resolves pre-warm images at their registries.
    http: reqwest::Client,
    plain_http: Vec<String>,
}

impl Shared {
    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        // A panic while holding the lock would be a bug in pure code; keep serving.
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, JobBook> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_dirty(&self) {
        let dirty = self.sched().take_dirty();
        for (id, rec) in dirty {
            if let Err(e) = self.store.put(&id, &rec) {
                tracing::error!(task = %id, error = %e, "persisting task record failed");
            }
        }
        let jobs = self.jobs().take_dirty();
        for (id, rec) in jobs {
            if let Err(e) = self.store.put_job(&id, rec.as_ref()) {
                tracing::error!(job = %id, error = %e, "persisting pre-warm job failed");
            }
        }
    }
}

/// A running supernode. Dropping it does not stop it; call [`Supernode::shutdown`].
pub struct Supernode {
    pub control_addr: SocketAddr,
    pub api_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    shared: Arc<Shared>,
}

impl Supernode {
    pub async fn start(
        cfg: SupernodeConfig,
        cancel: CancellationToken,
    ) -> Result<Self, SupernodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| SupernodeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let ca = ClusterCa::load_or_create(&cfg.ca_cert, &cfg.ca_key)?;
        let id = ca.issue(&[proto::SUPERNODE_SERVER_NAME])?;
        let server_cfg = ca.server_config(&id, proto::CONTROL_ALPN)?;

        let store = TaskStore::open(&cfg.data_dir)?;
        let mut sched = Scheduler::new(cfg.scheduler.clone());
        let records = store.load_all();
        tracing::info!(tasks = records.len(), "restored task records");
        sched.restore(records, Instant::now());
        let mut jobs = JobBook::default();
        let job_records = store.load_jobs();
        tracing::info!(jobs = job_records.len(), "restored pre-warm jobs");
        jobs.restore(job_records);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| SupernodeError::Http(e.to_string()))?;
        let shared = Arc::new(Shared {
            sched: Mutex::new(sched),
            jobs: Mutex::new(jobs),
            store,
            metrics: Metrics::default(),
            http,
            plain_http: cfg.plain_http_registries.clone(),
        });

        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|source| {
            SupernodeError::BindControl {
                addr: cfg.listen,
                source,
            }
        })?;
        let control_addr = endpoint
            .local_addr()
            .map_err(|source| SupernodeError::BindControl {
                addr: cfg.listen,
                source,
            })?;
        let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .map_err(|source| SupernodeError::BindApi {
                addr: cfg.api_listen,
                source,
            })?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| SupernodeError::BindApi {
                addr: cfg.api_listen,
                source,
            })?;

        let tracker = TaskTracker::new();
        {
            let shared = shared.clone();
            let tracker2 = tracker.clone();
            let endpoint2 = endpoint.clone();
            tracker.spawn(accept_loop(
                endpoint,
                MAX_CONTROL_CONNECTIONS,
                cancel.clone(),
                tracker2.clone(),
                move |conn| serve_connection(conn, shared.clone(), tracker2.clone()),
            ));
            let cancel2 = cancel.clone();
            tracker.spawn(async move {
                cancel2.cancelled().await;
                endpoint2.close(0u32.into(), b"supernode shutting down");
            });
        }
        tracker.spawn(tick_loop(shared.clone(), cancel.clone()));
        {
            let app = api_router(shared.clone());
            let cancel = cancel.clone();
            tracker.spawn(async move {
                let served = axum::serve(api_listener, app)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP API stopped");
                }
            });
        }
        tracing::info!(%control_addr, %api_addr, data_dir = %cfg.data_dir.display(), "supernode started");
        Ok(Self {
            control_addr,
            api_addr,
            cancel,
            tracker,
            shared,
        })
    }

    /// Stops accepting, waits (bounded) for in-flight work, flushes the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("supernode tasks did not stop within 5s");
        }
        self.shared.persist_dirty();
        if let Err(e) = self.shared.store.flush() {
            tracing::error!(error = %e, "flushing task store failed");
        }
    }

    pub async fn wait(&self) {
        self.cancel.cancelled().await;
    }
}

async fn tick_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        let (gone, hosts, tasks, connected) = {
            let mut s = shared.sched();
            let gone = s.handle_tick(Instant::now());
            shared
                .metrics
                .origin_leases_lapsed
                .inc_by(s.take_lapsed_origin_leases());
            (gone, s.host_count(), s.task_count(), s.host_ids())
        };
        shared.jobs().tick(unix_now(), |h| connected.contains(h));
        for h in &gone {
            tracing::info!(host = %h, "host went quiet; dropped with its pieces and leases");
        }
        shared.metrics.hosts_expired.inc_by(gone.len() as u64);
        shared.metrics.hosts.set(hosts as i64);
        shared.metrics.tasks.set(tasks as i64);
        shared.persist_dirty();
    }
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>, tracker: TaskTracker) {
    shared.metrics.connections.inc();
    let remote = conn.remote_address();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "control connection closed");
                break;
            }
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            let work = async {
                let req: ControlRequest = match read_frame(&mut recv).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "bad control frame");
                        let resp = ControlResponse::Error {
                            code: proto::control::ControlErrorCode::BadRequest,
                            message: e.to_string(),
                        };
                        let _ = write_frame(&mut send, &resp).await;
                        let _ = send.finish();
                        return;
                    }
                };
                let resp = handle(&shared, req);
                if write_frame(&mut send, &resp).await.is_ok() {
                    let _ = send.finish();
                }
            };
            if tokio::time::timeout(REQUEST_TIMEOUT, work).await.is_err() {
                tracing::debug!(%remote, "control request timed out");
            }
        });
    }
    shared.metrics.connections.dec();
}

fn kind(req: &ControlRequest) -> &'static str {
    match req {
        ControlRequest::RegisterHost(_) => "register_host",
        ControlRequest::Heartbeat { .. } => "heartbeat",
        ControlRequest::RegisterPeer { .. } => "register_peer",
        ControlRequest::ReportLayout { .. } => "report_layout",
        ControlRequest::AnnouncePieces { .. } => "announce",
        ControlRequest::Schedule { .. } => "schedule",
        ControlRequest::PieceFailed { .. } => "piece_failed",
        ControlRequest::Leave { .. } => "leave",
        ControlRequest::PrewarmPoll { .. } => "prewarm_poll",
        ControlRequest::PieceRecords { .. } => "piece_records",
        ControlRequest::RenewOriginLeases { .. } => "renew_origin_leases",
    }
}

fn handle(shared: &Shared, req: ControlRequest) -> ControlResponse {
    let now = Instant::now();
    let kind = kind(&req);
    let started = Instant::now();
    let result: Result<ControlResponse, SchedError> = {
        let mut s = shared.sched();
        match req {
            ControlRequest::RegisterHost(info) => {
                tracing::info!(host = %info.host, addr = %info.peer_addr, "host registered");
                s.handle_register_host(info, now);
                Ok(ControlResponse::Ack)
            }
            ControlRequest::Heartbeat {
                host,
                session,
                uploads_in_flight,
            } => s
                .handle_heartbeat(&host, session, uploads_in_flight, now)
                .map(|()| ControlResponse::Ack),
            ControlRequest::RegisterPeer {
                host,
                task,
                url,
                content_digest,
            } => s
                .handle_register_peer(&host, task, &url, content_digest, now)
                .map(ControlResponse::Task),
            ControlRequest::ReportLayout {
                host,
                task,
                content_length,
                supports_range,
            } => s
                .handle_report_layout(&host, task, content_length, supports_range, now)
                .and_then(|_| s.task_view(&task).ok_or(SchedError::UnknownTask(task)))
                .map(ControlResponse::Task),
            ControlRequest::AnnouncePieces {
                host,
                task,
                source,
                pieces,
            } => s
                .handle_announce(&host, task, source, &pieces, now)
                .map(|()| ControlResponse::Ack),
            ControlRequest::Schedule {
                host,
                task,
                have,
                busy,
                max_assignments,
            } => s
                .handle_schedule(&host, task, have, &busy, max_assignments, now)
                .map(|r| {
                    for a in &r.assignments {
                        match a.source {
                            PieceSource::Parents { .. } => shared.metrics.parent_assignments.inc(),
                            PieceSource::Origin | PieceSource::OriginWhole => {
                                shared.metrics.origin_assignments.inc()
                            }
                            PieceSource::Landing { .. } => shared.metrics.landing_assignments.inc(),
                        };
                    }
                    ControlResponse::Schedule(r)
                }),
            ControlRequest::PieceFailed {
                host,
                task,
                piece,
                parent,
                reason,
            } => {
                if let Some(p) = &parent {
                    tracing::warn!(reporter = %host, parent = %p, %task, %piece, ?reason, "piece failure reported");
                }
                s.handle_piece_failed(&host, task, piece, parent.as_ref(), reason, now)
                    .map(|()| ControlResponse::Ack)
            }
            ControlRequest::PieceRecords { host, task, pieces } => s
                .piece_records(&host, task, &pieces, now)
                .map(ControlResponse::Records),
            ControlRequest::Leave { host, task } => {
                s.handle_leave(&host, task);
                Ok(ControlResponse::Ack)
            }
            ControlRequest::RenewOriginLeases { host, task, pieces } => s
                .handle_renew_origin_leases(&host, task, &pieces, now)
                .map(|n| {
                    shared.metrics.origin_lease_renewals.inc_by(n as u64);
                    ControlResponse::Ack
                }),
            ControlRequest::PrewarmPoll { host, progress } => {
                drop(s);
                Ok(ControlResponse::Prewarm(
                    shared.jobs().poll(&host, &progress),
                ))
            }
        }
    };
    if kind == "schedule" {
        shared
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    let resp = match result {
        Ok(r) => r,
        Err(e) => ControlResponse::Error {
            code: e.code(),
            message: e.to_string(),
        },
    };
    let result = if matches!(resp, ControlResponse::Error { .. }) {
        "error"
    } else {
        "ok"
    };
    shared
        .metrics
        .requests
        .get_or_create(&RequestLabels { kind, result })
        .inc();
    shared.persist_dirty();
    resp
}

fn api_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/tasks", get(list_tasks))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/prewarm", get(list_jobs).post(create_job))
        .route("/api/v1/prewarm/{id}", get(get_job).delete(cancel_job))
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn list_tasks(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    Json(s.sched().task_summaries())
}

async fn get_task(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> axum::response::Response {
    let Ok(id) = id.parse::<TaskId>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "task id must be 64 hex characters"})),
        )
            .into_response();
    };
    match s
        .sched()
        .task_summaries()
        .into_iter()
        .find(|t| t.task == id)
    {
        Some(t) => Json(t).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("unknown task {id}")})),
        )
            .into_response(),
    }
}

async fn list_hosts(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    Json(s.sched().host_summaries(Instant::now()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn api_error(status: StatusCode, msg: impl std::fmt::Display) -> axum::response::Response {
    (status, Json(serde_json::json!({"error": msg.to_string()}))).into_response()
}

async fn list_jobs(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    Json(s.jobs().list())
}

async fn get_job(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> axum::response::Response {
    match s.jobs().get(&id) {
        Some(j) => Json(j).into_response(),
        None => api_error(StatusCode::NOT_FOUND, format!("no pre-warm job {id}")),
    }
}

async fn cancel_job(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> axum::response::Response {
    let cancelled = s.jobs().cancel(&id);
    s.persist_dirty();
    match cancelled {
        Some(j) => Json(j).into_response(),
        None => api_error(StatusCode::NOT_FOUND, format!("no pre-warm job {id}")),
    }
}

/// The hosts a spec targets, in batches; every problem is a 400 naming it.
fn target_batches(
    spec: &proto::prewarm::PrewarmSpec,
    hosts: &[crate::scheduler::HostSummary],
) -> Result<Vec<Vec<proto::HostId>>, String> {
    use proto::prewarm::Targets;
    let known = |h: &proto::HostId| hosts.iter().any(|k| &k.host == h);
    let check = |list: &[proto::HostId]| -> Result<(), String> {
        let unknown: Vec<&str> = list
            .iter()
            .filter(|h| !known(h))
            .map(|h| h.as_str())
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unknown host(s), not registered with the supernode: {}",
                unknown.join(", ")
            ))
        }
    };
    let batches = match &spec.targets {
        Targets::Hosts(list) => {
            check(list)?;
            split_batches(list.clone(), &spec.batch_sizes)
        }
        Targets::Selector(sel) => {
            if sel.is_empty() {
                return Err("empty selector".into());
            }
            let mut matched: Vec<proto::HostId> = hosts
                .iter()
                .filter(|h| sel.iter().all(|(k, v)| h.labels.get(k) == Some(v)))
                .map(|h| h.host.clone())
                .collect();
            matched.sort();
            if matched.is_empty() {
                let s: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                return Err(format!("selector {} matches no host", s.join(",")));
            }
            split_batches(matched, &spec.batch_sizes)
        }
        Targets::Batches(b) => {
            for batch in b {
                check(batch)?;
            }
            b.clone()
        }
    };
    let all: Vec<&proto::HostId> = batches.iter().flatten().collect();
    if all.is_empty() || batches.iter().any(Vec::is_empty) {
        return Err("no target hosts (or an empty batch)".into());
    }
    if all.len() > proto::prewarm::MAX_TARGETS {
        return Err(format!("more than {} targets", proto::prewarm::MAX_TARGETS));
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != all.len() {
        return Err("a host is listed twice".into());
    }
    Ok(batches)
}

/// `POST /api/v1/prewarm`: resolve the image, check the targets, start the job. The same
/// spec again answers the job already running (or done) for it; a failed or cancelled
/// one is replaced by a new run.
async fn create_job(
    State(s): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use proto::prewarm::*;
    use sha2::Digest as _;
    let spec: PrewarmSpec = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("bad pre-warm spec: {e}")),
    };
    let image: ImageRef = match spec.image.parse() {
        Ok(i) => i,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    let platform = spec
        .platform
        .clone()
        .unwrap_or_else(|| DEFAULT_PLATFORM.to_string());
    if !(2..=3).contains(&platform.split('/').count()) || platform.split('/').any(str::is_empty) {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("platform {platform:?}: expected os/arch[/variant]"),
        );
    }
    let mut public = spec.clone();
    public.credentials = None;
    let id = hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(&public).unwrap_or_default(),
    ))[..16]
        .to_string();
    if let Some(existing) = s.jobs().get(&id)
        && matches!(existing.state, JobState::Running | JobState::Succeeded)
    {
        return (StatusCode::OK, Json(existing.clone())).into_response();
    }
    let hosts = s.sched().host_summaries(Instant::now());
    let batches = match target_batches(&spec, &hosts) {
        Ok(b) => b,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    let creds = spec
        .credentials
        .as_ref()
        .map(|c| (c.username.as_str(), c.password.as_str()));
    let resolved = match tokio::time::timeout(
        Duration::from_secs(30),
        crate::registry::resolve(&s.http, &image, &platform, &s.plain_http, creds),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = match &e {
                RegistryError::BadReference(_) => StatusCode::BAD_REQUEST,
                RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
                RegistryError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                RegistryError::NoPlatform { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                RegistryError::Upstream(_) | RegistryError::BadManifest { .. } => {
                    StatusCode::BAD_GATEWAY
                }
            };
            return api_error(status, e);
        }
        Err(_) => {
            return api_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("resolving {} took over 30 s", spec.image),
            );
        }
    };
    let now = unix_now();
    let timeout = spec.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1);
    let parallelism = spec.parallelism.unwrap_or(DEFAULT_PARALLELISM).max(1);
    let status = JobStatus {
        id: id.clone(),
        spec: public,
        state: JobState::Running,
        manifest: resolved.manifest,
        layers: resolved.blobs.clone(),
        batches: new_batches(batches, &resolved.blobs),
        created_at: now,
        deadline: now + timeout,
        error: None,
    };
    tracing::info!(job = %id, image = %spec.image, layers = resolved.blobs.len(),
        hosts = status.batches.iter().map(|b| b.hosts.len()).sum::<usize>(),
        batches = status.batches.len(), "pre-warm job created");
    s.jobs().insert(JobRecord {
        status: status.clone(),
        blob_base: format!("{}/v2/{}/blobs/", resolved.base, resolved.repository),
        authorization: resolved.authorization,
        pin_secs: DEFAULT_PIN_TTL_SECS,
        parallelism,
        absent_since: Default::default(),
    });
    s.persist_dirty();
    (StatusCode::CREATED, Json(status)).into_response()
}
