//! `bulkhead controller`: policy status, written by one writer (agents never
//! write status, and replicas elect one leader, so no two writers race on an
//! object).
//!
//! Each agent in Kubernetes mode reports what its datapath holds in a Lease
//! of its own (`crate::report`). The controller follows the same objects the
//! agents see and sets, for each ConnectionPolicy and ClusterConnectionPolicy,
//! `Accepted` (or why not), `Programmed` (every live agent holds this
//! generation), `selectedPods` and `observedGeneration`; each rejection also
//! becomes a Warning Event on the object. NetworkPolicy has no status
//! field: its rejections are Events only.

pub mod leader;
pub mod metrics;
pub mod status;
pub mod webhook;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bulkhead_crds::{policy_networking::ClusterNetworkPolicy, ClusterConnectionPolicy, ConnectionPolicy};
use bulkhead_policy::{PolicyKind, PolicyObject, PolicyRef};
use futures::StreamExt;
use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    http::{self, Reply},
    report::{node_report, AGENT_LEASE_LABEL},
    source::{kubernetes, Update},
};
use leader::Leadership;
use metrics::Metrics;
use status::{current_status, Desired, Engine, STATUS_INTERVAL};

pub struct Config {
    /// Where the agents' report Leases and the election Lease are.
    pub namespace: String,
    /// This replica's name in the election.
    pub identity: String,
    /// Serves /metrics, /healthz and /readyz.
    pub metrics_address: SocketAddr,
    /// The validating admission webhook, when served.
    pub webhook: Option<webhook::WebhookConfig>,
}

/// What the HTTP endpoints read.
#[derive(Default)]
struct Shared {
    metrics: Metrics,
    synced: AtomicBool,
    heartbeat: Mutex<Option<Instant>>,
}

/// The loop is stuck when it has not ticked for this long (it ticks every 5 s).
const STUCK: Duration = Duration::from_secs(30);

impl Shared {
    fn respond(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply::ok("text/plain; version=0.0.4", self.metrics.render()),
            "/healthz" => Reply::probe(match *self.heartbeat.lock().expect("heartbeat lock") {
                Some(at) if at.elapsed() > STUCK => Err(format!("the status loop has not run for {:?}", at.elapsed())),
                _ => Ok("ok"),
            }),
            "/readyz" => Reply::probe(if self.synced.load(Ordering::Relaxed) {
                Ok("ready")
            } else {
                Err("the first complete list of policies, pods and namespaces is not in yet".into())
            }),
            _ => Reply::not_found(),
        }
    }
}

/// Follow the objects and, while leading, write their status; returns when
/// SIGTERM or Ctrl-C arrives (having stepped down) or with the error that
/// stopped it.
pub async fn run(client: Client, config: Config) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::default());
    let for_http = shared.clone();
    let address = http::serve(config.metrics_address, move |path, _| for_http.respond(path).into())
        .await
        .with_context(|| format!("serving metrics on {}", config.metrics_address))?;
    if let Some(webhook) = &config.webhook {
        let served = webhook::start(client.clone(), &config.namespace, webhook)
            .await
            .context("starting the admission webhook")?;
        tracing::info!(address = %served, configuration = %webhook.configuration, "admission webhook serving");
    }
    let mut leadership = Leadership::join(client.clone(), &config.namespace, &config.identity)
        .await
        .context("joining the leader election")?;
    tracing::info!(identity = %config.identity, metrics = %address, "controller started");
    let result = tokio::select! {
        result = follow(client, &config, &shared, &mut leadership) => result,
        () = crate::stop_requested() => Ok(()),
    };
    shared.metrics.leader.set(0);
    leadership.resign().await;
    result
}

async fn follow(client: Client, config: &Config, shared: &Shared, leadership: &mut Leadership) -> anyhow::Result<()> {
    let (updates, mut received) = mpsc::channel::<Update>(1024);
    let source = tokio::spawn(kubernetes::run(client.clone(), updates));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let mut lease_events = watcher(leases, watcher::Config::default().labels(AGENT_LEASE_LABEL))
        .backoff(kubernetes::Reconnect::new())
        .applied_objects()
        .boxed();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "bulkhead-controller".into(), instance: Some(config.identity.clone()) },
    );
    let mut engine = Engine::default();
    let mut evented: BTreeSet<(PolicyRef, Option<i64>)> = BTreeSet::new();
    let mut tick = tokio::time::interval(TICK);
    let mut leading = leadership.is_leader();
    let mut statuses_due = Instant::now();
    loop {
        let statuses_wait = leading && engine.synced() && engine.has_marked();
        tokio::select! {
            update = received.recv() => {
                let Some(update) = update else { break };
                engine.apply(update.changes);
                shared.synced.store(engine.synced(), Ordering::Relaxed);
            }
            lease = lease_events.next() => match lease {
                Some(Ok(lease)) => {
                    if let Some((node, report)) = node_report(&lease, Timestamp::now()) {
                        let age = report.age;
                        engine.report(&node, report, age);
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "watching agent reports failed; retrying"),
                None => break,
            },
            now_leading = leadership.changed() => {
                leading = now_leading;
                shared.metrics.leader.set(i64::from(leading));
                if leading {
                    tracing::info!(identity = %config.identity, "leading: this replica writes status");
                    engine.mark_all();
                } else {
                    tracing::warn!(identity = %config.identity, "no longer leading: status writes stop");
                }
            }
            _ = tick.tick() => {
                *shared.heartbeat.lock().expect("heartbeat lock") = Some(Instant::now());
                engine.age_reports(TICK);
            }
            () = tokio::time::sleep_until(statuses_due.into()), if statuses_wait => {}
        }
        if !leading || !engine.synced() || !received.is_empty() || Instant::now() < statuses_due {
            continue;
        }
        let started = Instant::now();
        statuses_due = started + STATUS_INTERVAL;
        let desired = engine.take_desired(&Time(Timestamp::now()));
        if desired.is_empty() {
            continue;
        }
        write_statuses(&client, &recorder, shared, &mut engine, desired, &mut evented).await;
        shared.metrics.reconciles.inc();
        shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    }
    source.abort();
    anyhow::bail!("the Kubernetes source stopped")
}

/// How often reports age and liveness is looked at.
const TICK: Duration = Duration::from_secs(1);

/// Write the statuses that differ from the objects', and publish each
/// rejected version's Event once.
async fn write_statuses(
    client: &Client,
    recorder: &Recorder,
    shared: &Shared,
    engine: &mut Engine,
    desired: BTreeMap<PolicyRef, Desired>,
    evented: &mut BTreeSet<(PolicyRef, Option<i64>)>,
) {
    for (key, wanted) in desired {
        let Some(object) = engine.object(&key) else { continue };
        let warned = wanted.rejection.is_some() || !wanted.warnings.is_empty();
        if warned && evented.insert((key.clone(), object.generation())) {
            let note = wanted
                .rejection
                .as_ref()
                .map(|error| ("PolicyRejected", format!("{}: {}: {}", error.reason, error.field, error.message)));
            let notes = note.into_iter().chain(wanted.warnings.iter().map(|w| (w.reason, w.to_string())));
            for (reason, note) in notes {
                if !publish_warning(recorder, object, &key, reason, note).await {
                    shared.metrics.reconcile_errors.with_label_values(&["event"]).inc();
                }
            }
        }
        if key.kind == PolicyKind::NetworkPolicy || current_status(object).as_ref() == Some(&wanted.status) {
            continue;
        }
        let patch = Patch::Merge(json!({ "status": wanted.status }));
        let params = PatchParams::default();
        let result = match key.kind {
            PolicyKind::ConnectionPolicy => Api::<ConnectionPolicy>::namespaced(client.clone(), &key.namespace)
                .patch_status(&key.name, &params, &patch)
                .await
                .map(PolicyObject::Connection),
            PolicyKind::ClusterNetworkPolicy => Api::<ClusterNetworkPolicy>::all(client.clone())
                .patch_status(&key.name, &params, &patch)
                .await
                .map(PolicyObject::ClusterNetwork),
            _ => Api::<ClusterConnectionPolicy>::all(client.clone())
                .patch_status(&key.name, &params, &patch)
                .await
                .map(PolicyObject::Cluster),
        };
        match result {
            // Keep the written status, so it is not written again.
            Ok(updated) => {
                shared.metrics.status_writes.inc();
                engine.written(updated);
            }
            Err(error) => {
                shared.metrics.reconcile_errors.with_label_values(&["status"]).inc();
                tracing::warn!(policy = %key, %error, "writing status failed; retrying at the next change");
            }
        }
    }
}

/// A Warning Event on the object; false when it could not be published.
async fn publish_warning(
    recorder: &Recorder,
    object: &PolicyObject,
    policy: &PolicyRef,
    reason: &str,
    note: String,
) -> bool {
    let reference = match object {
        PolicyObject::Connection(p) => p.object_ref(&()),
        PolicyObject::Cluster(p) => p.object_ref(&()),
        PolicyObject::Network(p) => p.object_ref(&()),
        PolicyObject::ClusterNetwork(p) => p.object_ref(&()),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Validate".into(),
        secondary: None,
    };
    match recorder.publish(&event, &reference).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(%policy, %reason, error = %e, "publishing a Warning Event failed");
            false
        }
    }
}
