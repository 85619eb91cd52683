//! Prometheus metrics of the supernode, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub hosts: Gauge,
    pub tasks: Gauge,
    pub connections: Gauge,
    pub decision_seconds: Histogram,
    pub origin_assignments: Counter,
    pub parent_assignments: Counter,
    pub landing_assignments: Counter,
    pub hosts_expired: Counter,
    pub origin_lease_renewals: Counter,
    pub origin_leases_lapsed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("supernode");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "control_requests",
            "Control requests by kind and result",
            requests.clone(),
        );
        let hosts = Gauge::default();
        registry.register("hosts", "Registered hosts", hosts.clone());
        let tasks = Gauge::default();
        registry.register("tasks", "Known tasks", tasks.clone());
        let connections = Gauge::default();
        registry.register(
            "control_connections",
            "Open daemon control connections",
            connections.clone(),
        );
        let decision_seconds = Histogram::new(exponential_buckets(1e-6, 4.0, 10));
        registry.register(
            "schedule_decision_seconds",
            "Time to answer one schedule request",
            decision_seconds.clone(),
        );
        let origin_assignments = Counter::default();
        registry.register(
            "origin_assignments",
            "Pieces leased for an origin fetch",
            origin_assignments.clone(),
        );
        let parent_assignments = Counter::default();
        registry.register(
            "parent_assignments",
            "Pieces assigned to parents",
            parent_assignments.clone(),
        );
        let landing_assignments = Counter::default();
        registry.register(
            "landing_assignments",
            "Pieces assigned to be taken from an origin fetch while it lands",
            landing_assignments.clone(),
        );
        let hosts_expired = Counter::default();
        registry.register(
            "hosts_expired",
            "Hosts dropped after going quiet",
            hosts_expired.clone(),
        );
        let origin_lease_renewals = Counter::default();
        registry.register(
            "origin_lease_renewals",
            "Origin leases extended because their fetch was still receiving bytes",
            origin_lease_renewals.clone(),
        );
        let origin_leases_lapsed = Counter::default();
        registry.register(
            "origin_leases_lapsed",
            "Origin leases that ran out before their piece was announced (the piece may be fetched from the origin again)",
            origin_leases_lapsed.clone(),
        );
        Self {
            registry,
            requests,
            hosts,
            tasks,
            connections,
            decision_seconds,
            origin_assignments,
            parent_assignments,
            landing_assignments,
            hosts_expired,
            origin_lease_renewals,
            origin_leases_lapsed,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String can't fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
