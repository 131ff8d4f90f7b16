//! Bulkhead as a cluster runs it: one real node (etcd, kube-apiserver,
//! controller-manager, scheduler, kube-proxy, containerd, kubelet), the image
//! `cargo xtask image` built imported into containerd, `manifests/install.yaml`
//! applied as the README tells an operator, and real pods that containerd
//! started and a CNI wired — once routed (ptp), once on a bridge — whose
//! connections the agent pod allows and denies.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bulkhead_lab::testbed::{
    self,
    apiserver::refusals,
    node::{Cni, Node, PodShell, NODE_IP},
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
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*].status.conditions[*]}{.type}={.status} {.message}{\"\\n\"}{end}",
            ],
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
    /// An exec that hangs (its stream lost, as after a containerd restart)
    /// is tried again, never read as a refusal.
    fn connects(&self, namespace: &str, pod: &str, address: &str) -> bool {
        let port = SERVER_PORT.to_string();
        let args = ["-n", namespace, "exec", pod, "--", "nc", "-w", "2", address, port.as_str()];
        for attempt in 1..=3 {
            if let Some(out) = self.node.kubectl_within(Duration::from_secs(20), &args) {
                return String::from_utf8_lossy(&out.stdout).trim() == "ok";
            }
            eprintln!("kubectl exec into {namespace}/{pod} hung for 20 s (attempt {attempt} of 3)");
        }
        panic!("kubectl exec into {namespace}/{pod} hung three times");
    }

    /// The agent DaemonSet's pods, as a kubectl JSONPath prints them.
    fn agent_pods(&self, jsonpath: &str) -> String {
        let selector = "app.kubernetes.io/component=agent";
        self.kubectl(&["-n", "bulkhead-system", "get", "pods", "-l", selector, "-o", &format!("jsonpath={jsonpath}")])
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
    counted(text, name, &[])
}

/// The sum of the series of a metric whose labels hold every one of `labels`.
fn counted(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let mut cluster = Cluster { node: Node::start(cni, &[("bulkhead", &archive)]) };
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
    let agent = cluster.agent_pods("{.items[0].metadata.name}");
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
    agent_rolled_out(&cluster);
    eprintln!(
        "[{cni:?}] agent pod replaced after {:.1} s; {probes} denied probes meanwhile, none through",
        deleted.elapsed().as_secs_f64()
    );
    cluster.kubectl(&["-n", "shop", "label", "pod", &client, "role=frontend"]);
    eventually("the new agent follows a label change", Duration::from_secs(30), || {
        cluster.connects("shop", &client, &server_ip)
    });

    scale_up_and_down(&cluster, cni, &client);
    let toolbox = across_namespaces(&cluster, &server_ip);
    rollout_to_default_deny(&cluster, &client);
    egress_outside_the_cluster(&mut cluster, &client, &server_ip);
    eprintln!("[{cni:?}] agent pod RSS {:.0} MB", agent_rss_mb());
    life_of_a_cluster(&mut cluster, cni, (&client, &toolbox), &server_ip);
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
    // The shipped DaemonSet follows `veth…` interfaces: each new pod's got its
    // programs as the CNI made it, before kubelet reported the pod's address.
    let logs =
        cluster.kubectl(&["-n", "bulkhead-system", "logs", "-l", "app.kubernetes.io/component=agent", "--tail=-1"]);
    let ahead = logs.lines().filter(|line| line.contains("attached ahead of its pod")).count();
    assert!(ahead >= 8, "{ahead} veths attached ahead for 8 new pods; the agent's log:\n{logs}");
    // The shipped RBAC grants all the agent asks of the API server.
    let refused: Vec<&str> = logs.lines().filter(|line| line.to_lowercase().contains("forbidden")).collect();
    assert!(refused.is_empty(), "the API server refused the agent:\n{}", refused.join("\n"));
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
/// denial. Returns the pod of the other namespace.
fn across_namespaces(cluster: &Cluster, server_ip: &str) -> String {
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
    let egress_denied =
        || counted(&cluster.agent_metrics(), "bulkhead_blocked_connections_total{", &["direction=\"egress\""]);
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
    toolbox
}

/// The default-deny rollout on a namespace of its own: a Baseline-tier Deny
/// in Audit changes nothing and reports what it would deny; in Enforce it
/// denies, counted under its name; a ConnectionPolicy of the namespace
/// (judged before the Baseline tier) lets the client back in.
fn rollout_to_default_deny(cluster: &Cluster, client: &str) {
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ledger, labels: {team: ledger}}\n");
    cluster.deploy("ledger", "vault", "tier: data", 1, true);
    let (vault, vault_ip) = cluster.pods("ledger", "vault").remove(0);
    eventually("no policy: the client reaches the vault", Duration::from_secs(20), || {
        cluster.connects("shop", client, &vault_ip)
    });
    let default_deny = |mode: &str| {
        format!(
            "apiVersion: bulkhead.io/v1alpha1
kind: ClusterConnectionPolicy
metadata: {{name: default-deny-ledger}}
spec:
  tier: Baseline
  priority: 100
  subject: {{namespaceSelector: {{matchLabels: {{team: ledger}}}}}}
  mode: {mode}
  ingress: [{{action: Deny}}]
"
        )
    };
    let series = ["policy=\"cluster/default-deny-ledger\"", &format!("pod=\"{vault}\"")];
    let series = &series.iter().map(|s| s.as_ref()).collect::<Vec<&str>>();
    cluster.apply(&default_deny("Audit"));
    eventually("default-deny-ledger (Audit) Programmed", Duration::from_secs(30), || {
        cluster.programmed("clusterconnectionpolicy", None, "default-deny-ledger")
    });
    eventually("in Audit the client still connects, reported as an audit verdict", Duration::from_secs(20), || {
        cluster.connects("shop", client, &vault_ip)
            && counted(&cluster.agent_metrics(), "bulkhead_audit_denied_connections_total{", series) >= 1.0
    });
    let blocked = || counted(&cluster.agent_metrics(), "bulkhead_blocked_connections_total{", series);
    assert_eq!(blocked(), 0.0, "nothing blocked in Audit");
    cluster.apply(&default_deny("Enforce"));
    eventually("in Enforce the client is denied", Duration::from_secs(20), || {
        !cluster.connects("shop", client, &vault_ip)
    });
    eventually("counted under the Baseline policy", Duration::from_secs(20), || blocked() >= 1.0);
    cluster.apply(
        "apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: vault-from-shop, namespace: ledger}
spec:
  podSelector: {matchLabels: {app: vault}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {team: shop}}, podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
",
    );
    eventually(
        "the namespace's own policy, before the Baseline tier, lets the client in",
        Duration::from_secs(20),
        || cluster.connects("shop", client, &vault_ip),
    );
}

/// The client's egress limited to the server, the vault and part of a
/// network outside the cluster: the allowed outside address answers, the
/// excepted one is refused and counted as the client's egress denial.
fn egress_outside_the_cluster(cluster: &mut Cluster, client: &str, server_ip: &str) {
    let (allowed, excepted) = ("10.251.0.2", "10.251.0.200");
    cluster.node.start_outside(&[allowed, excepted], SERVER_PORT);
    eventually("no egress policy: the client reaches both outside addresses", Duration::from_secs(20), || {
        cluster.connects("shop", client, allowed) && cluster.connects("shop", client, excepted)
    });
    cluster.apply(
        "apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: client-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector: {matchLabels: {app: server}}
        - {namespaceSelector: {matchLabels: {team: ledger}}, podSelector: {matchLabels: {app: vault}}}
      ports: [{port: 8080}]
    - to: [{ipBlock: {cidr: 10.251.0.0/24, except: [10.251.0.128/25]}}]
      ports: [{port: 8080}]
",
    );
    eventually("client-egress Programmed", Duration::from_secs(30), || {
        cluster.programmed("connectionpolicy", Some("shop"), "client-egress")
    });
    eventually("the excepted outside address is refused", Duration::from_secs(20), || {
        !cluster.connects("shop", client, excepted)
    });
    let series = ["direction=\"egress\"", "policy=\"shop/client-egress\"", &format!("pod=\"{client}\"")];
    let series = &series.iter().map(|s| s.as_ref()).collect::<Vec<&str>>();
    eventually("counted as the client's egress denial", Duration::from_secs(20), || {
        counted(&cluster.agent_metrics(), "bulkhead_blocked_connections_total{", series) >= 1.0
    });
    assert!(cluster.connects("shop", client, allowed), "the allowed outside address answers");
    assert!(cluster.connects("shop", client, server_ip), "the server is still allowed");
}

/// Connections probed from inside two pods on and on while the cluster goes
/// through what clusters go through — without kubectl, which needs the API
/// server and containerd: one pair policy allows, one it denies.
struct Probe {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    allowed_connected: u32,
    allowed_failed: u32,
    denied_refused: u32,
    denied_through: u32,
}

impl Probe {
    fn start(allowed: (PodShell, String), denied: (PodShell, String)) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let connected = allowed.0.hears_ok(&allowed.1, SERVER_PORT);
                    let through = denied.0.hears_ok(&denied.1, SERVER_PORT);
                    let mut seen = seen.lock().unwrap();
                    if connected {
                        seen.allowed_connected += 1
                    } else {
                        seen.allowed_failed += 1
                    }
                    if through {
                        seen.denied_through += 1
                    } else {
                        seen.denied_refused += 1
                    }
                }
            }
        });
        Self { seen, stop, thread: Some(thread) }
    }

    /// What the probes saw since the last call, stated: no denied connection
    /// went through and no allowed one failed.
    fn through(&self, cni: Cni, what: &str) {
        std::thread::sleep(Duration::from_secs(2));
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        eprintln!(
            "[{cni:?}] {what}: {} allowed connections made, {} failed; {} denied refused, {} through",
            seen.allowed_connected, seen.allowed_failed, seen.denied_refused, seen.denied_through
        );
        assert!(seen.allowed_connected > 0 && seen.denied_refused > 0, "{what}: the probes ran: {seen:?}");
        assert_eq!(seen.denied_through, 0, "{what}: a denied connection went through");
        assert_eq!(seen.allowed_failed, 0, "{what}: an allowed connection failed");
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The agent rolled to a new image, containerd restarted, the API server
/// stopped for 30 s, pods deleted while no agent ran — a probe running
/// through all of it, the client allowed to the server and the pod of the
/// other namespace denied.
fn life_of_a_cluster(cluster: &mut Cluster, cni: Cni, (client, toolbox): (&str, &str), server_ip: &str) {
    let shell = |namespace: &str, pod: &str| {
        let uid = cluster.kubectl(&["-n", namespace, "get", "pod", pod, "-o", "jsonpath={.metadata.uid}"]);
        cluster.node.pod_shell(&uid)
    };
    let probe =
        Probe::start((shell("shop", client), server_ip.to_string()), (shell("ops", toolbox), server_ip.to_string()));

    // A new image version: the same binary under a new tag and configuration, so a new image to containerd.
    let version = env!("CARGO_PKG_VERSION");
    let rolled = rolled_image(&image_archive(), &cluster.node.dir.join("rolled"), version);
    cluster.node.import("bulkhead", &rolled);
    let image = format!("localhost/bulkhead:{version}-rolled");
    cluster.kubectl(&["-n", "bulkhead-system", "set", "image", "daemonset/bulkhead-agent", &format!("agent={image}")]);
    agent_rolled_out(cluster);
    let running = cluster.agent_pods("{.items[*].spec.containers[0].image}");
    assert_eq!(running, image, "the agent runs the new image");
    probe.through(cni, "agent rolled to a new image");

    cluster.node.restart_containerd();
    eventually("kubectl exec works again (through containerd)", Duration::from_secs(60), || {
        cluster.connects("shop", client, server_ip)
    });
    probe.through(cni, "containerd restarted");

    cluster.node.plane.stop_apiserver();
    std::thread::sleep(Duration::from_secs(30));
    cluster.node.plane.start_apiserver();
    probe.through(cni, "API server stopped for 30 s");
    let (_, vault_ip) = cluster.pods("ledger", "vault").remove(0);
    cluster.kubectl(&["-n", "ledger", "delete", "connectionpolicy", "vault-from-shop"]);
    let converged =
        eventually("a change made after the API server returned converges", Duration::from_secs(90), || {
            !cluster.connects("shop", client, &vault_ip)
        });
    eprintln!("[{cni:?}] a change after the API server returned enforced in {:.1} s", converged.as_secs_f64());

    pods_deleted_while_no_agent_ran(cluster);
    probe.through(cni, "pods deleted while no agent ran");
}

/// The agent DaemonSet's pods replaced and every one Ready.
fn agent_rolled_out(cluster: &Cluster) {
    let out = cluster.node.kubectl(&[
        "-n",
        "bulkhead-system",
        "rollout",
        "status",
        "daemonset",
        "bulkhead-agent",
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "the agent did not roll out: {}", String::from_utf8_lossy(&out.stderr));
}

/// An OCI archive of the image in `archive` under the tag `<version>-rolled`,
/// its configuration changed so containerd sees a new image.
fn rolled_image(archive: &Path, dir: &Path, version: &str) -> PathBuf {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let run = |command: &mut Command| {
        let out = command.output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&layout));
    run(Command::new("umoci")
        .args(["config", "--image", &format!("{}:{version}", layout.display()), "--tag", &format!("{version}-rolled")])
        .args(["--config.label", &format!("org.opencontainers.image.version={version}-rolled")]));
    let rolled = dir.join("rolled.oci.tar");
    run(Command::new("tar").arg("-cf").arg(&rolled).arg("-C").arg(&layout).arg("."));
    rolled
}

/// No agent on the node (its DaemonSet kept off it) while the vault is
/// deleted: its veth and cgroup go, the links pinned for them stay until
/// the agent, back, sweeps them.
fn pods_deleted_while_no_agent_ran(cluster: &Cluster) {
    let state: serde_json::Value = cluster
        .node
        .http_get("http://127.0.0.1:9465/debug/state")
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    let (vault, interface) = state["endpoints"]
        .as_object()
        .and_then(|e| e.iter().find(|(pod, _)| pod.starts_with("ledger/vault-")))
        .map(|(pod, interface)| {
            (pod.trim_start_matches("ledger/").to_string(), interface.as_str().unwrap().to_string())
        })
        .expect("the vault is enforced");
    let uid = cluster.kubectl(&["-n", "ledger", "get", "pod", &vault, "-o", "jsonpath={.metadata.uid}"]);
    let vault_pins = || -> Vec<String> {
        std::fs::read_dir("/sys/fs/bpf/bulkhead/links")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|pin| pin.starts_with(&format!("{interface}-")) || pin.contains(&format!("pod{uid}")))
            .collect()
    };
    assert_eq!(vault_pins().len(), 6, "the vault's two TC links and four socket hooks: {:?}", vault_pins());

    let keep_off = r#"{"spec":{"template":{"spec":{"nodeSelector":{"bulkhead.io/e2e-no-agent":"true"}}}}}"#;
    cluster.kubectl(&["-n", "bulkhead-system", "patch", "daemonset", "bulkhead-agent", "-p", keep_off]);
    let gone = eventually("no agent runs on the node", Duration::from_secs(60), || !agent_running());
    let deleting = Instant::now();
    cluster.kubectl(&["-n", "ledger", "delete", "deployment", "vault"]);
    eventually("the vault pod is gone", Duration::from_secs(60), || {
        cluster.addressed_pods("ledger", "vault").is_empty()
    });
    let out = cluster.node.kubectl(&["-n", "ledger", "wait", "--for=delete", &format!("pod/{vault}"), "--timeout=60s"]);
    assert!(out.status.success(), "vault pod not deleted: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(vault_pins().len(), 6, "no agent ran: nothing swept yet");
    let deleted = deleting.elapsed();

    let returning = Instant::now();
    let back = r#"{"spec":{"template":{"spec":{"nodeSelector":{"bulkhead.io/e2e-no-agent":null}}}}}"#;
    cluster.kubectl(&["-n", "bulkhead-system", "patch", "daemonset", "bulkhead-agent", "-p", back]);
    agent_rolled_out(cluster);
    eventually("the agent, back, sweeps the vault's links", Duration::from_secs(30), || vault_pins().is_empty());
    eprintln!(
        "[{:?}] no agent: its pod gone in {:.1} s, the vault deleted in {:.1} s, the agent back and the vault's links swept in {:.1} s",
        cluster.node.cni,
        gone.as_secs_f64(),
        deleted.as_secs_f64(),
        returning.elapsed().as_secs_f64()
    );
}

/// Whether an agent process of the DaemonSet's runs on this machine.
fn agent_running() -> bool {
    agent_process().is_some()
}

/// The agent process the DaemonSet runs: its /proc directory.
fn agent_process() -> Option<PathBuf> {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().map(|e| e.path()).find(|dir| {
        std::fs::read(dir.join("cmdline")).unwrap_or_default().starts_with(b"/bulkhead\0agent\0--source=kubernetes")
    })
}

/// The resident memory of the agent process the DaemonSet runs.
fn agent_rss_mb() -> f64 {
    let dir = agent_process().expect("an agent process (/bulkhead agent --source=kubernetes) on this machine");
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    kb.expect("VmRSS of the agent") / 1024.0
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
