//! The agent in dir mode, as a real process in a node namespace, following a
//! folder of manifests: verdicts follow file edits, counters and events reach
//! /metrics and the log, an invalid edit changes nothing, a killed agent's
//! enforcement stays and its successor adopts it, and a deleted pod loses its
//! programs. Also the probe runner over every scenario directory.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bulkhead::dataplane::Datapath;
use bulkhead_lab::testbed::{eventually, metric, Topology, AGENT_ADDRESS as METRICS};

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-test-agent";

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(topology: &Topology, folder: &Path, log: &Path) -> Self {
        Self::start_with(topology, folder, log, PIN_DIR, &[])
    }

    fn start_with(topology: &Topology, folder: &Path, log: &Path, pin_dir: &str, extra: &[&str]) -> Self {
        let child = topology
            .node_command(bulkhead_lab::testbed::product_binary())
            .args(topology.agent_args("node-a", pin_dir, folder))
            .args(extra)
            .arg("--log-format=json")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log: log.to_path_buf() }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cleanup(PathBuf, &'static str);

/// An empty folder of objects under the temp directory, and no pins under
/// `pin_dir`; both removed again when the returned guard drops.
fn fresh_folder(name: &str, pin_dir: &'static str) -> (PathBuf, Cleanup) {
    let folder = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let _ = Datapath::unpin_all(pin_dir);
    (folder.clone(), Cleanup(folder, pin_dir))
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(self.1);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn get(topology: &Topology, path: &str) -> (u16, String) {
    topology.node_http_get(METRICS, path).unwrap_or((0, String::new()))
}

fn pod_yaml(name: &str, app: &str, uid: &str, ip: &str, port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: \"{uid}\", labels: {{app: {app}}}}}\nspec:\n  nodeName: node-a\n  containers: [{{name: c, ports: [{{containerPort: {port}}}]}}]\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n"
    )
}

const DB_FROM_API: &str = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: db-from-api, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: api}}}]\n      ports: [{protocol: TCP, port: 5432}]\n";

fn write(path: &Path, text: &str) {
    bulkhead_lab::testbed::write_atomically(path, text).unwrap();
}

#[test]
fn the_agent_enforces_a_folder_and_follows_its_edits() {
    assert!(common::require_root(), "not root");
    let (folder, _cleanup) = fresh_folder("bulkhead-test-agent-objects", PIN_DIR);
    let log = folder.join("agent.log.txt");

    let mut topology = Topology::new("agt", 181);
    let frontend = topology.add_pod("frontend");
    let api = topology.add_pod("api");
    let db = topology.add_pod("db");
    let late = topology.add_pod("late");
    topology.serve("db", &["5432/TCP"]);
    topology.serve("late", &["5432/TCP"]);
    topology.serve("api", &["8080/TCP"]);
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string();
    for (pod, app, port) in [(&frontend, "frontend", 80), (&api, "api", 8080), (&db, "db", 5432)] {
        cluster.push_str(&pod_yaml(&pod.name, app, &pod.uid, &pod.ipv4.to_string(), port));
    }
    write(&folder.join("cluster.yaml"), &cluster);
    write(&folder.join("db-from-api.yaml"), DB_FROM_API);

    let agent = Agent::start(&topology, &folder, &log);
    eventually("the agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    assert_eq!(get(&topology, "/healthz").0, 200);
    let state = get(&topology, "/debug/state").1;
    assert!(state.contains("shop/db") && state.contains(&db.host_interface), "{state}");

    let blocked = "bulkhead_blocked_connections_total{direction=\"ingress\",namespace=\"shop\",pod=\"db\",policy=\"shop/db-from-api\"}";
    // The counter is there at 0 from the moment the policy is programmed, for
    // the direction it governs only.
    let metrics = get(&topology, "/metrics").1;
    assert_eq!(metric(&metrics, blocked), Some(0.0), "{metrics}");
    assert_eq!(metric(&metrics, &blocked.replace("ingress", "egress")), None, "{metrics}");
    // Coverage: db is isolated for ingress, frontend and api are open.
    let endpoints = |isolation: &str| format!("bulkhead_endpoints{{isolation=\"{isolation}\",namespace=\"shop\"}}");
    assert_eq!(metric(&metrics, &endpoints("ingress")), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, &endpoints("none")), Some(2.0), "{metrics}");
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "deny");
    eventually("the refused connection is counted once", Duration::from_secs(5), || {
        metric(&get(&topology, "/metrics").1, blocked) == Some(1.0)
    });
    eventually("the deny is logged with its policy", Duration::from_secs(5), || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("connection denied") && l.contains("shop/db-from-api") && l.contains("shop/frontend"))
    });
    let metrics = get(&topology, "/metrics").1;
    assert!(metric(&metrics, "bulkhead_policy_convergence_seconds_count").is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        metric(&metrics, "bulkhead_dropped_packets_total{direction=\"ingress\",reason=\"policy_denied\"}")
            .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // The socket hook: the pod's cgroup was found by its uid.
    let egress = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: frontend-egress, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: frontend}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: api}}}]\n";
    write(&folder.join("frontend-egress.yaml"), egress);
    eventually("frontend's egress is limited, at connect()", Duration::from_secs(5), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "eperm"
    });
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow");
    let metrics = get(&topology, "/metrics").1;
    assert_eq!(metric(&metrics, &endpoints("egress")), Some(1.0), "frontend's egress is isolated now: {metrics}");
    assert_eq!(metric(&metrics, &endpoints("none")), Some(1.0), "{metrics}");

    // An invalid edit is rejected, named, and changes nothing.
    write(&folder.join("db-from-api.yaml"), &DB_FROM_API.replace("port: 5432", "port: 5432, endPort: 10"));
    eventually("the rejection is reported", Duration::from_secs(5), || {
        get(&topology, "/debug/state").1.contains("endPort")
    });
    assert!(agent.log().contains("policy rejected"), "{}", agent.log());
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow", "the last good version stays enforced");

    // A policy gone takes its counters with it.
    let frontend_egress = "bulkhead_blocked_connections_total{direction=\"egress\",namespace=\"shop\",pod=\"frontend\",policy=\"shop/frontend-egress\"}";
    assert!(metric(&get(&topology, "/metrics").1, frontend_egress).is_some());
    std::fs::remove_file(folder.join("frontend-egress.yaml")).unwrap();
    eventually("frontend-egress's counters go with it", Duration::from_secs(5), || {
        metric(&get(&topology, "/metrics").1, frontend_egress).is_none()
    });
    write(&folder.join("frontend-egress.yaml"), egress);
    eventually("frontend's egress is limited again", Duration::from_secs(5), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "eperm"
    });

    // A pod that arrives while the agent runs is enforced from its first
    // reconcile: its programs go on while its allowlist compiles, behind an
    // entry that the real one replaces.
    assert!(!link_pins().iter().any(|p| p.starts_with(&late.host_interface)), "late is not in the folder yet");
    cluster.push_str(&pod_yaml(&late.name, "db", &late.uid, &late.ipv4.to_string(), 5432));
    write(&folder.join("cluster.yaml"), &cluster);
    eventually("late, selected by db-from-api, refuses db", Duration::from_secs(5), || {
        topology.probe("db", "TCP", late.ipv4, 5432) == "deny"
    });
    assert_eq!(topology.probe("api", "TCP", late.ipv4, 5432), "allow");
    let datapath = Datapath::load(PIN_DIR).unwrap();
    let late_ifindex = topology.node_ifindex(&late.host_interface);
    assert!(datapath.endpoint(late_ifindex).is_some_and(|entry| !entry.is_pending()), "late's entry is its real one");
    drop(datapath);

    // Killed, the agent leaves enforcement in place; its successor adopts it.
    agent.kill();
    write(&folder.join("db-from-api.yaml"), DB_FROM_API);
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow");
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "eperm", "still enforced with no agent running");
    let agent = Agent::start(&topology, &folder, &log);
    eventually("the new agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");

    // Edits after the restart take effect: db closed to api too.
    write(&folder.join("db-from-api.yaml"), &DB_FROM_API.replace("app: api}", "app: nobody}"));
    eventually("api is refused by db", Duration::from_secs(5), || {
        topology.probe("api", "TCP", db.ipv4, 5432) == "deny"
    });

    // A pod deleted from the folder loses its programs and pins.
    write(
        &folder.join("cluster.yaml"),
        &cluster.replace(&pod_yaml(&db.name, "db", &db.uid, &db.ipv4.to_string(), 5432), ""),
    );
    eventually("db is no longer enforced", Duration::from_secs(5), || {
        let state: serde_json::Value = serde_json::from_str(&get(&topology, "/debug/state").1).unwrap_or_default();
        state["endpoints"].is_object() && state["endpoints"].get("shop/db").is_none()
    });
    let pins = link_pins();
    assert!(!pins.iter().any(|p| p.starts_with(&db.host_interface)), "{pins:?}");
    assert!(pins.iter().any(|p| p.starts_with(&api.host_interface)), "{pins:?}");

    // A pod deleted while no agent ran: its veth and cgroup are gone, and
    // the next agent sweeps the links and entries it left.
    agent.kill();
    let ifindex = topology.node_ifindex(&frontend.host_interface);
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&frontend.cgroup).unwrap());
    let frontend_pins = |pins: &[String]| -> Vec<String> {
        let cgroup = format!("pod{}", frontend.uid);
        pins.iter().filter(|p| p.starts_with(&frontend.host_interface) || p.contains(&cgroup)).cloned().collect()
    };
    assert_eq!(
        frontend_pins(&link_pins()).len(),
        6,
        "frontend's two TC links and four socket hooks: {:?}",
        link_pins()
    );
    topology.delete_pod(&frontend.name);
    let without = |c: &str, pod: &bulkhead_lab::testbed::TestPod, app, port| {
        c.replace(&pod_yaml(&pod.name, app, &pod.uid, &pod.ipv4.to_string(), port), "")
    };
    write(&folder.join("cluster.yaml"), &without(&without(&cluster, &db, "db", 5432), &frontend, "frontend", 80));
    assert_eq!(frontend_pins(&link_pins()).len(), 6, "no agent ran: nothing swept yet");
    let agent = Agent::start(&topology, &folder, &log);
    eventually("the new agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    eventually("frontend's links are swept", Duration::from_secs(5), || frontend_pins(&link_pins()).is_empty());
    assert!(agent.log().contains("swept the datapath"), "{}", agent.log());
    let state = get(&topology, "/debug/state").1;
    assert!(
        state.contains("shop/api") && state.contains(&api.host_interface),
        "api, still here, stays enforced: {state}"
    );
    drop(agent);
    let datapath = Datapath::load(PIN_DIR).unwrap();
    assert!(!datapath.endpoint_ifindexes().contains(&ifindex), "frontend's endpoint entry");
    assert!(!datapath.cgroup_endpoint_ids().contains(&cgroup_id), "frontend's cgroup endpoint entry");
    let address = bulkhead_policy::state::address_key(frontend.ipv4);
    assert!(!datapath.local_addresses().contains(&address), "frontend's local address");
    assert!(datapath.local_addresses().contains(&bulkhead_policy::state::address_key(api.ipv4)), "api's stays");
}

fn link_pins() -> Vec<String> {
    std::fs::read_dir(Path::new(PIN_DIR).join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// With `--pod-interface-prefix`, a pod's veth gets its programs as the CNI
/// makes it, passing everything until the pod's address is known; a veth
/// that goes unclaimed takes them along, and other veths are left alone.
#[test]
fn veths_named_as_pods_get_their_programs_as_they_appear() {
    assert!(common::require_root(), "not root");
    const PINS: &str = "/sys/fs/bpf/bulkhead-test-ahead";
    let (folder, _cleanup) = fresh_folder("bulkhead-test-ahead-objects", PINS);
    let log = folder.join("agent.log.txt");

    let mut topology = Topology::new("ahd", 192);
    let api = topology.add_pod("api");
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string();
    cluster.push_str(&pod_yaml(&api.name, "api", &api.uid, &api.ipv4.to_string(), 8080));
    write(&folder.join("cluster.yaml"), &cluster);
    write(&folder.join("db-from-api.yaml"), &DB_FROM_API.replace("app: api}", "app: nobody}"));
    let agent = Agent::start_with(&topology, &folder, &log, PINS, &["--pod-interface-prefix=bhahd,cali"]);
    eventually("the agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);

    // The CNI wires db; kubelet has not reported it yet.
    let db = topology.add_pod("db");
    topology.serve("db", &["5432/TCP"]);
    let pins_of = |interface: &str| Datapath::interface_link_pins(PINS, interface).len();
    eventually("db's veth has both TC programs", Duration::from_secs(5), || pins_of(&db.host_interface) == 2);
    let pending = |ifindex: u32| Datapath::load(PINS).unwrap().endpoint(ifindex).map(|entry| entry.is_pending());
    let db_ifindex = topology.node_ifindex(&db.host_interface);
    assert_eq!(pending(db_ifindex), Some(true), "db's entry is the pending one");
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow", "a pending veth passes everything");

    // Reported, db is enforced on the programs it has.
    cluster.push_str(&pod_yaml(&db.name, "db", &db.uid, &db.ipv4.to_string(), 5432));
    write(&folder.join("cluster.yaml"), &cluster);
    eventually("db refuses api", Duration::from_secs(5), || topology.probe("api", "TCP", db.ipv4, 5432) == "deny");
    assert_eq!(pending(db_ifindex), Some(false), "db's entry is its real one");

    // A veth that goes before any pod claims it takes its programs and entry along.
    let gone = topology.add_pod("gone");
    eventually("gone's veth has both TC programs", Duration::from_secs(5), || pins_of(&gone.host_interface) == 2);
    let gone_ifindex = topology.node_ifindex(&gone.host_interface);
    assert_eq!(pending(gone_ifindex), Some(true));
    topology.delete_pod("gone");
    eventually("gone's pins are removed", Duration::from_secs(5), || pins_of(&gone.host_interface) == 0);
    assert_eq!(pending(gone_ifindex), None, "gone's entry is removed");

    // A veth named otherwise is not touched (events come in order: it was
    // seen before late's).
    topology.node_exec(&["ip", "link", "add", "othahd", "type", "veth", "peer", "name", "eth1", "netns", &db.netns]);
    let late = topology.add_pod("late");
    eventually("late's veth has both TC programs", Duration::from_secs(5), || pins_of(&late.host_interface) == 2);
    assert_eq!(pins_of("othahd"), 0);
    topology.node_exec(&["ip", "link", "del", "othahd"]);
    let complaints =
        |l: &&str| (l.contains("\"WARN\"") || l.contains("\"ERROR\"")) && (l.contains("veth") || l.contains("ahead"));
    assert!(agent.log().lines().filter(complaints).count() == 0, "{}", agent.log());
}

/// When the kernel drops announcements of the node's links (the agent's
/// netlink buffer overflowed), the agent lists the veths again: one that
/// went unannounced lets go of its programs, and one that came unannounced
/// gets them ahead of its pod.
#[test]
fn lost_link_announcements_are_made_good_by_a_resync() {
    assert!(common::require_root(), "not root");
    const PINS: &str = "/sys/fs/bpf/bulkhead-test-overrun";
    let (folder, _cleanup) = fresh_folder("bulkhead-test-overrun-objects", PINS);
    let log = folder.join("agent.log.txt");

    let mut topology = Topology::new("ovr", 193);
    write(&folder.join("cluster.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let agent = Agent::start_with(&topology, &folder, &log, PINS, &["--pod-interface-prefix=bhovr"]);
    eventually("the agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    let pins_of = |interface: &str| Datapath::interface_link_pins(PINS, interface).len();
    let early = topology.add_pod("early");
    eventually("early's veth has both TC programs", Duration::from_secs(5), || pins_of(&early.host_interface) == 2);
    let early_ifindex = topology.node_ifindex(&early.host_interface);

    // Stopped, the agent reads nothing: the announcements of a thousand veth
    // pairs (well over a megabyte) overflow its socket's buffer (208 KiB
    // here), and the kernel drops those of early's going and late's coming.
    let agent_pid = agent.child.id() as libc::pid_t;
    // SAFETY: signals to a child this test owns (and kills when it drops).
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGSTOP) }, 0, "stopping the agent");
    let pairs: String = (0..1000).map(|i| format!("link add ovrf{i} type veth peer name ovrg{i}\n")).collect();
    let mut ip = topology.node_command("ip").args(["-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut ip.stdin.take().unwrap(), pairs.as_bytes()).unwrap();
    assert!(ip.wait().unwrap().success(), "adding the veth pairs");
    let late = topology.add_pod("late");
    topology.delete_pod("early");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGCONT) }, 0, "resuming the agent");

    eventually("the agent resynchronises", Duration::from_secs(10), || {
        agent.log().contains("resynchronised the veths")
    });
    eventually("early's pins are removed", Duration::from_secs(5), || pins_of(&early.host_interface) == 0);
    let pending = |ifindex: u32| Datapath::load(PINS).unwrap().endpoint(ifindex).map(|entry| entry.is_pending());
    assert_eq!(pending(early_ifindex), None, "early's entry is removed");
    eventually("late's veth has both TC programs", Duration::from_secs(5), || pins_of(&late.host_interface) == 2);
    assert_eq!(pending(topology.node_ifindex(&late.host_interface)), Some(true), "late's entry is the pending one");
    let lost = metric(&get(&topology, "/metrics").1, "bulkhead_sync_errors_total{operation=\"link_events\"}");
    assert!(lost.is_some_and(|count| count >= 1.0), "lost announcements are counted: {lost:?}");
}

#[test]
fn the_probe_runner_passes_every_scenario_and_agrees_with_check() {
    assert!(common::require_root(), "not root");
    let scenarios = bulkhead_lab::testbed::workspace_root().join("tests/scenarios");
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(&scenarios).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();

    // A wrong expectation must be reported with what the datapath said.
    let wrong = std::env::temp_dir().join("bulkhead-test-wrong-expectation");
    let _ = std::fs::remove_dir_all(&wrong);
    std::fs::create_dir_all(&wrong).unwrap();
    let source = scenarios.join("default-deny-ingress");
    std::fs::copy(source.join("policies.yaml"), wrong.join("policies.yaml")).unwrap();
    // The copy names the shared cluster file by its full path.
    let shared = scenarios.join("../clusters/xyz.yaml");
    let expect = std::fs::read_to_string(source.join("expect.yaml"))
        .unwrap()
        .replace("cluster: ../../clusters/xyz.yaml", &format!("cluster: {}", shared.display()));
    let flipped = expect.replacen("\"expect\": \"deny\"", "\"expect\": \"allow\"", 1);
    assert_ne!(flipped, expect);
    std::fs::write(wrong.join("expect.yaml"), flipped).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-lab")).arg("probe").arg(&wrong).output().unwrap();
    let _ = std::fs::remove_dir_all(&wrong);
    assert!(!out.status.success(), "a failing probe fails the run");
    let report: serde_json::Value = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(report["failed"][0]["observed"], "deny");
    assert!(
        report["failed"][0]["policy"].as_str().is_some_and(|p| !p.is_empty()),
        "the datapath's policy is named: {report}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-lab")).arg("probe").args(&dirs).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), dirs.len());
    let check = Command::new(bulkhead_lab::testbed::product_binary()).arg("check").args(&dirs).output().unwrap();
    let checked: Vec<serde_json::Value> =
        String::from_utf8_lossy(&check.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (probed, checked) in reports.iter().zip(&checked) {
        assert_eq!(probed["scenario"], checked["scenario"]);
        assert_eq!(probed["probes"], checked["probes"], "{probed}");
        assert_eq!(probed["passed"], probed["probes"], "{probed}");
        assert_eq!(probed["disagreements_with_check"], 0, "{probed}");
    }
}

#[test]
fn egress_outside_the_learned_baseline_is_counted_once() {
    assert!(common::require_root(), "not root");
    const PINS: &str = "/sys/fs/bpf/bulkhead-test-anomaly";
    let (folder, _cleanup) = fresh_folder("bulkhead-test-anomaly-objects", PINS);
    let log = std::env::temp_dir().join("bulkhead-test-anomaly-agent.log");
    let _ = std::fs::remove_file(&log);

    let mut topology = Topology::new("anm", 184);
    let web = topology.add_pod("web");
    let db = topology.add_pod("db");
    let cache = topology.add_pod("cache");
    topology.serve("db", &["5432/TCP"]);
    topology.serve("cache", &["6379/TCP"]);
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string();
    for (pod, app, port) in [(&web, "web", 80), (&db, "db", 5432), (&cache, "cache", 6379)] {
        cluster.push_str(&pod_yaml(&pod.name, app, &pod.uid, &pod.ipv4.to_string(), port));
    }
    write(&folder.join("cluster.yaml"), &cluster);

    let learning = Duration::from_secs(4);
    let agent = Agent::start_with(&topology, &folder, &log, PINS, &["--egress-learning-seconds", "4"]);
    eventually("the agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    let learning_ends = Instant::now() + learning;
    // Learned: web talks to db.
    assert_eq!(topology.probe("web", "TCP", db.ipv4, 5432), "allow");
    std::thread::sleep(learning_ends.saturating_duration_since(Instant::now()) + Duration::from_millis(500));

    let anomalies = "bulkhead_egress_anomalies_total{namespace=\"shop\",workload=\"web\"}";
    assert_eq!(topology.probe("web", "TCP", db.ipv4, 5432), "allow");
    assert_eq!(topology.probe("web", "TCP", cache.ipv4, 6379), "allow");
    eventually("the new destination is one anomaly", Duration::from_secs(5), || {
        metric(&get(&topology, "/metrics").1, anomalies) == Some(1.0)
    });
    assert_eq!(topology.probe("web", "TCP", cache.ipv4, 6379), "allow");
    assert_eq!(topology.probe("web", "TCP", db.ipv4, 5432), "allow");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        metric(&get(&topology, "/metrics").1, anomalies),
        Some(1.0),
        "known destinations are not anomalies: {}",
        agent.log()
    );
    assert!(
        agent.log().contains("outside the workload's learned baseline") && agent.log().contains("shop/cache"),
        "{}",
        agent.log()
    );

    // Restarted, the agent neither learns again nor forgets: what web knew
    // stays known, and the next new destination is an anomaly at once.
    std::thread::sleep(Duration::from_millis(2500)); // a write of the state directory
    agent.kill();
    let agent = Agent::start_with(&topology, &folder, &log, PINS, &["--egress-learning-seconds", "4"]);
    eventually("the agent is ready again", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    assert_eq!(topology.probe("web", "TCP", db.ipv4, 5432), "allow");
    assert_eq!(topology.probe("web", "TCP", cache.ipv4, 6379), "allow");
    assert_ne!(topology.probe("web", "TCP", cache.ipv4, 6380), "allow", "nothing serves 6380");
    eventually("the new destination is an anomaly, the known ones not", Duration::from_secs(3), || {
        metric(&get(&topology, "/metrics").1, anomalies) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(metric(&get(&topology, "/metrics").1, anomalies), Some(1.0), "{}", agent.log());
    assert!(topology.state_dir("node-a").join("egress-baselines.json").exists());

    // The operator's edits, through the state directory: an allowed
    // destination is no anomaly; after a reset the workload learns again.
    let state = topology.state_dir("node-a").display().to_string();
    let baseline = |args: &[&str]| bulkhead(&[&["baseline"], args, &["--state-dir", &state]].concat());
    eventually("the baseline lists what web learned", Duration::from_secs(5), || {
        let (_, listed) = baseline(&["list", "-n", "shop"]);
        listed.contains("shop/web") && listed.contains("shop/cache:6380/TCP") && listed.contains("shop/db:5432/TCP")
    });
    let (ok, out) = baseline(&["allow", "web", "shop/cache:6381/TCP", "-n", "shop"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(600)); // the agent reads the edit
    assert_ne!(topology.probe("web", "TCP", cache.ipv4, 6381), "allow");
    let (ok, out) = baseline(&["reset", "web", "-n", "shop"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(600));
    assert_ne!(topology.probe("web", "TCP", cache.ipv4, 6382), "allow", "learned: the reset began learning again");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(metric(&get(&topology, "/metrics").1, anomalies), Some(1.0), "{}", agent.log());
    eventually("the reset forgot the rest", Duration::from_secs(5), || {
        let (_, listed) = baseline(&["list", "-n", "shop"]);
        listed.contains("shop/cache:6382/TCP") && !listed.contains("shop/db:5432/TCP")
    });
}

/// `bulkhead` run here (the CLI needs no root of its own): whether it
/// succeeded, and what it printed (its errors too when it failed).
fn bulkhead(args: &[&str]) -> (bool, String) {
    let output = Command::new(bulkhead_lab::testbed::product_binary()).args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        text.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    (output.status.success(), text)
}

/// The rollout loop in dir mode: plan (Audit), traffic, the audit flows on
/// the node's disk, `enforce` refusing while they are unexplained, `report`
/// proposing the policies that allow them, the operator keeping all but the
/// unwanted one, `enforce` switching, and then the wanted flows still allowed
/// and the unwanted one denied.
#[test]
fn a_default_deny_rollout_goes_from_audit_to_enforce() {
    assert!(common::require_root(), "not root");
    const PINS: &str = "/sys/fs/bpf/bulkhead-test-rollout";
    let (folder, _cleanup) = fresh_folder("bulkhead-test-rollout-objects", PINS);
    let log = std::env::temp_dir().join("bulkhead-test-rollout-agent.log");
    let _ = std::fs::remove_file(&log);

    let mut topology = Topology::new("rol", 185);
    let web = topology.add_pod("web");
    let api = topology.add_pod("api");
    let db = topology.add_pod("db");
    let intruder = topology.add_pod("intruder");
    topology.serve("api", &["8080/TCP"]);
    topology.serve("db", &["5432/TCP"]);
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string();
    for (pod, app, port) in [(&web, "web", 80), (&api, "api", 8080), (&db, "db", 5432), (&intruder, "intruder", 80)] {
        cluster.push_str(&pod_yaml(&pod.name, app, &pod.uid, &pod.ipv4.to_string(), port));
    }
    write(&folder.join("cluster.yaml"), &cluster);
    let state_dir = topology.state_dir("node-a");
    let state = state_dir.to_str().unwrap();
    let folder_arg = folder.to_str().unwrap();

    let agent = Agent::start_with(&topology, &folder, &log, PINS, &[]);
    eventually("the agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    let (ok, out) = bulkhead(&["rollout", "plan", "shop", "--dns-selector", "", "--into", folder_arg]);
    assert!(ok, "{out}");
    let audited = "bulkhead_audit_denied_connections_total{direction=\"ingress\",namespace=\"shop\",pod=\"api\",policy=\"shop/bulkhead-default-deny\"}";
    eventually("the Audit default-deny is programmed", Duration::from_secs(5), || {
        metric(&get(&topology, "/metrics").1, audited) == Some(0.0)
    });

    // Audit: everything still flows, and is recorded per workload.
    assert_eq!(topology.probe("web", "TCP", api.ipv4, 8080), "allow");
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");
    assert_eq!(topology.probe("intruder", "TCP", db.ipv4, 5432), "allow");
    eventually("the flows reach the state directory", Duration::from_secs(10), || {
        bulkhead(&["rollout", "report", "shop", "--state-dir", state, "-o", "json"]).1.matches("\"direction\"").count()
            == 6
    });
    // The same verdicts, live from the agent: `bulkhead flows`.
    let flows = |args: &[&str]| {
        let out = topology
            .node_command(bulkhead_lab::testbed::product_binary())
            .args(["flows", "--agent", METRICS])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let audits = flows(&["--pod", "intruder", "--verdict", "audit", "-o", "json"]);
    let audits: Vec<serde_json::Value> = audits.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!audits.is_empty(), "intruder's audited connection");
    assert!(
        audits.iter().all(|v| v["verdict"] == "audit"
            && v["policy"] == "shop/bulkhead-default-deny"
            && v.to_string().contains("shop/intruder")),
        "{audits:?}"
    );
    assert!(flows(&["--namespace", "kube-system"]).lines().count() == 1, "the header alone");

    let (ok, report) = bulkhead(&["rollout", "report", "shop", "--state-dir", state]);
    assert!(ok, "{report}");
    for row in ["shop/web", "shop/api", "shop/db", "shop/intruder", "5432/TCP", "shop/bulkhead-default-deny"] {
        assert!(report.contains(row), "{row} in\n{report}");
    }

    // The flows outlive the agent: its successor goes on counting them.
    let web_to_api = || -> u64 {
        let report: serde_json::Value =
            serde_json::from_str(&bulkhead(&["rollout", "report", "shop", "--state-dir", state, "-o", "json"]).1)
                .unwrap();
        let flows = report["flows"].as_array().unwrap().clone();
        flows
            .iter()
            .find(|f| f["direction"] == "ingress" && f["destination"]["workload"]["name"] == "api")
            .map(|f| f["count"].as_u64().unwrap())
            .unwrap_or(0)
    };
    let counted = web_to_api();
    assert!(counted >= 1, "{report}");
    agent.kill();
    let agent = Agent::start_with(&topology, &folder, &log, PINS, &[]);
    eventually("the new agent is ready", Duration::from_secs(20), || get(&topology, "/readyz").0 == 200);
    assert_eq!(topology.probe("web", "TCP", api.ipv4, 8080), "allow");
    eventually("web -> api counted on from where it was", Duration::from_secs(10), || web_to_api() > counted);

    // Not yet: every one of those would be denied.
    let enforce = ["rollout", "enforce", "shop", "--dir", folder_arg, "--state-dir", state];
    let (ok, refusal) = bulkhead(&enforce);
    assert!(!ok, "{refusal}");
    assert!(refusal.contains("6 connection(s)") && refusal.contains("shop/intruder"), "{refusal}");
    let plan = std::fs::read_to_string(folder.join("bulkhead-rollout-shop.yaml")).unwrap();
    assert!(plan.contains("mode: Audit"), "refused, nothing switched: {plan}");

    // The operator takes the proposal but for intruder's access to db.
    let (ok, proposal) = bulkhead(&["rollout", "report", "shop", "--state-dir", state, "-o", "yaml"]);
    assert!(ok, "{proposal}");
    let documents: Vec<&str> = proposal.split("---\n").collect();
    let names: Vec<String> = documents
        .iter()
        .map(|d| {
            serde_saphyr::from_str::<serde_json::Value>(d).unwrap()["metadata"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(names, ["allow-api", "allow-db", "allow-intruder", "allow-web"], "{proposal}");
    let allow_db = documents[1];
    assert!(allow_db.contains("app: api") && allow_db.contains("app: intruder"), "{allow_db}");
    let kept = [documents[0], &allow_db.replace("app: intruder", "app: nobody"), documents[3]].join("---\n");
    std::thread::sleep(Duration::from_millis(1100)); // the change is newer than every flow so far
    write(&folder.join("allowed.yaml"), &kept);
    eventually("the allowances are programmed", Duration::from_secs(5), || {
        get(&topology, "/debug/state").1.contains("shop/allow-db")
    });

    // The wanted traffic again: allowed by the new policies, no audit
    // verdict since the change, so the switch goes through.
    assert_eq!(topology.probe("web", "TCP", api.ipv4, 8080), "allow");
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");
    eventually("web's new egress flow, allowed, in bulkhead flows", Duration::from_secs(5), || {
        let allows = flows(&["--namespace", "shop", "--verdict", "allow"]);
        allows.lines().any(|l| l.contains("ALLOW") && l.contains("shop/web"))
    });
    std::thread::sleep(Duration::from_millis(2500)); // a write of the state directory
    let (ok, out) = bulkhead(&enforce);
    assert!(ok, "{out}");
    let plan = std::fs::read_to_string(folder.join("bulkhead-rollout-shop.yaml")).unwrap();
    assert!(plan.contains("mode: Enforce"), "{plan}");
    eventually("intruder is refused by db", Duration::from_secs(5), || {
        topology.probe("intruder", "TCP", db.ipv4, 5432) == "eperm"
    });
    assert_eq!(topology.probe("web", "TCP", api.ipv4, 8080), "allow", "nothing wanted broke");
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow", "nothing wanted broke");

    // Following: a refusal made after `bulkhead flows --follow` started arrives.
    let mut follower = topology
        .node_command(bulkhead_lab::testbed::product_binary())
        .args(["flows", "--agent", METRICS, "--follow", "--verdict", "deny", "--pod", "intruder", "-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    // What was refused before comes first; then only the new one.
    std::thread::sleep(Duration::from_millis(1000));
    let earlier: Vec<String> = received.try_iter().collect();
    // (A refusal is reported once per connection and policy revision: a new one.)
    assert_eq!(topology.probe("intruder", "TCP", api.ipv4, 8080), "eperm");
    let new = received.recv_timeout(Duration::from_secs(5));
    let _ = follower.kill();
    let _ = follower.wait();
    let new: serde_json::Value = serde_json::from_str(&new.expect("the new refusal, followed")).unwrap();
    assert_eq!((new["verdict"].as_str(), new["hook"].as_str()), (Some("deny"), Some("connect")), "{new}");
    assert!(earlier.iter().all(|l| !l.contains(&format!("\"seq\":{}", new["seq"]))), "{earlier:?}");
    drop(agent);
}
