//! Prometheus metrics of the daemon, served on the local API's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `origin`, `peer` or `cache`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    /// Bytes of verified pieces obtained, by where they came from.
    pub piece_bytes: Family<SourceLabels, Counter>,
    pub pieces: Family<SourceLabels, Counter>,
    pub piece_failures: Family<ReasonLabels, Counter>,
    pub upload_bytes: Counter,
    pub upload_busy: Counter,
    /// Pieces relayed to a peer while they landed from the origin.
    pub landing_uploads: Counter,
    /// Pieces taken from a parent while it fetched them from the origin.
    pub landing_pieces: Counter,
    pub uploads_in_flight: Gauge,
    pub corrupt_local_pieces: Counter,
    pub downloads: Family<ReasonLabels, Counter>,
    pub supernode_up: Gauge,
    pub pending_announces: Gauge,
    /// Registry mirror requests by kind (`manifest`, `blob`).
    pub mirror_requests: Family<ReasonLabels, Counter>,
    /// Content-addressed mirror reads (blobs, manifests by digest) by `hit` (complete in
    /// the local store when asked for) or `miss`.
    pub mirror_cache: Family<ReasonLabels, Counter>,
    /// Body bytes the mirror sent to its clients.
    pub mirror_bytes_served: Counter,
    /// HTTP proxy requests by kind: `forward` (passed through), `pull` (answered by the
    /// mirror logic), `tunnel` (CONNECT, bytes not seen), `intercept` (CONNECT, TLS
    /// terminated here), `refused`.
    pub proxy_requests: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dfdaemon");
        let piece_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "piece_bytes",
            "Verified piece bytes obtained, by source",
            piece_bytes.clone(),
        );
        let pieces = Family::<SourceLabels, Counter>::default();
        registry.register(
            "pieces",
            "Verified pieces obtained, by source",
            pieces.clone(),
        );
        let piece_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "piece_failures",
            "Failed piece fetches, by reason",
            piece_failures.clone(),
        );
        let upload_bytes = Counter::default();
        registry.register(
            "upload_bytes",
            "Piece bytes served to other daemons",
            upload_bytes.clone(),
        );
        let landing_uploads = Counter::default();
        registry.register(
            "landing_uploads",
            "Pieces relayed to a peer while they landed from the origin",
            landing_uploads.clone(),
        );
        let landing_pieces = Counter::default();
        registry.register(
            "landing_pieces",
            "Pieces taken from a parent while it fetched them from the origin",
            landing_pieces.clone(),
        );
        let upload_busy = Counter::default();
        registry.register(
            "upload_busy",
            "Piece requests refused because all upload slots were taken",
            upload_busy.clone(),
        );
        let uploads_in_flight = Gauge::default();
        registry.register(
            "uploads_in_flight",
            "Piece uploads running now",
            uploads_in_flight.clone(),
        );
        let corrupt_local_pieces = Counter::default();
        registry.register(
            "corrupt_local_pieces",
            "Stored pieces that failed verification and were dropped",
            corrupt_local_pieces.clone(),
        );
        let downloads = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "downloads",
            "Local API downloads by outcome",
            downloads.clone(),
        );
        let pending_announces = Gauge::default();
        registry.register(
            "pending_announces",
            "Stored pieces whose announce the supernode has not acknowledged yet",
            pending_announces.clone(),
        );
        let supernode_up = Gauge::default();
        registry.register(
            "supernode_up",
            "1 while the supernode answers",
            supernode_up.clone(),
        );
        let mirror_requests = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Registry mirror requests by kind",
            mirror_requests.clone(),
        );
        let mirror_cache = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mirror_cache",
            "Content-addressed mirror reads by hit (already stored) or miss",
            mirror_cache.clone(),
        );
        let mirror_bytes_served = Counter::default();
        registry.register(
            "mirror_bytes_served",
            "Body bytes the registry mirror sent to its clients",
            mirror_bytes_served.clone(),
        );
        let proxy_requests = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "HTTP proxy requests by kind (forward, pull, tunnel, intercept, refused)",
            proxy_requests.clone(),
        );
        Self {
            mirror_requests,
            mirror_cache,
            mirror_bytes_served,
            proxy_requests,
            registry,
            piece_bytes,
            pieces,
            piece_failures,
            upload_bytes,
            upload_busy,
            landing_uploads,
            landing_pieces,
            uploads_in_flight,
            corrupt_local_pieces,
            downloads,
            supernode_up,
            pending_announces,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn got_piece(&self, source: &'static str, bytes: u64) {
        self.piece_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
        self.pieces.get_or_create(&SourceLabels { source }).inc();
    }

    pub fn count(family: &Family<ReasonLabels, Counter>, reason: &'static str) {
        family.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn failed(&self, reason: &'static str) {
        self.piece_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
