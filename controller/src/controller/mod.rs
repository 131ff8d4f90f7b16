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
use bulkhead_crds::{ClusterConnectionPolicy, ConnectionPolicy, PolicyStatus};
use bulkhead_policy::{
    rules::ValidationError, Change, Object, ObjectKey, ObjectKind, PolicyKind, PolicyObject, PolicyRef, Snapshot,
};
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
    report::{node_report, NodeReport, AGENT_LEASE_LABEL},
    source::{kubernetes, Update},
};
use leader::Leadership;
use metrics::Metrics;
use status::{current_status, desired_statuses};

pub struct Config {
    /// Where the agents' report Leases and the election Lease are.
    pub namespace: String,
    /// This replica's name in the election.
    pub identity: String,
    /// Serves /metrics, /healthz and /readyz.
    pub metrics_address: SocketAddr,
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

/// The policy objects as the API server has them: their present status and
/// what an Event refers to.
#[derive(Default)]
struct Objects {
    policies: BTreeMap<PolicyRef, PolicyObject>,
}

impl Objects {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Applied(Object::Policy(policy)) => {
                self.policies.insert(policy.policy_ref(), (**policy).clone());
            }
            Change::Deleted(ObjectKey::Policy(key)) => {
                self.policies.remove(key);
            }
            Change::Relisted(ObjectKind::Policy(kind), objects) => {
                self.policies.retain(|key, _| key.kind != *kind);
                for object in objects {
                    if let Object::Policy(policy) = object {
                        self.policies.insert(policy.policy_ref(), (**policy).clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// Follow the objects and, while leading, write their status; returns when
/// SIGTERM or Ctrl-C arrives (having stepped down) or with the error that
/// stopped it.
pub async fn run(client: Client, config: Config) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::default());
    let for_http = shared.clone();
    let address = http::serve(config.metrics_address, move |path| for_http.respond(path))
        .await
        .with_context(|| format!("serving metrics on {}", config.metrics_address))?;
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
    let mut lease_objects: BTreeMap<String, Lease> = BTreeMap::new();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "bulkhead-controller".into(), instance: Some(config.identity.clone()) },
    );
    let mut snapshot = Snapshot::default();
    let mut objects = Objects::default();
    let mut evented: BTreeSet<(PolicyRef, Option<i64>)> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut dirty = false;
    let mut leading = leadership.is_leader();
    loop {
        tokio::select! {
            update = received.recv() => {
                let Some(update) = update else { break };
                for change in update.changes {
                    if matches!(change, Change::Synced) {
                        shared.synced.store(true, Ordering::Relaxed);
                    }
                    objects.apply(&change);
                    snapshot.apply(change);
                }
                dirty = true;
            }
            lease = lease_events.next() => match lease {
                Some(Ok(lease)) => {
                    lease_objects.insert(lease.metadata.name.clone().unwrap_or_default(), lease);
                    dirty = true;
                }
                Some(Err(error)) => tracing::warn!(%error, "watching agent reports failed; retrying"),
                None => break,
            },
            now_leading = leadership.changed() => {
                leading = now_leading;
                shared.metrics.leader.set(i64::from(leading));
                if leading {
                    tracing::info!(identity = %config.identity, "leading: this replica writes status");
                    dirty = true;
                } else {
                    tracing::warn!(identity = %config.identity, "no longer leading: status writes stop");
                }
            }
            _ = tick.tick() => {
                *shared.heartbeat.lock().expect("heartbeat lock") = Some(Instant::now());
                dirty = true;
            }
        }
        if !dirty || !leading || !shared.synced.load(Ordering::Relaxed) || !received.is_empty() {
            continue;
        }
        dirty = false;
        let started = Instant::now();
        write_statuses(&client, &recorder, shared, &snapshot, &mut objects, &lease_objects, &mut evented).await;
        shared.metrics.reconciles.inc();
        shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    }
    source.abort();
    anyhow::bail!("the Kubernetes source stopped")
}

/// One status pass: every policy's desired status written where it differs,
/// and each rejected version's Event published once.
async fn write_statuses(
    client: &Client,
    recorder: &Recorder,
    shared: &Shared,
    snapshot: &Snapshot,
    objects: &mut Objects,
    leases: &BTreeMap<String, Lease>,
    evented: &mut BTreeSet<(PolicyRef, Option<i64>)>,
) {
    let now = Timestamp::now();
    let reports: BTreeMap<String, NodeReport> = leases.values().filter_map(|l| node_report(l, now)).collect();
    let previous: BTreeMap<PolicyRef, PolicyStatus> =
        objects.policies.iter().filter_map(|(k, o)| Some((k.clone(), current_status(o)?))).collect();
    for (key, wanted) in desired_statuses(snapshot, &reports, &previous, &Time(now)) {
        let Some(object) = objects.policies.get(&key) else { continue };
        if let Some(error) = &wanted.rejection {
            if evented.insert((key.clone(), object.generation())) && !publish_rejection(recorder, object, error).await {
                shared.metrics.reconcile_errors.with_label_values(&["event"]).inc();
            }
        }
        if key.kind == PolicyKind::NetworkPolicy || previous.get(&key) == Some(&wanted.status) {
            continue;
        }
        let patch = Patch::Merge(json!({ "status": wanted.status }));
        let params = PatchParams::default();
        let result = match key.kind {
            PolicyKind::ConnectionPolicy => Api::<ConnectionPolicy>::namespaced(client.clone(), &key.namespace)
                .patch_status(&key.name, &params, &patch)
                .await
                .map(PolicyObject::Connection),
            _ => Api::<ClusterConnectionPolicy>::all(client.clone())
                .patch_status(&key.name, &params, &patch)
                .await
                .map(PolicyObject::Cluster),
        };
        match result {
            // Keep the written status, so it is not written again.
            Ok(updated) => {
                shared.metrics.status_writes.inc();
                objects.policies.insert(key, updated);
            }
            Err(error) => {
                shared.metrics.reconcile_errors.with_label_values(&["status"]).inc();
                tracing::warn!(policy = %key, %error, "writing status failed; retrying at the next change");
            }
        }
    }
}

/// A Warning Event on the object; false when it could not be published.
async fn publish_rejection(recorder: &Recorder, object: &PolicyObject, error: &ValidationError) -> bool {
    let reference = match object {
        PolicyObject::Connection(p) => p.object_ref(&()),
        PolicyObject::Cluster(p) => p.object_ref(&()),
        PolicyObject::Network(p) => p.object_ref(&()),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyRejected".into(),
        note: Some(format!("{}: {}: {}", error.reason, error.field, error.message)),
        action: "Validate".into(),
        secondary: None,
    };
    match recorder.publish(&event, &reference).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(policy = %error.policy, error = %e, "publishing the rejection Event failed");
            false
        }
    }
}
