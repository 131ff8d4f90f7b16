//! `cargo xtask bench scale`: one agent and the status controller's engine
//! at the cluster sizes operators run. Clusters are generated
//! deterministically as a folder of manifests (a file per namespace, per
//! node's pods, per policy); the agent follows it (dir source) in a node
//! namespace whose 100 local pods are real network namespaces with veths;
//! the other nodes' pods are objects only (what identifies them as peers is
//! all an agent holds of them). Each change is a file written, and its
//! latency runs until the agent's `/debug/revision` says the datapath holds
//! the folder as it now is.
//!
//! The controller's engine runs as its own process (`bulkhead-lab
//! status-engine`) on the same folder, so its CPU and memory are measured
//! apart; its node reports are simulated (every node enforcing its pods) and
//! no status is written to an API server: what is measured is the engine
//! keeping every policy's status up to date.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bulkhead::{dataplane::Datapath, source::dir::DirSource};
use serde_json::json;

use crate::{
    bench::Rng,
    testbed::{self, Process, TestPod, Topology, AGENT_ADDRESS},
};

mod api_server;

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-bench-scale";
const NODE: &str = "node-0000";
const LOCAL_PODS: usize = 100;
const POLICIES: usize = 2_000;
const ROUNDS: usize = 20;
const CHURN_PER_SECOND: usize = 100;
const CHURN_SECONDS: u64 = 60;

const APPS: [(&str, &str); 6] =
    [("web", "front"), ("api", "back"), ("worker", "back"), ("cache", "data"), ("db", "data"), ("batch", "back")];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const TEAMS: usize = 30;

/// A generated cluster: what the bench changes, and where.
pub struct Cluster {
    pub pods: usize,
    pub nodes: usize,
    pub namespaces: usize,
    folder: PathBuf,
    /// Policies and their two versions (a port toggled), local ones first.
    edits: Vec<(PathBuf, String, String)>,
    /// Namespaces holding local pods, then others: (file, labels a, labels b).
    relabels: Vec<(PathBuf, String, String)>,
}

fn namespace_yaml(index: usize, env: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{index:04}\n  labels: {{team: t{}, env: {env}, region: r{}}}\n",
        index % TEAMS,
        index % 4
    )
}

#[allow(clippy::too_many_arguments)]
fn pod_yaml(name: &str, namespace: usize, app: usize, replica_set: u64, node: &str, uid: &str, ip: IpAddr) -> String {
    let (app, tier) = APPS[app];
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ns-{namespace:04}\n  uid: \"{uid}\"\n  labels: {{app.kubernetes.io/name: {app}, app.kubernetes.io/part-of: shop-{}, tier: {tier}, pod-template-hash: h{replica_set:x}, version: v{}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: main, image: app, ports: [{{name: http, containerPort: 8080}}, {{name: metrics, containerPort: 9090}}]}}]\nstatus: {{phase: Running, podIPs: [{{ip: \"{ip}\"}}]}}\n",
        namespace % 7,
        1 + replica_set % 2
    )
}

fn policy_yaml(index: usize, rng: &mut Rng, namespaces: usize, port: u16) -> String {
    let ns = format!("ns-{:04}", rng.below(namespaces));
    let (app, _) = APPS[rng.below(APPS.len())];
    let (peer, _) = APPS[rng.below(APPS.len())];
    let team = rng.below(TEAMS);
    match index % 10 {
        0..=5 => format!(
            "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {{name: cp-{index:04}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app.kubernetes.io/name: {app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app.kubernetes.io/name: {peer}}}}}}}, {{namespaceSelector: {{matchLabels: {{team: t{team}}}}}}}]\n      ports: [{{protocol: TCP, port: {port}}}, {{protocol: TCP, port: metrics}}]\n  egress:\n    - to: [{{podSelector: {{matchLabels: {{tier: data}}}}}}]\n      ports: [{{protocol: TCP, port: 5432}}, {{protocol: TCP, port: 6379}}]\n    - to: [{{ipBlock: {{cidr: 203.0.{}.0/24}}}}]\n      ports: [{{protocol: TCP, port: 443}}]\n",
            rng.below(64)
        ),
        6 | 7 => format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-{index:04}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app.kubernetes.io/name: {app}}}}}\n  ingress:\n    - from: [{{namespaceSelector: {{matchLabels: {{env: {}}}}}, podSelector: {{matchLabels: {{tier: front}}}}}}]\n      ports: [{{protocol: TCP, port: {port}}}]\n",
            ENVS[rng.below(ENVS.len())]
        ),
        8 => format!(
            "apiVersion: bulkhead.io/v1alpha1\nkind: ClusterConnectionPolicy\nmetadata: {{name: admin-{index:04}}}\nspec:\n  tier: Admin\n  priority: {}\n  subject: {{namespaceSelector: {{matchLabels: {{team: t{team}}}}}}}\n  ingress:\n    - {{action: Deny, from: [{{namespaceSelector: {{matchLabels: {{env: dev}}}}}}], ports: [{{protocol: TCP, port: 22}}]}}\n    - {{action: Pass, from: [{{namespaceSelector: {{matchLabels: {{team: t{team}}}}}}}], ports: [{{protocol: TCP, port: {port}}}]}}\n",
            index % 1000
        ),
        _ => format!(
            "apiVersion: bulkhead.io/v1alpha1\nkind: ClusterConnectionPolicy\nmetadata: {{name: baseline-{index:04}}}\nspec:\n  tier: Baseline\n  priority: {}\n  subject: {{namespaceSelector: {{matchLabels: {{team: t{team}}}}}, podSelector: {{matchLabels: {{app.kubernetes.io/name: {app}}}}}}}\n  egress:\n    - {{action: Allow, to: [{{namespaceSelector: {{matchLabels: {{team: t{team}}}}}}}], ports: [{{protocol: TCP, port: {port}}}]}}\n    - {{action: Deny, to: [{{ipBlock: {{cidr: 198.51.{}.0/24}}}}]}}\n",
            index % 1000,
            rng.below(32)
        ),
    }
}

/// The address of pod `k` of node `node` (not the agent's node).
fn remote_ip(node: usize, k: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(10, (100 + node / 250) as u8, (node % 250) as u8, (10 + k) as u8))
}

/// Generate a cluster of `pods` pods into `folder`; the agent's node's pods
/// are `local` (real namespaces).
pub fn generate(folder: &Path, pods: usize, local: &[TestPod]) -> Result<Cluster> {
    let _ = std::fs::remove_dir_all(folder);
    for sub in ["namespaces", "pods", "policies"] {
        std::fs::create_dir_all(folder.join(sub))?;
    }
    let mut rng = Rng(0x5ca1_ab1e);
    let nodes = pods / LOCAL_PODS;
    let namespaces = (pods / 150).max(20);
    for index in 0..namespaces {
        std::fs::write(folder.join(format!("namespaces/ns-{index:04}.yaml")), namespace_yaml(index, ENVS[index % 3]))?;
    }
    let mut local_namespaces = BTreeSet::new();
    for node in 0..nodes {
        let mut text = String::new();
        for k in 0..LOCAL_PODS {
            let namespace = rng.below(namespaces);
            let app = rng.below(APPS.len());
            let replica_set = (namespace * APPS.len() + app) as u64 * 3 + rng.below(3) as u64;
            let name = format!("{}-{node}-{k}", APPS[app].0);
            let (node_name, uid, ip) = match local.get(k).filter(|_| node == 0) {
                Some(pod) => {
                    local_namespaces.insert(namespace);
                    (NODE.to_string(), pod.uid.clone(), pod.ipv4)
                }
                None => (format!("node-{node:04}"), format!("uid-{node}-{k}"), remote_ip(node, k)),
            };
            text.push_str(&pod_yaml(&name, namespace, app, replica_set, &node_name, &uid, ip));
        }
        std::fs::write(folder.join(format!("pods/node-{node:04}.yaml")), text)?;
    }
    let mut local_edits = Vec::new();
    let mut other_edits = Vec::new();
    for index in 0..POLICIES {
        let seed = rng.next();
        let text = |port| policy_yaml(index, &mut Rng(seed), namespaces, port);
        let (a, b) = (text(8080), text(8081));
        let path = folder.join(format!("policies/p-{index:04}.yaml"));
        std::fs::write(&path, &a)?;
        let local = local_namespaces.iter().any(|ns| a.contains(&format!("namespace: ns-{ns:04}}}")));
        if local { &mut local_edits } else { &mut other_edits }.push((path, a, b));
    }
    let edits = local_edits.into_iter().take(ROUNDS / 2).chain(other_edits.into_iter().take(ROUNDS / 2)).collect();
    let relabels = local_namespaces
        .iter()
        .copied()
        .take(ROUNDS / 2)
        .chain((0..namespaces).filter(|n| !local_namespaces.contains(n)).take(ROUNDS / 2))
        .map(|n| {
            let path = folder.join(format!("namespaces/ns-{n:04}.yaml"));
            (path, namespace_yaml(n, ENVS[n % 3]), namespace_yaml(n, ENVS[(n + 1) % 3]))
        })
        .collect();
    Ok(Cluster { pods, nodes, namespaces, folder: folder.to_path_buf(), edits, relabels })
}

impl Cluster {
    /// Round `round`'s extra pod on the agent's node: a spare real namespace.
    fn local_extra_pod(&self, round: usize, spare: &TestPod) -> String {
        pod_yaml(&spare.name, round % self.namespaces, round % APPS.len(), 7, NODE, &spare.uid, spare.ipv4)
    }

    /// Round `round`'s extra pod on another node.
    fn remote_extra_pod(&self, round: usize) -> String {
        let node = 1 + round % (self.nodes - 1);
        let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 10 + round as u8));
        pod_yaml(
            &format!("extra-{round}"),
            round % self.namespaces,
            round % APPS.len(),
            round as u64,
            &format!("node-{node:04}"),
            "uid-extra",
            ip,
        )
    }

    /// Churn pod `i`, on another node.
    fn churn_pod(&self, i: usize) -> String {
        let node = 1 + i % (self.nodes - 1);
        let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 98, (i / 250 % 250) as u8, (i % 250) as u8));
        pod_yaml(
            &format!("churn-{i}"),
            i % self.namespaces,
            i % APPS.len(),
            (i % 50) as u64,
            &format!("node-{node:04}"),
            "uid-churn",
            ip,
        )
    }
}

/// What churn step `i` does: a second of creates, then creates (even steps)
/// and deletes of the pods made a second ago (odd steps; the step before
/// that one was a create). `None` creates pod `i`; `Some(j)` deletes pod `j`.
fn churn_deletes(i: usize) -> Option<usize> {
    (i % 2 == 1 && i >= CHURN_PER_SECOND).then(|| i - CHURN_PER_SECOND - 1)
}

/// The local pods' veths are `bhscl<n>`; the agent follows them as a CNI makes them.
const POD_INTERFACE_PREFIX: &str = "--pod-interface-prefix=bhscl";

/// Wire a spare pod again before it is reported, as the CNI wires a new
/// pod before kubelet reports its address: its veth is new, and the agent
/// gives it its programs as it appears. Kubelet's report follows CNI ADD
/// by hundreds of milliseconds; the bench waits until the programs are on.
fn wire_spare(topology: &Topology, spare: &TestPod) -> Result<()> {
    topology.rewire_pod(spare);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Datapath::interface_link_pins(PIN_DIR, &spare.host_interface).len() < 2 {
        if Instant::now() > deadline {
            bail!("the agent did not attach to {} as it appeared", spare.host_interface);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The agent's log filter: `BULKHEAD_BENCH_AGENT_LOG`, else warnings.
fn agent_log_filter() -> String {
    std::env::var("BULKHEAD_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn,netlink_packet_route=error".into())
}

/// The agent as the bench polls it.
struct Agent<'a> {
    topology: &'a Topology,
    process: Process,
}

impl Agent<'_> {
    fn revision(&self) -> serde_json::Value {
        self.get("/debug/revision")
    }

    fn get(&self, path: &str) -> serde_json::Value {
        match self.topology.node_http_get(AGENT_ADDRESS, path) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Wait until the agent holds `revision` with `endpoints` local pods; the
    /// wait. Each request is a long poll that the agent answers at its next
    /// sync, so the bench adds no load of its own while it waits.
    fn until(&self, revision: &str, endpoints: usize) -> Result<Duration> {
        let started = Instant::now();
        let mut state = self.revision();
        loop {
            if state["revision"] == revision && state["endpoints"] == endpoints {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not reach revision {revision} with {endpoints} pods in 60 s: {state}");
            }
            match state["syncs"].as_u64() {
                Some(seen) => state = self.get(&format!("/debug/revision?after_sync={seen}")),
                None => {
                    std::thread::sleep(Duration::from_millis(10));
                    state = self.revision();
                }
            }
        }
    }

    fn map_writes(&self) -> u64 {
        self.revision()["map_writes"].as_u64().unwrap_or(0)
    }
}

/// Resident and peak memory of a process, MB.
fn memory_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command: state is field 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// Latencies (ms) and map writes per change of one kind.
#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    writes: Vec<u64>,
}

impl Series {
    fn summary(&self) -> serde_json::Value {
        json!({"p50": percentile(self.ms.clone(), 0.5), "p99": percentile(self.ms.clone(), 0.99), "n": self.ms.len(),
               "map_writes_median": percentile(self.writes.iter().map(|w| *w as f64).collect(), 0.5)})
    }
}

struct Bench<'a> {
    agent: Agent<'a>,
    source: DirSource,
    endpoints: usize,
}

impl Bench<'_> {
    /// Write (or remove) a file and wait until the agent holds it; latency and writes.
    fn change(&mut self, path: &Path, text: Option<&str>, series: &mut Series) -> Result<()> {
        let before = self.agent.map_writes();
        let started = Instant::now();
        match text {
            Some(text) => testbed::write_atomically(path, text)?,
            None => std::fs::remove_file(path)?,
        }
        let revision = self.source.scan_paths(&[path.to_path_buf()].into())?.revision;
        self.agent.until(&revision, self.endpoints)?;
        series.ms.push(started.elapsed().as_secs_f64() * 1e3);
        series.writes.push(self.agent.map_writes() - before);
        Ok(())
    }
}

/// One size: everything measured.
fn measure(topology: &Topology, spares: &[TestPod], cluster: &Cluster) -> Result<serde_json::Value> {
    let _ = Datapath::unpin_all(PIN_DIR);
    let log = std::env::temp_dir().join(format!("bulkhead-bench-scale-{}.log", cluster.pods));
    let started = Instant::now();
    let process = Process(
        topology
            .node_command(testbed::product_binary())
            .args(topology.agent_args(NODE, PIN_DIR, &cluster.folder))
            .args(["--egress-learning-seconds", "0", POD_INTERFACE_PREFIX])
            .env("RUST_LOG", agent_log_filter())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let agent = Agent { topology, process };
    let mut source = DirSource::new(&cluster.folder);
    let revision = source.scan()?.revision;
    agent.until(&revision, LOCAL_PODS).with_context(|| format!("the agent's log: {}", log.display()))?;
    let up_s = started.elapsed().as_secs_f64();
    let metrics = topology.agent_get("/metrics")?;
    let gauge = |name: &str| testbed::metric(&metrics, &format!("{name} ")).unwrap_or(f64::NAN);
    let ready_after_sync = gauge("bulkhead_agent_ready_seconds") - gauge("bulkhead_agent_source_synced_seconds");
    let (rss_ready, _) = memory_mb(agent.pid());
    println!(
        "{} pods / {} nodes / {} namespaces / {POLICIES} policies: agent up in {up_s:.1} s (source synced at {:.1} s, ready {ready_after_sync:.2} s later), RSS {rss_ready:.0} MB",
        cluster.pods, cluster.nodes, cluster.namespaces, gauge("bulkhead_agent_source_synced_seconds")
    );

    // The controller's engine on the same folder, in a process of its own.
    // The changes are measured once it has the cluster, as in a cluster
    // whose controller is up: not while it loads, competing for the cores.
    let mut engine = Process(
        Command::new(std::env::current_exe()?)
            .args(["status-engine", &cluster.folder.display().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let engine_started = Instant::now();
    let mut said = String::new();
    let engine_output = engine.0.stdout.take().context("the engine's stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(engine_output), &mut said)?;
    if said.trim() != ENGINE_SYNCED {
        bail!("the controller's engine stopped before it had the cluster (it said {said:?})");
    }
    println!("  controller engine synced in {:.1} s", engine_started.elapsed().as_secs_f64());

    let mut bench = Bench { agent, source, endpoints: LOCAL_PODS };
    let mut series: BTreeMap<&str, Series> = BTreeMap::new();
    // (a) policy edits, to a version and back.
    for (path, a, b) in &cluster.edits {
        let edit = series.entry("policy_edit").or_default();
        bench.change(path, Some(b), edit)?;
        bench.change(path, Some(a), edit)?;
    }
    // (b) a local pod added (a real namespace, not in the cluster yet), then removed.
    for round in 0..ROUNDS {
        let spare = &spares[round % spares.len()];
        let path = cluster.folder.join("pods/local-extra.yaml");
        let text = cluster.local_extra_pod(round, spare);
        wire_spare(topology, spare)?;
        bench.endpoints = LOCAL_PODS + 1;
        bench.change(&path, Some(&text), series.entry("local_pod").or_default())?;
        bench.endpoints = LOCAL_PODS;
        bench.change(&path, None, &mut Series::default())?;
    }
    // (c) a remote pod added and removed: both count.
    for round in 0..ROUNDS / 2 {
        let path = cluster.folder.join("pods/remote-extra.yaml");
        let text = cluster.remote_extra_pod(round);
        let remote = series.entry("remote_pod").or_default();
        bench.change(&path, Some(&text), remote)?;
        bench.change(&path, None, remote)?;
    }
    // (d) a namespace's labels changed, and back.
    for (path, a, b) in &cluster.relabels {
        let relabel = series.entry("namespace_label").or_default();
        bench.change(path, Some(b), relabel)?;
        bench.change(path, Some(a), relabel)?;
    }
    // (e) churn: 100 pods a second cluster-wide, created and deleted, for a minute.
    let engine_cpu_before = cpu_seconds(engine.0.id());
    let agent_cpu_before = cpu_seconds(bench.agent.pid());
    let churn = churn(&mut bench, cluster)?;
    let engine_cores = (cpu_seconds(engine.0.id()) - engine_cpu_before) / CHURN_SECONDS as f64;
    let agent_cores = (cpu_seconds(bench.agent.pid()) - agent_cpu_before) / CHURN_SECONDS as f64;
    let (agent_rss, agent_peak) = memory_mb(bench.agent.pid());
    let (engine_rss, engine_peak) = memory_mb(engine.0.id());
    series.insert("churn", churn);
    print_series(&series);
    println!("  agent RSS {agent_rss:.0} MB (peak {agent_peak:.0}), {agent_cores:.2} cores under churn; controller engine RSS {engine_rss:.0} MB (peak {engine_peak:.0}), {engine_cores:.2} cores under churn");
    let mut result = summary(&series);
    result["ready_s"] = json!(ready_after_sync);
    result["up_s"] = json!(up_s);
    result["agent_rss_mb"] = json!(agent_peak);
    result["controller_rss_mb"] = json!(engine_peak);
    result["controller_cpu_cores"] = json!(engine_cores);
    result["agent_cpu_cores_churn"] = json!(agent_cores);
    Ok(result)
}

fn print_series(series: &BTreeMap<&str, Series>) {
    for (what, s) in series {
        let summary = s.summary();
        println!(
            "  {what:16} change -> enforced p50 {:7.1} ms  p99 {:7.1} ms  (n {}), map writes per change (median) {}",
            summary["p50"].as_f64().unwrap_or(0.0),
            summary["p99"].as_f64().unwrap_or(0.0),
            summary["n"],
            summary["map_writes_median"]
        );
    }
}

/// Each kind's p50, p99 and map writes per change, as the JSON line has them.
fn summary(series: &BTreeMap<&str, Series>) -> serde_json::Value {
    let p = |what: &str, q: &str| series.get(what).map(|s| s.summary()[q].clone()).unwrap_or_default();
    let kinds = ["policy_edit", "local_pod", "remote_pod", "namespace_label", "churn"];
    json!({
        "p50_ms": kinds.iter().map(|k| (k.to_string(), p(k, "p50"))).collect::<serde_json::Map<_, _>>(),
        "p99_ms": kinds.iter().map(|k| (k.to_string(), p(k, "p99"))).collect::<serde_json::Map<_, _>>(),
        "map_writes_per_change": kinds.iter().map(|k| (k.to_string(), p(k, "map_writes_median"))).collect::<serde_json::Map<_, _>>(),
    })
}

/// 100 pod files a second, each created and deleted a second later,
/// cluster-wide, for a minute; each write's latency is until the agent's
/// revision reaches one written after it.
fn churn(bench: &mut Bench, cluster: &Cluster) -> Result<Series> {
    let folder = cluster.folder.join("pods/churn");
    std::fs::create_dir_all(&folder)?;
    bench.source.scan()?;
    let interval = Duration::from_secs(1) / CHURN_PER_SECOND as u32;
    let total = CHURN_PER_SECOND * CHURN_SECONDS as usize;
    let mut written: Vec<(Instant, String)> = Vec::with_capacity(total);
    let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut series = Series::default();
    let mut done = 0usize;
    let started = Instant::now();
    let mut next = started;
    for i in 0..total {
        let at = Instant::now();
        let (path, text) = match churn_deletes(i) {
            None => (folder.join(format!("c{i}.yaml")), Some(cluster.churn_pod(i))),
            Some(made) => (folder.join(format!("c{made}.yaml")), None),
        };
        match &text {
            Some(text) => testbed::write_atomically(&path, text)?,
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let revision = bench.source.scan_paths(&[path].into())?.revision;
        index_of.insert(revision.clone(), i);
        written.push((at, revision));
        // Poll the agent while waiting for the next slot.
        next += interval;
        loop {
            if let Some(seen) = bench.agent.revision()["revision"].as_str().and_then(|r| index_of.get(r)) {
                while done <= *seen {
                    series.ms.push(written[done].0.elapsed().as_secs_f64() * 1e3 - 0.0);
                    done += 1;
                }
            }
            if Instant::now() >= next {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let last = written.last().map(|(_, r)| r.clone()).unwrap_or_default();
    bench.agent.until(&last, bench.endpoints)?;
    while done < written.len() {
        series.ms.push(written[done].0.elapsed().as_secs_f64() * 1e3);
        done += 1;
    }
    std::fs::remove_dir_all(&folder)?;
    println!("  churn: {total} pod changes in {:.1} s", started.elapsed().as_secs_f64());
    Ok(series)
}

/// The cluster size measured through the real API server.
pub const API_SERVER_PODS: usize = 10_000;

/// `cargo xtask bench scale[:sizes]`: each size through a folder, then
/// (`through_api_server`) `API_SERVER_PODS` through a real API server.
pub fn run(sizes: &[usize], through_api_server: bool) -> Result<()> {
    testbed::catch_interrupts();
    let mut topology = Topology::new("scl", 190);
    let mut local = Vec::new();
    for k in 0..LOCAL_PODS {
        local.push(topology.add_pod(&format!("l{k}")));
    }
    let spares: Vec<TestPod> = (0..4).map(|k| topology.add_pod(&format!("spare{k}"))).collect();
    let folder = std::env::temp_dir().join("bulkhead-bench-scale");
    let mut results = serde_json::Map::new();
    for &pods in sizes {
        testbed::interrupted()?;
        let generated = Instant::now();
        let cluster = generate(&folder, pods, &local)?;
        println!("generated {pods} pods in {:.1} s into {}", generated.elapsed().as_secs_f64(), folder.display());
        let result = measure(&topology, &spares, &cluster);
        let _ = Datapath::unpin_all(PIN_DIR);
        results.insert(pods.to_string(), result?);
    }
    let mut through_api = serde_json::Map::new();
    if through_api_server {
        testbed::interrupted()?;
        let cluster = generate(&folder, API_SERVER_PODS, &local)?;
        println!("generated {API_SERVER_PODS} pods for the API server");
        let result = api_server::measure(&topology, &spares, &cluster);
        let _ = Datapath::unpin_all(PIN_DIR);
        through_api.insert(API_SERVER_PODS.to_string(), result?);
    }
    let _ = std::fs::remove_dir_all(&folder);
    println!("{}", json!({ "sizes": results, "api_server": through_api }));
    Ok(())
}

/// Statuses computed so far, kept where the optimiser cannot drop the work.
fn tracing_free_note(statuses: usize) {
    std::hint::black_box(statuses);
}

/// What the engine prints once it has the whole folder.
const ENGINE_SYNCED: &str = "synced";

/// `bulkhead-lab status-engine FOLDER`: the controller's status engine on a
/// folder, with every node's report simulated as enforcing its pods at the
/// policies' generations (built once, from the folder's first view).
pub fn status_engine(folder: &Path) -> Result<()> {
    use bulkhead::{
        controller::status::{Engine, STATUS_INTERVAL},
        report::NodeReport,
    };
    use bulkhead_policy::Change;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (updates, mut received) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(bulkhead::source::dir::run(DirSource::new(folder), updates));
        let mut engine = Engine::default();
        let now = || k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let mut first = true;
        let mut statuses = 0usize;
        // Statuses at the controller's own cadence, as its loop computes them.
        let mut statuses_due = Instant::now();
        loop {
            let update = tokio::select! {
                update = received.recv() => match update {
                    Some(update) => update,
                    None => break,
                },
                () = tokio::time::sleep_until(statuses_due.into()), if engine.has_marked() => {
                    statuses += engine.take_desired(&now()).len();
                    statuses_due = Instant::now() + STATUS_INTERVAL;
                    tracing_free_note(statuses);
                    continue;
                }
            };
            let first = std::mem::take(&mut first);
            let objects: Vec<_> = if first {
                update
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::Applied(bulkhead_policy::Object::Pod(pod)) => Some(pod.clone()),
                        _ => None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            engine.apply(update.changes);
            if first {
                let mut reports: BTreeMap<String, NodeReport> = BTreeMap::new();
                for pod in objects {
                    let report = reports.entry(pod.node_name.as_deref().unwrap_or_default().to_string()).or_default();
                    report.enforced.insert(pod.pod_ref().to_string());
                }
                for (node, mut report) in reports {
                    report.programmed = engine.programmed_for(&report.enforced);
                    engine.report(&node, report, Duration::ZERO);
                }
            }
            if first || (Instant::now() >= statuses_due && received.is_empty()) {
                statuses += engine.take_desired(&now()).len();
                statuses_due = Instant::now() + STATUS_INTERVAL;
                tracing_free_note(statuses);
            }
            if first {
                println!("{ENGINE_SYNCED}");
            }
        }
        Ok(())
    })
}
