//! The install as an operator does it, against a real API server: the
//! README's `kubectl apply -f manifests/install.yaml` on an empty cluster
//! creates every object in one go, `kubectl delete -f` removes them; and the
//! controller, run as two replicas with its service account, elects one
//! leader that alone writes status, a successor within the lease when the
//! leader is killed, and steps down cleanly on SIGTERM.

mod common;

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use bulkhead::controller::leader::LEASE_DURATION;
use bulkhead_lab::testbed::{
    self,
    apiserver::{refusals, ControlPlane},
    eventually, metric, Process, Topology,
};

fn install_documents() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(testbed::workspace_root().join("manifests/install.yaml")).unwrap();
    serde_saphyr::from_multiple(&text).unwrap()
}

fn exists(plane: &ControlPlane, document: &serde_json::Value) -> bool {
    let kind = document["kind"].as_str().unwrap();
    let name = document["metadata"]["name"].as_str().unwrap();
    let group = document["apiVersion"].as_str().unwrap().split_once('/').map(|(g, _)| g).unwrap_or("");
    let resource = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
    let mut args = vec!["get", resource.as_str(), name];
    if let Some(namespace) = document["metadata"]["namespace"].as_str() {
        args.extend(["-n", namespace]);
    }
    plane.kubectl(&args).status.success()
}

#[test]
fn the_readme_install_creates_everything_and_delete_removes_it() {
    assert!(common::require_root(), "not root");
    let topology = Topology::new("ins", 187);
    let plane = ControlPlane::start(&topology.node_netns, "ins");
    plane.install_bulkhead();
    let documents = install_documents();
    assert!(documents.len() >= 15, "install.yaml has {} objects", documents.len());
    for document in &documents {
        let gap = document["kind"] == "PodDisruptionBudget" && document["apiVersion"] == "policy/v1";
        assert_eq!(exists(&plane, document), !gap, "{} {}", document["kind"], document["metadata"]["name"]);
    }
    let namespace = plane.json(&["get", "namespace", "bulkhead-system"]);
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");

    let install = testbed::workspace_root().join("manifests/install.yaml").display().to_string();
    // README: where another implementation installed the upstream
    // ClusterNetworkPolicy CRD, a selector leaves ours out.
    let out = plane.kubectl(&["apply", "-f", &install, "-l", "bulkhead.io/upstream-crd!=true", "-o", "name"]);
    let (applied, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(refusals(&stderr).is_empty(), "{stderr}");
    assert!(applied.contains("connectionpolicies.bulkhead.io"), "{applied}");
    assert!(applied.contains("daemonset.apps/bulkhead-agent"), "{applied}");
    assert!(!applied.contains("clusternetworkpolicies.policy.networking.k8s.io"), "{applied}");
    let out = plane.kubectl(&["delete", "-f", &install, "--wait=false"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(refusals(&stderr).is_empty(), "{stderr}");
    eventually("every object is gone", Duration::from_secs(60), || !documents.iter().any(|d| exists(&plane, d)));
}

const POLICY: &str = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: NAME, namespace: default}\nspec:\n  podSelector: {}\n  ingress: []\n";

fn controller(topology: &Topology, plane: &ControlPlane, name: &str, port: u16) -> Process {
    let log = std::fs::File::create(plane.dir.join(format!("{name}.log"))).unwrap();
    let child = plane
        .command_as("controller", testbed::product_binary())
        .args(["controller", "--namespace", "bulkhead-system", "--identity", name])
        .arg(format!("--metrics-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _ = topology;
    Process(child)
}

fn metrics(topology: &Topology, port: u16) -> String {
    topology.node_http_get(&format!("127.0.0.1:{port}"), "/metrics").map(|(_, body)| body).unwrap_or_default()
}

fn leading(topology: &Topology, port: u16) -> Option<bool> {
    metric(&metrics(topology, port), "bulkhead_controller_leader ").map(|v| v == 1.0)
}

fn accepted(plane: &ControlPlane, name: &str) -> bool {
    let policy = plane.json(&["get", "connectionpolicy", name, "-n", "default"]);
    policy["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Accepted" && c["status"] == "True"))
}

#[test]
fn two_controllers_elect_one_writer_and_the_other_takes_over() {
    assert!(common::require_root(), "not root");
    let topology = Topology::new("led", 188);
    let plane = ControlPlane::start(&topology.node_netns, "led");
    plane.install_bulkhead();
    let ports = [19466u16, 29466];
    let mut replicas: Vec<Option<Process>> = vec![
        Some(controller(&topology, &plane, "controller-a", ports[0])),
        Some(controller(&topology, &plane, "controller-b", ports[1])),
    ];

    eventually("exactly one replica leads", Duration::from_secs(30), || {
        let states: Vec<Option<bool>> = ports.iter().map(|p| leading(&topology, *p)).collect();
        states.iter().all(Option::is_some) && states.iter().filter(|s| **s == Some(true)).count() == 1
    });
    let leader = if leading(&topology, ports[0]) == Some(true) { 0 } else { 1 };
    let follower = 1 - leader;
    plane.apply(&POLICY.replace("NAME", "first"));
    eventually("the leader writes the first status", Duration::from_secs(20), || accepted(&plane, "first"));
    let writes =
        |port: u16| metric(&metrics(&topology, port), "bulkhead_controller_status_writes_total ").unwrap_or(0.0);
    assert!(writes(ports[leader]) >= 1.0);
    assert_eq!(writes(ports[follower]), 0.0, "the follower writes nothing");
    assert_eq!(leading(&topology, ports[follower]), Some(false));

    // The leader dies without a word (SIGKILL): the lease runs out and the follower takes it.
    drop(replicas[leader].take());
    let killed = Instant::now();
    eventually("the follower leads", LEASE_DURATION + Duration::from_secs(10), || {
        leading(&topology, ports[follower]) == Some(true)
    });
    let takeover = killed.elapsed();
    println!(
        "takeover {:.1} s after the leader was killed (lease {} s)",
        takeover.as_secs_f64(),
        LEASE_DURATION.as_secs()
    );
    assert!(takeover <= LEASE_DURATION + Duration::from_secs(1), "takeover took {takeover:?}");
    plane.apply(&POLICY.replace("NAME", "second"));
    eventually("the new leader writes", Duration::from_secs(20), || accepted(&plane, "second"));

    // SIGTERM: a clean exit, and the lease is freed at once.
    let status = replicas[follower].as_mut().unwrap().terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "exit on SIGTERM: {status:?}");
    let lease = plane.json(&["get", "lease", "bulkhead-controller", "-n", "bulkhead-system"]);
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(holder.is_empty(), "the lease is released on SIGTERM, yet held by {holder:?}");
}
