//! `--source kubernetes`: kube-runtime watchers for Namespaces, Pods and the
//! four policy kinds, turned into `Change`s. A watch that (re)starts lists
//! everything again: that becomes one `Relisted`, so objects deleted while
//! the API server was away are dropped, and nothing is dropped before the
//! new list is complete. `Synced` follows the first complete list of every
//! kind. A watch that fails keeps retrying with backoff while what is
//! enforced stays as it is.

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bulkhead_crds::{policy_networking::ClusterNetworkPolicy, ClusterConnectionPolicy, ConnectionPolicy};
use futures::StreamExt;
use k8s_openapi::api::{core::v1 as core, networking::v1::NetworkPolicy};
use kube::{
    runtime::{utils::Backoff, watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use bulkhead_policy::{
    manifest, Change, Namespace, Object, ObjectKey, ObjectKind, PodRef, PolicyKind, PolicyObject, PolicyRef,
};

use super::Update;

/// An object kind the source follows.
pub trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: ObjectKind;
    /// The object as the compiler sees it; `None` when it takes no part
    /// (a pod that has finished), `Err` when it cannot be read.
    fn object(self) -> Result<Option<Object>, String>;
    fn key(&self) -> ObjectKey;
}

impl Watched for core::Namespace {
    const KIND: ObjectKind = ObjectKind::Namespace;
    fn object(self) -> Result<Option<Object>, String> {
        Ok(Some(Object::Namespace(Namespace::new(&self.name_any(), self.metadata.labels.unwrap_or_default()))))
    }
    fn key(&self) -> ObjectKey {
        ObjectKey::Namespace(self.name_any())
    }
}

impl Watched for core::Pod {
    const KIND: ObjectKind = ObjectKind::Pod;
    fn object(self) -> Result<Option<Object>, String> {
        // A finished pod's address may already belong to another pod.
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Ok(None);
        }
        Ok(manifest::pod_of(self)?.map(Object::Pod))
    }
    fn key(&self) -> ObjectKey {
        ObjectKey::Pod(PodRef::new(&self.namespace().unwrap_or_default(), &self.name_any()))
    }
}

macro_rules! watched_policy {
    ($type:ty, $variant:ident, $kind:ident) => {
        impl Watched for $type {
            const KIND: ObjectKind = ObjectKind::Policy(PolicyKind::$kind);
            fn object(self) -> Result<Option<Object>, String> {
                Ok(Some(Object::Policy(Box::new(PolicyObject::$variant(self)))))
            }
            fn key(&self) -> ObjectKey {
                ObjectKey::Policy(Box::new(PolicyRef::of(PolicyKind::$kind, &self.metadata)))
            }
        }
    };
}

watched_policy!(ConnectionPolicy, Connection, ConnectionPolicy);
watched_policy!(ClusterConnectionPolicy, Cluster, ClusterConnectionPolicy);
watched_policy!(NetworkPolicy, Network, NetworkPolicy);
watched_policy!(ClusterNetworkPolicy, ClusterNetwork, ClusterNetworkPolicy);

/// How many kinds `run` follows.
const KINDS: usize = 6;

/// Follow every kind until `updates` closes; returns only then.
pub async fn run(client: Client, updates: mpsc::Sender<Update>) -> anyhow::Result<()> {
    let listed = Arc::new(AtomicUsize::new(0));
    tokio::select! {
        () = follow(Api::<core::Namespace>::all(client.clone()), updates.clone(), listed.clone()) => {}
        () = follow(Api::<core::Pod>::all(client.clone()), updates.clone(), listed.clone()) => {}
        () = follow(Api::<ConnectionPolicy>::all(client.clone()), updates.clone(), listed.clone()) => {}
        () = follow(Api::<ClusterConnectionPolicy>::all(client.clone()), updates.clone(), listed.clone()) => {}
        () = follow(Api::<NetworkPolicy>::all(client.clone()), updates.clone(), listed.clone()) => {}
        () = follow(Api::<ClusterNetworkPolicy>::all(client), updates, listed) => {}
    }
    Ok(())
}

fn readable<K: Watched>(object: K) -> Option<Object> {
    let key = object.key();
    match object.object() {
        Ok(object) => object,
        Err(error) => {
            tracing::error!(object = ?key, %error, "object cannot be read; left out");
            None
        }
    }
}

/// Retry a failed watch after 250 ms, doubling to 5 s, with up to 25% jitter
/// so a fleet of agents does not retry in step. Quicker than kube's default
/// (up to 30 s): while its watches are down an agent enforces a stale state.
pub struct Reconnect {
    next: Duration,
}

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(250);
    const MOST: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for Reconnect {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Some(delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0))
    }
}

impl Backoff for Reconnect {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Follow one kind; returns when the agent stops listening.
async fn follow<K: Watched>(api: Api<K>, updates: mpsc::Sender<Update>, listed: Arc<AtomicUsize>) {
    let mut events = watcher(api, watcher::Config::default()).backoff(Reconnect::new()).boxed();
    let mut relisting: Option<(Instant, Vec<Object>)> = None;
    let mut first_list = true;
    while let Some(event) = events.next().await {
        let observed = Instant::now();
        // The resourceVersion of the change, reported once it is enforced:
        // how a client that wrote an object knows the datapath holds it.
        let mut revision = None;
        let changes = match event {
            Err(error) => {
                tracing::warn!(kind = ?K::KIND, %error, "watch failed; retrying with backoff, what is enforced stays");
                continue;
            }
            Ok(watcher::Event::Init) => {
                relisting = Some((observed, Vec::new()));
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let (Some((_, buffer)), Some(object)) = (relisting.as_mut(), readable(object)) {
                    buffer.push(object);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let objects = relisting.take().map(|(_, objects)| objects).unwrap_or_default();
                tracing::info!(kind = ?K::KIND, objects = objects.len(), "listed");
                let mut changes = vec![Change::Relisted(K::KIND, objects)];
                if std::mem::take(&mut first_list) && listed.fetch_add(1, Ordering::SeqCst) + 1 == KINDS {
                    changes.push(Change::Synced);
                }
                changes
            }
            Ok(watcher::Event::Apply(object)) => {
                revision = object.resource_version();
                match readable(object.clone()) {
                    Some(readable) => vec![Change::Applied(readable)],
                    None => vec![Change::Deleted(object.key())],
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                revision = object.resource_version();
                vec![Change::Deleted(object.key())]
            }
        };
        if updates.send(Update { changes, observed, revision }).await.is_err() {
            return;
        }
    }
}
