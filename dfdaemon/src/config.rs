//! Daemon configuration: a TOML file (unknown keys rejected) under command-line flags,
//! resolved into a typed [`DaemonConfig`] with every problem reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proto::HostId;
use serde::Deserialize;

use crate::download::EngineConfig;

/// Registry mirror for containerd (TCP), loopback: only this node's containerd uses it.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:65001";
/// A mirrored blob that makes no progress this long is aborted so containerd falls back.
pub const DEFAULT_MIRROR_NO_PROGRESS: Duration = Duration::from_secs(10);
/// Peer QUIC port (UDP), as in Dragonfly.
pub const DEFAULT_PEER_LISTEN: &str = "0.0.0.0:65000";
pub const DEFAULT_API_SOCK: &str = "/run/dfp2p/dfdaemon.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/dfp2p/dfdaemon";
/// Disk the piece store may use before evicting least-recently-used content.
pub const DEFAULT_QUOTA: u64 = 20 << 30;
/// Pieces kept in memory after they are written: enough for the relay window of a few
/// dozen pieces in flight through this host.
pub const DEFAULT_MEMORY_CACHE: u64 = 64 << 20;
/// Concurrent uploads of stored pieces to other daemons; more requests get `Busy` and go
/// elsewhere. Before pieces were relayed while landing, few slots won (8 hosts: 16 slots
/// 1.21 x the bound, 4 slots 1.11 x): each transfer was fast, so a new piece spread as a
/// tree. Now a new piece spreads from its lessee as it lands (its own slots,
/// `landing_upload_slots`), and stored-piece uploads matter where the landing relays do
/// not reach everyone: on 32 hosts at 25 Mbit/s (bench/swarm.sh, alternated, one build)
/// 4 slots took 115.1-117.0 s, 8 slots 110.6-112.0 s, 16 slots 106.7-108.9 s (read as
/// more uploads covering the gaps between one upload and the next, a schedule round trip
/// or a busy answer; the gaps were not measured). But on 16 hosts at 100 Mbit/s, where a few copies miss their landing
/// and come from stored pieces at the very end, 16 slots split the uplink so far that
/// 2 of 6 paired runs ended late (23.35 and 23.91 s, against 22.71-23.07 s); 8 slots
/// gave 22.73-22.99 s in 11 runs, 4 slots 22.73-23.46 s in 12. Each upload holds its
/// piece in memory, so this many pieces at most: 8 MiB for content up to 256 MiB.
pub const DEFAULT_UPLOAD_SLOTS: u32 = 8;
/// Uploads of pieces still landing from the origin at once: the supernode's default 15
/// peers on this host's origin fetch, plus one. Past it a peer is told busy, and asks
/// again shortly (the download engine's `LANDING_BUSY_ROUNDS`).
pub const DEFAULT_LANDING_UPLOAD_SLOTS: usize = 16;
/// Upper bound for `landing_upload_slots`.
pub const MAX_LANDING_UPLOAD_SLOTS: usize = 1024;
/// Upper bound for `worker_threads`: beyond it a typo, not a plan.
pub const MAX_WORKER_THREADS: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub supernode: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub peer_listen: Option<SocketAddr>,
    pub advertise_addr: Option<SocketAddr>,
    pub api_sock: Option<PathBuf>,
    pub host_id: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// e.g. "20GiB", "500MB", or a byte count.
    pub quota: Option<String>,
    /// e.g. "64MiB"; "0" keeps no pieces in memory.
    pub memory_cache: Option<String>,
    /// e.g. "4MiB" (the default); "0" keeps the kernel's default buffer.
    pub udp_receive_buffer: Option<String>,
    pub upload_slots: Option<u32>,
    pub landing_upload_slots: Option<usize>,
    /// Async worker threads; unset: one per CPU.
    pub worker_threads: Option<usize>,
    pub concurrent_pieces: Option<usize>,
    pub stall_timeout_secs: Option<u64>,
    /// Default false: see [`DaemonConfig::reuse_origin_connections`].
    pub reuse_origin_connections: Option<bool>,
    pub proxy_listen: Option<SocketAddr>,
    pub default_registry: Option<String>,
    #[serde(default)]
    pub allow_registries: Vec<String>,
    #[serde(default)]
    pub plain_http_registries: Vec<String>,
    pub mirror_no_progress_secs: Option<u64>,
    /// The daemon's own registry credentials (CRI does not send pull secrets to a
    /// mirror). Keep this file readable by root only.
    #[serde(default)]
    pub registry_credentials: Vec<RegistryCredential>,
    /// PEM CA certificates trusted for registries' TLS on top of the system's.
    #[serde(default)]
    pub registry_ca_certs: Vec<PathBuf>,
    /// Hosts (`host` for port 443, or `host:port`) whose HTTPS the proxy terminates so
    /// their pulls go through the P2P network; clients must trust the proxy CA.
    #[serde(default)]
    pub proxy_intercept_hosts: Vec<String>,
    pub proxy_ca_cert: Option<PathBuf>,
    pub proxy_ca_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone)]
pub enum SupernodeMode {
    External(SocketAddr),
    /// Run a supernode inside this process (the one-machine default).
    Embedded,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub supernode: SupernodeMode,
    pub data_dir: PathBuf,
    pub peer_listen: SocketAddr,
    pub advertise_addr: Option<SocketAddr>,
    pub api_sock: PathBuf,
    pub host_id: HostId,
    pub labels: Vec<(String, String)>,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub quota: u64,
    pub memory_cache: u64,
    /// Receive buffer of the peer socket, bytes; 0 keeps the kernel's default.
    pub udp_receive_buffer: u64,
    pub upload_slots: u32,
    /// Peers served a piece while it lands from the origin, at once; see
    /// [`DEFAULT_LANDING_UPLOAD_SLOTS`].
    pub landing_upload_slots: usize,
    /// Threads of the async runtime; `None`: one per CPU (tokio's default).
    pub worker_threads: Option<usize>,
    /// Keep origin connections open between range requests (default off: every range
    /// starts on a connection of its own). A long-lived connection keeps its congestion
    /// state, and with one per host on one origin link the split goes lopsided (swarm
    /// bench, BBR at the origin: estimates of 3.4 to 66 Mbit/s between the connections at
    /// one instant, `ss -ti`). Pieces on the slow ones straggle for seconds, and so do the
    /// peers taking them as they land. With the supernode's 16 origin fetches per task and
    /// a connection per range, ranges took 1.2-1.5 s each and 16 hosts finished in
    /// 23.2-23.6 s, against 23.6 s with kept connections. The cost is a handshake per
    /// range (two round trips with TLS, and slow start again): turn it on for a distant
    /// HTTPS origin.
    pub reuse_origin_connections: bool,
    pub engine: EngineConfig,
    pub mirror: crate::mirror::MirrorConfig,
    pub intercept: crate::proxy::InterceptConfig,
}

/// Parses "20GiB", "512MiB", "10GB", "4096" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Splits `key=value` labels.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && k.len() <= 128 && v.len() <= 128 => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("label {s:?}: expected key=value")),
    }
}

/// Flags, as parsed by the binary; `None` means "not given, use the file or default".
#[derive(Debug, Default)]
pub struct Overrides {
    pub supernode: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub peer_listen: Option<SocketAddr>,
    pub advertise_addr: Option<SocketAddr>,
    pub api_sock: Option<PathBuf>,
    pub host_id: Option<String>,
    pub labels: Vec<String>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub quota: Option<String>,
    pub memory_cache: Option<String>,
    pub udp_receive_buffer: Option<String>,
    pub upload_slots: Option<u32>,
    pub worker_threads: Option<usize>,
    pub proxy_listen: Option<SocketAddr>,
    pub default_registry: Option<String>,
    pub allow_registries: Vec<String>,
    pub plain_http_registries: Vec<String>,
    pub intercept_hosts: Vec<String>,
    pub registry_ca_certs: Vec<PathBuf>,
}

/// Reads PEM certificates (each file may hold several).
fn read_roots(paths: &[PathBuf], errors: &mut Vec<String>) -> Vec<reqwest::Certificate> {
    let mut out = Vec::new();
    for p in paths {
        match std::fs::read(p) {
            Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => out.extend(certs),
                Ok(_) => errors.push(format!("{}: no PEM certificate", p.display())),
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            },
            Err(e) => errors.push(format!("reading {}: {e}", p.display())),
        }
    }
    out
}

impl DaemonConfig {
    pub fn resolve(file: FileConfig, flags: Overrides) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let host_raw = flags.host_id.or(file.host_id).unwrap_or_else(hostname);
        let host_id = HostId::new(host_raw).unwrap_or_else(|e| {
            errors.push(e.to_string());
            HostId::new("invalid").expect("literal host id")
        });
        let mut labels: Vec<(String, String)> = file.labels.into_iter().collect();
        for l in &flags.labels {
            match parse_label(l) {
                Ok((k, v)) => {
                    labels.retain(|(k2, _)| *k2 != k);
                    labels.push((k, v));
                }
                Err(e) => errors.push(e),
            }
        }
        // A size from the flag, else the file, else the default; a bad one is reported.
        let mut size = |v: Option<String>, default: u64| {
            v.map_or(Ok(default), |q| parse_size(&q))
                .unwrap_or_else(|e| {
                    errors.push(e);
                    default
                })
        };
        let quota = size(flags.quota.or(file.quota), DEFAULT_QUOTA);
        let memory_cache = size(
            flags.memory_cache.or(file.memory_cache),
            DEFAULT_MEMORY_CACHE,
        );
        let udp_receive_buffer = size(
            flags.udp_receive_buffer.or(file.udp_receive_buffer),
            crate::udp::DEFAULT_RECEIVE_BUFFER,
        );
        if udp_receive_buffer > crate::udp::MAX_RECEIVE_BUFFER {
            errors.push("udp_receive_buffer must be at most 1GiB".into());
        }
        let upload_slots = flags
            .upload_slots
            .or(file.upload_slots)
            .unwrap_or(DEFAULT_UPLOAD_SLOTS);
        if upload_slots == 0 {
            errors.push("upload_slots must be at least 1".into());
        }
        let landing_upload_slots = file
            .landing_upload_slots
            .unwrap_or(DEFAULT_LANDING_UPLOAD_SLOTS);
        if landing_upload_slots == 0 || landing_upload_slots > MAX_LANDING_UPLOAD_SLOTS {
            errors.push(format!(
                "landing_upload_slots must be 1..={MAX_LANDING_UPLOAD_SLOTS}"
            ));
        }
        let worker_threads = flags.worker_threads.or(file.worker_threads);
        if worker_threads.is_some_and(|n| n == 0 || n > MAX_WORKER_THREADS) {
            errors.push(format!("worker_threads must be 1..={MAX_WORKER_THREADS}"));
        }
        let mut engine = EngineConfig::default();
        if let Some(c) = file.concurrent_pieces {
            if c == 0 || c > 256 {
                errors.push("concurrent_pieces must be 1..=256".into());
            }
            engine.concurrent_pieces = c.clamp(1, 256);
        }
        if let Some(s) = file.stall_timeout_secs {
            engine.stall_timeout = Duration::from_secs(s.max(1));
        }
        let mut allow = file.allow_registries;
        allow.extend(flags.allow_registries);
        let mut plain_http = file.plain_http_registries;
        plain_http.extend(flags.plain_http_registries);
        let mut ca_files = file.registry_ca_certs;
        ca_files.extend(flags.registry_ca_certs);
        let upstream_roots = read_roots(&ca_files, &mut errors);
        let mut intercept_hosts = file.proxy_intercept_hosts;
        intercept_hosts.extend(flags.intercept_hosts);
        let intercept = crate::proxy::InterceptConfig {
            hosts: intercept_hosts,
            ca_cert: file
                .proxy_ca_cert
                .unwrap_or_else(|| data_dir.join("proxy-ca.pem")),
            ca_key: file
                .proxy_ca_key
                .unwrap_or_else(|| data_dir.join("proxy-ca-key.pem")),
        };
        let mirror = crate::mirror::MirrorConfig {
            upstream_roots,
            listen: flags
                .proxy_listen
                .or(file.proxy_listen)
                .unwrap_or_else(|| DEFAULT_PROXY_LISTEN.parse().expect("const addr")),
            default_registry: flags.default_registry.or(file.default_registry),
            allow,
            plain_http,
            no_progress: file
                .mirror_no_progress_secs
                .map_or(DEFAULT_MIRROR_NO_PROGRESS, |s| {
                    Duration::from_secs(s.max(1))
                }),
            credentials: file
                .registry_credentials
                .into_iter()
                .map(|c| (c.registry, (c.username, c.password)))
                .collect(),
        };
        let cfg = Self {
            mirror,
            intercept,
            supernode: match flags.supernode.or(file.supernode) {
                Some(a) => SupernodeMode::External(a),
                None => SupernodeMode::Embedded,
            },
            peer_listen: flags
                .peer_listen
                .or(file.peer_listen)
                .unwrap_or_else(|| DEFAULT_PEER_LISTEN.parse().expect("const addr")),
            advertise_addr: flags.advertise_addr.or(file.advertise_addr),
            api_sock: flags
                .api_sock
                .or(file.api_sock)
                .unwrap_or_else(|| DEFAULT_API_SOCK.into()),
            host_id,
            labels,
            ca_cert: flags
                .ca_cert
                .or(file.ca_cert)
                .unwrap_or_else(|| data_dir.join("ca.pem")),
            ca_key: flags
                .ca_key
                .or(file.ca_key)
                .unwrap_or_else(|| data_dir.join("ca-key.pem")),
            data_dir,
            quota,
            memory_cache,
            udp_receive_buffer,
            upload_slots,
            landing_upload_slots,
            worker_threads,
            reuse_origin_connections: file.reuse_origin_connections.unwrap_or(false),
            engine,
        };
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("10 MB").unwrap(), 10_000_000);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1XB").is_err());
    }

    #[test]
    fn unknown_keys_rejected_and_errors_collected() {
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let file: FileConfig = toml::from_str(
            "quota = \"lots\"\nupload_slots = 0\nlanding_upload_slots = 0\nworker_threads = 0\nudp_receive_buffer = \"big\"",
        )
        .unwrap();
        let errs = DaemonConfig::resolve(
            file,
            Overrides {
                labels: vec!["nokey".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("landing_upload_slots")),
            "{errs:?}"
        );
        let errs = DaemonConfig::resolve(
            FileConfig::default(),
            Overrides {
                udp_receive_buffer: Some("2GiB".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("udp_receive_buffer")),
            "{errs:?}"
        );
    }

    #[test]
    fn shipped_manifest_config_is_valid() {
        let text = supernode::config::manifest_toml(
            include_str!("../../deploy/dfdaemon.yaml"),
            "dfdaemon.toml",
        );
        assert!(text.contains("udp_receive_buffer"), "{text}");
        let file: FileConfig = toml::from_str(&text).unwrap();
        let cfg = DaemonConfig::resolve(file, Overrides::default()).unwrap();
        assert_eq!(cfg.udp_receive_buffer, 4 << 20);
        assert!(text.contains("reuse_origin_connections"), "{text}");
        assert!(!cfg.reuse_origin_connections);
        let none = DaemonConfig::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert!(
            !none.reuse_origin_connections,
            "fresh connections by default"
        );
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig = toml::from_str(
            "host_id = \"a\"\nworker_threads = 2\nudp_receive_buffer = \"1MiB\"\nreuse_origin_connections = true\n[labels]\nzone = \"z1\"\nrack = \"r1\"",
        )
        .unwrap();
        let cfg = DaemonConfig::resolve(
            file,
            Overrides {
                host_id: Some("b".into()),
                worker_threads: Some(1),
                labels: vec!["zone=z2".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.host_id.as_str(), "b");
        assert_eq!(cfg.worker_threads, Some(1));
        assert_eq!(cfg.udp_receive_buffer, 1 << 20);
        assert!(cfg.reuse_origin_connections);
        assert!(cfg.labels.contains(&("zone".into(), "z2".into())));
        assert!(cfg.labels.contains(&("rack".into(), "r1".into())));
        assert!(matches!(cfg.supernode, SupernodeMode::Embedded));
    }
}
