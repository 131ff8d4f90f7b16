//! Prometheus plumbing both roles share: metrics register themselves into
//! one registry, which `/metrics` renders.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Buckets from 1 ms to 10 s: convergence is milliseconds in a folder and
/// under a second through an API server.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    pub fn count(&self, name: &str, help: &str) -> IntCounter {
        let metric = IntCounter::new(name, help).expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    pub fn histogram(&self, name: &str, help: &str) -> Histogram {
        let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
            .expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    pub fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    pub fn float_gauge(&self, name: &str, help: &str) -> Gauge {
        let metric = Gauge::new(name, help).expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let metric = IntGauge::new(name, help).expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("utf-8 metrics")
    }
}
