//! Scenario directories (../shared/design/scenario.md): a cluster, policies,
//! and steps of probes with expected verdicts. `check` answers each probe
//! from the compiled state exactly as the datapath would look it up, after
//! applying each step's changes as a watch would deliver them and writing
//! only the difference (`diff`) — the path an agent takes.
//!
//! One extension of the format: `expect.yaml` may name the cluster file
//! (`cluster: ../../clusters/xyz.yaml`, relative to the scenario), so
//! scenarios over the same pods share one file; without it the cluster is
//! the scenario's own `cluster.yaml`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use bulkhead_crds::Protocol;
use bulkhead_policy::{
    lookup::{self, ConnectionVerdict},
    manifest,
    state::protocol_number,
    Change, DesiredState, Namespace, Object, ObjectKey, Pod, PodRef, PolicyKind, PolicyRef, Snapshot,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The cluster file, relative to the scenario; `cluster.yaml` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub apply: Vec<String>,
    #[serde(default)]
    pub delete: Vec<ObjectRef>,
    #[serde(default)]
    pub label: Vec<LabelChange>,
    #[serde(default)]
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LabelChange {
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Family {
    IPv4,
    IPv6,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    pub expect: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
}

/// The annotation asking a runner for an IPv6 address too.
pub const IP_FAMILIES_ANNOTATION: &str = "bulkhead.io/ip-families";

/// Addresses the runners give pods without `status.podIPs`, in file order.
pub fn assigned_ipv4(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, (1 + index / 200) as u8, (10 + index % 200) as u8))
}

pub fn assigned_ipv6(index: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, (1 + index / 200) as u16, (10 + index % 200) as u16))
}

/// The objects of a cluster file as a runner deploys them: pods without
/// `status.podIPs` get the runners' addresses by their order in the text
/// (IPv4, and IPv6 too when they carry `bulkhead.io/ip-families: IPv4,IPv6`),
/// the way a CNI would have given them theirs.
pub fn deployed_objects(origin: &str, text: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut pods = 0;
    for (index, mut document) in manifest::documents(origin, text)?.into_iter().enumerate() {
        if document.get("kind").and_then(Value::as_str) == Some("Pod") {
            let has_addresses =
                document.pointer("/status/podIPs").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            if !has_addresses {
                let families =
                    document.pointer(&format!("/metadata/annotations/{}", IP_FAMILIES_ANNOTATION.replace('/', "~1")));
                let dual = families.and_then(Value::as_str).is_some_and(|v| v.split(',').any(|f| f.trim() == "IPv6"));
                let mut ips = vec![json!({"ip": assigned_ipv4(pods).to_string()})];
                if dual {
                    ips.push(json!({"ip": assigned_ipv6(pods).to_string()}));
                }
                if let Some(object) = document.as_object_mut() {
                    let status = object.entry("status").or_insert_with(|| json!({}));
                    status["podIPs"] = Value::Array(ips);
                }
            }
            pods += 1;
        }
        objects.extend(manifest::object(origin, index + 1, document)?);
    }
    Ok(objects)
}

/// The objects a source holds at one point of a scenario, by key: what a
/// step's edits are made against, and what a runner writes for an agent.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub objects: BTreeMap<ObjectKey, Object>,
}

impl World {
    /// The snapshot an agent builds from this world's objects.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for object in self.objects.values() {
            snapshot.apply(Change::Applied(object.clone()));
        }
        snapshot
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Applied(object) => {
                self.objects.insert(object.key(), object.clone());
            }
            Change::Deleted(key) => {
                self.objects.remove(key);
            }
            Change::Relisted(..) | Change::Synced => unreachable!("steps make edits, not re-lists"),
        }
    }
}

/// A loaded scenario: the starting cluster and the steps.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
    /// Namespaces and pods as deployed (addresses assigned).
    pub cluster: Vec<Object>,
    pub steps: Vec<Step>,
}

impl Scenario {
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let expect_path = dir.join("expect.yaml");
        let text =
            std::fs::read_to_string(&expect_path).with_context(|| format!("reading {}", expect_path.display()))?;
        let expect: Expect = serde_saphyr::from_str_with_options(&text, manifest::yaml_options())
            .map_err(|e| anyhow::anyhow!("{}: {e}", expect_path.display()))?;
        let cluster_path = dir.join(expect.cluster.as_deref().unwrap_or("cluster.yaml"));
        let cluster =
            std::fs::read_to_string(&cluster_path).with_context(|| format!("reading {}", cluster_path.display()))?;
        let mut objects = deployed_objects(&cluster_path.display().to_string(), &cluster)?;
        // A namespace known only from its pods exists as the API server would have it.
        let mut missing: Vec<String> = Vec::new();
        for object in &objects {
            if let Object::Pod(pod) = object {
                let listed = objects.iter().any(|o| matches!(o, Object::Namespace(ns) if ns.name == pod.namespace));
                if !listed && !missing.iter().any(|ns| *ns == pod.namespace) {
                    missing.push(pod.namespace.to_string());
                }
            }
        }
        objects.extend(missing.iter().map(|ns| Object::Namespace(Namespace::new(ns, Default::default()))));
        Ok(Self { name, dir: dir.to_path_buf(), cluster: objects, steps: expect.steps })
    }

    /// The world before the first step.
    pub fn start(&self) -> World {
        World { objects: self.cluster.iter().map(|o| (o.key(), o.clone())).collect() }
    }

    /// One step's edits as the changes a watch would deliver, made against
    /// `world` and applied to it.
    pub fn step_changes(&self, world: &mut World, step: &Step) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        let mut push = |world: &mut World, change: Change| {
            world.apply(&change);
            changes.push(change);
        };
        for file in &step.apply {
            let path = self.dir.join(file);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            for object in manifest::parse(&path.display().to_string(), &text)? {
                push(world, Change::Applied(object));
            }
        }
        for object in &step.delete {
            let kind = policy_kind(&object.kind)?;
            let namespace = if kind.is_cluster_scoped() {
                String::new()
            } else {
                object.namespace.clone().unwrap_or_else(|| "default".into())
            };
            push(
                world,
                Change::Deleted(ObjectKey::Policy(Box::new(PolicyRef { kind, namespace, name: object.name.clone() }))),
            );
        }
        for change in &step.label {
            let object = match change.kind.as_str() {
                "Pod" => {
                    let pod_ref = PodRef::new(change.namespace.as_deref().unwrap_or("default"), &change.name);
                    let Some(Object::Pod(pod)) = world.objects.get(&ObjectKey::Pod(pod_ref.clone())) else {
                        bail!("label: no pod {pod_ref}");
                    };
                    Object::Pod(Pod { labels: change.labels.clone().into(), ..pod.clone() })
                }
                "Namespace" => Object::Namespace(Namespace::new(&change.name, change.labels.clone())),
                other => bail!("label: kind {other:?} is neither Pod nor Namespace"),
            };
            push(world, Change::Applied(object));
        }
        Ok(changes)
    }
}

fn policy_kind(kind: &str) -> Result<PolicyKind> {
    Ok(match kind {
        "ConnectionPolicy" => PolicyKind::ConnectionPolicy,
        "ClusterConnectionPolicy" => PolicyKind::ClusterConnectionPolicy,
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        "ClusterNetworkPolicy" => PolicyKind::ClusterNetworkPolicy,
        other => bail!("delete: unknown kind {other:?}"),
    })
}

/// A probe's two ends: the source pod and address, the destination pod (if
/// the address is one's) and address.
pub type ProbeEnds = ((PodRef, IpAddr), (Option<PodRef>, IpAddr));

/// The addresses a probe uses.
pub fn probe_addresses(snapshot: &Snapshot, probe: &Probe) -> Result<ProbeEnds> {
    let pod = |text: &str| -> Result<&Pod> {
        let (ns, name) = text.split_once('/').with_context(|| format!("{text:?} is not namespace/pod"))?;
        snapshot.pods.get(&PodRef::new(ns, name)).with_context(|| format!("no pod {text}"))
    };
    let src = pod(&probe.from)?;
    let (dst_pod, dst_ip) = match probe.to.parse::<IpAddr>() {
        Ok(ip) => (snapshot.pods.values().find(|p| p.ips.contains(&ip)).map(Pod::pod_ref), ip),
        Err(_) => {
            let dst = pod(&probe.to)?;
            let want_v6 = probe.family == Some(Family::IPv6);
            let ip =
                dst.ips.iter().find(|ip| ip.is_ipv6() == want_v6).with_context(|| {
                    format!("{} has no {} address", probe.to, if want_v6 { "IPv6" } else { "IPv4" })
                })?;
            (Some(dst.pod_ref()), *ip)
        }
    };
    let src_ip = src
        .ips
        .iter()
        .find(|ip| ip.is_ipv6() == dst_ip.is_ipv6())
        .with_context(|| format!("{} has no address of the family of {dst_ip}", probe.from))?;
    Ok(((src.pod_ref(), *src_ip), (dst_pod, dst_ip)))
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub step: usize,
    pub probe: Probe,
    pub observed: Verdict,
    /// `namespace/name` (or `cluster/name`) and rule of the deciding hop.
    pub policy: Option<String>,
    pub rule: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub probes: usize,
    pub passed: usize,
    pub failed: Vec<Failure>,
    /// Policies left out of the compile, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
}

/// Name the policy and rule behind a hop's verdict.
pub fn attribution(state: &DesiredState, verdict: &ConnectionVerdict) -> (Option<String>, Option<String>) {
    let hop = verdict.denied_by().or(verdict.ingress.as_ref()).or(verdict.egress.as_ref());
    let Some(hop) = hop else { return (None, None) };
    let policy = state.policy_names.get(&hop.value.policy_id).map(PolicyRef::qualified_name);
    let direction = if hop.direction == datapath_common::INGRESS { "ingress" } else { "egress" };
    let rule = match (policy.is_some(), hop.value.rule) {
        (false, _) => None,
        (true, datapath_common::RULE_DEFAULT_DENY) => Some(format!("{direction}: no rule matched (isolated)")),
        (true, rule) => Some(format!("{direction}[{rule}]")),
    };
    (policy, rule)
}

/// The verdict the compiled state gives a probe.
pub fn verdict_of(snapshot: &Snapshot, state: &DesiredState, probe: &Probe) -> Result<ConnectionVerdict> {
    let ((src_pod, src_ip), (dst_pod, dst_ip)) = probe_addresses(snapshot, probe)?;
    Ok(lookup::connection(
        state,
        (Some(&src_pod), src_ip),
        (dst_pod.as_ref(), dst_ip),
        protocol_number(probe.protocol),
        probe.port,
    ))
}

/// `bulkhead check`: every step's changes applied as a watch delivers them,
/// only the difference written, every probe answered by the
/// datapath-equivalent lookup.
pub fn check(scenario: &Scenario) -> Result<Report> {
    let mut world = scenario.start();
    let mut snapshot = world.snapshot();
    let mut programmed = DesiredState::default();
    let mut report = Report { scenario: scenario.name.clone(), probes: 0, passed: 0, failed: vec![], rejected: vec![] };
    for (index, step) in scenario.steps.iter().enumerate() {
        for change in scenario.step_changes(&mut world, step)? {
            snapshot.apply(change);
        }
        let desired = bulkhead_policy::compile(&snapshot);
        let ops = bulkhead_policy::diff(&programmed, &desired);
        bulkhead_policy::apply(&mut programmed, &ops);
        programmed.endpoints = desired.endpoints.clone();
        programmed.identities = desired.identities.clone();
        programmed.policy_names = desired.policy_names.clone();
        for error in &desired.rejected {
            let text = error.to_string();
            if !report.rejected.contains(&text) {
                report.rejected.push(text);
            }
        }
        for probe in &step.probes {
            report.probes += 1;
            let verdict = verdict_of(&snapshot, &programmed, probe)?;
            let observed = if verdict.allowed() { Verdict::Allow } else { Verdict::Deny };
            if observed == probe.expect {
                report.passed += 1;
            } else {
                let (policy, rule) = attribution(&programmed, &verdict);
                report.failed.push(Failure { step: index, probe: probe.clone(), observed, policy, rule });
            }
        }
    }
    Ok(report)
}
