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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// A keep-alive HTTP/1.1 server of `content` by Range. It records how many requests
    /// each accepted connection served, so the test doesn't depend on when the client's
    /// pool takes a connection back.
    async fn range_server(content: Arc<Vec<u8>>) -> (String, Arc<Mutex<Vec<usize>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/blob", listener.local_addr().unwrap());
        let served = Arc::new(Mutex::new(Vec::new()));
        let record = served.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let conn = {
                    let mut r = record.lock().unwrap();
                    r.push(0);
                    r.len() - 1
                };
                let (record, content) = (record.clone(), content.clone());
                tokio::spawn(async move {
                    let (rd, mut wr) = sock.into_split();
                    let mut rd = BufReader::new(rd);
                    loop {
                        let mut range = None;
                        loop {
                            let mut line = String::new();
                            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=")
                            {
                                let (a, b) = r.trim().split_once('-').unwrap();
                                range = Some((
                                    a.parse::<usize>().unwrap(),
                                    b.parse::<usize>().unwrap(),
                                ));
                            }
                        }
                        let (a, b) = range.unwrap();
                        record.lock().unwrap()[conn] += 1;
                        let head = format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{b}/{}\r\n\r\n",
                            b + 1 - a,
                            content.len()
                        );
                        if wr.write_all(head.as_bytes()).await.is_err()
                            || wr.write_all(&content[a..=b]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (url, served)
    }

    /// Requests served per connection after two range fetches, one after the other.
    async fn fetch_twice(reuse: bool) -> Vec<usize> {
        let content: Arc<Vec<u8>> = Arc::new((0..8192u32).map(|i| (i % 251) as u8).collect());
        let (url, served) = range_server(content.clone()).await;
        let origin = Origin::new(&[], reuse).unwrap();
        for offset in [0usize, 4096] {
            let (data, _) = origin
                .fetch_range(&url, &HeaderMap::new(), offset as u64, 4096, |_| {})
                .await
                .unwrap();
            assert_eq!(&data[..], &content[offset..offset + 4096]);
        }
        served.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn each_range_gets_a_connection_of_its_own_unless_reuse_is_asked_for() {
        assert_eq!(fetch_twice(false).await, vec![1, 1]);
        assert!(fetch_twice(true).await.contains(&2));
    }
}
