//! Registry mirror for containerd: the OCI distribution pull API on `--proxy-listen`.
//!
//! * `GET /v2/`: version check.
//! * `HEAD|GET /v2/<name>/manifests/<tag>`: passed to the upstream (tags move; resolving
//!   them is the registry's job), with the client's `Authorization` and `Accept`.
//! * `HEAD|GET /v2/<name>/manifests/sha256:...`: passed through and checked against the
//!   digest before it is returned.
//! * `HEAD|GET /v2/<name>/blobs/sha256:...`: through the P2P task engine, task id = the
//!   blob digest (one task whichever registry or redirect served it), verified against the
//!   digest; `Range` answered with 206.
//!
//! Upstream: containerd's `?ns=<registry>` parameter, else the configured default. Bound
//! to loopback the mirror follows any `ns`; bound elsewhere only registries on the
//! allowlist: never an open proxy.
//!
//! Authorization: before a blob is served, the client's credentials are checked upstream
//! with a `HEAD` of that blob (answer cached briefly per repository and credential), so a
//! cached private layer is never handed to a client the registry would refuse. An upstream
//! 401/403 goes back with its `WWW-Authenticate` unchanged, so containerd's token flow works.
//!
//! Fail fast: status and headers are sent once the first piece is verified, and a piece that
//! makes no progress within `no_progress` aborts the response: containerd retries or falls
//! back instead of hanging.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use proto::api::DownloadRequest;
use proto::{PieceIndex, Sha256Digest};
use sha2::{Digest, Sha256};

use crate::api::{content_stream, status_for};
use crate::download::Engine;
use crate::metrics::Metrics;

/// How long an upstream "these credentials may read this repository" answer is reused.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept in that cache; beyond it, expired ones are dropped first, then all.
const AUTH_CACHE_MAX: usize = 10_000;
/// Largest manifest accepted (the distribution spec suggests 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub listen: SocketAddr,
    /// Registry used when a request carries no `ns` (e.g. `registry-1.docker.io`).
    pub default_registry: Option<String>,
    /// Registries reachable through the mirror when it listens beyond loopback.
    pub allow: Vec<String>,
    /// Registries spoken to over plain HTTP (loopback registries always are).
    pub plain_http: Vec<String>,
    /// A blob response that makes no progress for this long is aborted.
    pub no_progress: Duration,
    /// The daemon's own credentials per registry host (user, password), used when the
    /// client sends none: CRI pulls don't send pull secrets to a mirror.
    pub credentials: HashMap<String, (String, String)>,
    /// Extra CA certificates trusted for registries' TLS (a private registry's CA), on top
    /// of the system's.
    pub upstream_roots: Vec<reqwest::Certificate>,
}

pub struct MirrorState {
    engine: Arc<Engine>,
    cfg: MirrorConfig,
    http: reqwest::Client,
    auth_ok: Mutex<HashMap<(String, String, u64), Instant>>,
    /// Authorization values obtained with the daemon's credentials, per (registry, repo),
    /// with their expiry.
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
    metrics: Arc<Metrics>,
}

impl MirrorState {
    pub fn new(
        engine: Arc<Engine>,
        cfg: MirrorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let http = client_builder(&cfg.upstream_roots).build()?;
        Ok(Arc::new(Self {
            engine,
            cfg,
            http,
            auth_ok: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    /// A client configured like the mirror's own (timeouts, trusted roots, no proxy).
    pub(crate) fn client_builder(&self) -> reqwest::ClientBuilder {
        client_builder(&self.cfg.upstream_roots)
    }

    pub(crate) fn no_progress(&self) -> Duration {
        self.cfg.no_progress
    }

    /// Bound to loopback, only this node's clients can reach us: follow any registry.
    fn open(&self) -> bool {
        self.cfg.listen.ip().is_loopback()
    }

    /// Beyond loopback only allowlisted registries (and, for the HTTP proxy, hosts) are
    /// reachable: never an open proxy.
    pub(crate) fn check_allowed(&self, registry: &str) -> Result<(), Box<Response>> {
        if self.open() || self.cfg.allow.iter().any(|a| a == registry) {
            return Ok(());
        }
        Err(Box::new(oci_error(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("{registry} is not on this daemon's allowlist"),
        )))
    }

    fn count_cache(&self, req: &DownloadRequest) {
        let hit = self.engine.is_cached(&Engine::task_id(req));
        Metrics::count(&self.metrics.mirror_cache, if hit { "hit" } else { "miss" });
    }

    /// Loopback registries and configured plain-HTTP ones are spoken to over HTTP.
    fn scheme_for(&self, registry: &str) -> &'static str {
        supernode::registry::scheme_for(registry, &self.cfg.plain_http)
    }
}

/// HTTP client settings for talking to registries: bounded connect and read waits, the
/// configured extra roots, and no proxy from the environment between us and them.
pub fn client_builder(roots: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .no_proxy();
    for r in roots {
        b = b.add_root_certificate(r.clone());
    }
    b
}

/// An OCI-style error answer.
fn oci_error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message.to_string()}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub(crate) enum Kind {
    Manifest,
    Blob,
}

pub(crate) struct Target {
    name: String,
    kind: Kind,
    reference: String,
}

/// OCI repository names: `/`-separated components of `[a-z0-9._-]` that start and end
/// with a letter or digit (so no `..`, no empty component).
fn valid_name(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && alnum(b[0])
                && alnum(b[b.len() - 1])
                && b.iter().all(|&x| alnum(x) || b"._-".contains(&x))
        })
}

fn valid_reference(r: &str) -> bool {
    if let Some(hex) = r.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !r.is_empty()
        && r.len() <= 128
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn parse_path(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, kind, reference) = if let Some(i) = rest.rfind("/manifests/") {
        (&rest[..i], Kind::Manifest, &rest[i + "/manifests/".len()..])
    } else if let Some(i) = rest.rfind("/blobs/") {
        (&rest[..i], Kind::Blob, &rest[i + "/blobs/".len()..])
    } else {
        return None;
    };
    (valid_name(name) && valid_reference(reference)).then(|| Target {
        name: name.to_string(),
        kind,
        reference: reference.to_string(),
    })
}

fn registry_from_query(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "ns")
        .map(|(_, v)| v.replace("%3A", ":").replace("%3a", ":"))
}

fn valid_registry(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 253
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

/// Parses `Range: bytes=a-b` / `bytes=a-` against a length; `Err` for unsatisfiable.
fn parse_range(v: &str, len: u64) -> Result<std::ops::Range<u64>, ()> {
    let spec = v.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            (len.saturating_sub(n), len)
        }
        (a, "") => (a.parse().map_err(|_| ())?, len),
        (a, b) => (
            a.parse().map_err(|_| ())?,
            b.parse::<u64>().map_err(|_| ())?.saturating_add(1).min(len),
        ),
    };
    if start >= len || start >= end {
        return Err(());
    }
    Ok(start..end)
}

const FORWARDED_RESPONSE_HEADERS: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::WWW_AUTHENTICATE,
    header::ETAG,
];

fn copy_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap) {
    for name in FORWARDED_RESPONSE_HEADERS {
        if let Some(v) = from
            .get(name.as_str())
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            to.insert(name.clone(), v);
        }
    }
    if let Some(v) = from
        .get("docker-content-digest")
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
    {
        to.insert("docker-content-digest", v);
    }
}

pub(crate) async fn handle(State(s): State<Arc<MirrorState>>, req: Request) -> Response {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the mirror serves pulls only",
        );
    }
    let path = req.uri().path().to_string();
    if path == "/v2/" || path == "/v2" {
        return (
            StatusCode::OK,
            [("docker-distribution-api-version", "registry/2.0")],
            "{}",
        )
            .into_response();
    }
    let Some(target) = parse_path(&path) else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            format!("not a pull path: {path}"),
        );
    };
    let Some(registry) =
        registry_from_query(req.uri().query()).or_else(|| s.cfg.default_registry.clone())
    else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            "no ?ns= registry and no default registry configured",
        );
    };
    if !valid_registry(&registry) {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            format!("invalid registry {registry:?}"),
        );
    }
    if let Err(resp) = s.check_allowed(&registry) {
        return *resp;
    }
    let scheme = s.scheme_for(&registry);
    pull(&s, &method, req.headers(), target, &registry, scheme).await
}

/// A pull request the mirror logic should answer: `GET`/`HEAD` of a manifest or blob.
/// Anything else seen by the HTTP proxy is passed through untouched.
pub(crate) fn pull_target(method: &Method, path: &str) -> Option<Target> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    parse_path(path)
}

/// Answers one pull (manifest or blob) of `target` from `registry`, reached over `scheme`:
/// the mirror's `?ns=` requests, the HTTP proxy's absolute-form requests and intercepted
/// HTTPS requests all end here.
pub(crate) async fn pull(
    s: &MirrorState,
    method: &Method,
    headers: &HeaderMap,
    target: Target,
    registry: &str,
    scheme: &str,
) -> Response {
    let kind = match target.kind {
        Kind::Manifest => "manifests",
        Kind::Blob => "blobs",
    };
    let upstream = format!(
        "{scheme}://{registry}/v2/{}/{kind}/{}",
        target.name, target.reference
    );
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.metrics
        .mirror_requests
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: match target.kind {
                Kind::Manifest => "manifest",
                Kind::Blob => "blob",
            },
        })
        .inc();
    let auth = match auth {
        Some(a) => Some(a),
        None => match own_authorization(s, scheme, registry, &target.name).await {
            Ok(a) => a,
            Err(resp) => return *resp,
        },
    };
    // Everything up to the status line (upstream checks, the first verified piece) must
    // happen within the no-progress budget: containerd only falls back on errors at
    // request open, so a slow upstream must become an error, not a wait.
    let answer = async {
        match target.kind {
            Kind::Manifest => {
                match target.reference.parse::<Sha256Digest>() {
                    // By digest the content can't change: cached and shared like a blob.
                    Ok(digest) if method == Method::GET => {
                        manifest_by_digest(s, registry, &upstream, &target, digest, headers, auth)
                            .await
                    }
                    _ => manifest(s, method, &upstream, &target, headers, auth.as_deref()).await,
                }
            }
            Kind::Blob => blob(s, method, registry, &upstream, &target, headers, auth).await,
        }
    };
    match tokio::time::timeout(s.cfg.no_progress, answer).await {
        Ok(r) => r,
        Err(_) => oci_error(
            StatusCode::GATEWAY_TIMEOUT,
            "UNAVAILABLE",
            format!(
                "no answer from {registry} within {:?}; use the registry directly",
                s.cfg.no_progress
            ),
        ),
    }
}

fn upstream_error(e: reqwest::Error) -> Response {
    oci_error(
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        format!("upstream registry: {e}"),
    )
}

async fn manifest(
    s: &MirrorState,
    method: &Method,
    upstream: &str,
    t: &Target,
    headers: &HeaderMap,
    auth: Option<&str>,
) -> Response {
    let mut rb = s.http.request(method.clone(), upstream);
    if let Some(a) = auth {
        rb = rb.header(header::AUTHORIZATION, a);
    }
    for v in headers.get_all(header::ACCEPT) {
        rb = rb.header(header::ACCEPT, v.as_bytes());
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return upstream_error(e),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HeaderMap::new();
    copy_headers(resp.headers(), &mut out);
    if method == Method::HEAD {
        return (status, out).into_response();
    }
    if resp
        .content_length()
        .is_some_and(|l| l > MAX_MANIFEST as u64)
    {
        return oci_error(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            "upstream manifest too large",
        );
    }
    let body = match resp.bytes().await {
        Ok(b) if b.len() <= MAX_MANIFEST => b,
        Ok(_) => {
            return oci_error(
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                "upstream manifest too large",
            );
        }
        Err(e) => return upstream_error(e),
    };
    if status.is_success()
        && let Ok(want) = t.reference.parse::<Sha256Digest>()
        && Sha256Digest::from(Sha256::digest(&body)) != want
    {
        return oci_error(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            format!("upstream manifest does not match {want}"),
        );
    }
    (status, out, body).into_response()
}

/// The media type of a manifest, from its `mediaType` field, else from its shape.
fn manifest_media_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match v["mediaType"].as_str() {
        Some(t) => t.to_string(),
        None if v.get("manifests").is_some() => "application/vnd.oci.image.index.v1+json".into(),
        None => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

/// A manifest by digest through the task engine (content-addressed, verified, cached),
/// after the same per-object credential check as a blob.
async fn manifest_by_digest(
    s: &MirrorState,
    registry: &str,
    upstream: &str,
    t: &Target,
    digest: Sha256Digest,
    headers: &HeaderMap,
    auth: Option<String>,
) -> Response {
    let accept: Vec<HeaderValue> = headers.get_all(header::ACCEPT).iter().cloned().collect();
    if let Err(resp) = check_access(
        s,
        false,
        registry,
        upstream,
        t,
        &digest,
        auth.as_deref(),
        &accept,
    )
    .await
    {
        return *resp;
    }
    let mut fwd: Vec<(String, String)> = accept
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| ("accept".to_string(), v.to_string()))
        .collect();
    if let Some(a) = auth {
        fwd.push(("authorization".to_string(), a));
    }
    let req = DownloadRequest {
        url: upstream.to_string(),
        headers: fwd,
        digest: Some(digest),
        content_addressed: true,
    };
    s.count_cache(&req);
    let h = match s.engine.start(req) {
        Ok(h) => h,
        Err(e) => return oci_error(status_for(e.kind), "MANIFEST_UNKNOWN", e.message),
    };
    let layout = match h.wait_started().await {
        Ok(l) => l,
        Err(e) => {
            let status = e
                .origin_status
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or_else(|| status_for(e.kind));
            return oci_error(status, "MANIFEST_UNKNOWN", e.message);
        }
    };
    if layout.content_length > MAX_MANIFEST as u64 {
        return oci_error(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            "upstream manifest too large",
        );
    }
    let mut body = Vec::with_capacity(layout.content_length as usize);
    for piece in layout.pieces() {
        // The last piece is only released once the whole content matched the digest.
        if let Err(e) = h
            .wait_piece(piece, piece.0 + 1 == layout.piece_count())
            .await
        {
            return oci_error(status_for(e.kind), "MANIFEST_INVALID", e.message);
        }
        match s.engine.read_piece(&h, piece).await {
            Ok(b) => body.extend_from_slice(&b),
            Err(e) => return oci_error(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", e),
        }
    }
    let media_type = manifest_media_type(&body);
    s.metrics.mirror_bytes_served.inc_by(body.len() as u64);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, media_type),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// The Authorization value for a registry from the daemon's own credentials, following
/// the registry's challenge (Basic, or a Bearer token from its realm). `Ok(None)` when no
/// credentials are configured or the registry asks for none.
async fn own_authorization(
    s: &MirrorState,
    scheme: &str,
    registry: &str,
    repo: &str,
) -> Result<Option<String>, Box<Response>> {
    let Some((user, pass)) = s.cfg.credentials.get(registry) else {
        return Ok(None);
    };
    let key = (registry.to_string(), repo.to_string());
    if let Some((v, until)) = s.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
        && Instant::now() < *until
    {
        return Ok(Some(v.clone()));
    }
    let got = supernode::registry::authorization(
        &s.http,
        &format!("{scheme}://{registry}"),
        repo,
        Some((user, pass)),
    )
    .await
    .map_err(|e| {
        use supernode::registry::RegistryError;
        let status = match e {
            RegistryError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_GATEWAY,
        };
        Box::new(oci_error(
            status,
            "UNAUTHORIZED",
            format!("this daemon's credentials for {registry}: {e}"),
        ))
    })?;
    let Some((value, lifetime)) = got else {
        return Ok(None);
    };
    s.tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, (value.clone(), Instant::now() + lifetime));
    Ok(Some(value))
}

fn auth_key(auth: Option<&str>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    auth.hash(&mut h);
    h.finish()
}

/// Does the registry let these credentials read this object *in this repository*? Asked
/// before anything is served from the cache (forced for HEAD), answer reused briefly. Keyed
/// by object too: access to one repository must not open a blob the registry only links
/// elsewhere. `Err` carries the upstream's refusal (status and `WWW-Authenticate`).
#[allow(clippy::too_many_arguments)]
async fn check_access(
    s: &MirrorState,
    force: bool,
    registry: &str,
    upstream: &str,
    t: &Target,
    digest: &Sha256Digest,
    auth: Option<&str>,
    accept: &[HeaderValue],
) -> Result<HeaderMap, Box<Response>> {
    let key = (
        registry.to_string(),
        format!("{}@{digest}", t.name),
        auth_key(auth),
    );
    let known_ok = s
        .auth_ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .is_some_and(|at| at.elapsed() < AUTH_CACHE_TTL);
    let mut head_headers = HeaderMap::new();
    if known_ok && !force {
        return Ok(head_headers);
    }
    let mut rb = s.http.head(upstream);
    if let Some(a) = auth {
        rb = rb.header(header::AUTHORIZATION, a);
    }
    for v in accept {
        rb = rb.header(header::ACCEPT, v.as_bytes());
    }
    let resp = rb.send().await.map_err(|e| Box::new(upstream_error(e)))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    copy_headers(resp.headers(), &mut head_headers);
    if !status.is_success() {
        return Err(Box::new((status, head_headers).into_response()));
    }
    let mut cache = s.auth_ok.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= AUTH_CACHE_MAX {
        cache.retain(|_, at| at.elapsed() < AUTH_CACHE_TTL);
        if cache.len() >= AUTH_CACHE_MAX {
            cache.clear();
        }
    }
    cache.insert(key, Instant::now());
    Ok(head_headers)
}

async fn blob(
    s: &MirrorState,
    method: &Method,
    registry: &str,
    upstream: &str,
    t: &Target,
    headers: &HeaderMap,
    auth: Option<String>,
) -> Response {
    let Ok(digest) = t.reference.parse::<Sha256Digest>() else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "blobs are addressed by sha256 digest",
        );
    };
    let head_headers = match check_access(
        s,
        method == Method::HEAD,
        registry,
        upstream,
        t,
        &digest,
        auth.as_deref(),
        &[],
    )
    .await
    {
        Ok(h) => h,
        Err(resp) => return *resp,
    };
    tracing::debug!(%digest, "blob access checked upstream");
    if method == Method::HEAD {
        let mut head_headers = head_headers;
        head_headers.insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest.to_string()).unwrap_or(HeaderValue::from_static("")),
        );
        return (StatusCode::OK, head_headers).into_response();
    }
    let req = DownloadRequest {
        url: upstream.to_string(),
        headers: auth
            .map(|a| vec![("authorization".to_string(), a)])
            .unwrap_or_default(),
        digest: Some(digest),
        content_addressed: true,
    };
    s.count_cache(&req);
    let h = match s.engine.start(req.clone()) {
        Ok(h) => h,
        Err(e) => return oci_error(status_for(e.kind), "BLOB_UNKNOWN", e.message),
    };
    let layout = match tokio::time::timeout(s.cfg.no_progress, h.wait_started()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            let status = e
                .origin_status
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or_else(|| status_for(e.kind));
            return oci_error(status, "BLOB_UNKNOWN", e.message);
        }
        Err(_) => {
            return oci_error(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                "no progress fetching the blob; try the registry",
            );
        }
    };
    let len = layout.content_length;
    let (status, range) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => match parse_range(r, len) {
            Ok(range) => (StatusCode::PARTIAL_CONTENT, range),
            Err(()) => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response();
            }
        },
        None => (StatusCode::OK, 0..len),
    };
    // The status line goes out once the first piece to send is verified (and, if it is
    // the last one, the whole blob matched its digest): failures before that are an
    // error status containerd acts on, not a broken body. The caller bounds this wait.
    if !range.is_empty() {
        let first = layout.piece_at(range.start).unwrap_or(PieceIndex(0));
        if let Err(e) = h
            .wait_piece(first, first.0 + 1 == layout.piece_count())
            .await
        {
            let status = e
                .origin_status
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or_else(|| status_for(e.kind));
            return oci_error(status, "BLOB_UNKNOWN", e.message);
        }
    }
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.to_string());
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{len}", range.start, range.end - 1),
        );
    }
    s.engine.unpin(&h.id);
    let served = s.metrics.mirror_bytes_served.clone();
    let stream = content_stream(
        s.engine.clone(),
        req,
        layout,
        range,
        Some(s.cfg.no_progress),
    )
    .inspect(move |chunk| {
        if let Ok(b) = chunk {
            served.inc_by(b.len() as u64);
        }
    });
    resp.body(Body::from_stream(stream))
        .unwrap_or_else(|e| oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/v2/library/busybox/manifests/latest").unwrap();
        assert_eq!(t.name, "library/busybox");
        assert!(matches!(t.kind, Kind::Manifest));
        let d = format!("sha256:{}", "a".repeat(64));
        let t = parse_path(&format!("/v2/a/b/c/blobs/{d}")).unwrap();
        assert_eq!(t.name, "a/b/c");
        assert_eq!(t.reference, d);
        for bad in [
            "/v2/",
            "/v2/x",
            "/v2/UPPER/manifests/t",
            "/v2/a/manifests/",
            "/v2/a/blobs/sha256:zz",
            "/v2/../manifests/x",
            "/v3/a/manifests/t",
            "/v2/a//b/manifests/t",
        ] {
            assert!(parse_path(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Ok(0..10));
        assert_eq!(parse_range("bytes=3-5", 10), Ok(3..6));
        assert_eq!(parse_range("bytes=3-100", 10), Ok(3..10));
        assert_eq!(parse_range("bytes=-4", 10), Ok(6..10));
        assert_eq!(parse_range("bytes=10-", 10), Err(()));
        assert_eq!(parse_range("bytes=5-3", 10), Err(()));
        assert_eq!(parse_range("items=0-1", 10), Err(()));
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Err(()));
    }

    #[test]
    fn ns_parameter() {
        assert_eq!(
            registry_from_query(Some("ns=127.0.0.1%3A5000")),
            Some("127.0.0.1:5000".into())
        );
        assert_eq!(
            registry_from_query(Some("a=b&ns=docker.io")),
            Some("docker.io".into())
        );
        assert_eq!(registry_from_query(None), None);
        assert!(!valid_registry("evil/host"));
    }
}
