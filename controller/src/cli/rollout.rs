//! `bulkhead rollout`: default-deny, one namespace at a time. `plan` is
//! the first step. Each namespace gets a ConnectionPolicy that isolates
//! every pod both ways in Audit mode (so nothing breaks yet and every
//! connection it would refuse is reported), with the allowances every
//! namespace needs stated in it: DNS to the cluster DNS, and whatever the
//! operator adds. `report` reads what the agents saw it would have denied
//! (their audit flows) and proposes the ConnectionPolicies that allow exactly
//! that; `enforce` switches the default-deny to Enforce once nothing seen
//! since the last policy change is left denied.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use bulkhead_crds::{
    ConnectionPolicy, ConnectionPolicySpec, EgressRule, IpBlock, Mode, Peer, PolicyType, PortSpec, Protocol,
};
use bulkhead_policy::{
    audit::{self, AuditFlows, Direction, Flow, Proposal},
    PolicyKind, PolicyRef, Snapshot,
};
use k8s_openapi::{
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
    jiff::Timestamp,
};
use kube::api::{Api, Patch, PatchParams};

use super::cluster;
use crate::report::{ReportedFlows, AUDIT_FLOWS_ANNOTATION};

/// The policy's name in each namespace.
pub const POLICY_NAME: &str = "bulkhead-default-deny";
/// What marks the policies the rollout commands own.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "bulkhead-rollout");

/// What every namespace is allowed while default-deny is rolled out.
#[derive(Clone, Debug)]
pub struct Allowances {
    /// The cluster DNS: its namespace and pod labels; `None` leaves DNS out.
    pub dns: Option<(String, BTreeMap<String, String>)>,
    /// Further egress destinations every pod keeps, as CIDRs.
    pub egress_cidrs: Vec<String>,
}

impl Allowances {
    /// `--dns-namespace`, `--dns-selector key=value,...` (empty: no DNS
    /// allowance) and `--allow-egress-cidr`, checked here so a typo is named
    /// before anything is printed or applied.
    pub fn parse(dns_namespace: &str, dns_selector: &str, egress_cidrs: &[String]) -> Result<Self> {
        let dns = if dns_selector.is_empty() {
            None
        } else {
            let mut labels = BTreeMap::new();
            for pair in dns_selector.split(',') {
                let Some((key, value)) = pair.split_once('=') else {
                    bail!("--dns-selector: {pair:?} is not key=value");
                };
                labels.insert(key.trim().to_string(), value.trim().to_string());
            }
            Some((dns_namespace.to_string(), labels))
        };
        for cidr in egress_cidrs {
            cidr.parse::<ipnet::IpNet>().with_context(|| format!("--allow-egress-cidr: {cidr:?} is not a CIDR"))?;
        }
        Ok(Allowances { dns, egress_cidrs: egress_cidrs.to_vec() })
    }
}

/// One Audit-mode default-deny per namespace, in the order given.
pub fn plan(namespaces: &[String], allowances: &Allowances) -> Vec<ConnectionPolicy> {
    namespaces.iter().map(|namespace| default_deny(namespace, allowances)).collect()
}

fn default_deny(namespace: &str, allowances: &Allowances) -> ConnectionPolicy {
    let mut egress = Vec::new();
    if let Some((dns_namespace, labels)) = &allowances.dns {
        let ports = [Protocol::UDP, Protocol::TCP]
            .into_iter()
            .map(|protocol| PortSpec { protocol, port: Some(IntOrString::Int(53)), end_port: None })
            .collect();
        egress.push(EgressRule {
            to: Some(vec![Peer {
                namespace_selector: Some(selector([(
                    "kubernetes.io/metadata.name".to_string(),
                    dns_namespace.clone(),
                )])),
                pod_selector: Some(selector(labels.clone())),
                ip_block: None,
            }]),
            ports: Some(ports),
        });
    }
    if !allowances.egress_cidrs.is_empty() {
        let to = allowances
            .egress_cidrs
            .iter()
            .map(|cidr| Peer { ip_block: Some(IpBlock { cidr: cidr.clone(), except: None }), ..Default::default() })
            .collect();
        egress.push(EgressRule { to: Some(to), ports: None });
    }
    let mut policy = ConnectionPolicy::new(
        POLICY_NAME,
        ConnectionPolicySpec {
            pod_selector: LabelSelector::default(),
            policy_types: Some(vec![PolicyType::Ingress, PolicyType::Egress]),
            mode: Mode::Audit,
            ingress: None,
            egress: Some(egress),
        },
    );
    policy.metadata.namespace = Some(namespace.to_string());
    policy.metadata.labels = Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into());
    policy
}

fn selector(labels: impl IntoIterator<Item = (String, String)>) -> LabelSelector {
    LabelSelector { match_labels: Some(labels.into_iter().collect()), match_expressions: None }
}

/// The plan as YAML documents, ready for `kubectl apply -f -`.
pub fn to_yaml(policies: &[ConnectionPolicy]) -> Result<String> {
    let documents: Result<Vec<String>> =
        policies.iter().map(|p| serde_saphyr::to_string(p).context("serializing the plan")).collect();
    Ok(documents?.join("---\n"))
}

/// Server-side apply each policy under the rollout's field manager, printing
/// what was applied; the first refusal (an API server or webhook error) stops
/// it, naming the namespace.
pub async fn apply(policies: &[ConnectionPolicy]) -> Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the cluster of the current kubeconfig")?;
    let params = PatchParams::apply(MANAGED_BY.1);
    for policy in policies {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<ConnectionPolicy> = Api::namespaced(client.clone(), namespace);
        api.patch(POLICY_NAME, &params, &Patch::Apply(policy))
            .await
            .with_context(|| format!("applying ConnectionPolicy {namespace}/{POLICY_NAME}"))?;
        println!("connectionpolicy.bulkhead.io/{POLICY_NAME} applied in {namespace} (Audit)");
    }
    Ok(())
}

/// Where a plan goes in dir mode: the agents' folder, one file per namespace
/// that `enforce` rewrites.
pub fn plan_file(folder: &Path, namespace: &str) -> PathBuf {
    folder.join(format!("bulkhead-rollout-{namespace}.yaml"))
}

/// Dir mode's apply: each plan into its file in the agents' folder.
pub fn write_into(folder: &Path, policies: &[ConnectionPolicy]) -> Result<()> {
    for policy in policies {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
        let path = plan_file(folder, namespace);
        std::fs::write(&path, to_yaml(std::slice::from_ref(policy))?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{POLICY_NAME} for {namespace} written to {} (Audit)", path.display());
    }
    Ok(())
}

/// Where the audit flows are read from: agents' state directories (dir
/// mode), or the agents' reports through the API server.
pub enum FlowSource {
    StateDirs(Vec<PathBuf>),
    Cluster { report_namespace: String },
}

/// Every node's audit flows, merged: one flow seen on several nodes is one
/// row, its counts added. Also how many flows nodes kept out of their reports.
pub async fn gather_flows(source: &FlowSource) -> Result<(Vec<Flow>, usize)> {
    let mut merged = AuditFlows::new(usize::MAX);
    let mut omitted = 0;
    match source {
        FlowSource::StateDirs(dirs) => {
            for dir in dirs {
                merged.merge(crate::agent::audit_log::read(dir)?);
            }
        }
        FlowSource::Cluster { report_namespace } => {
            let client = cluster::client().await?;
            for reported in
                cluster::reported::<ReportedFlows>(&client, report_namespace, AUDIT_FLOWS_ANNOTATION).await?
            {
                omitted += reported.omitted;
                merged.merge(reported.flows);
            }
        }
    }
    Ok((merged.flows(), omitted))
}

/// `bulkhead rollout report`: the flows judged in the namespace, and the
/// policies that allow exactly them.
pub struct Report {
    pub flows: Vec<Flow>,
    pub proposal: Proposal,
    pub omitted: usize,
}

pub fn report(namespace: &str, flows: Vec<Flow>, omitted: usize) -> Report {
    let flows: Vec<Flow> = audit::judged_in(namespace, &flows).into_iter().cloned().collect();
    let proposal = audit::propose(namespace, &flows);
    Report { flows, proposal, omitted }
}

pub fn print_flows(flows: &[Flow]) {
    println!(
        "{:<8} {:<30} {:<30} {:>11} {:>7}  {:<20} {:<20} POLICY",
        "DIR", "SOURCE", "DESTINATION", "PORT", "COUNT", "FIRST SEEN (UTC)", "LAST SEEN (UTC)"
    );
    for flow in flows {
        let key = &flow.key;
        let direction = match key.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        println!(
            "{direction:<8} {:<30} {:<30} {:>11} {:>7}  {:<20} {:<20} {}",
            key.source.to_string(),
            key.destination.to_string(),
            format!("{}/{}", key.port, key.protocol),
            flow.stats.count,
            time_text(flow.stats.first_seen),
            time_text(flow.stats.last_seen),
            flow.stats.policy
        );
    }
}

pub fn print_report(namespace: &str, report: &Report) -> Result<()> {
    if report.flows.is_empty() {
        println!("no audit verdicts in {namespace}: nothing the rollout's default-deny would have denied");
    } else {
        print_flows(&report.flows);
    }
    if report.omitted > 0 {
        println!("note: nodes kept {} more flows than they report; the oldest are not shown", report.omitted);
    }
    for unproposed in &report.proposal.unproposed {
        println!("not proposed: {}: {}", unproposed.flow, unproposed.why);
    }
    if !report.proposal.policies.is_empty() {
        println!("\nproposed (`-o yaml | kubectl apply -f -`):\n");
        print!("{}", to_yaml(&report.proposal.policies)?);
    }
    Ok(())
}

/// The namespace's default-deny, as the snapshot names it.
pub fn default_deny_ref(namespace: &str) -> PolicyRef {
    PolicyRef { kind: PolicyKind::ConnectionPolicy, namespace: namespace.into(), name: POLICY_NAME.into() }
}

/// `bulkhead rollout enforce`'s judgement: the namespace's flows seen since
/// `since` (the last policy change, Unix seconds) that the policies in place
/// would deny once the default-deny enforces.
pub fn unexplained_since(snapshot: &Snapshot, namespace: &str, flows: &[Flow], since: u64) -> Result<Vec<Flow>> {
    let recent: Vec<Flow> =
        audit::judged_in(namespace, flows).into_iter().filter(|f| f.stats.last_seen >= since).cloned().collect();
    audit::unexplained(snapshot, &[default_deny_ref(namespace)], &recent)
        .map_err(|why| anyhow::anyhow!("{why}: no rollout to enforce in {namespace} (`bulkhead rollout plan` first)"))
}

/// Dir mode: the folder's snapshot, and when its files last changed.
pub fn folder_state(folder: &Path) -> Result<(Snapshot, u64)> {
    let snapshot = super::load(folder)?;
    let mut since = 0;
    for entry in std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))? {
        let modified = entry?.metadata()?.modified()?;
        since = since.max(modified.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    }
    Ok((snapshot, since))
}

/// Dir mode's switch: the plan's file in the folder, its mode now Enforce.
pub fn enforce_in_folder(folder: &Path, namespace: &str) -> Result<()> {
    let path = plan_file(folder, namespace);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (written by `bulkhead rollout plan --into`)", path.display()))?;
    let mut policy: ConnectionPolicy =
        serde_saphyr::from_str(&text).with_context(|| format!("{}: not the rollout's policy", path.display()))?;
    policy.spec.mode = Mode::Enforce;
    std::fs::write(&path, to_yaml(&[policy])?).with_context(|| format!("writing {}", path.display()))?;
    println!("{POLICY_NAME} in {namespace} switched to Enforce ({})", path.display());
    Ok(())
}

/// Kubernetes mode: the cluster's snapshot, and the newest change to a
/// policy that can judge the namespace's pods.
pub async fn cluster_state(namespace: &str) -> Result<(Snapshot, u64)> {
    let listed = cluster::list(&cluster::client().await?).await?;
    let since = listed.last_change_for(namespace);
    Ok((listed.snapshot, since))
}

/// Kubernetes mode's switch: the default-deny applied again by the rollout's
/// field manager, its mode now Enforce.
pub async fn enforce_in_cluster(namespace: &str) -> Result<()> {
    let api: Api<ConnectionPolicy> = Api::namespaced(cluster::client().await?, namespace);
    let mut policy =
        api.get(POLICY_NAME).await.with_context(|| format!("reading ConnectionPolicy {namespace}/{POLICY_NAME}"))?;
    let mut switched = ConnectionPolicy::new(POLICY_NAME, std::mem::take(&mut policy.spec));
    switched.spec.mode = Mode::Enforce;
    switched.metadata.namespace = Some(namespace.to_string());
    switched.metadata.labels = policy.metadata.labels;
    api.patch(POLICY_NAME, &PatchParams::apply(MANAGED_BY.1).force(), &Patch::Apply(&switched))
        .await
        .with_context(|| format!("switching ConnectionPolicy {namespace}/{POLICY_NAME} to Enforce"))?;
    println!("connectionpolicy.bulkhead.io/{POLICY_NAME} in {namespace} switched to Enforce");
    Ok(())
}

fn time_text(unix_seconds: u64) -> String {
    Timestamp::from_second(unix_seconds as i64).map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Allowances {
        Allowances::parse("kube-system", "k8s-app=kube-dns", &[]).unwrap()
    }

    #[test]
    fn each_namespace_gets_an_audit_default_deny_that_keeps_dns() {
        let policies = plan(&["shop".into(), "lab".into()], &defaults());
        assert_eq!(policies.len(), 2);
        let shop = &policies[0];
        assert_eq!(shop.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(shop.spec.mode, Mode::Audit);
        assert_eq!(shop.spec.policy_types, Some(vec![PolicyType::Ingress, PolicyType::Egress]));
        assert!(shop.spec.ingress.is_none(), "no ingress rule: every ingress would be denied");
        let egress = shop.spec.egress.as_ref().unwrap();
        assert_eq!(egress.len(), 1, "only DNS");
        let ports = egress[0].ports.as_ref().unwrap();
        assert_eq!(ports.iter().map(|p| p.protocol).collect::<Vec<_>>(), [Protocol::UDP, Protocol::TCP]);
        let to = &egress[0].to.as_ref().unwrap()[0];
        assert_eq!(to.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["k8s-app"], "kube-dns");
    }

    #[test]
    fn flags_override_the_allowances_and_typos_are_named() {
        let none = Allowances::parse("kube-system", "", &["10.96.0.1/32".into()]).unwrap();
        let egress = plan(&["shop".into()], &none).remove(0).spec.egress.unwrap();
        assert_eq!(egress.len(), 1, "no DNS, the API server's address");
        assert_eq!(egress[0].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "10.96.0.1/32");
        let error = Allowances::parse("kube-system", "k8s-app", &[]).unwrap_err().to_string();
        assert!(error.contains("--dns-selector") && error.contains("k8s-app"), "{error}");
        let error = Allowances::parse("kube-system", "a=b", &["10.0.0.0/33".into()]).unwrap_err().to_string();
        assert!(error.contains("--allow-egress-cidr") && error.contains("10.0.0.0/33"), "{error}");
    }

    /// What `plan` prints is what the agents accept: it goes through the
    /// same parse and validation as any manifest.
    #[test]
    fn the_printed_plan_parses_and_validates() {
        let text = to_yaml(&plan(&["shop".into(), "lab".into()], &defaults())).unwrap();
        let objects = bulkhead_policy::manifest::parse("plan.yaml", &text).unwrap();
        assert_eq!(objects.len(), 2);
        for object in objects {
            let bulkhead_policy::Object::Policy(policy) = object else { panic!("a policy") };
            let normalized = bulkhead_policy::rules::normalize(&policy).unwrap();
            assert!(normalized.audit);
            assert!(normalized.warnings.is_empty());
        }
    }
}
