//! `bulkhead`: the node agent, the cluster controller, and the offline
//! commands that check, explain and compile policies.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use bulkhead::cli::{
    self, rollout,
    scenario::{self, Scenario},
};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "bulkhead", about = "Kubernetes network microsegmentation with eBPF", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer every probe of scenario directories from the compiled state.
    /// Exits 1 when a probe fails or a policy is rejected.
    Check { dirs: Vec<PathBuf> },
    /// The verdict of each hop of one connection, and what decided it.
    /// Exits 0 when it is allowed, 1 when denied, 2 on an error.
    Explain {
        dir: PathBuf,
        #[arg(long)]
        from: String,
        /// namespace/pod or an IP address.
        #[arg(long)]
        to: String,
        /// PORT/PROTOCOL, e.g. 80/TCP.
        #[arg(long)]
        port: String,
        #[arg(long)]
        ipv6: bool,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The per-pod allowlists: exactly the entries the datapath would hold.
    /// Exits 1 when a policy is rejected.
    Compile {
        dir: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Per namespace, the pods an enforced policy isolates for ingress and
    /// egress, and those no policy governs either way (open).
    Coverage {
        /// A folder of manifests; left out: the cluster of the current
        /// kubeconfig, with which pods its agents enforce.
        dir: Option<PathBuf>,
        /// Kubernetes mode: the namespace of the agents' report Leases.
        #[arg(long, default_value = "bulkhead-system")]
        report_namespace: String,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check manifests offline, as the agents would, before `kubectl apply`:
    /// unknown fields and every semantic check, by file, object and field.
    /// Exits 1 on any error.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A live tail of verdicts (deny, audit, allow) from agents' debug
    /// addresses: on a node, or through `kubectl port-forward` to an agent pod.
    Flows {
        /// An agent's --debug-address (repeatable).
        #[arg(long, default_values_t = ["127.0.0.1:9465".to_string()])]
        agent: Vec<String>,
        /// Verdicts with an end in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Verdicts with this pod (`name` or `namespace/name`) at an end.
        #[arg(long)]
        pod: Option<String>,
        #[arg(long, value_parser = ["allow", "deny", "audit"])]
        verdict: Option<String>,
        /// Keep printing verdicts as they come.
        #[arg(short, long)]
        follow: bool,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Workloads' egress baselines (merged across nodes), and edits to them.
    Baseline {
        #[command(subcommand)]
        command: BaselineCommand,
        /// Dir mode: the agent's --state-dir; without it, the cluster.
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
        /// Kubernetes mode: the agents' namespace (reports and edits).
        #[arg(long, global = true, default_value = "bulkhead-system")]
        report_namespace: String,
    },
    /// Pods quarantined after an egress anomaly (agent --on-anomaly=quarantine).
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Roll default-deny out namespace by namespace.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// The node agent: follow the objects, compile, keep the datapath in step.
    Agent(AgentArgs),
    /// The status writer: policy conditions, selectedPods and Events. Run
    /// several replicas: they elect one leader, which alone writes.
    Controller(ControllerArgs),
    /// Datapath maintenance.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Print (or with --apply, server-side apply) an Audit-mode default-deny
    /// ConnectionPolicy for each namespace, keeping DNS and the CIDRs given.
    Plan {
        #[arg(required = true)]
        namespaces: Vec<String>,
        /// The cluster DNS's namespace.
        #[arg(long, default_value = "kube-system")]
        dns_namespace: String,
        /// The cluster DNS pods' labels, key=value[,key=value]; "" leaves DNS out.
        #[arg(long, default_value = "k8s-app=kube-dns")]
        dns_selector: String,
        /// An egress destination every pod keeps (repeatable), e.g. the API server.
        #[arg(long)]
        allow_egress_cidr: Vec<String>,
        /// Apply to the cluster of the current kubeconfig instead of printing.
        #[arg(long, conflicts_with = "into")]
        apply: bool,
        /// Dir mode: write each plan into the agents' folder instead of printing.
        #[arg(long)]
        into: Option<PathBuf>,
    },
    /// The connections the namespace's default-deny would have denied (the
    /// agents' audit flows), and the ConnectionPolicies that allow exactly them.
    Report {
        namespace: String,
        #[command(flatten)]
        flows: FlowArgs,
        /// text: the flows and the proposal; yaml: the proposal alone, for
        /// `kubectl apply -f -`; json: both.
        #[arg(short, long, value_enum, default_value_t = ReportOutput::Text)]
        output: ReportOutput,
    },
    /// Switch the namespace's default-deny to Enforce, unless a connection
    /// seen since the last policy change would then be denied: those are
    /// listed, and it exits 1.
    Enforce {
        namespace: String,
        #[command(flatten)]
        flows: FlowArgs,
        /// Dir mode: the agents' folder (the policies in place, and the plan's file).
        #[arg(long, requires = "state_dir")]
        dir: Option<PathBuf>,
        /// Switch even if connections seen would be denied.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// Every workload's baseline: since when, and the destinations learned.
    List {
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Forget what a workload learned: it learns again from now, on every node.
    Reset {
        workload: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Add a destination (`ns/workload:443/TCP` or `203.0.113.7:443/TCP`) to a workload's baseline.
    Allow {
        workload: String,
        destination: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Every quarantined pod, its node and why.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Take a pod out of quarantine.
    Release {
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

/// Where the audit flows come from.
#[derive(clap::Args)]
struct FlowArgs {
    /// Dir mode: an agent's --state-dir (repeatable); without it the agents'
    /// reports are read through the API server.
    #[arg(long)]
    state_dir: Vec<PathBuf>,
    /// Kubernetes mode: the namespace of the agents' report Leases.
    #[arg(long, default_value = "bulkhead-system")]
    report_namespace: String,
}

impl FlowArgs {
    fn source(self) -> rollout::FlowSource {
        if self.state_dir.is_empty() {
            rollout::FlowSource::Cluster { report_namespace: self.report_namespace }
        } else {
            rollout::FlowSource::StateDirs(self.state_dir)
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportOutput {
    Text,
    Yaml,
    Json,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// `dir:<path>` (a folder of manifests, or a scenario directory) or `kubernetes`.
    #[arg(long, default_value = "dir:/etc/bulkhead/objects")]
    source: String,
    /// This node's name: pods with this `spec.nodeName` are enforced here.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[arg(long, default_value = bulkhead::dataplane::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where the node's cgroups are mounted (/sys/fs/cgroup when left out); on a
    /// hybrid host its cgroup v2 part, `unified/`, is used.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Serves /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_address: SocketAddr,
    /// Serves /debug/state and /debug/events, which name pods and flows:
    /// loopback unless given (the same address as metrics serves all).
    #[arg(long, default_value = "127.0.0.1:9465")]
    debug_address: SocketAddr,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds a workload's egress destinations are learned before a new one
    /// counts as an anomaly (bulkhead_egress_anomalies_total); 0 turns it off.
    #[arg(long, default_value_t = 600)]
    egress_learning_seconds: u64,
    /// Kubernetes mode: the namespace of this node's report Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "bulkhead-system")]
    report_namespace: String,
    /// Deny/audit events per second and CPU sent to the log; the rest are counted only.
    #[arg(long)]
    events_per_second: Option<u64>,
    /// What the node keeps across restarts (audit flows, egress baselines).
    #[arg(long, default_value = "/var/lib/bulkhead")]
    state_dir: PathBuf,
    /// What an egress anomaly does beyond the counter, log and Event:
    /// `quarantine` labels the pod bulkhead.io/quarantine in namespaces
    /// labelled bulkhead.io/on-anomaly=quarantine (Kubernetes mode).
    #[arg(long, value_parser = ["log", "quarantine"], default_value = "log")]
    on_anomaly: String,
    /// The names the CNI gives pods' host-side veths begin with (e.g. `veth`
    /// for bridge and ptp, `cali` for Calico), comma-separated: such veths get
    /// their programs as they appear, before kubelet reports the pod's address.
    #[arg(long, value_delimiter = ',')]
    pod_interface_prefix: Vec<String>,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Where the agents' report Leases and the election Lease are.
    #[arg(long, env = "POD_NAMESPACE", default_value = "bulkhead-system")]
    namespace: String,
    /// This replica's name in the leader election (the pod's name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Serves /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9466")]
    metrics_address: SocketAddr,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve the validating admission webhook (HTTPS, /validate) here.
    #[arg(long)]
    webhook_address: Option<SocketAddr>,
    /// The Secret (in --namespace) that keeps the webhook's CA, certificate
    /// and key; made by the first replica that finds none.
    #[arg(long, default_value = "bulkhead-webhook-tls")]
    webhook_secret: String,
    /// The ValidatingWebhookConfiguration whose caBundle the controller sets.
    #[arg(long, default_value = "bulkhead")]
    webhook_configuration: String,
    /// Names and addresses the webhook's certificate is for (repeatable);
    /// bulkhead-webhook.<namespace>.svc when left out.
    #[arg(long)]
    webhook_host: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum DatapathCommand {
    /// Load the programs, adopting the pinned maps and links, and hold them
    /// until killed (what a restarted agent does before its first sync).
    Hold {
        #[arg(long, default_value = bulkhead::dataplane::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach everything and remove every pin.
    Remove {
        #[arg(long, default_value = bulkhead::dataplane::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    bulkhead::limit_malloc_arenas();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { dirs } => {
            let mut failed = false;
            for dir in dirs {
                let scenario = Scenario::load(&dir).with_context(|| format!("loading scenario {}", dir.display()))?;
                let report = scenario::check(&scenario)?;
                failed |= !report.failed.is_empty() || !report.rejected.is_empty();
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Explain { dir, from, to, port, ipv6, output } => {
            let snapshot = cli::load(&dir)?;
            let explanation = cli::explain(&snapshot, &from, &to, &port, ipv6)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
                Output::Text => cli::print_explanation(&explanation),
            }
            Ok(if explanation.allowed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Compile { dir, output } => {
            let snapshot = cli::load(&dir)?;
            let state = bulkhead_policy::compile(&snapshot);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&cli::allowlists_json(&state))?),
                Output::Text => cli::print_allowlists(&state),
            }
            for error in &state.rejected {
                eprintln!("rejected: {error}");
            }
            Ok(if state.rejected.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Coverage { dir, report_namespace, output } => {
            let coverage = match dir {
                Some(dir) => bulkhead_policy::coverage::coverage(&cli::load(&dir)?),
                None => {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    runtime.block_on(cli::cluster::coverage(&report_namespace))?
                }
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&coverage)?),
                Output::Text => cli::print_coverage(&coverage),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollout {
            command: RolloutCommand::Plan { namespaces, dns_namespace, dns_selector, allow_egress_cidr, apply, into },
        } => {
            let allowances = rollout::Allowances::parse(&dns_namespace, &dns_selector, &allow_egress_cidr)?;
            let policies = rollout::plan(&namespaces, &allowances);
            if let Some(folder) = into {
                rollout::write_into(&folder, &policies)?;
                return Ok(ExitCode::SUCCESS);
            }
            if !apply {
                print!("{}", rollout::to_yaml(&policies)?);
                return Ok(ExitCode::SUCCESS);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(rollout::apply(&policies))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Baseline { command, state_dir, report_namespace } => {
            use bulkhead_policy::baseline::Change;
            let place = match state_dir {
                Some(dir) => cli::baseline::Place::StateDir(dir),
                None => cli::baseline::Place::Cluster { report_namespace },
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match command {
                BaselineCommand::List { namespace, output } => {
                    let baselines = runtime.block_on(cli::baseline::list(&place))?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&baselines)?),
                        Output::Text => cli::baseline::print(&baselines, namespace.as_deref()),
                    }
                }
                BaselineCommand::Reset { workload, namespace } => {
                    runtime.block_on(cli::baseline::edit(&place, &namespace, &workload, Change::Reset))?;
                    println!("{namespace}/{workload}: baseline reset; it learns again from now");
                }
                BaselineCommand::Allow { workload, destination, namespace } => {
                    let destination = cli::baseline::parse_destination(&destination)?;
                    let text = cli::baseline::destination_text(&destination);
                    runtime.block_on(cli::baseline::edit(&place, &namespace, &workload, Change::Allow(destination)))?;
                    println!("{namespace}/{workload}: {text} added to the baseline");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Quarantine { command } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match command {
                QuarantineCommand::List { output } => {
                    let quarantined = runtime.block_on(cli::quarantine::list())?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&quarantined)?),
                        Output::Text => cli::quarantine::print(&quarantined),
                    }
                }
                QuarantineCommand::Release { pod, namespace } => {
                    runtime.block_on(cli::quarantine::release(&namespace, &pod))?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows { agent, namespace, pod, verdict, follow, output } => {
            let filter = cli::flows::Filter { namespace, pod, verdict };
            cli::flows::tail(&agent, &filter, follow, matches!(output, Output::Json))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollout { command: RolloutCommand::Report { namespace, flows, output } } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (flows, omitted) = runtime.block_on(rollout::gather_flows(&flows.source()))?;
            let report = rollout::report(&namespace, flows, omitted);
            for unproposed in report.proposal.unproposed.iter().filter(|_| !matches!(output, ReportOutput::Text)) {
                eprintln!("not proposed: {}: {}", unproposed.flow, unproposed.why);
            }
            match output {
                ReportOutput::Text => rollout::print_report(&namespace, &report)?,
                ReportOutput::Yaml => print!("{}", rollout::to_yaml(&report.proposal.policies)?),
                ReportOutput::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "namespace": namespace,
                        "flows": report.flows,
                        "omitted": report.omitted,
                        "proposed": report.proposal.policies,
                        "unproposed": report.proposal.unproposed,
                    }))?
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollout { command: RolloutCommand::Enforce { namespace, flows, dir, force } } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (flows, _) = runtime.block_on(rollout::gather_flows(&flows.source()))?;
            let (snapshot, since) = match &dir {
                Some(folder) => rollout::folder_state(folder)?,
                None => runtime.block_on(rollout::cluster_state(&namespace))?,
            };
            let unexplained = rollout::unexplained_since(&snapshot, &namespace, &flows, since)?;
            if !unexplained.is_empty() {
                println!(
                    "{} connection(s) seen since the last policy change would be denied under Enforce:",
                    unexplained.len()
                );
                rollout::print_flows(&unexplained);
                if !force {
                    println!("not switched: allow them (`bulkhead rollout report {namespace}`), or --force");
                    return Ok(ExitCode::FAILURE);
                }
                println!("--force: switching anyway");
            }
            match &dir {
                Some(folder) => rollout::enforce_in_folder(folder, &namespace)?,
                None => runtime.block_on(rollout::enforce_in_cluster(&namespace))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { paths, output } => {
            let validation = cli::validate::validate(&paths)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&validation)?),
                Output::Text => cli::validate::print(&validation),
            }
            Ok(if validation.errors() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Agent(args) => {
            agent(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller(args) => {
            init_logging(args.log_format);
            let identity = match args.identity {
                Some(identity) => identity,
                None => hostname()?,
            };
            let webhook = args.webhook_address.map(|address| bulkhead::controller::webhook::WebhookConfig {
                address,
                secret: args.webhook_secret,
                configuration: args.webhook_configuration,
                hosts: if args.webhook_host.is_empty() {
                    vec![format!("bulkhead-webhook.{}.svc", args.namespace)]
                } else {
                    args.webhook_host
                },
            });
            let config = bulkhead::controller::Config {
                namespace: args.namespace,
                identity,
                metrics_address: args.metrics_address,
                webhook,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the API server (kubeconfig or in-cluster)")?;
                bulkhead::controller::run(client, config).await
            })?;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Datapath { command: DatapathCommand::Hold { pin_dir } } => {
            let datapath = bulkhead::dataplane::Datapath::load(&pin_dir)?;
            println!("adopted {} policy entries under {}", datapath.policy_entries().len(), pin_dir.display());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Command::Datapath { command: DatapathCommand::Remove { pin_dir } } => {
            bulkhead::dataplane::Datapath::unpin_all(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn agent(args: AgentArgs) -> Result<()> {
    use bulkhead::agent::{self, Agent, Config, Shared};
    init_logging(args.log_format);
    let node_name = match args.node_name {
        Some(name) => name,
        None => hostname()?,
    };
    let mut config = Config::new(&node_name, args.pin_dir);
    config.cgroup_root = Some(cgroup_v2(args.cgroup_root.unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))));
    config.events_per_second = args.events_per_second;
    config.state_dir = Some(args.state_dir);
    config.quarantine_on_anomaly = args.on_anomaly == "quarantine";
    config.pod_interface_prefixes = args.pod_interface_prefix.into_iter().filter(|p| !p.is_empty()).collect();
    config.egress_learning =
        (args.egress_learning_seconds > 0).then(|| std::time::Duration::from_secs(args.egress_learning_seconds));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let (updates, received) = tokio::sync::mpsc::channel(1024);
        let mut reporter = None;
        let source = match args.source.split_once(':') {
            Some(("dir", path)) => {
                config.unscheduled_pods_are_local = true;
                let source = bulkhead::source::dir::DirSource::new(path);
                anyhow::ensure!(source.root().is_dir(), "--source: {path} is not a directory");
                tokio::spawn(bulkhead::source::dir::run(source, updates))
            }
            _ if args.source == "kubernetes" => {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the API server (kubeconfig or in-cluster)")?;
                reporter = Some((client.clone(), args.report_namespace.clone()));
                tokio::spawn(bulkhead::source::kubernetes::run(client, updates))
            }
            _ => bail!("--source: {:?} is neither dir:<path> nor kubernetes", args.source),
        };
        let shared = std::sync::Arc::new(Shared::new());
        let agent = Agent::new(config, shared.clone())?;
        if let Some((client, namespace)) = reporter {
            tokio::spawn(bulkhead::agent::report::report_programmed(
                client.clone(),
                namespace,
                node_name.clone(),
                shared.clone(),
            ));
            let anomalies = shared.anomalies_to_publish();
            tokio::spawn(bulkhead::agent::report::publish_anomalies(
                client,
                node_name.clone(),
                shared.clone(),
                anomalies,
            ));
        }
        let (metrics, debug_views) = agent::http::serve(args.metrics_address, args.debug_address, shared)
            .await
            .with_context(|| format!("serving on {} and {}", args.metrics_address, args.debug_address))?;
        tracing::info!(source = %args.source, node = %node_name, %metrics, %debug_views, "agent started");
        tokio::select! {
            () = agent.run(received) => bail!("the source stopped"),
            result = source => match result {
                Ok(Ok(())) => bail!("the source stopped"),
                Ok(Err(error)) => Err(error.context("the source failed")),
                Err(error) => Err(anyhow::anyhow!("the source task: {error}")),
            },
            () = bulkhead::stop_requested() => Ok(()),
        }
    })?;
    // The pinned programs and maps stay: enforcement outlives the agent, and the next one adopts them.
    tracing::info!("stopped; the datapath stays pinned and enforcing");
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,netlink_packet_route=error"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
}

fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?.trim().to_string())
}

/// The cgroup v2 hierarchy under a cgroup mount: the mount itself, or its
/// `unified/` on a hybrid host (v1 controllers beside), where programs attach.
fn cgroup_v2(root: PathBuf) -> PathBuf {
    if root.join("cgroup.controllers").exists() || !root.join("unified/cgroup.controllers").exists() {
        root
    } else {
        root.join("unified")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_views_default_to_loopback_and_metrics_to_every_address() {
        let Command::Agent(args) = Cli::parse_from(["bulkhead", "agent"]).command else { panic!("an agent") };
        assert!(args.debug_address.ip().is_loopback(), "{}", args.debug_address);
        assert!(args.metrics_address.ip().is_unspecified());
        let Command::Controller(args) = Cli::parse_from(["bulkhead", "controller"]).command else {
            panic!("a controller")
        };
        assert_ne!(args.metrics_address.port(), 9464, "the controller's port differs from the agent's");
    }
}
