//! Talking to an OCI registry: image references, the auth challenge (Basic, or a Bearer
//! token from the registry's realm), and resolving a reference to a platform's blobs.
//!
//! Used by pre-warm jobs (the supernode resolves the image once and hands the daemons
//! blob URLs) and by the daemon's mirror (its own credentials for clients that send none).

use std::collections::HashMap;
use std::time::Duration;

use proto::Sha256Digest;
use proto::prewarm::Layer;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Largest manifest accepted (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;
/// What a token lives when the registry names no lifetime.
const DEFAULT_TOKEN_SECS: u64 = 60;

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    #[error("{0} not found in the registry")]
    NotFound(String),
    #[error("the registry refused the credentials for {0}")]
    Unauthorized(String),
    #[error("registry: {0}")]
    Upstream(String),
    #[error("manifest of {image}: {reason}")]
    BadManifest { image: String, reason: String },
    #[error("{image} has no manifest for platform {platform}")]
    NoPlatform { image: String, platform: String },
}

impl From<reqwest::Error> for RegistryError {
    fn from(e: reqwest::Error) -> Self {
        RegistryError::Upstream(e.to_string())
    }
}

/// `registry[:port]/repository[:tag][@sha256:...]`; a reference without a registry means
/// Docker Hub (`docker.io`, `library/` for single-component names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    /// A tag, or `sha256:<hex>`.
    pub reference: String,
}

impl std::str::FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RegistryError::BadReference(s.to_string());
        if s.is_empty() || s.len() > 512 || s.contains("://") || s.contains(char::is_whitespace) {
            return Err(bad());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.to_string())),
            None => (s, None),
        };
        let (first, tail) = rest.split_once('/').unwrap_or(("", rest));
        let is_registry = first.contains('.') || first.contains(':') || first == "localhost";
        let (registry, path) = if is_registry {
            (first.to_string(), tail.to_string())
        } else if first.is_empty() {
            ("docker.io".to_string(), format!("library/{rest}"))
        } else {
            ("docker.io".to_string(), rest.to_string())
        };
        // A tag is after the last ':' of the last path component.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
            _ => (path.clone(), None),
        };
        let reference = match (digest, tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => "latest".to_string(),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        let ref_ok = if let Some(hex) = reference.strip_prefix("sha256:") {
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        } else {
            !reference.is_empty()
                && reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !repo_ok || !ref_ok || registry.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            registry,
            repository,
            reference,
        })
    }
}

impl ImageRef {
    /// The host serving the registry API (Docker Hub's is not its name).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

/// `http` for loopback registries and those listed, else `https`.
pub fn scheme_for(registry: &str, plain_http: &[String]) -> &'static str {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || plain_http.iter().any(|r| r == registry) {
        "http"
    } else {
        "https"
    }
}

/// Splits `Bearer realm="a",service="b",scope="c,d"` into its scheme and parameters.
pub fn challenge_params(v: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        params.insert(key, value.to_string());
        rest = next.trim().trim_start_matches(',');
    }
    (scheme.to_ascii_lowercase(), params)
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// The `Authorization` value (and how long to reuse it) for pulling `repo` from a
/// registry, following its challenge: Basic with the credentials, or a Bearer token from
/// its realm (asked with the credentials, or anonymously without). `None`: the registry
/// asks for nothing (or Basic and no credentials were given).
pub async fn authorization(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    creds: Option<(&str, &str)>,
) -> Result<Option<(String, Duration)>, RegistryError> {
    let probe = http.get(format!("{base}/v2/")).send().await?;
    let Some(challenge) = probe
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return Ok(None);
    };
    let (kind, params) = challenge_params(&challenge);
    match kind.as_str() {
        "basic" => Ok(creds.map(|(u, p)| (basic(u, p), Duration::from_secs(DEFAULT_TOKEN_SECS)))),
        "bearer" => {
            let realm = params
                .get("realm")
                .ok_or_else(|| RegistryError::Upstream("bearer challenge without realm".into()))?;
            let mut url = url::Url::parse(realm)
                .map_err(|e| RegistryError::Upstream(format!("bad token realm {realm:?}: {e}")))?;
            url.query_pairs_mut()
                .append_pair("scope", &format!("repository:{repo}:pull"));
            if let Some(service) = params.get("service") {
                url.query_pairs_mut().append_pair("service", service);
            }
            let mut rb = http.get(url);
            if let Some((u, p)) = creds {
                rb = rb.header(reqwest::header::AUTHORIZATION, basic(u, p));
            }
            let resp = rb.send().await?;
            if !resp.status().is_success() {
                return Err(RegistryError::Unauthorized(repo.to_string()));
            }
            let raw = resp.bytes().await?;
            let body: serde_json::Value = serde_json::from_slice(&raw)
                .map_err(|e| RegistryError::Upstream(format!("token service answer: {e}")))?;
            let token = body["token"]
                .as_str()
                .or(body["access_token"].as_str())
                .ok_or_else(|| RegistryError::Upstream("token service answered no token".into()))?;
            // Renew a little before the registry's deadline.
            let secs = body["expires_in"]
                .as_u64()
                .unwrap_or(DEFAULT_TOKEN_SECS)
                .saturating_sub(10)
                .max(5);
            Ok(Some((format!("Bearer {token}"), Duration::from_secs(secs))))
        }
        _ => Ok(None),
    }
}

/// An image resolved for one platform.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `scheme://host` of the registry API.
    pub base: String,
    pub repository: String,
    pub manifest: Sha256Digest,
    /// Config first, then the layers in order.
    pub blobs: Vec<Layer>,
    /// What to send the registry for the blobs, if anything.
    pub authorization: Option<String>,
}

impl Resolved {
    pub fn blob_url(&self, digest: &Sha256Digest) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repository)
    }
}

async fn get_manifest(
    http: &reqwest::Client,
    url: &str,
    auth: Option<&str>,
    what: &str,
) -> Result<(Vec<u8>, Sha256Digest), RegistryError> {
    let mut rb = http.get(url);
    for t in INDEX_TYPES.iter().chain(MANIFEST_TYPES) {
        rb = rb.header(reqwest::header::ACCEPT, *t);
    }
    if let Some(a) = auth {
        rb = rb.header(reqwest::header::AUTHORIZATION, a);
    }
    let resp = rb.send().await?;
    match resp.status().as_u16() {
        200 => {}
        401 | 403 => return Err(RegistryError::Unauthorized(what.to_string())),
        404 => return Err(RegistryError::NotFound(what.to_string())),
        s => return Err(RegistryError::Upstream(format!("{what}: status {s}"))),
    }
    if resp
        .content_length()
        .is_some_and(|l| l > MAX_MANIFEST as u64)
    {
        return Err(RegistryError::BadManifest {
            image: what.to_string(),
            reason: "too large".into(),
        });
    }
    let body = resp.bytes().await?;
    if body.len() > MAX_MANIFEST {
        return Err(RegistryError::BadManifest {
            image: what.to_string(),
            reason: "too large".into(),
        });
    }
    let digest = Sha256Digest::from(Sha256::digest(&body));
    Ok((body.to_vec(), digest))
}

fn parse_digest(v: &serde_json::Value, image: &str) -> Result<Sha256Digest, RegistryError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RegistryError::BadManifest {
            image: image.to_string(),
            reason: format!("bad digest {v}"),
        })
}

/// Resolves `image` for `platform` (`os/arch[/variant]`): an index is followed to the
/// platform's manifest; every manifest fetched by digest is checked against it.
pub async fn resolve(
    http: &reqwest::Client,
    image: &ImageRef,
    platform: &str,
    plain_http: &[String],
    creds: Option<(&str, &str)>,
) -> Result<Resolved, RegistryError> {
    let name = format!("{}/{}", image.registry, image.repository);
    let base = format!(
        "{}://{}",
        scheme_for(&image.registry, plain_http),
        image.api_host()
    );
    let auth = authorization(http, &base, &image.repository, creds)
        .await?
        .map(|(a, _)| a);
    let want: Vec<&str> = platform.split('/').collect();
    let mut reference = image.reference.clone();
    for _ in 0..2 {
        let url = format!("{base}/v2/{}/manifests/{reference}", image.repository);
        let what = format!("{name}:{reference}");
        let (body, digest) = get_manifest(http, &url, auth.as_deref(), &what).await?;
        if let Ok(expected) = reference.parse::<Sha256Digest>()
            && expected != digest
        {
            return Err(RegistryError::BadManifest {
                image: what,
                reason: format!("content does not match {expected}"),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| RegistryError::BadManifest {
                image: what.clone(),
                reason: e.to_string(),
            })?;
        if let Some(list) = v["manifests"].as_array() {
            let pick = list.iter().find(|m| {
                let p = &m["platform"];
                p["os"].as_str() == want.first().copied()
                    && p["architecture"].as_str() == want.get(1).copied()
                    && want
                        .get(2)
                        .is_none_or(|var| p["variant"].as_str() == Some(*var))
            });
            let Some(m) = pick else {
                return Err(RegistryError::NoPlatform {
                    image: what,
                    platform: platform.to_string(),
                });
            };
            reference = parse_digest(&m["digest"], &what)?.to_string();
            continue;
        }
        let blob = |d: &serde_json::Value| -> Result<Layer, RegistryError> {
            Ok(Layer {
                digest: parse_digest(&d["digest"], &what)?,
                size: d["size"].as_u64().unwrap_or(0),
                media_type: d["mediaType"].as_str().unwrap_or_default().to_string(),
            })
        };
        let mut blobs = vec![blob(&v["config"])?];
        for l in v["layers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            blobs.push(blob(l)?);
        }
        if blobs.len() > proto::prewarm::MAX_LAYERS {
            return Err(RegistryError::BadManifest {
                image: what,
                reason: "too many layers".into(),
            });
        }
        return Ok(Resolved {
            base,
            repository: image.repository.clone(),
            manifest: digest,
            blobs,
            authorization: auth,
        });
    }
    Err(RegistryError::BadManifest {
        image: name,
        reason: "an index pointing at another index".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r: ImageRef = "127.0.0.1:5000/rollout/app:v1".parse().unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "rollout/app", "v1")
        );
        let r: ImageRef = "busybox".parse().unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("docker.io", "library/busybox", "latest")
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let d = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("ghcr.io/org/app@{d}").parse().unwrap();
        assert_eq!(r.reference, d);
        for bad in ["", "http://x/y", "Reg/UPPER:1", "a b", "x.io/app@sha256:zz"] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges() {
        let (k, p) = challenge_params(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(k, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (k, p) = challenge_params(r#"Basic realm="test""#);
        assert_eq!(k, "basic");
        assert_eq!(p["realm"], "test");
    }
}
