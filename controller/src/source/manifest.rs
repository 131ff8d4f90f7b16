//! Kubernetes objects from YAML text: Namespaces, Pods and the three policy
//! kinds, several documents per file. Other kinds are ignored. Parse errors
//! name the object and the field path.

use std::{collections::BTreeMap, net::IpAddr};

use bulkhead_crds::{ClusterConnectionPolicy, ConnectionPolicy, Protocol};
use k8s_openapi::api::{core::v1 as core, networking::v1::NetworkPolicy};
use serde::de::DeserializeOwned;

use crate::policy::{model::ContainerPort, Namespace, Pod, PolicyObject};

/// The annotation asking the scenario runner for an IPv6 address too.
pub const IP_FAMILIES_ANNOTATION: &str = "bulkhead.io/ip-families";

#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    /// A pod, and whether it asked for IPv6 too.
    Pod(Pod, bool),
    Policy(PolicyObject),
}

#[derive(Debug, thiserror::Error)]
#[error("{origin}: document {document}{object}: {message}")]
pub struct ManifestError {
    pub origin: String,
    pub document: usize,
    /// ` (Kind namespace/name)` when known.
    pub object: String,
    pub message: String,
}

fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

/// Parse every document of a YAML text. `origin` names the text in errors.
pub fn parse(origin: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |object: String, message: String| ManifestError {
            origin: origin.to_string(),
            document: index + 1,
            object,
            message,
        };
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
            .map_err(|e| err(String::new(), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("?");
        let namespace = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str());
        let object = match namespace {
            Some(ns) => format!(" ({kind} {ns}/{name})"),
            None => format!(" ({kind} {name})"),
        };
        match kind.as_str() {
            "Namespace" => {
                let ns: core::Namespace = typed(value).map_err(|m| err(object, m))?;
                let labels = ns.metadata.labels.unwrap_or_default();
                out.push(Object::Namespace(Namespace::new(&ns.metadata.name.unwrap_or_default(), labels)));
            }
            "Pod" => {
                let pod: core::Pod = typed(value).map_err(|m| err(object.clone(), m))?;
                let (pod, dual) = pod_of(pod).map_err(|m| err(object, m))?;
                out.push(Object::Pod(pod, dual));
            }
            "ConnectionPolicy" => out.push(Object::Policy(PolicyObject::Connection(
                typed::<ConnectionPolicy>(value).map_err(|m| err(object, m))?,
            ))),
            "ClusterConnectionPolicy" => out.push(Object::Policy(PolicyObject::Cluster(
                typed::<ClusterConnectionPolicy>(value).map_err(|m| err(object, m))?,
            ))),
            "NetworkPolicy" => out.push(Object::Policy(PolicyObject::Network(
                typed::<NetworkPolicy>(value).map_err(|m| err(object, m))?,
            ))),
            _ => {}
        }
    }
    Ok(out)
}

/// A Pod object as the compiler sees it, and whether it asked for IPv6 too.
pub fn pod_of(pod: core::Pod) -> Result<(Pod, bool), String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut ports = Vec::new();
    for (ci, container) in pod.spec.iter().flat_map(|s| &s.containers).enumerate() {
        for (pi, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let protocol = match port.protocol.as_deref() {
                None | Some("TCP") => Protocol::TCP,
                Some("UDP") => Protocol::UDP,
                Some("SCTP") => Protocol::SCTP,
                Some(other) => return Err(format!("{field}.protocol: unknown protocol {other:?}")),
            };
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{field}.containerPort: {} is not a port", port.container_port))?;
            ports.push(ContainerPort { name: port.name.clone(), port: number, protocol });
        }
    }
    let mut ips = Vec::new();
    for (i, ip) in pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten()).enumerate() {
        let address: IpAddr =
            ip.ip.parse().map_err(|_| format!("status.podIPs[{i}].ip: {:?} is not an IP address", ip.ip))?;
        ips.push(address);
    }
    if ips.is_empty() {
        if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()) {
            ips.push(ip.parse().map_err(|_| format!("status.podIP: {ip:?} is not an IP address"))?);
        }
    }
    let dual = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IP_FAMILIES_ANNOTATION))
        .is_some_and(|v| v.split(',').any(|f| f.trim() == "IPv6"));
    let labels: BTreeMap<String, String> = pod.metadata.labels.unwrap_or_default();
    let node_name = pod.spec.and_then(|s| s.node_name);
    Ok((Pod { namespace, name, labels, ips, ports, node_name, uid: pod.metadata.uid }, dual))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named_with_its_path() {
        let text = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n    - ports: [{protocol: ICMP, port: 80}]\n";
        let error = parse("policies.yaml", text).unwrap_err().to_string();
        assert!(error.contains("ConnectionPolicy x/p"), "{error}");
        assert!(error.contains("spec.ingress[0].ports[0].protocol"), "{error}");
    }

    #[test]
    fn other_kinds_are_ignored_and_pods_parse() {
        let text = "kind: Service\nmetadata: {name: s}\n---\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}, annotations: {bulkhead.io/ip-families: \"IPv4,IPv6\"}}\nspec:\n  containers:\n    - name: c\n      ports: [{containerPort: 80, name: http}, {containerPort: 81, protocol: UDP}]\n";
        let objects = parse("cluster.yaml", text).unwrap();
        assert_eq!(objects.len(), 1);
        let Object::Pod(pod, dual) = &objects[0] else { panic!("a pod") };
        assert!(dual);
        assert_eq!(pod.ports.len(), 2);
        assert_eq!(pod.ports[1].protocol, Protocol::UDP);
    }
}
