//! The origin: plain HTTP(S) GETs, by Range where the server supports it.
//!
//! The probe asks for one byte (`Range: bytes=0-0`) rather than sending a HEAD: signed
//! URLs are often valid for GET only, and a 206 answer tells both the length (from
//! `Content-Range`) and that ranges work.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use proto::Sha256Digest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderName, HeaderValue, RANGE};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Connecting to the origin may take this long before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An origin that sends nothing for this long mid-body is treated as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum OriginError {
    #[error("origin answered {status} for {url}")]
    Status { status: u16, url: String },
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    #[error("origin protocol: {0}")]
    Protocol(String),
    #[error("bad request header {0:?}")]
    BadHeader(String),
}

/// A whole-content body being received from the origin.
pub type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, OriginError>> + Send>>;

pub struct Probe {
    pub content_length: u64,
    pub supports_range: bool,
    /// An origin without Range support answered the probe with the whole body: kept, so
    /// the content is streamed from this one request instead of being asked for twice.
    pub body: Option<BodyStream>,
}

#[derive(Clone)]
pub struct Origin {
    client: reqwest::Client,
}

pub fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, OriginError> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| OriginError::BadHeader(k.clone()))?;
        let value = HeaderValue::from_str(v).map_err(|_| OriginError::BadHeader(k.clone()))?;
        map.append(name, value);
    }
    Ok(map)
}

fn send_error(e: reqwest::Error) -> OriginError {
    // reqwest's own message ("error sending request") hides the cause (a timeout, a
    // reset); the chain names it.
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    OriginError::Unreachable(msg)
}

impl Origin {
    /// `roots`: CA certificates trusted on top of the system's (a private registry's).
    /// `reuse_connections`: keep connections open between requests; otherwise each
    /// request gets a connection of its own (see
    /// [`crate::config::DaemonConfig::reuse_origin_connections`] for when that helps).
    pub fn new(
        roots: &[reqwest::Certificate],
        reuse_connections: bool,
    ) -> Result<Self, OriginError> {
        let mut builder = reqwest::Client::builder();
        for r in roots {
            builder = builder.add_root_certificate(r.clone());
        }
        if !reuse_connections {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            // The daemon is not a browser: no proxy settings from the environment leak in
            // between it and the origin unless configured (and none is, yet).
            .no_proxy()
            .build()
            .map_err(|e| OriginError::Protocol(e.to_string()))?;
        Ok(Self { client })
    }

    pub async fn probe(&self, url: &str, headers: &HeaderMap) -> Result<Probe, OriginError> {
        let resp = self
            .client
            .get(url)
            .headers(headers.clone())
            .header(RANGE, "bytes=0-0")
            .send()
            .await
            .map_err(send_error)?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                let total = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit_once('/'))
                    .and_then(|(_, total)| total.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        OriginError::Protocol("206 without a usable Content-Range".into())
                    })?;
                Ok(Probe {
                    content_length: total,
                    supports_range: true,
                    body: None,
                })
            }
            200 => {
                let len = resp
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        OriginError::Protocol(
                            "origin sent neither a range nor a Content-Length".into(),
                        )
                    })?;
                Ok(Probe {
                    content_length: len,
                    supports_range: false,
                    body: Some(Box::pin(resp.bytes_stream().map(|c| c.map_err(send_error)))),
                })
            }
            // Range on an empty file.
            416 => Ok(Probe {
                content_length: 0,
                supports_range: true,
                body: None,
            }),
            _ => Err(OriginError::Status {
                status,
                url: url.to_string(),
            }),
        }
    }

    /// Fetches exactly `len` bytes at `offset` by Range, hashing them as they arrive;
    /// `on_chunk` sees each chunk as it comes (to relay it while the rest lands).
    pub async fn fetch_range(
        &self,
        url: &str,
        headers: &HeaderMap,
        offset: u64,
        len: u32,
        mut on_chunk: impl FnMut(&Bytes),
    ) -> Result<(Bytes, Sha256Digest), OriginError> {
        let last = offset + u64::from(len) - 1;
        let resp = self
            .client
            .get(url)
            .headers(headers.clone())
            .header(RANGE, format!("bytes={offset}-{last}"))
            .send()
            .await
            .map_err(send_error)?;
        let status = resp.status().as_u16();
        if status != 206 {
            return Err(OriginError::Status {
                status,
                url: url.to_string(),
            });
        }
        let mut buf = crate::store::piece_buffer(len as usize);
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(send_error)?;
            if buf.len() + chunk.len() > len as usize {
                return Err(OriginError::Protocol(format!(
                    "range answer longer than {len} bytes"
                )));
            }
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
            on_chunk(&chunk);
        }
        if buf.len() != len as usize {
            return Err(OriginError::Protocol(format!(
                "range answer of {} bytes, wanted {len}",
                buf.len()
            )));
        }
        Ok((buf.freeze(), Sha256Digest::from(hasher.finalize())))
    }

    /// The whole body, for origins without Range support.
    pub async fn fetch_all(
        &self,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<BodyStream, OriginError> {
        let resp = self
            .client
            .get(url)
            .headers(headers.clone())
            .send()
            .await
            .map_err(send_error)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(OriginError::Status {
                status,
                url: url.to_string(),
            });
        }
        Ok(Box::pin(resp.bytes_stream().map(|c| c.map_err(send_error))))
    }
}
