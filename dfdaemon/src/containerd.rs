//! `dfdaemon containerd-config`: the `hosts.toml` files that point containerd at this
//! daemon's registry mirror.
//!
//! Each file names the mirror with explicit `capabilities = ["pull", "resolve"]` (a host
//! entry without a capabilities line gets push rights too) and the upstream as `server`,
//! so containerd falls back to the registry itself when the mirror refuses a connection.

use std::path::{Path, PathBuf};

/// Where containerd's CRI plugin looks when `config_path` points here.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";

/// The upstream URL containerd should fall back to for a registry host (loopback
/// registries over HTTP; Docker Hub's API lives on another host than its name).
fn server_url(registry: &str) -> String {
    let host = if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    };
    format!(
        "{}://{host}",
        supernode::registry::scheme_for(registry, &[])
    )
}

/// `hosts.toml` content for `registry` (`None`: the `_default` entry for every registry).
pub fn hosts_toml(registry: Option<&str>, mirror: &str) -> String {
    let server = registry.map_or(String::new(), |r| {
        format!("server = \"{}\"\n\n", server_url(r))
    });
    format!(
        "# Written by `dfdaemon containerd-config`: pulls go through the local dfdaemon mirror,\n\
         # and straight to the registry when the mirror refuses the connection.\n\
         {server}[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Writes one `hosts.toml` per registry (or `_default`) under `out`; returns the paths.
pub fn write_all(out: &Path, registries: &[String], mirror: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let entries: Vec<Option<&str>> = if registries.is_empty() {
        vec![None]
    } else {
        registries.iter().map(|r| Some(r.as_str())).collect()
    };
    for r in entries {
        let dir_name = r.unwrap_or("_default");
        if dir_name.contains('/') || dir_name.contains("..") || dir_name.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid registry host {dir_name:?}"),
            ));
        }
        let dir = out.join(dir_name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("hosts.toml");
        std::fs::write(&path, hosts_toml(r, mirror))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_valid_toml_with_explicit_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let regs = vec![
            "docker.io".to_string(),
            "127.0.0.1:5000".to_string(),
            "ghcr.io".to_string(),
        ];
        let paths = write_all(dir.path(), &regs, "http://127.0.0.1:65001").unwrap();
        assert_eq!(paths.len(), 3);
        let parsed: Vec<toml::Value> = paths
            .iter()
            .map(|p| toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect();
        assert_eq!(
            parsed[0]["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
        assert_eq!(parsed[1]["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert_eq!(parsed[2]["server"].as_str(), Some("https://ghcr.io"));
        let caps = &parsed[2]["host"]["http://127.0.0.1:65001"]["capabilities"];
        assert_eq!(caps.as_array().unwrap().len(), 2);
        let default = write_all(dir.path(), &[], "http://127.0.0.1:65001").unwrap();
        assert!(default[0].ends_with("_default/hosts.toml"));
        assert!(write_all(dir.path(), &["../etc".to_string()], "m").is_err());
    }
}
