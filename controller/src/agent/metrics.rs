//! The agent's Prometheus metrics. The names of the API reference are the
//! contract; the rest describe the agent itself (compile, sync, convergence,
//! map fill).

use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

pub struct Metrics {
    registry: crate::metrics::Metrics,
    pub blocked_connections: IntCounterVec,
    pub audit_denied_connections: IntCounterVec,
    pub dropped_packets: IntCounterVec,
    pub egress_anomalies: IntCounterVec,
    pub policy_convergence: Histogram,
    pub compile_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    pub endpoints: IntGaugeVec,
    pub endpoints_failed_closed: IntGauge,
    pub endpoints_unenforced: IntGauge,
    pub policies_rejected: IntGauge,
    pub sync_errors: IntCounterVec,
    pub quarantined_pods: IntCounterVec,
    pub map_writes: IntCounter,
    pub source_synced_seconds: Gauge,
    pub ready_seconds: Gauge,
    pub events_received: IntCounterVec,
}

/// What `bulkhead_sync_errors_total{operation}` counts: datapath writes
/// (`sync`, `map_full`), attaching and detaching pods' programs, sweeping
/// what gone pods left, publishing Events, the state directory, labelling
/// a pod for quarantine, and announcements of the node's links the kernel
/// dropped (`link_events`, each followed by a resync).
pub const SYNC_OPERATIONS: [&str; 10] =
    ["sync", "map_full", "attach", "detach", "sweep", "event", "state", "quarantine", "link_events", "report"];

impl Metrics {
    pub fn new() -> Self {
        let r = crate::metrics::Metrics::default();
        let connection_labels = ["direction", "namespace", "pod", "policy"];
        let metrics = Self {
            blocked_connections: r.counter(
                "bulkhead_blocked_connections_total",
                "Connections denied: the first packet of each refused flow, not every retransmission.",
                &connection_labels,
            ),
            audit_denied_connections: r.counter(
                "bulkhead_audit_denied_connections_total",
                "Connections an Audit-mode policy would have denied.",
                &connection_labels,
            ),
            dropped_packets: r.counter(
                "bulkhead_dropped_packets_total",
                "Every packet the datapath dropped, by reason.",
                &["direction", "reason"],
            ),
            egress_anomalies: r.counter(
                "bulkhead_egress_anomalies_total",
                "Egress to destinations outside the workload's learned baseline (each new destination once).",
                &["namespace", "workload"],
            ),
            quarantined_pods: r.counter(
                "bulkhead_quarantined_pods_total",
                "Pods labelled bulkhead.io/quarantine after an egress anomaly (--on-anomaly=quarantine).",
                &["namespace", "workload"],
            ),
            policy_convergence: r.histogram(
                "bulkhead_policy_convergence_seconds",
                "From an object change seen by the source to the datapath holding its result.",
            ),
            compile_seconds: r
                .histogram("bulkhead_compile_seconds", "Time to compile the snapshot into the desired datapath state."),
            sync_seconds: r.histogram("bulkhead_sync_seconds", "Time to write the difference into the datapath maps."),
            map_entries: r.gauges(
                "bulkhead_datapath_map_entries",
                "Entries the agent holds in each datapath map.",
                &["map"],
            ),
            map_capacity: r.gauges("bulkhead_datapath_map_capacity", "Capacity of each datapath map.", &["map"]),
            endpoints: r.gauges(
                "bulkhead_endpoints",
                "Local pods enforced on this node, by namespace and the directions an enforced policy governs (none, ingress, egress, both).",
                &["namespace", "isolation"],
            ),
            endpoints_failed_closed: r.gauge(
                "bulkhead_endpoints_failed_closed",
                "Local pods failed closed because their allowlist did not fit in the maps.",
            ),
            endpoints_unenforced: r.gauge(
                "bulkhead_endpoints_unenforced",
                "Local pods not enforced for longer than the grace (5 s): their connections are not policed.",
            ),
            policies_rejected: r.gauge(
                "bulkhead_policies_rejected",
                "Policy objects rejected as invalid (their last good version, if any, stays enforced).",
            ),
            source_synced_seconds: r.float_gauge(
                "bulkhead_agent_source_synced_seconds",
                "Seconds from the agent's start to its source's first complete view.",
            ),
            ready_seconds: r.float_gauge(
                "bulkhead_agent_ready_seconds",
                "Seconds from the agent's start to that view in the datapath (ready).",
            ),
            map_writes: r
                .count("bulkhead_datapath_map_writes_total", "Entries written to or deleted from the datapath's maps."),
            sync_errors: r.counter(
                "bulkhead_sync_errors_total",
                "Datapath writes or attachments that failed.",
                &["operation"],
            ),
            events_received: r.counter(
                "bulkhead_datapath_events_total",
                "Verdict events read from the datapath's ring buffer: deny, audit, and allow (a new egress flow, while egress baselines learn).",
                &["verdict"],
            ),
            registry: r,
        };
        // At 0 from the start: an alert on increase() sees the first error.
        for operation in SYNC_OPERATIONS {
            metrics.sync_errors.with_label_values(&[operation]);
        }
        metrics
    }

    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
