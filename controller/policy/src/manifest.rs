//! Kubernetes objects from YAML text: Namespaces, Pods and the policy kinds,
//! several documents per text. Other kinds are ignored. Errors name the
//! object and the field path. Pure: the caller reads the files.

use std::{collections::BTreeMap, net::IpAddr};

use bulkhead_crds::Protocol;
use k8s_openapi::api::core::v1 as core;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    model::{ContainerPort, Namespace, Pod, PolicyObject},
    shared::Name,
    snapshot::Object,
};

#[derive(Debug, thiserror::Error)]
#[error("{origin}: document {document}{object}: {message}")]
pub struct ManifestError {
    pub origin: String,
    pub document: usize,
    /// ` (Kind namespace/name)` when known.
    pub object: String,
    pub message: String,
}

/// How Bulkhead reads YAML: the YAML 1.2 core schema (only `true` and
/// `false` are booleans, so a label value `y` or `on` stays a string), and no
/// parser budget: manifests are the operator's own files, and a generated
/// cluster may be hundreds of thousands of objects.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { budget: None, strict_booleans: true }
}

/// The documents of a YAML text, as JSON values (empty documents skipped).
pub fn documents(origin: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    serde_saphyr::from_multiple_with_options::<Value>(text, yaml_options()).map_err(|e| ManifestError {
        origin: origin.to_string(),
        document: 0,
        object: String::new(),
        message: e.to_string(),
    })
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

/// ` (Kind namespace/name)`: how errors name a document's object.
pub fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("?");
    match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
        Some(ns) => format!(" ({kind} {ns}/{name})"),
        None => format!(" ({kind} {name})"),
    }
}

/// One document as an object; `None` for kinds Bulkhead does not read.
/// `document` (from 1) names it in errors.
pub fn object(origin: &str, document: usize, value: Value) -> Result<Option<Object>, ManifestError> {
    let err =
        |message: String| ManifestError { origin: origin.to_string(), document, object: describe(&value), message };
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    let object = match kind {
        "Namespace" => {
            let ns: core::Namespace = typed(&value).map_err(err)?;
            Object::Namespace(Namespace::new(
                &ns.metadata.name.unwrap_or_default(),
                ns.metadata.labels.unwrap_or_default(),
            ))
        }
        "Pod" => match typed(&value).and_then(pod_of).map_err(err)? {
            Some(pod) => Object::Pod(pod),
            None => return Ok(None),
        },
        "ConnectionPolicy" => Object::Policy(Box::new(PolicyObject::Connection(typed(&value).map_err(err)?))),
        "ClusterConnectionPolicy" => Object::Policy(Box::new(PolicyObject::Cluster(typed(&value).map_err(err)?))),
        "NetworkPolicy" => Object::Policy(Box::new(PolicyObject::Network(typed(&value).map_err(err)?))),
        "ClusterNetworkPolicy" => Object::Policy(Box::new(PolicyObject::ClusterNetwork(typed(&value).map_err(err)?))),
        _ => return Ok(None),
    };
    Ok(Some(object))
}

/// The kinds Bulkhead reads; documents of other kinds are passed over.
pub const KINDS: [&str; 6] =
    ["Namespace", "Pod", "ConnectionPolicy", "ClusterConnectionPolicy", "NetworkPolicy", "ClusterNetworkPolicy"];

/// The fields of a document that its kind does not have (`form:` for
/// `from:`), as paths like `spec.ingress[0].form`: an API server without
/// strict field validation prunes them silently, which can turn a rule
/// into one that allows every peer. Empty for other kinds.
pub fn unknown_fields(value: &Value) -> Vec<String> {
    fn of<T: DeserializeOwned>(value: &Value) -> Vec<String> {
        let mut unknown = Vec::new();
        let _: Result<T, _> = serde_ignored::deserialize(value, |path| unknown.push(field_path(&path)));
        // Every object has them; some types read them outside serde.
        unknown.retain(|field| field != "apiVersion" && field != "kind");
        unknown
    }
    match value.get("kind").and_then(Value::as_str).unwrap_or_default() {
        "Namespace" => of::<core::Namespace>(value),
        "Pod" => of::<core::Pod>(value),
        "ConnectionPolicy" => of::<bulkhead_crds::ConnectionPolicy>(value),
        "ClusterConnectionPolicy" => of::<bulkhead_crds::ClusterConnectionPolicy>(value),
        "NetworkPolicy" => of::<k8s_openapi::api::networking::v1::NetworkPolicy>(value),
        "ClusterNetworkPolicy" => of::<bulkhead_crds::policy_networking::ClusterNetworkPolicy>(value),
        _ => Vec::new(),
    }
}

/// `spec.ingress[0].form`: a path as Kubernetes writes field paths.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Every object of a YAML text. `origin` names the text in errors.
pub fn parse(origin: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, value) in documents(origin, text)?.into_iter().enumerate() {
        out.extend(object(origin, index + 1, value)?);
    }
    Ok(out)
}

/// A Pod object as the compiler sees it; `None` for a host-network pod,
/// which has no interface of its own to police and whose addresses are the
/// node's (they keep the node's identity, as NetworkPolicy leaves such pods
/// out of its reach).
pub fn pod_of(pod: core::Pod) -> Result<Option<Pod>, String> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Ok(None);
    }
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
    let labels: BTreeMap<String, String> = pod.metadata.labels.unwrap_or_default();
    let node_name = pod.spec.and_then(|s| s.node_name);
    // Kept for the pod's life, one per pod of the cluster: at their exact
    // size, not the four a first push makes room for (22 MB at 150k pods).
    // (The ports are copied into a shared slice at their size.)
    ips.shrink_to_fit();
    let (namespace, name, node_name) = (namespace.into(), name.into(), node_name.map(Name::from));
    Ok(Some(Pod { namespace, name, labels: labels.into(), ips, ports: ports.into(), node_name, uid: pod.metadata.uid }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_network_pods_are_not_endpoints() {
        let pod = |host: bool| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: x}}\nspec:\n  hostNetwork: {host}\n  nodeName: n1\n  containers: [{{name: c}}]\nstatus: {{podIP: 10.0.0.5}}\n")
        };
        assert!(parse("p.yaml", &pod(true)).unwrap().is_empty(), "the node's address stays the node's");
        assert!(matches!(&parse("p.yaml", &pod(false)).unwrap()[..], [Object::Pod(p)] if p.ips.len() == 1));
    }

    #[test]
    fn a_bad_field_is_named_with_its_path() {
        let text = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n    - ports: [{protocol: ICMP, port: 80}]\n";
        let error = parse("policies.yaml", text).unwrap_err().to_string();
        assert!(error.contains("ConnectionPolicy x/p"), "{error}");
        assert!(error.contains("spec.ingress[0].ports[0].protocol"), "{error}");
    }

    #[test]
    fn unknown_fields_are_named_by_path() {
        let text = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: p, namespace: x, labelz: {}}\nspec:\n  podSelector: {}\n  ingress:\n    - form: [{podSelector: {}}]\n      ports: [{port: 80, protocl: TCP}]\n";
        let value = documents("t", text).unwrap().remove(0);
        assert_eq!(
            unknown_fields(&value),
            ["metadata.labelz", "spec.ingress[0].form", "spec.ingress[0].ports[0].protocl"]
        );
        let good = text.replace("labelz", "labels").replace("form", "from").replace("protocl", "protocol");
        assert_eq!(unknown_fields(&documents("t", &good).unwrap().remove(0)), Vec::<String>::new());
        let network = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector: {}\n  ingress: [{form: []}]\n";
        assert_eq!(unknown_fields(&documents("t", network).unwrap().remove(0)), ["spec.ingress[0].form"]);
    }

    #[test]
    fn other_kinds_are_ignored_and_pods_parse() {
        let text = "kind: Service\nmetadata: {name: s}\n---\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec:\n  containers:\n    - name: c\n      ports: [{containerPort: 80, name: http}, {containerPort: 81, protocol: UDP}]\n";
        let objects = parse("cluster.yaml", text).unwrap();
        assert_eq!(objects.len(), 1);
        let Object::Pod(pod) = &objects[0] else { panic!("a pod") };
        assert_eq!(pod.ports.len(), 2);
        assert_eq!(pod.ports[1].protocol, Protocol::UDP);
    }

    #[test]
    fn broken_yaml_is_an_error_naming_the_text() {
        let error = parse("bad.yaml", "kind: Pod\nmetadata: {name: [\n").unwrap_err().to_string();
        assert!(error.starts_with("bad.yaml"), "{error}");
    }
}
