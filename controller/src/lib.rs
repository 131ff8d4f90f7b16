//! Bulkhead, the product: what ships in the image.
//!
//! - [`agent`]: `bulkhead agent`, one per node: follows a [`source`], compiles
//!   with `bulkhead-policy`, keeps the [`dataplane`] (the only code touching
//!   the kernel's BPF objects) in step.
//! - [`controller`]: `bulkhead controller`, one writer of policy status.
//! - [`cli`]: the offline commands (`check`, `explain`, `compile`).
//! - [`report`]: what agents tell the controller through the API server.
//! - [`http`]: the metrics, probe and debug servers both roles run.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod dataplane;
pub mod http;
pub mod metrics;
pub mod report;
pub mod source;

/// SIGTERM (what the kubelet sends) or Ctrl-C: time to stop, cleanly.
pub async fn stop_requested() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
