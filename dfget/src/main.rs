//! `dfget`: fetch a URL through the local dfdaemon (and so through the P2P network).
//!
//! Curl-like: `dfget URL -O FILE` (or stdout), `-H 'Name: value'` headers passed to the
//! origin, `--digest sha256:HEX` checked before the file appears. Output goes to a
//! temporary file next to the target and is renamed into place only when complete and
//! verified: a failed download never leaves a plausible-looking file behind.
//!
//! With `-O FILE` the bytes do not cross the daemon's socket: the daemon downloads into
//! its store and hands over its verified data file, which becomes FILE by a hard link
//! (same filesystem; FILE then shares the daemon's copy, which the daemon never rewrites
//! in place) or by a kernel-side copy. Where the daemon's file can't be opened from here
//! (another user, an older daemon), the content is streamed as for stdout.
//!
//! Exit codes: 0 ok; 1 other failure; 2 usage; 3 daemon not reachable; 4 origin error
//! (404, unreachable); 5 digest mismatch; 6 stalled; 7 local storage (disk full, quota).
//!
//! `dfget prewarm IMAGE --supernode URL ...` is the rollout hook ([`prewarm`]).
#![forbid(unsafe_code)]

mod prewarm;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use proto::Sha256Digest;
use proto::api::{
    ApiError, CONTENT_LENGTH_HEADER, DownloadRequest, ErrorKind, FileProgress, TASK_ID_HEADER,
    TaskStatus,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const DEFAULT_DAEMON_SOCK: &str = "/run/dfp2p/dfdaemon.sock";

/// Download a URL through the P2P network (the local dfdaemon), or pre-warm an image on
/// a set of nodes (`dfget prewarm --help`).
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// URL to fetch (http or https)
    url: Option<String>,
    /// Write to FILE instead of stdout ("-" is stdout)
    #[arg(short = 'O', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Expected sha256 of the content (sha256:HEX or HEX); checked before FILE appears
    #[arg(long)]
    digest: Option<String>,
    /// Header sent to the origin, "Name: value"; repeatable
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// The daemon's API socket [default: /run/dfp2p/dfdaemon.sock]
    #[arg(long)]
    daemon_sock: Option<PathBuf>,
    /// Never draw a progress bar (one is drawn only when stderr is a terminal)
    #[arg(long)]
    no_progress: bool,
    /// TOML config file (keys: daemon_sock); flags override it. Unknown keys are rejected.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Pre-warm an image on nodes through the P2P network and wait for it (the hook a
    /// rollout calls before each batch)
    Prewarm(prewarm::PrewarmArgs),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    daemon_sock: Option<PathBuf>,
}

/// A failure, printed as one line, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn from_api(e: &ApiError) -> Self {
        let code = match e.kind {
            ErrorKind::BadRequest => 2,
            ErrorKind::OriginStatus | ErrorKind::OriginUnreachable => 4,
            ErrorKind::DigestMismatch => 5,
            ErrorKind::Stalled => 6,
            ErrorKind::Storage => 7,
            ErrorKind::Internal => 1,
        };
        Self::new(code, e.message.clone())
    }
}

fn parse_header(h: &str) -> Result<(String, String), Failure> {
    match h.split_once(':') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(Failure::new(
            2,
            format!("header {h:?} is not \"Name: value\""),
        )),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(sock: &Path) -> Result<Sender, Failure> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Failure::new(
            3,
            format!("daemon not reachable at {}: {e}", sock.display()),
        )
    };
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| unreachable(&e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    // The connection task ends when the sender and response are dropped.
    tokio::spawn(conn);
    Ok(sender)
}

fn request(method: &str, path: &str, body: Bytes) -> Result<Request<Full<Bytes>>, Failure> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "dfdaemon")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| Failure::new(1, e.to_string()))
}

/// Why did the stream of task `id` break? Asks the daemon; falls back to `fallback`.
async fn explain(sock: &Path, id: &str, fallback: String) -> Failure {
    let status = async {
        let mut s = connect(sock).await.ok()?;
        let resp = s
            .send_request(request("GET", &format!("/v1/tasks/{id}"), Bytes::new()).ok()?)
            .await
            .ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<TaskStatus>(&body).ok()
    };
    match status.await.and_then(|s| s.error) {
        Some(e) => Failure::from_api(&e),
        None => Failure::new(1, fallback),
    }
}

struct Output {
    /// Removed if the download does not finish.
    temp: RemoveOnDrop,
    target: Option<PathBuf>,
    writer: Box<dyn Write>,
}

impl Output {
    fn open(target: Option<&Path>) -> Result<Self, Failure> {
        match target {
            None => Ok(Self {
                temp: RemoveOnDrop(None),
                target: None,
                writer: Box::new(std::io::stdout().lock()),
            }),
            Some(p) if p == Path::new("-") => Ok(Self {
                temp: RemoveOnDrop(None),
                target: None,
                writer: Box::new(std::io::stdout().lock()),
            }),
            Some(p) => {
                let temp = temp_name(p)?;
                let f = std::fs::File::create(&temp)
                    .map_err(|e| Failure::new(7, format!("creating {}: {e}", temp.display())))?;
                Ok(Self {
                    temp: RemoveOnDrop(Some(temp)),
                    target: Some(p.to_path_buf()),
                    writer: Box::new(std::io::BufWriter::with_capacity(1 << 20, f)),
                })
            }
        }
    }

    fn finish(mut self) -> Result<(), Failure> {
        self.writer
            .flush()
            .map_err(|e| Failure::new(7, format!("writing output: {e}")))?;
        if let (Some(temp), Some(target)) = (self.temp.0.take(), self.target.take()) {
            std::fs::rename(&temp, &target)
                .map_err(|e| Failure::new(7, format!("renaming to {}: {e}", target.display())))?;
        }
        Ok(())
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Sends `body` to the daemon's `path` on a new connection.
async fn post(
    sock: &Path,
    path: &str,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, Failure> {
    let mut sender = connect(sock).await?;
    sender
        .send_request(request("POST", path, body)?)
        .await
        .map_err(|e| {
            Failure::new(
                3,
                format!("daemon at {} failed the request: {e}", sock.display()),
            )
        })
}

fn header<'a, B>(resp: &'a hyper::Response<B>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The error a non-2xx answer of the daemon stands for.
async fn error_of(resp: hyper::Response<hyper::body::Incoming>) -> Failure {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match serde_json::from_slice::<ApiError>(&body) {
        Ok(e) => Failure::from_api(&e),
        Err(_) => Failure::new(1, format!("daemon answered {status}")),
    }
}

enum Placed {
    Done,
    Unavailable,
}

/// Has the daemon download into its store and puts the verified data file at `target`
/// by a hard link (no copy at all) or, across filesystems, a kernel-side copy. The bytes
/// never cross the socket. The link shares the daemon's inode: the daemon never rewrites
/// a file that has other names (it starts such a task over in a new file instead).
async fn fetch_to_file(
    sock: &Path,
    body: Bytes,
    target: &Path,
    show_progress: bool,
) -> Result<Placed, Failure> {
    let resp = post(sock, "/v1/download/file", body).await?;
    if resp.status() == hyper::StatusCode::NOT_FOUND {
        return Ok(Placed::Unavailable);
    }
    if !resp.status().is_success() {
        return Err(error_of(resp).await);
    }
    let task_id = header(&resp, TASK_ID_HEADER).unwrap_or("").to_string();
    let total: u64 = header(&resp, CONTENT_LENGTH_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bar = show_progress.then(|| progress_bar(total));
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    loop {
        let Some(frame) = body.frame().await else {
            return Err(explain(sock, &task_id, "daemon ended the answer early".into()).await);
        };
        let frame = frame.map_err(|e| Failure::new(1, format!("download interrupted: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let msg: FileProgress = serde_json::from_slice(&line)
                .map_err(|e| Failure::new(1, format!("bad answer from the daemon: {e}")))?;
            match msg {
                FileProgress::Ready { bytes } => {
                    if let Some(b) = &bar {
                        b.set_position(bytes);
                    }
                }
                FileProgress::Failed(e) => return Err(Failure::from_api(&e)),
                FileProgress::Done { path, length } => {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    // The daemon holds the file until this connection closes, i.e.
                    // until `body` is dropped after placing it.
                    let placed = place(&path, target, length)?;
                    drop(body);
                    return Ok(placed);
                }
            }
        }
        if pending.len() > 64 << 10 {
            return Err(Failure::new(1, "bad answer from the daemon: line too long"));
        }
    }
}

/// Puts `src` (`length` bytes) at `target` through a temporary name next to it.
fn place(src: &Path, target: &Path, length: u64) -> Result<Placed, Failure> {
    let temp = temp_name(target)?;
    let _ = std::fs::remove_file(&temp);
    let mut guard = RemoveOnDrop(Some(temp.clone()));
    if std::fs::hard_link(src, &temp).is_err() {
        let Ok(from) = std::fs::File::open(src) else {
            return Ok(Placed::Unavailable);
        };
        let mut to = std::fs::File::create(&temp)
            .map_err(|e| Failure::new(7, format!("creating {}: {e}", temp.display())))?;
        // File to file: std uses copy_file_range, so the copy stays in the kernel.
        std::io::copy(&mut std::io::Read::take(&from, length), &mut to)
            .map_err(|e| Failure::new(7, format!("writing {}: {e}", temp.display())))?;
    }
    let got = std::fs::metadata(&temp)
        .map_err(|e| Failure::new(7, format!("reading {}: {e}", temp.display())))?
        .len();
    if got != length {
        return Err(Failure::new(
            1,
            format!("the daemon's file has {got} bytes, expected {length}"),
        ));
    }
    std::fs::rename(&temp, target)
        .map_err(|e| Failure::new(7, format!("renaming to {}: {e}", target.display())))?;
    guard.0 = None;
    // A rename onto another name of the same file (FILE was linked by an earlier run)
    // succeeds without removing the temporary name.
    let _ = std::fs::remove_file(&temp);
    Ok(Placed::Done)
}

/// The temporary name next to `target` that output is written under until complete.
fn temp_name(target: &Path) -> Result<PathBuf, Failure> {
    let name = target
        .file_name()
        .ok_or_else(|| Failure::new(2, format!("{} is not a file path", target.display())))?;
    Ok(target.with_file_name(format!(
        ".{}.dfget-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    if let Some(Command::Prewarm(p)) = args.command {
        return prewarm::run(p).await;
    }
    let Some(url) = args.url.clone() else {
        return Err(Failure::new(2, "a URL to fetch is required (see --help)"));
    };
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Failure::new(2, format!("reading {}: {e}", p.display())))?;
            toml::from_str(&text)
                .map_err(|e| Failure::new(2, format!("parsing {}: {e}", p.display())))?
        }
        None => FileConfig::default(),
    };
    let sock = args
        .daemon_sock
        .or(file.daemon_sock)
        .unwrap_or_else(|| DEFAULT_DAEMON_SOCK.into());
    let digest = match &args.digest {
        Some(d) => Some(
            d.parse::<Sha256Digest>()
                .map_err(|e| Failure::new(2, e.to_string()))?,
        ),
        None => None,
    };
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    let req = DownloadRequest {
        url,
        headers,
        digest,
        content_addressed: false,
    };
    let body = serde_json::to_vec(&req).map_err(|e| Failure::new(1, e.to_string()))?;
    let show_progress = !args.no_progress && std::io::stderr().is_terminal();

    if let Some(target) = args.output.as_deref().filter(|p| *p != Path::new("-")) {
        match fetch_to_file(&sock, body.clone().into(), target, show_progress).await? {
            Placed::Done => return Ok(()),
            // The daemon's file is not reachable from here (another user, an older
            // daemon): have the bytes streamed instead.
            Placed::Unavailable => {}
        }
    }

    let resp = post(&sock, "/v1/download", body.into()).await?;
    if !resp.status().is_success() {
        return Err(error_of(resp).await);
    }
    let task_id = header(&resp, TASK_ID_HEADER).unwrap_or("").to_string();
    let total: Option<u64> =
        header(&resp, hyper::header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok());

    let mut out = Output::open(args.output.as_deref())?;
    let bar = show_progress.then(|| progress_bar(total.unwrap_or(0)));
    // Hash only when there is something to check: the daemon already verified every piece.
    let mut hasher = digest.map(|_| Sha256::new());
    let mut received = 0u64;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Err(explain(&sock, &task_id, format!("download interrupted: {e}")).await);
            }
        };
        if let Ok(data) = frame.into_data() {
            if let Some(h) = hasher.as_mut() {
                h.update(&data);
            }
            received += data.len() as u64;
            out.writer
                .write_all(&data)
                .map_err(|e| Failure::new(7, format!("writing output: {e}")))?;
            if let Some(b) = &bar {
                b.set_position(received);
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(t) = total
        && received != t
    {
        return Err(explain(
            &sock,
            &task_id,
            format!("download ended after {received} of {t} bytes"),
        )
        .await);
    }
    if let (Some(want), Some(h)) = (digest, hasher) {
        let actual = Sha256Digest::from(h.finalize());
        if actual != want {
            return Err(Failure::new(
                5,
                format!("digest mismatch: expected {want}, got {actual}"),
            ));
        }
    }
    out.finish()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("dfget: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
