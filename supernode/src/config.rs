//! Supernode configuration: a TOML file (unknown keys rejected) under command-line flags,
//! resolved into a typed [`SupernodeConfig`] with every error reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use proto::layout::LayoutRule;

use crate::scheduler::SchedulerConfig;

/// Control plane (QUIC) port, as in Dragonfly.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8002";
/// HTTP API (health, metrics, listings).
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/dfp2p/supernode";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub api_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Registries reached over plain HTTP when resolving pre-warm images (loopback
    /// registries always are).
    #[serde(default)]
    pub plain_http_registries: Vec<String>,
    #[serde(default)]
    pub scheduler: SchedulerFile,
}

/// Shortest origin lease the renewal cadence allows.
pub const MIN_ORIGIN_LEASE_SECS: u64 = 6;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerFile {
    pub host_timeout_secs: Option<u64>,
    pub origin_lease_secs: Option<u64>,
    pub probe_lease_secs: Option<u64>,
    pub origin_leases_per_host: Option<u32>,
    pub origin_leases_per_task: Option<u32>,
    pub in_order_lookahead: Option<u32>,
    pub parents_per_piece: Option<usize>,
    pub landing_relays: Option<u32>,
    pub min_piece_size: Option<u32>,
    pub max_piece_size: Option<u32>,
    pub tail_piece_size: Option<u32>,
    pub tail_length: Option<u64>,
}

impl SchedulerFile {
    pub fn resolve(&self, errors: &mut Vec<String>) -> SchedulerConfig {
        let d = SchedulerConfig::default();
        let secs = |v: Option<u64>, def: Duration, name: &str, errors: &mut Vec<String>| match v {
            Some(0) => {
                errors.push(format!("scheduler.{name} must be > 0"));
                def
            }
            Some(s) => Duration::from_secs(s),
            None => def,
        };
        let cfg = SchedulerConfig {
            host_timeout: secs(
                self.host_timeout_secs,
                d.host_timeout,
                "host_timeout_secs",
                errors,
            ),
            origin_lease: secs(
                self.origin_lease_secs,
                d.origin_lease,
                "origin_lease_secs",
                errors,
            ),
            probe_lease: secs(
                self.probe_lease_secs,
                d.probe_lease,
                "probe_lease_secs",
                errors,
            ),
            origin_leases_per_host: self
                .origin_leases_per_host
                .unwrap_or(d.origin_leases_per_host)
                .max(1),
            origin_leases_per_task: self
                .origin_leases_per_task
                .unwrap_or(d.origin_leases_per_task)
                .max(1),
            in_order_lookahead: self.in_order_lookahead.unwrap_or(d.in_order_lookahead),
            parents_per_piece: self.parents_per_piece.unwrap_or(d.parents_per_piece).max(1),
            landing_relays: self.landing_relays.unwrap_or(d.landing_relays),
            layout: LayoutRule {
                min_piece_size: self.min_piece_size.unwrap_or(d.layout.min_piece_size),
                max_piece_size: self.max_piece_size.unwrap_or(d.layout.max_piece_size),
                tail_piece_size: self.tail_piece_size.unwrap_or(d.layout.tail_piece_size),
                tail_length: self.tail_length.unwrap_or(d.layout.tail_length),
            },
        };
        // Daemons renew the leases of live fetches every 2 s, starting 2 s into a fetch;
        // a shorter lease would lapse before the first renewal arrives.
        if self
            .origin_lease_secs
            .is_some_and(|s| (1..MIN_ORIGIN_LEASE_SECS).contains(&s))
        {
            errors.push(format!(
                "scheduler.origin_lease_secs must be >= {MIN_ORIGIN_LEASE_SECS} (daemons renew leases every 2 s)"
            ));
        }
        let range = proto::layout::MIN_PIECE_SIZE..=proto::layout::MAX_PIECE_SIZE;
        let l = &cfg.layout;
        if !range.contains(&l.min_piece_size)
            || !range.contains(&l.max_piece_size)
            || l.min_piece_size > l.max_piece_size
        {
            errors.push(format!(
                "scheduler piece sizes must satisfy {} <= min_piece_size <= max_piece_size <= {}",
                range.start(),
                range.end()
            ));
        }
        if l.tail_piece_size != 0 && !range.contains(&l.tail_piece_size) {
            errors.push(format!(
                "scheduler.tail_piece_size must be 0 (no tail) or in {}..={}",
                range.start(),
                range.end()
            ));
        }
        cfg
    }
}

/// The TOML a Kubernetes manifest carries under `data: <key>: |` (indented 4), so the
/// shipped manifests' configs are tested like any other (the daemon's tests use it too).
#[doc(hidden)]
pub fn manifest_toml(yaml: &str, key: &str) -> String {
    yaml.lines()
        .skip_while(|l| l.trim() != format!("{key}: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The resolved configuration the supernode runs with.
#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub plain_http_registries: Vec<String>,
    pub scheduler: SchedulerConfig,
}

impl SupernodeConfig {
    /// Defaults for an in-process supernode (the daemon's embedded mode): loopback,
    /// ephemeral ports.
    pub fn embedded(data_dir: PathBuf, ca_cert: PathBuf, ca_key: PathBuf) -> Self {
        Self {
            listen: ([127, 0, 0, 1], 0).into(),
            api_listen: ([127, 0, 0, 1], 0).into(),
            data_dir,
            ca_cert,
            ca_key,
            plain_http_registries: Vec::new(),
            scheduler: SchedulerConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_manifest_config_is_valid() {
        let text = manifest_toml(
            include_str!("../../deploy/supernode.yaml"),
            "supernode.toml",
        );
        assert!(text.contains("landing_relays"), "{text}");
        let file: FileConfig = toml::from_str(&text).unwrap();
        let mut errors = Vec::new();
        let cfg = file.scheduler.resolve(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.landing_relays, 15);
        assert_eq!(cfg.origin_leases_per_task, 16);
        let off: FileConfig = toml::from_str("[scheduler]\nlanding_relays = 0").unwrap();
        assert_eq!(off.scheduler.resolve(&mut errors).landing_relays, 0);
        assert!(toml::from_str::<FileConfig>("[scheduler]\nlanding_relay = 1").is_err());
        let short: FileConfig = toml::from_str("[scheduler]\norigin_lease_secs = 5").unwrap();
        let mut errors = Vec::new();
        short.scheduler.resolve(&mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }
}
