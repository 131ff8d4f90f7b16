//! A real one-node cluster for the e2e (../shared/design/kubelet-node.md):
//! etcd, kube-apiserver, controller-manager, scheduler, kube-proxy,
//! containerd and a kubelet — the binaries `tests/tools/kubernetes-build.sh`
//! builds from Debian's source package, containerd, runc and the CNI plugins
//! from Debian — all inside a network namespace of the node's own, the
//! container runtime and kubelet also in a private mount namespace so their
//! mounts and kubelet's log sweeps never reach the machine's.
//!
//! Everything is torn down on drop, after a failure too: processes by the
//! PIDs recorded here, containers through `ctr`, the mount namespace with
//! every mount made in it, the cgroups kubelet made under its own root, the
//! node's network namespace and the agent's pins.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::apiserver::{run_ok, ControlPlane};

/// How pods are wired: the two shapes most clusters have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    /// One routed veth per pod (the `ptp` plugin; Calico, kindnet, Cilium's routing).
    Routed,
    /// Veths on a bridge, the subnet routed to the bridge (the `bridge` plugin; flannel, k3s).
    Bridge,
}

impl Cni {
    fn name(self) -> &'static str {
        match self {
            Cni::Routed => "ptp",
            Cni::Bridge => "bridge",
        }
    }
}

pub const NODE_NAME: &str = "bulkhead-e2e";
/// The node's address (on one end of a veth pair whose both ends stay in the node).
pub const NODE_IP: &str = "10.250.0.1";
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The network outside the cluster (`Node::start_outside`): the node's end of it.
const OUTSIDE_GATEWAY: &str = "10.251.0.1";
/// Where the agent pins its datapath by default; the node's bpffs is the machine's.
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/bulkhead";

pub struct Node {
    pub cni: Cni,
    pub netns: String,
    pub dir: PathBuf,
    pub plane: ControlPlane,
    /// The file pinning the runtime's and kubelet's mount namespace.
    mount_ns: PathBuf,
    /// kubelet's `--cgroup-root`, made in every hierarchy.
    cgroup_root: String,
    /// `/var/lib/cni` did not exist and was made as a mount point.
    made_cni_dir: bool,
    processes: Vec<(&'static str, Child)>,
    /// Machine-wide kernel settings as they were before the kubelet started.
    tunables: Vec<(&'static str, String)>,
}

/// What a stock kubelet rewrites at start (kubernetes-build.sh builds one that does not).
const TUNABLES: [&str; 3] =
    ["/proc/sys/vm/overcommit_memory", "/proc/sys/kernel/panic", "/proc/sys/kernel/panic_on_oops"];

fn tunables() -> Vec<(&'static str, String)> {
    TUNABLES.iter().map(|path| (*path, std::fs::read_to_string(path).unwrap_or_default())).collect()
}

fn quietly(command: &mut Command) {
    let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Build (once, cached) and return the folder of the two test images.
fn node_images() -> PathBuf {
    let script = super::workspace_root().join("tests/tools/node-images.sh");
    let out = run_ok(Command::new("bash").arg(&script).stderr(Stdio::inherit()));
    PathBuf::from(out.lines().last().expect("node-images.sh prints its folder"))
}

impl Node {
    /// A node whose pods are wired by `cni`, Ready, with the images in
    /// `images` (name → OCI archive) imported as `localhost/<name>`.
    pub fn start(cni: Cni, images: &[(&str, &Path)]) -> Self {
        let tag = format!("e2e-{}", cni.name());
        let netns = format!("bh-{tag}");
        let cgroup_root = format!("/bh-{tag}");
        let dir = std::env::temp_dir().join(format!("bulkhead-node-{}", cni.name()));
        remove_leftovers(&netns, &dir, &cgroup_root);
        quietly(Command::new("ip").args(["netns", "add", &netns]));
        let node_exec = |args: &[&str]| run_ok(Command::new("ip").args(["netns", "exec", &netns]).args(args));
        node_exec(&["ip", "link", "set", "lo", "up"]);
        // This kernel has no dummy links: the node's address is on a veth whose both ends stay here.
        node_exec(&["ip", "link", "add", "node0", "type", "veth", "peer", "name", "node0-peer"]);
        node_exec(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "node0"]);
        node_exec(&["ip", "link", "set", "node0", "up"]);
        node_exec(&["ip", "link", "set", "node0-peer", "up"]);
        node_exec(&["ip", "route", "add", "default", "dev", "node0"]);
        node_exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

        let plane = ControlPlane::start_for_node(&netns, &tag, NODE_IP, NODE_NAME);
        // After the control plane: its build script unpacks the source that holds pause.c.
        let image_dir = node_images();
        std::fs::create_dir_all(&dir).unwrap();
        let mut node = Node {
            cni,
            netns,
            dir,
            plane,
            mount_ns: PathBuf::new(),
            cgroup_root,
            made_cni_dir: false,
            processes: Vec::new(),
            tunables: tunables(),
        };
        node.make_mount_namespace();
        node.make_cgroup_root();
        node.write_cni_config();
        node.start_containerd();
        let pause = image_dir.join("pause.oci.tar");
        let busybox = image_dir.join("busybox.oci.tar");
        node.import("pause", &pause);
        node.import("busybox", &busybox);
        for (name, archive) in images {
            node.import(name, archive);
        }
        node.start_scheduler_and_proxy();
        node.start_kubelet();
        node.wait_ready();
        node
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A command in the node's network namespace and, for the runtime's
    /// side, its mount namespace.
    fn in_node(&self, mounts: bool, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/var/run/netns/{}", self.netns));
        if mounts {
            command.arg(format!("--mount={}", self.mount_ns.display()));
        }
        command.arg("--").arg(program);
        command
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap()
    }

    fn spawn(&mut self, name: &'static str, command: &mut Command) {
        let child = command
            .stdin(Stdio::null())
            .stdout(self.log(name))
            .stderr(self.log(&format!("{name}.err")))
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        self.processes.push((name, child));
    }

    /// A private mount namespace, pinned by a bind mount, that containerd and
    /// kubelet join: kubelet 1.20's log sweep deletes what it does not know
    /// under /var/log/pods and /var/log/containers, so those (and the CNI
    /// cache) are the scratch folder's in there, and every overlay, netns
    /// and secret mount goes when the namespace does.
    fn make_mount_namespace(&mut self) {
        let holder = self.dir.join("mnt");
        std::fs::create_dir_all(&holder).unwrap();
        run_ok(Command::new("mount").args(["--bind", &holder.display().to_string(), &holder.display().to_string()]));
        run_ok(Command::new("mount").args(["--make-private", &holder.display().to_string()]));
        let file = holder.join("ns");
        std::fs::write(&file, "").unwrap();
        run_ok(Command::new("unshare").arg(format!("--mount={}", file.display())).args([
            "--propagation",
            "private",
            "true",
        ]));
        self.mount_ns = file;
        if !Path::new("/var/lib/cni").exists() {
            std::fs::create_dir_all("/var/lib/cni").unwrap();
            self.made_cni_dir = true;
        }
        for folder in ["varlog", "cni-cache", "kubelet", "containerd/root", "containerd/state", "ipam", "cni"] {
            std::fs::create_dir_all(self.dir.join(folder)).unwrap();
        }
        let script = format!(
            "mount --bind {varlog} /var/log && mount --bind {cache} /var/lib/cni && mount --make-rshared /sys",
            varlog = self.path("varlog"),
            cache = self.path("cni-cache"),
        );
        // containerd refuses a HostToContainer mount of a private bpffs, as systemd hosts never have one;
        // here bpffs is mounted twice over at /sys/fs/bpf, so both are made shared (in this namespace only).
        run_ok(self.in_node(true, "sh").args(["-ec", &script]));
    }

    fn make_cgroup_root(&self) {
        for hierarchy in cgroup_hierarchies() {
            let dir = hierarchy.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).unwrap();
            // A new v1 cpuset has no CPUs or memory nodes until given its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                    let _ = std::fs::write(dir.join(file), value.trim());
                }
            }
        }
    }

    fn write_cni_config(&self) {
        let ipam = serde_json::json!({
            "type": "host-local",
            "ranges": [[{"subnet": POD_SUBNET}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": self.path("ipam"),
        });
        let plugin = match self.cni {
            Cni::Routed => serde_json::json!({"type": "ptp", "ipMasq": false, "ipam": ipam}),
            Cni::Bridge => serde_json::json!({
                "type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true,
                "ipMasq": false, "hairpinMode": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "dataDir": self.path("ipam")},
            }),
        };
        let list = serde_json::json!({"cniVersion": "0.4.0", "name": "e2e", "plugins": [plugin]});
        std::fs::write(self.dir.join("cni/10-e2e.conflist"), serde_json::to_string_pretty(&list).unwrap()).unwrap();
    }

    fn containerd_socket(&self) -> String {
        self.path("containerd.sock")
    }

    fn start_containerd(&mut self) {
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:latest"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            root = self.path("containerd/root"),
            state = self.path("containerd/state"),
            socket = self.containerd_socket(),
            cni = self.path("cni"),
        );
        std::fs::write(self.dir.join("containerd.toml"), config).unwrap();
        let mut command = self.in_node(true, "containerd");
        command.arg("--config").arg(self.dir.join("containerd.toml"));
        self.spawn("containerd", &mut command);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer in 30 s: {}",
                self.tail("containerd.err.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr` in the Kubernetes namespace of this node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.in_node(true, "ctr")
            .args(["--address", &self.containerd_socket(), "--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap()
    }

    /// Import an OCI archive as `localhost/<name>:<its tag>`.
    pub fn import(&self, name: &str, archive: &Path) {
        let out = self.ctr(&[
            "images",
            "import",
            "--base-name",
            &format!("localhost/{name}"),
            "--digests",
            &archive.display().to_string(),
        ]);
        assert!(out.status.success(), "importing {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
    }

    fn start_scheduler_and_proxy(&mut self) {
        let admin = self.plane.kubeconfig("admin").display().to_string();
        let mut scheduler = self.in_node(false, self.plane.binary("kube-scheduler"));
        scheduler.args([&format!("--kubeconfig={admin}"), "--leader-elect=false", "--port=0", "--secure-port=0"]);
        self.spawn("kube-scheduler", &mut scheduler);
        // Zero for every conntrack setting: kube-proxy leaves the machine-wide ones as they are.
        let mut proxy = self.in_node(false, self.plane.binary("kube-proxy"));
        proxy
            .args([&format!("--kubeconfig={admin}"), &format!("--hostname-override={NODE_NAME}")])
            .args([&format!("--bind-address={NODE_IP}"), "--cluster-cidr=10.244.0.0/16", "--proxy-mode=iptables"])
            .args(["--conntrack-max-per-core=0", "--conntrack-min=0", "--conntrack-tcp-timeout-established=0"])
            .args(["--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0"])
            .args(["--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256"]);
        self.spawn("kube-proxy", &mut proxy);
    }

    // Eviction thresholds are absolute and tiny: the node shares the machine's disk, and a percentage
    // (even 1 % of a large disk) put a CI machine with a few GB free under DiskPressure, which evicted
    // the controller and left every pod Pending. Evictions are not what the e2e tests.
    fn start_kubelet(&mut self) {
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
enforceNodeAllocatable: []
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1Mi", imagefs.available: "1Mi", nodefs.inodesFree: "1"}}
nodeStatusUpdateFrequency: 1s
volumePluginDir: {plugins}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
"#,
            cgroup_root = self.cgroup_root,
            plugins = self.path("kubelet/volume-plugins"),
            ca = self.plane.dir.join("ca.crt").display(),
        );
        std::fs::write(self.dir.join("kubelet.yaml"), config).unwrap();
        let mut kubelet = self.in_node(true, self.plane.binary("kubelet"));
        kubelet
            .arg(format!("--kubeconfig={}", self.plane.kubeconfig("node").display()))
            .arg(format!("--config={}", self.path("kubelet.yaml")))
            .args([
                "--container-runtime=remote",
                &format!("--container-runtime-endpoint=unix://{}", self.containerd_socket()),
            ])
            .arg(format!("--root-dir={}", self.path("kubelet/root")))
            .arg(format!("--cert-dir={}", self.path("kubelet/pki")))
            .args([&format!("--hostname-override={NODE_NAME}"), &format!("--node-ip={NODE_IP}"), "--v=1"]);
        self.spawn("kubelet", &mut kubelet);
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.plane.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            if String::from_utf8_lossy(&out.stdout) == "True" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node not Ready in 90 s; kubelet said:\n{}",
                self.tail("kubelet.err.log")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The machine-wide kernel settings the node found are still as they were.
    pub fn assert_machine_untouched(&self) {
        assert_eq!(tunables(), self.tunables, "the node changed machine-wide kernel settings");
    }

    /// The last lines a process wrote to its log.
    pub fn tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// kubectl as the cluster's admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.plane.kubectl(args)
    }

    /// kubectl as the cluster's admin, given up on after `limit`.
    pub fn kubectl_within(&self, limit: Duration, args: &[&str]) -> Option<Output> {
        self.plane.kubectl_within(limit, args)
    }

    /// Stop one of the node's processes by its recorded PID (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, name: &str, grace: Duration) {
        if let Some(index) = self.processes.iter().position(|(n, _)| *n == name) {
            let (_, mut child) = self.processes.remove(index);
            terminate(&mut child, grace);
        }
    }

    /// Stop containerd (its shims, and so the containers, run on) and start
    /// it again; kubelet reconnects by itself.
    pub fn restart_containerd(&mut self) {
        self.stop("containerd", Duration::from_secs(10));
        self.start_containerd();
    }

    /// A network outside the cluster, routed from the node: a namespace of
    /// its own holding `addresses` (in 10.251.0.0/24), each answering "ok"
    /// on `port`, as an external service would.
    pub fn start_outside(&mut self, addresses: &[&str], port: u16) {
        let outside = outside_netns(&self.netns);
        run_ok(Command::new("ip").args(["netns", "add", &outside]));
        let node_exec = |args: &[&str]| run_ok(Command::new("ip").args(["netns", "exec", &self.netns]).args(args));
        let outside_exec = |args: &[&str]| run_ok(Command::new("ip").args(["netns", "exec", &outside]).args(args));
        node_exec(&["ip", "link", "add", "outside0", "type", "veth", "peer", "name", "eth0", "netns", &outside]);
        node_exec(&["ip", "addr", "add", &format!("{OUTSIDE_GATEWAY}/24"), "dev", "outside0"]);
        node_exec(&["ip", "link", "set", "outside0", "up"]);
        outside_exec(&["ip", "link", "set", "lo", "up"]);
        for address in addresses {
            outside_exec(&["ip", "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        }
        outside_exec(&["ip", "link", "set", "eth0", "up"]);
        outside_exec(&["ip", "route", "add", "default", "via", OUTSIDE_GATEWAY]);
        let mut server = Command::new("ip");
        server.args(["netns", "exec", &outside, "busybox", "nc", "-ll", "-p", &port.to_string(), "-e", "echo", "ok"]);
        self.spawn("outside-server", &mut server);
    }

    /// How to run a command inside a pod as if it were one of its
    /// processes — its network namespace and its (v2) cgroup — without
    /// kubectl, the API server or containerd, so it works while they are down.
    pub fn pod_shell(&self, uid: &str) -> PodShell {
        let v2 = cgroup_hierarchies()
            .into_iter()
            .find(|h| h.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy (alone, or unified/ beside v1)");
        let kubepods = v2.join(self.cgroup_root.trim_start_matches('/'));
        let pod = bulkhead::agent::host::find_pod_cgroup(&kubepods, uid)
            .unwrap_or_else(|| panic!("pod {uid} has no cgroup under {}", kubepods.display()));
        for container in std::fs::read_dir(&pod).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
            let procs = std::fs::read_to_string(container.path().join("cgroup.procs")).unwrap_or_default();
            if let Some(pid) = procs.lines().next().and_then(|l| l.parse().ok()) {
                return PodShell { cgroup: container.path(), pid };
            }
        }
        panic!("pod {uid}: no process in {}", pod.display());
    }

    /// A GET from inside the node's network namespace; the body, or None.
    pub fn http_get(&self, url: &str) -> Option<String> {
        let out = self.in_node(false, "curl").args(["-sf", "--max-time", "3", url]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn remove_containers(&self) {
        // Shims outlive containerd: every task is killed and deleted through it.
        let out = self.ctr(&["tasks", "list", "-q"]);
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.ctr(&["tasks", "list", "-q"]);
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
            for id in &ids {
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
            if ids.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = self.ctr(&["containers", "list", "-q"]);
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.ctr(&["containers", "delete", id]);
        }
    }
}

/// A pod's network namespace and cgroup, entered through one of its processes.
#[derive(Clone, Debug)]
pub struct PodShell {
    cgroup: PathBuf,
    pid: u32,
}

impl PodShell {
    /// `program` run inside the pod (busybox from the machine).
    pub fn command(&self, args: &[&str]) -> Command {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/proc/{}/ns/net -- busybox \"$@\"",
            self.cgroup.display(),
            self.pid
        );
        let mut command = Command::new("sh");
        command.arg("-c").arg(script).arg("sh").args(args);
        command
    }

    /// Whether a TCP connection to `address`:`port` gets an "ok" within a second.
    pub fn hears_ok(&self, address: &str, port: u16) -> bool {
        let out = self.command(&["nc", "-w", "1", address, &port.to_string()]).stdin(Stdio::null()).output();
        out.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "ok")
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on a child this process spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Every cgroup hierarchy of the machine: v2 (alone or `unified/` beside v1
/// controllers), each v1 controller and the named systemd hierarchy, all of
/// which kubelet's cgroupfs driver checks for its root.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// Remove a cgroup tree bottom-up (cgroup directories go by rmdir only).
fn remove_cgroup_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kill every process whose command line names `dir` (containerd's shims,
/// which outlive it, carry its socket path there).
fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SAFETY: kill(2) on a PID read from /proc; at worst it is already gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// What an interrupted earlier run left: its processes, namespace, mounts and cgroups.
fn remove_leftovers(netns: &str, dir: &Path, cgroup_root: &str) {
    kill_processes_naming(dir);
    unmount_under(dir);
    quietly(Command::new("ip").args(["netns", "del", &outside_netns(netns)]));
    quietly(Command::new("ip").args(["netns", "del", netns]));
    for hierarchy in cgroup_hierarchies() {
        remove_cgroup_tree(&hierarchy.join(cgroup_root.trim_start_matches('/')));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The namespace that stands for the world outside the cluster.
fn outside_netns(node_netns: &str) -> String {
    format!("{node_netns}-out")
}

/// Unmount everything mounted at or under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        quietly(Command::new("umount").args(["-l", point]));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let _ = self.kubectl(&[
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--wait=false",
            "--grace-period=0",
            "--force",
        ]);
        for name in ["kubelet", "kube-proxy", "kube-scheduler"] {
            self.stop(name, Duration::from_secs(5));
        }
        if !self.mount_ns.as_os_str().is_empty() {
            self.remove_containers();
        }
        self.stop("containerd", Duration::from_secs(5));
        kill_processes_naming(&self.dir);
        for (path, value) in &self.tunables {
            if std::fs::read_to_string(path).ok().as_ref() != Some(value) {
                eprintln!("putting {path} back to {}", value.trim());
                let _ = std::fs::write(path, value);
            }
        }
        if failed {
            for log in ["kubelet.err.log", "containerd.err.log", "kube-proxy.err.log", "kube-scheduler.err.log"] {
                eprintln!("--- {} (last 40 lines)\n{}", log, self.tail(log));
            }
        }
        // kube-proxy's rules live in the node's namespace and go with it; the agent's pins are the machine's.
        let _ = std::fs::remove_dir_all(AGENT_PIN_DIR);
        unmount_under(&self.dir);
        if self.made_cni_dir {
            let _ = std::fs::remove_dir("/var/lib/cni");
        }
        for hierarchy in cgroup_hierarchies() {
            remove_cgroup_tree(&hierarchy.join(self.cgroup_root.trim_start_matches('/')));
        }
        self.stop("outside-server", Duration::from_secs(1));
        quietly(Command::new("ip").args(["netns", "del", &outside_netns(&self.netns)]));
        quietly(Command::new("ip").args(["netns", "del", &self.netns]));
        let _ = std::fs::remove_dir_all(&self.dir);
        // The control plane (a field) stops after this, and prints its own logs on failure.
    }
}
