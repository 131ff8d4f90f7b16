//! The controller's Prometheus metrics.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

pub struct Metrics {
    registry: crate::metrics::Metrics,
    /// Status passes over every policy.
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_seconds: Histogram,
    pub status_writes: IntCounter,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let r = crate::metrics::Metrics::default();
        Self {
            reconciles: r.count("bulkhead_controller_reconciles_total", "Status passes over every policy."),
            reconcile_errors: r.counter(
                "bulkhead_controller_reconcile_errors_total",
                "Status writes and Events that failed, by operation.",
                &["operation"],
            ),
            reconcile_seconds: r.histogram("bulkhead_controller_reconcile_seconds", "Time of one status pass."),
            status_writes: r
                .count("bulkhead_controller_status_writes_total", "Policy statuses written (by the leader only)."),
            leader: r.gauge("bulkhead_controller_leader", "1 while this replica leads (writes status), else 0."),
            registry: r,
        }
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
