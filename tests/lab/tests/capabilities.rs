//! The agent DaemonSet's capability set, measured rather than guessed: the
//! agent runs, as uid 0 whose capabilities are cut down to exactly those the
//! manifest adds (as a container runtime does with `drop: [ALL]`), and must
//! load, attach to a pod's veth and cgroup, and enforce; then once without
//! each of them, and must fail. So the set in manifests/deploy/agent.yaml
//! is both enough and the least.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use bulkhead::dataplane::Datapath;
use bulkhead_lab::testbed::{self, eventually, Topology};

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-test-caps";

/// The capabilities the agent container adds, as the manifest says.
fn manifest_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(testbed::workspace_root().join("manifests/deploy/agent.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let daemonset = documents.iter().find(|d| d["kind"] == "DaemonSet").expect("the agent DaemonSet");
    let security = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    serde_json::from_value(security["capabilities"]["add"].clone()).unwrap()
}

struct Run {
    child: Child,
    log: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Datapath::unpin_all(PIN_DIR);
    }
}

/// The agent with only `capabilities` (and uid 0), on `folder`.
fn agent_with(topology: &Topology, folder: &Path, capabilities: &[String], log_name: &str) -> Run {
    let _ = Datapath::unpin_all(PIN_DIR);
    let bounding: Vec<String> = capabilities.iter().map(|c| format!("+{}", c.to_lowercase())).collect();
    let log = std::env::temp_dir().join(log_name);
    let child = topology
        .node_command("setpriv")
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(testbed::product_binary())
        .args(topology.agent_args("caps-node", PIN_DIR, folder))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Run { child, log }
}

/// Ready, with both pods attached (veth and cgroup).
fn enforcing(topology: &Topology) -> bool {
    let state = topology.agent_state();
    state["ready"] == true && state["endpoints"].as_object().is_some_and(|e| e.len() == 2)
}

#[test]
fn the_manifests_capabilities_are_enough_and_each_is_needed() {
    assert!(common::require_root(), "not root");
    let capabilities = manifest_capabilities();
    assert!(!capabilities.is_empty());

    let mut topology = Topology::new("cap", 186);
    let client = topology.add_pod("client");
    let server = topology.add_pod("server");
    topology.serve("server", &["80/TCP"]);
    let folder = std::env::temp_dir().join("bulkhead-test-caps-objects");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: caps}\n".to_string();
    for pod in [&client, &server] {
        cluster.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: caps, uid: \"{uid}\", labels: {{app: {name}}}}}\nspec: {{nodeName: caps-node, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n",
            name = pod.name,
            uid = pod.uid,
            ip = pod.ipv4
        ));
    }
    testbed::write_atomically(&folder.join("cluster.yaml"), &cluster).unwrap();
    // The client may open nothing: its connect() is refused by the cgroup hook.
    let isolate = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: client-no-egress, namespace: caps}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n";
    testbed::write_atomically(&folder.join("policy.yaml"), isolate).unwrap();

    // With exactly the manifest's set: loads, attaches, enforces at both hooks.
    assert_eq!(topology.probe("client", "TCP", server.ipv4, 80), "allow", "before the agent");
    {
        let run = agent_with(&topology, &folder, &capabilities, "bulkhead-test-caps-all.log");
        let log = || std::fs::read_to_string(&run.log).unwrap_or_default();
        let mut waited = 0;
        while !enforcing(&topology) {
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
            assert!(waited < 300, "with {capabilities:?} the agent does not enforce; its log:\n{}", log());
        }
        assert_eq!(topology.probe("client", "TCP", server.ipv4, 80), "eperm", "the cgroup hook refuses connect()");
        // A raw-socket probe bypasses connect(); TC on the veth drops it.
        assert_eq!(topology.ping("client", server.ipv4), "deny", "TC drops what the socket hook does not see");
    }

    // Without any one of them, it does not get there.
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities.iter().filter(|c| *c != missing).cloned().collect();
        let run = agent_with(&topology, &folder, &fewer, &format!("bulkhead-test-caps-no-{missing}.log"));
        std::thread::sleep(Duration::from_secs(8));
        let exited = run_exited(&run);
        assert!(
            exited || !enforcing(&topology),
            "without {missing} the agent still enforces: the manifest adds a capability it does not need"
        );
        drop(run);
    }
    eventually("the client is free again once the datapath is gone", Duration::from_secs(5), || {
        topology.probe("client", "TCP", server.ipv4, 80) == "allow"
    });
    let _ = std::fs::remove_dir_all(&folder);
}

fn run_exited(run: &Run) -> bool {
    // SAFETY: waitpid with WNOHANG on our own child; it only reads its state.
    let mut status = 0;
    let pid = run.child.id() as libc::pid_t;
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}
