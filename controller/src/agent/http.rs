//! The agent's endpoints: `/metrics`, `/healthz` and `/readyz` on the
//! metrics address, which Prometheus and the kubelet reach; `/debug/state`
//! (what is enforced) and `/debug/events` (the latest deny and audit events)
//! on the debug address, loopback unless the operator says otherwise, since
//! they name pods and flows.

use std::{net::SocketAddr, sync::Arc};

use super::Shared;
use crate::http::{self, Reply};

/// Serve both until the process ends; the bound addresses (port 0 picks one).
pub async fn serve(
    metrics: SocketAddr,
    debug: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    if metrics == debug {
        let bound = http::serve(metrics, move |path| respond(&shared, path)).await?;
        return Ok((bound, bound));
    }
    let for_debug = shared.clone();
    let metrics = http::serve(metrics, move |path| observe(&shared, path)).await?;
    let debug = http::serve(debug, move |path| debug_view(&for_debug, path)).await?;
    Ok((metrics, debug))
}

fn respond(shared: &Shared, path: &str) -> Reply {
    match path {
        "/debug/state" | "/debug/events" => debug_view(shared, path),
        _ => observe(shared, path),
    }
}

fn observe(shared: &Shared, path: &str) -> Reply {
    match path {
        "/metrics" => Reply::ok("text/plain; version=0.0.4", shared.metrics.render()),
        "/healthz" => Reply::probe(shared.health().map(|()| "ok")),
        "/readyz" => Reply::probe(shared.readiness()),
        _ => Reply::not_found(),
    }
}

fn debug_view(shared: &Shared, path: &str) -> Reply {
    match path {
        "/debug/state" => Reply::ok("application/json", shared.state_json()),
        "/debug/events" => Reply::ok("application/json", shared.events_json()),
        _ => Reply::not_found(),
    }
}
