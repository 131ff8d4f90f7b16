//! Bulkhead as a cluster runs it: one real node (etcd, kube-apiserver,
//! controller-manager, scheduler, kube-proxy, containerd, kubelet), the image
//! `cargo xtask image` built imported into containerd, `manifests/install.yaml`
//! applied as the README tells an operator, and real pods that containerd
//! started and a CNI wired — once routed (ptp), once on a bridge — whose
//! connections the agent pod allows and denies.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use bulkhead_lab::testbed::{
    self,
    apiserver::refusals,
    node::{Cni, Node, NODE_IP},
};

const SERVER_PORT: u16 = 8080;

fn image_archive() -> PathBuf {
    let version = env!("CARGO_PKG_VERSION");
    let archive = testbed::workspace_root().join(format!("target/image/bulkhead-{version}.oci.tar"));
    assert!(
        archive.exists(),
        "{} is missing: `cargo xtask image` builds it (`cargo xtask test` does first)",
        archive.display()
    );
    archive
}

struct Cluster {
    node: Node,
}

impl Drop for Cluster {
    /// A failed run shows what the cluster and Bulkhead said before it all goes.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "connectionpolicies,clusterconnectionpolicies,networkpolicies", "-A", "-o", "yaml"],
            &["-n", "bulkhead-system", "logs", "-l", "app.kubernetes.io/component=agent", "--tail=60"],
            &["-n", "bulkhead-system", "logs", "-l", "app.kubernetes.io/component=controller", "--tail=30"],
        ] {
            let out = self.node.kubectl(args);
            eprintln!(
                "--- kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.node.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        self.node.plane.apply(yaml);
    }

    /// The README's install: `kubectl apply -f manifests/install.yaml`, the
    /// image reference being the one thing an operator changes.
    fn install(&self, image: &str) {
        let text = std::fs::read_to_string(testbed::workspace_root().join("manifests/install.yaml")).unwrap();
        let shipped = "image: localhost/bulkhead:".to_string() + env!("CARGO_PKG_VERSION");
        assert!(text.contains(&shipped), "install.yaml names {shipped}");
        let out = self.node.plane.kubectl_as(
            "admin",
            &["apply", "-f", "-"],
            Some(&text.replace(&shipped, &format!("image: {image}"))),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(refusals(&stderr).is_empty(), "kubectl apply -f manifests/install.yaml: {stderr}");
        for (kind, name) in [("daemonset", "bulkhead-agent"), ("deployment", "bulkhead-controller")] {
            let out = self.node.kubectl(&["-n", "bulkhead-system", "rollout", "status", kind, name, "--timeout=180s"]);
            if !out.status.success() {
                let pods = self.node.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let describe = self.node.kubectl(&["-n", "bulkhead-system", "describe", "pods"]);
                let logs = self.node.kubectl(&[
                    "-n",
                    "bulkhead-system",
                    "logs",
                    "-l",
                    "app.kubernetes.io/name=bulkhead",
                    "--tail=30",
                ]);
                panic!(
                    "{kind} {name} not ready: {}\n{}\n{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&pods.stdout),
                    String::from_utf8_lossy(&describe.stdout),
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
        }
    }

    /// A Deployment of busybox pods; `serve` makes each answer "ok" on SERVER_PORT.
    fn deploy(&self, namespace: &str, name: &str, labels: &str, replicas: u32, serve: bool) {
        let command = if serve {
            format!("[nc, -ll, -p, '{SERVER_PORT}', -e, echo, ok]")
        } else {
            "[sleep, '86400']".to_string()
        };
        self.apply(&format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}, {labels}}}}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
        - name: main
          image: localhost/busybox:latest
          imagePullPolicy: Never
          command: {command}
"
        ));
        let out = self.node.kubectl(&["-n", namespace, "rollout", "status", "deployment", name, "--timeout=120s"]);
        assert!(out.status.success(), "deployment {namespace}/{name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Running pods of a Deployment: (name, address).
    fn pods(&self, namespace: &str, app: &str) -> Vec<(String, String)> {
        self.pods_where(namespace, app, |pod| pod["status"]["phase"] == "Running")
    }

    /// Pods of a Deployment that have an address, whatever their phase: (name, address).
    fn addressed_pods(&self, namespace: &str, app: &str) -> Vec<(String, String)> {
        self.pods_where(namespace, app, |_| true)
    }

    /// Pods of a Deployment, not being deleted, with an address and `keep`: (name, address).
    fn pods_where(
        &self,
        namespace: &str,
        app: &str,
        keep: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<(String, String)> {
        let selector = format!("app={app}");
        let list: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["-n", namespace, "get", "pods", "-l", &selector, "-o", "json"]))
                .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && keep(p))
            .filter_map(|p| {
                Some((p["metadata"]["name"].as_str()?.to_string(), p["status"]["podIP"].as_str()?.to_string()))
            })
            .collect()
    }

    /// Whether `pod` reaches `address`:SERVER_PORT and hears the server's "ok".
    fn connects(&self, namespace: &str, pod: &str, address: &str) -> bool {
        let out = self.node.kubectl(&[
            "-n",
            namespace,
            "exec",
            pod,
            "--",
            "nc",
            "-w",
            "2",
            address,
            &SERVER_PORT.to_string(),
        ]);
        String::from_utf8_lossy(&out.stdout).trim() == "ok"
    }

    fn agent_metrics(&self) -> String {
        self.node.http_get(&format!("http://{NODE_IP}:9464/metrics")).unwrap_or_default()
    }

    fn programmed(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if let Some(namespace) = namespace {
            args.extend(["-n", namespace]);
        }
        let out = self.node.kubectl(&args);
        let Ok(policy) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
        policy["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Programmed" && c["status"] == "True"))
    }
}

/// The sum of every series of a metric.
fn total(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    testbed::eventually(what, timeout, &mut check);
    start.elapsed()
}

fn run(cni: Cni) {
    assert!(common::require_root(), "not root");
    let archive = image_archive();
    let started = Instant::now();
    let cluster = Cluster { node: Node::start(cni, &[("bulkhead", &archive)]) };
    eprintln!("[{cni:?}] node Ready after {:.1} s", started.elapsed().as_secs_f64());
    cluster.install(&format!("localhost/bulkhead:{}", env!("CARGO_PKG_VERSION")));
    eprintln!("[{cni:?}] agent and controller Ready after {:.1} s", started.elapsed().as_secs_f64());

    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: shop}}\n");
    cluster.deploy("shop", "server", "tier: backend", 1, true);
    cluster.deploy("shop", "client", "tier: web", 1, false);
    let (_, server_ip) = cluster.pods("shop", "server").remove(0);
    let (client, _) = cluster.pods("shop", "client").remove(0);
    eventually("no policy: the client reaches the server", Duration::from_secs(20), || {
        cluster.connects("shop", &client, &server_ip)
    });

    // Only role=frontend may reach the server; the client is not.
    cluster.apply(
        "apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: server-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: frontend}}}]
      ports: [{port: 8080}]
",
    );
    eventually("server-ingress Programmed", Duration::from_secs(30), || {
        cluster.programmed("connectionpolicy", Some("shop"), "server-ingress")
    });
    eventually("the client is denied", Duration::from_secs(20), || !cluster.connects("shop", &client, &server_ip));
    eventually("the denial is counted", Duration::from_secs(20), || {
        total(&cluster.agent_metrics(), "bulkhead_blocked_connections_total{") >= 1.0
    });
    cluster.kubectl(&["-n", "shop", "label", "pod", &client, "role=frontend"]);
    eventually("labelled frontend, the client is allowed", Duration::from_secs(20), || {
        cluster.connects("shop", &client, &server_ip)
    });
    cluster.kubectl(&["-n", "shop", "label", "pod", &client, "role-"]);
    eventually("the label gone, the client is denied again", Duration::from_secs(20), || {
        !cluster.connects("shop", &client, &server_ip)
    });

    // The agent pod deleted: enforcement stays in the kernel while the
    // DaemonSet brings a new one, which adopts it.
    let agent = cluster.kubectl(&[
        "-n",
        "bulkhead-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    cluster.kubectl(&["-n", "bulkhead-system", "delete", "pod", &agent, "--wait=false"]);
    let deleted = Instant::now();
    let mut probes = 0;
    while Instant::now() < deleted + Duration::from_secs(5) {
        assert!(
            !cluster.connects("shop", &client, &server_ip),
            "a denied connection went through while the agent restarted"
        );
        probes += 1;
    }
    let out = cluster.node.kubectl(&[
        "-n",
        "bulkhead-system",
        "rollout",
        "status",
        "daemonset",
        "bulkhead-agent",
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "the agent pod did not come back: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!(
        "[{cni:?}] agent pod replaced after {:.1} s; {probes} denied probes meanwhile, none through",
        deleted.elapsed().as_secs_f64()
    );
    cluster.kubectl(&["-n", "shop", "label", "pod", &client, "role=frontend"]);
    eventually("the new agent follows a label change", Duration::from_secs(30), || {
        cluster.connects("shop", &client, &server_ip)
    });

    scale_up_and_down(&cluster, cni, &client);
    across_namespaces(&cluster, &server_ip);
    eprintln!("[{cni:?}] agent pod RSS {:.0} MB", agent_rss_mb());
    cluster.node.assert_machine_untouched();
    eprintln!("[{cni:?}] done in {:.1} s", started.elapsed().as_secs_f64());
}

/// The server Deployment scaled 2 → 10 → 2 under its policy: every new
/// pod enforced (the time from when its address is first seen to when the
/// agent lists it as enforced, polled together), reached by the allowed
/// client, and the removed pods swept from the agent.
fn scale_up_and_down(cluster: &Cluster, cni: Cni, client: &str) {
    cluster.kubectl(&["-n", "shop", "scale", "deployment", "server", "--replicas=2"]);
    eventually("two servers enforced", Duration::from_secs(60), || enforced_servers(cluster).len() == 2);
    let before: BTreeSet<String> = enforced_servers(cluster);
    cluster.kubectl(&["-n", "shop", "scale", "deployment", "server", "--replicas=10"]);
    let mut addressed: BTreeMap<String, Instant> = BTreeMap::new();
    let mut latency: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while latency.len() < 8 {
        assert!(Instant::now() < deadline, "new servers not enforced in 120 s: {addressed:?} {latency:?}");
        for (name, _) in cluster.addressed_pods("shop", "server") {
            addressed.entry(name).or_insert_with(Instant::now);
        }
        let enforced = enforced_servers(cluster);
        for (name, since) in &addressed {
            if !before.contains(name) && enforced.contains(name) && !latency.contains_key(name) {
                latency.insert(name.clone(), since.elapsed());
            }
        }
    }
    let mut millis: Vec<u128> = latency.values().map(Duration::as_millis).collect();
    millis.sort();
    eprintln!(
        "[{cni:?}] address seen → enforced, 8 new pods: median {} ms, max {} ms (polled, ~100 ms resolution)",
        millis[millis.len() / 2],
        millis[millis.len() - 1]
    );
    let out = cluster.node.kubectl(&["-n", "shop", "rollout", "status", "deployment", "server", "--timeout=120s"]);
    assert!(out.status.success(), "server did not reach 10: {}", String::from_utf8_lossy(&out.stderr));
    for (name, address) in cluster.pods("shop", "server") {
        eventually(&format!("the client reaches {name}"), Duration::from_secs(20), || {
            cluster.connects("shop", client, &address)
        });
    }
    cluster.kubectl(&["-n", "shop", "scale", "deployment", "server", "--replicas=2"]);
    eventually("the agent sweeps the removed servers", Duration::from_secs(90), || {
        enforced_servers(cluster).len() == 2
    });
}

/// The server pods the agent lists as enforced, by name.
fn enforced_servers(cluster: &Cluster) -> BTreeSet<String> {
    let state: serde_json::Value = cluster
        .node
        .http_get("http://127.0.0.1:9465/debug/state")
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    state["endpoints"]
        .as_object()
        .map(|endpoints| {
            endpoints.keys().filter_map(|k| k.strip_prefix("shop/server-")).map(|n| format!("server-{n}")).collect()
        })
        .unwrap_or_default()
}

/// A pod of another namespace: refused by the server's ConnectionPolicy,
/// let in by an Admin-tier ClusterConnectionPolicy (judged first), then held
/// back by its own namespace's egress NetworkPolicy, counted as an egress
/// denial.
fn across_namespaces(cluster: &Cluster, server_ip: &str) {
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ops, labels: {team: ops}}\n");
    cluster.deploy("ops", "toolbox", "tier: ops", 1, false);
    let (toolbox, _) = cluster.pods("ops", "toolbox").remove(0);
    eventually("the server's policy refuses ops", Duration::from_secs(20), || {
        !cluster.connects("ops", &toolbox, server_ip)
    });
    cluster.apply(
        "apiVersion: bulkhead.io/v1alpha1
kind: ClusterConnectionPolicy
metadata: {name: ops-to-servers}
spec:
  tier: Admin
  priority: 10
  subject: {namespaceSelector: {matchLabels: {team: shop}}, podSelector: {matchLabels: {app: server}}}
  ingress:
    - {action: Allow, from: [{namespaceSelector: {matchLabels: {team: ops}}}], ports: [{port: 8080}]}
",
    );
    eventually("ops-to-servers Programmed", Duration::from_secs(30), || {
        cluster.programmed("clusterconnectionpolicy", None, "ops-to-servers")
    });
    eventually("the Admin tier lets ops in", Duration::from_secs(20), || cluster.connects("ops", &toolbox, server_ip));
    let egress_denied = || {
        cluster
            .agent_metrics()
            .lines()
            .filter(|l| l.starts_with("bulkhead_blocked_connections_total{") && l.contains("direction=\"egress\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = egress_denied();
    cluster.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: toolbox-no-egress, namespace: ops}
spec:
  podSelector: {matchLabels: {app: toolbox}}
  policyTypes: [Egress]
",
    );
    eventually("ops' own NetworkPolicy holds its egress back", Duration::from_secs(20), || {
        !cluster.connects("ops", &toolbox, server_ip)
    });
    eventually("counted as an egress denial", Duration::from_secs(20), || egress_denied() > before);
}

/// The resident memory of the agent process the DaemonSet runs.
fn agent_rss_mb() -> f64 {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"/bulkhead\0agent\0--source=kubernetes") {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
            return kb.expect("VmRSS of the agent") / 1024.0;
        }
    }
    panic!("no agent process (/bulkhead agent --source=kubernetes) on this machine");
}

/// One node at a time: both runs use the machine's bpffs at the agent's default pin path.
static ONE_NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn on_a_routed_cni() {
    let _node = ONE_NODE.lock().unwrap_or_else(|e| e.into_inner());
    run(Cni::Routed);
}

#[test]
fn on_a_bridge_cni() {
    let _node = ONE_NODE.lock().unwrap_or_else(|e| e.into_inner());
    run(Cni::Bridge);
}
