//! A test bed: a node and its pods in network namespaces, wired as a CNI would: each pod
//! a namespace with `eth0`, its veth peer on the node, a /32 (and /128)
//! route to it, 169.254.1.1 and fe80::1 as the gateway; plus a cgroup per pod.
//! Everything is named after the test's tag and removed by name on drop,
//! pass or fail.

pub mod apiserver;
pub mod generator;
pub mod node;
pub mod packet;
pub mod raw_program;

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// The checkout this lab belongs to.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The `bulkhead` binary the lab drives: `$BULKHEAD_BIN`, else the one cargo
/// built beside this program (`target/<profile>/bulkhead`; test binaries sit
/// one folder deeper, in `deps/`). `cargo xtask` builds both.
pub fn product_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BULKHEAD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the lab knows where it runs from");
    let mut dir = exe.parent().expect("a binary is in a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join("bulkhead");
    assert!(
        binary.exists(),
        "{} is not built: run `cargo build -p bulkhead` (cargo xtask does) or set BULKHEAD_BIN",
        binary.display()
    );
    binary
}

/// Where agents the test bed runs serve /metrics and /debug, inside the node's namespace.
pub const AGENT_ADDRESS: &str = "127.0.0.1:9464";

/// Put a file in place whole: written under a hidden name, then renamed, so
/// an agent following the folder never reads half of it.
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Whether an agent's `/debug/state` says it holds a folder's `revision`
/// with `pods` local pods attached.
pub fn agent_holds(state: &serde_json::Value, revision: &str, pods: usize) -> bool {
    state["revision"] == revision && state["endpoints"].as_object().is_some_and(|e| e.len() == pods)
}

/// A child process killed (SIGKILL) and reaped when dropped, pass or fail.
pub struct Process(pub Child);

impl Process {
    /// Ask it to stop (SIGTERM) and wait up to `timeout`; its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `check` until it holds; panic naming `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

/// The value of one series in Prometheus text, by its name and labels as written.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Turn Ctrl-C and SIGTERM into a flag that `interrupted` reports, so a
/// runner stops at its next check and its drops remove what it set up
/// (the default action would kill it with everything left behind).
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, note_interrupt as *const () as libc::sighandler_t) };
    }
}

/// An error once Ctrl-C or SIGTERM arrived.
pub fn interrupted() -> std::io::Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted; cleaning up"));
    }
    Ok(())
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// The listener/prober script (tests/tools/netprobe.py) of this checkout.
/// Move this thread (only) into a network namespace by name.
pub fn enter_netns(netns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    // SAFETY: setns on a namespace fd this function holds; it moves only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn netprobe() -> String {
    workspace_root().join("tests/tools/netprobe.py").display().to_string()
}

#[derive(Clone, Debug)]
pub struct TestPod {
    pub name: String,
    pub netns: String,
    pub host_interface: String,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    pub cgroup: PathBuf,
    /// What the pod's manifest gives as `metadata.uid`: its cgroup is
    /// `pod<uid>` under the topology's kubepods folder, as kubelet names it.
    pub uid: String,
}

pub struct Topology {
    pub tag: String,
    pub node_netns: String,
    pub node_ipv4: IpAddr,
    pub node_ipv6: IpAddr,
    pub pods: Vec<TestPod>,
    /// Where the pods' cgroups are (the agent's `--cgroup-root`).
    pub kubepods: PathBuf,
    /// The agents' `--state-dir`: `<node name>/` under it, removed with the topology.
    pub state_root: PathBuf,
    subnet: u8,
    /// The node has its pod bridge (`add_bridged_pod`).
    bridged: bool,
    children: Vec<Child>,
}

impl Topology {
    /// `tag`: up to 4 characters, unique per test; `subnet`: unique per test.
    pub fn new(tag: &str, subnet: u8) -> Self {
        assert!(tag.len() <= 4);
        let node_netns = format!("bh-{tag}-node");
        let topology = Self {
            tag: tag.to_string(),
            node_netns: node_netns.clone(),
            node_ipv4: format!("10.{subnet}.0.1").parse().unwrap(),
            node_ipv6: format!("fd00:{subnet}::1").parse().unwrap(),
            pods: vec![],
            kubepods: PathBuf::from(CGROUP2_ROOT).join(format!("bh-{tag}-kubepods")),
            state_root: std::env::temp_dir().join(format!("bh-{tag}-state")),
            subnet,
            bridged: false,
            children: vec![],
        };
        topology.remove_leftovers();
        std::fs::create_dir_all(&topology.kubepods).unwrap();
        run(&["ip", "netns", "add", &node_netns]);
        let exec = |cmd: &[&str]| {
            let mut args = vec!["ip", "netns", "exec", &node_netns];
            args.extend_from_slice(cmd);
            run(&args);
        };
        exec(&["ip", "link", "set", "lo", "up"]);
        exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        // The node's own addresses (this kernel has no dummy links): on lo.
        exec(&["ip", "addr", "add", &format!("{}/32", topology.node_ipv4), "dev", "lo"]);
        // The pods' gateway: local, so the node answers ARP for it on every
        // veth; link scope, so it is never a source address.
        exec(&["ip", "addr", "add", "169.254.1.1/32", "dev", "lo", "scope", "link"]);
        exec(&["ip", "-6", "addr", "add", &format!("{}/128", topology.node_ipv6), "dev", "lo", "nodad"]);
        topology
    }

    /// Remove anything a previous, interrupted run of this test left.
    fn remove_leftovers(&self) {
        let prefix = format!("bh-{}-", self.tag);
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&prefix) {
                    run_quiet(&["ip", "netns", "del", name]);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(CGROUP2_ROOT) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    for child in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                        if child.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    pub fn node_exec(&self, cmd: &[&str]) {
        let mut args = vec!["ip", "netns", "exec", &self.node_netns];
        args.extend_from_slice(cmd);
        run(&args);
    }

    pub fn add_pod(&mut self, name: &str) -> TestPod {
        let index = self.pods.len();
        let ipv4: IpAddr = format!("10.{}.1.{}", self.subnet, 10 + index).parse().unwrap();
        let ipv6: IpAddr = format!("fd00:{}:1::{:x}", self.subnet, 10 + index).parse().unwrap();
        self.add_pod_at(name, ipv4, ipv6)
    }

    /// A pod's network namespace (IPv6 DAD off) and its veth pair: the host
    /// side `host_interface` in the node's namespace, `eth0` in the pod's.
    /// Returns how to run a command in the pod's namespace.
    fn pod_namespace(&self, netns: &str, host_interface: &str) -> impl Fn(&[&str]) + use<> {
        run(&["ip", "netns", "add", netns]);
        let pod_exec = in_namespace(netns);
        pod_exec(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]);
        self.node_exec(&["ip", "link", "add", host_interface, "type", "veth", "peer", "name", "eth0", "netns", netns]);
        pod_exec
    }

    /// Give a wired pod its cgroup (named as kubelet names it) and keep it.
    fn keep_pod(
        &mut self,
        name: &str,
        netns: String,
        host_interface: String,
        (ipv4, ipv6): (IpAddr, IpAddr),
    ) -> TestPod {
        let uid = format!("{}-{}", self.tag, self.pods.len());
        let cgroup = self.kubepods.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let pod = TestPod { name: name.to_string(), netns, host_interface, ipv4, ipv6, cgroup, uid };
        self.pods.push(pod.clone());
        pod
    }

    /// A pod with the given addresses.
    pub fn add_pod_at(&mut self, name: &str, ipv4: IpAddr, ipv6: IpAddr) -> TestPod {
        let index = self.pods.len();
        let netns = format!("bh-{}-{name}", self.tag);
        let host_interface = format!("bh{}{index}", self.tag);
        let pod_exec = self.pod_namespace(&netns, &host_interface);
        pod_exec(&["ip", "link", "set", "lo", "up"]);
        self.route_to(&netns, &host_interface, (ipv4, ipv6));
        self.keep_pod(name, netns, host_interface, (ipv4, ipv6))
    }

    /// Wire a routed pod's veth again, as a CNI's DEL then ADD would: the
    /// veth and its routes go, and a veth of the same name comes.
    pub fn rewire_pod(&self, pod: &TestPod) {
        self.node_exec(&["ip", "link", "del", &pod.host_interface]);
        let (netns, host_interface) = (pod.netns.as_str(), pod.host_interface.as_str());
        self.node_exec(&["ip", "link", "add", host_interface, "type", "veth", "peer", "name", "eth0", "netns", netns]);
        self.route_to(netns, host_interface, (pod.ipv4, pod.ipv6));
    }

    /// Routed wiring (ptp, Calico): the pod's addresses on its `eth0`, a
    /// link-local gateway, and a host route to each address via the veth.
    fn route_to(&self, netns: &str, host_interface: &str, (ipv4, ipv6): (IpAddr, IpAddr)) {
        let pod_exec = in_namespace(netns);
        pod_exec(&["ip", "link", "set", "eth0", "up"]);
        pod_exec(&["ip", "addr", "add", &format!("{ipv4}/32"), "dev", "eth0"]);
        pod_exec(&["ip", "-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"]);
        pod_exec(&["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
        pod_exec(&["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
        pod_exec(&["ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"]);
        self.node_exec(&["ip", "link", "set", host_interface, "up"]);
        self.node_exec(&["ip", "-6", "addr", "add", "fe80::1/64", "dev", host_interface, "nodad"]);
        self.node_exec(&["ip", "route", "add", &format!("{ipv4}/32"), "dev", host_interface]);
        self.node_exec(&["ip", "-6", "route", "add", &format!("{ipv6}/128"), "dev", host_interface]);
    }

    /// A pod wired as bridge CNIs (bridge, flannel) wire one: its veth is a
    /// port of the node's bridge, which holds the gateway address of the
    /// subnet; the node routes the subnet to the bridge, not the pod to its
    /// veth. The pod's addresses are 10.<subnet>.2.x and fd00:<subnet>:2::x.
    pub fn add_bridged_pod(&mut self, name: &str) -> TestPod {
        let bridge = format!("bh{}br", self.tag);
        let index = self.pods.len();
        if !self.bridged {
            self.bridged = true;
            self.node_exec(&["ip", "link", "add", &bridge, "type", "bridge"]);
            self.node_exec(&["ip", "addr", "add", &format!("10.{}.2.1/24", self.subnet), "dev", &bridge]);
            self.node_exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("fd00:{}:2::1/64", self.subnet),
                "dev",
                &bridge,
                "nodad",
            ]);
            self.node_exec(&["ip", "link", "set", &bridge, "up"]);
        }
        let netns = format!("bh-{}-{name}", self.tag);
        let host_interface = format!("bh{}b{index}", self.tag);
        let ipv4: IpAddr = format!("10.{}.2.{}", self.subnet, 10 + index).parse().unwrap();
        let ipv6: IpAddr = format!("fd00:{}:2::{:x}", self.subnet, 10 + index).parse().unwrap();
        let pod_exec = self.pod_namespace(&netns, &host_interface);
        self.node_exec(&["ip", "link", "set", &host_interface, "master", &bridge, "up"]);
        pod_exec(&["ip", "link", "set", "lo", "up"]);
        pod_exec(&["ip", "link", "set", "eth0", "up"]);
        pod_exec(&["ip", "addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
        pod_exec(&["ip", "-6", "addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
        pod_exec(&["ip", "route", "add", "default", "via", &format!("10.{}.2.1", self.subnet)]);
        pod_exec(&["ip", "-6", "route", "add", "default", "via", &format!("fd00:{}:2::1", self.subnet)]);
        self.keep_pod(name, netns, host_interface, (ipv4, ipv6))
    }

    pub fn pod(&self, name: &str) -> &TestPod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Delete a pod as a CNI and kubelet do: its veth, its namespace, its
    /// cgroup. (A pod that serves keeps its namespace until the topology goes.)
    pub fn delete_pod(&mut self, name: &str) {
        let pod = self.pod(name).clone();
        self.node_exec(&["ip", "link", "del", &pod.host_interface]);
        run(&["ip", "netns", "del", &pod.netns]);
        std::fs::remove_dir(&pod.cgroup).unwrap_or_else(|e| panic!("removing {}: {e}", pod.cgroup.display()));
        self.pods.retain(|p| p.name != name);
    }

    /// The ifindex of an interface of the node's namespace.
    pub fn node_ifindex(&self, interface: &str) -> u32 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node_netns, "cat", &format!("/sys/class/net/{interface}/ifindex")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("no interface {interface}"))
    }

    /// Serve `80/TCP`-style ports in a pod until the topology is dropped.
    pub fn serve(&mut self, pod: &str, ports: &[&str]) {
        let pod = self.pod(pod).clone();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "python3", &netprobe(), "serve"])
            .args(ports)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "listener in {}", pod.name);
        self.children.push(child);
    }

    /// A command run inside a pod: its network namespace and its cgroup.
    pub fn pod_command(&self, pod: &str, args: &[&str]) -> Command {
        let pod = self.pod(pod);
        let script =
            format!("echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$@\"", pod.cgroup.display(), pod.netns);
        let mut command = Command::new("sh");
        command.arg("-c").arg(script).arg("sh").args(args);
        command
    }

    /// One connection attempt: "allow", "deny" (no answer) or "eperm" (refused by the socket hook).
    pub fn probe(&self, from: &str, protocol: &str, to: IpAddr, port: u16) -> String {
        let out = self
            .pod_command(from, &["python3", &netprobe(), "probe", protocol, &to.to_string(), &port.to_string()])
            .env("PROBE_TIMEOUT", "1.0")
            .output()
            .unwrap();
        assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn ping(&self, from: &str, to: IpAddr) -> String {
        let status = self
            .pod_command(from, &["ping", "-c1", "-W1", &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if status.success() { "allow" } else { "deny" }.to_string()
    }

    /// Move this thread into the node's network namespace, where the
    /// host-side veths are.
    pub fn enter_node(&self) {
        enter_netns(&self.node_netns).unwrap();
    }

    /// An HTTP GET to a server listening inside the node's namespace (the
    /// agent's metrics address): the status code and the body.
    pub fn node_http_get(&self, address: &str, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let netns = std::fs::File::open(format!("/var/run/netns/{}", self.node_netns))?;
        let (address, path) = (address.to_string(), path.to_string());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut stream = std::net::TcpStream::connect(&address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) =
                response.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
            Ok((status, body.to_string()))
        })
        .join()
        .map_err(|_| std::io::Error::other("the request thread panicked"))?
    }

    /// The arguments of an agent of node `node` that follows the folder
    /// `folder`, pins under `pin_dir`, finds pod cgroups under this
    /// topology's kubepods and serves everything on `AGENT_ADDRESS`.
    pub fn agent_args(&self, node: &str, pin_dir: &str, folder: &std::path::Path) -> Vec<String> {
        [
            "agent",
            "--node-name",
            node,
            "--pin-dir",
            pin_dir,
            "--metrics-address",
            AGENT_ADDRESS,
            "--debug-address",
            AGENT_ADDRESS,
        ]
        .map(String::from)
        .into_iter()
        .chain([
            format!("--source=dir:{}", folder.display()),
            format!("--cgroup-root={}", self.kubepods.display()),
            format!("--state-dir={}", self.state_dir(node).display()),
        ])
        .collect()
    }

    /// Where node `node`'s agent keeps its state.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.state_root.join(node)
    }

    /// A command run in the node's network namespace only. Unlike `ip netns
    /// exec`, which also gives it a mount namespace with a fresh /sys, it
    /// sees the host's bpffs and cgroup mounts — as an agent on a node does.
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/var/run/netns/{}", self.node_netns)).arg("--").arg(program);
        command
    }

    /// Start `bulkhead agent` in the node's namespace, following the object
    /// files in `folder`, with `extra` arguments, its log in the temp
    /// directory under `log_name`.
    pub fn spawn_agent(
        &self,
        node_name: &str,
        pin_dir: &str,
        folder: &std::path::Path,
        extra: &[&str],
        (log_name, rust_log): (&str, &str),
    ) -> std::io::Result<std::process::Child> {
        let log = std::fs::File::create(std::env::temp_dir().join(log_name))?;
        self.node_command(product_binary())
            .args(self.agent_args(node_name, pin_dir, folder))
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
    }

    /// GET a path from the node's agent (at `AGENT_ADDRESS`); anything but 200 is an error.
    pub fn agent_get(&self, path: &str) -> std::io::Result<String> {
        match self.node_http_get(AGENT_ADDRESS, path)? {
            (200, body) => Ok(body),
            (status, body) => Err(std::io::Error::other(format!("GET {path}: {status} {body}"))),
        }
    }

    /// The agent's `/debug/state`, or null while it does not answer.
    pub fn agent_state(&self) -> serde_json::Value {
        self.agent_get("/debug/state").ok().and_then(|body| serde_json::from_str(&body).ok()).unwrap_or_default()
    }

    pub fn ifindex(&self, interface: &str) -> u32 {
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {interface} here (call enter_node first)");
        index
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            run_quiet(&["ip", "netns", "del", &pod.netns]);
            // Processes left in the cgroup would keep it busy; they are gone with their netns commands.
            let deadline = Instant::now() + Duration::from_secs(2);
            while std::fs::remove_dir(&pod.cgroup).is_err() && pod.cgroup.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir(&self.kubepods);
        let _ = std::fs::remove_dir_all(&self.state_root);
        run_quiet(&["ip", "netns", "del", &self.node_netns]);
    }
}

/// Runs a command in network namespace `netns`.
fn in_namespace(netns: &str) -> impl Fn(&[&str]) + use<> {
    let netns = netns.to_string();
    move |cmd: &[&str]| {
        let mut args = vec!["ip", "netns", "exec", netns.as_str()];
        args.extend_from_slice(cmd);
        run(&args);
    }
}
