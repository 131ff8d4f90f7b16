//! The agent finds a pod's host-side veth whatever wired it: a veth the
//! node routes the pod's address to (ptp, Calico), or a veth that is a port
//! of a bridge the node routes the whole subnet to (bridge, flannel), where
//! an agent that only followed routes found nothing and let denied traffic
//! through. And a local pod it cannot enforce is loud: a WARN, the
//! `bulkhead_endpoints_unenforced` gauge, and `/readyz`.

mod common;

use std::{process::Stdio, time::Duration};

use bulkhead::dataplane::Datapath;
use bulkhead_lab::testbed::{self, eventually, metric, Process, Topology, AGENT_ADDRESS};

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-test-shapes";

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(PIN_DIR);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod_yaml(name: &str, uid: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shapes, uid: \"{uid}\", labels: {{app: {name}}}}}\nspec: {{nodeName: shapes-node, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n"
    )
}

#[test]
fn bridged_and_routed_pods_are_enforced_and_an_unwired_one_is_loud() {
    assert!(common::require_root(), "not root");
    let folder = std::env::temp_dir().join("bulkhead-test-shapes-objects");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let _cleanup = Cleanup(folder.clone());
    let _ = Datapath::unpin_all(PIN_DIR);

    let mut topology = Topology::new("shp", 189);
    let routed = topology.add_pod("routed-client");
    let bridged_client = topology.add_bridged_pod("bridged-client");
    let server = topology.add_bridged_pod("bridged-server");
    topology.serve("bridged-server", &["80/TCP"]);
    let mut cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shapes}\n".to_string();
    for pod in [&routed, &bridged_client, &server] {
        cluster.push_str(&pod_yaml(&pod.name, &pod.uid, &pod.ipv4.to_string()));
    }
    // A pod the API server knows, on this node, that no CNI wired.
    cluster.push_str(&pod_yaml("unwired", "unwired-uid", "10.189.9.9"));
    testbed::write_atomically(&folder.join("cluster.yaml"), &cluster).unwrap();
    let policy = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: server-from-routed, namespace: shapes}\nspec:\n  podSelector: {matchLabels: {app: bridged-server}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: routed-client}}}]\n      ports: [{protocol: TCP, port: 80}]\n";
    testbed::write_atomically(&folder.join("policy.yaml"), policy).unwrap();
    assert_eq!(topology.probe("bridged-client", "TCP", server.ipv4, 80), "allow", "before the agent");

    let log = folder.join("agent.log");
    let _agent = Process(
        topology
            .node_command(testbed::product_binary())
            .args(topology.agent_args("shapes-node", PIN_DIR, &folder))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the three wired pods are enforced", Duration::from_secs(20), || {
        topology.agent_state()["endpoints"].as_object().is_some_and(|e| e.len() == 3)
    });
    let state = topology.agent_state();
    assert_eq!(state["endpoints"]["shapes/bridged-server"], server.host_interface.as_str(), "{state}");
    assert_eq!(state["endpoints"]["shapes/routed-client"], routed.host_interface.as_str(), "{state}");

    // Across the bridge: refused; from the routed pod: allowed.
    assert_eq!(topology.probe("bridged-client", "TCP", server.ipv4, 80), "deny");
    assert_eq!(topology.probe("routed-client", "TCP", server.ipv4, 80), "allow");

    // The unwired pod: quiet for the grace, then loud.
    eventually("the unwired pod is reported", Duration::from_secs(15), || {
        metric(&topology.agent_get("/metrics").unwrap_or_default(), "bulkhead_endpoints_unenforced ") == Some(1.0)
    });
    let (status, body) = topology.node_http_get(AGENT_ADDRESS, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shapes/unwired") && body.contains("no route to 10.189.9.9"), "{body}");
    assert!(agent_log().contains("local pod not enforced after 5 s"), "{}", agent_log());
    assert!(topology.agent_state()["waiting"]["shapes/unwired"].as_str().is_some_and(|w| w.contains("10.189.9.9")));

    // Deleted from the cluster, it no longer holds readiness back.
    testbed::write_atomically(
        &folder.join("cluster.yaml"),
        &cluster.replace(&pod_yaml("unwired", "unwired-uid", "10.189.9.9"), ""),
    )
    .unwrap();
    eventually("ready again", Duration::from_secs(10), || {
        topology.node_http_get(AGENT_ADDRESS, "/readyz").is_ok_and(|(status, _)| status == 200)
    });
}
