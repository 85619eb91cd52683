//! Pre-warm jobs: the bookkeeping, no I/O.
//!
//! A job is created by the HTTP API once its image is resolved (see
//! [`crate::registry::resolve`]); from then on it advances only through two events:
//! * a daemon's poll ([`JobBook::poll`]): its progress is recorded, and it is handed the
//!   blobs of every job whose *current* batch it belongs to, as long as the job's
//!   parallelism leaves it a place;
//! * the tick ([`JobBook::tick`]): deadlines, hosts that never show up, batches and jobs
//!   that are finished.
//!
//! Batches go strictly in order: batch k+1 starts when every host of batch k is warm or
//! failed. Records are persisted by the server whenever [`JobBook::take_dirty`] says so,
//! and restored after a restart: daemons keep polling and the job carries on.

use std::collections::BTreeMap;

use proto::HostId;
use proto::prewarm::{
    BatchStatus, HostState, HostStatus, JobState, JobStatus, LayerProgress, LayerState,
    PrewarmWork, WorkProgress,
};
use serde::{Deserialize, Serialize};

/// A target host not connected this long after its batch started is failed, so one dead
/// node does not hold a rollout's batch until the job's deadline.
pub const ABSENT_FOR_SECS: u64 = 30;
/// Finished jobs kept for the API; older ones are dropped first beyond this.
pub const MAX_FINISHED_JOBS: usize = 1000;

/// What is persisted of a job: its status plus what the API never shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub status: JobStatus,
    /// `scheme://host/v2/<repo>/blobs/` prefix the daemons fetch from.
    pub blob_base: String,
    /// `Authorization` for the registry, if it wants one.
    pub authorization: Option<String>,
    pub pin_secs: u64,
    pub parallelism: u32,
    /// When each host of the current batch was first seen missing (unix seconds).
    #[serde(default)]
    pub absent_since: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct JobBook {
    jobs: BTreeMap<String, JobRecord>,
    dirty: Vec<String>,
}

impl JobBook {
    pub fn restore(&mut self, records: impl IntoIterator<Item = JobRecord>) {
        for r in records {
            self.jobs.insert(r.status.id.clone(), r);
        }
    }

    pub fn get(&self, id: &str) -> Option<&JobStatus> {
        self.jobs.get(id).map(|r| &r.status)
    }

    pub fn list(&self) -> Vec<JobStatus> {
        self.jobs.values().map(|r| r.status.clone()).collect()
    }

    pub fn insert(&mut self, rec: JobRecord) {
        let id = rec.status.id.clone();
        self.jobs.insert(id.clone(), rec);
        self.dirty.push(id);
        self.trim();
    }

    fn trim(&mut self) {
        let mut finished: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|r| r.status.state != JobState::Running)
            .map(|r| (r.status.created_at, r.status.id.clone()))
            .collect();
        if finished.len() > MAX_FINISHED_JOBS {
            finished.sort();
            for (_, id) in finished.iter().take(finished.len() - MAX_FINISHED_JOBS) {
                self.jobs.remove(id);
                self.dirty.push(id.clone());
            }
        }
    }

    /// Jobs changed since the last call: `(id, Some(record))` to store, `(id, None)` to
    /// delete.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<JobRecord>)> {
        let mut ids = std::mem::take(&mut self.dirty);
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let rec = self.jobs.get(&id).cloned();
                (id, rec)
            })
            .collect()
    }

    pub fn cancel(&mut self, id: &str) -> Option<JobStatus> {
        let rec = self.jobs.get_mut(id)?;
        if rec.status.state == JobState::Running {
            rec.status.state = JobState::Cancelled;
            fail_unfinished(&mut rec.status, |_, _| "job cancelled".into());
            self.dirty.push(id.to_string());
        }
        Some(rec.status.clone())
    }

    /// Records `host`'s progress and answers the work it should hold now.
    pub fn poll(&mut self, host: &HostId, progress: &[WorkProgress]) -> Vec<PrewarmWork> {
        let mut work = Vec::new();
        for rec in self.jobs.values_mut() {
            let id = rec.status.id.clone();
            let mut changed = false;
            for p in progress.iter().filter(|p| p.job == id) {
                changed |= apply_progress(&mut rec.status, host, p);
            }
            // A job is over the moment its last host is: the API says so at once.
            settle(&mut rec.status);
            if rec.status.state == JobState::Running
                && let Some(b) = current_batch(&rec.status)
            {
                let parallelism = rec.parallelism.max(1) as usize;
                let warming = rec.status.batches[b]
                    .hosts
                    .iter()
                    .filter(|h| h.state == HostState::Warming)
                    .count();
                if let Some(h) = rec.status.batches[b]
                    .hosts
                    .iter_mut()
                    .find(|h| &h.host == host)
                {
                    if h.state == HostState::Waiting && warming < parallelism {
                        h.state = HostState::Warming;
                        changed = true;
                    }
                    if h.state == HostState::Warming {
                        for l in h.layers.iter().filter(|l| l.state != LayerState::Done) {
                            work.push(PrewarmWork {
                                job: id.clone(),
                                digest: l.digest,
                                url: format!("{}{}", rec.blob_base, l.digest),
                                headers: rec
                                    .authorization
                                    .iter()
                                    .map(|a| ("authorization".to_string(), a.clone()))
                                    .collect(),
                                pin_secs: rec.pin_secs,
                            });
                        }
                    }
                    rec.absent_since.remove(host.as_str());
                }
            }
            if changed {
                self.dirty.push(id);
            }
        }
        work
    }

    /// Deadlines, absent hosts, finished batches and jobs. `connected` says whether a
    /// host is registered with the supernode now.
    pub fn tick(&mut self, now: u64, connected: impl Fn(&HostId) -> bool) {
        for rec in self.jobs.values_mut() {
            if rec.status.state != JobState::Running {
                continue;
            }
            let id = rec.status.id.clone();
            let before = rec.status.clone();
            if now >= rec.status.deadline {
                let current = current_batch(&rec.status);
                fail_unfinished(&mut rec.status, |h, i| {
                    match (h.state, Some(i) == current) {
                        (HostState::Warming, _) => "timed out warming".into(),
                        (_, true) => "timed out: its daemon never asked for the work".into(),
                        _ => "timed out before its batch started".into(),
                    }
                });
            } else if let Some(b) = current_batch(&rec.status) {
                for h in rec.status.batches[b].hosts.iter_mut() {
                    if matches!(h.state, HostState::Warm | HostState::Failed) {
                        continue;
                    }
                    if connected(&h.host) {
                        rec.absent_since.remove(h.host.as_str());
                        continue;
                    }
                    let since = *rec
                        .absent_since
                        .entry(h.host.as_str().to_string())
                        .or_insert(now);
                    if now.saturating_sub(since) >= ABSENT_FOR_SECS {
                        h.state = HostState::Failed;
                        h.error = Some(format!(
                            "host not connected to the supernode for {ABSENT_FOR_SECS} s"
                        ));
                    }
                }
            }
            settle(&mut rec.status);
            if rec.status != before {
                self.dirty.push(id);
            }
        }
    }
}

/// Fails every host neither warm nor failed, with `reason(host, batch index)`.
fn fail_unfinished(s: &mut JobStatus, reason: impl Fn(&HostStatus, usize) -> String) {
    for (i, b) in s.batches.iter_mut().enumerate() {
        for h in b.hosts.iter_mut() {
            if !matches!(h.state, HostState::Warm | HostState::Failed) {
                h.error = Some(reason(h, i));
                h.state = HostState::Failed;
            }
        }
    }
}

/// A running job whose every host is warm or failed is over: succeeded if all are warm.
fn settle(s: &mut JobStatus) {
    if s.state != JobState::Running || current_batch(s).is_some() {
        return;
    }
    let all_warm = s.batches.iter().all(BatchStatus::all_warm);
    s.state = if all_warm {
        JobState::Succeeded
    } else {
        JobState::Failed
    };
    if !all_warm {
        let failed = s
            .batches
            .iter()
            .flat_map(|b| &b.hosts)
            .filter(|h| h.state == HostState::Failed)
            .count();
        s.error = Some(format!("{failed} host(s) failed"));
    }
}

/// The first batch with a host neither warm nor failed.
fn current_batch(s: &JobStatus) -> Option<usize> {
    s.batches.iter().position(|b| !b.finished())
}

fn apply_progress(s: &mut JobStatus, host: &HostId, p: &WorkProgress) -> bool {
    let Some(h) = s
        .batches
        .iter_mut()
        .flat_map(|b| b.hosts.iter_mut())
        .find(|h| &h.host == host)
    else {
        return false;
    };
    if h.state != HostState::Warming {
        return false;
    }
    let Some(l) = h.layers.iter_mut().find(|l| l.digest == p.digest) else {
        return false;
    };
    let updated = LayerProgress {
        digest: p.digest,
        bytes: p.bytes,
        state: p.state,
        error: p.error.clone(),
    };
    if *l == updated {
        return false;
    }
    *l = updated;
    if p.state == LayerState::Failed {
        h.state = HostState::Failed;
        h.error = Some(format!(
            "layer {}: {}",
            p.digest,
            p.error.as_deref().unwrap_or("failed")
        ));
    } else if h.layers.iter().all(|l| l.state == LayerState::Done) {
        h.state = HostState::Warm;
    }
    true
}

/// The batches of a new job: every target host waiting, every layer pending.
pub fn new_batches(
    batches: Vec<Vec<HostId>>,
    layers: &[proto::prewarm::Layer],
) -> Vec<BatchStatus> {
    batches
        .into_iter()
        .map(|hosts| BatchStatus {
            hosts: hosts
                .into_iter()
                .map(|host| HostStatus {
                    host,
                    state: HostState::Waiting,
                    layers: layers
                        .iter()
                        .map(|l| LayerProgress {
                            digest: l.digest,
                            bytes: 0,
                            state: LayerState::Pending,
                            error: None,
                        })
                        .collect(),
                    error: None,
                })
                .collect(),
        })
        .collect()
}

/// Cuts an ordered host list into batches of `sizes` (the last size repeats; no sizes:
/// one batch).
pub fn split_batches(hosts: Vec<HostId>, sizes: &[u32]) -> Vec<Vec<HostId>> {
    if sizes.is_empty() || sizes.contains(&0) {
        return vec![hosts];
    }
    let mut out = Vec::new();
    let mut rest = hosts.into_iter().peekable();
    let mut i = 0;
    while rest.peek().is_some() {
        let n = sizes[i.min(sizes.len() - 1)] as usize;
        out.push(rest.by_ref().take(n).collect());
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Sha256Digest;
    use proto::prewarm::{Layer, PrewarmSpec, Targets};

    fn h(n: u32) -> HostId {
        HostId::new(format!("n{n}")).unwrap()
    }

    fn layers() -> Vec<Layer> {
        (0..2u8)
            .map(|i| Layer {
                digest: Sha256Digest::of(&[i]),
                size: 10,
                media_type: "x".into(),
            })
            .collect()
    }

    fn job(batches: Vec<Vec<HostId>>, parallelism: u32) -> JobRecord {
        let ls = layers();
        JobRecord {
            status: JobStatus {
                id: "j".into(),
                spec: PrewarmSpec {
                    image: "r.io/a:1".into(),
                    platform: None,
                    targets: Targets::Batches(batches.clone()),
                    batch_sizes: vec![],
                    parallelism: Some(parallelism),
                    timeout_secs: Some(100),
                    credentials: None,
                },
                state: JobState::Running,
                manifest: Sha256Digest::of(b"m"),
                layers: ls.clone(),
                batches: new_batches(batches, &ls),
                created_at: 0,
                deadline: 100,
                error: None,
            },
            blob_base: "http://r.io/v2/a/blobs/".into(),
            authorization: None,
            pin_secs: 60,
            parallelism,
            absent_since: BTreeMap::new(),
        }
    }

    fn done(work: &[PrewarmWork]) -> Vec<WorkProgress> {
        work.iter()
            .map(|w| WorkProgress {
                job: w.job.clone(),
                digest: w.digest,
                bytes: 10,
                state: LayerState::Done,
                error: None,
            })
            .collect()
    }

    #[test]
    fn batches_go_in_order_and_the_job_succeeds() {
        let mut b = JobBook::default();
        b.insert(job(vec![vec![h(1)], vec![h(2), h(3)]], 8));
        assert!(b.poll(&h(2), &[]).is_empty(), "batch 2 waits for batch 1");
        let w1 = b.poll(&h(1), &[]);
        assert_eq!(w1.len(), 2);
        assert!(w1[0].url.starts_with("http://r.io/v2/a/blobs/sha256:"));
        assert!(b.poll(&h(1), &done(&w1)).is_empty(), "warm: nothing more");
        b.tick(1, |_| true);
        let w2 = b.poll(&h(2), &[]);
        assert_eq!(w2.len(), 2, "batch 2 starts once batch 1 is warm");
        b.poll(&h(2), &done(&w2));
        let w3 = b.poll(&h(3), &[]);
        b.poll(&h(3), &done(&w3));
        b.tick(2, |_| true);
        let s = b.get("j").unwrap();
        assert_eq!(s.state, JobState::Succeeded);
        assert!(s.batches.iter().all(BatchStatus::all_warm));
        assert!(!b.take_dirty().is_empty());
    }

    #[test]
    fn parallelism_failures_absent_hosts_and_deadline() {
        let mut b = JobBook::default();
        b.insert(job(vec![vec![h(1), h(2), h(3)]], 1));
        let w1 = b.poll(&h(1), &[]);
        assert!(!w1.is_empty());
        assert!(b.poll(&h(2), &[]).is_empty(), "parallelism 1: h2 waits");
        // h1's first layer fails: h1 failed, the place frees up.
        let mut p = done(&w1);
        p[0].state = LayerState::Failed;
        p[0].error = Some("registry said 500".into());
        b.poll(&h(1), &p);
        assert!(!b.poll(&h(2), &[]).is_empty(), "h2 takes the free place");
        // h3 never connects.
        b.tick(10, |x| x != &h(3));
        b.tick(10 + ABSENT_FOR_SECS, |x| x != &h(3));
        let s = b.get("j").unwrap();
        let st = |n: usize| s.batches[0].hosts[n].state;
        assert_eq!(st(0), HostState::Failed);
        assert!(
            s.batches[0].hosts[0]
                .error
                .as_deref()
                .unwrap()
                .contains("500")
        );
        assert_eq!(st(2), HostState::Failed);
        assert_eq!(s.state, JobState::Running, "h2 still warming");
        b.tick(100, |_| true);
        let s = b.get("j").unwrap();
        assert_eq!(s.state, JobState::Failed);
        assert_eq!(
            s.batches[0].hosts[1].error.as_deref(),
            Some("timed out warming")
        );
        assert!(
            s.batches[0].hosts[1]
                .error
                .as_deref()
                .unwrap()
                .contains("timed out")
        );
    }

    #[test]
    fn splitting() {
        let hosts: Vec<HostId> = (0..7).map(h).collect();
        let b = split_batches(hosts.clone(), &[1, 2]);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 2, 2, 2]);
        assert_eq!(split_batches(hosts, &[]).len(), 1);
    }
}
