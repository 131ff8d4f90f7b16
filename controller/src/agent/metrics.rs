//! The agent's Prometheus metrics. The names of api.md are the contract;
//! the rest describe the agent itself (compile, sync, convergence, map fill).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub blocked_connections: IntCounterVec,
    pub audit_denied_connections: IntCounterVec,
    pub dropped_packets: IntCounterVec,
    pub egress_anomalies: IntCounterVec,
    pub policy_convergence: Histogram,
    pub compile_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    pub endpoints: IntGauge,
    pub endpoints_failed_closed: IntGauge,
    pub policies_rejected: IntGauge,
    pub sync_errors: IntCounterVec,
    pub events_received: IntCounterVec,
}

/// Buckets from 1 ms to 10 s: convergence is milliseconds in a folder and
/// under a second through an API server.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let connection_labels = ["direction", "namespace", "pod", "policy"];
        Self {
            blocked_connections: counter(
                "bulkhead_blocked_connections_total",
                "Connections denied: the first packet of each refused flow, not every retransmission.",
                &connection_labels,
            ),
            audit_denied_connections: counter(
                "bulkhead_audit_denied_connections_total",
                "Connections an Audit-mode policy would have denied.",
                &connection_labels,
            ),
            dropped_packets: counter(
                "bulkhead_dropped_packets_total",
                "Every packet the datapath dropped, by reason.",
                &["direction", "reason"],
            ),
            egress_anomalies: counter(
                "bulkhead_egress_anomalies_total",
                "Egress to destinations outside the workload's learned baseline (each new destination once).",
                &["namespace", "workload"],
            ),
            policy_convergence: histogram(
                "bulkhead_policy_convergence_seconds",
                "From an object change seen by the source to the datapath holding its result.",
            ),
            compile_seconds: histogram(
                "bulkhead_compile_seconds",
                "Time to compile the snapshot into the desired datapath state.",
            ),
            sync_seconds: histogram("bulkhead_sync_seconds", "Time to write the difference into the datapath maps."),
            map_entries: gauges(
                "bulkhead_datapath_map_entries",
                "Entries the agent holds in each datapath map.",
                &["map"],
            ),
            map_capacity: gauges("bulkhead_datapath_map_capacity", "Capacity of each datapath map.", &["map"]),
            endpoints: gauge("bulkhead_endpoints", "Local pods enforced on this node."),
            endpoints_failed_closed: gauge(
                "bulkhead_endpoints_failed_closed",
                "Local pods failed closed because their allowlist did not fit in the maps.",
            ),
            policies_rejected: gauge(
                "bulkhead_policies_rejected",
                "Policy objects rejected as invalid (their last good version, if any, stays enforced).",
            ),
            sync_errors: counter(
                "bulkhead_sync_errors_total",
                "Datapath writes or attachments that failed.",
                &["operation"],
            ),
            events_received: counter(
                "bulkhead_datapath_events_total",
                "Deny and audit events read from the datapath's ring buffer.",
                &["verdict"],
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("utf-8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
