//! `dfdaemon`: parse configuration, run the daemon until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Parser;
use dfdaemon::config::{DaemonConfig, FileConfig, Overrides};

/// The dfp2p per-host daemon: piece store, P2P downloader, QUIC piece server and the
/// local API for dfget. Without --supernode it runs its own in-process supernode.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file; flags override it. Unknown keys are rejected.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Supernode control address (host:port, UDP/QUIC). Omit to run an embedded
    /// supernode in this process (the one-machine default).
    #[arg(long)]
    supernode: Option<std::net::SocketAddr>,
    /// Piece store, metadata and (embedded mode) supernode state [default: /var/lib/dfp2p/dfdaemon]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// QUIC address other daemons fetch pieces from [default: 0.0.0.0:65000]
    #[arg(long)]
    peer_listen: Option<std::net::SocketAddr>,
    /// Address announced to other daemons [default: --peer-listen, with an unspecified IP
    /// replaced by the one that routes to the supernode]
    #[arg(long)]
    advertise_addr: Option<std::net::SocketAddr>,
    /// Unix socket of the local API for dfget [default: /run/dfp2p/dfdaemon.sock]
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Host id; several daemons on one machine need distinct ids [default: the hostname]
    #[arg(long)]
    host_id: Option<String>,
    /// Host label key=value (idc, zone, rack, or anything); repeatable
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Cluster CA certificate [default: <data-dir>/ca.pem; created in embedded mode]
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Cluster CA key [default: <data-dir>/ca-key.pem; created in embedded mode]
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Disk quota of the piece store, e.g. 20GiB [default: 20GiB]
    #[arg(long)]
    quota: Option<String>,
    /// Memory for the pieces written last, served to peers without a disk read or a
    /// re-hash; 0 turns it off [default: 64MiB]
    #[arg(long)]
    memory_cache: Option<String>,
    /// Receive buffer of the QUIC peer socket, e.g. 4MiB; 0 keeps the kernel's default.
    /// Past net.core.rmem_max it needs CAP_NET_ADMIN [default: 4MiB]
    #[arg(long)]
    udp_receive_buffer: Option<String>,
    /// Concurrent uploads of stored pieces to other daemons [default: 8]
    #[arg(long)]
    upload_slots: Option<u32>,
    /// Threads running the daemon's network and piece work [default: one per CPU]. On a
    /// host shared by many daemons (or a small CPU limit), fewer threads cost less in
    /// thread hand-offs
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Registry mirror for containerd (OCI pull API), also an HTTP proxy (absolute URLs,
    /// CONNECT) [default: 127.0.0.1:65001]
    #[arg(long)]
    proxy_listen: Option<std::net::SocketAddr>,
    /// Registry used when a mirror request has no ?ns= (e.g. registry-1.docker.io)
    #[arg(long)]
    default_registry: Option<String>,
    /// Registry the mirror may reach when listening beyond loopback; repeatable
    #[arg(long = "allow-registry")]
    allow_registries: Vec<String>,
    /// Registry spoken to over plain HTTP (loopback registries always are); repeatable
    #[arg(long = "plain-http-registry")]
    plain_http_registries: Vec<String>,
    /// Host (`host` means port 443, or `host:port`) whose HTTPS the proxy terminates so
    /// its pulls go through the P2P network; clients must trust <data-dir>/proxy-ca.pem.
    /// Repeatable
    #[arg(long = "proxy-intercept")]
    intercept_hosts: Vec<String>,
    /// PEM CA certificate trusted for registries' TLS on top of the system's (a private
    /// registry's CA); repeatable
    #[arg(long = "registry-ca-cert")]
    registry_ca_certs: Vec<PathBuf>,
    /// Log one JSON object per line instead of text
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write containerd hosts.toml files that point pulls at this daemon's mirror, and
    /// print the config_path line containerd's CRI plugin needs.
    ContainerdConfig {
        /// Registry host to mirror (e.g. docker.io, ghcr.io, 10.0.0.5:5000); repeatable.
        /// Without it, a `_default` entry covers every registry.
        #[arg(long = "registry")]
        registries: Vec<String>,
        /// Directory containerd reads hosts.toml files from [default: /etc/containerd/certs.d]
        #[arg(long)]
        out: Option<PathBuf>,
        /// The mirror URL [default: http://127.0.0.1:65001]
        #[arg(long, default_value = "http://127.0.0.1:65001")]
        mirror: String,
    },
}

// Piece buffers are MiB-sized and short-lived, the memory cache holds them a few seconds
// longer: glibc hands such freed memory back to the kernel, and every new buffer then
// pays page faults and zeroing (7% of all CPU in a 16-host swarm profile). jemalloc keeps
// freed pages for reuse for a while.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::ContainerdConfig {
        registries,
        out,
        mirror,
    }) = &args.command
    {
        let out = out
            .clone()
            .unwrap_or_else(|| dfdaemon::containerd::DEFAULT_CERTS_DIR.into());
        let written = dfdaemon::containerd::write_all(&out, registries, mirror)
            .with_context(|| format!("writing hosts.toml files under {}", out.display()))?;
        for p in &written {
            eprintln!("wrote {}", p.display());
        }
        println!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"",
            out.display()
        );
        return Ok(());
    }
    supernode::init_tracing(args.log_json);
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let flags = Overrides {
        supernode: args.supernode,
        data_dir: args.data_dir,
        peer_listen: args.peer_listen,
        advertise_addr: args.advertise_addr,
        api_sock: args.api_sock,
        host_id: args.host_id,
        labels: args.labels,
        ca_cert: args.ca_cert,
        ca_key: args.ca_key,
        quota: args.quota,
        memory_cache: args.memory_cache,
        udp_receive_buffer: args.udp_receive_buffer,
        upload_slots: args.upload_slots,
        worker_threads: args.worker_threads,
        proxy_listen: args.proxy_listen,
        default_registry: args.default_registry,
        allow_registries: args.allow_registries,
        plain_http_registries: args.plain_http_registries,
        intercept_hosts: args.intercept_hosts,
        registry_ca_certs: args.registry_ca_certs,
    };
    let cfg = DaemonConfig::resolve(file, flags)
        .map_err(|errs| anyhow!("invalid configuration:\n  {}", errs.join("\n  ")))?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = cfg.worker_threads {
        runtime.worker_threads(n);
    }
    runtime
        .build()
        .context("starting the async runtime")?
        .block_on(run(cfg))
}

async fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(workers, host = %cfg.host_id, "dfdaemon starting");
    let daemon = dfdaemon::Daemon::start(cfg).await?;
    if let Some(api) = daemon.supernode_api {
        tracing::info!(%api, "embedded supernode HTTP API");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    daemon.shutdown().await;
    Ok(())
}
