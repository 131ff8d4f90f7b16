//! The commands for people: `check`, `explain`, `compile` and `coverage`
//! answer from the compiled state of a folder, `validate` checks files
//! before they are applied, all with no kernel and no cluster; `rollout`
//! writes the policies of a default-deny rollout, and applies them when
//! asked.

pub mod baseline;
pub mod cluster;
pub mod flows;
pub mod quarantine;
pub mod rollout;
pub mod scenario;
pub mod validate;

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{bail, Context, Result};
use bulkhead_crds::Protocol;
use bulkhead_policy::{
    coverage::NamespaceCoverage,
    lookup::{self, Hop},
    state::{protocol_number, PolicyEntryKey},
    DesiredState, PodRef, PolicyRef, Snapshot,
};
use datapath_common::{identity, policy_prefix, verdict, PolicyValue, EGRESS, INGRESS, RULE_DEFAULT_DENY};

use scenario::Scenario;

/// The snapshot of a scenario directory after its first step's files
/// (cluster and `policies.yaml`), or of any folder of manifests (pods without
/// addresses get the scenario runners' ones, so a folder can be explained
/// before it is deployed).
pub fn load(dir: &Path) -> Result<Snapshot> {
    if dir.join("expect.yaml").exists() {
        let scenario = Scenario::load(dir)?;
        let mut world = scenario.start();
        if dir.join("policies.yaml").exists() {
            let step = scenario::Step { apply: vec!["policies.yaml".into()], ..Default::default() };
            scenario.step_changes(&mut world, &step)?;
        }
        return Ok(world.snapshot());
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut text = String::new();
    for path in &files {
        text.push_str("\n---\n");
        text.push_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(scenario::deployed_objects(&dir.display().to_string(), &text)?.into_iter().collect())
}

pub fn parse_port(text: &str) -> Result<(u16, Protocol)> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let protocol = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::TCP,
        "UDP" => Protocol::UDP,
        "SCTP" => Protocol::SCTP,
        other => bail!("--port: unknown protocol {other:?}: TCP, UDP or SCTP"),
    };
    Ok((port.parse().with_context(|| format!("--port: {port:?} is not a port number"))?, protocol))
}

/// `bulkhead explain`'s answer: each hop of one connection and what decided it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    /// The destination is no pod: only the source's egress applies.
    pub outside_cluster: bool,
    pub hops: Vec<HopView>,
    /// Policies left out (rejected): they decide nothing here.
    pub rejected: Vec<String>,
}

#[derive(serde::Serialize)]
pub struct HopView {
    pub direction: &'static str,
    pub pod: String,
    pub verdict: &'static str,
    /// The deciding policy (`namespace/name`, `cluster/name`), if one decided.
    pub policy: Option<String>,
    /// Its rule's index, or absent when the policy isolates and no rule allows.
    pub rule: Option<u32>,
    /// An Audit-mode policy that would deny this hop.
    pub audit: Option<AuditView>,
    pub reason: String,
}

#[derive(serde::Serialize)]
pub struct AuditView {
    pub policy: String,
    pub rule: Option<u32>,
}

/// `bulkhead explain`: each hop of one connection and what decided it.
pub fn explain(snapshot: &Snapshot, from: &str, to: &str, port: &str, ipv6: bool) -> Result<Explanation> {
    let (port, protocol) = parse_port(port)?;
    let probe = scenario::Probe {
        from: from.to_string(),
        to: to.to_string(),
        port,
        protocol,
        expect: scenario::Verdict::Allow,
        family: ipv6.then_some(scenario::Family::IPv6),
    };
    let ((src_pod, src_ip), (dst_pod, dst_ip)) = scenario::probe_addresses(snapshot, &probe)?;
    let state = bulkhead_policy::compile(snapshot);
    let verdict = lookup::connection(
        &state,
        (Some(&src_pod), src_ip),
        (dst_pod.as_ref(), dst_ip),
        protocol_number(protocol),
        port,
    );
    Ok(Explanation {
        from: from.to_string(),
        to: to.to_string(),
        source: src_ip,
        destination: dst_ip,
        protocol: format!("{protocol:?}"),
        port,
        allowed: verdict.allowed(),
        outside_cluster: dst_pod.is_none(),
        hops: verdict.egress.iter().chain(verdict.ingress.iter()).map(|hop| hop_view(&state, hop)).collect(),
        rejected: state.rejected.iter().map(ToString::to_string).collect(),
    })
}

pub fn print_explanation(explanation: &Explanation) {
    let e = explanation;
    for error in &e.rejected {
        println!("note: not enforced (rejected): {error}");
    }
    println!("{} ({}) -> {} ({})  {}/{}", e.from, e.source, e.to, e.destination, e.protocol, e.port);
    for hop in &e.hops {
        println!("  {:7} of {}: {}", hop.direction, hop.pod, hop.reason);
    }
    if e.outside_cluster {
        println!("  {} is outside the cluster: only the source's egress applies", e.to);
    }
    println!("verdict: {}", if e.allowed { "ALLOW" } else { "DENY" });
}

fn hop_view(state: &DesiredState, hop: &Hop) -> HopView {
    let value = hop.value;
    let name = |id: u32| state.policy_names.get(&id).map(PolicyRef::qualified_name);
    let node = hop.peer_identity == identity::HOST;
    let decided_by = if node { None } else { name(value.policy_id) };
    HopView {
        direction: if hop.direction == INGRESS { "ingress" } else { "egress" },
        pod: hop.pod.to_string(),
        verdict: if hop.allowed() { "allow" } else { "deny" },
        rule: decided_by.as_ref().and_then(|_| (value.rule != RULE_DEFAULT_DENY).then_some(value.rule)),
        policy: decided_by,
        audit: (!node && value.audit != 0).then(|| AuditView {
            policy: name(value.audit_policy_id).unwrap_or_default(),
            rule: (value.audit_rule != RULE_DEFAULT_DENY).then_some(value.audit_rule),
        }),
        reason: describe_hop(state, hop),
    }
}

fn describe_hop(state: &DesiredState, hop: &Hop) -> String {
    if hop.peer_identity == identity::HOST {
        return "allow (the pod's own node is always allowed)".into();
    }
    let value = hop.value;
    let allowed = value.verdict == verdict::ALLOW;
    let word = if allowed { "allow" } else { "deny" };
    let audit = if value.audit != 0 {
        let name = state.policy_names.get(&value.audit_policy_id).map(|p| p.to_string()).unwrap_or_default();
        format!("; AUDIT: {name} rule {} would deny", value.audit_rule)
    } else {
        String::new()
    };
    match state.policy_names.get(&value.policy_id) {
        None if allowed => format!("allow (not isolated: no policy applies){audit}"),
        None => "deny (no policy state for this pod: fail closed)".into(),
        Some(policy) if value.rule == RULE_DEFAULT_DENY => {
            format!("{word} (isolated by {policy}; no rule allows it){audit}")
        }
        Some(policy) => format!("{word} by {policy} rule {}{audit}", value.rule),
    }
}

fn peer_name(state: &DesiredState, id: u32) -> String {
    match id {
        identity::ANY => "any peer".into(),
        identity::HOST => "the node".into(),
        identity::WORLD => "the world".into(),
        id => state.identities.get(&id).map(|k| k.describe()).unwrap_or_else(|| format!("identity {id}")),
    }
}

fn ports_text(prefix_len: u32, protocol: u8, port: u16) -> String {
    if prefix_len == policy_prefix::ANY_PROTOCOL {
        return "any protocol".into();
    }
    let name = match protocol {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    };
    let bits = prefix_len - policy_prefix::ANY_PORT;
    if bits == 0 {
        return format!("{name} any port");
    }
    let size = 1u32 << (16 - bits);
    if size == 1 {
        format!("{name}/{port}")
    } else {
        format!("{name}/{}-{}", port, port as u32 + size - 1)
    }
}

/// One allowlist entry as `compile` prints it.
pub struct EntryView {
    pub direction: &'static str,
    pub peer: String,
    pub ports: String,
    pub verdict: &'static str,
    pub decided_by: String,
}

fn entry_view(state: &DesiredState, (prefix_len, key): &PolicyEntryKey, value: &PolicyValue) -> EntryView {
    let verdict = match (value.verdict == verdict::ALLOW, value.audit != 0) {
        (true, true) => "allow (audit: would deny)",
        (true, false) => "allow",
        (false, _) => "deny",
    };
    let decided_by = match state.policy_names.get(&value.policy_id) {
        None => "default".to_string(),
        Some(p) if value.rule == RULE_DEFAULT_DENY => format!("{} (isolation)", p.qualified_name()),
        Some(p) => format!("{} rule {}", p.qualified_name(), value.rule),
    };
    EntryView {
        direction: if key.direction() == EGRESS { "egress" } else { "ingress" },
        peer: peer_name(state, key.identity()),
        ports: ports_text(*prefix_len, key.protocol(), key.port()),
        verdict,
        decided_by,
    }
}

/// Every entry of one endpoint: exactly what the datapath holds for it.
pub fn entries_of(state: &DesiredState, endpoint: u32) -> Vec<EntryView> {
    state.entries_of(endpoint).map(|(key, value)| entry_view(state, key, value)).collect()
}

pub fn print_allowlists(state: &DesiredState) {
    for (pod, endpoint) in &state.endpoints {
        let addresses: Vec<String> = endpoint.addresses.iter().map(IpAddr::to_string).collect();
        println!("{pod}  (endpoint {}, {})", endpoint.id, addresses.join(", "));
        for e in entries_of(state, endpoint.id) {
            println!("  {:7} {:50} {:22} {:26} {}", e.direction, e.peer, e.ports, e.verdict, e.decided_by);
        }
    }
}

pub fn allowlists_json(state: &DesiredState) -> serde_json::Value {
    let pods: Vec<serde_json::Value> = state
        .endpoints
        .iter()
        .map(|(pod, endpoint): (&PodRef, _)| {
            let entries: Vec<serde_json::Value> = entries_of(state, endpoint.id)
                .into_iter()
                .map(|e| {
                    serde_json::json!({"direction": e.direction, "peer": e.peer, "ports": e.ports, "verdict": e.verdict, "decidedBy": e.decided_by})
                })
                .collect();
            serde_json::json!({"pod": pod.to_string(), "endpoint": endpoint.id, "addresses": endpoint.addresses, "entries": entries})
        })
        .collect();
    let rejected: Vec<String> = state.rejected.iter().map(ToString::to_string).collect();
    serde_json::json!({"pods": pods, "rejected": rejected})
}

/// One row per namespace, then the open pods by name: the places a
/// default-deny rollout has not reached.
pub fn print_coverage(coverage: &BTreeMap<String, NamespaceCoverage>) {
    let known = coverage.values().any(|c| c.enforced.is_some());
    let enforced_header = if known { "ENFORCED" } else { "" };
    println!(
        "{:<32} {:>6} {:>17} {:>16} {:>6} {:>9}",
        "NAMESPACE", "PODS", "INGRESS ISOLATED", "EGRESS ISOLATED", "OPEN", enforced_header
    );
    for (namespace, c) in coverage {
        let enforced = c.enforced.map(|n| n.to_string()).unwrap_or_default();
        println!(
            "{namespace:<32} {:>6} {:>17} {:>16} {:>6} {enforced:>9}",
            c.pods,
            c.ingress_isolated,
            c.egress_isolated,
            c.open_pods.len()
        );
    }
    for (namespace, c) in coverage {
        for pod in &c.open_pods {
            println!("open: {namespace}/{pod} (no enforced policy selects it)");
        }
        for pod in &c.not_enforced {
            println!("not enforced: {namespace}/{pod} (no agent reports its programs attached)");
        }
    }
}
