//! dfdaemon: one per host.
//!
//! * [`store`]: verified pieces on disk (sled metadata + one data file per task), quota
//!   and LRU eviction; survives restarts.
//! * [`download`]: the task engine: supernode-scheduled piece fetches from parents and
//!   the origin, every piece verified before it is stored or served.
//! * [`peer`]: the QUIC piece server (upload slots) and client.
//! * [`origin`]: HTTP(S) to the origin, by Range.
//! * [`control`]: the supernode client and heartbeat / re-registration loop.
//! * [`api`]: the local Unix-socket API `dfget` talks to.
//! * [`prewarm`]: the pre-warm executor (polls the supernode for blobs to cache and pin).
//! * [`mirror`], [`proxy`]: the registry mirror for containerd and the HTTP proxy, on one
//!   port.
//!
//! Ownership: [`Daemon`] owns one cancellation token and one task tracker; every task it
//! starts (accept loops, downloads, heartbeats, the embedded supernode) hangs off them,
//! and [`Daemon::shutdown`] cancels and drains them with a grace period.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod containerd;
pub mod control;
pub mod download;
pub mod landing;
pub mod metrics;
pub mod mirror;
pub mod origin;
pub mod peer;
pub mod prewarm;
pub mod proxy;
pub mod store;
pub mod udp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::control::HostInfo;
use supernode::Supernode;
use supernode::config::SupernodeConfig;
use supernode::tls::{ClusterCa, TlsError};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DaemonConfig, SupernodeMode};
use crate::control::ControlClient;
use crate::download::{Engine, EngineParts};
use crate::metrics::Metrics;
use crate::peer::PeerClient;

/// Peer connections served at once; each costs a few hundred KiB of QUIC state.
pub const MAX_PEER_CONNECTIONS: usize = 1024;
/// How long shutdown waits for running work before giving up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cluster CA not found at {cert} / {key}: pass --ca-cert and --ca-key (the supernode creates them in its data dir)"
    )]
    NoCa { cert: PathBuf, key: PathBuf },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("embedded supernode: {0}")]
    Supernode(#[from] supernode::SupernodeError),
    #[error("binding peer endpoint {addr}: {source}")]
    BindPeer {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("binding the supernode client socket {addr}: {source}")]
    BindControl {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("binding registry mirror {addr}: {source}")]
    BindProxy {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registry mirror HTTP client: {0}")]
    MirrorClient(#[from] reqwest::Error),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error("binding API socket {path}: {source}")]
    BindApi {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Origin(#[from] origin::OriginError),
}

pub struct Daemon {
    pub peer_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub api_sock: PathBuf,
    pub supernode_addr: SocketAddr,
    /// The embedded supernode's HTTP API, when running one.
    pub supernode_api: Option<SocketAddr>,
    embedded: Option<Supernode>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// The address other hosts should use to reach `listen`: as given unless unspecified,
/// then the local address the kernel would use to reach the supernode.
fn advertise(listen: SocketAddr, supernode: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let ip = if supernode.ip().is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| s.connect(supernode).and_then(|()| s.local_addr()))
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip())
    };
    SocketAddr::new(ip, listen.port())
}

impl Daemon {
    pub async fn start(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| DaemonError::Dir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());

        let (ca, embedded) = match cfg.supernode {
            SupernodeMode::Embedded => {
                let sn_cfg = SupernodeConfig::embedded(
                    cfg.data_dir.join("supernode"),
                    cfg.ca_cert.clone(),
                    cfg.ca_key.clone(),
                );
                let sn = Supernode::start(sn_cfg, cancel.child_token()).await?;
                (ClusterCa::load(&cfg.ca_cert, &cfg.ca_key)?, Some(sn))
            }
            SupernodeMode::External(_) => {
                if !cfg.ca_cert.exists() || !cfg.ca_key.exists() {
                    return Err(DaemonError::NoCa {
                        cert: cfg.ca_cert.clone(),
                        key: cfg.ca_key.clone(),
                    });
                }
                (ClusterCa::load(&cfg.ca_cert, &cfg.ca_key)?, None)
            }
        };
        let supernode_addr = match (&cfg.supernode, &embedded) {
            (SupernodeMode::External(a), _) => *a,
            (_, Some(sn)) => sn.control_addr,
            (SupernodeMode::Embedded, None) => {
                unreachable!("embedded mode always starts a supernode")
            }
        };
        let supernode_api = embedded.as_ref().map(|s| s.api_addr);

        let identity = ca.issue(&[proto::PEER_SERVER_NAME, cfg.host_id.as_str()])?;
        let peer_socket =
            udp::bind_peer_socket(cfg.peer_listen, cfg.udp_receive_buffer).map_err(|source| {
                DaemonError::BindPeer {
                    addr: cfg.peer_listen,
                    source,
                }
            })?;
        tracing::info!(
            bytes = peer_socket.receive_buffer,
            "peer socket receive buffer"
        );
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(ca.server_config(&identity, proto::PEER_ALPN)?),
            peer_socket.socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| DaemonError::BindPeer {
            addr: cfg.peer_listen,
            source,
        })?;
        let bound = endpoint
            .local_addr()
            .map_err(|source| DaemonError::BindPeer {
                addr: cfg.peer_listen,
                source,
            })?;
        let peer_addr = cfg
            .advertise_addr
            .unwrap_or_else(|| advertise(bound, supernode_addr));

        let memory = usize::try_from(cfg.memory_cache).unwrap_or(usize::MAX);
        let store = store::Store::open_with_memory(&cfg.data_dir.join("store"), cfg.quota, memory)?;
        let info = HostInfo {
            host: cfg.host_id.clone(),
            session: control::new_session(),
            peer_addr,
            labels: cfg.labels.clone(),
            upload_slots: cfg.upload_slots,
        };
        // The control connection gets a socket of its own: on the peer socket its few
        // packets queued behind piece data for the socket buffer, and at 32 hosts on
        // 25 Mbit/s links heartbeats timed out (2 s) some 20 times a run.
        let control_endpoint =
            quinn::Endpoint::client(SocketAddr::new(bound.ip(), 0)).map_err(|source| {
                DaemonError::BindControl {
                    addr: SocketAddr::new(bound.ip(), 0),
                    source,
                }
            })?;
        let control = Arc::new(ControlClient::new(
            control_endpoint,
            ca.client_config(&identity, proto::CONTROL_ALPN)?,
            supernode_addr,
            info,
            metrics.clone(),
        ));
        let peers = Arc::new(PeerClient::new(
            endpoint.clone(),
            ca.client_config(&identity, proto::PEER_ALPN)?,
        ));
        let landings = Arc::new(landing::Landings::default());
        let engine = Engine::new(EngineParts {
            store: store.clone(),
            landings: landings.clone(),
            control: control.clone(),
            peers,
            origin: origin::Origin::new(&cfg.mirror.upstream_roots, cfg.reuse_origin_connections)?,
            cfg: cfg.engine.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        });

        // Piece server.
        let uploads = Arc::new(Semaphore::new(cfg.upload_slots as usize));
        {
            let ctx = peer::ServeCtx {
                store: store.clone(),
                slots: uploads.clone(),
                landings,
                landing_slots: Arc::new(Semaphore::new(cfg.landing_upload_slots)),
                metrics: metrics.clone(),
            };
            let tracker2 = tracker.clone();
            tracker.spawn(supernode::transport::accept_loop(
                endpoint.clone(),
                MAX_PEER_CONNECTIONS,
                cancel.clone(),
                tracker.clone(),
                move |conn| peer::serve_connection(conn, ctx.clone(), tracker2.clone()),
            ));
        }

        // Register before serving, so the first download already finds the supernode;
        // if it is down, the heartbeat loop keeps trying.
        let registered = match control.register(&store).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, supernode = %supernode_addr, "supernode not reachable at start; serving without it until it is");
                false
            }
        };
        tracker.spawn(prewarm::run(
            control.clone(),
            engine.clone(),
            store.clone(),
            cancel.clone(),
        ));
        tracker.spawn(control.clone().run(
            store.clone(),
            uploads.clone(),
            cfg.upload_slots,
            registered,
            cancel.clone(),
        ));

        // Local API.
        if let Some(parent) = cfg.api_sock.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DaemonError::Dir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        // A socket file left by a previous run would make bind fail.
        let _ = std::fs::remove_file(&cfg.api_sock);
        let listener = tokio::net::UnixListener::bind(&cfg.api_sock).map_err(|source| {
            DaemonError::BindApi {
                path: cfg.api_sock.clone(),
                source,
            }
        })?;
        // Registry mirror.
        let proxy = tokio::net::TcpListener::bind(cfg.mirror.listen)
            .await
            .map_err(|source| DaemonError::BindProxy {
                addr: cfg.mirror.listen,
                source,
            })?;
        let proxy_addr = proxy
            .local_addr()
            .map_err(|source| DaemonError::BindProxy {
                addr: cfg.mirror.listen,
                source,
            })?;
        let mirror_state =
            mirror::MirrorState::new(engine.clone(), cfg.mirror.clone(), metrics.clone())?;
        let proxy_state = proxy::ProxyState::new(
            mirror_state,
            &cfg.intercept,
            metrics.clone(),
            cancel.clone(),
            tracker.clone(),
        )?;
        tracker.spawn(proxy::serve(proxy, proxy_state));
        let app = api::router(Arc::new(api::ApiState { engine, metrics }));
        {
            let cancel = cancel.clone();
            tracker.spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await
                {
                    tracing::error!(error = %e, "local API stopped");
                }
            });
        }
        {
            let cancel = cancel.clone();
            tracker.spawn(async move {
                cancel.cancelled().await;
                endpoint.close(0u32.into(), b"daemon shutting down");
            });
        }
        tracing::info!(host = %cfg.host_id, %peer_addr, api = %cfg.api_sock.display(), supernode = %supernode_addr,
            embedded = embedded.is_some(), mirror = %proxy_addr, "dfdaemon started");
        Ok(Self {
            peer_addr,
            proxy_addr,
            api_sock: cfg.api_sock,
            supernode_addr,
            supernode_api,
            embedded,
            cancel,
            tracker,
        })
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("daemon tasks did not stop within the grace period");
        }
        if let Some(sn) = self.embedded {
            sn.shutdown().await;
        }
        let _ = std::fs::remove_file(&self.api_sock);
    }
}
