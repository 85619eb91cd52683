//! The scheduling state machine: no I/O, no clock of its own.
//!
//! Events come in through `handle_*` methods with `now` passed in; answers come back as
//! values. The async server ([`crate::server`]) owns one [`Scheduler`] behind a mutex and
//! persists what [`Scheduler::take_dirty`] hands it. Every method is a few microseconds,
//! so the tests below drive whole swarms deterministically.
//!
//! What it guarantees:
//! * a task's layout is fixed once, by the one peer holding the probe lease;
//! * each piece's digest is recorded from the peer that fetched it from the origin under
//!   a lease, and every other peer verifies against that record;
//! * a piece nobody holds is leased to one peer at a time for an origin fetch (by Range,
//!   so several peers share a cold file; without Range one peer streams it all);
//! * parents are ranked by load (in-flight uploads over upload slots) and topology;
//! * hosts that stop talking are dropped with their leases, so work moves on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::control::{
    AnnounceSource, Assignment, ControlErrorCode, HostInfo, MAX_ASSIGNMENTS, MAX_PARENTS_PER_PIECE,
    ParentRef, PieceFailure, PieceRecord, PieceSource, ScheduleReply, TaskView,
};
use proto::layout::{LayoutError, LayoutRule};
use proto::{HostId, PieceIndex, PieceLayout, PieceSet, SessionId, Sha256Digest, TaskId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A host that sent nothing for this long is gone: its pieces and leases are released.
/// Daemons heartbeat every few seconds, so this tolerates two lost heartbeats.
pub const DEFAULT_HOST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one peer owns an origin fetch of a piece before another may try, unless it
/// renews the lease: daemons renew every couple of seconds while a fetch still receives
/// bytes, so this bounds how long a stalled or vanished fetch holds a piece back.
pub const DEFAULT_ORIGIN_LEASE: Duration = Duration::from_secs(30);
/// How long the probing peer has to report the content length.
pub const DEFAULT_PROBE_LEASE: Duration = Duration::from_secs(10);
/// Origin pieces one host may hold leases on at once; spreads a cold fetch over peers
/// instead of letting the first asker take the whole file.
pub const DEFAULT_ORIGIN_LEASES_PER_HOST: u32 = 4;
/// Origin fetches in flight for one task across all hosts. A few keep the origin's link
/// busy; unbounded, every piece would crawl in at once and land together at the end, with
/// nothing for the peers to share meanwhile (the swarm then took twice the bound).
/// Measured on 16 hosts at 100 Mbit/s: 2 -> 1.21 x the bound (the origin link idles
/// between ranges), 4 -> 1.08-1.10, 6 -> 1.07, 8 -> 1.06; on 8 hosts 4 -> 1.05, 8 -> 1.04.
/// 16 (one per host there) with [`DEFAULT_LANDING_RELAYS`] 15 splits the origin's
/// output evenly, and each lessee forwards its share to all others at the origin's
/// pace: 16 hosts took 23.2-23.6 s against 23.4-23.6 s with 8 fetches and 3 relays, 32
/// hosts on 25 Mbit/s 113-117 s against 120 s. At 32 hosts each fetch gets 1/16 of a
/// 25 Mbit/s link and takes seconds, which only stays "each byte from the origin once"
/// because leases are renewed while a fetch receives bytes and announces that fail are
/// sent again (before both, 1.020-1.141 F).
pub const DEFAULT_ORIGIN_LEASES_PER_TASK: u32 = 16;
/// Missing pieces taken strictly in order before rarest-first applies, so a client
/// streaming the content sees its next bytes soon.
pub const DEFAULT_IN_ORDER_LOOKAHEAD: u32 = 4;
/// Parents listed per piece (best first); the downloader falls back down the list.
pub const DEFAULT_PARENTS_PER_PIECE: usize = 4;
/// Peers sent to take one origin fetch's bytes from its lessee while they land. Relaying
/// then starts with the origin's first byte instead of a whole piece later; on 16 hosts
/// the hosts' links were otherwise mostly idle for the first second of a cold fetch.
/// With 16 fetches in flight each gets 1/16 of the origin's link, so 15 relays fit in
/// 15/16 of the lessee's: on 16 hosts that is everyone, and 71-84% of all piece copies
/// then came this way (3 relays with 8 fetches: 20%).
pub const DEFAULT_LANDING_RELAYS: u32 = 15;
/// Corrupt-piece reports after which a host is not offered as a parent for a while.
const BAD_PIECE_QUARANTINE_AFTER: u32 = 3;
/// How long a host that keeps sending corrupt pieces is skipped as a parent.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// How long a host reported unreachable is skipped as a parent (it times out entirely
/// after `host_timeout` if it is really gone).
const UNREACHABLE_FOR: Duration = Duration::from_secs(3);
/// A piece handed out from a parent and not announced within this long no longer counts
/// against that parent's upload slots.
const PENDING_FOR: Duration = Duration::from_secs(20);
/// Asked-again delay when nothing can be assigned right now.
const RETRY_AFTER_MS: u32 = 100;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub host_timeout: Duration,
    pub origin_lease: Duration,
    pub probe_lease: Duration,
    pub origin_leases_per_host: u32,
    pub origin_leases_per_task: u32,
    pub in_order_lookahead: u32,
    pub parents_per_piece: usize,
    /// Peers that may take one origin fetch's bytes from its lessee as they land
    /// ([`PieceSource::Landing`]); 0 turns that off.
    pub landing_relays: u32,
    /// How new tasks are cut into pieces.
    pub layout: LayoutRule,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            host_timeout: DEFAULT_HOST_TIMEOUT,
            origin_lease: DEFAULT_ORIGIN_LEASE,
            probe_lease: DEFAULT_PROBE_LEASE,
            origin_leases_per_host: DEFAULT_ORIGIN_LEASES_PER_HOST,
            origin_leases_per_task: DEFAULT_ORIGIN_LEASES_PER_TASK,
            in_order_lookahead: DEFAULT_IN_ORDER_LOOKAHEAD,
            parents_per_piece: DEFAULT_PARENTS_PER_PIECE,
            landing_relays: DEFAULT_LANDING_RELAYS,
            layout: LayoutRule::default(),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("host {0} is not registered")]
    UnknownHost(HostId),
    #[error("task {0} is not known; register for it first")]
    UnknownTask(TaskId),
    /// Asks the announcer to register for the task again with its layout (a daemon that
    /// fetched while the supernode was away has one, and the supernode none).
    #[error("task {0} has no layout yet; register for it and report the layout first")]
    NoLayout(TaskId),
    #[error("task {task} already has content length {known}, peer reported {reported}")]
    LayoutConflict {
        task: TaskId,
        known: u64,
        reported: u64,
    },
    #[error("piece {piece} of task {task}: announced digest differs from the record")]
    DigestConflict { task: TaskId, piece: PieceIndex },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl SchedError {
    pub fn code(&self) -> ControlErrorCode {
        match self {
            SchedError::UnknownHost(_) => ControlErrorCode::UnknownHost,
            SchedError::UnknownTask(_) | SchedError::NoLayout(_) => ControlErrorCode::UnknownTask,
            SchedError::LayoutConflict { .. } => ControlErrorCode::LayoutConflict,
            SchedError::DigestConflict { .. } => ControlErrorCode::DigestConflict,
            SchedError::Layout(_) => ControlErrorCode::BadRequest,
        }
    }
}

/// The durable part of a task, persisted by the server and restored at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub url: String,
    pub layout: Option<PieceLayout>,
    pub supports_range: bool,
    pub content_digest: Option<Sha256Digest>,
    pub digests: Vec<Option<Sha256Digest>>,
}

#[derive(Clone, Debug)]
struct Lease {
    host: HostId,
    expires: Instant,
    /// Peers sent to take this fetch's bytes as they land.
    relays: u32,
}

impl Lease {
    fn new(host: HostId, expires: Instant) -> Self {
        Self {
            host,
            expires,
            relays: 0,
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }
}

#[derive(Debug)]
struct Host {
    info: HostInfo,
    last_seen: Instant,
    uploads_in_flight: u32,
    /// Pieces handed out with this host as first-choice parent and not yet announced by
    /// their requester: its upload load as the scheduler knows it, ahead of heartbeats.
    pending: u32,
    corrupt_reports: u32,
    suspect_until: Option<Instant>,
}

impl Host {
    /// Upload slots promised and not yet settled. The heartbeat's `uploads_in_flight` is
    /// not used here: up to a heartbeat old, it kept finished uploads counted for seconds
    /// and left parents idle in step with the heartbeats (measured in the swarm bench).
    fn busy_slots(&self) -> u32 {
        self.pending
    }

    fn usable_parent(&self, now: Instant) -> bool {
        self.suspect_until.is_none_or(|t| t <= now)
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.info
            .labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `f64` ordered by `total_cmp`, for sort keys.
#[derive(PartialEq)]
struct OrdF64(f64);

impl Eq for OrdF64 {}

impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Parent candidates ranked per decision; above this many peers a window is ranked.
const MAX_CANDIDATES: usize = 256;

struct Candidate<'a> {
    id: &'a HostId,
    host: &'a Host,
    have: &'a PieceSet,
    /// Topology closeness to the requester, 0..=1.
    locality: f64,
    /// Upload slots taken, counting what this decision has already promised.
    busy: u32,
}

impl Candidate<'_> {
    fn slots(&self) -> u32 {
        self.host.info.upload_slots.max(1)
    }

    fn saturated(&self) -> bool {
        self.busy >= self.slots()
    }

    /// 0.6 x idle share of upload slots + 0.4 x topology.
    fn score(&self) -> f64 {
        let idle = 1.0 - (f64::from(self.busy) / f64::from(self.slots())).min(1.0);
        0.6 * idle + 0.4 * self.locality
    }
}

#[derive(Debug)]
struct TaskPeer {
    have: PieceSet,
}

#[derive(Debug)]
struct Task {
    record: TaskRecord,
    peers: HashMap<HostId, TaskPeer>,
    /// How many peers hold each piece, kept in step with `peers` so that rarest-first
    /// costs O(pieces) per decision, not O(peers x pieces).
    holders: Vec<u32>,
    /// Decisions made so far; moves the parent-candidate window in large swarms.
    rotation: usize,
    /// (requester, piece) -> (first-choice parent, when): settled when the requester
    /// announces the piece or reports it failed, or after [`PENDING_FOR`].
    inflight: HashMap<(HostId, PieceIndex), (HostId, Instant)>,
    probe: Option<Lease>,
    origin_leases: HashMap<PieceIndex, Lease>,
    whole_lease: Option<Lease>,
    last_active: Instant,
}

impl Task {
    fn new(record: TaskRecord, now: Instant) -> Self {
        let holders = vec![0; record.layout.map_or(0, |l| l.piece_count()) as usize];
        Self {
            record,
            peers: HashMap::new(),
            holders,
            rotation: 0,
            inflight: HashMap::new(),
            probe: None,
            origin_leases: HashMap::new(),
            whole_lease: None,
            last_active: now,
        }
    }

    fn piece_count(&self) -> u32 {
        self.record.layout.map_or(0, |l| l.piece_count())
    }

    fn recorded(&self) -> Vec<PieceRecord> {
        self.record
            .digests
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                d.map(|digest| PieceRecord {
                    piece: PieceIndex(i as u32),
                    digest,
                })
            })
            .collect()
    }

    fn count_holders(holders: &mut [u32], have: &PieceSet, add: bool) {
        for p in have.iter() {
            if let Some(c) = holders.get_mut(p.0 as usize) {
                *c = if add { *c + 1 } else { c.saturating_sub(1) };
            }
        }
    }

    /// Replaces what `host` holds, keeping the holder counts right.
    fn set_have(&mut self, host: &HostId, have: PieceSet) {
        Self::count_holders(&mut self.holders, &have, true);
        if let Some(old) = self.peers.insert(host.clone(), TaskPeer { have }) {
            Self::count_holders(&mut self.holders, &old.have, false);
        }
    }

    /// Forgets a (requester, piece) promise; the parent whose slot it held, if any.
    fn settle(&mut self, requester: &HostId, piece: PieceIndex) -> Option<HostId> {
        self.inflight
            .remove(&(requester.clone(), piece))
            .map(|(parent, _)| parent)
    }

    /// Drops `host` from the task; returns the parents whose promised slots it held.
    fn release_host(&mut self, host: &HostId) -> Vec<HostId> {
        if let Some(old) = self.peers.remove(host) {
            Self::count_holders(&mut self.holders, &old.have, false);
        }
        let mut freed = Vec::new();
        self.inflight.retain(|(req, _), (parent, _)| {
            if req == host {
                freed.push(parent.clone());
                false
            } else {
                parent != host
            }
        });
        self.origin_leases.retain(|_, l| &l.host != host);
        if self.whole_lease.as_ref().is_some_and(|l| &l.host == host) {
            self.whole_lease = None;
        }
        if self.probe.as_ref().is_some_and(|l| &l.host == host) {
            self.probe = None;
        }
        freed
    }
}

/// Public snapshot of a task for the HTTP API.
#[derive(Clone, Debug, Serialize)]
pub struct TaskSummary {
    pub task: TaskId,
    pub url: String,
    pub content_length: Option<u64>,
    pub piece_size: Option<u32>,
    pub tail_piece_size: Option<u32>,
    pub pieces: u32,
    pub pieces_recorded: u32,
    pub origin_leases: usize,
    pub peers: Vec<PeerSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerSummary {
    pub host: HostId,
    pub pieces: u32,
}

/// Public snapshot of a host for the HTTP API.
#[derive(Clone, Debug, Serialize)]
pub struct HostSummary {
    pub host: HostId,
    pub peer_addr: std::net::SocketAddr,
    pub labels: std::collections::BTreeMap<String, String>,
    pub upload_slots: u32,
    pub uploads_in_flight: u32,
    pub tasks: usize,
    pub seconds_since_seen: f64,
    pub suspect: bool,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    hosts: HashMap<HostId, Host>,
    tasks: HashMap<TaskId, Task>,
    dirty: Vec<TaskId>,
    /// Origin leases that ran out before their piece was announced, since last taken.
    lapsed_origin_leases: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            hosts: HashMap::new(),
            tasks: HashMap::new(),
            dirty: Vec::new(),
            lapsed_origin_leases: 0,
        }
    }

    /// Origin leases that ran out (their piece may now be fetched from the origin a
    /// second time) since the last call.
    pub fn take_lapsed_origin_leases(&mut self) -> u64 {
        std::mem::take(&mut self.lapsed_origin_leases)
    }

    /// Loads durable task records (after a restart); peers re-register and re-announce.
    pub fn restore(
        &mut self,
        records: impl IntoIterator<Item = (TaskId, TaskRecord)>,
        now: Instant,
    ) {
        for (id, rec) in records {
            self.tasks.insert(id, Task::new(rec, now));
        }
    }

    /// Tasks whose durable record changed since the last call, with the record to store.
    pub fn take_dirty(&mut self) -> Vec<(TaskId, TaskRecord)> {
        let mut ids = std::mem::take(&mut self.dirty);
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| self.tasks.get(&id).map(|t| (id, t.record.clone())))
            .collect()
    }

    pub fn host_ids(&self) -> std::collections::HashSet<HostId> {
        self.hosts.keys().cloned().collect()
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    fn free_slots(hosts: &mut HashMap<HostId, Host>, parents: impl IntoIterator<Item = HostId>) {
        for p in parents {
            if let Some(h) = hosts.get_mut(&p) {
                h.pending = h.pending.saturating_sub(1);
            }
        }
    }

    fn touch(&mut self, host: &HostId, now: Instant) -> Result<(), SchedError> {
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| SchedError::UnknownHost(host.clone()))?;
        h.last_seen = now;
        Ok(())
    }

    pub fn handle_register_host(&mut self, info: HostInfo, now: Instant) {
        let host = info.host.clone();
        let restarted = self
            .hosts
            .get(&host)
            .is_some_and(|h| h.info.session != info.session);
        if restarted {
            // A new process: what the old one held is unknown until it re-announces.
            let mut freed = Vec::new();
            for t in self.tasks.values_mut() {
                freed.extend(t.release_host(&host));
            }
            Self::free_slots(&mut self.hosts, freed);
        }
        let prev = self.hosts.remove(&host);
        self.hosts.insert(
            host,
            Host {
                info,
                last_seen: now,
                uploads_in_flight: 0,
                pending: if restarted {
                    0
                } else {
                    prev.as_ref().map_or(0, |h| h.pending)
                },
                corrupt_reports: prev.as_ref().map_or(0, |h| h.corrupt_reports),
                suspect_until: None,
            },
        );
    }

    pub fn handle_heartbeat(
        &mut self,
        host: &HostId,
        session: SessionId,
        uploads_in_flight: u32,
        now: Instant,
    ) -> Result<(), SchedError> {
        match self.hosts.get_mut(host) {
            Some(h) if h.info.session == session => {
                h.last_seen = now;
                h.uploads_in_flight = uploads_in_flight;
                Ok(())
            }
            // Unknown (we restarted, or timed it out) or a stale session: the daemon must
            // register again and re-announce, which is what UnknownHost asks of it.
            _ => Err(SchedError::UnknownHost(host.clone())),
        }
    }

    pub fn handle_register_peer(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        url: &str,
        content_digest: Option<Sha256Digest>,
        now: Instant,
    ) -> Result<TaskView, SchedError> {
        self.touch(host, now)?;
        let task = self.tasks.entry(task_id).or_insert_with(|| {
            Task::new(
                TaskRecord {
                    url: url.to_string(),
                    layout: None,
                    supports_range: false,
                    content_digest,
                    digests: Vec::new(),
                },
                now,
            )
        });
        if task.record.content_digest.is_none() && content_digest.is_some() {
            task.record.content_digest = content_digest;
            self.dirty.push(task_id);
        }
        task.last_active = now;
        let pieces = task.piece_count();
        task.peers.entry(host.clone()).or_insert_with(|| TaskPeer {
            have: PieceSet::new(pieces),
        });
        let probe = Self::take_probe(&self.cfg, task, host, now);
        Ok(TaskView {
            layout: task.record.layout,
            supports_range: task.record.supports_range,
            content_digest: task.record.content_digest,
            digests: task.recorded(),
            probe,
        })
    }

    /// The recorded digests among `pieces`: what a peer that took a piece's bytes as they
    /// landed checks them against.
    pub fn piece_records(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        pieces: &[PieceIndex],
        now: Instant,
    ) -> Result<Vec<PieceRecord>, SchedError> {
        self.touch(host, now)?;
        let task = self
            .tasks
            .get(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        Ok(pieces
            .iter()
            .filter_map(|&piece| {
                let digest = (*task.record.digests.get(piece.0 as usize)?)?;
                Some(PieceRecord { piece, digest })
            })
            .collect())
    }

    /// What is known of a task, without registering anyone for it.
    pub fn task_view(&self, task: &TaskId) -> Option<TaskView> {
        self.tasks.get(task).map(|t| TaskView {
            layout: t.record.layout,
            supports_range: t.record.supports_range,
            content_digest: t.record.content_digest,
            digests: t.recorded(),
            probe: false,
        })
    }

    /// Hands the probe lease to `host` if the layout is unknown and nobody else holds it.
    fn take_probe(cfg: &SchedulerConfig, task: &mut Task, host: &HostId, now: Instant) -> bool {
        if task.record.layout.is_some() {
            return false;
        }
        match &task.probe {
            Some(l) if l.live(now) => &l.host == host,
            _ => {
                task.probe = Some(Lease::new(host.clone(), now + cfg.probe_lease));
                true
            }
        }
    }

    pub fn handle_report_layout(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        content_length: u64,
        supports_range: bool,
        now: Instant,
    ) -> Result<PieceLayout, SchedError> {
        self.touch(host, now)?;
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        if let Some(l) = task.record.layout {
            if l.content_length != content_length {
                return Err(SchedError::LayoutConflict {
                    task: task_id,
                    known: l.content_length,
                    reported: content_length,
                });
            }
            return Ok(l);
        }
        let layout = PieceLayout::choose(content_length, &self.cfg.layout)?;
        task.record.layout = Some(layout);
        task.record.supports_range = supports_range;
        if !supports_range {
            // The prober already holds the origin's whole body (its probe got a 200), so
            // it streams the content; nobody else asks the origin meanwhile.
            task.whole_lease = Some(Lease::new(host.clone(), now + self.cfg.origin_lease));
        }
        task.record.digests = vec![None; layout.piece_count() as usize];
        task.probe = None;
        for p in task.peers.values_mut() {
            p.have = PieceSet::new(layout.piece_count());
        }
        task.holders = vec![0; layout.piece_count() as usize];
        self.dirty.push(task_id);
        Ok(layout)
    }

    /// Records pieces a host now holds. Pieces whose digest contradicts the record are
    /// refused (reported as `DigestConflict` after the rest are taken).
    pub fn handle_announce(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        source: AnnounceSource,
        pieces: &[PieceRecord],
        now: Instant,
    ) -> Result<(), SchedError> {
        self.touch(host, now)?;
        let lease_for = self.cfg.origin_lease;
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        if task.record.layout.is_none() {
            return Err(SchedError::NoLayout(task_id));
        }
        task.last_active = now;
        let count = task.piece_count();
        let mut conflict = None;
        let mut changed = false;
        let peer = task.peers.entry(host.clone()).or_insert_with(|| TaskPeer {
            have: PieceSet::new(count),
        });
        for rec in pieces {
            let Some(slot) = task.record.digests.get_mut(rec.piece.0 as usize) else {
                conflict.get_or_insert(rec.piece);
                continue;
            };
            match (*slot, source) {
                (Some(d), _) if d == rec.digest => {}
                (Some(_), _) => {
                    conflict.get_or_insert(rec.piece);
                    continue;
                }
                (None, AnnounceSource::Origin | AnnounceSource::Restored) => {
                    *slot = Some(rec.digest);
                    changed = true;
                }
                // A peer-fetched piece can't exist without a record; ignore it.
                (None, AnnounceSource::Peer) => continue,
            }
            if !peer.have.contains(rec.piece) {
                peer.have.insert(rec.piece);
                if let Some(c) = task.holders.get_mut(rec.piece.0 as usize) {
                    *c += 1;
                }
            }
            if task
                .origin_leases
                .get(&rec.piece)
                .is_some_and(|l| &l.host == host)
            {
                task.origin_leases.remove(&rec.piece);
            }
        }
        let freed: Vec<HostId> = pieces
            .iter()
            .filter_map(|r| task.settle(host, r.piece))
            .collect();
        Self::free_slots(&mut self.hosts, freed);
        if source == AnnounceSource::Origin
            && let Some(l) = task.whole_lease.as_mut().filter(|l| &l.host == host)
        {
            l.expires = now + lease_for;
        }
        if changed {
            self.dirty.push(task_id);
        }
        match conflict {
            Some(piece) => Err(SchedError::DigestConflict {
                task: task_id,
                piece,
            }),
            None => Ok(()),
        }
    }

    /// Extends `host`'s origin leases on `pieces` of the task: their fetches still receive
    /// bytes. Leases held by others, or already gone, are left alone (the piece may have
    /// been handed on meanwhile; the fetch then finishes as a duplicate). Returns how many
    /// were extended.
    pub fn handle_renew_origin_leases(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        pieces: &[PieceIndex],
        now: Instant,
    ) -> Result<usize, SchedError> {
        self.touch(host, now)?;
        let until = now + self.cfg.origin_lease;
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        let mut renewed = 0;
        for piece in pieces {
            if let Some(l) = task.origin_leases.get_mut(piece)
                && &l.host == host
                && l.live(now)
            {
                l.expires = until;
                renewed += 1;
            }
        }
        Ok(renewed)
    }

    pub fn handle_piece_failed(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        piece: PieceIndex,
        parent: Option<&HostId>,
        reason: PieceFailure,
        now: Instant,
    ) -> Result<(), SchedError> {
        self.touch(host, now)?;
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        if let Some(parent) = task.settle(host, piece) {
            Self::free_slots(&mut self.hosts, [parent]);
        }
        if reason == PieceFailure::Origin {
            if task
                .origin_leases
                .get(&piece)
                .is_some_and(|l| &l.host == host)
            {
                task.origin_leases.remove(&piece);
            }
            if task.whole_lease.as_ref().is_some_and(|l| &l.host == host) {
                task.whole_lease = None;
            }
            return Ok(());
        }
        let Some(parent) = parent else { return Ok(()) };
        if let Some(p) = task.peers.get_mut(parent)
            && matches!(reason, PieceFailure::Corrupt | PieceFailure::NotFound)
            && p.have.contains(piece)
        {
            p.have.remove(piece);
            if let Some(c) = task.holders.get_mut(piece.0 as usize) {
                *c = c.saturating_sub(1);
            }
        }
        if let Some(h) = self.hosts.get_mut(parent) {
            match reason {
                PieceFailure::Corrupt => {
                    h.corrupt_reports += 1;
                    if h.corrupt_reports >= BAD_PIECE_QUARANTINE_AFTER {
                        h.suspect_until = Some(now + SUSPECT_FOR);
                    }
                }
                // A congested link also times out a connection: a short suspicion only.
                PieceFailure::Unreachable => h.suspect_until = Some(now + UNREACHABLE_FOR),
                PieceFailure::NotFound | PieceFailure::Origin => {}
            }
        }
        Ok(())
    }

    pub fn handle_leave(&mut self, host: &HostId, task: Option<TaskId>) {
        match task {
            Some(t) => {
                if let Some(t) = self.tasks.get_mut(&t) {
                    let freed = t.release_host(host);
                    Self::free_slots(&mut self.hosts, freed);
                }
            }
            None => self.remove_host(host),
        }
    }

    fn remove_host(&mut self, host: &HostId) {
        self.hosts.remove(host);
        let mut freed = Vec::new();
        for t in self.tasks.values_mut() {
            freed.extend(t.release_host(host));
        }
        Self::free_slots(&mut self.hosts, freed);
    }

    /// Drops hosts that went quiet, with their pieces and leases.
    pub fn handle_tick(&mut self, now: Instant) -> Vec<HostId> {
        let timeout = self.cfg.host_timeout;
        let gone: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for h in &gone {
            self.remove_host(h);
        }
        let mut freed = Vec::new();
        for t in self.tasks.values_mut() {
            let before = t.origin_leases.len();
            t.origin_leases.retain(|_, l| l.live(now));
            self.lapsed_origin_leases += (before - t.origin_leases.len()) as u64;
            if t.whole_lease.as_ref().is_some_and(|l| !l.live(now)) {
                t.whole_lease = None;
            }
            t.inflight.retain(|_, (parent, since)| {
                let live = now.saturating_duration_since(*since) < PENDING_FOR;
                if !live {
                    freed.push(parent.clone());
                }
                live
            });
        }
        Self::free_slots(&mut self.hosts, freed);
        gone
    }

    pub fn handle_schedule(
        &mut self,
        host: &HostId,
        task_id: TaskId,
        have: PieceSet,
        busy: &PieceSet,
        max_assignments: u32,
        now: Instant,
    ) -> Result<ScheduleReply, SchedError> {
        self.touch(host, now)?;
        let cfg = &self.cfg;
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedError::UnknownTask(task_id))?;
        task.last_active = now;
        let Some(layout) = task.record.layout else {
            task.peers.entry(host.clone()).or_insert_with(|| TaskPeer {
                have: PieceSet::new(0),
            });
            let probe = Self::take_probe(cfg, task, host, now);
            return Ok(ScheduleReply {
                layout: None,
                supports_range: false,
                probe,
                assignments: Vec::new(),
                retry_after_ms: RETRY_AFTER_MS,
            });
        };
        let count = layout.piece_count();
        if have.len() != count || busy.len() != count {
            // The asker doesn't know the layout yet (it waited on someone else's probe):
            // tell it, assign nothing.
            return Ok(ScheduleReply {
                layout: Some(layout),
                supports_range: task.record.supports_range,
                probe: false,
                assignments: Vec::new(),
                retry_after_ms: 0,
            });
        }
        // Keep only pieces that match the record: a daemon can't claim what was never
        // recorded.
        let mut have = have;
        for p in layout.pieces() {
            if have.contains(p) && task.record.digests[p.0 as usize].is_none() {
                have.remove(p);
            }
        }
        task.set_have(host, have.clone());

        let mut order = Self::piece_order(cfg, task, &have, busy);
        let max = max_assignments.min(MAX_ASSIGNMENTS) as usize;
        let mut held_leases = task
            .origin_leases
            .values()
            .filter(|l| &l.host == host && l.live(now))
            .count() as u32;
        let mut task_leases = task.origin_leases.values().filter(|l| l.live(now)).count() as u32;
        // The task's origin budget is shared out, so a cold fetch is split across peers
        // (each then serves what it fetched) rather than taken by the first asker.
        let host_lease_cap = cfg
            .origin_leases_per_host
            .min((cfg.origin_leases_per_task / task.peers.len().max(1) as u32).max(1));
        // The origin's link is the swarm's bottleneck, and the relays keep up with a
        // landing piece only while the origin's output is split evenly over the full
        // budget of fetches: with fewer, each lands faster than its lessee's link can pass
        // it on to every relay. So a host that may take an origin fetch gets one before
        // anything else, even when peers have pieces for it. Without this, hosts whose
        // relay copies fell behind filled their fetch slots from peers first; on 16 hosts
        // the origin's fetches in flight then fell from 16 to 2-6 and the run took 2-3 s
        // longer.
        if task.record.supports_range
            && held_leases < host_lease_cap
            && task_leases < cfg.origin_leases_per_task
            && let Some(i) = order.iter().position(|p| {
                task.holders.get(p.0 as usize).is_some_and(|&c| c == 0)
                    && !task.origin_leases.get(p).is_some_and(|l| l.live(now))
            })
        {
            order[..=i].rotate_right(1);
        }
        let mut assignments = Vec::new();
        let requester = self.hosts.get(host);
        task.rotation = task.rotation.wrapping_add(1);
        let mut candidates = Self::candidates(
            &task.peers,
            host,
            requester,
            &self.hosts,
            now,
            task.rotation,
        );
        let k = cfg.parents_per_piece.min(MAX_PARENTS_PER_PIECE);
        let mut first_choices = Vec::new();
        let mut whole_assigned = false;
        for piece in order {
            if assignments.len() >= max {
                break;
            }
            let digest = task.record.digests[piece.0 as usize];
            if let Some(digest) = digest {
                let mut picked = Self::pick_parents(k, &mut candidates, piece);
                let held = task.holders.get(piece.0 as usize).is_some_and(|&c| c > 0);
                if held
                    && task.peers.len() > MAX_CANDIDATES
                    && picked.as_ref().is_some_and(Vec::is_empty)
                {
                    // The window holds none of it: rank its holders from the whole swarm,
                    // counting what this decision already promised them.
                    let mut holders = Self::to_candidates(
                        task.peers.iter().filter(|(_, p)| p.have.contains(piece)),
                        host,
                        requester,
                        &self.hosts,
                        now,
                    );
                    for c in holders.iter_mut() {
                        c.busy += first_choices.iter().filter(|(_, p)| p == c.id).count() as u32;
                    }
                    picked = Self::pick_parents(k, &mut holders, piece);
                }
                match picked {
                    // Held, but every holder's upload slots are promised: not now.
                    None => continue,
                    Some(parents) if !parents.is_empty() => {
                        first_choices.push((piece, parents[0].host.clone()));
                        assignments.push(Assignment {
                            piece,
                            source: PieceSource::Parents { digest, parents },
                        });
                        continue;
                    }
                    // Held only by hosts under suspicion (an unreachable report, say): wait
                    // for them to clear or time out rather than fetch it from the origin
                    // again. Measured at 32 hosts on congested links: suspicion sent 39%
                    // of the file to the origin a second time.
                    Some(_) if held => continue,
                    // Nobody holds it: the origin, below.
                    Some(_) => {}
                }
            }
            // Nobody live holds it: the origin, under a lease.
            if !task.record.supports_range {
                match &task.whole_lease {
                    Some(l) if l.live(now) && &l.host != host => continue,
                    // The holder is streaming it (the piece is busy on its side); nothing
                    // else to hand out from the origin.
                    Some(l) if l.live(now) && (busy.contains(piece) || whole_assigned) => continue,
                    _ => {
                        task.whole_lease = Some(Lease::new(host.clone(), now + cfg.origin_lease));
                        assignments.push(Assignment {
                            piece,
                            source: PieceSource::OriginWhole,
                        });
                        // One stream covers every piece nobody else holds.
                        whole_assigned = true;
                        continue;
                    }
                }
            }
            match task.origin_leases.get_mut(&piece) {
                Some(l) if l.live(now) => {
                    // Someone is fetching it from the origin: take its bytes as they land.
                    if &l.host != host
                        && l.relays < cfg.landing_relays
                        && let Some(lessee) = self.hosts.get(&l.host)
                        && lessee.usable_parent(now)
                    {
                        l.relays += 1;
                        assignments.push(Assignment {
                            piece,
                            source: PieceSource::Landing {
                                parent: ParentRef {
                                    host: l.host.clone(),
                                    addr: lessee.info.peer_addr,
                                },
                            },
                        });
                    }
                    continue;
                }
                _ if held_leases >= host_lease_cap || task_leases >= cfg.origin_leases_per_task => {
                    continue;
                }
                _ => {
                    if task
                        .origin_leases
                        .insert(piece, Lease::new(host.clone(), now + cfg.origin_lease))
                        .is_some()
                    {
                        // An expired lease the tick had not swept yet.
                        self.lapsed_origin_leases += 1;
                    }
                    held_leases += 1;
                    task_leases += 1;
                    assignments.push(Assignment {
                        piece,
                        source: PieceSource::Origin,
                    });
                }
            }
        }
        drop(candidates);
        for (piece, parent) in first_choices {
            if let Some(h) = self.hosts.get_mut(&parent) {
                h.pending += 1;
            }
            if let Some((old, _)) = task.inflight.insert((host.clone(), piece), (parent, now)) {
                Self::free_slots(&mut self.hosts, [old]);
            }
        }
        let retry_after_ms = if assignments.is_empty() {
            RETRY_AFTER_MS
        } else {
            0
        };
        Ok(ScheduleReply {
            layout: Some(layout),
            supports_range: task.record.supports_range,
            probe: false,
            assignments,
            retry_after_ms,
        })
    }

    /// Missing, not-busy pieces in the order to fetch them: the next few in content order
    /// (a streaming client waits on those), then rarest first.
    fn piece_order(
        cfg: &SchedulerConfig,
        task: &Task,
        have: &PieceSet,
        busy: &PieceSet,
    ) -> Vec<PieceIndex> {
        let wanted: Vec<PieceIndex> = have.missing().filter(|p| !busy.contains(*p)).collect();
        let lookahead = (cfg.in_order_lookahead as usize).min(wanted.len());
        // Lookahead counts from the first piece not yet stored, busy or not.
        let first_missing = have.missing().next().map_or(0, |p| p.0);
        let (head, mut tail): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .partition(|p| p.0 < first_missing + lookahead as u32);
        let holders = |p: &PieceIndex| task.holders.get(p.0 as usize).copied().unwrap_or(0);
        // Pieces nobody has sort last within the rarest-first tail (so that held pieces
        // get replicated before more origin leases are taken) - but they still get
        // assigned in the same reply when the lease budget allows.
        tail.sort_by_key(|p| (holders(p) == 0, holders(p), p.0));
        head.into_iter().chain(tail).collect()
    }

    /// Parent candidates for one decision: every other usable peer of the task, or in a
    /// large swarm a rotating window of [`MAX_CANDIDATES`] of them (ranking thousands of
    /// peers per decision cost milliseconds; the window moves with every decision, so
    /// load still spreads over the whole swarm).
    fn candidates<'a>(
        peers: &'a HashMap<HostId, TaskPeer>,
        requester_id: &HostId,
        requester: Option<&Host>,
        hosts: &'a HashMap<HostId, Host>,
        now: Instant,
        rotation: usize,
    ) -> Vec<Candidate<'a>> {
        let n = peers.len();
        let start = if n > MAX_CANDIDATES {
            rotation.wrapping_mul(MAX_CANDIDATES) % n
        } else {
            0
        };
        Self::to_candidates(
            peers.iter().cycle().skip(start).take(n.min(MAX_CANDIDATES)),
            requester_id,
            requester,
            hosts,
            now,
        )
    }

    fn to_candidates<'a>(
        peers: impl Iterator<Item = (&'a HostId, &'a TaskPeer)>,
        requester_id: &HostId,
        requester: Option<&Host>,
        hosts: &'a HashMap<HostId, Host>,
        now: Instant,
    ) -> Vec<Candidate<'a>> {
        peers
            .filter(|(id, _)| *id != requester_id)
            .filter_map(|(id, p)| hosts.get(id).map(|h| (id, p, h)))
            .filter(|(_, _, h)| h.usable_parent(now))
            .map(|(id, p, h)| Candidate {
                id,
                host: h,
                have: &p.have,
                locality: Self::locality(requester, h),
                busy: h.busy_slots(),
            })
            .collect()
    }

    /// Same idc 1, zone 2, rack 4, out of 7.
    fn locality(requester: Option<&Host>, h: &Host) -> f64 {
        requester.map_or(0.0, |r| {
            let same = |k| r.label(k).is_some() && r.label(k) == h.label(k);
            f64::from(u8::from(same("idc")))
                + 2.0 * f64::from(u8::from(same("zone")))
                + 4.0 * f64::from(u8::from(same("rack")))
        }) / 7.0
    }

    /// Parents for `piece`, best first: the first is the best-scoring holder with a free
    /// upload slot (charged one here), the rest fallbacks in score order. `None` when
    /// holders exist but all are saturated: better another piece now than a queue there.
    fn pick_parents(
        k: usize,
        candidates: &mut [Candidate<'_>],
        piece: PieceIndex,
    ) -> Option<Vec<ParentRef>> {
        // Sort keys computed once: free slots first, then score, then id (stable order).
        let mut keyed: Vec<(bool, std::cmp::Reverse<OrdF64>, usize)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.have.contains(piece))
            .map(|(i, c)| (c.saturated(), std::cmp::Reverse(OrdF64(c.score())), i))
            .collect();
        if keyed.is_empty() {
            return Some(Vec::new());
        }
        let k = k.max(1);
        let cmp = |a: &(bool, std::cmp::Reverse<OrdF64>, usize),
                   b: &(bool, std::cmp::Reverse<OrdF64>, usize)| {
            (a.0, &a.1)
                .cmp(&(b.0, &b.1))
                .then_with(|| candidates[a.2].id.cmp(candidates[b.2].id))
        };
        if keyed.len() > k {
            keyed.select_nth_unstable_by(k - 1, cmp);
            keyed.truncate(k);
        }
        keyed.sort_by(cmp);
        let first = keyed[0].2;
        if candidates[first].saturated() {
            return None;
        }
        candidates[first].busy += 1;
        Some(
            keyed
                .iter()
                .map(|&(_, _, i)| ParentRef {
                    host: candidates[i].id.clone(),
                    addr: candidates[i].host.info.peer_addr,
                })
                .collect(),
        )
    }

    pub fn task_summaries(&self) -> Vec<TaskSummary> {
        let mut v: Vec<TaskSummary> = self
            .tasks
            .iter()
            .map(|(id, t)| TaskSummary {
                task: *id,
                url: t.record.url.clone(),
                content_length: t.record.layout.map(|l| l.content_length),
                piece_size: t.record.layout.map(|l| l.piece_size),
                tail_piece_size: t.record.layout.map(|l| l.tail_piece_size),
                pieces: t.piece_count(),
                pieces_recorded: t.record.digests.iter().filter(|d| d.is_some()).count() as u32,
                origin_leases: t.origin_leases.len(),
                peers: {
                    let mut p: Vec<PeerSummary> = t
                        .peers
                        .iter()
                        .map(|(h, p)| PeerSummary {
                            host: h.clone(),
                            pieces: p.have.count(),
                        })
                        .collect();
                    p.sort_by(|a, b| a.host.cmp(&b.host));
                    p
                },
            })
            .collect();
        v.sort_by_key(|a| a.task);
        v
    }

    pub fn host_summaries(&self, now: Instant) -> Vec<HostSummary> {
        let mut v: Vec<HostSummary> = self
            .hosts
            .iter()
            .map(|(id, h)| HostSummary {
                host: id.clone(),
                peer_addr: h.info.peer_addr,
                labels: h.info.labels.iter().cloned().collect(),
                upload_slots: h.info.upload_slots,
                uploads_in_flight: h.uploads_in_flight,
                tasks: self
                    .tasks
                    .values()
                    .filter(|t| t.peers.contains_key(id))
                    .count(),
                seconds_since_seen: now.saturating_duration_since(h.last_seen).as_secs_f64(),
                suspect: !h.usable_parent(now),
            })
            .collect();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::layout::MIN_PIECE_SIZE;

    const PS: u32 = MIN_PIECE_SIZE;

    /// The tests' origin budget: small enough to share out among a few peers.
    const TASK_BUDGET: u32 = 4;

    fn cfg() -> SchedulerConfig {
        SchedulerConfig {
            layout: LayoutRule {
                min_piece_size: PS,
                max_piece_size: PS,
                ..Default::default()
            },
            origin_leases_per_task: TASK_BUDGET,
            // Off except in the tests of it, so the others see origin leases alone.
            landing_relays: 0,
            ..Default::default()
        }
    }

    fn host(n: usize) -> HostId {
        HostId::new(format!("h{n}")).unwrap()
    }

    fn info(n: usize, labels: &[(&str, &str)]) -> HostInfo {
        HostInfo {
            host: host(n),
            session: SessionId(1),
            peer_addr: ([127, 0, 0, 1], 10000 + n as u16).into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            upload_slots: 4,
        }
    }

    fn task() -> TaskId {
        TaskId::for_url("http://origin/file", &[], None)
    }

    fn digest(p: u32) -> Sha256Digest {
        Sha256Digest::of(&p.to_le_bytes())
    }

    /// Records of pieces `0..n` with their test digests.
    fn records(n: u32) -> Vec<PieceRecord> {
        (0..n)
            .map(|p| PieceRecord {
                piece: PieceIndex(p),
                digest: digest(p),
            })
            .collect()
    }

    /// A scheduler with `n` hosts registered for one task of `pieces` pieces.
    fn setup(n: usize, pieces: u32, range: bool) -> (Scheduler, Instant) {
        let now = Instant::now();
        let mut s = Scheduler::new(cfg());
        for i in 0..n {
            s.handle_register_host(info(i, &[]), now);
        }
        let v = s
            .handle_register_peer(&host(0), task(), "http://origin/file", None, now)
            .unwrap();
        assert!(v.probe);
        for i in 1..n {
            let v = s
                .handle_register_peer(&host(i), task(), "http://origin/file", None, now)
                .unwrap();
            assert!(!v.probe, "only one prober");
        }
        s.handle_report_layout(
            &host(0),
            task(),
            u64::from(PS) * u64::from(pieces),
            range,
            now,
        )
        .unwrap();
        (s, now)
    }

    fn schedule(s: &mut Scheduler, h: usize, have: &PieceSet, now: Instant) -> ScheduleReply {
        s.handle_schedule(
            &host(h),
            task(),
            have.clone(),
            &PieceSet::new(have.len()),
            16,
            now,
        )
        .unwrap()
    }

    #[test]
    fn layout_fixed_once_and_conflicts_reported() {
        let (mut s, now) = setup(2, 10, true);
        let err = s
            .handle_report_layout(&host(1), task(), 5, true, now)
            .unwrap_err();
        assert!(
            matches!(err, SchedError::LayoutConflict { known, .. } if known == u64::from(PS) * 10)
        );
        assert_eq!(s.take_dirty().len(), 1);
    }

    #[test]
    fn probe_lease_moves_on_when_prober_times_out() {
        let now = Instant::now();
        let mut s = Scheduler::new(cfg());
        s.handle_register_host(info(0, &[]), now);
        s.handle_register_host(info(1, &[]), now);
        assert!(
            s.handle_register_peer(&host(0), task(), "u", None, now)
                .unwrap()
                .probe
        );
        let r = s
            .handle_schedule(
                &host(1),
                task(),
                PieceSet::new(0),
                &PieceSet::new(0),
                4,
                now,
            )
            .unwrap();
        assert!(!r.probe);
        let later = now + DEFAULT_PROBE_LEASE + Duration::from_millis(1);
        let r = s
            .handle_schedule(
                &host(1),
                task(),
                PieceSet::new(0),
                &PieceSet::new(0),
                4,
                later,
            )
            .unwrap();
        assert!(r.probe, "lease expired, next asker probes");
    }

    #[test]
    fn cold_pieces_leased_to_one_peer_each() {
        // 4 peers share the task's origin budget of 4: one range each, all different.
        let (mut s, now) = setup(4, 16, true);
        let mut leased = vec![0; 16];
        for h in 0..4 {
            let r = schedule(&mut s, h, &PieceSet::new(16), now);
            assert_eq!(r.assignments.len(), 1);
            for a in r.assignments {
                assert_eq!(a.source, PieceSource::Origin);
                leased[a.piece.0 as usize] += 1;
            }
        }
        assert_eq!(leased.iter().sum::<i32>(), 4);
        assert!(leased.iter().all(|&c| c <= 1), "{leased:?}");
        // The budget is spent: a fifth asker (or a second ask) gets no more origin work.
        let r = schedule(&mut s, 0, &PieceSet::new(16), now);
        assert!(r.assignments.is_empty());
        // A lone peer may use the whole budget.
        let (mut s, now) = setup(1, 16, true);
        let r = schedule(&mut s, 0, &PieceSet::new(16), now);
        assert_eq!(r.assignments.len(), TASK_BUDGET as usize);
    }

    #[test]
    fn a_host_that_may_take_an_origin_fetch_gets_it_before_peer_pieces() {
        let (mut s, now) = setup(3, 8, true);
        let recs = records(4);
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &recs, now)
            .unwrap();
        let one = |s: &mut Scheduler| {
            let none = PieceSet::new(8);
            s.handle_schedule(&host(1), task(), none.clone(), &none, 1, now)
                .unwrap()
                .assignments
        };
        // Pieces 0-3 are held by h0, yet the one slot goes to the origin (rarest-first
        // alone would have picked a held piece).
        let a = one(&mut s);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].source, PieceSource::Origin);
        assert!(a[0].piece.0 >= 4, "{a:?}");
        // With its share of the origin budget taken, peers come first again.
        let a = one(&mut s);
        assert!(matches!(a[0].source, PieceSource::Parents { .. }), "{a:?}");
    }

    #[test]
    fn announce_without_a_layout_asks_for_one() {
        let now = Instant::now();
        let mut s = Scheduler::new(cfg());
        s.handle_register_host(info(0, &[]), now);
        s.handle_register_peer(&host(0), task(), "http://origin/file", None, now)
            .unwrap();
        let rec = PieceRecord {
            piece: PieceIndex(0),
            digest: digest(0),
        };
        let err = s
            .handle_announce(&host(0), task(), AnnounceSource::Origin, &[rec], now)
            .unwrap_err();
        assert!(matches!(err, SchedError::NoLayout(_)), "{err}");
        assert_eq!(err.code(), ControlErrorCode::UnknownTask);
        // After the layout, the same announce is taken.
        s.handle_report_layout(&host(0), task(), u64::from(PS), true, now)
            .unwrap();
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &[rec], now)
            .unwrap();
    }

    #[test]
    fn origin_lease_lasts_while_its_holder_renews_it() {
        let (mut s, now) = setup(2, 1, true);
        let r = schedule(&mut s, 0, &PieceSet::new(1), now);
        assert_eq!(r.assignments[0].source, PieceSource::Origin);
        let lease = DEFAULT_ORIGIN_LEASE;
        let mut t = now;
        // Renewed every 2/3 of a lease, for three leases: nobody else gets the piece.
        for _ in 0..5 {
            t += lease * 2 / 3;
            s.handle_heartbeat(&host(1), SessionId(1), 0, t).unwrap();
            let renewed = s
                .handle_renew_origin_leases(&host(0), task(), &[PieceIndex(0)], t)
                .unwrap();
            assert_eq!(renewed, 1);
            assert!(s.handle_tick(t).is_empty());
            assert!(
                schedule(&mut s, 1, &PieceSet::new(1), t)
                    .assignments
                    .is_empty()
            );
        }
        // Only the holder renews; an unknown task is an error.
        let by_other = s.handle_renew_origin_leases(&host(1), task(), &[PieceIndex(0)], t);
        assert_eq!(by_other.unwrap(), 0);
        let other_task = TaskId::for_url("http://origin/other", &[], None);
        assert!(matches!(
            s.handle_renew_origin_leases(&host(0), other_task, &[PieceIndex(0)], t),
            Err(SchedError::UnknownTask(_))
        ));
        assert_eq!(s.take_lapsed_origin_leases(), 0);
        // Renewals stop: one lease later the piece goes to the next asker, counted as lapsed.
        let later = t + lease + Duration::from_millis(1);
        let r = schedule(&mut s, 1, &PieceSet::new(1), later);
        assert_eq!(r.assignments[0].source, PieceSource::Origin);
        assert_eq!(s.take_lapsed_origin_leases(), 1);
        let late = s.handle_renew_origin_leases(&host(0), task(), &[PieceIndex(0)], later);
        assert_eq!(late.unwrap(), 0, "the lapsed holder no longer owns it");
    }

    #[test]
    fn peers_take_an_origin_fetch_as_it_lands_then_check_the_record() {
        let (mut s, now) = setup(6, 1, true);
        s.cfg.landing_relays = 3;
        let r = schedule(&mut s, 0, &PieceSet::new(1), now);
        assert_eq!(r.assignments[0].source, PieceSource::Origin);
        // The lessee is not sent to itself.
        assert!(
            schedule(&mut s, 0, &PieceSet::new(1), now)
                .assignments
                .is_empty()
        );
        let lessee = ParentRef {
            host: host(0),
            addr: info(0, &[]).peer_addr,
        };
        for h in 1..4 {
            let r = schedule(&mut s, h, &PieceSet::new(1), now);
            assert_eq!(
                r.assignments,
                vec![Assignment {
                    piece: PieceIndex(0),
                    source: PieceSource::Landing {
                        parent: lessee.clone()
                    },
                }]
            );
        }
        // Three relays per fetch: the fourth asker waits for a holder.
        assert!(
            schedule(&mut s, 4, &PieceSet::new(1), now)
                .assignments
                .is_empty()
        );
        // Nothing to check against until the lessee announces.
        assert_eq!(
            s.piece_records(&host(1), task(), &[PieceIndex(0)], now),
            Ok(vec![])
        );
        let rec = [PieceRecord {
            piece: PieceIndex(0),
            digest: digest(0),
        }];
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &rec, now)
            .unwrap();
        assert_eq!(
            s.piece_records(&host(1), task(), &[PieceIndex(0), PieceIndex(7)], now),
            Ok(rec.to_vec())
        );
        let r = schedule(&mut s, 4, &PieceSet::new(1), now);
        assert!(matches!(
            &r.assignments[0].source,
            PieceSource::Parents { digest: d, parents } if *d == digest(0) && parents[0].host == host(0)
        ));
    }

    #[test]
    fn no_landing_relays_when_turned_off_or_the_lessee_is_suspect() {
        let (mut s, now) = setup(3, 1, true);
        schedule(&mut s, 0, &PieceSet::new(1), now);
        assert!(
            schedule(&mut s, 1, &PieceSet::new(1), now)
                .assignments
                .is_empty()
        );
        s.cfg.landing_relays = 3;
        s.handle_piece_failed(
            &host(2),
            task(),
            PieceIndex(0),
            Some(&host(0)),
            PieceFailure::Unreachable,
            now,
        )
        .unwrap();
        assert!(
            schedule(&mut s, 2, &PieceSet::new(1), now)
                .assignments
                .is_empty()
        );
        let later = now + UNREACHABLE_FOR + Duration::from_millis(1);
        assert!(matches!(
            schedule(&mut s, 2, &PieceSet::new(1), later).assignments[0].source,
            PieceSource::Landing { .. }
        ));
    }

    #[test]
    fn recorded_pieces_come_from_parents_with_digest() {
        let (mut s, now) = setup(3, 4, true);
        let r = schedule(&mut s, 0, &PieceSet::new(4), now);
        assert_eq!(r.assignments.len(), 1, "a third of the origin budget");
        let recs = records(4);
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &recs, now)
            .unwrap();
        let r = schedule(&mut s, 1, &PieceSet::new(4), now);
        assert_eq!(r.assignments.len(), 4);
        for a in &r.assignments {
            match &a.source {
                PieceSource::Parents { digest: d, parents } => {
                    assert_eq!(*d, digest(a.piece.0));
                    assert_eq!(parents[0].host, host(0));
                }
                other => panic!("expected parents, got {other:?}"),
            }
        }
    }

    #[test]
    fn first_origin_digest_wins_and_conflicts_are_refused() {
        let (mut s, now) = setup(2, 2, true);
        let rec = |d| {
            [PieceRecord {
                piece: PieceIndex(0),
                digest: d,
            }]
        };
        s.handle_announce(
            &host(0),
            task(),
            AnnounceSource::Origin,
            &rec(digest(0)),
            now,
        )
        .unwrap();
        let err = s
            .handle_announce(
                &host(1),
                task(),
                AnnounceSource::Origin,
                &rec(digest(9)),
                now,
            )
            .unwrap_err();
        assert_eq!(
            err,
            SchedError::DigestConflict {
                task: task(),
                piece: PieceIndex(0)
            }
        );
        // A peer-sourced piece with no record is ignored, not recorded.
        s.handle_announce(
            &host(1),
            task(),
            AnnounceSource::Peer,
            &[PieceRecord {
                piece: PieceIndex(1),
                digest: digest(1),
            }],
            now,
        )
        .unwrap();
        assert_eq!(s.task_summaries()[0].pieces_recorded, 1);
    }

    #[test]
    fn no_range_gives_one_whole_lease() {
        let (mut s, now) = setup(3, 8, false);
        let r0 = schedule(&mut s, 0, &PieceSet::new(8), now);
        assert_eq!(r0.assignments.len(), 1);
        assert_eq!(r0.assignments[0].source, PieceSource::OriginWhole);
        let r1 = schedule(&mut s, 1, &PieceSet::new(8), now);
        assert!(r1.assignments.is_empty());
        assert!(r1.retry_after_ms > 0);
        // While the holder streams (its pieces busy), nothing more is handed out.
        let r0 = s
            .handle_schedule(
                &host(0),
                task(),
                PieceSet::new(8),
                &PieceSet::full(8),
                16,
                now,
            )
            .unwrap();
        assert!(r0.assignments.is_empty());
    }

    #[test]
    fn dead_host_releases_leases_and_stops_being_a_parent() {
        let (mut s, now) = setup(2, 4, true);
        let r = schedule(&mut s, 0, &PieceSet::new(4), now);
        assert_eq!(r.assignments.len(), 2, "half the origin budget");
        s.handle_announce(
            &host(0),
            task(),
            AnnounceSource::Origin,
            &[PieceRecord {
                piece: PieceIndex(0),
                digest: digest(0),
            }],
            now,
        )
        .unwrap();
        // h1 keeps heartbeating; h0 goes silent.
        let later = now + DEFAULT_HOST_TIMEOUT + Duration::from_secs(1);
        s.handle_heartbeat(&host(1), SessionId(1), 0, later)
            .unwrap();
        assert_eq!(s.handle_tick(later), vec![host(0)]);
        let r = schedule(&mut s, 1, &PieceSet::new(4), later);
        assert_eq!(r.assignments.len(), 4);
        assert!(
            r.assignments
                .iter()
                .all(|a| a.source == PieceSource::Origin)
        );
        assert!(matches!(
            s.handle_heartbeat(&host(0), SessionId(1), 0, later),
            Err(SchedError::UnknownHost(_))
        ));
    }

    #[test]
    fn corrupt_reports_remove_piece_and_quarantine_parent() {
        let (mut s, now) = setup(3, 4, true);
        let recs = records(4);
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &recs, now)
            .unwrap();
        s.handle_announce(&host(2), task(), AnnounceSource::Restored, &recs, now)
            .unwrap();
        s.handle_piece_failed(
            &host(1),
            task(),
            PieceIndex(0),
            Some(&host(0)),
            PieceFailure::Corrupt,
            now,
        )
        .unwrap();
        let r = schedule(&mut s, 1, &PieceSet::new(4), now);
        let p0 = r
            .assignments
            .iter()
            .find(|a| a.piece == PieceIndex(0))
            .unwrap();
        match &p0.source {
            PieceSource::Parents { parents, .. } => {
                assert!(parents.iter().all(|p| p.host != host(0)), "h0 lost piece 0");
            }
            o => panic!("{o:?}"),
        }
        for p in 1..3 {
            s.handle_piece_failed(
                &host(1),
                task(),
                PieceIndex(p),
                Some(&host(0)),
                PieceFailure::Corrupt,
                now,
            )
            .unwrap();
        }
        let r = schedule(&mut s, 1, &PieceSet::new(4), now);
        for a in r.assignments {
            if let PieceSource::Parents { parents, .. } = a.source {
                assert!(parents.iter().all(|p| p.host != host(0)), "h0 quarantined");
            }
        }
    }

    #[test]
    fn parents_ranked_by_locality_and_load() {
        let now = Instant::now();
        let mut s = Scheduler::new(cfg());
        s.handle_register_host(info(0, &[("zone", "a"), ("rack", "r1")]), now);
        s.handle_register_host(info(1, &[("zone", "b")]), now);
        s.handle_register_host(info(2, &[("zone", "a"), ("rack", "r1")]), now);
        for h in 0..3 {
            s.handle_register_peer(&host(h), task(), "u", None, now)
                .unwrap();
        }
        s.handle_report_layout(&host(0), task(), u64::from(PS), true, now)
            .unwrap();
        let rec = [PieceRecord {
            piece: PieceIndex(0),
            digest: digest(0),
        }];
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &rec, now)
            .unwrap();
        s.handle_announce(&host(1), task(), AnnounceSource::Peer, &rec, now)
            .unwrap();
        let first = |s: &mut Scheduler| match &schedule(s, 2, &PieceSet::new(1), now).assignments[0]
            .source
        {
            PieceSource::Parents { parents, .. } => parents[0].host.clone(),
            o => panic!("{o:?}"),
        };
        assert_eq!(first(&mut s), host(0), "same rack wins when idle");
        // h0's 4 upload slots get promised (h2 asking again re-promises, so count 4
        // distinct pieces of h0's load through the scheduler's own bookkeeping).
        if let Some(h) = s.hosts.get_mut(&host(0)) {
            h.pending = 4;
        }
        assert_eq!(
            first(&mut s),
            host(1),
            "a saturated parent loses to an idle remote one"
        );
    }

    #[test]
    fn restarted_session_forgets_pieces_until_reannounced() {
        let (mut s, now) = setup(2, 2, true);
        let recs = records(2);
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &recs, now)
            .unwrap();
        let mut restarted = info(0, &[]);
        restarted.session = SessionId(2);
        s.handle_register_host(restarted, now);
        let r = schedule(&mut s, 1, &PieceSet::new(2), now);
        assert!(
            r.assignments
                .iter()
                .all(|a| a.source == PieceSource::Origin)
        );
    }

    #[test]
    fn restore_keeps_digests_across_restart() {
        let (mut s, now) = setup(1, 2, true);
        s.handle_announce(
            &host(0),
            task(),
            AnnounceSource::Origin,
            &[PieceRecord {
                piece: PieceIndex(1),
                digest: digest(1),
            }],
            now,
        )
        .unwrap();
        let dirty = s.take_dirty();
        let mut s2 = Scheduler::new(cfg());
        s2.restore(dirty, now);
        s2.handle_register_host(info(5, &[]), now);
        let v = s2
            .handle_register_peer(&host(5), task(), "u", None, now)
            .unwrap();
        assert!(!v.probe, "layout survived");
        assert_eq!(
            v.digests,
            vec![PieceRecord {
                piece: PieceIndex(1),
                digest: digest(1)
            }]
        );
    }

    #[test]
    fn swarm_simulation_fetches_each_piece_from_origin_once() {
        // 20 hosts, 64 pieces, every host loops schedule -> fetch -> announce.
        let n = 20;
        let pieces = 64;
        let (mut s, now) = setup(n, pieces, true);
        let mut have: Vec<PieceSet> = (0..n).map(|_| PieceSet::new(pieces)).collect();
        let mut origin_fetches = 0;
        for round in 0..200 {
            let t = now + Duration::from_millis(round * 10);
            for (h, have_h) in have.iter_mut().enumerate() {
                let r = s
                    .handle_schedule(
                        &host(h),
                        task(),
                        have_h.clone(),
                        &PieceSet::new(pieces),
                        4,
                        t,
                    )
                    .unwrap();
                for a in r.assignments {
                    let source = match a.source {
                        PieceSource::Origin => {
                            origin_fetches += 1;
                            AnnounceSource::Origin
                        }
                        PieceSource::Parents { .. } | PieceSource::Landing { .. } => {
                            AnnounceSource::Peer
                        }
                        PieceSource::OriginWhole => unreachable!(),
                    };
                    have_h.insert(a.piece);
                    s.handle_announce(
                        &host(h),
                        task(),
                        source,
                        &[PieceRecord {
                            piece: a.piece,
                            digest: digest(a.piece.0),
                        }],
                        t,
                    )
                    .unwrap();
                }
            }
            if have.iter().all(|h| h.is_full()) {
                break;
            }
        }
        assert!(have.iter().all(|h| h.is_full()), "everyone done");
        assert_eq!(origin_fetches, pieces, "each piece left the origin once");
    }

    #[test]
    fn large_swarm_finds_the_one_holder_outside_the_candidate_window() {
        let n = MAX_CANDIDATES * 2 + 7;
        let (mut s, now) = setup(n, 4, true);
        let rec = [PieceRecord {
            piece: PieceIndex(3),
            digest: digest(3),
        }];
        s.handle_announce(&host(n - 1), task(), AnnounceSource::Origin, &rec, now)
            .unwrap();
        let mut holders = vec![host(n - 1)];
        for h in 0..n - 1 {
            let r = schedule(&mut s, h, &PieceSet::new(4), now);
            let a = r
                .assignments
                .iter()
                .find(|a| a.piece == PieceIndex(3))
                .expect("piece 3 assigned");
            match &a.source {
                PieceSource::Parents { parents, .. } => {
                    assert!(holders.contains(&parents[0].host), "{:?}", parents[0].host)
                }
                other => panic!("host {h}: a held piece went to {other:?}"),
            }
            // It lands; the requester's slot promise is settled and it holds the piece.
            s.handle_announce(&host(h), task(), AnnounceSource::Peer, &rec, now)
                .unwrap();
            holders.push(host(h));
        }
        let t = &s.tasks[&task()];
        assert_eq!(t.holders[3] as usize, n, "holder counts follow announces");
        assert_eq!(t.holders[0], 0);
        assert!(t.inflight.keys().all(|(_, p)| *p != PieceIndex(3)));
        assert!(
            s.hosts.values().all(|h| h.pending <= 4 * 3),
            "promises settled"
        );
    }

    #[test]
    fn a_saturated_only_holder_is_not_queued_on_and_never_bypassed_to_the_origin() {
        // One holder with 4 upload slots, 8 requesters: 4 get it from the holder, the
        // rest get other pieces (origin work here) and piece 0 later, never from the
        // origin.
        let (mut s, now) = setup(9, 8, true);
        let rec = [PieceRecord {
            piece: PieceIndex(0),
            digest: digest(0),
        }];
        s.handle_announce(&host(0), task(), AnnounceSource::Origin, &rec, now)
            .unwrap();
        let mut from_holder = 0;
        for h in 1..9 {
            let r = schedule(&mut s, h, &PieceSet::new(8), now);
            for a in &r.assignments {
                if a.piece == PieceIndex(0) {
                    assert!(matches!(a.source, PieceSource::Parents { .. }));
                    from_holder += 1;
                }
            }
        }
        assert_eq!(from_holder, 4, "one per upload slot");
        // One lands: a slot frees, the next asker gets piece 0.
        s.handle_announce(&host(1), task(), AnnounceSource::Peer, &rec, now)
            .unwrap();
        let r = schedule(&mut s, 8, &PieceSet::new(8), now);
        assert!(r.assignments.iter().any(|a| a.piece == PieceIndex(0)
            && matches!(&a.source, PieceSource::Parents { parents, .. } if parents.len() == 2)));
    }
}
