//! A real control plane for tests: Debian's etcd and a kube-apiserver built
//! from Debian's `kubernetes` source package (tests/tools/kubernetes-build.sh,
//! cached by version, built on first use), started on loopback inside a
//! network namespace — the test's node — with TLS, token authentication and
//! RBAC. Three identities: `admin` (system:masters) for the test itself, and
//! the agent's and the controller's service accounts, which get only what
//! manifests/deploy/rbac.yaml grants them. Everything is removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub struct ControlPlane {
    pub dir: PathBuf,
    netns: String,
    /// Where the build script left kube-apiserver and kube-controller-manager.
    binaries: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// Namespace deletion and garbage collection, as in a cluster.
    controller_manager: Option<Child>,
    pub port: u16,
    /// Set for a control plane that serves a real node (`super::node`): the
    /// address the API server advertises to pods through the `kubernetes`
    /// Service, and with it node authorization, service-account tokens and
    /// every controller of a cluster.
    node_ip: Option<String>,
}

/// Run a command to success; its stdout, or a panic with both its outputs.
pub(super) fn run_ok(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What this API server (v1.20, the newest Debian builds) refuses of
/// install.yaml: the PodDisruptionBudget, whose `policy/v1` came in 1.21.
pub const VERSION_GAP: &str = "no matches for kind \"PodDisruptionBudget\" in version \"policy/v1\"";

/// The errors kubectl reports, but the version gap's.
pub fn refusals(stderr: &str) -> Vec<&str> {
    let error = |l: &&str| l.starts_with("error:") || l.starts_with("Error from server");
    stderr.lines().filter(error).filter(|l| !l.contains(VERSION_GAP)).collect()
}

pub const AGENT_USER: &str = "system:serviceaccount:bulkhead-system:bulkhead-agent";
pub const CONTROLLER_USER: &str = "system:serviceaccount:bulkhead-system:bulkhead-controller";

impl ControlPlane {
    /// Build (once) and start etcd and kube-apiserver inside `netns`.
    pub fn start(netns: &str, tag: &str) -> Self {
        Self::start_with(netns, tag, None)
    }

    /// A control plane for a node at `node_ip` in `netns`: the API server
    /// listens there too and pods reach it at 10.0.0.1.
    /// The kubelet signs in as `system:node:<node_name>` with the `node` kubeconfig.
    pub fn start_for_node(netns: &str, tag: &str, node_ip: &str, node_name: &str) -> Self {
        Self::start_with(netns, tag, Some((node_ip.to_string(), node_name.to_string())))
    }

    pub fn binary(&self, name: &str) -> PathBuf {
        self.binaries.join(name)
    }

    fn start_with(netns: &str, tag: &str, node: Option<(String, String)>) -> Self {
        let script = super::workspace_root().join("tests/tools/kubernetes-build.sh");
        assert!(script.exists(), "{} is part of the checkout", script.display());
        let built = run_ok(Command::new("bash").arg(&script).stderr(Stdio::inherit()));
        let binaries = PathBuf::from(built.lines().last().expect("the build script prints the folder"));
        let dir = std::env::temp_dir().join(format!("bulkhead-apiserver-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let extra_san = node.as_ref().map(|(ip, _)| format!(",IP:{ip}")).unwrap_or_default();
        let sh = |script: &str| {
            run_ok(
                Command::new("sh")
                    .arg("-ec")
                    .arg(script)
                    .current_dir(&dir)
                    .env("EXTRA_SAN", &extra_san)
                    .stderr(Stdio::piped()),
            )
        };
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=bulkhead-test-ca 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=kube-apiserver 2>/dev/null
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc%s' \"$EXTRA_SAN\" > san.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext 2>/dev/null
            openssl genrsa -out sa.key 2048 2>/dev/null");
        if node.is_some() {
            // What the API server shows a kubelet (for exec and logs): an admin, to the kubelet's webhook authorizer.
            sh("openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr -subj /O=system:masters/CN=kube-apiserver-kubelet-client 2>/dev/null
                openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 2 2>/dev/null");
        }
        let mut tokens = format!(
            "admin-token,admin,admin,\"system:masters\"\nagent-token,{AGENT_USER},agent,\"system:serviceaccounts,system:serviceaccounts:bulkhead-system\"\ncontroller-token,{CONTROLLER_USER},controller,\"system:serviceaccounts,system:serviceaccounts:bulkhead-system\"\n"
        );
        let mut users = vec![("admin", "admin-token"), ("agent", "agent-token"), ("controller", "controller-token")];
        if let Some((_, node_name)) = &node {
            tokens.push_str(&format!("node-token,system:node:{node_name},node,system:nodes\n"));
            users.push(("node", "node-token"));
        }
        std::fs::write(dir.join("tokens.csv"), tokens).unwrap();
        let port = 6443;
        for (user, token) in users {
            let kubeconfig = format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: \"https://127.0.0.1:{port}\", certificate-authority: \"{ca}\"}}}}]\nusers: [{{name: {user}, user: {{token: {token}}}}}]\ncontexts: [{{name: test, context: {{cluster: test, user: {user}}}}}]\ncurrent-context: test\n",
                ca = dir.join("ca.crt").display()
            );
            std::fs::write(dir.join(format!("{user}.kubeconfig")), kubeconfig).unwrap();
        }
        let mut plane = Self {
            dir,
            netns: netns.to_string(),
            binaries,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            port,
            node_ip: node.map(|(ip, _)| ip),
        };
        plane.start_etcd();
        plane.start_apiserver();
        plane.start_controller_manager();
        plane
    }

    fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/var/run/netns/{}", self.netns)).arg("--").arg(program);
        command
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log"))).unwrap()
    }

    fn start_etcd(&mut self) {
        let child = self
            .in_netns("etcd")
            .args(["--data-dir", &self.dir.join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .arg("--unsafe-no-fsync")
            .stdout(Stdio::null())
            .stderr(self.log("etcd"))
            .spawn()
            .expect("etcd (apt etcd-server)");
        self.etcd = Some(child);
    }

    pub fn start_apiserver(&mut self) {
        let file = |name: &str| self.dir.join(name).display().to_string();
        let mut command = self.in_netns(self.binaries.join("kube-apiserver"));
        command.args(["--etcd-servers=http://127.0.0.1:2379", "--insecure-port=0"]);
        match &self.node_ip {
            None => {
                command.args([
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    "--authorization-mode=RBAC",
                ]);
                // No pods run here, so none needs a service-account token.
                command.arg("--disable-admission-plugins=ServiceAccount");
            }
            Some(node_ip) => {
                command.args(["--bind-address=0.0.0.0", &format!("--advertise-address={node_ip}")]);
                command.args(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction"]);
                command.args(["--allow-privileged=true", "--kubelet-preferred-address-types=InternalIP"]);
                command.arg(format!("--kubelet-client-certificate={}", file("kubelet-client.crt")));
                command.arg(format!("--kubelet-client-key={}", file("kubelet-client.key")));
            }
        }
        let child = command
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--tls-cert-file={}", file("server.crt")))
            .arg(format!("--tls-private-key-file={}", file("server.key")))
            .arg(format!("--token-auth-file={}", file("tokens.csv")))
            .arg(format!("--service-account-key-file={}", file("sa.key")))
            .arg(format!("--service-account-signing-key-file={}", file("sa.key")))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .stdout(Stdio::null())
            .stderr(self.log("kube-apiserver"))
            .spawn()
            .expect("kube-apiserver");
        self.apiserver = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if self.kubectl(&["get", "--raw", "/readyz"]).status.success() {
                return;
            }
            if let Some(Ok(Some(_))) = self.apiserver.as_mut().map(Child::try_wait) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let log = std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default();
        panic!("kube-apiserver exited or was not ready in 90 s:\n{}", &log[log.len().saturating_sub(4000)..]);
    }

    fn start_controller_manager(&mut self) {
        let mut command = self.in_netns(self.binaries.join("kube-controller-manager"));
        command.arg(format!("--kubeconfig={}", self.kubeconfig("admin").display()));
        command.args(["--leader-elect=false", "--port=0", "--secure-port=0"]);
        if self.node_ip.is_some() {
            // A cluster's controllers: Deployments, DaemonSets, service-account tokens, endpoints.
            command.arg(format!("--service-account-private-key-file={}", self.dir.join("sa.key").display()));
            command.arg(format!("--root-ca-file={}", self.dir.join("ca.crt").display()));
        } else {
            command.arg("--controllers=namespace,garbagecollector");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(self.log("kube-controller-manager"))
            .spawn()
            .expect("kube-controller-manager");
        self.controller_manager = Some(child);
    }

    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.kubeconfig"))
    }

    /// kubectl as `admin`, inside the node's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as("admin", args, None)
    }

    /// kubectl as the admin, killed after `limit` (`None` then): a `kubectl
    /// exec` whose stream the kubelet or containerd dropped never returns.
    pub fn kubectl_within(&self, limit: std::time::Duration, args: &[&str]) -> Option<Output> {
        let out = self
            .in_netns("timeout")
            .args(["--kill-after=5", &format!("{}", limit.as_secs().max(1)), "kubectl"])
            .arg(format!("--kubeconfig={}", self.kubeconfig("admin").display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // timeout(1) exits 124 when it stopped the command, 137 when it had to kill it.
        (!matches!(out.status.code(), Some(124) | Some(137))).then_some(out)
    }

    pub fn kubectl_as(&self, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self.in_netns("kubectl");
        command.arg(format!("--kubeconfig={}", self.kubeconfig(user).display())).args(args);
        match stdin {
            None => command.stdin(Stdio::null()).output().unwrap(),
            Some(text) => {
                use std::io::Write;
                let mut child =
                    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
                child.wait_with_output().unwrap()
            }
        }
    }

    /// `kubectl apply -f -` as admin; panics with kubectl's words on failure.
    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_as("admin", &["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "kubectl apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    }

    /// `kubectl apply -f manifests/install.yaml`, exactly the README's
    /// install command, as admin; then every CRD established. Panics on any
    /// refusal but the one this v1.20 server must make (`VERSION_GAP`).
    pub fn install_bulkhead(&self) {
        let install = super::workspace_root().join("manifests/install.yaml");
        let out = self.kubectl(&["apply", "-f", &install.display().to_string()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(refusals(&stderr).is_empty(), "kubectl apply -f manifests/install.yaml: {stderr}");
        let out = self.kubectl(&["wait", "--for", "condition=established", "--timeout=60s", "crd", "--all"]);
        assert!(out.status.success(), "CRDs not established: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A command run in the node's namespace with a user's kubeconfig.
    pub fn command_as(&self, user: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = self.in_netns(program);
        command.env("KUBECONFIG", self.kubeconfig(user));
        command
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.controller_manager].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_apiserver();
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test shows what the processes said before their logs go.
        if std::thread::panicking() {
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("--- {} (last 30 lines)", path.display());
                    for line in &lines[lines.len().saturating_sub(30)..] {
                        eprintln!("{line}");
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
