//! `dfget prewarm`: the rollout hook. Creates a pre-warm job on the supernode (or finds
//! the one already running for the same spec), then optionally waits for the whole job or
//! for one batch to be warm, showing progress.
//!
//! Exit codes: 0 warm (or, without `--wait`/`--batch`, the job was accepted); 2 usage or a
//! target the supernode rejects (unknown host, selector matching nothing); 3 supernode not
//! reachable; 4 image or registry problem (not found, refused credentials, no such
//! platform); 8 hosts failed or timed out (each listed with its reason).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::HostId;
use proto::prewarm::{HostState, JobState, JobStatus, PrewarmSpec, RegistryAuth, Targets};

use crate::Failure;

/// Pre-warm an image on a set of nodes through the P2P network, and wait for it.
#[derive(clap::Args, Debug)]
pub struct PrewarmArgs {
    /// Image reference, e.g. registry.example.com/team/app:v2
    pub image: String,
    /// Supernode HTTP API, e.g. http://supernode:8080
    #[arg(long, env = "DFP2P_SUPERNODE")]
    pub supernode: String,
    /// Target host ids, comma-separated
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["selector", "batches"])]
    pub hosts: Vec<String>,
    /// Target every host with these labels, e.g. zone=z1,role=web
    #[arg(long, value_delimiter = ',', conflicts_with = "batches")]
    pub selector: Vec<String>,
    /// File of ordered batches: one batch per line, host ids separated by commas or spaces
    #[arg(long)]
    pub batches: Option<PathBuf>,
    /// With --hosts or --selector: batch sizes in rollout order, e.g. 1,5,10 (the last
    /// size repeats)
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<u32>,
    /// os/arch[/variant] [default: linux/amd64]
    #[arg(long)]
    pub platform: Option<String>,
    /// Hosts warmed at once within a batch [default: 64]
    #[arg(long)]
    pub parallelism: Option<u32>,
    /// Whole-job deadline, e.g. 90s, 10m, 1h [default: 30m]
    #[arg(long)]
    pub timeout: Option<String>,
    /// Wait until every target is warm
    #[arg(long, conflicts_with = "batch")]
    pub wait: bool,
    /// Wait until batch K (1-based) is warm: the hook before rollout batch K
    #[arg(long, value_name = "K")]
    pub batch: Option<usize>,
    /// Registry user for a private image (password from DFP2P_REGISTRY_PASSWORD)
    #[arg(long)]
    pub username: Option<String>,
    /// Never draw a progress bar
    #[arg(long)]
    pub no_progress: bool,
}

/// `90`, `90s`, `10m`, `1h` -> seconds.
fn parse_duration(s: &str) -> Result<u64, Failure> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| Failure::new(2, format!("duration {s:?}: expected e.g. 90s, 10m, 1h")))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(Failure::new(
                2,
                format!("duration {s:?}: unit must be s, m or h"),
            ));
        }
    };
    Ok(n * mult)
}

fn host_ids(names: impl IntoIterator<Item = String>) -> Result<Vec<HostId>, Failure> {
    names
        .into_iter()
        .map(|h| HostId::new(h.trim()).map_err(|e| Failure::new(2, e.to_string())))
        .collect()
}

fn spec(a: &PrewarmArgs) -> Result<PrewarmSpec, Failure> {
    let targets = if !a.hosts.is_empty() {
        Targets::Hosts(host_ids(a.hosts.iter().cloned())?)
    } else if !a.selector.is_empty() {
        let mut sel = BTreeMap::new();
        for kv in &a.selector {
            let (k, v) = kv
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Failure::new(2, format!("selector {kv:?}: expected key=value")))?;
            sel.insert(k.to_string(), v.to_string());
        }
        Targets::Selector(sel)
    } else if let Some(path) = &a.batches {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::new(2, format!("reading {}: {e}", path.display())))?;
        let mut batches = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            batches.push(host_ids(
                line.split([',', ' ', '\t'])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            )?);
        }
        Targets::Batches(batches)
    } else {
        return Err(Failure::new(
            2,
            "name the targets: --hosts a,b, --selector k=v or --batches FILE",
        ));
    };
    let credentials = match &a.username {
        Some(u) => Some(RegistryAuth {
            username: u.clone(),
            password: std::env::var("DFP2P_REGISTRY_PASSWORD").map_err(|_| {
                Failure::new(
                    2,
                    "--username needs the password in DFP2P_REGISTRY_PASSWORD",
                )
            })?,
        }),
        None => None,
    };
    Ok(PrewarmSpec {
        image: a.image.clone(),
        platform: a.platform.clone(),
        targets,
        batch_sizes: a.batch_sizes.clone(),
        parallelism: a.parallelism,
        timeout_secs: a.timeout.as_deref().map(parse_duration).transpose()?,
        credentials,
    })
}

fn api_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Sends a request to the supernode: its status and body, or exit 3 if it can't be asked.
async fn exchange(
    rb: reqwest::RequestBuilder,
    base: &str,
) -> Result<(reqwest::StatusCode, bytes::Bytes), Failure> {
    let resp = rb
        .send()
        .await
        .map_err(|e| Failure::new(3, format!("supernode not reachable at {base}: {e}")))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| Failure::new(3, format!("supernode at {base}: {e}")))?;
    Ok((status, body))
}

async fn get_status(http: &reqwest::Client, base: &str, id: &str) -> Result<JobStatus, Failure> {
    let (status, body) = exchange(http.get(format!("{base}/api/v1/prewarm/{id}")), base).await?;
    if !status.is_success() {
        return Err(Failure::new(1, format!("job {id}: {}", api_message(&body))));
    }
    serde_json::from_slice(&body).map_err(|e| Failure::new(1, format!("job status: {e}")))
}

/// One line: per batch, how many hosts are warm, warming, failed.
fn summary(s: &JobStatus) -> String {
    let n = s.batches.len();
    s.batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let count = |st| b.hosts.iter().filter(|h| h.state == st).count();
            let bytes: u64 = b
                .hosts
                .iter()
                .flat_map(|h| &h.layers)
                .map(|l| l.bytes)
                .sum();
            let total: u64 = s.layers.iter().map(|l| l.size).sum::<u64>() * b.hosts.len() as u64;
            let pct = (bytes * 100).checked_div(total).unwrap_or(100);
            format!(
                "batch {}/{n}: {}/{} warm, {} warming, {} failed ({pct}%)",
                i + 1,
                count(HostState::Warm),
                b.hosts.len(),
                count(HostState::Warming),
                count(HostState::Failed),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn failures(s: &JobStatus, batches: std::ops::Range<usize>) -> String {
    let mut lines = Vec::new();
    for (i, b) in s.batches.iter().enumerate() {
        if !batches.contains(&i) {
            continue;
        }
        for h in &b.hosts {
            if h.state != HostState::Warm {
                lines.push(format!(
                    "  {} (batch {}): {}",
                    h.host,
                    i + 1,
                    h.error.as_deref().unwrap_or(match h.state {
                        HostState::Waiting => "never started",
                        HostState::Warming => "still warming",
                        _ => "failed",
                    })
                ));
            }
        }
    }
    lines.join("\n")
}

pub async fn run(a: PrewarmArgs) -> Result<(), Failure> {
    let spec = spec(&a)?;
    let base = a.supernode.trim_end_matches('/').to_string();
    let base = if base.contains("://") {
        base
    } else {
        format!("http://{base}")
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Failure::new(1, e.to_string()))?;
    let (code, body) = exchange(
        http.post(format!("{base}/api/v1/prewarm")).json(&spec),
        &base,
    )
    .await?;
    if !code.is_success() {
        let exit = match code.as_u16() {
            400 => 2,
            401 | 403 | 404 | 422 | 502 | 504 => 4,
            _ => 1,
        };
        return Err(Failure::new(
            exit,
            format!("prewarm {}: {}", a.image, api_message(&body)),
        ));
    }
    let mut status: JobStatus =
        serde_json::from_slice(&body).map_err(|e| Failure::new(1, format!("job status: {e}")))?;
    let waited = match (a.wait, a.batch) {
        (true, _) => Some(0..status.batches.len()),
        (false, Some(k)) if k >= 1 && k <= status.batches.len() => Some(k - 1..k),
        (false, Some(k)) => {
            return Err(Failure::new(
                2,
                format!(
                    "--batch {k}: the job has {} batch(es)",
                    status.batches.len()
                ),
            ));
        }
        (false, None) => None,
    };
    let Some(range) = waited else {
        println!("{}", status.id);
        eprintln!(
            "dfget: prewarm job {} for {}: {}",
            status.id,
            a.image,
            summary(&status)
        );
        return Ok(());
    };
    let bar = (!a.no_progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let give_up = Instant::now()
        + Duration::from_secs(status.deadline.saturating_sub(status.created_at) + 30);
    let mut last = String::new();
    loop {
        let line = summary(&status);
        if line != last {
            match &bar {
                Some(b) => b.set_message(line.clone()),
                None => eprintln!("dfget: prewarm {}: {line}", status.id),
            }
            last = line;
        }
        let batches = &status.batches[range.clone()];
        // --wait: the job is over; --batch K: that batch is (or the job ended early).
        let done =
            status.state != JobState::Running || (!a.wait && batches.iter().all(|b| b.finished()));
        if done {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if batches.iter().all(|b| b.all_warm()) {
                eprintln!("dfget: prewarm {}: warm ({})", status.id, summary(&status));
                return Ok(());
            }
            return Err(Failure::new(
                8,
                format!(
                    "prewarm {} of {}: not warm ({:?}{}):\n{}",
                    status.id,
                    a.image,
                    status.state,
                    status
                        .error
                        .as_deref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default(),
                    failures(&status, range.clone())
                ),
            ));
        }
        if Instant::now() > give_up {
            return Err(Failure::new(
                8,
                format!(
                    "prewarm {}: gave up waiting:\n{}",
                    status.id,
                    failures(&status, range.clone())
                ),
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        status = get_status(&http, &base, &status.id).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").ok(), Some(90));
        assert_eq!(parse_duration("10m").ok(), Some(600));
        assert_eq!(parse_duration("1h").ok(), Some(3600));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
