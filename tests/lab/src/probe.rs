//! `bulkhead probe` (run by `cargo xtask probe`): scenario.md with real
//! traffic. Each pod becomes a network namespace with its addresses, a veth
//! to a node namespace and a cgroup, listening on its ports; outside hosts
//! are namespaces too. The agent runs in the node namespace in dir mode,
//! following a folder this runner writes: each step's changes reach it as
//! file edits, the path a watch event takes. Probes are real connections.
//! The runner also asks `bulkhead check` for each verdict and reports any
//! probe where the two disagree.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bulkhead::{
    cli::scenario::{self, Failure, Probe, Scenario, Verdict, World},
    dataplane::Datapath,
    source::dir,
};
use bulkhead_crds::Protocol;
use bulkhead_policy::{Object, PodRef, PolicyObject, Snapshot};
use serde::Serialize;

use crate::testbed::{self, Topology};

const TAG: &str = "prb";
const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-probe";
/// Probes run at once.
const PARALLEL: usize = 8;

#[derive(Serialize)]
struct ProbeReport {
    scenario: String,
    probes: usize,
    passed: usize,
    failed: Vec<ProbeFailure>,
    /// Probes where real traffic and `bulkhead check` gave different verdicts.
    disagreements_with_check: usize,
}

#[derive(Serialize)]
struct ProbeFailure {
    #[serde(flatten)]
    failure: Failure,
    /// What `bulkhead check` answers for the same probe.
    check: Verdict,
    /// The datapath's deny/audit events for this connection, as the agent logged them.
    events: Vec<serde_json::Value>,
}

/// Run every scenario; true when all passed.
pub fn run(dirs: &[PathBuf]) -> Result<bool> {
    testbed::catch_interrupts();
    let mut all_passed = true;
    for dir in dirs {
        testbed::interrupted()?;
        let report = run_scenario(dir).with_context(|| format!("probing {}", dir.display()))?;
        all_passed &= report.failed.is_empty() && report.disagreements_with_check == 0;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(all_passed)
}

/// What is set up for one scenario, removed on drop whatever happened.
struct Bed {
    topology: Topology,
    work: PathBuf,
    agent: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = Datapath::unpin_all(PIN_DIR);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn run_scenario(dir: &Path) -> Result<ProbeReport> {
    let scenario = Scenario::load(dir)?;
    let check = scenario::check(&scenario)?;
    let mut world = scenario.start();
    let mut snapshot = world.snapshot();
    let _ = Datapath::unpin_all(PIN_DIR);
    let work = std::env::temp_dir().join("bulkhead-probe-objects");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut bed = Bed { topology: Topology::new(TAG, 244), work, agent: None };

    // Pods: their addresses, and every port anything serves or probes.
    let mut served: BTreeMap<PodRef, BTreeSet<(u16, Protocol)>> = BTreeMap::new();
    for pod in snapshot.pods.values() {
        served.entry(pod.pod_ref()).or_default().extend(pod.ports.iter().map(|p| (p.port, p.protocol)));
    }
    let mut outside: BTreeMap<IpAddr, BTreeSet<(u16, Protocol)>> = BTreeMap::new();
    for probe in scenario.steps.iter().flat_map(|s| &s.probes) {
        match probe.to.parse::<IpAddr>() {
            Ok(address) if !snapshot.pods.values().any(|p| p.ips.contains(&address)) => {
                outside.entry(address).or_default().insert((probe.port, probe.protocol));
            }
            Ok(address) => {
                let pod = snapshot.pods.values().find(|p| p.ips.contains(&address)).expect("a pod has it");
                served.entry(pod.pod_ref()).or_default().insert((probe.port, probe.protocol));
            }
            Err(_) => {
                let (ns, name) = probe.to.split_once('/').with_context(|| format!("probe to {:?}", probe.to))?;
                served.entry(PodRef::new(ns, name)).or_default().insert((probe.port, probe.protocol));
            }
        }
    }
    let mut names = BTreeMap::new();
    let mut uids = BTreeMap::new();
    for (index, pod) in snapshot.pods.values().enumerate() {
        let name = format!("{}-{}", pod.namespace, pod.name);
        let (v4, v6) = addresses_or_unused(&pod.ips, index);
        let test_pod = bed.topology.add_pod_at(&name, v4, v6);
        uids.insert(pod.pod_ref(), test_pod.uid.clone());
        let ports: Vec<String> = served
            .get(&pod.pod_ref())
            .into_iter()
            .flatten()
            .map(|(port, protocol)| format!("{port}/{protocol:?}"))
            .collect();
        bed.topology.serve(&name, &ports.iter().map(String::as_str).collect::<Vec<_>>());
        names.insert(pod.pod_ref(), name);
    }
    for (index, (address, ports)) in outside.iter().enumerate() {
        let name = format!("outside{index}");
        let (v4, v6) = addresses_or_unused(&[*address], 200 + index);
        bed.topology.add_pod_at(&name, v4, v6);
        let ports: Vec<String> = ports.iter().map(|(port, protocol)| format!("{port}/{protocol:?}")).collect();
        bed.topology.serve(&name, &ports.iter().map(String::as_str).collect::<Vec<_>>());
    }

    // The agent follows the folder from the scenario's starting state.
    write_objects(&bed.work, &world, &uids)?;
    let agent = bed
        .topology
        .spawn_agent("probe-node", PIN_DIR, &bed.work, &[], ("bulkhead-probe-agent.log", "bulkhead=info"))
        .context("starting the agent")?;
    bed.agent = Some(agent);

    let mut report = ProbeReport {
        scenario: scenario.name.clone(),
        probes: 0,
        passed: 0,
        failed: vec![],
        disagreements_with_check: 0,
    };
    for (step_index, step) in scenario.steps.iter().enumerate() {
        testbed::interrupted()?;
        for change in scenario.step_changes(&mut world, step)? {
            snapshot.apply(change);
        }
        for pod in snapshot.pods.keys() {
            if !names.contains_key(pod) {
                bail!("step {step_index} adds pod {pod}: the runner only has the pods of cluster.yaml");
            }
        }
        write_objects(&bed.work, &world, &uids)?;
        wait_until_enforced(&bed, &dir::revision(&bed.work)?, snapshot.pods.len())?;

        let results = probe_all(&bed.topology, &snapshot, &names, &step.probes)?;
        for (probe, observed) in step.probes.iter().zip(results) {
            report.probes += 1;
            let check_failed = check.failed.iter().any(|f| f.step == step_index && same_probe(&f.probe, probe));
            let check_verdict = if check_failed { flip(probe.expect) } else { probe.expect };
            if observed != check_verdict {
                report.disagreements_with_check += 1;
            }
            if observed == probe.expect {
                report.passed += 1;
                continue;
            }
            let events = events_for(&bed, &snapshot, probe)?;
            let first = events.first();
            let field = |name: &str| {
                first
                    .and_then(|e| e.get(name))
                    .filter(|v| !v.is_null())
                    .map(|v| v.to_string().trim_matches('"').to_string())
            };
            report.failed.push(ProbeFailure {
                failure: Failure {
                    step: step_index,
                    probe: probe.clone(),
                    observed,
                    policy: field("policy"),
                    rule: field("rule"),
                },
                check: check_verdict,
                events,
            });
        }
    }
    Ok(report)
}

/// A pod's IPv4 and IPv6 addresses; a family it has none of gets an address
/// nothing refers to, so the namespace is complete.
fn addresses_or_unused(ips: &[IpAddr], index: usize) -> (IpAddr, IpAddr) {
    let v4 = ips
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .unwrap_or_else(|| format!("10.243.{}.{}", index / 250, 1 + index % 250).parse().unwrap());
    let v6 = ips
        .iter()
        .find(|a| a.is_ipv6())
        .copied()
        .unwrap_or_else(|| format!("fd00:243::{:x}", index + 1).parse().unwrap());
    (v4, v6)
}

fn flip(verdict: Verdict) -> Verdict {
    match verdict {
        Verdict::Allow => Verdict::Deny,
        Verdict::Deny => Verdict::Allow,
    }
}

fn same_probe(a: &Probe, b: &Probe) -> bool {
    a.from == b.from
        && a.to == b.to
        && a.port == b.port
        && a.protocol == b.protocol
        && a.family == b.family
        && a.expect == b.expect
}

/// Write the world's objects as manifests: cluster.yaml, and a file per
/// policy so a step touches only the files of what it changes. Each file is
/// written to a hidden name and renamed into place, so the agent never reads
/// half a file. Invalid policy versions are written too: the agent must
/// reject them itself.
fn write_objects(work: &Path, world: &World, uids: &BTreeMap<PodRef, String>) -> Result<()> {
    let namespaces = world.objects.values().filter_map(|o| match o {
        Object::Namespace(ns) => Some(ns),
        _ => None,
    });
    let pods = world.objects.values().filter_map(|o| match o {
        Object::Pod(pod) => Some(pod),
        _ => None,
    });
    let policy_objects = world.objects.values().filter_map(|o| match o {
        Object::Policy(policy) => Some(policy),
        _ => None,
    });
    let mut cluster = String::new();
    for ns in namespaces {
        let document = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": ns.labels}});
        cluster.push_str(&format!("---\n{document}\n"));
    }
    for pod in pods {
        let ports: Vec<serde_json::Value> = pod
            .ports
            .iter()
            .map(|p| serde_json::json!({"containerPort": p.port, "protocol": format!("{:?}", p.protocol), "name": p.name}))
            .collect();
        let ips: Vec<serde_json::Value> = pod.ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect();
        let document = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": *pod.labels, "uid": uids.get(&pod.pod_ref())},
            "spec": {"containers": [{"name": "main", "ports": ports}]},
            "status": {"podIPs": ips},
        });
        cluster.push_str(&format!("---\n{document}\n"));
    }
    write_if_changed(&work.join("cluster.yaml"), &cluster)?;

    let policies = work.join("policies");
    std::fs::create_dir_all(&policies)?;
    let mut wanted = BTreeSet::new();
    for object in policy_objects {
        let key = object.policy_ref();
        let file = format!(
            "{}-{}-{}.yaml",
            key.kind,
            if key.namespace.is_empty() { "cluster" } else { &key.namespace },
            key.name
        );
        let text = match &**object {
            PolicyObject::Connection(p) => serde_saphyr::to_string(p)?,
            PolicyObject::Cluster(p) => serde_saphyr::to_string(p)?,
            PolicyObject::Network(p) => serde_saphyr::to_string(p)?,
            PolicyObject::ClusterNetwork(p) => serde_saphyr::to_string(p)?,
        };
        write_if_changed(&policies.join(&file), &text)?;
        wanted.insert(std::ffi::OsString::from(file));
    }
    for entry in std::fs::read_dir(&policies)? {
        let entry = entry?;
        if !wanted.contains(&entry.file_name()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    Ok(testbed::write_atomically(path, text)?)
}

/// Wait until the agent has the folder's present content in the datapath
/// and every pod attached.
fn wait_until_enforced(bed: &Bed, revision: &str, pods: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        testbed::interrupted()?;
        last = bed.topology.agent_state();
        if testbed::agent_holds(&last, revision, pods) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(std::env::temp_dir().join("bulkhead-probe-agent.log")).unwrap_or_default();
    bail!("the agent did not enforce revision {revision} with {pods} pods in 20 s; its state: {last}\nits log:\n{log}")
}

fn probe_all(
    topology: &Topology,
    snapshot: &Snapshot,
    names: &BTreeMap<PodRef, String>,
    probes: &[Probe],
) -> Result<Vec<Verdict>> {
    let mut jobs = Vec::new();
    for probe in probes {
        let ((src, _), (_, dst_ip)) = scenario::probe_addresses(snapshot, probe)?;
        jobs.push((names[&src].clone(), format!("{:?}", probe.protocol), dst_ip, probe.port));
    }
    let mut verdicts = Vec::new();
    for chunk in jobs.chunks(PARALLEL) {
        testbed::interrupted()?;
        let answers: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(from, protocol, to, port)| scope.spawn(move || topology.probe(from, protocol, *to, *port)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| "error".into())).collect()
        });
        for answer in answers {
            verdicts.push(match answer.as_str() {
                "allow" => Verdict::Allow,
                "deny" | "eperm" => Verdict::Deny,
                other => bail!("probe answered {other:?}"),
            });
        }
    }
    Ok(verdicts)
}

/// The agent's recent events about a probe's connection.
fn events_for(bed: &Bed, snapshot: &Snapshot, probe: &Probe) -> Result<Vec<serde_json::Value>> {
    let ((_, _), (_, dst_ip)) = scenario::probe_addresses(snapshot, probe)?;
    let events: Vec<serde_json::Value> = serde_json::from_str(&bed.topology.agent_get("/debug/events")?)?;
    let wanted = format!("{dst_ip}:{}", probe.port);
    // Allows (new egress flows) say nothing of why a probe failed.
    Ok(events
        .into_iter()
        .filter(|e| e["verdict"] != "allow" && e["destination"].as_str().is_some_and(|d| d.contains(&wanted)))
        .collect())
}
