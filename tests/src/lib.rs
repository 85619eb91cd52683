//! Test harness: real `supernode`, `dfdaemon` and `dfget` processes on 127.0.0.1, a real
//! HTTP origin that counts what it sends, temp dirs, everything torn down on drop.
//!
//! The binaries are built once per test run (`cargo build` of the three packages, same
//! profile as the tests) so a test never runs a stale binary.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

pub struct Bins {
    pub supernode: PathBuf,
    pub dfdaemon: PathBuf,
    pub dfget: PathBuf,
}

/// Builds (once) and locates the binaries next to the test executable's profile dir.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "supernode",
            "-p",
            "dfdaemon",
            "-p",
            "dfget",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building binaries failed");
        Bins {
            supernode: dir.join("supernode"),
            dfdaemon: dir.join("dfdaemon"),
            dfget: dir.join("dfget"),
        }
    })
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn random_bytes(len: usize, seed: u64) -> Bytes {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    Bytes::from(v)
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free tcp port")
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

/// A child process killed on drop; its stderr goes to a log file printed on failure.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn_cmd(name: &str, cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        Self::spawn(name, cmd, log)
    }

    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdout(Stdio::null()).stderr(f).env(
            "RUST_LOG",
            std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} log tail ----\n{}", self.name, self.log_tail());
        }
    }
}

pub struct SupernodeProc {
    pub proc: Proc,
    pub control: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    config: Option<PathBuf>,
    log: PathBuf,
}

impl SupernodeProc {
    pub fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_config(data_dir, "")
    }

    /// Starts with `toml` as its config file (empty: no file).
    pub fn start_with_config(data_dir: &Path, toml: &str) -> anyhow::Result<Self> {
        let control: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        let api: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
        let log = data_dir.with_extension("log");
        let config = (!toml.is_empty())
            .then(|| -> anyhow::Result<PathBuf> {
                let path = data_dir.with_extension("toml");
                std::fs::write(&path, toml)?;
                Ok(path)
            })
            .transpose()?;
        let mut s = Self {
            proc: Self::spawn(data_dir, control, api, config.as_deref(), &log)?,
            config,
            control,
            api,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn spawn(
        data_dir: &Path,
        control: SocketAddr,
        api: SocketAddr,
        config: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&bins().supernode);
        cmd.arg("--listen")
            .arg(control.to_string())
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--data-dir")
            .arg(data_dir);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        Proc::spawn("supernode", cmd, log.to_path_buf())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(self.api, "/healthz").is_ok_and(|(s, _)| s == 200) {
                return Ok(());
            }
            if !self.proc.is_running() {
                bail!("supernode exited:\n{}", self.proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("supernode not ready:\n{}", self.proc.log_tail())
    }

    pub fn ca(&self) -> (PathBuf, PathBuf) {
        (
            self.data_dir.join("ca.pem"),
            self.data_dir.join("ca-key.pem"),
        )
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts again on the same ports and data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(
            &self.data_dir,
            self.control,
            self.api,
            self.config.as_deref(),
            &self.log,
        )?;
        self.wait_ready()
    }

    /// Value of a Prometheus counter (sum over label sets matching `labels`). Panics if
    /// the supernode does not answer, so a dead API can't pass for a zero.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (status, body) = http_get(self.api, "/metrics").expect("supernode /metrics");
        assert_eq!(status, 200, "supernode /metrics");
        parse_metric(&String::from_utf8_lossy(&body), name, labels)
    }

    pub fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = http_get(self.api, path)?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

pub struct DaemonProc {
    pub proc: Proc,
    /// The daemon's registry mirror (containerd's `hosts.toml` target).
    pub proxy_addr: SocketAddr,
    pub host_id: String,
    pub data_dir: PathBuf,
    pub sock: PathBuf,
    pub peer_addr: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
}

impl DaemonProc {
    /// A daemon attached to `supernode`, with its own data dir, socket and port.
    pub fn start(
        supernode: &SupernodeProc,
        root: &Path,
        host_id: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let data_dir = root.join(host_id);
        std::fs::create_dir_all(&data_dir)?;
        let (ca_cert, ca_key) = supernode.ca();
        let peer_addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        let sock = root.join(format!("{host_id}.sock"));
        // A test may choose the mirror's listen address; reach it on loopback either way.
        let chosen: Option<SocketAddr> = extra
            .iter()
            .position(|a| *a == "--proxy-listen")
            .and_then(|i| extra.get(i + 1))
            .and_then(|v| v.parse().ok());
        let proxy_addr: SocketAddr = match chosen {
            Some(a) => ([127, 0, 0, 1], a.port()).into(),
            None => ([127, 0, 0, 1], free_tcp_port()).into(),
        };
        let mut args: Vec<String> = Vec::new();
        if chosen.is_none() {
            args.extend(["--proxy-listen".to_string(), proxy_addr.to_string()]);
        }
        args.extend::<Vec<String>>(vec![
            "--supernode".into(),
            supernode.control.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--peer-listen".into(),
            peer_addr.to_string(),
            "--api-sock".into(),
            sock.display().to_string(),
            "--host-id".into(),
            host_id.into(),
            "--ca-cert".into(),
            ca_cert.display().to_string(),
            "--ca-key".into(),
            ca_key.display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = root.join(format!("{host_id}.log"));
        let mut d = Self {
            proc: Self::spawn(host_id, &args, &log)?,
            proxy_addr,
            host_id: host_id.into(),
            data_dir,
            sock,
            peer_addr,
            args,
            log,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn spawn(name: &str, args: &[String], log: &Path) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&bins().dfdaemon);
        cmd.args(args);
        Proc::spawn(name, cmd, log.to_path_buf())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if unix_get(&self.sock, "/healthz").is_ok_and(|(s, _)| s == 200) {
                return Ok(());
            }
            if !self.proc.is_running() {
                bail!("{} exited:\n{}", self.host_id, self.proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} not ready:\n{}", self.host_id, self.proc.log_tail())
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.host_id, &self.args, &self.log)?;
        self.wait_ready()
    }

    pub fn dfget(&self, url: &str, out: &Path, extra: &[&str]) -> Output {
        dfget_cmd(&self.sock, url, out, extra)
            .output()
            .expect("running dfget")
    }

    pub fn dfget_spawn(&self, url: &str, out: &Path, extra: &[&str]) -> Child {
        dfget_cmd(&self.sock, url, out, extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning dfget")
    }

    pub fn tasks(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = unix_get(&self.sock, "/v1/tasks")?;
        if status != 200 {
            bail!("GET /v1/tasks: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// The single task this daemon is running or ran (tests use one URL per daemon).
    pub fn task(&self) -> anyhow::Result<serde_json::Value> {
        let tasks = self.tasks()?;
        tasks
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .context("no task")
    }

    /// Value of a Prometheus counter (sum over label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let Ok((_, body)) = unix_get(&self.sock, "/metrics") else {
            return 0.0;
        };
        parse_metric(&String::from_utf8_lossy(&body), name, labels)
    }

    pub fn data_file(&self, task_id: &str) -> PathBuf {
        self.data_dir
            .join("store")
            .join("data")
            .join(format!("{task_id}.data"))
    }
}

pub fn parse_metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Fails the test with the command's stderr unless it exited 0.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn dfget_cmd(sock: &Path, url: &str, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(&bins().dfget);
    cmd.arg(url)
        .arg("-O")
        .arg(out)
        .arg("--daemon-sock")
        .arg(sock)
        .arg("--no-progress")
        .args(extra);
    cmd
}

/// Minimal HTTP/1.1 GET over TCP (Connection: close).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    raw_get(&mut s, path)
}

/// Minimal HTTP/1.1 GET over a Unix socket (Connection: close).
pub fn unix_get(sock: &Path, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    raw_get(&mut s, path)
}

fn raw_get(s: &mut (impl Read + Write), path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let mut body = buf[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line_end])?.trim(), 16)?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// An HTTP origin on loopback serving fixed files, with Range support (optional), that
/// counts every body byte it sends, its requests and the connections it accepts.
pub struct Origin {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Origin {
    pub fn start(files: HashMap<String, Bytes>, ranges: bool) -> anyhow::Result<Self> {
        Self::start_inner(files, ranges, HashMap::new(), Duration::ZERO)
    }

    /// A slow origin: waits `pace` before each body chunk of [`CHUNK`] bytes (a 1 MiB
    /// range takes 16 paces). Ranges are supported.
    pub fn start_paced(files: HashMap<String, Bytes>, pace: Duration) -> anyhow::Result<Self> {
        Self::start_inner(files, true, HashMap::new(), pace)
    }

    /// Like object storage behind a registry: a GET of a path in `redirects` answers 307 to
    /// the mapped path with a fresh signature in the query (`X-Amz-Signature=<n>`), so no
    /// two redirects name the same URL. Ranges are supported.
    pub fn start_redirecting(
        files: HashMap<String, Bytes>,
        redirects: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        Self::start_inner(files, true, redirects, Duration::ZERO)
    }

    fn start_inner(
        files: HashMap<String, Bytes>,
        ranges: bool,
        redirects: HashMap<String, String>,
        pace: Duration,
    ) -> anyhow::Result<Self> {
        let redirects = Arc::new(redirects);
        let signatures = Arc::new(AtomicU64::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let files = Arc::new(files);
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let connections = {
            let (sent, requests) = (sent.clone(), requests.clone());
            serve_http(&rt, listener, move |req| {
                requests.fetch_add(1, Ordering::Relaxed);
                let head = req.method() == hyper::Method::HEAD;
                let sent = sent.clone();
                // Count bytes as hyper pulls them for the socket, so a client
                // that hangs up early is not charged for the whole body.
                let answer = match redirects.get(req.uri().path().trim_start_matches('/')) {
                    Some(to) => {
                        let n = signatures.fetch_add(1, Ordering::Relaxed);
                        Response::builder()
                            .status(StatusCode::TEMPORARY_REDIRECT)
                            .header(
                                hyper::header::LOCATION,
                                format!("/{to}?X-Amz-Expires=60&X-Amz-Signature={n:08x}"),
                            )
                            .header(hyper::header::CONTENT_LENGTH, 0)
                            .body(Bytes::new())
                            .expect("response")
                    }
                    None => serve(&files, &req, ranges),
                };
                answer.map(move |body: Bytes| {
                    let chunks: Vec<Bytes> = if head {
                        Vec::new()
                    } else {
                        (0..body.len())
                            .step_by(CHUNK)
                            .map(|i| body.slice(i..(i + CHUNK).min(body.len())))
                            .collect()
                    };
                    let stream = futures_util::stream::iter(chunks).then(move |c| {
                        let sent = sent.clone();
                        async move {
                            if !pace.is_zero() {
                                tokio::time::sleep(pace).await;
                            }
                            sent.fetch_add(c.len() as u64, Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))
                        }
                    });
                    http_body_util::StreamBody::new(stream)
                })
            })
        };
        Ok(Self {
            addr,
            sent,
            requests,
            connections,
            _rt: rt,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Serves HTTP/1.1 on `listener` from `rt`, answering each request with `answer`.
/// Returns the count of connections accepted.
fn serve_http<B>(
    rt: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    answer: impl Fn(Request<hyper::body::Incoming>) -> Response<B> + Send + Sync + 'static,
) -> Arc<AtomicU64>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let answer = Arc::new(answer);
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let resp = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    accepted
}

/// Body chunk size of the test origin; bounds how far the byte count runs ahead of the socket.
const CHUNK: usize = 64 << 10;

fn serve(
    files: &HashMap<String, Bytes>,
    req: &Request<hyper::body::Incoming>,
    ranges: bool,
) -> Response<Bytes> {
    let path = req.uri().path().trim_start_matches('/');
    let Some(data) = files.get(path) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(hyper::header::CONTENT_LENGTH, 9)
            .body(Bytes::from_static(b"not found"))
            .expect("response");
    };
    let len = data.len() as u64;
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| ranges);
    if let Some(r) = range {
        let spec = r.trim_start_matches("bytes=");
        let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
        let start: u64 = a.parse().unwrap_or(0);
        let end: u64 = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().unwrap_or(0).min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(hyper::header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(hyper::header::CONTENT_LENGTH, 0)
                .body(Bytes::new())
                .expect("response");
        }
        return Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                hyper::header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{len}"),
            )
            .header(hyper::header::ACCEPT_RANGES, "bytes")
            .header(hyper::header::CONTENT_LENGTH, end - start + 1)
            .body(data.slice(start as usize..=end as usize))
            .expect("response");
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_LENGTH, len)
        .body(data.clone())
        .expect("response")
}

/// One HTTP/1.1 request over TCP (Connection: close): status, headers (lower-case names),
/// body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, HashMap<String, String>, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = text.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("status")?
        .parse()?;
    let hdrs: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if hdrs
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body)?;
    }
    Ok((status, hdrs, body))
}

/// A real registry (Debian's `docker-registry`, CNCF distribution) on loopback, behind a
/// TCP proxy that counts the bytes the registry sends.
pub struct Registry {
    /// Where clients (the daemons' mirrors) reach it: the counting proxy.
    pub addr: SocketAddr,
    direct: SocketAddr,
    sent: Arc<AtomicU64>,
    _proc: Proc,
}

impl Registry {
    pub fn start(dir: &Path, htpasswd: Option<&Path>) -> anyhow::Result<Self> {
        Self::start_inner(dir, &dir.join("data"), htpasswd, None)
    }

    /// A second registry process serving `of`'s storage with token auth from `tokens`
    /// (push to `of`, pull from this one).
    pub fn start_token_auth(dir: &Path, of: &Path, tokens: &TokenServer) -> anyhow::Result<Self> {
        Self::start_full(dir, &of.join("data"), None, None, Some(tokens))
    }

    /// A second registry process serving `of`'s storage over HTTPS with `cert`/`key`
    /// (push to `of`, pull from this one).
    pub fn start_tls(dir: &Path, of: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Self::start_inner(dir, &of.join("data"), None, Some((cert, key)))
    }

    fn start_inner(
        dir: &Path,
        data: &Path,
        htpasswd: Option<&Path>,
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Self> {
        Self::start_full(dir, data, htpasswd, tls, None)
    }

    fn start_full(
        dir: &Path,
        data: &Path,
        htpasswd: Option<&Path>,
        tls: Option<(&Path, &Path)>,
        tokens: Option<&TokenServer>,
    ) -> anyhow::Result<Self> {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.exists() {
            bail!(
                "/usr/bin/docker-registry missing: install Debian's docker-registry (.ci/run does)"
            );
        }
        let direct: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
        let auth = htpasswd.map_or(String::new(), |p| {
            format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                p.display()
            )
        });
        let auth = match tokens {
            Some(t) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                t.realm(),
                t.cert.display()
            ),
            None => auth,
        };
        let tls = tls.map_or(String::new(), |(c, k)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            )
        });
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {direct}\n{tls}{auth}",
            data.display()
        );
        std::fs::create_dir_all(dir)?;
        let cfg = dir.join("config.yml");
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&cfg);
        let mut proc = Proc::spawn("registry", cmd, dir.join("registry.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Any HTTP answer (an HTTPS registry answers plain HTTP with 400) means it is up.
        while http_get(direct, "/v2/").is_err() {
            if Instant::now() > deadline || !proc.is_running() {
                bail!("registry did not start:\n{}", proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let sent = Arc::new(AtomicU64::new(0));
        let addr = counting_proxy(direct, sent.clone())?;
        Ok(Self {
            addr,
            direct,
            sent,
            _proc: proc,
        })
    }

    /// Stops the registry (the proxy stays, refusing to get anywhere).
    pub fn kill(&mut self) {
        self._proc.kill();
    }

    /// Bytes the registry has sent through the proxy so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Uploads a blob (monolithic), returning its digest.
    pub fn push_blob(&self, name: &str, data: &[u8], auth: Option<&str>) -> anyhow::Result<String> {
        let digest = format!("sha256:{}", sha256_hex(data));
        let mut h = vec![];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        let (st, hdrs, _) = http_request(
            self.direct,
            "POST",
            &format!("/v2/{name}/blobs/uploads/"),
            &h,
            b"",
        )?;
        if st != 202 {
            bail!("upload start: {st}");
        }
        let loc = hdrs.get("location").context("no upload location")?;
        let loc = loc
            .split_once("://")
            .map_or(loc.as_str(), |(_, r)| r.find('/').map_or(r, |i| &r[i..]));
        let sep = if loc.contains('?') { '&' } else { '?' };
        let (st, _, body) = http_request(
            self.direct,
            "PUT",
            &format!("{loc}{sep}digest={digest}"),
            &h,
            data,
        )?;
        if st != 201 {
            bail!("upload: {st} {}", String::from_utf8_lossy(&body));
        }
        Ok(digest)
    }

    pub fn push_manifest(
        &self,
        name: &str,
        tag: &str,
        manifest: &[u8],
        auth: Option<&str>,
    ) -> anyhow::Result<String> {
        self.push_manifest_typed(
            name,
            tag,
            manifest,
            "application/vnd.oci.image.manifest.v1+json",
            auth,
        )
    }

    /// Pushes a manifest (or index) of `media_type` under `tag`; returns its digest.
    pub fn push_manifest_typed(
        &self,
        name: &str,
        tag: &str,
        manifest: &[u8],
        media_type: &str,
        auth: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut h = vec![("Content-Type", media_type)];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        let (st, _, body) = http_request(
            self.direct,
            "PUT",
            &format!("/v2/{name}/manifests/{tag}"),
            &h,
            manifest,
        )?;
        if st != 201 {
            bail!("manifest: {st} {}", String::from_utf8_lossy(&body));
        }
        Ok(format!("sha256:{}", sha256_hex(manifest)))
    }
}

/// Forwards TCP connections to `to`, counting bytes flowing back from it.
fn counting_proxy(to: SocketAddr, sent: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let sent = sent.clone();
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// A real containerd (Debian's) with its own root, state, socket and `opt` path, and the
/// CRI plugin off; driven with `ctr`.
pub struct Containerd {
    pub sock: PathBuf,
    _proc: Proc,
}

impl Containerd {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        if !Path::new("/usr/bin/containerd").exists() {
            bail!("/usr/bin/containerd missing: install Debian's containerd (.ci/run does)");
        }
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n",
            d = dir.display(),
            s = sock.display()
        );
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new("/usr/bin/containerd");
        cmd.arg("--config").arg(&cfg);
        let mut proc = Proc::spawn("containerd", cmd, dir.join("containerd.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&sock)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            if Instant::now() > deadline || !proc.is_running() {
                bail!("containerd did not start:\n{}", proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { sock, _proc: proc })
    }

    /// `ctr -a SOCK <args>`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("running ctr")
    }

    /// `ctr images pull --hosts-dir DIR REF` (unpacked with the native snapshotter).
    pub fn pull(&self, hosts_dir: &Path, reference: &str) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(hosts_dir)
            .arg(reference)
            .output()
            .expect("running ctr")
    }
}

/// A gzip'd tar layer holding one file of random bytes: (blob, diff_id of the tar).
pub fn tar_gz_layer(name: &str, len: usize, seed: u64) -> (Bytes, String) {
    let data = random_bytes(len, seed);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, name, &data[..])
        .expect("tar append");
    let tar_bytes = builder.into_inner().expect("tar finish");
    let diff_id = format!("sha256:{}", sha256_hex(&tar_bytes));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes).expect("gzip");
    (Bytes::from(gz.finish().expect("gzip finish")), diff_id)
}

/// Pushes a runnable-shaped image (3 gzip'd tar layers of random data of about
/// `layer_len` bytes each, a config whose diff_ids match, an OCI manifest) as `name:v1`;
/// returns the total size of the blobs.
pub fn push_tar_image(
    reg: &Registry,
    name: &str,
    layer_len: usize,
    seed: u64,
) -> anyhow::Result<usize> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut size = 0;
    for i in 0..3 {
        let (blob, diff_id) = tar_gz_layer(
            &format!("file{i}.bin"),
            layer_len + i * 4096,
            seed + i as u64,
        );
        let digest = reg.push_blob(name, &blob, None)?;
        size += blob.len();
        layers.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{}}}"#,
            blob.len()
        ));
        diff_ids.push(format!("\"{diff_id}\""));
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config_digest = reg.push_blob(name, config.as_bytes(), None)?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layers.join(",")
    );
    reg.push_manifest(name, "v1", manifest.as_bytes(), None)?;
    Ok(size + config.len())
}

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost, as PEM files
/// in `dir`: (ca.pem, cert.pem, key.pem).
pub fn test_server_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test registry CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "test registry");
    let cert = params.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

pub const TOKEN_SERVICE: &str = "test-registry";
pub const TOKEN_ISSUER: &str = "test-token-issuer";

/// A registry token service (the Docker token protocol, as Docker Hub, GHCR and Harbor
/// speak it): `GET /token?service=..&scope=repository:NAME:pull` with Basic credentials
/// answers a JWT (ES256, certificate in `x5c`) granting pull on NAME to known users;
/// anonymous callers get a token granting nothing; wrong credentials get 401.
pub struct TokenServer {
    pub addr: SocketAddr,
    /// The signing certificate, for the registry's `rootcertbundle`.
    pub cert: PathBuf,
    issued: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

#[derive(serde::Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

#[derive(serde::Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

impl TokenServer {
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> anyhow::Result<Self> {
        use base64::Engine as _;
        std::fs::create_dir_all(dir)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["token-signer".to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token signer");
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join("token-signer.pem");
        std::fs::write(&cert_path, cert.pem())?;
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
        let users: HashMap<String, String> = users
            .iter()
            .map(|(u, p)| {
                (
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                    ),
                    u.to_string(),
                )
            })
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let issued = Arc::new(AtomicU64::new(0));
        let state = Arc::new((users, signing, x5c, issued.clone()));
        serve_http(&rt, listener, move |req| {
            let (users, signing, x5c, issued) = &*state;
            token_answer(&req, users, signing, x5c, issued)
        });
        Ok(Self {
            addr,
            cert: cert_path,
            issued,
            _rt: rt,
        })
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Tokens granting some access handed out so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

fn token_answer(
    req: &Request<hyper::body::Incoming>,
    users: &HashMap<String, String>,
    signing: &jsonwebtoken::EncodingKey,
    x5c: &str,
    issued: &AtomicU64,
) -> Response<http_body_util::Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .expect("response")
    };
    // The GET flavour only (containerd tries an OAuth2 POST first and falls back on 405).
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"details":"GET only"}"#.into(),
        );
    }
    let query = req.uri().query().unwrap_or("");
    let scopes: Vec<String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .map(|(_, v)| {
            v.replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",")
        })
        .collect();
    let user = match req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(a) => match users.get(a) {
            Some(u) => Some(u.clone()),
            None => {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    r#"{"details":"bad credentials"}"#.into(),
                );
            }
        },
    };
    let access: Vec<Access> = match &user {
        None => Vec::new(),
        Some(_) => scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, _actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(Access {
                    kind: kind.to_string(),
                    name: name.to_string(),
                    actions: vec!["pull".to_string()],
                })
            })
            .collect(),
    };
    if !access.is_empty() {
        issued.fetch_add(1, Ordering::Relaxed);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        iss: TOKEN_ISSUER.into(),
        sub: user.unwrap_or_default(),
        aud: TOKEN_SERVICE.into(),
        exp: now + 300,
        nbf: now.saturating_sub(10),
        iat: now,
        jti: format!("{now}-{}", issued.load(Ordering::Relaxed)),
        access,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![x5c.to_string()]);
    match jsonwebtoken::encode(&header, &claims, signing) {
        Ok(t) => reply(
            StatusCode::OK,
            format!(r#"{{"token":"{t}","access_token":"{t}","expires_in":300}}"#),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(r#"{{"details":"{e}"}}"#),
        ),
    }
}

/// A containerd hosts directory for `reg`: straight to the registry, or through `mirror`
/// first (pull and resolve). Returns the directory to give `ctr --hosts-dir`.
pub fn hosts_dir(dir: &Path, reg: &Registry, mirror: Option<SocketAddr>) -> PathBuf {
    let host_dir = dir.join(reg.addr.to_string());
    std::fs::create_dir_all(&host_dir).expect("hosts dir");
    let mut toml = format!("server = \"http://{}\"\n", reg.addr);
    if let Some(m) = mirror {
        toml.push_str(&format!(
            "\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    std::fs::write(host_dir.join("hosts.toml"), toml).expect("hosts.toml");
    dir.to_path_buf()
}
