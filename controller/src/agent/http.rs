//! The agent's endpoints: `/metrics`, `/healthz` and `/readyz` on the
//! metrics address, which Prometheus and the kubelet reach; `/debug/state`
//! (what is enforced) and `/debug/events` (the latest verdict events)
//! on the debug address, loopback unless the operator says otherwise, since
//! they name pods and flows.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::Shared;
use crate::http::{self, Answer, Reply};

/// The longest `/debug/revision?after_sync=` waits for a sync.
const LONG_POLL: Duration = Duration::from_secs(3);

/// Serve both until the process ends; the bound addresses (port 0 picks one).
pub async fn serve(
    metrics: SocketAddr,
    debug: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    if metrics == debug {
        let bound = http::serve(metrics, move |path, query| respond(&shared, path, query)).await?;
        return Ok((bound, bound));
    }
    let for_debug = shared.clone();
    let metrics = http::serve(metrics, move |path, _| observe(&shared, path).into()).await?;
    let debug = http::serve(debug, move |path, query| debug_view(&for_debug, path, query)).await?;
    Ok((metrics, debug))
}

fn respond(shared: &Arc<Shared>, path: &str, query: &str) -> Answer {
    match path {
        "/debug/state" | "/debug/events" | "/debug/revision" => debug_view(shared, path, query),
        _ => observe(shared, path).into(),
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

fn debug_view(shared: &Arc<Shared>, path: &str, query: &str) -> Answer {
    let parameter = |name: &str| query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse().ok());
    match path {
        "/debug/state" => Reply::ok("application/json", shared.state_json()).into(),
        // `?after=<seq>`: only the events after that one (what `bulkhead flows --follow` polls).
        "/debug/events" => Reply::ok("application/json", shared.events_json(parameter("after").unwrap_or(0))).into(),
        // `?after_sync=<n>`: answered once the agent has synced more than n
        // times (or after `LONG_POLL`), so a waiter need not poll.
        "/debug/revision" => match parameter("after_sync") {
            Some(seen) => {
                let shared = shared.clone();
                Answer::Later(Box::pin(async move {
                    let mut synced = shared.synced.subscribe();
                    let _ = tokio::time::timeout(LONG_POLL, synced.wait_for(|syncs| *syncs > seen)).await;
                    Reply::ok("application/json", shared.revision_json())
                }))
            }
            None => Reply::ok("application/json", shared.revision_json()).into(),
        },
        _ => Reply::not_found().into(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Status and body.
    fn get(address: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_string())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn debug_views_are_served_only_on_the_debug_address() {
        let (metrics, debug) =
            serve("127.0.0.1:0".parse().unwrap(), "127.0.0.2:0".parse().unwrap(), Arc::new(Shared::new()))
                .await
                .unwrap();
        assert_ne!(metrics, debug);
        let status = |address, path: &'static str| tokio::task::spawn_blocking(move || get(address, path).0);
        assert_eq!(status(metrics, "/metrics").await.unwrap(), 200);
        assert_eq!(status(metrics, "/healthz").await.unwrap(), 200);
        assert_eq!(status(metrics, "/readyz").await.unwrap(), 503, "not ready before the first sync");
        assert_eq!(status(metrics, "/debug/state").await.unwrap(), 404, "pod names stay off the metrics address");
        assert_eq!(status(metrics, "/debug/events").await.unwrap(), 404);
        assert_eq!(status(debug, "/debug/state").await.unwrap(), 200);
        assert_eq!(status(debug, "/metrics").await.unwrap(), 404);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_revision_long_poll_answers_at_the_next_sync() {
        let shared = Arc::new(Shared::new());
        let (_, debug) =
            serve("127.0.0.1:0".parse().unwrap(), "127.0.0.2:0".parse().unwrap(), shared.clone()).await.unwrap();
        let body = |path: &'static str| {
            tokio::task::spawn_blocking(move || serde_json::from_str::<serde_json::Value>(&get(debug, path).1).unwrap())
        };
        assert_eq!(body("/debug/revision").await.unwrap()["syncs"], 0, "no wait without after_sync");
        let waiting = body("/debug/revision?after_sync=0");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "answered before any sync");
        shared.state.lock().unwrap().syncs = 1;
        shared.synced.send_replace(1);
        assert_eq!(waiting.await.unwrap()["syncs"], 1);
        assert_eq!(body("/debug/revision?after_sync=0").await.unwrap()["syncs"], 1, "a sync already past answers now");
    }
}
