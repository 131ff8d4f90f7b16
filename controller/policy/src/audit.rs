//! Audit flows: the connections Audit-mode policies would have denied, as
//! agents saw them, keyed by workload rather than pod (a replaced pod is the
//! same flow), each with a count and when it was first and last seen. From
//! them the rollout proposes the ConnectionPolicies that allow exactly what
//! was seen ([`propose`]) and tells what would break if the Audit policies
//! enforced ([`unexplained`]). Pure: times come in as Unix seconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use bulkhead_crds::{
    ConnectionPolicy, ConnectionPolicySpec, EgressRule, IngressRule, IpBlock, Mode, PolicyType, PortSpec, Protocol,
};
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};
use serde::{Deserialize, Serialize};

use crate::{lookup, selector::Labels, state::protocol_number, Pod, PodRef, PolicyRef, Snapshot};

/// The labels that name a workload, first found wins; without them a pod is
/// its own workload.
pub const WORKLOAD_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// Labels controllers set per pod, revision or run: a selector on one of
/// them stops matching at the next rollout.
pub const UNSTABLE_LABELS: [&str; 9] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
];

/// The workload a pod belongs to: its naming label, else its own name.
pub fn workload_name(pod: &Pod) -> String {
    WORKLOAD_LABELS.iter().find_map(|label| pod.labels.get(*label)).cloned().unwrap_or_else(|| pod.name.to_string())
}

/// The labels that select a pod's whole workload: its naming label when it
/// has one, else every label that is not per pod or per revision.
pub fn workload_labels(labels: &Labels) -> Labels {
    if let Some((key, value)) = WORKLOAD_LABELS.iter().find_map(|key| labels.get_key_value(*key)) {
        return Labels::from([(key.clone(), value.clone())]);
    }
    labels
        .iter()
        .filter(|(key, _)| !UNSTABLE_LABELS.contains(&key.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Judged by the destination's ingress.
    Ingress,
    /// Judged by the source's egress.
    Egress,
}

/// One end of a flow.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub enum FlowEnd {
    /// The pods of a workload, by the labels that select it.
    Workload { namespace: String, name: String, labels: Labels },
    /// No pod the agent knew: an address outside the cluster, or the node.
    Address(IpAddr),
}

impl FlowEnd {
    pub fn of_pod(pod: &Pod) -> Self {
        FlowEnd::Workload {
            namespace: pod.namespace.to_string(),
            name: workload_name(pod),
            labels: workload_labels(&pod.labels),
        }
    }

    fn namespace(&self) -> Option<&str> {
        match self {
            FlowEnd::Workload { namespace, .. } => Some(namespace),
            FlowEnd::Address(_) => None,
        }
    }
}

impl std::fmt::Display for FlowEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowEnd::Workload { namespace, name, .. } => write!(f, "{namespace}/{name}"),
            FlowEnd::Address(address) => write!(f, "{address}"),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct FlowKey {
    pub direction: Direction,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or other.
    pub protocol: String,
    pub port: u16,
}

impl FlowKey {
    /// The end whose policy judged it: the destination for ingress.
    pub fn judged(&self) -> &FlowEnd {
        match self.direction {
            Direction::Ingress => &self.destination,
            Direction::Egress => &self.source,
        }
    }

    fn peer(&self) -> &FlowEnd {
        match self.direction {
            Direction::Ingress => &self.source,
            Direction::Egress => &self.destination,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowStats {
    pub count: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    /// The Audit-mode policy that would have denied it, last time.
    pub policy: String,
}

/// A flow and its numbers, as stored and reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    #[serde(flatten)]
    pub key: FlowKey,
    #[serde(flatten)]
    pub stats: FlowStats,
}

/// The audit flows of one node, or merged from several, at most `capacity`:
/// when full, the flow seen least recently makes room.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditFlows {
    capacity: usize,
    flows: BTreeMap<FlowKey, FlowStats>,
}

impl AuditFlows {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, flows: BTreeMap::new() }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Count one audit verdict; true when the flow is new.
    pub fn record(&mut self, key: FlowKey, policy: &str, now: u64) -> bool {
        let flow = Flow { key, stats: FlowStats { count: 1, first_seen: now, last_seen: now, policy: policy.into() } };
        self.merge([flow])
    }

    /// Add flows counted elsewhere (another node, an earlier run): counts
    /// add up, the seen times widen. True when any flow is new.
    pub fn merge(&mut self, flows: impl IntoIterator<Item = Flow>) -> bool {
        let mut added = false;
        for Flow { key, stats } in flows {
            if let Some(known) = self.flows.get_mut(&key) {
                known.count += stats.count;
                known.first_seen = known.first_seen.min(stats.first_seen);
                if stats.last_seen >= known.last_seen {
                    known.last_seen = stats.last_seen;
                    known.policy = stats.policy;
                }
                continue;
            }
            if self.flows.len() >= self.capacity {
                let Some(stalest) = self.flows.iter().min_by_key(|(_, s)| s.last_seen).map(|(k, _)| k.clone()) else {
                    continue;
                };
                self.flows.remove(&stalest);
            }
            self.flows.insert(key, stats);
            added = true;
        }
        added
    }

    /// Every flow, in key order.
    pub fn flows(&self) -> Vec<Flow> {
        self.flows.iter().map(|(key, stats)| Flow { key: key.clone(), stats: stats.clone() }).collect()
    }

    /// The `limit` flows seen most recently, and how many were left out.
    pub fn newest(&self, limit: usize) -> (Vec<Flow>, usize) {
        let mut flows = self.flows();
        flows.sort_by(|a, b| b.stats.last_seen.cmp(&a.stats.last_seen).then_with(|| a.key.cmp(&b.key)));
        let omitted = flows.len().saturating_sub(limit);
        flows.truncate(limit);
        (flows, omitted)
    }
}

/// The flows a namespace's own policies judged: those reaching its pods
/// (ingress) and those its pods opened (egress).
pub fn judged_in<'a>(namespace: &str, flows: &'a [Flow]) -> Vec<&'a Flow> {
    flows.iter().filter(|flow| flow.key.judged().namespace() == Some(namespace)).collect()
}

/// What `propose` could not turn into a policy, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unproposed {
    pub flow: String,
    pub why: String,
}

#[derive(Clone, Debug, Default)]
pub struct Proposal {
    pub policies: Vec<ConnectionPolicy>,
    pub unproposed: Vec<Unproposed>,
}

/// One Enforce-mode ConnectionPolicy per workload of `namespace` that an
/// audit flow reached or left, allowing exactly the flows seen: each peer
/// by its workload's labels (and namespace) or, outside the cluster, by its
/// address; the ports seen. A workload without labels to select it by gets
/// no policy: it is named in `unproposed` instead.
pub fn propose(namespace: &str, flows: &[Flow]) -> Proposal {
    type Ports = BTreeSet<(String, u16)>;
    // Per judged workload: the peers of each direction and their ports.
    let mut by_workload: BTreeMap<(String, Labels), BTreeMap<(Direction, FlowEnd), Ports>> = BTreeMap::new();
    let mut proposal = Proposal::default();
    for flow in judged_in(namespace, flows) {
        let FlowEnd::Workload { name, labels, .. } = flow.key.judged() else { continue };
        let unselectable = |end: &FlowEnd| matches!(end, FlowEnd::Workload { labels, .. } if labels.is_empty());
        if unselectable(flow.key.judged()) || unselectable(flow.key.peer()) {
            proposal.unproposed.push(Unproposed {
                flow: describe(&flow.key),
                why: "a pod without labels: no selector picks its workload and not every pod".into(),
            });
            continue;
        }
        by_workload
            .entry((name.clone(), labels.clone()))
            .or_default()
            .entry((flow.key.direction, flow.key.peer().clone()))
            .or_default()
            .insert((flow.key.protocol.clone(), flow.key.port));
    }
    for ((name, labels), peers) in by_workload {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for ((direction, peer), ports) in peers {
            let peers = Some(vec![peer_of(namespace, &peer)]);
            let ports = ports_of(&ports);
            match direction {
                Direction::Ingress => ingress.push(IngressRule { from: peers, ports }),
                Direction::Egress => egress.push(EgressRule { to: peers, ports }),
            }
        }
        let types =
            [(!ingress.is_empty()).then_some(PolicyType::Ingress), (!egress.is_empty()).then_some(PolicyType::Egress)];
        let mut policy = ConnectionPolicy::new(
            &format!("allow-{}", dns_label(&name)),
            ConnectionPolicySpec {
                pod_selector: match_labels(labels),
                policy_types: Some(types.into_iter().flatten().collect()),
                mode: Mode::Enforce,
                ingress: (!ingress.is_empty()).then_some(ingress),
                egress: (!egress.is_empty()).then_some(egress),
            },
        );
        policy.metadata.namespace = Some(namespace.to_string());
        proposal.policies.push(policy);
    }
    proposal
}

fn peer_of(namespace: &str, end: &FlowEnd) -> bulkhead_crds::Peer {
    match end {
        FlowEnd::Workload { namespace: peer_namespace, labels, .. } => bulkhead_crds::Peer {
            pod_selector: Some(match_labels(labels.clone())),
            namespace_selector: (peer_namespace != namespace).then(|| {
                match_labels(Labels::from([("kubernetes.io/metadata.name".to_string(), peer_namespace.clone())]))
            }),
            ip_block: None,
        },
        FlowEnd::Address(address) => {
            let bits = if address.is_ipv4() { 32 } else { 128 };
            bulkhead_crds::Peer {
                ip_block: Some(IpBlock { cidr: format!("{address}/{bits}"), except: None }),
                ..Default::default()
            }
        }
    }
}

/// The ports seen; a protocol a ConnectionPolicy cannot name (ICMP) allows
/// the peer on every port and protocol, as a rule without ports does.
fn ports_of(seen: &BTreeSet<(String, u16)>) -> Option<Vec<PortSpec>> {
    let mut ports = Vec::new();
    for (protocol, port) in seen {
        let protocol = match protocol.as_str() {
            "TCP" => Protocol::TCP,
            "UDP" => Protocol::UDP,
            "SCTP" => Protocol::SCTP,
            _ => return None,
        };
        ports.push(PortSpec { protocol, port: Some(IntOrString::Int((*port).into())), end_port: None });
    }
    Some(ports)
}

fn match_labels(labels: Labels) -> LabelSelector {
    LabelSelector { match_labels: Some(labels), match_expressions: None }
}

/// A name part fit for `metadata.name`: lowercase letters, digits and `-`.
fn dns_label(text: &str) -> String {
    let name: String =
        text.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name = name.trim_matches('-');
    name[..name.len().min(240)].trim_end_matches('-').to_string()
}

/// `source -> destination port/protocol (direction)`, as the tables print it.
pub fn describe(key: &FlowKey) -> String {
    let direction = match key.direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    format!("{} -> {} {}/{} ({direction})", key.source, key.destination, key.port, key.protocol)
}

/// The flows the policies of `snapshot` would still deny with the policies
/// in `enforcing` switched from Audit to Enforce: each judged at the hop
/// that audited it. A workload's pod is one of its pods in the snapshot
/// when there is one (so named ports resolve), else a stand-in with its
/// labels. Fails naming a policy of `enforcing` the snapshot lacks.
pub fn unexplained(snapshot: &Snapshot, enforcing: &[PolicyRef], flows: &[Flow]) -> Result<Vec<Flow>, String> {
    let mut snapshot = snapshot.clone();
    for policy in enforcing {
        let Some(accepted) = snapshot.policies.get_mut(policy) else {
            return Err(format!("{policy} is not in place (missing or rejected)"));
        };
        accepted.audit = false;
    }
    let mut ends: BTreeMap<FlowEnd, (Option<PodRef>, IpAddr)> = BTreeMap::new();
    for flow in flows {
        for end in [&flow.key.source, &flow.key.destination] {
            if ends.contains_key(end) {
                continue;
            }
            let placed = match end {
                FlowEnd::Address(address) => (None, *address),
                FlowEnd::Workload { namespace, name, labels } => match pod_of(&snapshot, namespace, name, labels) {
                    Some(pod) => (Some(pod.pod_ref()), pod.ips[0]),
                    None => {
                        let index = ends.len() as u32;
                        let address = IpAddr::V4(Ipv4Addr::from(STAND_IN_BASE + index));
                        let stand_in = Pod {
                            namespace: namespace.into(),
                            name: format!("{}-audit-stand-in-{index}", dns_label(name)).into(),
                            labels: std::sync::Arc::new(labels.clone()),
                            ips: vec![address],
                            ports: Vec::new().into(),
                            node_name: None,
                            uid: None,
                        };
                        let pod_ref = stand_in.pod_ref();
                        snapshot.add_pod(stand_in);
                        (Some(pod_ref), address)
                    }
                },
            };
            ends.insert(end.clone(), placed);
        }
    }
    let state = crate::compile(&snapshot);
    let mut left = Vec::new();
    for flow in flows {
        let (src, dst) = (&ends[&flow.key.source], &ends[&flow.key.destination]);
        let protocol = match flow.key.protocol.as_str() {
            "TCP" => protocol_number(Protocol::TCP),
            "UDP" => protocol_number(Protocol::UDP),
            "SCTP" => protocol_number(Protocol::SCTP),
            "ICMP" => datapath_common::proto::ICMP,
            "ICMPv6" => datapath_common::proto::ICMPV6,
            _ => 0,
        };
        let verdict =
            lookup::connection(&state, (src.0.as_ref(), src.1), (dst.0.as_ref(), dst.1), protocol, flow.key.port);
        let hop = match flow.key.direction {
            Direction::Ingress => verdict.ingress,
            Direction::Egress => verdict.egress,
        };
        if hop.is_some_and(|hop| !hop.allowed()) {
            left.push(flow.clone());
        }
    }
    Ok(left)
}

/// Stand-in pods take addresses from 240.0.0.0/4, reserved and never a pod's.
const STAND_IN_BASE: u32 = 0xF000_0001;

fn pod_of<'a>(snapshot: &'a Snapshot, namespace: &str, name: &str, labels: &Labels) -> Option<&'a Pod> {
    snapshot.pods.values().find(|pod| {
        pod.namespace == namespace
            && !pod.ips.is_empty()
            && workload_name(pod) == name
            && labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{manifest, Object};

    fn workload(namespace: &str, name: &str) -> FlowEnd {
        FlowEnd::Workload {
            namespace: namespace.into(),
            name: name.into(),
            labels: Labels::from([("app".into(), name.into())]),
        }
    }

    fn key(direction: Direction, source: FlowEnd, destination: FlowEnd, port: u16) -> FlowKey {
        FlowKey { direction, source, destination, protocol: "TCP".into(), port }
    }

    #[test]
    fn flows_count_merge_and_make_room_by_age() {
        let mut flows = AuditFlows::new(2);
        let web_db = key(Direction::Ingress, workload("shop", "web"), workload("shop", "db"), 5432);
        assert!(flows.record(web_db.clone(), "shop/bulkhead-default-deny", 100));
        assert!(!flows.record(web_db.clone(), "shop/bulkhead-default-deny", 130));
        let stats = &flows.flows()[0].stats;
        assert_eq!((stats.count, stats.first_seen, stats.last_seen), (2, 100, 130));

        let mut other_node = AuditFlows::new(2);
        other_node.record(web_db.clone(), "shop/bulkhead-default-deny", 90);
        flows.merge(other_node.flows());
        let stats = &flows.flows()[0].stats;
        assert_eq!((stats.count, stats.first_seen, stats.last_seen), (3, 90, 130), "counts add, times widen");

        let out =
            key(Direction::Egress, workload("shop", "web"), FlowEnd::Address("203.0.113.9".parse().unwrap()), 443);
        flows.record(out.clone(), "shop/bulkhead-default-deny", 140);
        let late = key(Direction::Egress, workload("shop", "db"), workload("lab", "x"), 80);
        flows.record(late.clone(), "shop/bulkhead-default-deny", 150);
        assert_eq!(flows.len(), 2);
        let kept: Vec<FlowKey> = flows.flows().into_iter().map(|f| f.key).collect();
        assert!(!kept.contains(&web_db), "the stalest flow made room");
        let (newest, omitted) = flows.newest(1);
        assert_eq!((newest[0].key.clone(), omitted), (late, 1));

        let text = serde_json::to_string(&flows.flows()).unwrap();
        let back: Vec<Flow> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, flows.flows(), "what is stored reads back");
    }

    #[test]
    fn workloads_are_selected_by_stable_labels() {
        let labels =
            |pairs: &[(&str, &str)]| -> Labels { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let deployment = labels(&[("app", "web"), ("tier", "front"), ("pod-template-hash", "7d4b9")]);
        assert_eq!(workload_labels(&deployment), labels(&[("app", "web")]));
        let unnamed = labels(&[
            ("tier", "front"),
            ("controller-revision-hash", "abc"),
            ("statefulset.kubernetes.io/pod-name", "db-0"),
        ]);
        assert_eq!(workload_labels(&unnamed), labels(&[("tier", "front")]));
    }

    fn flow(key: FlowKey, last_seen: u64) -> Flow {
        Flow {
            key,
            stats: FlowStats {
                count: 1,
                first_seen: last_seen,
                last_seen,
                policy: "shop/bulkhead-default-deny".into(),
            },
        }
    }

    #[test]
    fn one_policy_per_workload_allows_exactly_what_was_seen() {
        let flows = vec![
            flow(key(Direction::Ingress, workload("shop", "web"), workload("shop", "db"), 5432), 1),
            flow(key(Direction::Ingress, workload("monitoring", "prometheus"), workload("shop", "db"), 9187), 1),
            flow(key(Direction::Egress, workload("shop", "web"), workload("shop", "db"), 5432), 1),
            flow(
                key(Direction::Egress, workload("shop", "web"), FlowEnd::Address("203.0.113.9".parse().unwrap()), 443),
                1,
            ),
            flow(key(Direction::Ingress, workload("lab", "x"), workload("lab", "y"), 80), 1),
            flow(
                key(
                    Direction::Ingress,
                    FlowEnd::Workload { namespace: "shop".into(), name: "debug-pod".into(), labels: Labels::new() },
                    workload("shop", "db"),
                    22,
                ),
                1,
            ),
        ];
        let proposal = propose("shop", &flows);
        let names: Vec<_> = proposal.policies.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["allow-db", "allow-web"], "one per workload of the namespace; lab's flow is not shop's");
        assert_eq!(proposal.unproposed.len(), 1, "{:?}", proposal.unproposed);
        assert!(proposal.unproposed[0].flow.contains("debug-pod"));

        let db = &proposal.policies[0].spec;
        assert_eq!(db.pod_selector.match_labels.as_ref().unwrap()["app"], "db");
        assert_eq!(db.policy_types, Some(vec![PolicyType::Ingress]));
        let ingress = db.ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 2);
        let monitoring = &ingress[0].from.as_ref().unwrap()[0];
        assert_eq!(
            monitoring.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap()
                ["kubernetes.io/metadata.name"],
            "monitoring"
        );
        assert!(
            ingress[1].from.as_ref().unwrap()[0].namespace_selector.is_none(),
            "same namespace: no namespaceSelector"
        );
        assert_eq!(ingress[1].ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(5432)));

        let web = &proposal.policies[1].spec;
        assert_eq!(web.policy_types, Some(vec![PolicyType::Egress]));
        let egress = web.egress.as_ref().unwrap();
        assert_eq!(egress.len(), 2, "db and the outside address");
        assert_eq!(egress[1].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "203.0.113.9/32");
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, pod-template-hash: a1}}
status: {podIPs: [{ip: 10.0.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {containers: [{name: db, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIPs: [{ip: 10.0.0.2}]}
---
apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: bulkhead-default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress], mode: Audit}
"#;

    #[test]
    fn what_the_proposals_allow_is_explained_and_nothing_else() {
        let mut snapshot: Snapshot = manifest::parse("cluster.yaml", CLUSTER).unwrap().into_iter().collect();
        let deny = PolicyRef {
            kind: crate::PolicyKind::ConnectionPolicy,
            namespace: "shop".into(),
            name: "bulkhead-default-deny".into(),
        };
        let wanted = vec![
            flow(key(Direction::Ingress, workload("shop", "web"), workload("shop", "db"), 5432), 1),
            flow(key(Direction::Egress, workload("shop", "web"), workload("shop", "db"), 5432), 1),
            flow(
                key(Direction::Egress, workload("shop", "cron"), FlowEnd::Address("203.0.113.9".parse().unwrap()), 443),
                1,
            ),
        ];
        let unwanted = flow(
            key(Direction::Egress, workload("shop", "web"), FlowEnd::Address("198.51.100.66".parse().unwrap()), 6667),
            1,
        );
        let all: Vec<Flow> = wanted.iter().cloned().chain([unwanted.clone()]).collect();
        assert_eq!(
            unexplained(&snapshot, std::slice::from_ref(&deny), &all).unwrap().len(),
            4,
            "default-deny enforced alone denies all"
        );

        let yaml: Vec<String> =
            propose("shop", &wanted).policies.iter().map(|p| serde_saphyr::to_string(p).unwrap()).collect();
        for object in manifest::parse("proposal.yaml", &yaml.join("---\n")).unwrap() {
            let Object::Policy(policy) = object else { panic!("a policy") };
            assert!(matches!(snapshot.admit(&policy), crate::Admission::Accepted { .. }), "the proposal is valid");
        }
        assert_eq!(
            unexplained(&snapshot, std::slice::from_ref(&deny), &all).unwrap(),
            vec![unwanted],
            "only the flow left out"
        );

        let missing = PolicyRef { name: "nope".into(), ..deny };
        assert!(unexplained(&snapshot, &[missing], &all).unwrap_err().contains("nope"));
    }
}
