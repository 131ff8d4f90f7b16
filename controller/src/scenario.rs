//! Scenario directories (../shared/design/scenario.md): the cluster, the
//! policies, and steps of probes with expected verdicts. `check` answers each
//! probe from the compiled state exactly as the datapath would look it up,
//! after applying each step through `diff` — the path a watch event takes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use bulkhead_crds::Protocol;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{
        self,
        compile::protocol_number,
        lookup::{self, ConnectionVerdict},
        DesiredState, Pod, PodRef, PolicyKind, PolicyRef, Snapshot,
    },
    source::{self, manifest, Change, Object},
};

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Expect {
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

#[derive(Clone, Debug, Deserialize, Serialize)]
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

/// A loaded scenario: the starting cluster and the steps.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
    pub snapshot: Snapshot,
    /// Pods that asked for an IPv6 address too.
    pub dual_stack: Vec<PodRef>,
    pub steps: Vec<Step>,
}

/// Addresses the runner gives pods without `status.podIPs`, in file order.
pub fn assigned_ipv4(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, (1 + index / 200) as u8, (10 + index % 200) as u8))
}

pub fn assigned_ipv6(index: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, (1 + index / 200) as u16, (10 + index % 200) as u16))
}

/// Give pods without `status.podIPs` the runners' addresses, by their order
/// in cluster.yaml: IPv4, and IPv6 too when the pod asks for it.
pub fn assign_addresses(objects: &mut [Object]) {
    let pods = objects.iter_mut().filter_map(|o| match o {
        Object::Pod(pod, dual) => Some((pod, *dual)),
        _ => None,
    });
    for (index, (pod, dual)) in pods.enumerate() {
        if pod.ips.is_empty() {
            pod.ips.push(assigned_ipv4(index));
            if dual {
                pod.ips.push(assigned_ipv6(index));
            }
        }
    }
}

impl Scenario {
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let cluster_path = dir.join("cluster.yaml");
        let cluster =
            std::fs::read_to_string(&cluster_path).with_context(|| format!("reading {}", cluster_path.display()))?;
        let mut snapshot = Snapshot::default();
        let mut dual_stack = Vec::new();
        let mut objects = manifest::parse(&cluster_path.display().to_string(), &cluster)?;
        assign_addresses(&mut objects);
        for object in objects {
            match object {
                Object::Namespace(ns) => snapshot.add_namespace(ns),
                Object::Pod(pod, dual) => {
                    if dual {
                        dual_stack.push(pod.pod_ref());
                    }
                    snapshot.add_pod(pod);
                }
                Object::Policy(p) => snapshot.add_policy(p),
            }
        }
        for pod in snapshot.pods.values() {
            if !snapshot.namespaces.contains_key(&pod.namespace) {
                let ns = policy::Namespace::new(&pod.namespace, Default::default());
                snapshot.namespaces.insert(ns.name.clone(), ns);
            }
        }
        let expect_path = dir.join("expect.yaml");
        let text =
            std::fs::read_to_string(&expect_path).with_context(|| format!("reading {}", expect_path.display()))?;
        let expect: Expect = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
            .map_err(|e| anyhow::anyhow!("{}: {}: {}", expect_path.display(), e.path(), e.inner()))?;
        Ok(Self { name, dir: dir.to_path_buf(), snapshot, dual_stack, steps: expect.steps })
    }

    /// Apply one step's changes to a snapshot: the same objects a watch would deliver.
    pub fn apply_step(&self, snapshot: &mut Snapshot, step: &Step) -> Result<()> {
        for file in &step.apply {
            let path = self.dir.join(file);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            for object in manifest::parse(&path.display().to_string(), &text)? {
                source::apply(snapshot, Change::Applied(object));
            }
        }
        for object in &step.delete {
            let kind = policy_kind(&object.kind)?;
            let namespace = if kind == PolicyKind::ClusterConnectionPolicy {
                String::new()
            } else {
                object.namespace.clone().unwrap_or_else(|| "default".into())
            };
            snapshot.policies.remove(&PolicyRef { kind, namespace, name: object.name.clone() });
        }
        for change in &step.label {
            match change.kind.as_str() {
                "Pod" => {
                    let pod_ref = PodRef::new(change.namespace.as_deref().unwrap_or("default"), &change.name);
                    let pod = snapshot.pods.get_mut(&pod_ref).with_context(|| format!("label: no pod {pod_ref}"))?;
                    pod.labels = change.labels.clone();
                }
                "Namespace" => {
                    let ns = policy::Namespace::new(&change.name, change.labels.clone());
                    snapshot.add_namespace(ns);
                }
                other => bail!("label: kind {other:?} is neither Pod nor Namespace"),
            }
        }
        Ok(())
    }
}

fn policy_kind(kind: &str) -> Result<PolicyKind> {
    Ok(match kind {
        "ConnectionPolicy" => PolicyKind::ConnectionPolicy,
        "ClusterConnectionPolicy" => PolicyKind::ClusterConnectionPolicy,
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        other => bail!("delete: unknown kind {other:?}"),
    })
}

/// The addresses a probe uses: source pod and address, destination pod (if
/// any) and address.
pub fn probe_addresses(snapshot: &Snapshot, probe: &Probe) -> Result<((PodRef, IpAddr), (Option<PodRef>, IpAddr))> {
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

/// `bulkhead check`: every step applied through `diff`, every probe answered
/// by the datapath-equivalent lookup.
pub fn check(scenario: &Scenario) -> Result<Report> {
    let mut snapshot = scenario.snapshot.clone();
    let mut programmed = DesiredState::default();
    let mut report = Report { scenario: scenario.name.clone(), probes: 0, passed: 0, failed: vec![], rejected: vec![] };
    for (index, step) in scenario.steps.iter().enumerate() {
        scenario.apply_step(&mut snapshot, step)?;
        let desired = policy::compile(&snapshot);
        let ops = policy::diff(&programmed, &desired);
        policy::apply(&mut programmed, &ops);
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
            let ((src_pod, src_ip), (dst_pod, dst_ip)) = probe_addresses(&snapshot, probe)?;
            let verdict = lookup::connection(
                &programmed,
                (Some(&src_pod), src_ip),
                (dst_pod.as_ref(), dst_ip),
                protocol_number(probe.protocol),
                probe.port,
            );
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
