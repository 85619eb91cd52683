//! The pre-warm executor: asks the supernode what to pre-warm, fetches it through the
//! task engine like any blob (so the swarm shares it), pins it against eviction, and
//! reports how far it got.
//!
//! Pull model: the daemon polls on its control connection every [`POLL`]; the answer is
//! the full list of blobs this host should hold now, so a lost answer or a restart of
//! either side just means the next poll says it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::TaskId;
use proto::api::{DownloadRequest, TaskState};
use proto::control::{ControlRequest, ControlResponse};
use proto::prewarm::{LayerState, PrewarmWork, WorkProgress};
use tokio_util::sync::CancellationToken;

use crate::control::ControlClient;
use crate::download::{Engine, TaskHandle};
use crate::store::Store;

/// How often the daemon asks for pre-warm work and reports progress.
pub const POLL: Duration = Duration::from_secs(1);

struct Running {
    work: PrewarmWork,
    task: TaskId,
    handle: Option<Arc<TaskHandle>>,
    /// Set once it failed to start; reported, not retried until the supernode asks again.
    error: Option<String>,
    pinned: bool,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn progress(r: &Running) -> WorkProgress {
    let (bytes, state, error) = match (&r.handle, &r.error) {
        (_, Some(e)) => (0, LayerState::Failed, Some(e.clone())),
        (None, None) => (0, LayerState::Pending, None),
        (Some(h), None) => {
            let st = h.status();
            let bytes = st.bytes_stored;
            match st.state {
                TaskState::Done => (st.content_length.unwrap_or(bytes), LayerState::Done, None),
                TaskState::Failed => (
                    bytes,
                    LayerState::Failed,
                    Some(st.error.map_or_else(|| "failed".to_string(), |e| e.message)),
                ),
                TaskState::Running => (bytes, LayerState::Running, None),
            }
        }
    };
    WorkProgress {
        job: r.work.job.clone(),
        digest: r.work.digest,
        bytes,
        state,
        error,
    }
}

/// Runs until `cancel`: poll, start what is new, pin what is done, report.
pub async fn run(
    control: Arc<ControlClient>,
    engine: Arc<Engine>,
    store: Arc<Store>,
    cancel: CancellationToken,
) {
    let mut running: HashMap<(String, proto::Sha256Digest), Running> = HashMap::new();
    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        // One status read per blob and poll: it is both reported and what pins.
        let mut report = Vec::with_capacity(running.len());
        for r in running.values_mut() {
            let p = progress(r);
            if !r.pinned && p.state == LayerState::Done {
                if let Err(e) = store.pin(&r.task, unix_now() + r.work.pin_secs) {
                    tracing::warn!(task = %r.task, error = %e, "pinning pre-warmed content failed");
                }
                r.pinned = true;
            }
            report.push(p);
        }
        let req = ControlRequest::PrewarmPoll {
            host: control.host().clone(),
            progress: report,
        };
        let work = match control.call(&req).await {
            Ok(ControlResponse::Prewarm(w)) => w,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "pre-warm poll failed");
                continue;
            }
        };
        let listed: std::collections::HashSet<(String, proto::Sha256Digest)> =
            work.iter().map(|w| (w.job.clone(), w.digest)).collect();
        // What the supernode no longer lists is done with (finished, cancelled, failed):
        // the downloads themselves carry on and end on their own.
        running.retain(|k, _| listed.contains(k));
        for w in work {
            let key = (w.job.clone(), w.digest);
            if running.contains_key(&key) {
                continue;
            }
            let req = DownloadRequest {
                url: w.url.clone(),
                headers: w.headers.clone(),
                digest: Some(w.digest),
                content_addressed: true,
            };
            let task = Engine::task_id(&req);
            let (handle, error) = match engine.start(req) {
                Ok(h) => (Some(h), None),
                Err(e) => (None, Some(e.message)),
            };
            tracing::info!(job = %w.job, digest = %w.digest, "pre-warming");
            running.insert(
                key,
                Running {
                    work: w,
                    task,
                    handle,
                    error,
                    pinned: false,
                },
            );
        }
    }
}
