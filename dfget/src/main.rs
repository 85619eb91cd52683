//! `dfget`: fetch a URL through the local dfdaemon (and so through the P2P network).
//!
//! Curl-like: `dfget URL -O FILE` (or stdout), `-H 'Name: value'` headers passed to the
//! origin, `--digest sha256:HEX` checked before the file appears. Output goes to a
//! temporary file next to the target and is renamed into place only when complete and
//! verified: a failed download never leaves a plausible-looking file behind.
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
use proto::api::{ApiError, DownloadRequest, ErrorKind, TASK_ID_HEADER, TaskStatus};
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
    temp: Option<PathBuf>,
    target: Option<PathBuf>,
    writer: Box<dyn Write>,
}

impl Output {
    fn open(target: Option<&Path>) -> Result<Self, Failure> {
        match target {
            None => Ok(Self {
                temp: None,
                target: None,
                writer: Box::new(std::io::stdout().lock()),
            }),
            Some(p) if p == Path::new("-") => Ok(Self {
                temp: None,
                target: None,
                writer: Box::new(std::io::stdout().lock()),
            }),
            Some(p) => {
                let name = p.file_name().ok_or_else(|| {
                    Failure::new(2, format!("{} is not a file path", p.display()))
                })?;
                let temp = p.with_file_name(format!(
                    ".{}.dfget-{}",
                    name.to_string_lossy(),
                    std::process::id()
                ));
                let f = std::fs::File::create(&temp)
                    .map_err(|e| Failure::new(7, format!("creating {}: {e}", temp.display())))?;
                Ok(Self {
                    temp: Some(temp),
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
        if let (Some(temp), Some(target)) = (self.temp.take(), self.target.take()) {
            std::fs::rename(&temp, &target)
                .map_err(|e| Failure::new(7, format!("renaming to {}: {e}", target.display())))?;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(temp) = &self.temp {
            let _ = std::fs::remove_file(temp);
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

    let mut sender = connect(&sock).await?;
    let resp = sender
        .send_request(request("POST", "/v1/download", body.into())?)
        .await
        .map_err(|e| {
            Failure::new(
                3,
                format!("daemon at {} failed the request: {e}", sock.display()),
            )
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(match serde_json::from_slice::<ApiError>(&body) {
            Ok(e) => Failure::from_api(&e),
            Err(_) => Failure::new(1, format!("daemon answered {status}")),
        });
    }
    let task_id = resp
        .headers()
        .get(TASK_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let total: Option<u64> = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());

    let mut out = Output::open(args.output.as_deref())?;
    let bar = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
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
