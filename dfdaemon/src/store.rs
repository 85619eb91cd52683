//! The local piece store: one data file per task plus sled metadata.
//!
//! * `meta.v2` tree: task id -> [`TaskMeta`] (URL, layout, expected content digest, whether
//!   the whole content was verified, last access for LRU).
//! * `pieces.v2` tree: task id ++ piece index (big-endian) -> the piece's sha256. A key
//!   exists only after the piece's bytes were written, so a crash between the two leaves
//!   a piece missing (refetched), never a record pointing at unwritten bytes.
//! * `data/<task>.data`: the content at its final offsets; pieces are written with
//!   positioned writes, so pieces arriving out of order need no reassembly.
//!
//! Every read from disk is verified against the stored digest before its bytes leave this
//! module: a flipped bit on disk is reported as [`StoreError::Corrupt`], the piece is
//! forgotten and gets refetched; it is never served. The pieces written last are also
//! kept in memory up to a byte budget ([`RecentPieces`]): those bytes were verified and
//! have not left memory since, so serving them needs neither a read nor a hash. In a
//! swarm most uploads are of a piece that just landed; this halves the hashing and
//! skips a page-cache copy per uploaded byte.
//!
//! Space: tasks reserve their full content length up front against the quota; complete,
//! unused tasks are evicted least-recently-used first to make room.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use proto::{PieceIndex, PieceLayout, PieceSet, Sha256Digest, TaskId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("piece {piece} of task {task} is corrupt on disk (digest mismatch); dropped")]
    Corrupt { task: TaskId, piece: PieceIndex },
    #[error("piece {piece} of task {task} is not stored")]
    Missing { task: TaskId, piece: PieceIndex },
    #[error("task {0} is not in the store")]
    UnknownTask(TaskId),
    #[error("task {0} has no layout yet")]
    NoLayout(TaskId),
    #[error("piece {piece} of task {task} has {got} bytes, layout says {want}")]
    PieceLength {
        task: TaskId,
        piece: PieceIndex,
        got: usize,
        want: u32,
    },
    #[error("disk quota: need {need} bytes, {free} free of {quota} after evicting unused content")]
    Quota { need: u64, free: u64, quota: u64 },
    #[error("store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store metadata: {0}")]
    Sled(#[from] sled::Error),
    #[error("store metadata encoding: {0}")]
    Encode(#[from] postcard::Error),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskMeta {
    pub url: String,
    pub layout: Option<PieceLayout>,
    pub supports_range: bool,
    pub content_digest: Option<Sha256Digest>,
    /// The whole content was checked against `content_digest` (or had none to check).
    pub complete: bool,
    pub last_access: u64,
}

struct Entry {
    meta: TaskMeta,
    stored: PieceSet,
    digests: Vec<Option<Sha256Digest>>,
    file: Option<Arc<File>>,
    /// The same file opened for direct I/O, where the filesystem allows it.
    direct: Option<Arc<File>>,
    /// The file was handed out for linking since the store opened: whoever got it may
    /// have written to it, so later hand-outs check it on disk first.
    handed_out: bool,
    /// Readers and downloads using the task; a task in use is never evicted.
    users: u32,
}

pub struct Store {
    dir: PathBuf,
    quota: u64,
    meta: sled::Tree,
    pieces: sled::Tree,
    /// Task -> unix second until which it is kept from eviction (pre-warmed content).
    pins: sled::Tree,
    db: sled::Db,
    entries: Mutex<HashMap<TaskId, Entry>>,
    recent: Mutex<RecentPieces>,
    unsharing: Mutex<()>,
}

/// The last pieces written, verified in memory, oldest dropped first once over budget.
struct RecentPieces {
    budget: usize,
    bytes: usize,
    order: std::collections::VecDeque<(TaskId, PieceIndex)>,
    data: HashMap<(TaskId, PieceIndex), (Bytes, Sha256Digest)>,
}

impl RecentPieces {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            order: Default::default(),
            data: HashMap::new(),
        }
    }

    fn insert(&mut self, task: TaskId, piece: PieceIndex, data: Bytes, digest: Sha256Digest) {
        if data.len() > self.budget {
            return;
        }
        self.bytes += data.len();
        if let Some((old, _)) = self.data.insert((task, piece), (data, digest)) {
            self.bytes -= old.len();
        } else {
            self.order.push_back((task, piece));
        }
        while self.bytes > self.budget {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some((old, _)) = self.data.remove(&k) {
                self.bytes -= old.len();
            }
        }
    }

    fn get(&self, task: &TaskId, piece: PieceIndex) -> Option<(Bytes, Sha256Digest)> {
        self.data.get(&(*task, piece)).cloned()
    }

    fn forget(&mut self, task: &TaskId, piece: Option<PieceIndex>) {
        let data = &mut self.data;
        let bytes = &mut self.bytes;
        self.order.retain(|k| {
            let hit = k.0 == *task && piece.is_none_or(|p| p == k.1);
            if hit && let Some((old, _)) = data.remove(k) {
                *bytes -= old.len();
            }
            !hit
        });
    }
}

/// Direct I/O wants the offset, length and buffer aligned to the logical block size;
/// 4096 covers every common device.
const DIRECT_ALIGN: usize = 4096;

/// Pieces are written with direct I/O where they can be: they go to disk without a copy
/// into the page cache, which on a busy host costs more CPU than any other step of a
/// piece's way (the copy, and fresh pages for it), and a node agent should not push the
/// workloads' own cache out with image layers. Pieces still in use are served from
/// [`RecentPieces`]; reads go through the page cache as before.
fn open_direct(path: &Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
        .map(Arc::new)
}

/// An empty buffer for a piece of `len` bytes, starting on a [`DIRECT_ALIGN`] boundary
/// so the piece can be written with direct I/O (allocators give no such alignment for
/// MiB-sized blocks: jemalloc offsets them by a random cache line on purpose).
pub fn piece_buffer(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(len + DIRECT_ALIGN);
    let skip = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    buf.resize(skip, 0);
    bytes::Buf::advance(&mut buf, skip);
    buf
}

fn direct_io_fits(data: &[u8], offset: u64) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && data.len().is_multiple_of(DIRECT_ALIGN)
        && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn piece_key(task: &TaskId, piece: PieceIndex) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(task.as_bytes());
    k[32..].copy_from_slice(&piece.0.to_be_bytes());
    k
}

/// Keeps a task from eviction while alive.
pub struct TaskLease {
    store: Arc<Store>,
    task: TaskId,
}

impl Drop for TaskLease {
    fn drop(&mut self) {
        if let Some(e) = self.store.lock().get_mut(&self.task) {
            e.users = e.users.saturating_sub(1);
        }
    }
}

impl Store {
    /// Opens the store with no pieces kept in memory.
    pub fn open(dir: &Path, quota: u64) -> Result<Arc<Self>, StoreError> {
        Self::open_with_memory(dir, quota, 0)
    }

    /// Opens the store keeping up to `memory` bytes of the last written pieces in memory.
    pub fn open_with_memory(
        dir: &Path,
        quota: u64,
        memory: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let db_path = dir.join("store.sled");
        let db = match sled::open(&db_path) {
            Ok(db) => db,
            Err(e) => {
                // The data files are only a cache: start over rather than refuse to run.
                tracing::error!(error = %e, "piece store metadata unreadable; starting with an empty cache");
                let _ = std::fs::remove_dir_all(&db_path);
                let _ = std::fs::remove_dir_all(&data);
                std::fs::create_dir_all(&data).map_err(io(&data))?;
                sled::open(&db_path)?
            }
        };
        // Version 1 trees hold layouts without a tail, which the current encoding would
        // misread; their pieces are only a cache, so they go (with their data files,
        // below) rather than be decoded into wrong piece boundaries.
        for old in ["meta", "pieces"] {
            if db.drop_tree(old)? {
                tracing::warn!(
                    tree = old,
                    "dropped piece store metadata of an older format"
                );
            }
        }
        let meta = db.open_tree("meta.v2")?;
        let pieces = db.open_tree("pieces.v2")?;
        let pins = db.open_tree("pins")?;
        let store = Self {
            dir: dir.to_path_buf(),
            quota,
            meta,
            pieces,
            pins,
            db,
            entries: Mutex::new(HashMap::new()),
            recent: Mutex::new(RecentPieces::new(memory)),
            unsharing: Mutex::new(()),
        };
        store.load()?;
        Ok(Arc::new(store))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn data_path(&self, task: &TaskId) -> PathBuf {
        self.dir.join("data").join(format!("{task}.data"))
    }

    fn load(&self) -> Result<(), StoreError> {
        let mut entries = self.lock();
        for kv in self.meta.iter() {
            let (k, v) = kv?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()).map(TaskId::from_bytes) else {
                continue;
            };
            let Ok(meta) = postcard::from_bytes::<TaskMeta>(&v) else {
                tracing::warn!(task = %id, "dropping undecodable task metadata");
                let _ = self.meta.remove(&k);
                continue;
            };
            let count = meta.layout.map_or(0, |l| l.piece_count());
            let mut stored = PieceSet::new(count);
            let mut digests = vec![None; count as usize];
            for kv in self.pieces.scan_prefix(id.as_bytes()) {
                let (k, v) = kv?;
                let idx = u32::from_be_bytes(k[32..36].try_into().unwrap_or([0xff; 4]));
                if let (Some(slot), Ok(d)) = (
                    digests.get_mut(idx as usize),
                    <[u8; 32]>::try_from(v.as_ref()),
                ) {
                    *slot = Some(Sha256Digest::from_bytes(d));
                    stored.insert(PieceIndex(idx));
                }
            }
            let file = match meta.layout {
                Some(_) => File::options()
                    .read(true)
                    .write(true)
                    .open(self.data_path(&id))
                    .ok()
                    .map(Arc::new),
                None => None,
            };
            if meta.layout.is_some() && file.is_none() {
                // Data file gone: whatever the metadata says is stored isn't.
                stored = PieceSet::new(count);
                digests = vec![None; count as usize];
                let _ = self.clear_pieces(&id);
            }
            entries.insert(
                id,
                Entry {
                    meta,
                    stored,
                    digests,
                    direct: file
                        .as_ref()
                        .and_then(|_| open_direct(&self.data_path(&id))),
                    handed_out: false,
                    file,
                    users: 0,
                },
            );
        }
        // A data file without metadata (its task's record was dropped, or a crash came
        // between creating the file and recording it) holds quota-less bytes nobody can
        // serve.
        if let Ok(dir) = std::fs::read_dir(self.dir.join("data")) {
            for f in dir.flatten() {
                let name = f.file_name();
                let known = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".data"))
                    .and_then(|n| n.parse::<TaskId>().ok())
                    .is_some_and(|id| entries.contains_key(&id));
                if !known {
                    tracing::info!(file = %f.path().display(), "removing data file with no task record");
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Ok(())
    }

    fn clear_pieces(&self, task: &TaskId) -> Result<(), StoreError> {
        for k in self.pieces.scan_prefix(task.as_bytes()).keys() {
            self.pieces.remove(k?)?;
        }
        Ok(())
    }

    fn put_meta(&self, task: &TaskId, meta: &TaskMeta) -> Result<(), StoreError> {
        self.meta
            .insert(task.as_bytes(), postcard::to_allocvec(meta)?)?;
        Ok(())
    }

    /// Opens (or creates) a task's entry and keeps it from eviction while the lease lives.
    pub fn open_task(
        self: &Arc<Self>,
        task: TaskId,
        url: &str,
        content_digest: Option<Sha256Digest>,
    ) -> Result<TaskLease, StoreError> {
        let mut entries = self.lock();
        let e = entries.entry(task).or_insert_with(|| Entry {
            meta: TaskMeta {
                url: url.to_string(),
                layout: None,
                supports_range: false,
                content_digest,
                complete: false,
                last_access: now_secs(),
            },
            stored: PieceSet::new(0),
            digests: Vec::new(),
            file: None,
            direct: None,
            handed_out: false,
            users: 0,
        });
        e.users += 1;
        e.meta.last_access = now_secs();
        let meta = e.meta.clone();
        drop(entries);
        self.put_meta(&task, &meta)?;
        Ok(TaskLease {
            store: self.clone(),
            task,
        })
    }

    pub fn meta(&self, task: &TaskId) -> Option<TaskMeta> {
        self.lock().get(task).map(|e| e.meta.clone())
    }

    pub fn stored(&self, task: &TaskId) -> Option<PieceSet> {
        self.lock().get(task).map(|e| e.stored.clone())
    }

    pub fn digests(&self, task: &TaskId) -> Vec<(PieceIndex, Sha256Digest)> {
        self.lock().get(task).map_or_else(Vec::new, |e| {
            e.digests
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.map(|d| (PieceIndex(i as u32), d)))
                .collect()
        })
    }

    /// Every task with a layout and at least one piece, for re-announcing.
    pub fn tasks(&self) -> Vec<(TaskId, TaskMeta)> {
        self.lock()
            .iter()
            .map(|(id, e)| (*id, e.meta.clone()))
            .collect()
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock()
            .values()
            .filter_map(|e| e.meta.layout.map(|l| l.content_length))
            .sum()
    }

    /// Fixes the task's layout and reserves its space, evicting unused complete tasks
    /// (least recently used first) if the quota demands it. A layout that differs from
    /// the stored one discards what was stored (the content changed).
    pub fn set_layout(
        &self,
        task: &TaskId,
        layout: PieceLayout,
        supports_range: bool,
    ) -> Result<(), StoreError> {
        let mut entries = self.lock();
        let current = entries.get(task).ok_or(StoreError::UnknownTask(*task))?;
        if current.meta.layout == Some(layout) && current.file.is_some() {
            return Ok(());
        }
        let need = layout.content_length;
        let mut used: u64 = entries
            .iter()
            .filter(|(id, _)| *id != task)
            .filter_map(|(_, e)| e.meta.layout.map(|l| l.content_length))
            .sum();
        if used + need > self.quota {
            let now = now_secs();
            let mut victims: Vec<(u64, TaskId, u64)> = entries
                .iter()
                .filter(|(id, e)| *id != task && e.users == 0 && !self.pinned(id, now))
                .filter_map(|(id, e)| {
                    e.meta
                        .layout
                        .map(|l| (e.meta.last_access, *id, l.content_length))
                })
                .collect();
            victims.sort();
            for (_, id, len) in victims {
                if used + need <= self.quota {
                    break;
                }
                tracing::info!(task = %id, bytes = len, "evicting least recently used content for quota");
                entries.remove(&id);
                self.remove_files(&id);
                used -= len;
            }
            if used + need > self.quota {
                return Err(StoreError::Quota {
                    need,
                    free: self.quota.saturating_sub(used),
                    quota: self.quota,
                });
            }
        }
        let path = self.data_path(task);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        // A fresh inode, never a truncated old one: the old file may be hard-linked as a
        // caller's output (`POST /v1/download/file`), and that file must stay as it is.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(layout.content_length).map_err(io)?;
        self.clear_pieces(task)?;
        self.recent_pieces().forget(task, None);
        let e = entries
            .get_mut(task)
            .ok_or(StoreError::UnknownTask(*task))?;
        e.meta.layout = Some(layout);
        e.meta.supports_range = supports_range;
        e.meta.complete = false;
        e.stored = PieceSet::new(layout.piece_count());
        e.digests = vec![None; layout.piece_count() as usize];
        e.file = Some(Arc::new(file));
        e.direct = open_direct(&path);
        let meta = e.meta.clone();
        drop(entries);
        self.put_meta(task, &meta)
    }

    /// Keeps `task` from eviction until `until` (unix seconds), e.g. pre-warmed content
    /// until its pull; a later pin only extends it.
    pub fn pin(&self, task: &TaskId, until: u64) -> Result<(), StoreError> {
        let current = self.pinned_until(task);
        if until > current {
            self.pins.insert(task.as_bytes(), &until.to_be_bytes())?;
        }
        Ok(())
    }

    /// Lets `task` be evicted again (a client read it: it did its job).
    pub fn unpin(&self, task: &TaskId) {
        let _ = self.pins.remove(task.as_bytes());
    }

    pub fn pinned_until(&self, task: &TaskId) -> u64 {
        self.pins
            .get(task.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
    }

    fn pinned(&self, task: &TaskId, now: u64) -> bool {
        self.pinned_until(task) > now
    }

    fn remove_files(&self, task: &TaskId) {
        self.recent_pieces().forget(task, None);
        let _ = self.meta.remove(task.as_bytes());
        let _ = self.pins.remove(task.as_bytes());
        let _ = self.clear_pieces(task);
        let _ = std::fs::remove_file(self.data_path(task));
    }

    /// Where the task's content lives. Only complete tasks' files are handed out (for a
    /// caller to hard-link or copy); the store never writes into a file while another
    /// name points at it (see [`Store::drop_piece`]).
    pub fn data_file(&self, task: &TaskId) -> PathBuf {
        self.data_path(task)
    }

    /// Gets a complete task's data file ready to be handed out for linking: a file that
    /// another caller already holds (and may have written to) is replaced by a private
    /// copy, and every piece is then checked on disk, not in memory. False if a piece was
    /// bad (it is dropped; fetch it again). Blocking.
    pub fn prepare_handout(&self, task: &TaskId, must_check: bool) -> Result<bool, StoreError> {
        let linked = self.data_is_linked(task);
        let must_check = must_check || self.lock().get(task).is_some_and(|e| e.handed_out);
        if linked {
            self.unshare(task).map_err(|source| StoreError::Io {
                path: self.data_path(task),
                source,
            })?;
        }
        let mut intact = true;
        if linked || must_check {
            let count = self.lock().get(task).map_or(0, |e| e.stored.len());
            for p in 0..count {
                match self.read_from_disk(task, PieceIndex(p)) {
                    Ok(_) => {}
                    Err(StoreError::Corrupt { .. } | StoreError::Missing { .. }) => intact = false,
                    Err(e) => return Err(e),
                }
            }
        }
        if intact && let Some(e) = self.lock().get_mut(task) {
            e.handed_out = true;
        }
        Ok(intact)
    }

    /// The data file has names outside the store (a caller hard-linked it).
    fn data_is_linked(&self, task: &TaskId) -> bool {
        let file = self.lock().get(task).and_then(|e| e.file.clone());
        file.and_then(|f| f.metadata().ok())
            .is_some_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 1)
    }

    /// Replaces the task's data file with a private copy of it (same bytes, new inode),
    /// so later writes don't reach the other names of the old one.
    /// Does nothing if the file has no other names.
    pub fn unshare(&self, task: &TaskId) -> std::io::Result<()> {
        // One at a time: two copies racing would share one temporary file.
        let _one = self.unsharing.lock().unwrap_or_else(|e| e.into_inner());
        if !self.data_is_linked(task) {
            return Ok(());
        }
        let path = self.data_path(task);
        let temp = path.with_extension("unshare");
        let copied = (|| {
            let from = File::open(&path)?;
            let mut to = File::create(&temp)?;
            std::io::copy(&mut &from, &mut to)?;
            std::fs::rename(&temp, &path)?;
            File::options().read(true).write(true).open(&path)
        })();
        let file = match copied {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
        };
        if let Some(e) = self.lock().get_mut(task) {
            e.file = Some(Arc::new(file));
            e.direct = open_direct(&path);
        }
        Ok(())
    }

    fn file_and_range(
        &self,
        task: &TaskId,
        piece: PieceIndex,
    ) -> Result<(Arc<File>, u64, u32, Option<Sha256Digest>), StoreError> {
        let entries = self.lock();
        let e = entries.get(task).ok_or(StoreError::UnknownTask(*task))?;
        let layout = e.meta.layout.ok_or(StoreError::NoLayout(*task))?;
        let (offset, len) = layout
            .piece_range(piece)
            .ok_or(StoreError::Missing { task: *task, piece })?;
        let file = e.file.clone().ok_or(StoreError::NoLayout(*task))?;
        let digest = if e.stored.contains(piece) {
            e.digests[piece.0 as usize]
        } else {
            None
        };
        Ok((file, offset, len, digest))
    }

    /// Writes a piece whose bytes the caller has verified against `digest`, then records it.
    /// Blocking: call from a blocking context.
    pub fn write_piece(
        &self,
        task: &TaskId,
        piece: PieceIndex,
        data: Bytes,
        digest: Sha256Digest,
    ) -> Result<(), StoreError> {
        let (file, offset, len, _) = self.file_and_range(task, piece)?;
        if data.len() != len as usize {
            return Err(StoreError::PieceLength {
                task: *task,
                piece,
                got: data.len(),
                want: len,
            });
        }
        let direct = self.lock().get(task).and_then(|e| e.direct.clone());
        let direct = direct.filter(|_| direct_io_fits(&data, offset));
        let written = match direct.map(|d| d.write_all_at(&data, offset)) {
            Some(Ok(())) => Ok(()),
            // The filesystem refused direct I/O for this write after all.
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                file.write_all_at(&data, offset)
            }
            Some(Err(e)) => Err(e),
            None => file.write_all_at(&data, offset),
        };
        written.map_err(|source| StoreError::Io {
            path: self.data_path(task),
            source,
        })?;
        self.pieces
            .insert(piece_key(task, piece), digest.as_bytes().as_slice())?;
        // Not flushed here: local readers may use the piece at once (it is verified on
        // every read), and the announcer's group commit ([`Store::sync`]) makes the record
        // durable before any other host is told the piece exists. One fsync per piece
        // here cost a cold mirror blob its first-byte time and every piece its latency.
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(task) {
            e.stored.insert(piece);
            if let Some(slot) = e.digests.get_mut(piece.0 as usize) {
                *slot = Some(digest);
            }
        }
        // Only while the piece still belongs to this file: a concurrent new layout or
        // removal has cleared the memory copy, and must not get stale bytes back.
        if entries
            .get(task)
            .and_then(|e| e.file.as_ref())
            .is_some_and(|f| Arc::ptr_eq(f, &file))
        {
            self.recent_pieces().insert(*task, piece, data, digest);
        }
        drop(entries);
        Ok(())
    }

    /// The piece if it is still in memory since it was verified and written (no I/O).
    pub fn recent_piece(&self, task: &TaskId, piece: PieceIndex) -> Option<(Bytes, Sha256Digest)> {
        self.recent_pieces().get(task, piece)
    }

    fn recent_pieces(&self) -> std::sync::MutexGuard<'_, RecentPieces> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every record written so far durable. Callers await this before announcing a
    /// piece, so a killed daemon resumes from every piece it announced; concurrent callers
    /// share one sync (group commit). The data needs no fsync: reads verify, so a torn
    /// write after power loss is refetched, never served.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Reads a stored piece and checks it against its digest. A mismatch drops the piece
    /// (so it is refetched) and reports [`StoreError::Corrupt`]. Blocking.
    pub fn read_piece(
        &self,
        task: &TaskId,
        piece: PieceIndex,
    ) -> Result<(Bytes, Sha256Digest), StoreError> {
        if let Some(hit) = self.recent_piece(task, piece) {
            return Ok(hit);
        }
        self.read_from_disk(task, piece)
    }

    /// [`Store::read_piece`] without the memory copy: the bytes as they are on disk.
    fn read_from_disk(
        &self,
        task: &TaskId,
        piece: PieceIndex,
    ) -> Result<(Bytes, Sha256Digest), StoreError> {
        let (file, offset, len, digest) = self.file_and_range(task, piece)?;
        let digest = digest.ok_or(StoreError::Missing { task: *task, piece })?;
        let mut buf = BytesMut::zeroed(len as usize);
        let read = file.read_exact_at(&mut buf, offset);
        // A file cut short (e.g. rewritten through a hard link) is as bad as a flipped bit.
        let short = matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof);
        if !short {
            read.map_err(|source| StoreError::Io {
                path: self.data_path(task),
                source,
            })?;
        }
        if short || Sha256Digest::from(Sha256::digest(&buf)) != digest {
            tracing::error!(%task, %piece, "stored piece failed verification; dropping it");
            self.drop_piece(task, piece);
            return Err(StoreError::Corrupt { task: *task, piece });
        }
        Ok((buf.freeze(), digest))
    }

    pub fn drop_piece(&self, task: &TaskId, piece: PieceIndex) {
        self.recent_pieces().forget(task, Some(piece));
        // Refetching the piece would write into a file a caller holds as its output: move
        // to a private copy first and leave theirs as it is. Should that fail (disk full),
        // the refetched piece is written into the shared file: verified bytes, no worse.
        if let Err(e) = self.unshare(task) {
            tracing::warn!(%task, %piece, error = %e, "could not copy a linked data file");
        }
        let _ = self.pieces.remove(piece_key(task, piece));
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(task) {
            e.stored.remove(piece);
            e.meta.complete = false;
            let meta = e.meta.clone();
            drop(entries);
            let _ = self.put_meta(task, &meta);
        }
    }

    /// Checks the whole content against `expected` (blocking; streams the data file) and
    /// marks the task complete if it matches. A mismatch drops every piece.
    pub fn verify_complete(
        &self,
        task: &TaskId,
        expected: Option<Sha256Digest>,
    ) -> Result<bool, StoreError> {
        self.verify_complete_with(task, expected, None)
    }

    /// As [`Store::verify_complete`], with the content's digest already computed from
    /// the verified pieces in order (`hashed`), so the file need not be read again.
    pub fn verify_complete_with(
        &self,
        task: &TaskId,
        expected: Option<Sha256Digest>,
        hashed: Option<Sha256Digest>,
    ) -> Result<bool, StoreError> {
        let (file, len) = {
            let entries = self.lock();
            let e = entries.get(task).ok_or(StoreError::UnknownTask(*task))?;
            let layout = e.meta.layout.ok_or(StoreError::NoLayout(*task))?;
            if !e.stored.is_full() {
                return Ok(false);
            }
            (
                e.file.clone().ok_or(StoreError::NoLayout(*task))?,
                layout.content_length,
            )
        };
        if let Some(expected) = expected {
            let actual = match hashed {
                Some(d) => d,
                None => self.hash_file(task, &file, len)?,
            };
            if actual != expected {
                let count = self.lock().get(task).map_or(0, |e| e.stored.len());
                for p in 0..count {
                    self.drop_piece(task, PieceIndex(p));
                }
                return Ok(false);
            }
        }
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(task) {
            e.meta.complete = true;
            let meta = e.meta.clone();
            drop(entries);
            self.put_meta(task, &meta)?;
        }
        Ok(true)
    }

    fn hash_file(&self, task: &TaskId, file: &File, len: u64) -> Result<Sha256Digest, StoreError> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)
                .map_err(|source| StoreError::Io {
                    path: self.data_path(task),
                    source,
                })?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(Sha256Digest::from(h.finalize()))
    }

    /// Forgets a task whose content can't be trusted (e.g. it failed its digest).
    pub fn remove_task(&self, task: &TaskId) {
        self.lock().remove(task);
        self.remove_files(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::layout::MIN_PIECE_SIZE;

    fn layout(len: u64) -> PieceLayout {
        PieceLayout::new(len, MIN_PIECE_SIZE).unwrap()
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn fill(store: &Store, task: &TaskId, data: &[u8]) {
        fill_as(store, task, data, layout(data.len() as u64));
    }

    fn fill_as(store: &Store, task: &TaskId, data: &[u8], l: PieceLayout) {
        for p in l.pieces() {
            let (o, n) = l.piece_range(p).unwrap();
            let bytes = &data[o as usize..o as usize + n as usize];
            store
                .write_piece(
                    task,
                    p,
                    Bytes::copy_from_slice(bytes),
                    Sha256Digest::of(bytes),
                )
                .unwrap();
        }
    }

    #[test]
    fn pieces_survive_reopen_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::for_url("http://o/a", &[], None);
        let data = content(MIN_PIECE_SIZE as usize * 2 + 5);
        {
            let s = Store::open(dir.path(), u64::MAX).unwrap();
            let _l = s.open_task(task, "http://o/a", None).unwrap();
            s.set_layout(&task, layout(data.len() as u64), true)
                .unwrap();
            fill(&s, &task, &data[..]);
            assert!(
                s.verify_complete(&task, Some(Sha256Digest::of(&data)))
                    .unwrap()
            );
        }
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        assert!(s.stored(&task).unwrap().is_full());
        assert!(s.meta(&task).unwrap().complete);
        let (p1, _) = s.read_piece(&task, PieceIndex(1)).unwrap();
        assert_eq!(
            &p1[..],
            &data[MIN_PIECE_SIZE as usize..2 * MIN_PIECE_SIZE as usize]
        );
        // Flip one byte of piece 1 on disk.
        let path = dir.path().join("data").join(format!("{task}.data"));
        let f = File::options().write(true).open(path).unwrap();
        f.write_all_at(
            &[data[MIN_PIECE_SIZE as usize] ^ 1],
            u64::from(MIN_PIECE_SIZE),
        )
        .unwrap();
        assert!(matches!(
            s.read_piece(&task, PieceIndex(1)),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(
            !s.stored(&task).unwrap().contains(PieceIndex(1)),
            "corrupt piece forgotten"
        );
        assert!(!s.meta(&task).unwrap().complete);
    }

    #[test]
    fn older_metadata_and_orphan_data_files_are_dropped_and_tails_kept() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::for_url("http://o/tailed", &[], None);
        let data = content(MIN_PIECE_SIZE as usize * 9 + 77);
        // Two pieces of 4 x the minimum, then the rest in minimum-size pieces.
        let l = PieceLayout::with_tail(data.len() as u64, 4 * MIN_PIECE_SIZE, 2, MIN_PIECE_SIZE)
            .unwrap();
        assert_eq!(l.piece_count(), 2 + 2);
        {
            let s = Store::open(dir.path(), u64::MAX).unwrap();
            let _l = s.open_task(task, "http://o/tailed", None).unwrap();
            s.set_layout(&task, l, true).unwrap();
            fill_as(&s, &task, &data, l);
            assert!(
                s.verify_complete(&task, Some(Sha256Digest::of(&data)))
                    .unwrap()
            );
        }
        // What a version before tails left: its trees, and a data file they described.
        let stale = TaskId::for_url("http://o/old", &[], None);
        let stale_file = dir.path().join("data").join(format!("{stale}.data"));
        std::fs::write(&stale_file, b"old bytes").unwrap();
        {
            let db = sled::open(dir.path().join("store.sled")).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(stale.as_bytes(), &b"v1 record"[..])
                .unwrap();
            db.open_tree("pieces")
                .unwrap()
                .insert(b"k", &b"v"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        assert!(!stale_file.exists(), "orphan data file removed");
        assert!(s.meta(&stale).is_none());
        assert!(s.meta(&task).unwrap().complete);
        let (last, _) = s.read_piece(&task, PieceIndex(3)).unwrap();
        assert_eq!(
            &last[..],
            &data[l.piece_range(PieceIndex(3)).unwrap().0 as usize..]
        );
        drop(s);
        let db = sled::open(dir.path().join("store.sled")).unwrap();
        let names = db.tree_names();
        assert!(
            !names
                .iter()
                .any(|n| &n[..] == b"meta" || &n[..] == b"pieces")
        );
    }

    #[test]
    fn a_linked_data_file_is_never_written_by_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        let task = TaskId::for_url("http://o/linked", &[], None);
        let data = content(MIN_PIECE_SIZE as usize * 2 + 5);
        let _l = s.open_task(task, "u", None).unwrap();
        s.set_layout(&task, layout(data.len() as u64), true)
            .unwrap();
        fill(&s, &task, &data);
        let out = dir.path().join("out");
        std::fs::hard_link(s.data_file(&task), &out).unwrap();
        // The caller writes into its output, which is the store's inode too.
        let f = File::options().write(true).open(&out).unwrap();
        f.write_all_at(&[data[0] ^ 1], 0).unwrap();
        assert!(matches!(
            s.read_piece(&task, PieceIndex(0)),
            Err(StoreError::Corrupt { .. })
        ));
        // The store moved to its own copy: the repair does not touch the caller's file,
        // and the other pieces were kept.
        let p0 = &data[..MIN_PIECE_SIZE as usize];
        s.write_piece(
            &task,
            PieceIndex(0),
            Bytes::copy_from_slice(p0),
            Sha256Digest::of(p0),
        )
        .unwrap();
        assert_eq!(&s.read_piece(&task, PieceIndex(0)).unwrap().0[..], p0);
        assert!(s.stored(&task).unwrap().is_full());
        let theirs = std::fs::read(&out).unwrap();
        assert_eq!(theirs[0], data[0] ^ 1);
        assert_eq!(&theirs[1..], &data[1..]);
        // A new layout starts a new file rather than truncating a linked one.
        std::fs::remove_file(&out).unwrap();
        std::fs::hard_link(s.data_file(&task), &out).unwrap();
        s.set_layout(&task, layout(10), true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }

    #[test]
    fn recent_pieces_are_served_from_memory_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let m = MIN_PIECE_SIZE as usize;
        let s = Store::open_with_memory(dir.path(), u64::MAX, 2 * m).unwrap();
        let task = TaskId::for_url("http://o/recent", &[], None);
        let data = content(m * 3);
        let _l = s.open_task(task, "u", None).unwrap();
        s.set_layout(&task, layout(data.len() as u64), true)
            .unwrap();
        fill(&s, &task, &data);
        // Over budget: the oldest piece left memory, the last two are there.
        assert!(s.recent_piece(&task, PieceIndex(0)).is_none());
        assert!(s.recent_piece(&task, PieceIndex(1)).is_some());
        assert!(s.recent_piece(&task, PieceIndex(2)).is_some());
        // A scribble on disk is caught for the piece read from disk; the pieces in
        // memory are the verified bytes.
        let f = File::options()
            .write(true)
            .open(s.data_file(&task))
            .unwrap();
        f.write_all_at(&[data[0] ^ 1], 0).unwrap();
        f.write_all_at(&[data[m] ^ 1], m as u64).unwrap();
        assert!(matches!(
            s.read_piece(&task, PieceIndex(0)),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(
            &s.read_piece(&task, PieceIndex(1)).unwrap().0[..],
            &data[m..2 * m]
        );
        // Dropping a piece or a new layout forgets it in memory too.
        s.drop_piece(&task, PieceIndex(1));
        assert!(s.recent_piece(&task, PieceIndex(1)).is_none());
        s.set_layout(&task, layout(10), true).unwrap();
        assert!(s.recent_piece(&task, PieceIndex(2)).is_none());
    }

    #[test]
    fn piece_buffers_are_aligned_for_direct_io() {
        for len in [4096, MIN_PIECE_SIZE as usize, 3 << 20] {
            let mut b = piece_buffer(len);
            assert!(b.capacity() >= len);
            let before = b.as_ptr();
            b.extend_from_slice(&vec![7u8; len]);
            assert_eq!(b.as_ptr(), before, "filled in place");
            let b = b.freeze();
            assert!(direct_io_fits(&b, 0));
        }
    }

    #[test]
    fn wrong_whole_digest_drops_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        let task = TaskId::for_url("http://o/b", &[], None);
        let data = content(1000);
        let _l = s.open_task(task, "u", None).unwrap();
        s.set_layout(&task, layout(1000), true).unwrap();
        fill(&s, &task, &data);
        assert!(
            !s.verify_complete(&task, Some(Sha256Digest::of(b"other")))
                .unwrap()
        );
        assert_eq!(s.stored(&task).unwrap().count(), 0);
    }

    #[test]
    fn quota_evicts_least_recently_used_unused_task() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 2500).unwrap();
        let ids: Vec<TaskId> = (0..3)
            .map(|i| TaskId::for_url(&format!("http://o/{i}"), &[], None))
            .collect();
        {
            let _a = s.open_task(ids[0], "a", None).unwrap();
            s.set_layout(&ids[0], layout(1000), true).unwrap();
        }
        let _b = s.open_task(ids[1], "b", None).unwrap();
        s.set_layout(&ids[1], layout(1000), true).unwrap();
        // Third task needs room: the unused first one goes, the leased second stays.
        let _c = s.open_task(ids[2], "c", None).unwrap();
        s.set_layout(&ids[2], layout(1000), true).unwrap();
        assert!(s.meta(&ids[0]).is_none());
        assert!(s.meta(&ids[1]).is_some());
        // Nothing left to evict: a clear quota error.
        let d = TaskId::for_url("http://o/d", &[], None);
        let _d = s.open_task(d, "d", None).unwrap();
        assert!(matches!(
            s.set_layout(&d, layout(1000), true),
            Err(StoreError::Quota { .. })
        ));
    }

    #[test]
    fn pinned_content_is_not_evicted_until_unpinned_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 2500).unwrap();
        let ids: Vec<TaskId> = (0..3)
            .map(|i| TaskId::for_url(&format!("http://o/p{i}"), &[], None))
            .collect();
        for id in &ids[..2] {
            let _l = s.open_task(*id, "x", None).unwrap();
            s.set_layout(id, layout(1000), true).unwrap();
        }
        s.pin(&ids[0], now_secs() + 3600).unwrap();
        s.pin(&ids[1], now_secs() + 3600).unwrap();
        let _c = s.open_task(ids[2], "c", None).unwrap();
        assert!(
            matches!(
                s.set_layout(&ids[2], layout(1000), true),
                Err(StoreError::Quota { .. })
            ),
            "pinned content stays"
        );
        // Pulled: evictable again. Expired pins count for nothing either.
        s.unpin(&ids[0]);
        s.pin(&ids[1], now_secs().saturating_sub(1)).unwrap();
        assert_eq!(
            s.pinned_until(&ids[1]),
            now_secs() + 3600,
            "a pin only extends"
        );
        s.set_layout(&ids[2], layout(1000), true).unwrap();
        assert!(s.meta(&ids[0]).is_none(), "the unpinned task was evicted");
        assert!(s.meta(&ids[1]).is_some(), "the pinned one was not");
    }

    #[test]
    fn short_piece_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        let task = TaskId::for_url("http://o/c", &[], None);
        let _l = s.open_task(task, "u", None).unwrap();
        s.set_layout(&task, layout(100), true).unwrap();
        assert!(matches!(
            s.write_piece(
                &task,
                PieceIndex(0),
                Bytes::from_static(&[0; 99]),
                Sha256Digest::of(&[0; 99])
            ),
            Err(StoreError::PieceLength { .. })
        ));
    }
}
