//! `bench connections`: new TCP connections per second between two pods,
//! with no policy, with an empty TC program, with Bulkhead and with iptables,
//! side by side.
//!
//! Client and server are threads of this process moved into the pods'
//! network namespaces (`setns` is per thread): no helper process to start,
//! wait for or lose. A connection is connect, one byte from the server and
//! its FIN, and the client's close with an RST (`SO_LINGER` 0): neither end
//! keeps a TIME_WAIT, so the client's ports are free again at once, as with
//! a load balancer's health checks or an RPC client without keep-alive.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bulkhead::dataplane::{sync::Programmer, Datapath};
use bulkhead_policy::{DesiredState, PodRef};
use datapath_common::{policy_prefix, proto, PolicyKey, INGRESS};
use serde_json::json;

use crate::{
    bench::{allow, median, server_ingress_policy, two_pod_policy},
    testbed::{
        enter_netns,
        raw_program::{instruction, opcode, RawProgram, BPF_PROG_TYPE_SCHED_CLS},
        TestPod, Topology,
    },
};

pub(crate) const PORT: u16 = 7000;
/// Parallel clients: twice the cores, so a client waiting on its connect
/// leaves the CPU to another.
const CLIENTS: usize = 4;
const ACCEPTORS: usize = 2;
/// Many short rounds rather than a few long ones: a round of six
/// configurations then spans 3 s, over which the machine's speed drifts
/// less than the few per cent told apart (7 rounds of 2 s put `tc_empty`
/// anywhere from 0.95x to 1.00x of `none`; 41 of 0.5 s, 0.96-0.98x).
const ROUNDS: usize = 41;
const MEASURE: Duration = Duration::from_millis(500);
/// Every measurement must get through this many connections without a
/// failure; a single failed connect means a configuration drops what it
/// should allow, and the bench stops rather than print its figure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const SIZES: [(&str, u32); 2] = [("1k", 1_000), ("100k", 100_000)];
const IPSET: &str = "bhconn";

/// Close with an RST rather than a FIN: no TIME_WAIT left behind.
fn reset_on_close(fd: &impl AsRawFd) -> Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on an open socket with a value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The server pod's listener: accepting threads that answer each connection
/// with one byte and close it, until dropped.
pub(crate) struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(pod: &TestPod) -> Result<Self> {
        let netns = pod.netns.clone();
        let address = SocketAddr::new(pod.ipv4, PORT);
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            enter_netns(&netns)?;
            Ok(TcpListener::bind(address)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the listening thread panicked"))??;
        // A socket keeps the namespace it was made in: the accepting threads
        // need not enter it.
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let acceptors = (0..ACCEPTORS)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Closed with a FIN after the byte (an RST would
                        // discard it unsent); the client's RST ends it.
                        let Ok((mut stream, _)) = listener.accept() else { continue };
                        let _ = stream.write_all(b"!");
                    }
                })
            })
            .collect();
        Ok(Server { listener, stop, acceptors })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes every thread blocked in accept().
        // SAFETY: shutdown on the listener's open fd.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }
}

/// One connection from the client pod: connected, answered, closed.
pub(crate) fn one_connection(server: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&server, CONNECT_TIMEOUT)?;
    reset_on_close(&stream)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)?;
    Ok(())
}

/// Connections per second from `CLIENTS` threads in the client pod over
/// `MEASURE`; an error at the first connection that fails.
fn connections_per_s(client: &TestPod, server: SocketAddr) -> Result<f64> {
    let deadline = Instant::now() + MEASURE;
    let started = Instant::now();
    let clients: Vec<JoinHandle<Result<u64>>> = (0..CLIENTS)
        .map(|_| {
            let netns = client.netns.clone();
            std::thread::spawn(move || {
                enter_netns(&netns)?;
                let mut made = 0u64;
                while Instant::now() < deadline {
                    one_connection(server).with_context(|| format!("connection {} to {server}", made + 1))?;
                    made += 1;
                }
                Ok(made)
            })
        })
        .collect();
    let mut total = 0;
    for client in clients {
        total += client.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Bulkhead enforcing the two pods' policy, with `filler` allow entries of
/// other peers on the server's endpoint; attached only while measured.
struct Enforced {
    programmer: Programmer,
    desired: DesiredState,
    pin_dir: PathBuf,
}

impl Enforced {
    fn load(label: &str, client: &TestPod, server: &TestPod, filler: u32) -> Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-bench-conn-{label}"));
        let _ = Datapath::unpin_all(&pin_dir);
        let desired = two_pod_policy(client, server, PORT, &server_ingress_policy(PORT))?;
        let mut enforced = Enforced { programmer: Programmer::adopt(Datapath::load(&pin_dir)?), desired, pin_dir };
        enforced.programmer.apply(&enforced.desired, Vec::new())?;
        let endpoint = enforced.desired.endpoints[&PodRef::new("bench", "server")].id;
        for i in 0..filler {
            // Other peers' identities, spread over ports as a namespace's worth of rules would be.
            let key = PolicyKey::new(endpoint, INGRESS, 100_000 + i / 4, proto::TCP, 8000 + (i % 4) as u16);
            enforced.programmer.datapath_mut().set_policy(policy_prefix::FULL, key, allow())?;
        }
        Ok(enforced)
    }

    fn measure(&mut self, topology: &Topology, client: &TestPod, server: &TestPod) -> Result<f64> {
        for pod in [client, server] {
            let endpoint = self.desired.endpoints[&PodRef::new("bench", &pod.name)].id;
            let ifindex = topology.ifindex(&pod.host_interface);
            self.programmer.attach_endpoint(endpoint, &pod.host_interface, ifindex, &[pod.ipv4], None)?;
        }
        let measured = connections_per_s(client, SocketAddr::new(server.ipv4, PORT));
        for pod in [client, server] {
            let ifindex = topology.ifindex(&pod.host_interface);
            self.programmer.detach_endpoint(&pod.host_interface, ifindex, &[pod.ipv4], None)?;
        }
        measured
    }
}

impl Drop for Enforced {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(&self.pin_dir);
    }
}

/// The floor under any TC program: one that returns `TC_ACT_OK` at once,
/// attached where Bulkhead's are (TCX ingress and egress of both pods'
/// host-side veths). What it costs, no policy logic can win back.
struct EmptyTc {
    program: RawProgram,
}

impl EmptyTc {
    fn load() -> Result<Self> {
        use opcode::{EXIT, MOV64_K};
        const TC_ACT_OK: i32 = 0;
        let instructions = [instruction(MOV64_K, 0, 0, 0, TC_ACT_OK), instruction(EXIT, 0, 0, 0, 0)];
        Ok(EmptyTc { program: RawProgram::load("the empty TC program", BPF_PROG_TYPE_SCHED_CLS, &instructions)? })
    }

    fn measure(&self, topology: &Topology, client: &TestPod, server: &TestPod) -> Result<f64> {
        let mut links = Vec::new();
        for pod in [client, server] {
            let ifindex = topology.ifindex(&pod.host_interface);
            for ingress in [true, false] {
                links.push(self.program.attach_tcx(ifindex, ingress)?);
            }
        }
        let measured = connections_per_s(client, SocketAddr::new(server.ipv4, PORT));
        drop(links);
        measured
    }
}

/// The same allow as iptables users write it at this size: established
/// traffic accepted by conntrack first, new connections matched against an
/// ipset of (source, port, destination) with `filler` other entries, the
/// rest dropped. In the node's FORWARD chain only while measured.
struct Iptables {
    set: String,
}

impl Iptables {
    fn load(topology: &Topology, label: &str, client: &TestPod, server: &TestPod, filler: u32) -> Result<Self> {
        let set = format!("{IPSET}{label}");
        let _ = topology.node_command("ipset").args(["destroy", &set]).output();
        let mut restore = format!("create {set} hash:ip,port,ip maxelem {}\n", filler + 16);
        for i in 0..filler {
            // Other clients' addresses, 10.192.0.1 onwards (the pods are in 10.196/16).
            let source = std::net::Ipv4Addr::from(0x0ac0_0001 + i);
            restore.push_str(&format!("add {set} {source},tcp:{},{}\n", 8000 + i % 4, server.ipv4));
        }
        restore.push_str(&format!("add {set} {},tcp:{PORT},{}\n", client.ipv4, server.ipv4));
        let mut ipset = topology.node_command("ipset");
        ipset.arg("restore");
        piped(ipset, &restore)?;
        Ok(Iptables { set })
    }

    fn rules(&self) -> String {
        format!(
            "*filter\n:BHCONN - [0:0]\n\
             -A BHCONN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
             -A BHCONN -p tcp -m set --match-set {} src,dst,dst -j ACCEPT\n\
             -A BHCONN -j DROP\n\
             -A FORWARD -j BHCONN\n\
             COMMIT\n",
            self.set
        )
    }

    fn measure(&self, topology: &Topology, client: &TestPod, server: &TestPod) -> Result<f64> {
        let mut restore = topology.node_command("iptables-restore");
        restore.arg("--noflush");
        piped(restore, &self.rules())?;
        let measured = connections_per_s(client, SocketAddr::new(server.ipv4, PORT));
        // Flushed whole: FORWARD holds nothing else in the bench's node.
        piped(topology.node_command("iptables-restore"), "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")?;
        measured
    }
}

fn piped(mut command: std::process::Command, input: &str) -> Result<()> {
    let mut child = command.stdin(std::process::Stdio::piped()).spawn().context("spawning")?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{command:?}: {status}");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let mut topology = Topology::new("bcon", 196);
    let client = topology.add_pod("client");
    let server = topology.add_pod("server");
    topology.enter_node();
    let _server = Server::start(&server)?;
    let mut enforced = SIZES
        .iter()
        .map(|&(label, filler)| Enforced::load(label, &client, &server, filler).map(|e| (label, e)))
        .collect::<Result<Vec<_>>>()?;
    let iptables = SIZES
        .iter()
        .map(|&(label, filler)| Iptables::load(&topology, label, &client, &server, filler).map(|i| (label, i)))
        .collect::<Result<Vec<_>>>()?;

    let empty_tc = EmptyTc::load()?;

    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // Each round's figure over the same round's `none`: the machine's speed
    // drifts by more than the differences measured (none alone has ranged
    // 42k-59k/s within one run), and a ratio of neighbours cancels most of it.
    let mut paired: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // A warm-up measurement, not counted: first-touch of the pods' sockets and route caches.
    connections_per_s(&client, SocketAddr::new(server.ipv4, PORT))?;
    const CONFIGURATIONS: usize = 6;
    for round in 0..ROUNDS {
        // The order rotated each round, so the machine's drift within a
        // round falls on each configuration alike.
        let mut this_round = BTreeMap::new();
        for turn in 0..CONFIGURATIONS {
            let (name, value) = match (round + turn) % CONFIGURATIONS {
                0 => ("none".to_string(), connections_per_s(&client, SocketAddr::new(server.ipv4, PORT))?),
                1 => ("tc_empty".to_string(), empty_tc.measure(&topology, &client, &server)?),
                n @ (2 | 3) => {
                    let (label, enforced) = &mut enforced[n - 2];
                    (format!("bulkhead_{label}"), enforced.measure(&topology, &client, &server)?)
                }
                n => {
                    let (label, iptables) = &iptables[n - 4];
                    (format!("iptables_{label}"), iptables.measure(&topology, &client, &server)?)
                }
            };
            this_round.insert(name, value);
        }
        let line: Vec<String> = this_round.iter().map(|(name, value)| format!("{name} {value:.0}")).collect();
        println!("connections/s round {}: {}", round + 1, line.join("  "));
        for (name, value) in &this_round {
            paired.entry(name.clone()).or_default().push(value / this_round["none"]);
            samples.entry(name.clone()).or_default().push(*value);
        }
    }
    for (_, set) in &iptables {
        let _ = topology.node_command("ipset").args(["destroy", &set.set]).output();
    }

    let medians: BTreeMap<String, f64> = samples.into_iter().map(|(name, values)| (name, median(values))).collect();
    let paired: BTreeMap<String, f64> = paired.into_iter().map(|(name, values)| (name, median(values))).collect();
    println!(
        "medians over {ROUNDS} rounds: none {:.0}/s  tc_empty {:.0}  bulkhead 1k {:.0}  bulkhead 100k {:.0}  iptables 1k {:.0}  iptables 100k {:.0}",
        medians["none"],
        medians["tc_empty"],
        medians["bulkhead_1k"],
        medians["bulkhead_100k"],
        medians["iptables_1k"],
        medians["iptables_100k"],
    );
    println!(
        "median of each round's ratio to none: tc_empty {:.3}x  bulkhead 1k {:.3}x  bulkhead 100k {:.3}x  iptables 1k {:.3}x  iptables 100k {:.3}x  bulkhead/iptables at 100k {:.2}x",
        paired["tc_empty"],
        paired["bulkhead_1k"],
        paired["bulkhead_100k"],
        paired["iptables_1k"],
        paired["iptables_100k"],
        paired["bulkhead_100k"] / paired["iptables_100k"],
    );
    let rounded = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    let ratio = |a: &str, b: &str| rounded(medians[a] / medians[b], 3);
    println!(
        "{}",
        json!({
            "connections_per_s": medians.iter().map(|(k, v)| (k.clone(), json!(rounded(*v, 0)))).collect::<serde_json::Map<_, _>>(),
            "ratios": {
                "tc_empty_vs_none": ratio("tc_empty", "none"),
                "bulkhead_1k_vs_none": ratio("bulkhead_1k", "none"),
                "bulkhead_100k_vs_none": ratio("bulkhead_100k", "none"),
                "bulkhead_100k_vs_iptables_100k": ratio("bulkhead_100k", "iptables_100k"),
            },
            "paired_ratios_to_none": paired.iter().filter(|(k, _)| *k != "none").map(|(k, v)| (k.clone(), json!(rounded(*v, 3)))).collect::<serde_json::Map<_, _>>(),
        })
    );
    Ok(())
}
