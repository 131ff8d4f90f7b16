//! `bulkhead demo` (run by `cargo xtask demo`): a small shop on this
//! machine — pods as network namespaces, the example policies of
//! manifests/examples compiled and synced into the real datapath — with a
//! verdict table of real connection attempts, the blocked-connection
//! counters, the deny log, and a default-deny rollout: Audit, then Enforce.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::{Context, Result};
use bulkhead_crds::Protocol;
use datapath_common::{EVENT_AUDIT, EVENT_DENY, INGRESS, RULE_DEFAULT_DENY, SOURCE_CGROUP};

use bulkhead::{
    dataplane::{sync::Programmer, Datapath},
    policy::{self, ContainerPort, DesiredState, Namespace, Pod, PodRef, Snapshot},
    source::manifest::{self, Object},
    testbed::Topology,
};

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// (namespace, pod, app label, served port)
const PODS: [(&str, &str, &str, u16); 5] = [
    ("shop", "frontend", "frontend", 80),
    ("shop", "api-gateway", "api-gateway", 8080),
    ("shop", "payment-service", "payment-service", 8080),
    ("shop", "postgres", "postgres", 5432),
    ("intruder", "intruder", "intruder", 80),
];

/// (from, to, port)
const PROBES: [(&str, &str, u16); 8] = [
    ("frontend", "api-gateway", 8080),
    ("api-gateway", "payment-service", 8080),
    ("payment-service", "postgres", 5432),
    ("frontend", "payment-service", 8080),
    ("intruder", "payment-service", 8080),
    ("intruder", "postgres", 5432),
    ("intruder", "frontend", 80),
    ("frontend", "outside", 443),
];

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples")
}

fn load_policies(snapshot: &mut Snapshot, file: &str, replace: Option<(&str, &str)>) -> Result<()> {
    let path = examples_dir().join(file);
    let mut text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some((from, to)) = replace {
        text = text.replace(from, to);
    }
    for object in manifest::parse(&path.display().to_string(), &text)? {
        if let Object::Policy(p) = object {
            snapshot.add_policy(p);
        }
    }
    Ok(())
}

struct Demo {
    topology: Topology,
    snapshot: Snapshot,
    programmer: Programmer,
    state: DesiredState,
    pin_dir: PathBuf,
    namespace_of: BTreeMap<String, String>,
}

impl Demo {
    fn enforce(&mut self) -> Result<()> {
        let desired = policy::compile(&self.snapshot);
        for error in &desired.rejected {
            println!("{RED}rejected{RESET} {error}");
        }
        let report = self.programmer.sync(&desired)?;
        println!("{DIM}synced {} map operations into the datapath{RESET}", report.operations);
        self.state = desired;
        Ok(())
    }

    fn address(&self, pod: &str) -> IpAddr {
        self.topology.pod(pod).ipv4
    }

    fn table(&self, title: &str) {
        println!("\n{BOLD}{title}{RESET}");
        println!("  {:<22} {:<22} {:>6}   verdict", "from", "to", "port");
        for (from, to, port) in PROBES {
            let verdict = self.topology.probe(from, "TCP", self.address(to), port);
            let shown = match verdict.as_str() {
                "allow" => format!("{GREEN}ALLOW{RESET}"),
                "eperm" => format!("{RED}DENY{RESET}  {DIM}(refused at connect(): EPERM){RESET}"),
                _ => format!("{RED}DENY{RESET}  {DIM}(dropped on the wire){RESET}"),
            };
            let qualify = |p: &str| match self.namespace_of.get(p) {
                Some(ns) => format!("{ns}/{p}"),
                None => format!("{p} host"),
            };
            println!("  {:<22} {:<22} {:>6}   {shown}", qualify(from), qualify(to), port);
        }
    }

    fn pod_of(&self, endpoint: u32) -> String {
        self.state.endpoint_by_id(endpoint).map(PodRef::to_string).unwrap_or_else(|| format!("endpoint {endpoint}"))
    }

    fn policy_of(&self, id: u32, rule: u32) -> String {
        let name = self.state.policy_names.get(&id).map(|p| p.qualified_name()).unwrap_or_else(|| "no policy".into());
        if rule == RULE_DEFAULT_DENY {
            format!("{name} (isolated, no rule allows)")
        } else {
            format!("{name} rule {rule}")
        }
    }

    fn counters_and_log(&mut self) {
        println!("\n{BOLD}bulkhead_blocked_connections_total / bulkhead_audit_denied_connections_total{RESET}");
        let verdicts = self.programmer.datapath().verdicts();
        for (key, count) in &verdicts {
            let metric = if key.kind == EVENT_DENY { "bulkhead_blocked_connections_total" } else { "bulkhead_audit_denied_connections_total" };
            let direction = if key.direction == INGRESS { "ingress" } else { "egress" };
            let pod = self.pod_of(key.endpoint);
            let policy = self.state.policy_names.get(&key.policy_id).map(|p| p.qualified_name()).unwrap_or_default();
            println!("  {metric}{{direction=\"{direction}\",pod=\"{pod}\",policy=\"{policy}\"}} {count}");
        }
        let events = self.programmer.datapath_mut().drain_events();
        if !events.is_empty() {
            println!("\n{BOLD}deny and audit log{RESET}");
        }
        for event in events {
            let (color, word) = if event.kind == EVENT_AUDIT { (YELLOW, "AUDIT") } else { (RED, "DENY ") };
            let direction = if event.direction == INGRESS { "ingress" } else { "egress" };
            let address = |a: [u8; 16]| {
                let v6 = std::net::Ipv6Addr::from(a);
                v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
            };
            let source = if event.source == SOURCE_CGROUP { "connect()".to_string() } else { format!("{}:{}", address(event.saddr), event.sport) };
            println!(
                "  {color}{word}{RESET} {} {direction}: {source} -> {}:{}  by {}",
                self.pod_of(event.endpoint),
                address(event.daddr),
                event.dport,
                self.policy_of(event.policy_id, event.rule)
            );
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(&self.pin_dir);
    }
}

pub fn run() -> Result<()> {
    println!("{BOLD}Bulkhead demo{RESET}: a shop in network namespaces, enforced by the real eBPF datapath\n");
    let mut topology = Topology::new("demo", 190);
    let mut snapshot = Snapshot::default();
    let mut namespace_of = BTreeMap::new();
    for ns in ["shop", "intruder"] {
        snapshot.add_namespace(Namespace::new(ns, Default::default()));
    }
    for (ns, name, app, port) in PODS {
        let pod = topology.add_pod(name);
        topology.serve(name, &[&format!("{port}/TCP")]);
        namespace_of.insert(name.to_string(), ns.to_string());
        snapshot.add_pod(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![pod.ipv4],
            ports: vec![ContainerPort { name: Some("http".into()), port, protocol: Protocol::TCP }],
            node_name: Some("demo-node".into()),
            uid: None,
        });
        println!("  pod {ns}/{name:<16} {}  serving TCP {port}", pod.ipv4);
    }
    let outside = topology.add_pod("outside");
    topology.serve("outside", &["443/TCP"]);
    println!("  outside host          {}  serving TCP 443", outside.ipv4);
    snapshot.node_addresses = [topology.node_ipv4].into();

    let pin_dir = PathBuf::from("/sys/fs/bpf/bulkhead-demo");
    let _ = Datapath::unpin_all(&pin_dir);
    topology.enter_node();
    let programmer = Programmer::adopt(Datapath::load(&pin_dir)?);
    let mut demo = Demo { topology, snapshot, programmer, state: DesiredState::default(), pin_dir, namespace_of };

    println!("\n{BOLD}1. The example policies{RESET} (manifests/examples): payment-service only from api-gateway on TCP 8080, postgres only from payment-service, api-gateway only from frontend");
    for file in ["payment-from-gateway.yaml", "postgres-from-payment.yaml", "gateway-from-frontend.yaml"] {
        load_policies(&mut demo.snapshot, file, None)?;
    }
    demo.enforce()?;
    for pod in demo.topology.pods.clone() {
        if pod.name == "outside" {
            continue;
        }
        let ns = &demo.namespace_of[&pod.name];
        let endpoint = demo.state.endpoints[&PodRef::new(ns, &pod.name)].id;
        let ifindex = demo.topology.ifindex(&pod.host_interface);
        demo.programmer.attach_endpoint(endpoint, &pod.host_interface, ifindex, &[pod.ipv4], Some(&pod.cgroup))?;
    }
    demo.table("Verdicts of real connection attempts");
    demo.counters_and_log();

    println!("\n{BOLD}2. Default-deny rollout for namespace shop, step 1: a Baseline Deny in Audit{RESET}");
    load_policies(&mut demo.snapshot, "default-deny-shop.yaml", None)?;
    demo.enforce()?;
    demo.table("Verdicts with default-deny-shop in Audit: nothing changes");
    demo.counters_and_log();

    println!("\n{BOLD}3. Step 2: the audit log looked right — default-deny-shop switched to Enforce{RESET}");
    load_policies(&mut demo.snapshot, "default-deny-shop.yaml", Some(("mode: Audit", "mode: Enforce")))?;
    demo.enforce()?;
    demo.table("Verdicts with default-deny-shop enforced");
    demo.counters_and_log();
    println!("\n{DIM}cleaning up: namespaces, links, cgroups and pins{RESET}");
    Ok(())
}
