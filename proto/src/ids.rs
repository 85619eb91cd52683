//! Identities. Each is a newtype so a host id can't be passed where a task id belongs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Longest host id accepted (a DNS name is at most 253 bytes).
pub const MAX_HOST_ID_LEN: usize = 253;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("expected 64 hex characters, got {0} characters")]
    HexLength(usize),
    #[error("not hexadecimal")]
    NotHex,
    #[error("digest must look like sha256:<64 hex>, got {0:?}")]
    DigestFormat(String),
    #[error("host id must be 1..={MAX_HOST_ID_LEN} bytes of [A-Za-z0-9._-], got {0:?}")]
    HostId(String),
}

fn parse_hex32(s: &str) -> Result<[u8; 32], IdError> {
    if s.len() != 64 {
        return Err(IdError::HexLength(s.len()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| IdError::NotHex)?;
    Ok(out)
}

macro_rules! hex32_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            pub fn from_hex(s: &str) -> Result<Self, IdError> {
                parse_hex32(s).map(Self)
            }
        }

        // Human-readable formats (JSON for the HTTP APIs) carry hex; binary ones raw bytes.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_string())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(d).map(Self)
                }
            }
        }
    };
}

/// Identity of a piece of content being distributed: every daemon that asks for the same
/// content derives the same id, wherever it got the URL from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId([u8; 32]);
hex32_newtype!(TaskId);

impl TaskId {
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// A plain URL task: the URL with the given query parameters removed (signed-URL
    /// parameters must not split one file into many tasks), plus the expected digest when
    /// the caller knows it, so two different files behind one URL never share pieces.
    pub fn for_url(url: &str, filtered_query: &[&str], digest: Option<&Sha256Digest>) -> Self {
        let canonical = canonical_url(url, filtered_query);
        let mut h = Sha256::new();
        h.update(b"url\0");
        h.update(canonical.as_bytes());
        if let Some(d) = digest {
            h.update(b"\0digest\0");
            h.update(d.0);
        }
        Self(h.finalize().into())
    }

    /// Content addressed by its sha256 (OCI blobs): the digest is the identity, whichever
    /// registry, mirror or redirect served it.
    pub fn for_content(digest: &Sha256Digest) -> Self {
        let mut h = Sha256::new();
        h.update(b"content\0");
        h.update(digest.0);
        Self(h.finalize().into())
    }
}

/// Drops the named query parameters and the fragment; keeps everything else byte-for-byte.
fn canonical_url(url: &str, filtered_query: &[&str]) -> String {
    let url = url.split('#').next().unwrap_or(url);
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let key = kv.split('=').next().unwrap_or("");
            !kv.is_empty() && !filtered_query.contains(&key)
        })
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", &self.to_hex()[..12])
    }
}

impl FromStr for TaskId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::from_hex(s)
    }
}

/// A sha256 digest of a piece or of a whole content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);
hex32_newtype!(Sha256Digest);

impl Sha256Digest {
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }
}

impl From<sha2::digest::Output<Sha256>> for Sha256Digest {
    fn from(o: sha2::digest::Output<Sha256>) -> Self {
        Self(o.into())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.to_hex()[..12])
    }
}

/// Accepts `sha256:<hex>` (the OCI form) or bare hex.
impl FromStr for Sha256Digest {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let hex = match s.split_once(':') {
            Some(("sha256", h)) => h,
            Some(_) => return Err(IdError::DigestFormat(s.to_string())),
            None => s,
        };
        parse_hex32(hex)
            .map(Self)
            .map_err(|_| IdError::DigestFormat(s.to_string()))
    }
}

/// A daemon's host identity (hostname by default). Several daemons on one machine need
/// distinct ids. Restricted to DNS-ish characters so it is safe in logs, paths and labels.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostId(String);

impl HostId {
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_HOST_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if ok {
            Ok(Self(s))
        } else {
            Err(IdError::HostId(s))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HostId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostId::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({})", self.0)
    }
}

impl FromStr for HostId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

/// One run of a daemon process. A new session for a known host tells the supernode that
/// whatever it believed about that host's pieces is stale until re-announced.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct SessionId(pub u64);

/// Index of a piece within its task's layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct PieceIndex(pub u32);

impl fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_query_params_do_not_change_task_id() {
        let a = TaskId::for_url(
            "http://o/f?X-Amz-Signature=1&v=2",
            &["X-Amz-Signature"],
            None,
        );
        let b = TaskId::for_url(
            "http://o/f?v=2&X-Amz-Signature=9",
            &["X-Amz-Signature"],
            None,
        );
        let c = TaskId::for_url("http://o/f?v=3", &["X-Amz-Signature"], None);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn digest_changes_task_id() {
        let d = Sha256Digest::of(b"x");
        assert_ne!(
            TaskId::for_url("http://o/f", &[], None),
            TaskId::for_url("http://o/f", &[], Some(&d))
        );
    }

    #[test]
    fn digest_parse_forms() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(d.to_string().parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(d.to_hex().parse::<Sha256Digest>().unwrap(), d);
        assert!("md5:abcd".parse::<Sha256Digest>().is_err());
        assert!("sha256:zz".parse::<Sha256Digest>().is_err());
    }

    #[test]
    fn host_id_rejects_odd_characters() {
        assert!(HostId::new("node-1.zone_a").is_ok());
        assert!(HostId::new("").is_err());
        assert!(HostId::new("a/b").is_err());
        assert!(HostId::new("x".repeat(254)).is_err());
    }
}
