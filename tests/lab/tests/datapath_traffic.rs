//! Real traffic through the real datapath: pods are network namespaces with
//! veths to a node namespace, policies are compiled and synced into the maps
//! as the agent does, and connections are real TCP, UDP, SCTP and ping.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bulkhead::dataplane::{sync::Programmer, Datapath};
use bulkhead_crds::Protocol;
use bulkhead_lab::testbed::{self, Topology};
use bulkhead_policy::{self as policy, manifest, Change, ContainerPort, Namespace, Pod, PodRef, Snapshot};
use datapath_common::{
    DropKey, VerdictKey, ENDPOINT_FLAGS_OPEN, ENDPOINT_FLAG_OPEN_EGRESS, ENDPOINT_FLAG_OPEN_INGRESS, EVENT_DENY,
    INGRESS, RULE_DEFAULT_DENY,
};

const SERVED: [&str; 6] = ["80/TCP", "81/TCP", "80/UDP", "81/UDP", "80/SCTP", "81/SCTP"];

/// The policies of these tests: b accepts a on port 80 (each protocol) and c
/// on anything; a may only reach b on port 80 and c on anything.
const POLICIES: &str = r#"
apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: b-ingress, namespace: app}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
      ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 80}, {protocol: SCTP, port: 80}]
    - from: [{podSelector: {matchLabels: {pod: c}}}]
---
apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: a-egress, namespace: app}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {pod: b}}}]
      ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 80}, {protocol: SCTP, port: 80}]
    - to: [{podSelector: {matchLabels: {pod: c}}}]
"#;

struct Cluster {
    topology: Topology,
    snapshot: Snapshot,
    programmer: Option<Programmer>,
    compiler: Option<policy::Compiler>,
    pin_dir: PathBuf,
}

impl Cluster {
    fn new(tag: &str, subnet: u8, pods: &[&str]) -> Self {
        assert!(common::require_root(), "not root");
        let mut topology = Topology::new(tag, subnet);
        let mut snapshot = Snapshot::default();
        snapshot.add_namespace(Namespace::new("app", Default::default()));
        for name in pods {
            let pod = topology.add_pod(name);
            topology.serve(name, &SERVED);
            snapshot.add_pod(Pod {
                namespace: "app".into(),
                name: (*name).into(),
                labels: std::sync::Arc::new([("pod".to_string(), name.to_string())].into()),
                ips: vec![pod.ipv4, pod.ipv6],
                ports: vec![ContainerPort { name: Some("http".into()), port: 80, protocol: Protocol::TCP }].into(),
                node_name: Some("node".into()),
                uid: None,
            });
        }
        snapshot.node_addresses = [topology.node_ipv4, topology.node_ipv6].into();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-traffic-{tag}"));
        let _ = Datapath::unpin_all(&pin_dir);
        Self { topology, snapshot, programmer: None, compiler: None, pin_dir }
    }

    fn set_policies(&mut self, text: &str) {
        self.snapshot.policies.clear();
        for object in manifest::parse("test", text).unwrap() {
            self.snapshot.apply(Change::Applied(object));
        }
    }

    /// Compile and write what changed, then (first time) attach every pod:
    /// what the agent does.
    fn enforce(&mut self) {
        match self.compiler.as_mut() {
            Some(compiler) => compiler.recompile(&self.snapshot),
            None => self.compiler = Some(policy::Compiler::new(&self.snapshot).tracking_changes()),
        }
        let compiler = self.compiler.as_mut().expect("compiled");
        let ops = compiler.take_ops();
        let desired = compiler.state().clone();
        assert!(desired.rejected.is_empty(), "{:?}", desired.rejected);
        self.topology.enter_node();
        let first = self.programmer.is_none();
        let programmer = self
            .programmer
            .get_or_insert_with(|| Programmer::adopt(Datapath::load(&self.pin_dir).expect("load datapath")));
        programmer.apply(&desired, ops).expect("write the maps");
        if first {
            for pod in &self.topology.pods {
                let endpoint = desired.endpoints[&PodRef::new("app", &pod.name)].id;
                let ifindex = self.topology.ifindex(&pod.host_interface);
                programmer
                    .attach_endpoint(endpoint, &pod.host_interface, ifindex, &[pod.ipv4, pod.ipv6], Some(&pod.cgroup))
                    .expect("attach");
            }
        }
    }

    fn ip(&self, pod: &str, v6: bool) -> IpAddr {
        let pod = self.topology.pod(pod);
        if v6 {
            pod.ipv6
        } else {
            pod.ipv4
        }
    }

    fn endpoint(&self, pod: &str) -> u32 {
        policy::compile(&self.snapshot).endpoints[&PodRef::new("app", pod)].id
    }

    fn policy_id(&self, name: &str) -> u32 {
        let state = policy::compile(&self.snapshot);
        *state.policy_names.iter().find(|(_, r)| r.name == name).unwrap().0
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.programmer = None;
        if let Err(e) = Datapath::unpin_all(&self.pin_dir) {
            eprintln!("removing {}: {e}", self.pin_dir.display());
        }
    }
}

#[test]
fn allowed_and_denied_tcp_udp_sctp_and_ping_over_both_families() {
    let mut cluster = Cluster::new("tr1", 201, &["a", "b", "c"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    let t = &cluster.topology;
    for v6 in [false, true] {
        let (b, c) = (cluster.ip("b", v6), cluster.ip("c", v6));
        let family = if v6 { "IPv6" } else { "IPv4" };
        for protocol in ["TCP", "UDP", "SCTP"] {
            assert_eq!(t.probe("a", protocol, b, 80), "allow", "a -> b {protocol}/80 over {family}: replies pass");
            assert_eq!(t.probe("c", protocol, b, 81), "allow", "c -> b {protocol}/81 over {family}");
        }
        // a's egress refuses TCP and UDP at connect()/sendmsg() time...
        assert_eq!(t.probe("a", "TCP", b, 81), "eperm", "a -> b TCP/81 over {family}");
        assert_eq!(t.probe("a", "UDP", b, 81), "eperm", "a -> b UDP/81 over {family}");
        // ...and on the wire for what sockets cannot judge (raw SCTP, ping).
        assert_eq!(t.probe("a", "SCTP", b, 81), "deny", "a -> b SCTP/81 over {family}");
        assert_eq!(t.ping("a", b), "deny", "ping a -> b over {family}");
        assert_eq!(t.ping("c", b), "allow", "ping c -> b over {family}");
        assert_eq!(t.ping("a", c), "allow", "ping a -> c over {family}");
        // b's ingress refuses what c is not... c is allowed everything; a not port 81 on b:
        // the destination hook alone: b -> a is not isolated, a -> c allowed both ways.
        assert_eq!(t.probe("b", "TCP", cluster.ip("a", v6), 81), "allow", "b -> a TCP/81 over {family}");
    }
    // Traffic from the node (kubelet probes) always passes.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.node_netns,
            "python3",
            &testbed::netprobe(),
            "probe",
            "TCP",
            &cluster.ip("b", false).to_string(),
            "81",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "allow", "node -> b TCP/81");
}

/// The directions no policy restricts, as the agent flagged them on a pod's
/// interface.
fn open_directions(cluster: &Cluster, pod: &str) -> u32 {
    let ifindex = cluster.topology.ifindex(&cluster.topology.pod(pod).host_interface);
    let info = cluster.programmer.as_ref().unwrap().datapath().endpoint(ifindex).expect("an endpoint entry");
    info.flags & ENDPOINT_FLAGS_OPEN
}

#[test]
fn directions_no_policy_restricts_are_flagged_open_until_a_policy_restricts_them() {
    const C_INGRESS: &str = r#"
apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: c-ingress, namespace: app}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
"#;
    let mut cluster = Cluster::new("tr7", 207, &["a", "b", "c"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    // a's egress and b's ingress are isolated; c is not isolated at all.
    assert_eq!(open_directions(&cluster, "a"), ENDPOINT_FLAG_OPEN_INGRESS);
    assert_eq!(open_directions(&cluster, "b"), ENDPOINT_FLAG_OPEN_EGRESS);
    assert_eq!(open_directions(&cluster, "c"), ENDPOINT_FLAGS_OPEN);
    let c = cluster.ip("c", false);
    assert_eq!(cluster.topology.probe("b", "TCP", c, 80), "allow");
    cluster.set_policies(&format!("{POLICIES}---{C_INGRESS}"));
    cluster.enforce();
    assert_eq!(open_directions(&cluster, "c"), ENDPOINT_FLAG_OPEN_EGRESS);
    assert_eq!(cluster.topology.probe("b", "TCP", c, 80), "deny", "c accepts a only");
    assert_eq!(cluster.topology.probe("a", "TCP", c, 80), "allow");
    cluster.set_policies(POLICIES);
    cluster.enforce();
    assert_eq!(open_directions(&cluster, "c"), ENDPOINT_FLAGS_OPEN);
    assert_eq!(cluster.topology.probe("b", "TCP", c, 80), "allow");
}

#[test]
fn a_refused_connect_with_retransmissions_counts_one_blocked_connection_and_one_event() {
    let mut cluster = Cluster::new("tr2", 202, &["a", "b", "d"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    let b = cluster.ip("b", false);
    // d is allowed nothing by b: its SYN and the kernel's retransmissions
    // (after 1 s and 3 s) are dropped at b's veth.
    let out = cluster
        .topology
        .pod_command("d", &["python3", &testbed::netprobe(), "probe", "TCP", &b.to_string(), "80"])
        .env("PROBE_TIMEOUT", "3.5")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "deny");
    let (b_endpoint, policy) = (cluster.endpoint("b"), cluster.policy_id("b-ingress"));
    let programmer = cluster.programmer.as_mut().unwrap();
    let verdicts = programmer.datapath().verdicts();
    let blocked = VerdictKey {
        endpoint: b_endpoint,
        policy_id: policy,
        rule: RULE_DEFAULT_DENY,
        direction: INGRESS,
        kind: EVENT_DENY,
        _pad: [0; 2],
    };
    assert_eq!(verdicts.get(&blocked).copied(), Some(1), "one blocked connection: {verdicts:?}");
    let drops = programmer.datapath().drops();
    let dropped = drops
        .get(&DropKey { direction: INGRESS, reason: datapath_common::reason::POLICY_DENIED })
        .copied()
        .unwrap_or(0);
    assert!(dropped >= 2, "the SYN and its retransmissions were all dropped: {dropped}");
    let events: Vec<_> =
        programmer.datapath_mut().drain_events().into_iter().filter(|e| e.endpoint == b_endpoint).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].policy_id, events[0].rule, events[0].dport, events[0].kind),
        (policy, RULE_DEFAULT_DENY, 80, EVENT_DENY)
    );
}

#[test]
fn a_revoked_allow_cuts_a_live_tcp_connection() {
    let mut cluster = Cluster::new("tr3", 203, &["a", "b"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    let b = cluster.ip("b", false);
    let mut hold = cluster
        .topology
        .pod_command("a", &["python3", &testbed::netprobe(), "hold", &b.to_string(), "80", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connected");
    for _ in 0..5 {
        let line = lines.next().unwrap().unwrap();
        assert!(line.starts_with("ok "), "echoes flow while allowed: {line}");
    }
    // Revoke: b no longer accepts a at all.
    cluster.set_policies(&POLICIES.replace(
        "podSelector: {matchLabels: {pod: a}}}]\n      ports",
        "podSelector: {matchLabels: {pod: nobody}}}]\n      ports",
    ));
    cluster.enforce();
    let revoked_at = monotonic_seconds();
    let after: Vec<(String, f64)> = lines
        .map_while(Result::ok)
        .map(|l| {
            let (status, at) = l.split_once(' ').expect("status and time");
            (status.to_string(), at.parse().expect("seconds"))
        })
        .collect();
    let _ = hold.wait();
    // An exchange already waiting for its echo (up to 0.2 s) may still
    // finish; every exchange begun after that is cut.
    let later: Vec<&(String, f64)> = after.iter().filter(|(_, at)| *at > revoked_at + 0.3).collect();
    assert!(later.len() >= 3 && later.iter().all(|(s, _)| s == "cut"), "after revocation: {after:?}");
}

/// CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic().
fn monotonic_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[test]
fn killing_and_restarting_the_loader_leaves_enforcement_unchanged() {
    let mut cluster = Cluster::new("tr4", 204, &["a", "b", "c"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    // Only pins keep the datapath from here on.
    cluster.programmer = None;
    let (b, c) = (cluster.ip("b", false), cluster.ip("c", false));
    let stop = Arc::new(AtomicBool::new(false));
    let topology = &cluster.topology;
    let results = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(("a -> b TCP/80", topology.probe("a", "TCP", b, 80), "allow"));
                seen.push(("a -> b TCP/81", topology.probe("a", "TCP", b, 81), "eperm"));
                seen.push(("a -> c TCP/81", topology.probe("a", "TCP", c, 81), "allow"));
                seen.push(("a -> b SCTP/81", topology.probe("a", "SCTP", b, 81), "deny"));
            }
            seen
        });
        for _ in 0..3 {
            let mut loader = std::process::Command::new(bulkhead_lab::testbed::product_binary())
                .args(["datapath", "hold", "--pin-dir", cluster.pin_dir.to_str().unwrap()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(loader.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert!(line.contains("adopted"), "loader says {line:?}");
            std::thread::sleep(Duration::from_millis(700));
            loader.kill().unwrap();
            let _ = loader.wait();
            std::thread::sleep(Duration::from_millis(700));
        }
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap()
    });
    assert!(results.len() >= 8, "probed continuously: {}", results.len());
    for (what, got, want) in &results {
        assert_eq!(got, want, "{what} while the loader was killed and restarted");
    }
}

#[test]
fn programs_attached_ahead_of_the_compile_pass_until_it_lands_and_never_reopen_an_enforced_pod() {
    let mut cluster = Cluster::new("tr5", 205, &["a", "b"]);
    cluster.set_policies(POLICIES);
    let b = cluster.ip("b", false);
    let each_pod = |cluster: &Cluster, step: fn(&mut Programmer, &str, u32) -> bool| -> Vec<bool> {
        cluster.topology.enter_node();
        let mut programmer = Programmer::adopt(Datapath::load(&cluster.pin_dir).expect("load datapath"));
        let topology = &cluster.topology;
        topology
            .pods
            .iter()
            .map(|pod| step(&mut programmer, &pod.host_interface, topology.ifindex(&pod.host_interface)))
            .collect()
    };
    let attach_pending_everywhere = |cluster: &Cluster| {
        each_pod(cluster, |programmer, name, ifindex| programmer.attach_pending(name, ifindex).unwrap())
    };
    let detach_pending_everywhere = |cluster: &Cluster| {
        each_pod(cluster, |programmer, name, ifindex| programmer.detach_pending(name, ifindex).unwrap())
    };
    // What the agent does at start-up, while its first compile runs.
    assert_eq!(attach_pending_everywhere(&cluster), [true, true]);
    // Undone while still pending, nothing is left: attaching again starts afresh.
    assert_eq!(detach_pending_everywhere(&cluster), [true, true]);
    assert_eq!(attach_pending_everywhere(&cluster), [true, true]);
    assert_eq!(cluster.topology.probe("a", "SCTP", b, 81), "allow", "pending: as if not attached");
    cluster.enforce();
    assert_eq!(cluster.topology.probe("a", "SCTP", b, 81), "deny", "the real entries replaced the pending ones");
    assert_eq!(cluster.topology.probe("a", "TCP", b, 80), "allow");
    // Undoing the head start leaves a real entry and its programs enforcing.
    assert_eq!(detach_pending_everywhere(&cluster), [false, false]);
    assert_eq!(cluster.topology.probe("a", "SCTP", b, 81), "deny", "still enforced");
    // A restarted agent finds the pods enforced and leaves them so.
    cluster.programmer = None;
    assert_eq!(attach_pending_everywhere(&cluster), [false, false]);
    assert_eq!(cluster.topology.probe("a", "SCTP", b, 81), "deny", "still enforced");
}

/// The flood bench's generator (XDP live frames through a pod's veth, or
/// clones of one socket buffer where the kernel refuses live frames) delivers every
/// frame to the datapath: each one is judged, refused and counted at the
/// flooding pod's own veth.
#[test]
fn every_frame_of_the_flood_generator_is_judged_at_the_senders_veth() {
    // Not a multiple of the clones a cloning run sends: the rest must go too.
    const FRAMES: u32 = 20_003;
    let mut cluster = Cluster::new("tr6", 206, &["a", "b"]);
    cluster.set_policies(POLICIES);
    cluster.enforce();
    let a = cluster.topology.pod("a").clone();
    let b = cluster.ip("b", false);
    // `enforce` left this thread in the node's namespace.
    testbed::generator::enable_veth_napi(&a.host_interface).expect("NAPI on a's veth");
    let sender = std::thread::spawn(move || {
        testbed::enter_netns(&a.netns).expect("into pod a");
        let generator = testbed::generator::Generator::load().expect("load the generator");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        // a may reach b on port 80 only.
        let frame = testbed::packet::PacketSpec::new(
            a.ipv4,
            b,
            testbed::packet::L4::Tcp { sport: 0, dport: 9, flags: testbed::packet::TCP_SYN },
        )
        .frame();
        generator.send(ifindex, &frame, FRAMES).expect("send");
        eprintln!("the frames were sent by {}", generator.engine());
    });
    sender.join().expect("the sending thread");
    let programmer = cluster.programmer.as_mut().unwrap();
    let refused = programmer
        .datapath()
        .drops()
        .get(&DropKey { direction: datapath_common::EGRESS, reason: datapath_common::reason::POLICY_DENIED })
        .copied()
        .unwrap_or(0);
    assert_eq!(refused, u64::from(FRAMES), "every frame sent was refused and counted");
}
