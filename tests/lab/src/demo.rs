//! `bulkhead demo` (run by `cargo xtask demo`): a small shop on this
//! machine — pods as network namespaces behind a node namespace — enforced by
//! the real agent in its embedded default mode, following a folder of
//! manifests: the example policies of manifests/examples are copied in, then
//! the default-deny rollout loop of `bulkhead rollout` runs on it — plan in
//! Audit, traffic, the report and its proposal, the proposal applied less
//! the unwanted flow, enforce. Shows a verdict table of real connection
//! attempts after each step, the agent's own /metrics counters and its
//! deny/audit log.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use bulkhead::{dataplane::Datapath, source::dir};

use crate::testbed::{self, Topology};

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-demo";

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

struct Demo {
    topology: Topology,
    folder: PathBuf,
    agent: Option<Child>,
    events_shown: usize,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = Datapath::unpin_all(PIN_DIR);
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

impl Demo {
    fn namespace_of(pod: &str) -> Option<&'static str> {
        PODS.iter().find(|p| p.1 == pod).map(|p| p.0)
    }

    /// Put a file into the followed folder as an editor would: whole, renamed into place.
    fn put(&self, name: &str, text: &str) -> Result<()> {
        Ok(testbed::write_atomically(&self.folder.join(name), text)?)
    }

    /// Wait until the agent holds the folder's present content.
    fn enforced(&self) -> Result<()> {
        let revision = dir::revision(&self.folder)?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            testbed::interrupted()?;
            if testbed::agent_holds(&self.topology.agent_state(), &revision, PODS.len()) {
                println!(
                    "{DIM}the agent enforces it {:.0} ms after the edit{RESET}",
                    started.elapsed().as_secs_f64() * 1e3
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the agent did not enforce the folder in 30 s")
    }

    fn address(&self, pod: &str) -> IpAddr {
        self.topology.pod(pod).ipv4
    }

    fn table(&self, title: &str) -> Result<()> {
        testbed::interrupted()?;
        println!("\n{BOLD}{title}{RESET}");
        println!("  {:<22} {:<22} {:>6}   verdict", "from", "to", "port");
        for (from, to, port) in PROBES {
            let verdict = self.topology.probe(from, "TCP", self.address(to), port);
            let shown = match verdict.as_str() {
                "allow" => format!("{GREEN}ALLOW{RESET}"),
                "eperm" => format!("{RED}DENY{RESET}  {DIM}(refused at connect(): EPERM){RESET}"),
                _ => format!("{RED}DENY{RESET}  {DIM}(dropped on the wire){RESET}"),
            };
            let qualify = |p: &str| match Self::namespace_of(p) {
                Some(ns) => format!("{ns}/{p}"),
                None => format!("{p} host"),
            };
            println!("  {:<22} {:<22} {:>6}   {shown}", qualify(from), qualify(to), port);
        }
        Ok(())
    }

    fn counters_and_log(&mut self) -> Result<()> {
        // Counters reach /metrics at the agent's next read of the datapath.
        std::thread::sleep(Duration::from_millis(300));
        println!("\n{BOLD}from the agent's /metrics{RESET}");
        for line in self.topology.agent_get("/metrics")?.lines() {
            if line.starts_with("bulkhead_blocked_connections_total{")
                || line.starts_with("bulkhead_audit_denied_connections_total{")
                || line.starts_with("bulkhead_egress_anomalies_total{")
            {
                println!("  {line}");
            }
        }
        let events: Vec<serde_json::Value> = serde_json::from_str(&self.topology.agent_get("/debug/events")?)?;
        if events.len() > self.events_shown {
            println!("\n{BOLD}the agent's deny and audit log{RESET}");
        }
        // Allows (new egress flows) are `bulkhead flows`'s to show, not the log's.
        for event in events[self.events_shown.min(events.len())..].iter().filter(|e| e["verdict"] != "allow") {
            let text = |k: &str| event[k].as_str().unwrap_or_default().to_string();
            let (color, word) = if text("verdict") == "audit" { (YELLOW, "AUDIT") } else { (RED, "DENY ") };
            let source = if text("hook") == "connect" { "connect()".to_string() } else { text("source") };
            let by = match event["rule"].as_u64() {
                Some(rule) => format!("{} rule {rule}", text("policy")),
                None => format!("{} (isolated, no rule allows)", text("policy")),
            };
            println!(
                "  {color}{word}{RESET} {} {}: {source} -> {}  by {by}",
                text("pod"),
                text("direction"),
                text("destination")
            );
        }
        self.events_shown = events.len();
        Ok(())
    }
}

/// Run `bulkhead` as the operator would, showing the command and its output.
fn command(args: &[&str]) -> Result<()> {
    if !command_status(args)? {
        bail!("bulkhead {} failed", args.join(" "));
    }
    Ok(())
}

/// `command`, where failing is an answer: whether it succeeded.
fn command_status(args: &[&str]) -> Result<bool> {
    let shown: Vec<String> =
        args.iter().map(|a| if a.is_empty() { "\"\"".to_string() } else { a.to_string() }).collect();
    println!("{DIM}${RESET} bulkhead {}", shown.join(" "));
    let out = std::process::Command::new(testbed::product_binary()).args(args).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("  {line}");
    }
    Ok(out.status.success())
}

/// The proposed policies without the rules whose peers are in `namespace`
/// (the operator's edit), as YAML.
fn without_peers_in(proposal: &str, namespace: &str) -> Result<String> {
    use bulkhead_crds::{ConnectionPolicy, PolicyType};
    let in_namespace = |peers: &Option<Vec<bulkhead_crds::Peer>>| {
        peers.iter().flatten().any(|peer| {
            peer.namespace_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|labels| labels.get("kubernetes.io/metadata.name").map(String::as_str) == Some(namespace))
        })
    };
    let mut kept = Vec::new();
    for document in proposal.split("---\n").filter(|d| !d.trim().is_empty()) {
        let mut policy: ConnectionPolicy = serde_saphyr::from_str(document)?;
        if let Some(ingress) = policy.spec.ingress.as_mut() {
            ingress.retain(|rule| !in_namespace(&rule.from));
            if ingress.is_empty() {
                policy.spec.ingress = None;
                policy.spec.policy_types.get_or_insert_default().retain(|t| *t != PolicyType::Ingress);
            }
        }
        if !policy.spec.policy_types.as_ref().is_some_and(Vec::is_empty) {
            kept.push(serde_saphyr::to_string(&policy)?);
        }
    }
    Ok(kept.join("---\n"))
}

fn example(file: &str) -> Result<String> {
    let path = testbed::workspace_root().join("manifests/examples").join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

pub fn run() -> Result<()> {
    run_observed(|_| Ok(()), |_, ()| Ok(()))
}

/// The demo, with `watch` called once its agent runs (before the rollout)
/// and `after` at the end while the agent still runs: how
/// `tests/lab/tests/monitoring.rs` has a real Prometheus scrape it.
pub fn run_observed<W>(
    watch: impl FnOnce(&Topology) -> Result<W>,
    after: impl FnOnce(&Topology, W) -> Result<()>,
) -> Result<()> {
    testbed::catch_interrupts();
    println!("{BOLD}Bulkhead demo{RESET}: a shop in network namespaces, enforced by the agent and its eBPF datapath\n");
    let mut topology = Topology::new("demo", 190);
    let mut cluster = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: intruder}\n");
    for (ns, name, app, port) in PODS {
        let pod = topology.add_pod(name);
        topology.serve(name, &[&format!("{port}/TCP")]);
        cluster.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: \"{uid}\", labels: {{app: {app}}}}}\nspec:\n  nodeName: demo-node\n  containers: [{{name: main, image: {app}, ports: [{{name: http, containerPort: {port}}}]}}]\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n",
            uid = pod.uid,
            ip = pod.ipv4
        ));
        println!("  pod {ns}/{name:<16} {}  serving TCP {port}", pod.ipv4);
    }
    let outside = topology.add_pod("outside");
    topology.serve("outside", &["443/TCP"]);
    println!("  outside host          {}  serving TCP 443", outside.ipv4);

    let folder = std::env::temp_dir().join("bulkhead-demo-objects");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder)?;
    let _ = Datapath::unpin_all(PIN_DIR);
    let mut demo = Demo { topology, folder, agent: None, events_shown: 0 };
    demo.put("cluster.yaml", &cluster)?;

    println!(
        "\n{BOLD}1. The agent follows {} (its embedded default: a folder of manifests){RESET}",
        demo.folder.display()
    );
    println!("   with the example policies of manifests/examples: payment-service only from api-gateway on TCP 8080, postgres only from payment-service, api-gateway only from frontend");
    for file in ["payment-from-gateway.yaml", "postgres-from-payment.yaml", "gateway-from-frontend.yaml"] {
        demo.put(file, &example(file)?)?;
    }
    let agent = demo
        .topology
        .spawn_agent(
            "demo-node",
            PIN_DIR,
            &demo.folder,
            // Baselines learned in the first seconds: what comes later is an anomaly.
            &["--egress-learning-seconds", "5"],
            ("bulkhead-demo-agent.log", "warn,netlink_packet_route=error"),
        )
        .context("starting the agent")?;
    demo.agent = Some(agent);
    demo.enforced()?;
    let watching = watch(&demo.topology)?;
    demo.table("Verdicts of real connection attempts")?;
    demo.counters_and_log()?;

    let folder = demo.folder.display().to_string();
    let state = demo.topology.state_dir("demo-node").display().to_string();
    println!("\n{BOLD}2. Default-deny for namespace shop, in Audit first{RESET}");
    command(&["rollout", "plan", "shop", "--dns-selector", "", "--into", &folder])?;
    demo.enforced()?;
    demo.table("Verdicts with bulkhead-default-deny in Audit: nothing changes")?;
    demo.counters_and_log()?;

    println!(
        "\n{BOLD}3. What it would have refused, from the node's audit flows, and the policies that allow it{RESET}"
    );
    // The flows reach the state directory within 2 s of the verdicts.
    std::thread::sleep(Duration::from_millis(2500));
    command(&["rollout", "report", "shop", "--state-dir", &state])?;
    let proposal = String::from_utf8(
        std::process::Command::new(testbed::product_binary())
            .args(["rollout", "report", "shop", "--state-dir", &state, "-o", "yaml"])
            .output()?
            .stdout,
    )?;
    let kept = without_peers_in(&proposal, "intruder")?;
    println!("\n{BOLD}4. The proposal applied, all but what came from namespace intruder{RESET} {DIM}(allowed.yaml into the folder){RESET}");
    // Newer than every flow so far: `enforce` judges what is seen after it.
    std::thread::sleep(Duration::from_millis(1100));
    demo.put("allowed.yaml", &kept)?;
    demo.enforced()?;
    demo.table("Verdicts with the allowances: the wanted traffic runs again, and is allowed")?;

    println!("\n{BOLD}5. Enforce? Not while a connection seen since the change would be refused{RESET}");
    std::thread::sleep(Duration::from_millis(2500));
    let enforce = ["rollout", "enforce", "shop", "--dir", &folder, "--state-dir", &state];
    if command_status(&enforce)? {
        bail!("enforce switched although intruder's connection to frontend was seen after the change");
    }
    println!("\n{BOLD}6. That one is the connection to refuse: Enforce with --force{RESET}");
    command(&[&enforce[..], &["--force"]].concat())?;
    demo.enforced()?;
    demo.table("Verdicts with bulkhead-default-deny enforced")?;
    demo.counters_and_log()?;
    after(&demo.topology, watching)?;
    println!("\n{DIM}cleaning up: the agent, namespaces, links, cgroups and pins{RESET}");
    Ok(())
}
