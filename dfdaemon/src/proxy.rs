//! The registry mirror's listener, which is also an HTTP proxy for clients that can't use
//! mirrors (Docker for registries other than Docker Hub: `HTTP_PROXY`/`HTTPS_PROXY`).
//!
//! One port, three kinds of request, told apart by their request line:
//! * origin-form (`GET /v2/...?ns=`): a containerd mirror request ([`crate::mirror`]);
//! * absolute-form (`GET http://host/...`): plain HTTP proxying. Pulls (`GET`/`HEAD` of a
//!   manifest or blob) are answered by the mirror logic, so blobs go through the P2P
//!   network; everything else (`/v2/` auth challenges, token requests, pushes) is passed
//!   through untouched, redirects included;
//! * `CONNECT host:port`: a TCP tunnel, except for hosts listed in `intercept`, whose TLS
//!   is terminated here with a certificate from the daemon's proxy CA so their pulls go
//!   through the P2P network too. Clients must trust that CA (`proxy-ca.pem`).
//!
//! Bound beyond loopback, only allowlisted hosts are reachable, as for the mirror.
//! Connections and tunnels are counted and capped; each hangs off the daemon's
//! cancellation token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use supernode::tls::{ClusterCa, TlsError};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::mirror::{self, MirrorState};

/// Client connections served at once on the mirror/proxy port.
pub const MAX_CONNECTIONS: usize = 1024;
/// CONNECT tunnels (plain or intercepted) open at once; each holds two sockets.
pub const MAX_TUNNELS: usize = 256;
/// Connecting to a tunnel's target may take this long; then the client gets 502 at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTPS interception: which hosts, and the CA that signs their certificates.
#[derive(Clone, Debug, Default)]
pub struct InterceptConfig {
    /// `host` (port 443) or `host:port` entries whose TLS is terminated here.
    pub hosts: Vec<String>,
    /// The proxy CA's certificate and key; created when missing.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

/// Leaf certificates minted for intercepted hosts (a finite, configured set).
struct Interceptor {
    hosts: Vec<String>,
    ca: ClusterCa,
    configs: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl Interceptor {
    fn matches(&self, host: &str, port: u16) -> bool {
        let with_port = format!("{host}:{port}");
        self.hosts
            .iter()
            .any(|h| *h == with_port || (port == 443 && h == host))
    }

    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(host) {
            return Ok(c.clone());
        }
        let id = self.ca.issue(&[host])?;
        let cfg = Arc::new(id.tls_server_config(&[b"http/1.1"])?);
        configs.insert(host.to_string(), cfg.clone());
        Ok(cfg)
    }
}

pub struct ProxyState {
    mirror: Arc<MirrorState>,
    /// Passes requests through as they are: no redirects followed, no proxy of its own.
    passthrough: reqwest::Client,
    interceptor: Option<Interceptor>,
    tunnels: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy CA: {0}")]
    Ca(#[from] TlsError),
    #[error("proxy HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl ProxyState {
    pub fn new(
        mirror: Arc<MirrorState>,
        intercept: &InterceptConfig,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, ProxyError> {
        let interceptor = if intercept.hosts.is_empty() {
            None
        } else {
            Some(Interceptor {
                hosts: intercept.hosts.clone(),
                ca: ClusterCa::load_or_create_named(
                    &intercept.ca_cert,
                    &intercept.ca_key,
                    "dfp2p proxy CA",
                )?,
                configs: Mutex::new(HashMap::new()),
            })
        };
        let passthrough = mirror
            .client_builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Self {
            mirror,
            passthrough,
            interceptor,
            tunnels: Arc::new(Semaphore::new(MAX_TUNNELS)),
            metrics,
            cancel,
            tracker,
        }))
    }
}

/// Accepts connections on the mirror/proxy port until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ProxyState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = state.cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = state.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "mirror accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let cancel = state.cancel.clone();
        state.tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move { Ok::<_, std::convert::Infallible>(dispatch(st, req.map(Body::new)).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "mirror connection ended");
                },
            }
            drop(permit);
        });
    }
}

async fn dispatch(st: Arc<ProxyState>, req: Request<Body>) -> Response {
    if req.method() == Method::CONNECT {
        return connect(st, req).await;
    }
    if req.uri().scheme().is_some() {
        return absolute(st, req).await;
    }
    mirror::handle(State(st.mirror.clone()), req).await
}

fn plain_error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("dfdaemon proxy: {msg}\n")).into_response()
}

/// `host:port` as a registry name: the port is left out when it is the scheme's default,
/// the way image references spell it.
fn registry_name(host: &str, port: u16, scheme: &str) -> String {
    let default = if scheme == "https" { 443 } else { 80 };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == default {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// `GET http://host/path`: a pull goes to the mirror logic, anything else upstream as is.
async fn absolute(st: Arc<ProxyState>, req: Request<Body>) -> Response {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("http") {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return plain_error(
            StatusCode::BAD_REQUEST,
            "only http:// URLs are proxied in absolute form; use CONNECT for https",
        );
    }
    let Some(host) = uri.host() else {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return plain_error(StatusCode::BAD_REQUEST, "no host in the request URL");
    };
    let registry = registry_name(host, uri.port_u16().unwrap_or(80), "http");
    if let Err(resp) = st.mirror.check_allowed(&registry) {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return *resp;
    }
    pull_or_forward(&st, req, &registry, "http", uri.to_string()).await
}

/// Pulls (`GET`/`HEAD` of a manifest or blob) are answered by the mirror logic, so they
/// go through the P2P network; anything else goes to `url` as it is.
async fn pull_or_forward(
    st: &ProxyState,
    req: Request<Body>,
    registry: &str,
    scheme: &str,
    url: String,
) -> Response {
    if let Some(target) = mirror::pull_target(req.method(), req.uri().path()) {
        Metrics::count(&st.metrics.proxy_requests, "pull");
        return mirror::pull(
            &st.mirror,
            req.method(),
            req.headers(),
            target,
            registry,
            scheme,
        )
        .await;
    }
    Metrics::count(&st.metrics.proxy_requests, "forward");
    forward(st, req, url).await
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and proxy credentials never travel on.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HOST,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Passes one request upstream and streams the answer back, status and headers as they
/// are. No answer within the no-progress budget is a 504, not a wait.
async fn forward(st: &ProxyState, req: Request<Body>, url: String) -> Response {
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let has_body = parts.method != Method::GET && parts.method != Method::HEAD;
    let mut rb = st.passthrough.request(parts.method, &url).headers(headers);
    if has_body {
        rb = rb.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let budget = st.mirror.no_progress();
    let resp = match tokio::time::timeout(budget, rb.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return plain_error(StatusCode::BAD_GATEWAY, format!("upstream {url}: {e}"));
        }
        Err(_) => {
            return plain_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer from {url} within {budget:?}"),
            );
        }
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    if let Some(h) = out.headers_mut() {
        for (k, v) in resp.headers() {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_str().as_bytes()),
                axum::http::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                h.append(k, v);
            }
        }
        strip_hop_by_hop(h);
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| plain_error(StatusCode::BAD_GATEWAY, e))
}

/// `CONNECT host:port`: the target is reached before the client hears 200 (a dead target
/// is a 502 at request open, which clients act on), then bytes are tunnelled, or TLS is
/// terminated here for intercepted hosts.
async fn connect(st: Arc<ProxyState>, mut req: Request<Body>) -> Response {
    let Some((host, port)) = req
        .uri()
        .authority()
        .map(|a| (a.host().to_string(), a.port_u16().unwrap_or(443)))
    else {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return plain_error(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let registry = registry_name(&host, port, "https");
    if let Err(resp) = st.mirror.check_allowed(&registry) {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return *resp;
    }
    let Ok(permit) = st.tunnels.clone().try_acquire_owned() else {
        Metrics::count(&st.metrics.proxy_requests, "refused");
        return plain_error(StatusCode::SERVICE_UNAVAILABLE, "too many tunnels open");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let intercept = st
        .interceptor
        .as_ref()
        .is_some_and(|i| i.matches(&host, port));
    if intercept {
        let tls = match st.interceptor.as_ref().map(|i| i.server_config(&host)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return plain_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("minting a certificate: {e}"),
                );
            }
            None => return plain_error(StatusCode::INTERNAL_SERVER_ERROR, "no interceptor"),
        };
        Metrics::count(&st.metrics.proxy_requests, "intercept");
        let st2 = st.clone();
        st.tracker.spawn(async move {
            let _permit = permit;
            let Ok(upgraded) = upgrade.await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let cancel = st2.cancel.clone();
            let session = async move {
                let tls = match acceptor.accept(TokioIo::new(upgraded)).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(error = %e, %registry, "client refused the intercepting certificate");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let st = st2.clone();
                    let registry = registry.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            intercepted(st, &registry, req.map(Body::new)).await,
                        )
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(error = %e, "intercepted connection ended");
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = session => {}
            }
        });
        return StatusCode::OK.into_response();
    }
    let target = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return plain_error(
                StatusCode::BAD_GATEWAY,
                format!("connecting to {registry}: {e}"),
            );
        }
        Err(_) => {
            return plain_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("connecting to {registry} timed out"),
            );
        }
    };
    Metrics::count(&st.metrics.proxy_requests, "tunnel");
    let cancel = st.cancel.clone();
    st.tracker.spawn(async move {
        let _permit = permit;
        let Ok(upgraded) = upgrade.await else { return };
        let mut client = TokioIo::new(upgraded);
        let mut target = target;
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::io::copy_bidirectional(&mut client, &mut target) => {}
        }
    });
    StatusCode::OK.into_response()
}

/// A request inside an intercepted TLS session to `registry`: pulls through the mirror
/// logic (over https upstream), the rest passed through.
async fn intercepted(st: Arc<ProxyState>, registry: &str, req: Request<Body>) -> Response {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let url = format!("https://{registry}{pq}");
    if url.parse::<Uri>().is_err() {
        return plain_error(StatusCode::BAD_REQUEST, "bad request path");
    }
    pull_or_forward(&st, req, registry, "https", url).await
}
