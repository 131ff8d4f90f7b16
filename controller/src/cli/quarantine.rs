//! `bulkhead quarantine list|release`: the pods an agent quarantined after
//! an egress anomaly (labelled `bulkhead.io/quarantine`), and undoing it.

use anyhow::{Context, Result};
use bulkhead_crds::{QUARANTINE_LABEL, QUARANTINE_REASON_ANNOTATION};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, ListParams, Patch, PatchParams},
    ResourceExt,
};

use super::cluster;

/// A quarantined pod: `namespace/name`, and why.
#[derive(serde::Serialize)]
pub struct Quarantined {
    pub pod: String,
    pub node: Option<String>,
    pub reason: Option<String>,
}

pub async fn list() -> Result<Vec<Quarantined>> {
    let pods: Api<Pod> = Api::all(cluster::client().await?);
    let listed =
        pods.list(&ListParams::default().labels(QUARANTINE_LABEL)).await.context("listing quarantined pods")?;
    Ok(listed
        .items
        .iter()
        .map(|pod| Quarantined {
            pod: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            reason: pod.annotations().get(QUARANTINE_REASON_ANNOTATION).cloned(),
        })
        .collect())
}

pub fn print(quarantined: &[Quarantined]) {
    if quarantined.is_empty() {
        println!("no pod is quarantined");
        return;
    }
    println!("{:<48} {:<20} REASON", "POD", "NODE");
    for q in quarantined {
        println!("{:<48} {:<20} {}", q.pod, q.node.as_deref().unwrap_or("-"), q.reason.as_deref().unwrap_or("-"));
    }
}

/// Take the label (and its reason) off the pod: the quarantine policy
/// lets go of it at once. Its baseline keeps the destination that caused
/// it, so the same connection does not quarantine it again.
pub async fn release(namespace: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster::client().await?, namespace);
    let pod = pods.get(name).await.with_context(|| format!("reading pod {namespace}/{name}"))?;
    if !pod.labels().contains_key(QUARANTINE_LABEL) {
        anyhow::bail!("pod {namespace}/{name} is not quarantined (no {QUARANTINE_LABEL} label)");
    }
    let patch = serde_json::json!({ "metadata": {
        "labels": { QUARANTINE_LABEL: null },
        "annotations": { QUARANTINE_REASON_ANNOTATION: null },
    }});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("releasing pod {namespace}/{name}"))?;
    println!("pod/{name} in {namespace} released from quarantine");
    Ok(())
}
