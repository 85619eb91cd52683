//! Durable task records in sled: layout, content digest and piece digests. Soft state
//! (hosts, who holds what) is not stored: daemons re-register and re-announce.
//!
//! sled is kept behind this module so it could be swapped (redb) without touching the
//! scheduler. An unreadable database is moved aside and a fresh one started: losing the
//! digest records only costs a re-fetch from the origin, while refusing to start would
//! take the whole cluster's scheduling down.

use std::path::{Path, PathBuf};

use proto::TaskId;
use thiserror::Error;

use crate::prewarm::JobRecord;
use crate::scheduler::TaskRecord;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("opening task database at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("task database: {0}")]
    Sled(#[from] sled::Error),
    #[error("encoding task record: {0}")]
    Encode(#[from] postcard::Error),
    #[error("encoding job record: {0}")]
    Json(#[from] serde_json::Error),
}

pub struct TaskStore {
    db: sled::Db,
    tasks: sled::Tree,
    /// Pre-warm job records, as JSON (self-describing, so fields can be added).
    jobs: sled::Tree,
}

impl TaskStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("tasks.sled");
        let db = match sled::open(&path) {
            Ok(db) => db,
            Err(e) => {
                let aside = dir.join(format!("tasks.sled.broken-{}", std::process::id()));
                tracing::error!(error = %e, path = %path.display(), aside = %aside.display(),
                    "task database unreadable; moving it aside and starting empty");
                std::fs::rename(&path, &aside).map_err(|_| StoreError::Open {
                    path: path.clone(),
                    source: e,
                })?;
                sled::open(&path).map_err(|source| StoreError::Open { path, source })?
            }
        };
        // Version 1 records hold layouts without a tail, which the current encoding
        // would misread; losing them costs a re-fetch from the origin.
        if db.drop_tree("tasks")? {
            tracing::warn!("dropped task records of an older format");
        }
        let tasks = db.open_tree("tasks.v2")?;
        let jobs = db.open_tree("prewarm_jobs")?;
        Ok(Self { db, tasks, jobs })
    }

    /// All records that decode; a record that doesn't is logged and skipped.
    pub fn load_all(&self) -> Vec<(TaskId, TaskRecord)> {
        self.tasks
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.ok()?;
                let id = TaskId::from_bytes(<[u8; 32]>::try_from(k.as_ref()).ok()?);
                match postcard::from_bytes::<TaskRecord>(&v) {
                    Ok(rec) => Some((id, rec)),
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "skipping undecodable task record");
                        None
                    }
                }
            })
            .collect()
    }

    pub fn put(&self, id: &TaskId, rec: &TaskRecord) -> Result<(), StoreError> {
        self.tasks
            .insert(id.as_bytes(), postcard::to_allocvec(rec)?)?;
        Ok(())
    }

    /// Every pre-warm job record that decodes.
    pub fn load_jobs(&self) -> Vec<JobRecord> {
        self.jobs
            .iter()
            .filter_map(|kv| {
                let (_, v) = kv.ok()?;
                match serde_json::from_slice::<JobRecord>(&v) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping undecodable pre-warm job record");
                        None
                    }
                }
            })
            .collect()
    }

    /// Stores (`Some`) or deletes (`None`) a job record.
    pub fn put_job(&self, id: &str, rec: Option<&JobRecord>) -> Result<(), StoreError> {
        match rec {
            Some(r) => {
                self.jobs.insert(id.as_bytes(), serde_json::to_vec(r)?)?;
            }
            None => {
                self.jobs.remove(id.as_bytes())?;
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::PieceLayout;

    #[test]
    fn records_survive_reopen_and_older_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let old = TaskId::for_url("http://o/old", &[], None);
        {
            // A version before layout tails kept postcard records under `tasks`.
            let db = sled::open(dir.path().join("tasks.sled")).unwrap();
            db.open_tree("tasks")
                .unwrap()
                .insert(old.as_bytes(), &b"v1 record"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let id = TaskId::for_url("http://o/new", &[], None);
        let rec = TaskRecord {
            url: "http://o/new".into(),
            layout: Some(PieceLayout::with_tail(5 << 20, 1 << 20, 4, 256 << 10).unwrap()),
            supports_range: true,
            content_digest: None,
            digests: vec![None; 8],
        };
        {
            let s = TaskStore::open(dir.path()).unwrap();
            s.put(&id, &rec).unwrap();
            s.flush().unwrap();
        }
        let s = TaskStore::open(dir.path()).unwrap();
        let all = s.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, id);
        assert_eq!(all[0].1.layout, rec.layout);
        assert!(!s.db.tree_names().iter().any(|n| &n[..] == b"tasks"));
    }
}
