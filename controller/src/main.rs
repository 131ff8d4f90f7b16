//! `bulkhead`: check, explain and compile policies; benchmarks.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use bulkhead::{
    policy::{self, compile::protocol_number, lookup, DesiredState, PodRef, Snapshot},
    scenario::{self, Scenario},
    source::manifest,
};
use bulkhead_crds::Protocol;
use clap::{Parser, Subcommand, ValueEnum};
use datapath_common::{identity, policy_prefix, verdict, EGRESS, INGRESS, RULE_DEFAULT_DENY};

mod bench;
mod demo;
mod probe;

#[derive(Parser)]
#[command(name = "bulkhead", about = "Kubernetes network microsegmentation with eBPF", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer every probe of scenario directories from the compiled state.
    Check { dirs: Vec<PathBuf> },
    /// The verdict of each hop of one connection, and what decided it.
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
    },
    /// The per-pod allowlists.
    Compile {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The node agent: follow the objects, compile, keep the datapath in step.
    Agent(AgentArgs),
    /// The status writer: policy conditions, selectedPods and Events (one replica per cluster).
    Controller {
        /// Where the agents' report Leases are.
        #[arg(long, env = "POD_NAMESPACE", default_value = "bulkhead-system")]
        agent_namespace: String,
    },
    /// Benchmarks (run through `cargo xtask bench`).
    Bench { what: String },
    /// Scenario directories with real traffic through the agent (needs root).
    Probe { dirs: Vec<PathBuf> },
    /// A small shop enforced end to end on this machine (needs root).
    Demo,
    /// Datapath maintenance.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
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
    /// Where kubelet's pod cgroups are; the cgroup v2 mount when left out.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Serves /metrics, /healthz, /readyz and /debug/{state,events}.
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_address: std::net::SocketAddr,
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
                failed |= !report.failed.is_empty();
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Explain { dir, from, to, port, ipv6 } => {
            let snapshot = load_dir(&dir)?;
            explain(&snapshot, &from, &to, &port, ipv6)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compile { dir, output } => {
            let snapshot = load_dir(&dir)?;
            let state = policy::compile(&snapshot);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&allowlists_json(&state))?),
                Output::Text => print_allowlists(&state),
            }
            for error in &state.rejected {
                eprintln!("rejected: {error}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            agent(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller { agent_namespace } => {
            init_logging(LogFormat::Text);
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the API server (kubeconfig or in-cluster)")?;
                tokio::select! {
                    result = bulkhead::status::run_controller(client, agent_namespace) => result,
                    _ = tokio::signal::ctrl_c() => Ok(()),
                    _ = terminated() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what } => {
            bench::run(&what)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe { dirs } => Ok(if probe::run(&dirs)? { ExitCode::SUCCESS } else { ExitCode::FAILURE }),
        Command::Demo => {
            demo::run()?;
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
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname for --node-name")?
            .trim()
            .to_string(),
    };
    let mut config = Config::new(&node_name, args.pin_dir);
    config.cgroup_root = Some(args.cgroup_root.unwrap_or_else(default_cgroup_root));
    config.events_per_second = args.events_per_second;
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
            tokio::spawn(bulkhead::status::report_programmed(client, namespace, node_name.clone(), shared.clone()));
        }
        let address = agent::http::serve(args.metrics_address, shared)
            .await
            .with_context(|| format!("serving metrics on {}", args.metrics_address))?;
        tracing::info!(source = %args.source, node = %node_name, metrics = %address, "agent started");
        tokio::select! {
            () = agent.run(received) => bail!("the source stopped"),
            result = source => match result {
                Ok(Ok(())) => bail!("the source stopped"),
                Ok(Err(error)) => Err(error.context("the source failed")),
                Err(error) => Err(anyhow::anyhow!("the source task: {error}")),
            },
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminated() => Ok(()),
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

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// The cgroup v2 hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host.
fn default_cgroup_root() -> PathBuf {
    let root = PathBuf::from("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        root
    } else {
        root.join("unified")
    }
}

/// A scenario directory (cluster.yaml + policies.yaml) or any folder of manifests.
fn load_dir(dir: &std::path::Path) -> Result<Snapshot> {
    if dir.join("cluster.yaml").exists() && dir.join("expect.yaml").exists() {
        let scenario = Scenario::load(dir)?;
        let mut snapshot = scenario.snapshot.clone();
        if dir.join("policies.yaml").exists() {
            let step = scenario::Step { apply: vec!["policies.yaml".into()], ..Default::default() };
            scenario.apply_step(&mut snapshot, &step)?;
        }
        return Ok(snapshot);
    }
    let mut snapshot = Snapshot::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        objects.extend(manifest::parse(&path.display().to_string(), &text)?);
    }
    scenario::assign_addresses(&mut objects);
    for object in objects {
        bulkhead::source::apply(&mut snapshot, bulkhead::source::Change::Applied(object));
    }
    Ok(snapshot)
}

fn parse_port(text: &str) -> Result<(u16, Protocol)> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let protocol = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::TCP,
        "UDP" => Protocol::UDP,
        "SCTP" => Protocol::SCTP,
        other => bail!("--port: unknown protocol {other:?}: TCP, UDP or SCTP"),
    };
    Ok((port.parse().with_context(|| format!("--port: {port:?} is not a port number"))?, protocol))
}

fn explain(snapshot: &Snapshot, from: &str, to: &str, port: &str, ipv6: bool) -> Result<()> {
    let (port, protocol) = parse_port(port)?;
    let probe = scenario::Probe {
        from: from.to_string(),
        to: to.to_string(),
        port,
        protocol,
        expect: scenario::Verdict::Allow,
        family: ipv6.then_some(scenario::Family::IPv6),
    };
    let ((src_pod, src_ip), (dst_pod, dst_ip)) = scenario::probe_addresses(snapshot, &probe)?;
    let state = policy::compile(snapshot);
    for error in &state.rejected {
        println!("note: not enforced (rejected): {error}");
    }
    let verdict = lookup::connection(
        &state,
        (Some(&src_pod), src_ip),
        (dst_pod.as_ref(), dst_ip),
        protocol_number(protocol),
        port,
    );
    println!("{from} ({src_ip}) -> {to} ({dst_ip})  {protocol:?}/{port}");
    for hop in verdict.egress.iter().chain(verdict.ingress.iter()) {
        let direction = if hop.direction == INGRESS { "ingress" } else { "egress" };
        println!("  {direction:7} of {}: {}", hop.pod, describe_hop(&state, hop));
    }
    if dst_pod.is_none() {
        println!("  {to} is outside the cluster: only the source's egress applies");
    }
    println!("verdict: {}", if verdict.allowed() { "ALLOW" } else { "DENY" });
    Ok(())
}

fn describe_hop(state: &DesiredState, hop: &lookup::Hop) -> String {
    if hop.peer_identity == identity::HOST {
        return "allow (the pod's own node is always allowed)".into();
    }
    let value = hop.value;
    let allowed = value.verdict == verdict::ALLOW;
    let word = if allowed { "allow" } else { "deny" };
    let audit = if value.audit != 0 {
        let name = state.policy_names.get(&value.audit_policy_id).map(|p| p.to_string()).unwrap_or_default();
        format!("; AUDIT: {name} rule {} would deny", value.audit_rule)
    } else {
        String::new()
    };
    match state.policy_names.get(&value.policy_id) {
        None if allowed => format!("allow (not isolated: no policy applies){audit}"),
        None => "deny (no policy state for this pod: fail closed)".into(),
        Some(policy) if value.rule == RULE_DEFAULT_DENY => {
            format!("{word} (isolated by {policy}; no rule allows it){audit}")
        }
        Some(policy) => format!("{word} by {policy} rule {}{audit}", value.rule),
    }
}

fn peer_name(state: &DesiredState, id: u32) -> String {
    match id {
        identity::ANY => "any peer".into(),
        identity::HOST => "the node".into(),
        identity::WORLD => "the world".into(),
        id => state.identities.get(&id).map(|k| k.describe()).unwrap_or_else(|| format!("identity {id}")),
    }
}

fn ports_text(prefix_len: u32, protocol: u8, port: u16) -> String {
    if prefix_len == policy_prefix::ANY_PROTOCOL {
        return "any protocol".into();
    }
    let name = match protocol {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    };
    let bits = prefix_len - policy_prefix::ANY_PORT;
    if bits == 0 {
        return format!("{name} any port");
    }
    let size = 1u32 << (16 - bits);
    if size == 1 {
        format!("{name}/{port}")
    } else {
        format!("{name}/{}-{}", port, port as u32 + size - 1)
    }
}

fn entries_of(state: &DesiredState, endpoint: u32) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for ((prefix_len, key), value) in state.policy.range((0, datapath_common::PolicyKey::new(endpoint, 0, 0, 0, 0))..) {
        if key.endpoint() != endpoint {
            if key.endpoint() > endpoint {
                break;
            }
            continue;
        }
        let direction = if key.direction() == EGRESS { "egress" } else { "ingress" };
        let verdict = if value.verdict == verdict::ALLOW {
            if value.audit != 0 {
                "allow (audit: would deny)"
            } else {
                "allow"
            }
        } else {
            "deny"
        };
        let by = match state.policy_names.get(&value.policy_id) {
            None => "default".to_string(),
            Some(p) if value.rule == RULE_DEFAULT_DENY => format!("{} (isolation)", p.qualified_name()),
            Some(p) => format!("{} rule {}", p.qualified_name(), value.rule),
        };
        out.push((
            direction.into(),
            peer_name(state, key.identity()),
            ports_text(*prefix_len, key.protocol(), key.port()),
            verdict.into(),
            by,
        ));
    }
    out
}

fn print_allowlists(state: &DesiredState) {
    for (pod, endpoint) in &state.endpoints {
        let addresses: Vec<String> = endpoint.addresses.iter().map(IpAddr::to_string).collect();
        println!("{pod}  (endpoint {}, {})", endpoint.id, addresses.join(", "));
        for (direction, peer, ports, verdict, by) in entries_of(state, endpoint.id) {
            println!("  {direction:7} {peer:50} {ports:22} {verdict:26} {by}");
        }
    }
}

fn allowlists_json(state: &DesiredState) -> serde_json::Value {
    let pods: Vec<serde_json::Value> = state
        .endpoints
        .iter()
        .map(|(pod, endpoint): (&PodRef, _)| {
            let entries: Vec<serde_json::Value> = entries_of(state, endpoint.id)
                .into_iter()
                .map(|(direction, peer, ports, verdict, by)| serde_json::json!({"direction": direction, "peer": peer, "ports": ports, "verdict": verdict, "decidedBy": by}))
                .collect();
            serde_json::json!({"pod": pod.to_string(), "endpoint": endpoint.id, "addresses": endpoint.addresses, "entries": entries})
        })
        .collect();
    let rejected: Vec<String> = state.rejected.iter().map(ToString::to_string).collect();
    serde_json::json!({"pods": pods, "rejected": rejected})
}
