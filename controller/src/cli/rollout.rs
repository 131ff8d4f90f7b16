//! `bulkhead rollout plan`: the first step of a default-deny rollout, one
//! namespace at a time. Each namespace gets a ConnectionPolicy that isolates
//! every pod both ways in Audit mode (so nothing breaks yet and every
//! connection it would refuse is reported), with the allowances every
//! namespace needs stated in it: DNS to the cluster DNS, and whatever the
//! operator adds.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use bulkhead_crds::{
    ConnectionPolicy, ConnectionPolicySpec, EgressRule, IpBlock, Mode, Peer, PolicyType, PortSpec, Protocol,
};
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};
use kube::api::{Api, Patch, PatchParams};

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
