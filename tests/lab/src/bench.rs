//! `bulkhead bench <what>`, run by `cargo xtask bench`: numbers printed as
//! they are measured, and one JSON object on the last line.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bulkhead::dataplane::{sync::Programmer, Datapath};
use bulkhead_crds::Protocol;
use bulkhead_policy::{
    self as policy, manifest, state::address_key, Change, ContainerPort, DesiredState, Namespace, Object, Pod, PodRef,
    PolicyKind, PolicyObject, PolicyRef, Snapshot,
};
use datapath_common::{
    identity, policy_prefix, program_names, proto, reason, verdict, EndpointInfo, PolicyKey, PolicyValue, EGRESS,
    IPV4_MAPPED_PREFIX,
};
use serde_json::json;

use crate::testbed::{
    packet::{PacketSpec, L4, TCP_ACK, TCP_SYN},
    TestPod, Topology,
};

pub fn run(what: &str) -> Result<()> {
    match what {
        "datapath" => datapath(),
        // The BPF_PROG_TEST_RUN part alone (no iperf3).
        "datapath:test_run" => {
            let test_run = test_run_numbers()?;
            println!("{}", json!({ "test_run_ns": rounded(&test_run) }));
            Ok(())
        }
        "compile" => compile(),
        "convergence" => convergence(),
        "connections" => crate::connections::run(),
        "flood" => crate::flood::run(),
        "scale" => crate::scale::run(&[10_000, 50_000, 150_000], true),
        other => match other.strip_prefix("scale:") {
            // `scale:10000,50000,api`: chosen folder sizes, and the API server's if `api` is named.
            Some(chosen) => {
                let chosen: Vec<&str> = chosen.split(',').collect();
                let sizes = chosen.iter().filter(|c| **c != "api").map(|c| c.parse()).collect::<Result<Vec<usize>, _>>()?;
                crate::scale::run(&sizes, chosen.contains(&"api"))
            }
            None => bail!("unknown benchmark {other:?}: datapath[:test_run], compile, connections, convergence, flood or scale[:sizes]"),
        },
    }
}

/// splitmix64: the same sequence every run, for generated clusters and
/// resampling.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Of an even count, the mean of the two middle values.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

// ---------------------------------------------------------------------------
// Datapath: BPF_PROG_TEST_RUN per-packet cost, and iperf3 through veths.

const BENCH_ENDPOINT: u32 = 7;
const POD: Ipv4Addr = Ipv4Addr::new(10, 199, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 199, 2, 20);
const PEER_IDENTITY: u32 = 5000;

pub(crate) fn allow() -> PolicyValue {
    PolicyValue::new(verdict::ALLOW, 1, 0)
}

/// Fill the policy map with `total` entries: the hot ones of the bench
/// endpoint plus filler for other endpoints and identities; and the ipcache
/// with one address per filler identity (for cache-cold lookups).
fn fill(dp: &mut Datapath, total: usize) -> Result<Vec<Ipv4Addr>> {
    dp.set_policy(policy_prefix::FULL, PolicyKey::new(BENCH_ENDPOINT, EGRESS, PEER_IDENTITY, proto::TCP, 80), allow())?;
    let deny = PolicyValue { verdict: verdict::DENY, ..allow() };
    dp.set_policy(policy_prefix::ANY_PROTOCOL, PolicyKey::new(BENCH_ENDPOINT, EGRESS, identity::ANY, 0, 0), deny)?;
    let mut cold_peers = Vec::new();
    for i in 0..total.saturating_sub(2) {
        // Filler: many identities allowed on the bench endpoint, spread over ports.
        let peer = 10_000 + (i / 8) as u32;
        let port = 1000 + (i % 8) as u16;
        dp.set_policy(policy_prefix::FULL, PolicyKey::new(BENCH_ENDPOINT, EGRESS, peer, proto::TCP, port), allow())?;
        if i % 8 == 0 && cold_peers.len() < 100_000 {
            let n = cold_peers.len() as u32;
            let address = Ipv4Addr::new(10, 198, (n >> 8) as u8, n as u8);
            dp.set_ipcache(IPV4_MAPPED_PREFIX + 32, address_key(IpAddr::V4(address)), peer)?;
            cold_peers.push(address);
        }
    }
    Ok(cold_peers)
}

fn frame(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    PacketSpec::new(IpAddr::V4(POD), IpAddr::V4(dst), L4::Tcp { sport, dport, flags }).frame()
}

/// Runs per round of a repeated measurement; the 16 rounds of new
/// connections (one uncounted) stay below source port 61000, where the
/// one-shot connections start.
const NEW_FLOWS_PER_ROUND: u32 = 3500;
const ROUNDS: u16 = 15;
/// TC verdicts (linux/pkt_cls.h): TC_ACT_OK and TC_ACT_SHOT.
const PASS: i32 = 0;
const SHOT: i32 = 2;
const SIZES: [(&str, usize); 3] = [("1k", 1_000), ("100k", 100_000), ("1m", 1_000_000)];

/// A datapath loaded for the bench under its own pin directory, unpinned
/// when dropped, whether the bench got through or not.
struct BenchDatapath {
    label: &'static str,
    dp: Datapath,
    pin_dir: PathBuf,
    cold_peers: Vec<Ipv4Addr>,
    /// `rate_limited` as last read.
    limited_before: u64,
}

impl BenchDatapath {
    fn load(label: &'static str, total: usize) -> Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-bench-{label}"));
        let _ = Datapath::unpin_all(&pin_dir);
        let dp = Datapath::load(&pin_dir)?;
        let mut bench = BenchDatapath { label, dp, pin_dir, cold_peers: Vec::new(), limited_before: 0 };
        let dp = &mut bench.dp;
        dp.set_endpoint(1, EndpointInfo::new(BENCH_ENDPOINT, 0, &[address_key(IpAddr::V4(POD))]))?;
        dp.set_local_address(address_key(IpAddr::V4(POD)), BENCH_ENDPOINT)?;
        dp.set_ipcache(IPV4_MAPPED_PREFIX + 32, address_key(IpAddr::V4(PEER)), PEER_IDENTITY)?;
        dp.load_bench_fixture()?;
        let started = Instant::now();
        bench.cold_peers = fill(dp, total)?;
        eprintln!("  {label}: {total} policy entries written in {:.1} s", started.elapsed().as_secs_f64());
        Ok(bench)
    }

    /// One BPF_PROG_TEST_RUN of `repeat` runs: mean ns per run, after
    /// checking the program came to the verdict the measurement is about.
    fn run_ns(&self, program: &'static str, packet: &[u8], repeat: u32, expected: i32) -> Result<f64> {
        let (verdict, duration) = self.dp.test_run(program, packet, repeat)?;
        if verdict != expected {
            bail!("bench {}: {program} returned {verdict}, expected {expected}: the bench is not timing the path it names", self.label);
        }
        Ok(duration.as_nanos() as f64)
    }

    fn one_shot_ns(&self, frames: &[Vec<u8>], expected: i32) -> Result<f64> {
        let samples = frames
            .iter()
            .map(|frame| self.run_ns(program_names::FROM_POD, frame, 1, expected))
            .collect::<Result<Vec<_>>>()?;
        Ok(median(samples))
    }
}

impl Drop for BenchDatapath {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(&self.pin_dir);
    }
}

/// For each datapath, the median over `ROUNDS` rounds of the mean ns per
/// run of `packet(round)` repeated `NEW_FLOWS_PER_ROUND` times. The
/// datapaths take turns round by round, after a round each that is not
/// counted (first-touch and frequency ramp-up): the machine's drift over
/// the measurement falls on every size alike, so the spread between sizes
/// is theirs and not the machine's.
fn interleaved_ns(
    datapaths: &mut [BenchDatapath],
    program: &'static str,
    expected: i32,
    packet: impl Fn(u16) -> Vec<u8>,
) -> Result<Vec<f64>> {
    interleaved_checked_ns(datapaths, program, expected, packet, |_| Ok(()))
}

/// `interleaved_ns`, calling `after_run` on each datapath after each of its
/// runs (untimed): to check what the run did besides its verdict.
fn interleaved_checked_ns(
    datapaths: &mut [BenchDatapath],
    program: &'static str,
    expected: i32,
    packet: impl Fn(u16) -> Vec<u8>,
    mut after_run: impl FnMut(&mut BenchDatapath) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut rounds = vec![Vec::new(); datapaths.len()];
    for round in 0..=ROUNDS {
        let frame = packet(round);
        for (bench, rounds) in datapaths.iter_mut().zip(&mut rounds) {
            let ns = bench.run_ns(program, &frame, NEW_FLOWS_PER_ROUND, expected)?;
            after_run(bench)?;
            if round > 0 {
                rounds.push(ns);
            }
        }
    }
    Ok(rounds.into_iter().map(median).collect())
}

/// A run may move between CPUs, and each CPU has its own budget.
const CPUS_THAT_MAY_SEND: u64 = 4;

/// Events the rate limit kept back, over every endpoint and direction.
fn rate_limited(dp: &Datapath) -> u64 {
    dp.drops().iter().filter(|(key, _)| key.reason == reason::EVENT_RATE_LIMITED).map(|(_, count)| count).sum()
}

fn test_run_numbers() -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let mut datapaths =
        SIZES.iter().map(|&(label, total)| BenchDatapath::load(label, total)).collect::<Result<Vec<_>>>()?;
    let datapaths = &mut datapaths[..];

    // Conntrack hit: one established flow, the same packet repeated.
    // (Source port 65535: outside the new-flow runs' ports below.)
    for bench in datapaths.iter() {
        bench.run_ns(program_names::FROM_POD, &frame(PEER, 65535, 80, TCP_SYN), 1, PASS)?;
    }
    let ct_hit = interleaved_ns(datapaths, program_names::FROM_POD, PASS, |_| frame(PEER, 65535, 80, TCP_ACK))?;
    // New connections, allowed and denied, with hot caches: the fixture
    // moves the source port on by one each run, so every run is a
    // connection conntrack has not seen (each round its own ports).
    let first_port = |round: u16| round * NEW_FLOWS_PER_ROUND as u16;
    let new_allowed = interleaved_ns(datapaths, program_names::BENCH_NEW_FLOW, PASS, |round| {
        frame(PEER, first_port(round), 80, TCP_SYN)
    })?;
    // Denied, each refusal's event sent: a budget no run exhausts, the ring
    // buffer drained after each run (it holds one run's events), and every
    // event checked for.
    for bench in datapaths.iter_mut() {
        bench.dp.set_events_per_second(u64::MAX)?;
    }
    let denied = interleaved_checked_ns(
        datapaths,
        program_names::BENCH_NEW_FLOW,
        SHOT,
        |round| frame(PEER, first_port(round), 81, TCP_SYN),
        |bench| {
            let sent = bench.dp.drain_events().len();
            if sent != NEW_FLOWS_PER_ROUND as usize {
                bail!("bench {}: {sent} events for {NEW_FLOWS_PER_ROUND} refusals", bench.label);
            }
            Ok(())
        },
    )?;
    // Denied, each event kept back by the rate limit: a budget of one a second.
    for bench in datapaths.iter_mut() {
        bench.dp.set_events_per_second(1)?;
        bench.dp.drain_events();
        bench.limited_before = rate_limited(&bench.dp);
    }
    let denied_no_event = interleaved_checked_ns(
        datapaths,
        program_names::BENCH_NEW_FLOW,
        SHOT,
        |round| frame(PEER, first_port(round), 82, TCP_SYN),
        |bench| {
            let limited = rate_limited(&bench.dp);
            let kept_back = limited - bench.limited_before;
            bench.limited_before = limited;
            // One event a second per CPU may still go through.
            if kept_back + CPUS_THAT_MAY_SEND < u64::from(NEW_FLOWS_PER_ROUND) {
                bail!("bench {}: {kept_back} of {NEW_FLOWS_PER_ROUND} events kept back", bench.label);
            }
            bench.dp.drain_events();
            Ok(())
        },
    )?;

    // The same, one new connection per BPF_PROG_TEST_RUN call: what a
    // connection costs when it arrives with caches the syscall cooled. Each
    // datapath has its own conntrack, so each sees these as new.
    let one_shot_allowed: Vec<Vec<u8>> = (0..3000).map(|i| frame(PEER, 61000 + i, 80, TCP_SYN)).collect();
    let one_shot_denied: Vec<Vec<u8>> = (0..3000).map(|i| frame(PEER, 61000 + i, 81, TCP_SYN)).collect();
    // What BPF_PROG_TEST_RUN itself costs for one run: an ARP frame, which
    // the program passes right after the endpoint lookup.
    let arp = vec![crate::testbed::packet::arp_frame(); 3000];
    for (i, bench) in datapaths.iter().enumerate() {
        let label = bench.label;
        let (ct_hit, new_allowed, denied, denied_no_event) = (ct_hit[i], new_allowed[i], denied[i], denied_no_event[i]);
        let harness = bench.one_shot_ns(&arp, PASS)?;
        let one_shot_allowed = bench.one_shot_ns(&one_shot_allowed, PASS)?;
        let one_shot_denied = bench.one_shot_ns(&one_shot_denied, SHOT)?;
        println!("test_run {label:>4}: ct_hit {ct_hit:.0} ns  new_allowed {new_allowed:.0} ns  denied {denied:.0} ns  denied, no event {denied_no_event:.0} ns");
        println!("test_run {label:>4}, one new connection per call: allowed {one_shot_allowed:.0} ns  denied {one_shot_denied:.0} ns  (harness alone, ARP: {harness:.0} ns)");
        out.insert(format!("ct_hit_{label}"), ct_hit);
        out.insert(format!("new_allowed_{label}"), new_allowed);
        out.insert(format!("denied_{label}"), denied);
        out.insert(format!("denied_no_event_{label}"), denied_no_event);
        out.insert(format!("one_shot_allowed_{label}"), one_shot_allowed);
        out.insert(format!("one_shot_denied_{label}"), one_shot_denied);
        out.insert(format!("one_shot_harness_{label}"), harness);
    }

    // The denial figures at the largest size under the names of their own.
    out.insert("denied".into(), out["denied_1m"]);
    out.insert("denied_no_event".into(), out["denied_no_event_1m"]);

    // Cache-cold: random peers among 100k identities with entries, at 1M.
    let largest = datapaths.last().context("no datapath")?;
    let mut state = 0x2545f4914f6cdd1du64;
    let cold: Vec<Vec<u8>> = (0..3000)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let peer = largest.cold_peers[(state % largest.cold_peers.len() as u64) as usize];
            frame(peer, 30000 + i, 1000 + (state % 8) as u16, TCP_SYN)
        })
        .collect();
    let cold_1m = largest.one_shot_ns(&cold, PASS)?;
    println!("test_run cold_1m: {cold_1m:.0} ns");
    out.insert("cold_1m".into(), cold_1m);
    Ok(out)
}

/// What the agent would compile for two pods `client` and `server` of
/// namespace `bench`, the server's container listening on `port`, under
/// `policy` (manifests).
pub(crate) fn two_pod_policy(client: &TestPod, server: &TestPod, port: u16, policy: &str) -> Result<DesiredState> {
    let mut snapshot = Snapshot::default();
    snapshot.add_namespace(Namespace::new("bench", Default::default()));
    for (name, pod) in [("client", client), ("server", server)] {
        snapshot.add_pod(Pod {
            namespace: "bench".into(),
            name: name.into(),
            labels: std::sync::Arc::new([("app".to_string(), name.to_string())].into()),
            ips: vec![pod.ipv4],
            ports: vec![ContainerPort { name: None, port, protocol: Protocol::TCP }].into(),
            node_name: None,
            uid: None,
        });
    }
    for object in manifest::parse("bench", policy)? {
        snapshot.apply(Change::Applied(object));
    }
    Ok(policy::compile(&snapshot))
}

fn iperf_gbps(topology: &Topology, server_ip: IpAddr) -> Result<f64> {
    let out = topology
        .pod_command("client", &["iperf3", "-c", &server_ip.to_string(), "-t", "3", "-J"])
        .stderr(Stdio::null())
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 1e9)
}

fn throughput_numbers() -> Result<BTreeMap<String, f64>> {
    let mut topology = Topology::new("bnch", 198);
    let client = topology.add_pod("client");
    let server = topology.add_pod("server");
    let mut iperf = Command::new("ip")
        .args(["netns", "exec", &server.netns, "iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let rounds = 10;
    let mut none = Vec::new();
    let mut with_bulkhead = Vec::new();
    let mut with_iptables = Vec::new();

    // Bulkhead: a 10k-entry policy (10k pods' identities allowed elsewhere) plus the iperf allow.
    let desired = two_pod_policy(&client, &server, 5201, &server_ingress_policy(5201))?;
    let pin_dir = PathBuf::from("/sys/fs/bpf/bulkhead-bench-tp");
    let _ = Datapath::unpin_all(&pin_dir);
    topology.enter_node();
    let mut programmer = Programmer::adopt(Datapath::load(&pin_dir)?);
    programmer.apply(&desired, Vec::new())?;
    let server_endpoint = desired.endpoints[&PodRef::new("bench", "server")].id;
    for i in 0..10_000u32 {
        programmer.datapath_mut().set_policy(
            policy_prefix::FULL,
            PolicyKey::new(server_endpoint, 0, 100_000 + i, proto::TCP, 8080),
            allow(),
        )?;
    }

    // iptables: the same allow as 10k stateless rules in the node's FORWARD
    // chain, the matching one last (no conntrack shortcut).
    let rules: String = (0..10_000u32)
        .map(|i| {
            format!(
                "-A BHBENCH -s 10.197.{}.{}/32 -d {} -p tcp --dport 5201 -j ACCEPT\n",
                i / 250,
                i % 250,
                server.ipv4
            )
        })
        .chain([
            format!("-A BHBENCH -s {} -d {} -p tcp --dport 5201 -j ACCEPT\n", client.ipv4, server.ipv4),
            format!("-A BHBENCH -s {} -d {} -p tcp --sport 5201 -j ACCEPT\n", server.ipv4, client.ipv4),
            "-A BHBENCH -j DROP\n".to_string(),
        ])
        .collect();
    let restore = format!("*filter\n:BHBENCH - [0:0]\n{rules}COMMIT\n");

    let bulkhead_iperf = |programmer: &mut Programmer| -> Result<f64> {
        for pod in [&client, &server] {
            let ifindex = topology.ifindex(&pod.host_interface);
            let endpoint = desired.endpoints[&PodRef::new("bench", &pod.name)].id;
            programmer.attach_endpoint(endpoint, &pod.host_interface, ifindex, &[pod.ipv4], None)?;
        }
        let gbps = iperf_gbps(&topology, server.ipv4);
        for pod in [&client, &server] {
            let ifindex = topology.ifindex(&pod.host_interface);
            programmer.detach_endpoint(&pod.host_interface, ifindex, &[pod.ipv4], None)?;
        }
        gbps
    };
    for round in 0..rounds {
        // Which of the two goes first alternates round by round, so a drift
        // within a round (the machine's, or iperf's own warming) falls on
        // both alike instead of always on the second.
        if round % 2 == 0 {
            none.push(iperf_gbps(&topology, server.ipv4)?);
            with_bulkhead.push(bulkhead_iperf(&mut programmer)?);
        } else {
            with_bulkhead.push(bulkhead_iperf(&mut programmer)?);
            none.push(iperf_gbps(&topology, server.ipv4)?);
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &topology.node_netns, "iptables-restore", "--noflush"])
            .stdin(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().context("stdin")?.write_all(restore.as_bytes())?;
        child.wait()?;
        topology.node_exec(&["iptables", "-I", "FORWARD", "-j", "BHBENCH"]);
        with_iptables.push(iperf_gbps(&topology, server.ipv4)?);
        topology.node_exec(&["iptables", "-D", "FORWARD", "-j", "BHBENCH"]);
        topology.node_exec(&["iptables", "-F", "BHBENCH"]);
        topology.node_exec(&["iptables", "-X", "BHBENCH"]);
        println!(
            "iperf3 round {}: none {:.2} Gbit/s  bulkhead {:.2}  iptables {:.2}",
            round + 1,
            none[round],
            with_bulkhead[round],
            with_iptables[round]
        );
    }
    let _ = iperf.kill();
    let _ = iperf.wait();
    drop(programmer);
    Datapath::unpin_all(&pin_dir)?;
    let mut out = BTreeMap::new();
    out.insert("none".to_string(), median(none));
    out.insert("bulkhead".to_string(), median(with_bulkhead));
    out.insert("iptables".to_string(), median(with_iptables));
    Ok(out)
}

/// Figures to two decimals, for the JSON line.
fn rounded(figures: &BTreeMap<String, f64>) -> serde_json::Map<String, serde_json::Value> {
    figures.iter().map(|(k, v)| (k.clone(), json!((v * 100.0).round() / 100.0))).collect()
}

fn datapath() -> Result<()> {
    let test_run = test_run_numbers()?;
    let throughput = throughput_numbers()?;
    let ratio_none = throughput["bulkhead"] / throughput["none"];
    let ratio_iptables = throughput["bulkhead"] / throughput["iptables"];
    println!("throughput medians: none {:.2} Gbit/s, bulkhead {:.2} ({ratio_none:.2}x none), iptables {:.2} (bulkhead {ratio_iptables:.2}x)", throughput["none"], throughput["bulkhead"], throughput["iptables"]);
    // Flatness: the largest over the smallest of 1k, 100k and 1M entries.
    let mut spread = BTreeMap::new();
    for metric in ["ct_hit", "new_allowed", "denied", "denied_no_event"] {
        let values: Vec<f64> = ["1k", "100k", "1m"].iter().map(|size| test_run[&format!("{metric}_{size}")]).collect();
        let max = values.iter().cloned().fold(f64::MIN, f64::max);
        let min = values.iter().cloned().fold(f64::MAX, f64::min);
        spread.insert(metric.to_string(), max / min);
    }
    println!(
        "spread from 1k to 1M entries (largest / smallest): {}",
        spread.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "{}",
        json!({
            "test_run_ns": rounded(&test_run),
            "test_run_spread": rounded(&spread),
            "throughput_gbps": rounded(&throughput),
            "bulkhead_vs_none": (ratio_none * 100.0).round() / 100.0,
            "bulkhead_vs_iptables": (ratio_iptables * 100.0).round() / 100.0,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Compile: 10k pods in 500 namespaces with 2k policies of mixed shapes.

/// A generated cluster, and its policy objects as written (for edits).
fn synthetic_cluster(pods: usize, namespaces: usize, policies: usize) -> (Snapshot, BTreeMap<PolicyRef, PolicyObject>) {
    let mut snapshot = Snapshot::default();
    let mut objects = BTreeMap::new();
    for n in 0..namespaces {
        let labels = [
            ("team".to_string(), format!("t{}", n % 20)),
            ("env".to_string(), if n % 3 == 0 { "prod" } else { "dev" }.to_string()),
        ]
        .into();
        snapshot.add_namespace(Namespace::new(&format!("ns{n}"), labels));
    }
    for i in 0..pods {
        let ns = i % namespaces;
        let app = (i / namespaces) % 10;
        snapshot.add_pod(Pod {
            namespace: format!("ns{ns}").into(),
            name: format!("pod{i}").into(),
            labels: std::sync::Arc::new(
                [
                    ("app".to_string(), format!("app{app}")),
                    ("tier".to_string(), ["web", "api", "db"][app % 3].to_string()),
                ]
                .into(),
            ),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, (100 + i / 65536) as u8, (i / 256 % 256) as u8, (i % 256) as u8))],
            ports: vec![ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::TCP }].into(),
            node_name: None,
            uid: None,
        });
    }
    for p in 0..policies {
        let ns = p % namespaces;
        let app = p % 10;
        let text = match p % 5 {
            0 => format!("kind: ConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{tier: web}}}}}}]\n      ports: [{{port: 8080}}, {{port: 9000, endPort: 9100}}]\n"),
            1 => format!("kind: ConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n    - from: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}}}]\n  egress:\n    - to: [{{podSelector: {{matchLabels: {{tier: db}}}}}}]\n      ports: [{{port: http}}]\n", p % 20),
            2 => format!("kind: ConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{ipBlock: {{cidr: 192.0.{}.0/24, except: [192.0.{}.128/25]}}}}]\n      ports: [{{protocol: UDP, port: 53}}]\n", p % 250, p % 250),
            3 => format!("kind: ConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [api, web]}}]}}\n  ingress:\n    - from: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}, podSelector: {{matchLabels: {{app: app{app}}}}}}}]\n"),
            _ => {
                let tier = if p % 2 == 0 { "Admin" } else { "Baseline" };
                let (own, other) = (format!("t{}", p % 20), format!("t{}", (p + 1) % 20));
                let deny = format!("{{action: Deny, from: [{{namespaceSelector: {{matchLabels: {{team: {other}}}}}}}], ports: [{{port: 22}}]}}");
                let pass = format!("{{action: Pass, from: [{{namespaceSelector: {{matchLabels: {{team: {own}}}}}, podSelector: {{matchLabels: {{tier: web}}}}}}]}}");
                format!("kind: ClusterConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: c{p}}}\nspec:\n  tier: {tier}\n  priority: {}\n  subject: {{namespaceSelector: {{matchLabels: {{team: {own}}}}}}}\n  ingress:\n    - {deny}\n    - {pass}\n", p % 1000)
            }
        };
        for object in manifest::parse("bench", &text).expect("bench policy parses") {
            if let Object::Policy(policy) = &object {
                objects.insert(policy.policy_ref(), (**policy).clone());
            }
            snapshot.apply(Change::Applied(object));
        }
    }
    (snapshot, objects)
}

/// Change a policy with `edit` and back, 20 times over, timing each incremental update.
fn alternate(
    compiler: &mut policy::Compiler,
    snapshot: &mut Snapshot,
    objects: &BTreeMap<PolicyRef, PolicyObject>,
    key: &PolicyRef,
    edit: impl Fn(&mut PolicyObject),
) -> Vec<f64> {
    let original = objects[key].clone();
    (0..20)
        .map(|round| {
            let mut object = original.clone();
            if round % 2 == 0 {
                edit(&mut object);
            }
            snapshot.admit(&object);
            time_ms(|| {
                compiler.update(snapshot, &[policy::Changed::Policy(key.clone())]);
                std::hint::black_box(compiler.take_ops());
            })
        })
        .collect()
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64() * 1000.0
}

fn compile() -> Result<()> {
    let (snapshot, objects) = synthetic_cluster(10_000, 500, 2_000);
    let mut full = Vec::new();
    let mut state = None;
    for _ in 0..5 {
        full.push(time_ms(|| state = Some(policy::compile(&snapshot))));
    }
    let state = state.expect("compiled");
    let full_ms = median(full);
    let rss = peak_rss_mb();
    println!("10k pods / 500 namespaces / 2k policies: full compile {full_ms:.0} ms (median of 5), {} entries, peak RSS {rss:.0} MB", state.policy.len());

    // One pod's labels change, then change back, 20 times over: each an
    // incremental update of a compiler that holds the whole cluster, until
    // it hands out the map operations.
    let mut compiler = policy::Compiler::new(&snapshot).tracking_changes();
    let mut changed = snapshot.clone();
    let pod_ref = PodRef::new("ns7", "pod7");
    let mut pod_change = Vec::new();
    for round in 0..20 {
        let tier = if round % 2 == 0 { "db" } else { "web" };
        std::sync::Arc::make_mut(&mut changed.pods.get_mut(&pod_ref).expect("pod7").labels)
            .insert("tier".into(), tier.into());
        pod_change.push(time_ms(|| {
            compiler.update(&changed, &[policy::Changed::Pod(pod_ref.clone())]);
            std::hint::black_box(compiler.take_ops());
        }));
    }
    // One policy's pod selector changes (to every pod of its namespace), and back.
    let key = PolicyRef { kind: PolicyKind::ConnectionPolicy, namespace: "ns3".into(), name: "p3".into() };
    let policy_change = alternate(&mut compiler, &mut changed, &objects, &key, |object| {
        if let PolicyObject::Connection(p) = object {
            p.spec.pod_selector = Default::default();
        }
    });
    // A cluster policy whose subject is 25 namespaces (500 pods) changes priority, and back.
    let key = PolicyRef { kind: PolicyKind::ClusterConnectionPolicy, namespace: String::new(), name: "c4".into() };
    let cluster_policy_change = alternate(&mut compiler, &mut changed, &objects, &key, |object| {
        if let PolicyObject::Cluster(p) = object {
            p.spec.priority += 1;
        }
    });
    anyhow::ensure!(
        compiler.full_compiles() == 1,
        "the changes were meant to be incremental, yet {} full compiles ran",
        compiler.full_compiles() - 1
    );
    anyhow::ensure!(
        compiler.state() == &policy::compile(&changed),
        "the incremental state differs from a fresh compile"
    );
    drop(compiler);
    let (pod_change_ms, policy_change_ms, cluster_policy_change_ms) =
        (median(pod_change), median(policy_change), median(cluster_policy_change));
    println!("incremental update + map operations, median of 20: pod label change {pod_change_ms:.2} ms; policy change {policy_change_ms:.2} ms; cluster policy change (500 pods) {cluster_policy_change_ms:.2} ms");
    drop(state);
    let (big, _) = synthetic_cluster(150_000, 500, 2_000);
    let full_ms_150k = time_ms(|| {
        std::hint::black_box(policy::compile(&big));
    });
    println!("150k pods: full compile {full_ms_150k:.0} ms");
    println!(
        "{}",
        json!({
            "full_ms": full_ms.round(),
            "peak_rss_mb": rss.round(),
            "pod_change_ms": round2(pod_change_ms),
            "policy_change_ms": round2(policy_change_ms),
            "cluster_policy_change_ms": round2(cluster_policy_change_ms),
            "full_ms_150k": full_ms_150k.round(),
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Convergence: an object change until the agent reports the datapath holds
// it, through a followed folder and through a real API server.

const CONVERGENCE_PIN_DIR: &str = "/sys/fs/bpf/bulkhead-bench-convergence";

pub(crate) fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    let rank = ((values.len() - 1) as f64 * p).round() as usize;
    *values.select_nth_unstable_by(rank, |a, b| a.partial_cmp(b).expect("no NaN")).1
}

pub(crate) fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Pod `server` of namespace `bench` takes connections from pod `client` on
/// `port` only.
pub(crate) fn server_ingress_policy(port: u16) -> String {
    format!("apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {{name: server-ingress, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n      ports: [{{protocol: TCP, port: {port}}}]\n")
}

/// The convergence bench's agent, from `command` (in the node's namespace),
/// following `source`; returned once it enforces both pods.
fn convergence_agent(topology: &Topology, mut command: Command, source: &str) -> Result<crate::testbed::Process> {
    let agent = crate::testbed::Process(
        command
            .args(["agent", "--node-name", "bench-node", "--pin-dir", CONVERGENCE_PIN_DIR])
            .args([
                "--metrics-address",
                crate::testbed::AGENT_ADDRESS,
                "--debug-address",
                crate::testbed::AGENT_ADDRESS,
            ])
            .arg(format!("--source={source}"))
            .arg(format!("--state-dir={}", topology.state_dir("bench-node").display()))
            .env("RUST_LOG", "warn,netlink_packet_route=error")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_for("the agent enforces both pods", Duration::from_secs(30), || {
        topology.agent_state()["endpoints"].as_object().is_some_and(|e| e.len() == 2)
    })?;
    Ok(agent)
}

fn convergence() -> Result<()> {
    let _ = Datapath::unpin_all(CONVERGENCE_PIN_DIR);
    let mut topology = Topology::new("cvg", 183);
    let client = topology.add_pod("client");
    let server = topology.add_pod("server");
    let exe = crate::testbed::product_binary();
    // In a folder a pod carries its status; through the API server a kubelet would patch it in.
    let pod_yaml = |pod: &crate::testbed::TestPod, app: &str, with_status: bool| {
        let status =
            format!("status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n", ip = pod.ipv4);
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}, namespace: bench, labels: {{app: {app}}}}}\nspec: {{nodeName: bench-node, containers: [{{name: main, image: none}}]}}\n{}", if with_status { status.as_str() } else { "" })
    };
    let cluster = |with_status: bool| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench}}\n{}{}",
            pod_yaml(&client, "client", with_status),
            pod_yaml(&server, "server", with_status)
        )
    };

    // Through a folder.
    let folder = std::env::temp_dir().join("bulkhead-bench-convergence");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder)?;
    let write = |name: &str, text: &str| crate::testbed::write_atomically(&folder.join(name), text);
    write("cluster.yaml", &cluster(true))?;
    write("policy.yaml", &server_ingress_policy(1000))?;
    let agent = convergence_agent(&topology, topology.node_command(&exe), &format!("dir:{}", folder.display()))?;
    let mut dir_ms = Vec::new();
    for round in 0..100u16 {
        let started = Instant::now();
        write("policy.yaml", &server_ingress_policy(1001 + round))?;
        let revision = bulkhead::source::dir::revision(&folder)?;
        wait_for("the folder change is enforced", Duration::from_secs(10), || {
            topology.agent_state()["revision"] == revision.as_str()
        })?;
        dir_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&folder);
    let (dir_p50, dir_p99) = (percentile(dir_ms.clone(), 0.5), percentile(dir_ms, 0.99));
    println!("dir: change -> enforced p50 {dir_p50:.1} ms, p99 {dir_p99:.1} ms (100 changes)");

    // Through a real API server, running inside the node's namespace.
    let plane = crate::testbed::apiserver::ControlPlane::start(&topology.node_netns, "cvg");
    plane.install_bulkhead();
    plane.apply(&cluster(false));
    for (name, pod) in [("client", &client), ("server", &server)] {
        let status = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}]}}}}",
            ip = pod.ipv4
        );
        let out = plane.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            "bench",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ]);
        anyhow::ensure!(out.status.success(), "patching pod status: {}", String::from_utf8_lossy(&out.stderr));
    }
    plane.apply(&server_ingress_policy(1000));
    let _ = Datapath::unpin_all(CONVERGENCE_PIN_DIR);
    let agent = convergence_agent(&topology, plane.command_as("admin", &exe), "kubernetes")?;
    // The bench's own client talks to the API server from the node's namespace.
    topology.enter_node();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let api_ms = runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig("admin"))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let policies: kube::Api<bulkhead_crds::ConnectionPolicy> = kube::Api::namespaced(client, "bench");
        let mut api_ms = Vec::new();
        for round in 0..60u16 {
            let started = Instant::now();
            let patch = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"protocol": "TCP", "port": 2000 + round}]}]}});
            let updated = policies.patch("server-ingress", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
            let generation = updated.metadata.generation.context("a generation")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let state = topology.agent_state();
                if state["policies"]["ConnectionPolicy bench/server-ingress"]["generation"] == generation {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "generation {generation} not enforced in 10 s");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            api_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::Ok(api_ms)
    })?;
    drop(agent);
    drop(plane);
    let _ = Datapath::unpin_all(CONVERGENCE_PIN_DIR);
    let (api_p50, api_p99) = (percentile(api_ms.clone(), 0.5), percentile(api_ms, 0.99));
    println!("api: change -> enforced p50 {api_p50:.1} ms, p99 {api_p99:.1} ms (60 changes)");
    println!(
        "{}",
        json!({"dir_p50_ms": round2(dir_p50), "dir_p99_ms": round2(dir_p99), "api_p50_ms": round2(api_p50), "api_p99_ms": round2(api_p99)})
    );
    Ok(())
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}
