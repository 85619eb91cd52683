//! Pieces being fetched from the origin, shared with peers while they land.
//!
//! Store-and-forward relaying leaves every host's upload idle until a whole piece has
//! arrived somewhere: on 16 hosts that was most of the first second of a cold fetch, and
//! the last origin pieces of a run still had all their copies to make after the origin
//! was done. So an origin fetch registers its piece here and appends the body's chunks
//! as they arrive; the peer server streams them to the peers the supernode sends (with
//! [`proto::control::PieceSource::Landing`]) as they come.
//!
//! Nobody can check those bytes until the piece is complete, and the record a requester
//! checks them against is the digest this daemon announces. So a landing ends
//! ([`Landings::recorded`]) only after that announce was accepted; the peer server then
//! finishes the stream, and the requester fetches the record and compares. A failed
//! fetch or announce ends it as failed, and the stream is reset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::{PieceIndex, TaskId};
use tokio::sync::{Notify, watch};

/// Readers are woken once this much has landed since the last wake (and at the end): the
/// origin's body comes in chunks of a few KiB, and writing each to QUIC as it came made
/// part-filled packets (8% more packets on the hosts' links in the 16-host bench).
const WAKE_EVERY: usize = 64 * 1024;

/// How a landing ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandingEnd {
    /// Complete, stored, and its digest recorded at the supernode.
    Recorded,
    /// The origin fetch, the store or the announce failed: what was sent is worthless.
    Failed,
}

#[derive(Clone, Debug, Default)]
pub struct LandingState {
    /// The body so far, in the origin's chunks (shared, not copied, with the readers).
    pub chunks: Vec<Bytes>,
    pub end: Option<LandingEnd>,
    /// Bytes landed since readers were last woken.
    unannounced: usize,
}

/// One piece being fetched from the origin.
pub struct Landing {
    pub len: u32,
    state: watch::Sender<LandingState>,
}

impl Landing {
    pub fn push(&self, chunk: Bytes) {
        self.state.send_if_modified(|s| {
            s.unannounced += chunk.len();
            s.chunks.push(chunk);
            let wake = s.unannounced >= WAKE_EVERY;
            if wake {
                s.unannounced = 0;
            }
            wake
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<LandingState> {
        self.state.subscribe()
    }

    fn end(&self, end: LandingEnd) {
        self.state.send_if_modified(|s| {
            if s.end.is_some() {
                return false;
            }
            s.end = Some(end);
            if end == LandingEnd::Failed {
                s.chunks = Vec::new();
            }
            true
        });
    }
}

#[derive(Default)]
struct Inner {
    pieces: HashMap<(TaskId, PieceIndex), Arc<Landing>>,
    /// Downloads running here, by task (a count: one task can be asked for twice).
    active: HashMap<TaskId, u32>,
}

/// Every landing piece of this daemon, shared by the download engine and the peer server.
#[derive(Default)]
pub struct Landings {
    inner: Mutex<Inner>,
    added: Notify,
}

impl Landings {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a download of `task` as running until the guard drops; any landing of the
    /// task still open then ends as failed.
    pub fn task(self: &Arc<Self>, task: TaskId) -> TaskGuard {
        *self.inner().active.entry(task).or_insert(0) += 1;
        TaskGuard {
            landings: self.clone(),
            task,
        }
    }

    /// Registers an origin fetch of `piece`; it is served to peers from now on.
    pub fn begin(&self, task: TaskId, piece: PieceIndex, len: u32) -> Arc<Landing> {
        let (state, _) = watch::channel(LandingState::default());
        let landing = Arc::new(Landing { len, state });
        if let Some(old) = self.inner().pieces.insert((task, piece), landing.clone()) {
            old.end(LandingEnd::Failed);
        }
        self.added.notify_waiters();
        landing
    }

    pub fn get(&self, task: &TaskId, piece: PieceIndex) -> Option<Arc<Landing>> {
        self.inner().pieces.get(&(*task, piece)).cloned()
    }

    /// Whether a download of `task` runs here, so a landing of it may yet be registered.
    pub fn is_active(&self, task: &TaskId) -> bool {
        self.inner().active.contains_key(task)
    }

    /// The landing of `piece`, waiting up to `wait` for it to be registered: the
    /// supernode may send a peer here before this daemon has started the origin fetch
    /// it was just given.
    pub async fn wait_for(
        &self,
        task: &TaskId,
        piece: PieceIndex,
        wait: Duration,
    ) -> Option<Arc<Landing>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            // Registered before looking, so a landing added in between still wakes us.
            added.as_mut().enable();
            if let Some(l) = self.get(task, piece) {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }

    /// The piece's digest is recorded: its landing ends well and it is served from the
    /// store from now on.
    pub fn recorded(&self, task: &TaskId, piece: PieceIndex) {
        self.finish(task, piece, LandingEnd::Recorded);
    }

    pub fn failed(&self, task: &TaskId, piece: PieceIndex) {
        self.finish(task, piece, LandingEnd::Failed);
    }

    fn finish(&self, task: &TaskId, piece: PieceIndex, end: LandingEnd) {
        let landing = self.inner().pieces.remove(&(*task, piece));
        if let Some(l) = landing {
            l.end(end);
        }
    }
}

/// See [`Landings::task`].
pub struct TaskGuard {
    landings: Arc<Landings>,
    task: TaskId,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut inner = self.landings.inner();
        let last = match inner.active.get_mut(&self.task) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if !last {
            return;
        }
        inner.active.remove(&self.task);
        let open: Vec<_> = inner
            .pieces
            .keys()
            .filter(|(t, _)| *t == self.task)
            .copied()
            .collect();
        let ended: Vec<Arc<Landing>> = open.iter().filter_map(|k| inner.pieces.remove(k)).collect();
        drop(inner);
        for l in ended {
            l.end(LandingEnd::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskId {
        TaskId::for_url("http://origin/blob", &[], None)
    }

    #[tokio::test]
    async fn readers_see_chunks_then_the_end() {
        let l = Arc::new(Landings::default());
        let _g = l.task(task());
        let landing = l.begin(task(), PieceIndex(3), (6 + WAKE_EVERY) as u32);
        let mut rx = landing.subscribe();
        landing.push(Bytes::from_static(b"abc"));
        // Too little to wake anyone for; a big chunk does.
        assert!(!rx.has_changed().unwrap());
        landing.push(Bytes::from(vec![0u8; WAKE_EVERY]));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().chunks.len(), 2);
        landing.push(Bytes::from_static(b"def"));
        l.recorded(&task(), PieceIndex(3));
        rx.changed().await.unwrap();
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.chunks.concat().len(), 6 + WAKE_EVERY);
        assert!(s.chunks.concat().ends_with(b"def"));
        assert_eq!(s.end, Some(LandingEnd::Recorded));
        // Recorded landings are served from the store, not from here.
        assert!(l.get(&task(), PieceIndex(3)).is_none());
    }

    #[tokio::test]
    async fn a_waiting_server_finds_a_landing_registered_later() {
        let l = Arc::new(Landings::default());
        let _g = l.task(task());
        assert!(l.is_active(&task()));
        let later = {
            let l = l.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                l.begin(task(), PieceIndex(1), 10);
            })
        };
        let got = l
            .wait_for(&task(), PieceIndex(1), Duration::from_secs(5))
            .await;
        assert_eq!(got.map(|g| g.len), Some(10));
        later.await.unwrap();
        assert!(
            l.wait_for(&task(), PieceIndex(2), Duration::from_millis(20))
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_download_ending_fails_what_is_still_landing() {
        let l = Arc::new(Landings::default());
        let g = l.task(task());
        let g2 = l.task(task());
        let landing = l.begin(task(), PieceIndex(0), 4);
        landing.push(Bytes::from_static(b"ab"));
        let rx = landing.subscribe();
        drop(g);
        // Another download of the task still runs: nothing ends yet.
        assert_eq!(rx.borrow().end, None);
        drop(g2);
        assert_eq!(rx.borrow().end, Some(LandingEnd::Failed));
        assert!(!l.is_active(&task()));
        assert!(l.get(&task(), PieceIndex(0)).is_none());
    }
}
