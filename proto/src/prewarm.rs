//! Pre-warm jobs: put an image's layers on a set of hosts before their rollout batch.
//!
//! * [`PrewarmSpec`] is what a rollout controller (or `dfget prewarm`) posts to the
//!   supernode's HTTP API; [`JobStatus`] is what it reads back.
//! * [`PrewarmWork`] / [`WorkProgress`] travel between the supernode and each daemon on
//!   the control connection ([`crate::control::ControlRequest::PrewarmPoll`]): the daemon
//!   polls, gets the layers it should fetch, and reports how far it got.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, Sha256Digest};

/// Default platform when a job names none.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// Hosts warmed at once within a batch, unless the job says otherwise.
pub const DEFAULT_PARALLELISM: u32 = 64;
/// A job that is not done in this long fails what is left.
pub const DEFAULT_TIMEOUT_SECS: u64 = 1800;
/// Pre-warmed content is kept from eviction until pulled, or this long.
pub const DEFAULT_PIN_TTL_SECS: u64 = 24 * 3600;
/// Layers per image we accept (the OCI spec has no limit; real images have tens).
pub const MAX_LAYERS: usize = 256;
/// Hosts a job may target.
pub const MAX_TARGETS: usize = 10_000;

/// Which hosts a job warms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Targets {
    /// These host ids, one batch (or split by `batch_sizes`).
    Hosts(Vec<HostId>),
    /// Every registered host whose labels include all of these (sorted by host id; split
    /// by `batch_sizes`).
    Selector(BTreeMap<String, String>),
    /// Ordered batches of host ids: batch k+1 starts when batch k is warm or failed.
    Batches(Vec<Vec<HostId>>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

/// A pre-warm request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrewarmSpec {
    /// `registry[:port]/repository[:tag|@sha256:digest]`.
    pub image: String,
    /// `os/arch[/variant]`; default [`DEFAULT_PLATFORM`].
    #[serde(default)]
    pub platform: Option<String>,
    pub targets: Targets,
    /// With `hosts` or `selector`: cut the ordered host list into batches of these sizes
    /// (the last size repeats for what is left), e.g. `[1, 5, 10]`.
    #[serde(default)]
    pub batch_sizes: Vec<u32>,
    /// Hosts warmed at once within a batch; default [`DEFAULT_PARALLELISM`].
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// Whole-job deadline in seconds; default [`DEFAULT_TIMEOUT_SECS`].
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Credentials for a private registry; never shown in a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryAuth>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its batch has not started, or the parallelism limit holds it back.
    Waiting,
    /// Layers handed to the daemon; not all warm yet.
    Warming,
    Warm,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    Pending,
    Running,
    Done,
    Failed,
}

/// One blob of the image (config or layer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: Sha256Digest,
    pub size: u64,
    pub media_type: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    pub digest: Sha256Digest,
    pub bytes: u64,
    pub state: LayerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: HostId,
    pub state: HostState,
    pub layers: Vec<LayerProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStatus {
    pub hosts: Vec<HostStatus>,
}

impl BatchStatus {
    /// Every host warm or failed.
    pub fn finished(&self) -> bool {
        self.hosts
            .iter()
            .all(|h| matches!(h.state, HostState::Warm | HostState::Failed))
    }

    pub fn all_warm(&self) -> bool {
        self.hosts.iter().all(|h| h.state == HostState::Warm)
    }
}

/// A job as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    /// The spec, without credentials.
    pub spec: PrewarmSpec,
    pub state: JobState,
    /// Resolved: the platform manifest's digest and its blobs (config first).
    pub manifest: Sha256Digest,
    pub layers: Vec<Layer>,
    pub batches: Vec<BatchStatus>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub deadline: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One blob a daemon is asked to fetch into its cache for a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrewarmWork {
    pub job: String,
    pub digest: Sha256Digest,
    /// The blob's URL at its registry.
    pub url: String,
    /// Headers for the registry (an `Authorization` the supernode obtained).
    pub headers: Vec<(String, String)>,
    /// Keep it from eviction this long, or until a client reads it.
    pub pin_secs: u64,
}

/// How far a daemon got with one [`PrewarmWork`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkProgress {
    pub job: String,
    pub digest: Sha256Digest,
    pub bytes: u64,
    pub state: LayerState,
    pub error: Option<String>,
}
