//! Kubernetes mode against a real kube-apiserver and etcd: the agent and the
//! controller authenticate as service accounts bound only by
//! manifests/deploy/rbac.yaml. Pods are created and their status patched as a
//! kubelet would, each mapped to a network-namespace pod; policies created,
//! changed and deleted move real connections; an invalid policy is rejected
//! by name with an Event; conditions and selectedPods are right; with the API
//! server gone the last good state stays enforced, and after it returns the
//! agent resyncs.

mod common;

use std::net::IpAddr;
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use bulkhead::dataplane::Datapath;
use bulkhead_lab::testbed::{apiserver::ControlPlane, eventually, metric, Process, Topology};

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-test-kubernetes";
const NODE: &str = "node-k8s";

struct Unpin;

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(PIN_DIR);
    }
}

fn condition(object: &serde_json::Value, type_: &str) -> (String, String, String) {
    let found = object["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_default();
    let text = |k: &str| found[k].as_str().unwrap_or_default().to_string();
    (text("status"), text("reason"), text("message"))
}

const DB_FROM_API: &str = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: db-from-api, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: api}}}]\n      ports: [{protocol: TCP, port: 5432}]\n";

#[test]
fn kubernetes_mode_follows_the_api_server() {
    assert!(common::require_root(), "not root");
    let _ = Datapath::unpin_all(PIN_DIR);
    let _unpin = Unpin;
    let mut topology = Topology::new("k8s", 182);
    let mut plane = ControlPlane::start(&topology.node_netns, "k8s");

    plane.install_bulkhead();
    // The agent's identity can read policies but not write them.
    let denied = plane.kubectl_as("agent", &["create", "namespace", "nope"], None);
    assert!(!denied.status.success());

    plane.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let mut pods = Vec::new();
    for (name, app, port) in [("frontend", "frontend", 80), ("api", "api", 8080), ("db", "db", 5432)] {
        let pod = topology.add_pod(name);
        topology.serve(name, &[&format!("{port}/TCP")]);
        plane.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nspec:\n  nodeName: {NODE}\n  containers: [{{name: main, image: none, ports: [{{containerPort: {port}}}]}}]\n"
        ));
        // What a kubelet does once the sandbox runs: report the addresses.
        let status = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}]}}}}",
            ip = pod.ipv4
        );
        let out =
            plane.kubectl(&["patch", "pod", name, "-n", "shop", "--subresource=status", "--type=merge", "-p", &status]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // kubelet names the pod's cgroup after its uid.
        let uid = plane.json(&["get", "pod", name, "-n", "shop"])["metadata"]["uid"].as_str().unwrap().to_string();
        let cgroup = topology.kubepods.join(format!("pod{uid}"));
        // (cgroup v2 does not rename: a new one, and the empty old one goes.)
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::remove_dir(&pod.cgroup).unwrap();
        topology.pods.iter_mut().find(|p| p.name == name).unwrap().cgroup = cgroup;
        pods.push(pod);
    }
    let (api, db) = (pods[1].clone(), pods[2].clone());

    let log = plane.dir.join("agent.log");
    let agent = plane
        .command_as("agent", bulkhead_lab::testbed::product_binary())
        .args([
            "agent",
            "--source=kubernetes",
            "--node-name",
            NODE,
            "--pin-dir",
            PIN_DIR,
            "--report-namespace",
            "bulkhead-system",
        ])
        .arg(format!("--cgroup-root={}", topology.kubepods.display()))
        .args(["--metrics-address=127.0.0.1:9464", "--debug-address=127.0.0.1:9464"])
        .arg(format!("--state-dir={}", plane.dir.join("agent-state").display()))
        // Egress baselines learned in a second: later destinations are anomalies.
        .arg("--egress-learning-seconds=1")
        .arg("--on-anomaly=quarantine")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Process(agent);
    // The admission webhook, called by URL (there is no Service network
    // here), for namespaces labelled admission=strict only: shop keeps
    // showing what the status says of a rejected policy.
    plane.apply(WEBHOOK_CONFIGURATION);
    let controller = plane
        .command_as("controller", bulkhead_lab::testbed::product_binary())
        .args(["controller", "--namespace", "bulkhead-system", "--metrics-address=127.0.0.1:9466"])
        .args(["--webhook-address=127.0.0.1:9443", "--webhook-host=127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(plane.dir.join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let _controller = Process(controller);
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = || topology.node_http_get("127.0.0.1:9464", "/readyz").map(|(s, _)| s == 200).unwrap_or(false);
    eventually("the agent is ready", Duration::from_secs(30), ready);

    // Created: db takes only api.
    plane.apply(DB_FROM_API);
    eventually("frontend is refused by db", Duration::from_secs(10), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "deny"
    });
    assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow");
    eventually("the status says accepted, programmed, one pod", Duration::from_secs(20), || {
        let policy = plane.json(&["get", "connectionpolicy", "db-from-api", "-n", "shop"]);
        condition(&policy, "Accepted").0 == "True"
            && condition(&policy, "Programmed").0 == "True"
            && policy["status"]["selectedPods"] == 1
            && policy["status"]["observedGeneration"] == policy["metadata"]["generation"]
    });

    // Changed: db takes frontend instead.
    plane.apply(&DB_FROM_API.replace("app: api}", "app: frontend}"));
    eventually("api is refused by db", Duration::from_secs(10), || {
        topology.probe("api", "TCP", db.ipv4, 5432) == "deny"
    });
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "allow");
    // The agent says which resourceVersion it holds: at least the edit's.
    let edited = plane.json(&["get", "connectionpolicy", "db-from-api", "-n", "shop"])["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok())
        .expect("a resourceVersion");
    eventually("/debug/revision holds the edit's resourceVersion", Duration::from_secs(10), || {
        let (_, body) = topology.node_http_get("127.0.0.1:9464", "/debug/revision").unwrap_or_default();
        let held = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["revision"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok());
        held.is_some_and(|held| held >= edited)
    });

    // Invalid: rejected by name, with an Event, and nothing else changes.
    let bad = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]\n";
    plane.apply(bad);
    eventually("the invalid policy is Accepted=False naming the field", Duration::from_secs(20), || {
        let (status, reason, message) =
            condition(&plane.json(&["get", "connectionpolicy", "broken", "-n", "shop"]), "Accepted");
        status == "False" && reason == "InvalidPort" && message.contains("spec.ingress[0].ports[0].endPort")
    });
    eventually("a PolicyRejected Event names it", Duration::from_secs(20), || {
        let events = plane.json(&["get", "events.v1.events.k8s.io", "-n", "shop"]);
        events["items"].as_array().is_some_and(|items| {
            items.iter().any(|e| {
                e["reason"] == "PolicyRejected"
                    && e["regarding"]["name"] == "broken"
                    && e["note"].as_str().is_some_and(|n| n.contains("endPort"))
            })
        })
    });
    // Host bits in an ipBlock: accepted, masked, and said so in a Warning Event.
    plane.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: host-bits, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: nobody}}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16}}]}]\n");
    eventually("a HostBitsMasked Event names the field", Duration::from_secs(20), || {
        let events = plane.json(&["get", "events.v1.events.k8s.io", "-n", "shop"]);
        events["items"].as_array().is_some_and(|items| {
            items.iter().any(|e| {
                e["reason"] == "HostBitsMasked"
                    && e["regarding"]["name"] == "host-bits"
                    && e["note"].as_str().is_some_and(|n| n.contains("ipBlock.cidr") && n.contains("10.1.0.0/16"))
            })
        })
    });
    assert_eq!(topology.probe("api", "TCP", api.ipv4, 8080), "allow", "api is not isolated by the rejected policy");
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "allow");
    assert!(agent_log().contains("policy rejected"), "{}", agent_log());

    // Admission: refused at apply with the field path; a good one passes,
    // and masked host bits come back as a warning.
    eventually("the controller has set the webhook's caBundle", Duration::from_secs(20), || {
        plane.json(&["get", "validatingwebhookconfiguration", "bulkhead"])["webhooks"][0]["clientConfig"]["caBundle"]
            .is_string()
    });
    plane.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: strict, labels: {admission: strict}}\n");
    let refused =
        plane.kubectl_as("admin", &["apply", "-f", "-"], Some(&bad.replace("namespace: shop", "namespace: strict")));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the webhook refuses the invalid policy");
    assert!(stderr.contains("denied the request") && stderr.contains("spec.ingress[0].ports[0].endPort"), "{stderr}");
    let masked = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: masked, namespace: strict}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16}}]}]\n";
    let accepted = plane.kubectl_as("admin", &["apply", "-f", "-"], Some(masked));
    let stderr = String::from_utf8_lossy(&accepted.stderr);
    assert!(accepted.status.success(), "{stderr}");
    assert!(
        stderr.contains("HostBitsMasked") && stderr.contains("10.1.0.0/16"),
        "the warning reaches kubectl: {stderr}"
    );

    // The upstream ClusterNetworkPolicy: refused at apply naming the field
    // (a namespace selector never skips a cluster-scoped object), enforced
    // above the namespace's own policy, its status set like our kinds'.
    let frontend_denied = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: db-not-from-frontend}\nspec:\n  tier: Admin\n  priority: 5\n  subject: {pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}, podSelector: {matchLabels: {app: db}}}}\n  ingress:\n    - action: Deny\n      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: frontend}}}}]\n      protocols: [{tcp: {destinationPort: {number: 5432}}}]\n";
    let two_protocols = frontend_denied.replace("[{tcp: {destinationPort: {number: 5432}}}]", "[{tcp: {}, udp: {}}]");
    let refused = plane.kubectl_as("admin", &["apply", "-f", "-"], Some(&two_protocols));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the webhook refuses the invalid ClusterNetworkPolicy");
    assert!(stderr.contains("denied the request") && stderr.contains("spec.ingress[0].protocols[0]"), "{stderr}");
    plane.apply(frontend_denied);
    eventually("the ClusterNetworkPolicy refuses frontend at db", Duration::from_secs(10), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "deny"
    });
    eventually("its status says accepted, programmed, one pod", Duration::from_secs(20), || {
        let policy = plane.json(&["get", "clusternetworkpolicy", "db-not-from-frontend"]);
        condition(&policy, "Accepted").0 == "True"
            && condition(&policy, "Programmed").0 == "True"
            && policy["status"]["selectedPods"] == 1
    });
    assert!(plane.kubectl(&["delete", "clusternetworkpolicy", "db-not-from-frontend"]).status.success());
    eventually("frontend reaches db again", Duration::from_secs(10), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "allow"
    });

    // Selected but not enforced yet (their veths not wired, as when the CNI
    // is slow): Programmed=False with 0 of 4 and the pods named; True once
    // the agent has them.
    let late: Vec<(String, IpAddr, IpAddr)> = (0..4)
        .map(|k| {
            let v4: IpAddr = format!("10.182.1.{}", 50 + k).parse().unwrap();
            let v6: IpAddr = format!("fd00:182:1::{:x}", 50 + k).parse().unwrap();
            (format!("late-{k}"), v4, v6)
        })
        .collect();
    for (name, v4, _) in &late {
        plane.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: late}}}}\nspec:\n  nodeName: {NODE}\n  containers: [{{name: main, image: none}}]\n"
        ));
        let status =
            format!("{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{v4}\",\"podIPs\":[{{\"ip\":\"{v4}\"}}]}}}}");
        let out =
            plane.kubectl(&["patch", "pod", name, "-n", "shop", "--subresource=status", "--type=merge", "-p", &status]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    plane.apply("apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: late, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: late}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]\n");
    eventually("Programmed=False: 0 of 4 selected pods enforced, named", Duration::from_secs(20), || {
        let policy = plane.json(&["get", "connectionpolicy", "late", "-n", "shop"]);
        let (status, _, message) = condition(&policy, "Programmed");
        status == "False"
            && policy["status"]["selectedPods"] == 4
            && policy["status"]["enforcedPods"] == 0
            && message.contains("late-0")
    });
    for (name, v4, v6) in &late {
        topology.add_pod_at(name, *v4, *v6);
        let uid = plane.json(&["get", "pod", name, "-n", "shop"])["metadata"]["uid"].as_str().unwrap().to_string();
        let pod = topology.pods.iter_mut().find(|p| &p.name == name).unwrap();
        let cgroup = topology.kubepods.join(format!("pod{uid}"));
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::remove_dir(&pod.cgroup).unwrap();
        pod.cgroup = cgroup;
    }
    eventually("Programmed=True once all 4 are enforced", Duration::from_secs(30), || {
        let policy = plane.json(&["get", "connectionpolicy", "late", "-n", "shop"]);
        condition(&policy, "Programmed").0 == "True" && policy["status"]["enforcedPods"] == 4
    });
    assert_eq!(topology.probe("frontend", "TCP", late[0].1, 80), "deny", "late-0 is enforced");

    // Deleted: db open again.
    assert!(plane.kubectl(&["delete", "connectionpolicy", "db-from-api", "-n", "shop"]).status.success());
    eventually("api reaches db again", Duration::from_secs(10), || {
        topology.probe("api", "TCP", db.ipv4, 5432) == "allow"
    });

    // The API server goes away: the last good state stays enforced.
    plane.apply(DB_FROM_API);
    eventually("frontend is refused by db", Duration::from_secs(10), || {
        topology.probe("frontend", "TCP", db.ipv4, 5432) == "deny"
    });
    plane.stop_apiserver();
    for _ in 0..3 {
        assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "deny", "enforced with no API server");
        assert_eq!(topology.probe("api", "TCP", db.ipv4, 5432), "allow", "enforced with no API server");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        topology.node_http_get("127.0.0.1:9464", "/readyz").is_ok_and(|(s, _)| s == 200),
        "the agent stays ready on its last good state"
    );
    // It returns, with a change made meanwhile (a direct write to etcd's
    // state through the restarted server): the agent re-lists and follows.
    plane.start_apiserver();
    plane.apply(&DB_FROM_API.replace("app: api}", "app: frontend}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while topology.probe("api", "TCP", db.ipv4, 5432) != "deny" {
        assert!(
            Instant::now() < deadline,
            "after the restart, the change is not enforced; the agent's log:\n{}",
            agent_log()
        );
    }
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5432), "allow");

    // frontend had never reached api: an egress anomaly, as a Warning Event on the pod.
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow");
    eventually("an EgressAnomaly Event on frontend names api's port", Duration::from_secs(20), || {
        let events = plane.json(&["get", "events.v1.events.k8s.io", "-n", "shop"]);
        events["items"].as_array().is_some_and(|items| {
            items.iter().any(|e| {
                e["reason"] == "EgressAnomaly"
                    && e["type"] == "Warning"
                    && e["regarding"]["kind"] == "Pod"
                    && e["regarding"]["name"] == "frontend"
                    && e["note"].as_str().is_some_and(|n| n.contains("8080/TCP"))
            })
        })
    });

    // A default-deny rollout's first step: planned and applied in Audit,
    // nothing breaks, and what it would refuse is counted under its name.
    let out = plane
        .command_as("admin", bulkhead_lab::testbed::product_binary())
        .args(["rollout", "plan", "shop", "--apply"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let would_deny = "bulkhead_audit_denied_connections_total{direction=\"ingress\",namespace=\"shop\",pod=\"api\",policy=\"shop/bulkhead-default-deny\"}";
    eventually("the Audit default-deny is programmed", Duration::from_secs(20), || {
        topology.node_http_get("127.0.0.1:9464", "/metrics").is_ok_and(|(_, m)| metric(&m, would_deny) == Some(0.0))
    });
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow", "Audit denies nothing");
    eventually("the connection it would refuse is counted", Duration::from_secs(10), || {
        topology.node_http_get("127.0.0.1:9464", "/metrics").is_ok_and(|(_, m)| metric(&m, would_deny) == Some(1.0))
    });
    let policy = plane.json(&["get", "connectionpolicy", "bulkhead-default-deny", "-n", "shop"]);
    assert_eq!(policy["spec"]["mode"], "Audit");
    assert_eq!(policy["metadata"]["labels"]["app.kubernetes.io/managed-by"], "bulkhead-rollout");

    // What it would refuse reaches the API server in the agent's report;
    // `rollout report` reads it from there and proposes the allowances.
    let bulkhead = |args: &[&str]| {
        let out = plane.command_as("admin", bulkhead_lab::testbed::product_binary()).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), if out.status.success() { text } else { text + &String::from_utf8_lossy(&out.stderr) })
    };
    eventually("frontend -> api is in the agent's report", Duration::from_secs(30), || {
        let (_, report) = bulkhead(&["rollout", "report", "shop", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&report).is_ok_and(|r| {
            r["flows"].as_array().is_some_and(|flows| {
                flows.iter().any(|f| f["source"]["workload"]["name"] == "frontend" && f["port"] == 8080)
            })
        })
    });
    let (ok, refusal) = bulkhead(&["rollout", "enforce", "shop"]);
    assert!(!ok && refusal.contains("shop/frontend") && refusal.contains("8080/TCP"), "{refusal}");
    let policy = plane.json(&["get", "connectionpolicy", "bulkhead-default-deny", "-n", "shop"]);
    assert_eq!(policy["spec"]["mode"], "Audit", "refused: nothing switched");

    let (ok, proposal) = bulkhead(&["rollout", "report", "shop", "-o", "yaml"]);
    assert!(ok && proposal.contains("name: allow-api") && proposal.contains("name: allow-frontend"), "{proposal}");
    std::thread::sleep(Duration::from_millis(1100)); // the change is newer than every flow so far
    plane.apply(&proposal);
    eventually("the allowances are programmed", Duration::from_secs(20), || {
        topology.node_http_get("127.0.0.1:9464", "/debug/state").is_ok_and(|(_, s)| s.contains("shop/allow-frontend"))
    });
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow");
    let (ok, out) = bulkhead(&["rollout", "enforce", "shop"]);
    assert!(ok, "{out}");
    let policy = plane.json(&["get", "connectionpolicy", "bulkhead-default-deny", "-n", "shop"]);
    assert_eq!(policy["spec"]["mode"], "Enforce");
    // Enforced: what was seen still flows; api, never seen reaching db since, may not.
    eventually("api's egress is refused", Duration::from_secs(20), || {
        topology.probe("api", "TCP", db.ipv4, 5432) == "eperm"
    });
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow", "nothing seen broke");
    // The refusal, live from the agent in Kubernetes mode.
    eventually("api's refused egress in bulkhead flows", Duration::from_secs(10), || {
        let out = topology
            .node_command(bulkhead_lab::testbed::product_binary())
            .args(["flows", "--agent", "127.0.0.1:9464", "--pod", "shop/api", "--verdict", "deny", "-o", "json"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().any(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|v| v["policy"] == "shop/bulkhead-default-deny" && v["hook"] == "connect")
        })
    });

    // Coverage from the cluster: shop's pods all isolated both ways now, and
    // each enforced by the agent that reports it.
    let (ok, coverage) = bulkhead(&["coverage", "-o", "json"]);
    assert!(ok, "{coverage}");
    let shop = &serde_json::from_str::<serde_json::Value>(&coverage).unwrap()["shop"];
    let pods = shop["pods"].as_u64().unwrap();
    assert!(pods >= 3, "{coverage}");
    assert_eq!((&shop["ingress_isolated"], &shop["egress_isolated"]), (&pods.into(), &pods.into()), "{coverage}");
    assert_eq!(shop["enforced"], pods, "{coverage}");
    assert!(shop.get("not_enforced").is_none(), "{coverage}");
    // A pod scheduled to a node with no agent is named as not enforced.
    plane.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: shop, labels: {app: elsewhere}}\nspec: {nodeName: node-without-agent, containers: [{name: c, image: none}]}\n");
    let out = plane.kubectl(&[
        "patch",
        "pod",
        "elsewhere",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        "{\"status\":{\"podIP\":\"10.99.0.9\",\"podIPs\":[{\"ip\":\"10.99.0.9\"}]}}",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, text) = bulkhead(&["coverage"]);
    assert!(text.contains("not enforced: shop/elsewhere"), "{text}");

    // Quarantine, opted in for shop: an anomaly labels the pod, the shipped
    // policy isolates it, and releasing it lets its connections through again.
    let out = plane.kubectl(&["label", "namespace", "shop", "bulkhead.io/on-anomaly=quarantine"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(500)); // the label reaches the agent
                                                    // Without the quarantine policy installed, a label would isolate nothing: none is put.
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5434), "eperm", "a destination frontend never used");
    let refused = "bulkhead_sync_errors_total{operation=\"quarantine\"}";
    eventually("the quarantine not done is counted", Duration::from_secs(10), || {
        topology.node_http_get("127.0.0.1:9464", "/metrics").is_ok_and(|(_, m)| metric(&m, refused) == Some(1.0))
    });
    let pod = plane.json(&["get", "pod", "frontend", "-n", "shop"]);
    assert!(pod["metadata"]["labels"].get("bulkhead.io/quarantine").is_none(), "{pod}");
    let quarantine_yaml = bulkhead_lab::testbed::workspace_root().join("manifests/quarantine.yaml");
    plane.apply(&std::fs::read_to_string(quarantine_yaml).unwrap());
    eventually("the quarantine policy is programmed", Duration::from_secs(20), || {
        plane.json(&["get", "clusterconnectionpolicy", "bulkhead-quarantine"])["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Programmed" && c["status"] == "True"))
    });
    assert_eq!(topology.probe("frontend", "TCP", api.ipv4, 8080), "allow");
    assert_eq!(topology.probe("frontend", "TCP", db.ipv4, 5433), "eperm", "a destination frontend never used");
    eventually("frontend is quarantined, with an Event and a count", Duration::from_secs(20), || {
        let pod = plane.json(&["get", "pod", "frontend", "-n", "shop"]);
        let events = plane.json(&["get", "events.v1.events.k8s.io", "-n", "shop"]);
        let metrics = topology.node_http_get("127.0.0.1:9464", "/metrics").map(|(_, m)| m).unwrap_or_default();
        pod["metadata"]["labels"]["bulkhead.io/quarantine"] == "egress-anomaly"
            && events["items"].as_array().is_some_and(|items| {
                items.iter().any(|e| e["reason"] == "Quarantined" && e["regarding"]["name"] == "frontend")
            })
            && metric(&metrics, "bulkhead_quarantined_pods_total{namespace=\"shop\",workload=\"frontend\"}")
                == Some(1.0)
    });
    eventually("quarantined frontend may not reach api", Duration::from_secs(20), || {
        topology.probe("frontend", "TCP", api.ipv4, 8080) == "eperm"
    });
    let (ok, listed) = bulkhead(&["quarantine", "list", "-o", "json"]);
    assert!(ok && listed.contains("shop/frontend") && listed.contains("5433/TCP"), "{listed}");
    let (ok, out) = bulkhead(&["quarantine", "release", "frontend", "-n", "shop"]);
    assert!(ok, "{out}");
    eventually("released frontend reaches api again", Duration::from_secs(20), || {
        topology.probe("frontend", "TCP", api.ipv4, 8080) == "allow"
    });
    let (_, listed) = bulkhead(&["quarantine", "list"]);
    assert!(listed.contains("no pod is quarantined"), "{listed}");

    // One baseline per workload across nodes: what another node's agent
    // reports frontend reached is known here; the operator's allow reaches
    // the agent through the edits ConfigMap; anything else is an anomaly.
    let out = plane.kubectl(&["label", "namespace", "shop", "bulkhead.io/on-anomaly-"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other_node = serde_json::json!([{
        "workload": {"namespace": "shop", "name": "frontend"},
        "since": 1,
        "destinations": [{"peer": "203.0.113.50", "protocol": 6, "port": 443}],
    }]);
    plane.apply(
        &serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "bulkhead-baselines-node-b", "namespace": "bulkhead-system",
                "labels": {"bulkhead.io/egress-baselines": "true"},
                "annotations": {"bulkhead.io/egress-baselines": other_node.to_string()},
            },
            "spec": {"holderIdentity": "node-b"},
        })
        .to_string(),
    );
    let (ok, out) = bulkhead(&["baseline", "allow", "frontend", "203.0.113.60:443/TCP", "-n", "shop"]);
    assert!(ok, "{out}");
    let baselines_lease =
        || plane.json(&["get", "lease", &format!("bulkhead-baselines-{NODE}"), "-n", "bulkhead-system"]);
    let published = |lease: &serde_json::Value| {
        lease["metadata"]["annotations"]["bulkhead.io/egress-baselines"].as_str().unwrap_or_default().to_string()
    };
    eventually("frontend's baseline on this node has both", Duration::from_secs(40), || {
        let baselines = published(&baselines_lease());
        baselines.contains("203.0.113.50") && baselines.contains("203.0.113.60")
    });
    let anomalies = "bulkhead_egress_anomalies_total{namespace=\"shop\",workload=\"frontend\"}";
    let count =
        || topology.node_http_get("127.0.0.1:9464", "/metrics").map(|(_, m)| metric(&m, anomalies)).ok().flatten();
    let before = count().unwrap_or(0.0);
    for address in ["203.0.113.50", "203.0.113.60", "203.0.113.61"] {
        assert_ne!(topology.probe("frontend", "TCP", address.parse().unwrap(), 443), "allow");
    }
    eventually("only the unknown destination is an anomaly", Duration::from_secs(10), || count() == Some(before + 1.0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(), Some(before + 1.0));
    eventually("the anomaly's destination is learned, and listed", Duration::from_secs(30), || {
        let (ok, listed) = bulkhead(&["baseline", "list", "-n", "shop"]);
        ok && listed.contains("shop/frontend") && listed.contains("203.0.113.61:443/TCP")
    });

    // The baselines and audit Leases are written when they change, not at
    // each renewal: every agent watches the first, and both are large.
    eventually("the learned destination is published", Duration::from_secs(30), || {
        published(&baselines_lease()).contains("203.0.113.61")
    });
    let version =
        |lease: serde_json::Value| lease["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
    let report_lease = || plane.json(&["get", "lease", &format!("bulkhead-agent-{NODE}"), "-n", "bulkhead-system"]);
    let audit_lease = || plane.json(&["get", "lease", &format!("bulkhead-audit-{NODE}"), "-n", "bulkhead-system"]);
    let (baselines_before, report_before) = (version(baselines_lease()), version(report_lease()));
    let audit_before = version(audit_lease());
    assert!(!audit_before.is_empty(), "the audit flows are published");
    std::thread::sleep(Duration::from_secs(12));
    assert_ne!(version(report_lease()), report_before, "the report Lease is renewed every 10 s");
    assert_eq!(version(baselines_lease()), baselines_before, "unchanged baselines are not written again");
    assert_eq!(version(audit_lease()), audit_before, "unchanged audit flows are not written again");
}

const WEBHOOK_CONFIGURATION: &str = "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: bulkhead}
webhooks:
  - name: policies.bulkhead.io
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 5
    namespaceSelector: {matchLabels: {admission: strict}}
    clientConfig: {url: \"https://127.0.0.1:9443/validate\"}
    rules:
      - {apiGroups: [bulkhead.io], apiVersions: [v1alpha1], operations: [CREATE, UPDATE], resources: [connectionpolicies], scope: Namespaced}
      - {apiGroups: [policy.networking.k8s.io], apiVersions: [v1alpha2], operations: [CREATE, UPDATE], resources: [clusternetworkpolicies], scope: Cluster}
";
