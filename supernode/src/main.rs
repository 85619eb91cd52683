//! `supernode`: parse configuration, run the scheduler until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use supernode::config::{
    DEFAULT_API_LISTEN, DEFAULT_DATA_DIR, DEFAULT_LISTEN, FileConfig, SupernodeConfig,
};

/// The dfp2p scheduler: tracks tasks, piece digests and peers; picks parents; makes each
/// piece leave the origin about once.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML config file; flags override it. Unknown keys are rejected.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control-plane QUIC address (UDP) daemons connect to [default: 0.0.0.0:8002]
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// HTTP API address: /healthz, /metrics, /api/v1/tasks, /api/v1/hosts [default: 0.0.0.0:8080]
    #[arg(long)]
    api_listen: Option<std::net::SocketAddr>,
    /// Where task records (sled) and, if none is given, the cluster CA live
    /// [default: /var/lib/dfp2p/supernode]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cluster CA certificate (PEM) [default: <data-dir>/ca.pem, created if absent]
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Cluster CA key (PEM) [default: <data-dir>/ca-key.pem, created if absent]
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Log one JSON object per line instead of text
    #[arg(long)]
    log_json: bool,
}

fn resolve(args: Args) -> anyhow::Result<SupernodeConfig> {
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let mut errors = Vec::new();
    let scheduler = file.scheduler.resolve(&mut errors);
    if !errors.is_empty() {
        bail!("invalid configuration:\n  {}", errors.join("\n  "));
    }
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    Ok(SupernodeConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("const addr")),
        api_listen: args
            .api_listen
            .or(file.api_listen)
            .unwrap_or_else(|| DEFAULT_API_LISTEN.parse().expect("const addr")),
        ca_cert: args
            .ca_cert
            .or(file.ca_cert)
            .unwrap_or_else(|| data_dir.join("ca.pem")),
        ca_key: args
            .ca_key
            .or(file.ca_key)
            .unwrap_or_else(|| data_dir.join("ca-key.pem")),
        data_dir,
        plain_http_registries: file.plain_http_registries,
        scheduler,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    supernode::init_tracing(args.log_json);
    let cfg = resolve(args)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let node = supernode::Supernode::start(cfg, cancel.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}
