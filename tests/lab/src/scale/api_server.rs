//! The same generated cluster through a real API server (Debian's etcd and
//! kube-apiserver, `testbed::apiserver`): the agent follows it with
//! `--source=kubernetes` as it would on a node, and each change is a write
//! to the API server whose latency runs until the agent's `/debug/revision`
//! reaches the resourceVersion that write made. No kubelet runs, so the
//! bench does what one would: it reports each pod's addresses in its status
//! and names the local pods' cgroups after the uids the server gave them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;

use super::{
    churn_deletes, cpu_seconds, memory_mb, Cluster, Series, CHURN_PER_SECOND, CHURN_SECONDS, LOCAL_PODS, NODE, PIN_DIR,
    ROUNDS,
};
use crate::testbed::{self, apiserver::ControlPlane, Process, TestPod, Topology, AGENT_ADDRESS};

/// Requests the bench keeps in flight while it loads the cluster.
const LOAD_CONCURRENCY: usize = 32;

/// Where each kind the generator writes lives in the API.
fn resource_of(api_version: &str, kind: &str) -> Result<ApiResource> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "Namespace" => "namespaces",
        "Pod" => "pods",
        "NetworkPolicy" => "networkpolicies",
        "ConnectionPolicy" => "connectionpolicies",
        "ClusterConnectionPolicy" => "clusterconnectionpolicies",
        other => bail!("the generator wrote a kind the bench cannot create: {other}"),
    };
    Ok(ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural))
}

/// An object of the generated folder, split as the API server takes it: the
/// object to create, and the status a kubelet would report afterwards.
struct Manifest {
    object: DynamicObject,
    resource: ApiResource,
    status: Option<serde_json::Value>,
}

impl Manifest {
    fn parse(text: &str) -> Result<Vec<Manifest>> {
        let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
        documents
            .into_iter()
            .map(|mut document| {
                let resource = resource_of(
                    document["apiVersion"].as_str().context("apiVersion")?,
                    document["kind"].as_str().context("kind")?,
                )?;
                let status = document.as_object_mut().and_then(|o| o.remove("status"));
                // The server gives each object its uid.
                if let Some(metadata) = document["metadata"].as_object_mut() {
                    metadata.remove("uid");
                }
                Ok(Manifest { object: serde_json::from_value(document)?, resource, status })
            })
            .collect()
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        match &self.object.metadata.namespace {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &self.resource),
            None => Api::all_with(client.clone(), &self.resource),
        }
    }

    fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }

    fn is_local_pod(&self) -> bool {
        self.object.data["spec"]["nodeName"] == NODE
    }
}

fn manifests_in(folder: &Path) -> Result<Vec<Manifest>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(folder)? {
        all.extend(Manifest::parse(&std::fs::read_to_string(entry?.path())?)?);
    }
    Ok(all)
}

fn resource_version(object: &DynamicObject) -> Result<u64> {
    object.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).context("a numeric resourceVersion")
}

/// Cgroups the bench made for local pods, named as kubelet names them after
/// the uid the server gave; removed when it goes.
struct PodCgroups {
    root: PathBuf,
    made: Mutex<Vec<PathBuf>>,
}

impl PodCgroups {
    fn make(&self, uid: &str) -> Result<()> {
        let path = self.root.join(format!("pod{uid}"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        self.made.lock().expect("cgroups lock").push(path);
        Ok(())
    }

    fn remove(&self, uid: &str) {
        let path = self.root.join(format!("pod{uid}"));
        let _ = std::fs::remove_dir(&path);
        self.made.lock().expect("cgroups lock").retain(|p| p != &path);
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        for path in self.made.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = std::fs::remove_dir(&path);
        }
    }
}

/// Create an object, then report its status as a kubelet would (a local
/// pod gets its cgroup first); the resourceVersion of the last write.
async fn create(client: &Client, manifest: &Manifest, cgroups: Option<&PodCgroups>) -> Result<u64> {
    let api = manifest.api(client);
    let created = api
        .create(&PostParams::default(), &manifest.object)
        .await
        .with_context(|| format!("creating {} {}", manifest.resource.kind, manifest.name()))?;
    let Some(status) = &manifest.status else { return resource_version(&created) };
    if manifest.is_local_pod() {
        let cgroups = cgroups.context("a local pod needs its cgroup")?;
        cgroups.make(created.metadata.uid.as_deref().context("a uid")?)?;
    }
    let reported = api
        .patch_status(manifest.name(), &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
        .await
        .with_context(|| format!("reporting the status of pod {}", manifest.name()))?;
    resource_version(&reported)
}

/// Delete an object at once (no kubelet is there to finish a graceful
/// delete); the resourceVersion of the deletion.
async fn delete(client: &Client, manifest: &Manifest) -> Result<u64> {
    let deleted = manifest
        .api(client)
        .delete(manifest.name(), &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .with_context(|| format!("deleting {} {}", manifest.resource.kind, manifest.name()))?;
    resource_version(&deleted.left().context("the deleted object")?)
}

/// Replace an object with a version of it (a policy edit, a relabel); the
/// resourceVersion of the write.
async fn replace(client: &Client, manifest: &Manifest) -> Result<u64> {
    let mut patch = json!({ "metadata": { "labels": manifest.object.metadata.labels } });
    // A namespace has no spec here; a null one would remove the server's.
    if let Some(spec) = manifest.object.data.get("spec") {
        patch["spec"] = spec.clone();
    }
    let patched = manifest
        .api(client)
        .patch(manifest.name(), &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("changing {} {}", manifest.resource.kind, manifest.name()))?;
    resource_version(&patched)
}

fn one(text: &str) -> Result<Manifest> {
    Manifest::parse(text)?.into_iter().next().context("one object")
}

/// The agent's view: the resourceVersion it holds and its local pods.
fn held(topology: &Topology) -> (u64, usize) {
    let body = match topology.node_http_get(AGENT_ADDRESS, "/debug/revision") {
        Ok((200, body)) => body,
        _ => return (0, 0),
    };
    let state: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let revision = state["revision"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0);
    (revision, state["endpoints"].as_u64().unwrap_or(0) as usize)
}

/// Wait until the agent holds `revision` (or a later one) with `endpoints` local pods.
fn until(topology: &Topology, revision: u64, endpoints: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let (held, enforced) = tokio::task::block_in_place(|| held(topology));
        if held >= revision && enforced == endpoints {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not reach resourceVersion {revision} with {endpoints} pods in 60 s (it holds {held} with {enforced})");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A write and its wait, measured.
async fn timed(
    topology: &Topology,
    endpoints: usize,
    series: &mut Series,
    write: impl std::future::Future<Output = Result<u64>>,
) -> Result<()> {
    let writes_before = map_writes(topology);
    let started = Instant::now();
    let revision = write.await?;
    until(topology, revision, endpoints)?;
    series.ms.push(started.elapsed().as_secs_f64() * 1e3);
    series.writes.push(map_writes(topology).saturating_sub(writes_before));
    Ok(())
}

fn map_writes(topology: &Topology) -> u64 {
    let body = tokio::task::block_in_place(|| topology.node_http_get(AGENT_ADDRESS, "/debug/revision"));
    body.ok()
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|state| state["map_writes"].as_u64())
        .unwrap_or(0)
}

/// The cluster of `cluster` through an API server: everything measured but
/// the controller (its engine is measured on the folder).
pub fn measure(topology: &Topology, spares: &[TestPod], cluster: &Cluster) -> Result<serde_json::Value> {
    let plane = ControlPlane::start(&topology.node_netns, "scl");
    plane.install_bulkhead();
    let cgroups = PodCgroups { root: topology.kubepods.clone(), made: Mutex::default() };
    // The bench's own client reaches the API server from the node's namespace, on a thread of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                topology.enter_node();
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?
                    .block_on(measure_in_node(topology, spares, cluster, &plane, &cgroups))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the API-server bench thread panicked"))?
    })
}

async fn measure_in_node(
    topology: &Topology,
    spares: &[TestPod],
    cluster: &Cluster,
    plane: &ControlPlane,
    cgroups: &PodCgroups,
) -> Result<serde_json::Value> {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig("admin"))?;
    let client = Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)?;

    // Load the cluster: namespaces first, then policies and pods.
    let loading = Instant::now();
    for folder in ["namespaces", "policies", "pods"] {
        let manifests = manifests_in(&cluster.folder.join(folder))?;
        stream::iter(manifests.iter().map(|m| create(&client, m, Some(cgroups))))
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
    }
    println!("  loaded {} pods into the API server in {:.1} s", cluster.pods, loading.elapsed().as_secs_f64());

    let _ = bulkhead::dataplane::Datapath::unpin_all(PIN_DIR);
    let log = std::env::temp_dir().join(format!("bulkhead-bench-scale-api-{}.log", cluster.pods));
    let started = Instant::now();
    let agent = Process(
        plane
            .command_as("agent", testbed::product_binary())
            .args(["agent", "--source=kubernetes", "--node-name", NODE, "--pin-dir", PIN_DIR])
            .args(["--metrics-address", AGENT_ADDRESS, "--debug-address", AGENT_ADDRESS])
            .arg(format!("--cgroup-root={}", topology.kubepods.display()))
            .arg(format!("--state-dir={}", topology.state_dir(NODE).display()))
            .args(["--egress-learning-seconds", "0", super::POD_INTERFACE_PREFIX])
            .env("RUST_LOG", super::agent_log_filter())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let pid = agent.0.id();
    let ready = || {
        let metrics = topology.agent_get("/metrics").unwrap_or_default();
        testbed::metric(&metrics, "bulkhead_agent_ready_seconds ").filter(|s| *s > 0.0).map(|_| metrics)
    };
    let metrics = loop {
        if let Some(metrics) = tokio::task::block_in_place(ready).filter(|_| held(topology).1 == LOCAL_PODS) {
            break metrics;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the agent was not ready in 120 s; its log: {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let up_s = started.elapsed().as_secs_f64();
    let gauge = |name: &str| testbed::metric(&metrics, &format!("{name} ")).unwrap_or(f64::NAN);
    let ready_after_sync = gauge("bulkhead_agent_ready_seconds") - gauge("bulkhead_agent_source_synced_seconds");
    println!(
        "{} pods through the API server: agent up in {up_s:.1} s (watches synced at {:.1} s, ready {ready_after_sync:.2} s later), RSS {:.0} MB",
        cluster.pods,
        gauge("bulkhead_agent_source_synced_seconds"),
        memory_mb(pid).0
    );

    let mut series: BTreeMap<&str, Series> = BTreeMap::new();
    // (a) policy edits, to a version and back.
    for (_, a, b) in &cluster.edits {
        for text in [b, a] {
            timed(topology, LOCAL_PODS, series.entry("policy_edit").or_default(), replace(&client, &one(text)?))
                .await?;
        }
    }
    // (b) a local pod added, then removed.
    for round in 0..ROUNDS {
        let spare = &spares[round % spares.len()];
        let pod = one(&cluster.local_extra_pod(round, spare))?;
        tokio::task::block_in_place(|| super::wire_spare(topology, spare))?;
        timed(topology, LOCAL_PODS + 1, series.entry("local_pod").or_default(), create(&client, &pod, Some(cgroups)))
            .await?;
        let uid = pod.api(&client).get(pod.name()).await?.metadata.uid.unwrap_or_default();
        timed(topology, LOCAL_PODS, &mut Series::default(), delete(&client, &pod)).await?;
        cgroups.remove(&uid);
    }
    // (c) a remote pod added and removed: both count.
    for round in 0..ROUNDS / 2 {
        let pod = one(&cluster.remote_extra_pod(round))?;
        let remote = series.entry("remote_pod").or_default();
        timed(topology, LOCAL_PODS, remote, create(&client, &pod, None)).await?;
        timed(topology, LOCAL_PODS, remote, delete(&client, &pod)).await?;
    }
    // (d) a namespace's labels changed, and back.
    for (_, a, b) in &cluster.relabels {
        for text in [b, a] {
            timed(topology, LOCAL_PODS, series.entry("namespace_label").or_default(), replace(&client, &one(text)?))
                .await?;
        }
    }
    // (e) churn: 100 pods a second cluster-wide, created and deleted, for a minute.
    let agent_cpu_before = cpu_seconds(pid);
    series.insert("churn", churn(topology, &client, cluster).await?);
    let agent_cores = (cpu_seconds(pid) - agent_cpu_before) / CHURN_SECONDS as f64;
    let (agent_rss, agent_peak) = memory_mb(pid);
    super::print_series(&series);
    println!("  agent RSS {agent_rss:.0} MB (peak {agent_peak:.0}), {agent_cores:.2} cores under churn");
    drop(agent);
    let _ = bulkhead::dataplane::Datapath::unpin_all(PIN_DIR);
    let mut result = super::summary(&series);
    result["ready_s"] = json!(ready_after_sync);
    result["up_s"] = json!(up_s);
    result["agent_rss_mb"] = json!(agent_peak);
    result["agent_cpu_cores_churn"] = json!(agent_cores);
    Ok(result)
}

/// When each churn write started, and the resourceVersion it made once the server answered.
type Writes = Arc<Mutex<Vec<(Instant, Option<u64>)>>>;

/// 100 pod writes a second through the API server, each created (and its
/// status reported) and deleted a second later; a write's latency runs until
/// the agent holds a resourceVersion at least its own.
async fn churn(topology: &Topology, client: &Client, cluster: &Cluster) -> Result<Series> {
    let interval = Duration::from_secs(1) / CHURN_PER_SECOND as u32;
    let total = CHURN_PER_SECOND * CHURN_SECONDS as usize;
    let written: Writes = Arc::default();
    let mut manifests: BTreeMap<usize, Arc<Manifest>> = BTreeMap::new();
    let mut tasks = Vec::with_capacity(total);
    let mut series = Series::default();
    let mut done = vec![false; total];
    let record = |series: &mut Series, done: &mut [bool], held: u64| {
        let written = written.lock().expect("written lock");
        for (i, (at, revision)) in written.iter().enumerate() {
            if !done[i] && revision.is_some_and(|r| r <= held) {
                done[i] = true;
                series.ms.push(at.elapsed().as_secs_f64() * 1e3);
            }
        }
    };
    let started = Instant::now();
    let mut next = started;
    for i in 0..total {
        // The same steps as through the folder.
        let deleting = churn_deletes(i);
        let manifest = match deleting {
            None => {
                let manifest = Arc::new(one(&cluster.churn_pod(i))?);
                manifests.insert(i, manifest.clone());
                manifest
            }
            Some(made) => manifests.remove(&made).context("the pod made a second ago")?,
        };
        written.lock().expect("written lock").push((Instant::now(), None));
        let (client, written) = (client.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            // Churn pods are remote: no cgroups.
            let revision = if deleting.is_none() {
                create(&client, &manifest, None).await?
            } else {
                delete(&client, &manifest).await?
            };
            written.lock().expect("written lock")[i].1 = Some(revision);
            anyhow::Ok(())
        }));
        next += interval;
        loop {
            record(&mut series, &mut done, tokio::task::block_in_place(|| held(topology)).0);
            if Instant::now() >= next {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    for task in tasks {
        task.await??;
    }
    let last = written.lock().expect("written lock").iter().filter_map(|(_, r)| *r).max().unwrap_or(0);
    until(topology, last, LOCAL_PODS)?;
    record(&mut series, &mut done, last);
    println!("  churn: {total} pod changes through the API server in {:.1} s", started.elapsed().as_secs_f64());
    Ok(series)
}
